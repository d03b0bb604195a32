//! The bus's counters: what the dispatcher, each handler and plugin, the relay
//! and the supervised tasks did since the process started.
//!
//! One source of truth, written by the parts that do the work (the dispatcher,
//! the relay, the supervisor) and read by those that report it (the Prometheus
//! export in [`crate::metrics`], `<prefix>.bus.stats`, the health checks of
//! [`crate::monitor`]). A leaf: it uses no other module of this crate, so every
//! writer and reader can depend on it without depending on each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Serialize, Serializer};

/// Upper bounds (seconds) of the handler latency histogram buckets; a last
/// `+Inf` bucket follows.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms_to_rfc3339(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(ms))
        .flatten()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// A lock-free latency histogram with fixed buckets ([`LATENCY_BUCKETS`]).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Sum of the observations in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Per-bucket (not cumulative) counts with their upper bounds; the last bound is
    /// `f64::MAX` (`+Inf`).
    pub(crate) fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect()
    }
}

/// What the dispatcher did for one handler since the bus started.
#[derive(Debug)]
pub struct HandlerStats {
    /// Plugin id.
    pub plugin: Arc<str>,
    /// Handler name.
    pub handler: Arc<str>,
    /// Deliveries started (one per event and handler, retries not counted; deferred
    /// deliveries count when they are delivered from the deferred queue).
    pub deliveries: AtomicU64,
    /// Deliveries that succeeded.
    pub successes: AtomicU64,
    /// Failed attempts (each retry that fails counts).
    pub errors: AtomicU64,
    /// Attempts after the first (retries).
    pub retries: AtomicU64,
    /// Deliveries dead-lettered.
    pub dead_letters: AtomicU64,
    /// Deliveries deferred (the plugin had no replica).
    pub deferred: AtomicU64,
    /// Time from request to reply of every attempt that got an answer or timed out.
    pub latency: LatencyHistogram,
    /// The stream sequence of the last event this handler finished (0 = none; with
    /// objects in parallel, the latest to finish, not the highest).
    pub last_seq: AtomicU64,
    /// Unix milliseconds of the last success (0 = none).
    pub last_success_ms: AtomicI64,
    /// Unix milliseconds of the last failed attempt (0 = none).
    pub last_error_ms: AtomicI64,
    /// Unix milliseconds of the first failure since the last success (0 = not failing).
    pub failing_since_ms: AtomicI64,
    /// Unix milliseconds of the last attempt that found no replica subscribed ("no
    /// responders"; 0 = never).
    pub last_absent_ms: AtomicI64,
    last_error: Mutex<String>,
}

impl HandlerStats {
    fn new(plugin: Arc<str>, handler: Arc<str>) -> Self {
        HandlerStats {
            plugin,
            handler,
            deliveries: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            latency: LatencyHistogram::default(),
            last_seq: AtomicU64::new(0),
            last_success_ms: AtomicI64::new(0),
            last_error_ms: AtomicI64::new(0),
            failing_since_ms: AtomicI64::new(0),
            last_absent_ms: AtomicI64::new(0),
            last_error: Mutex::new(String::new()),
        }
    }

    /// Records a successful attempt.
    pub(crate) fn success(&self, took: Duration, seq: u64) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
        self.last_seq.store(seq, Ordering::Relaxed);
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
        if self.failing_since_ms.load(Ordering::Relaxed) != 0 {
            self.failing_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed attempt (`took` is `None` when no request was answered in time).
    pub(crate) fn failure(&self, took: Option<Duration>, error: &str) {
        let now = now_ms();
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(took) = took {
            self.latency.observe(took);
        }
        self.last_error_ms.store(now, Ordering::Relaxed);
        let _ =
            self.failing_since_ms
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        error.clone_into(&mut last);
    }

    /// Records an attempt that found no replica subscribed.
    pub(crate) fn absent(&self) {
        self.last_absent_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Records a dead letter.
    pub(crate) fn dead_lettered(&self, seq: u64) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.last_seq.store(seq, Ordering::Relaxed);
    }

    /// The text of the last failed attempt (empty when none).
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Serialize for HandlerStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let error = self.last_error();
        serde_json::json!({
            "deliveries": get(&self.deliveries),
            "successes": get(&self.successes),
            "errors": get(&self.errors),
            "retries": get(&self.retries),
            "dead_letters": get(&self.dead_letters),
            "deferred": get(&self.deferred),
            "latency_count": self.latency.count(),
            "latency_sum_seconds": self.latency.sum_seconds(),
            "last_seq": get(&self.last_seq),
            "last_success": ms_to_rfc3339(self.last_success_ms.load(Ordering::Relaxed)),
            "last_error_at": ms_to_rfc3339(self.last_error_ms.load(Ordering::Relaxed)),
            "last_error": (!error.is_empty()).then_some(error),
            "failing_since": ms_to_rfc3339(self.failing_since_ms.load(Ordering::Relaxed)),
        })
        .serialize(s)
    }
}

/// Per-handler stats, keyed by the handler's endpoint subject.
#[derive(Debug, Default)]
pub struct HandlerStatsMap(RwLock<HashMap<Arc<str>, Arc<HandlerStats>>>);

impl HandlerStatsMap {
    /// The stats of the handler with endpoint `subject`, created on first use.
    pub(crate) fn get_or_create(
        &self,
        subject: &Arc<str>,
        plugin: &Arc<str>,
        handler: &Arc<str>,
    ) -> Arc<HandlerStats> {
        if let Some(h) = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&**subject)
        {
            return h.clone();
        }
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(subject.clone())
            .or_insert_with(|| Arc::new(HandlerStats::new(plugin.clone(), handler.clone())))
            .clone()
    }

    /// Every handler's stats, sorted by plugin and handler.
    pub fn all(&self) -> Vec<Arc<HandlerStats>> {
        let mut v: Vec<_> = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.plugin, &a.handler).cmp(&(&b.plugin, &b.handler)));
        v
    }

    /// One plugin's handlers.
    pub fn of_plugin(&self, plugin: &str) -> Vec<Arc<HandlerStats>> {
        self.all()
            .into_iter()
            .filter(|h| &*h.plugin == plugin)
            .collect()
    }
}

impl Serialize for HandlerStatsMap {
    /// As `{plugin: {handler: stats}}`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out: BTreeMap<String, BTreeMap<String, Arc<HandlerStats>>> = BTreeMap::new();
        for h in self.all() {
            out.entry(h.plugin.to_string())
                .or_default()
                .insert(h.handler.to_string(), h);
        }
        out.serialize(s)
    }
}

/// Deliveries waiting in the deferred stream for one plugin, as one dispatcher
/// (one partition) counts them. Never wraps: it is raised before a delivery is
/// appended to the stream ([`DeferredGauge::counted`]), so the drainer, which
/// lowers it once the delivery is done, cannot lower it first; and it stops at
/// 0 and at `u64::MAX` whatever the order.
#[derive(Debug, Default)]
pub struct DeferredGauge(AtomicU64);

impl DeferredGauge {
    /// Deliveries waiting.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// `n` more deliveries waiting.
    pub(crate) fn add(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_add(n))
            });
    }

    /// One delivery done (never below 0).
    pub(crate) fn done(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// Counts one delivery, then runs `append` (which appends it to the stream);
    /// takes the count back when `append` fails.
    ///
    /// # Errors
    ///
    /// `append`'s.
    pub(crate) async fn counted<T, E>(
        &self,
        append: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.add(1);
        let result = append.await;
        if result.is_err() {
            self.done();
        }
        result
    }
}

/// Per-plugin state of the bus.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// The deferral gauges of the plugin's dispatchers (one per partition this
    /// bus dispatches; a dispatcher that stopped drops its own).
    deferred: Mutex<Vec<std::sync::Weak<DeferredGauge>>>,
    /// Replicas that answered the last `$SRV.PING.<plugin>` of the monitor (-1 = not
    /// checked yet).
    pub replicas: AtomicI64,
    /// True while the plugin is degraded (failing continuously for
    /// [`MonitorSettings::degraded_after`](crate::config::MonitorSettings::degraded_after)).
    pub degraded: AtomicBool,
    /// True once a replica has answered the monitor's `$SRV.PING` (a Services API
    /// plugin): its replicas are counted by PING only, never by its deliveries.
    pub answered_ping: AtomicBool,
}

impl PluginStats {
    fn new() -> Self {
        PluginStats {
            deferred: Mutex::default(),
            replicas: AtomicI64::new(-1),
            degraded: AtomicBool::new(false),
            answered_ping: AtomicBool::new(false),
        }
    }

    /// Deliveries waiting for this plugin in the deferred stream (all the
    /// dispatchers of this bus).
    pub fn deferred(&self) -> u64 {
        self.deferred
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .fold(0, |sum, g| sum.saturating_add(g.get()))
    }
}

/// Per-plugin state, by plugin id.
#[derive(Debug, Default)]
pub struct PluginStatsMap(RwLock<BTreeMap<String, Arc<PluginStats>>>);

impl PluginStatsMap {
    /// The plugin's state, created on first use.
    pub fn get_or_create(&self, plugin: &str) -> Arc<PluginStats> {
        if let Some(p) = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(plugin)
        {
            return p.clone();
        }
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(plugin.to_owned())
            .or_insert_with(|| Arc::new(PluginStats::new()))
            .clone()
    }

    /// The plugin's state, if it was ever recorded.
    pub fn get(&self, plugin: &str) -> Option<Arc<PluginStats>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(plugin)
            .cloned()
    }

    /// Every plugin's state, by id.
    pub fn all(&self) -> Vec<(String, Arc<PluginStats>)> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Adds `gauge` (a dispatcher's deferral gauge) to the plugin's deferred count.
    pub(crate) fn track_deferred(&self, plugin: &str, gauge: &Arc<DeferredGauge>) {
        let p = self.get_or_create(plugin);
        let mut gauges = p
            .deferred
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gauges.retain(|g| g.strong_count() > 0);
        gauges.push(Arc::downgrade(gauge));
    }
}

impl Serialize for PluginStatsMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let out: BTreeMap<String, serde_json::Value> = self
            .all()
            .into_iter()
            .map(|(id, p)| {
                let replicas = p.replicas.load(Ordering::Relaxed);
                (
                    id,
                    serde_json::json!({
                        "deferred": p.deferred(),
                        "replicas": (replicas >= 0).then_some(replicas),
                        "degraded": p.degraded.load(Ordering::Relaxed),
                    }),
                )
            })
            .collect();
        out.serialize(s)
    }
}

/// A counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// What the dispatcher has done since it started.
#[derive(Debug, Default, Serialize)]
pub struct DispatchStats {
    /// Events fully dispatched and acked.
    pub events_acked: Counter,
    /// Successful handler deliveries.
    pub delivered: Counter,
    /// Failed handler attempts (each retry counts).
    pub failed_attempts: Counter,
    /// Deliveries dead-lettered.
    pub dead_lettered: Counter,
    /// Deliveries deferred because their plugin had no replica.
    pub deferred: Counter,
    /// Events on the stream that could not be read (dead-lettered as malformed).
    pub malformed: Counter,
    /// Per handler (`{plugin: {handler: …}}`), recorded when
    /// [`DispatcherSettings::metrics`](crate::config::DispatcherSettings::metrics) is on.
    pub handlers: HandlerStatsMap,
    /// Per plugin: deferred deliveries, replicas, degraded.
    pub plugins: PluginStatsMap,
    /// Panics of the bus's long-lived tasks, by task ([`crate::supervise`]).
    pub task_panics: Arc<TaskPanics>,
    /// Dispatchers of this bus taking events (one per partition it holds).
    #[serde(skip)]
    running: AtomicUsize,
    /// Of those, the ones on a pinned-client consumer (NATS 2.11+).
    #[serde(skip)]
    pinned: AtomicUsize,
    /// The partitions this bus dispatches now (empty when not partitioned).
    #[serde(skip)]
    partitions: Mutex<BTreeSet<u32>>,
    /// True while this bus waits for another one's dispatcher lease.
    #[serde(skip)]
    standby: AtomicBool,
}

impl DispatchStats {
    /// True while the dispatcher takes events from its consumer.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed) > 0
    }

    /// The partitions this bus dispatches now, when the bus is partitioned
    /// ([`crate::config::DispatcherSettings::partitions`]).
    pub fn partitions(&self) -> Vec<u32> {
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// True while the dispatcher runs on pinned-client consumers (NATS 2.11+:
    /// the server, too, delivers to one bus at a time).
    pub fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed) > 0
    }

    /// Counts a dispatcher that starts (`running`) or stops taking events, on a
    /// pinned-client consumer or not; `partition` is the index of its partition,
    /// `None` when the bus is not partitioned.
    pub(crate) fn set_running(&self, partition: Option<u32>, running: bool, pinned: bool) {
        let counters = [Some(&self.running), pinned.then_some(&self.pinned)];
        for counter in counters.into_iter().flatten() {
            if running {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(index) = partition {
            let mut owned = self
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if running {
                owned.insert(index);
            } else {
                owned.remove(&index);
            }
        }
    }

    /// True while this bus stands by: another bus holds the dispatcher lease.
    pub fn is_standby(&self) -> bool {
        self.standby.load(Ordering::Relaxed)
    }

    /// `active`, `standby` or `stopped`.
    pub fn role(&self) -> &'static str {
        if self.is_running() {
            "active"
        } else if self.is_standby() {
            "standby"
        } else {
            "stopped"
        }
    }

    pub(crate) fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }
}

/// Panics of the bus's long-lived tasks, by task name, since the process started.
#[derive(Debug, Default)]
pub struct TaskPanics(Mutex<BTreeMap<&'static str, u64>>);

impl TaskPanics {
    /// Counts one panic of `task`.
    pub fn record(&self, task: &'static str) {
        *self.lock().entry(task).or_default() += 1;
    }

    /// Panics of `task`.
    pub fn get(&self, task: &str) -> u64 {
        self.lock().get(task).copied().unwrap_or(0)
    }

    /// Every task that panicked, with its count, by name.
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        self.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Panics of all tasks.
    pub fn total(&self) -> u64 {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Serialize for TaskPanics {
    /// As `{task: count}`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.lock().serialize(s)
    }
}

/// Counters and gauges of a running relay (shared; read them any time).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows the stream stored.
    pub published: AtomicU64,
    /// Rows the stream already had (a resend after a crash or by a second relay).
    pub duplicates: AtomicU64,
    /// Rows moved to the dead-letter stream as unpublishable.
    pub invalid: AtomicU64,
    /// Unpublishable rows whose dead letter failed too (each is kept and tried
    /// again later).
    pub dead_letter_failures: AtomicU64,
    /// Unpublishable rows set aside now: neither published nor dead-lettered,
    /// kept in the outbox, waiting for their next try.
    pub parked: AtomicI64,
    /// Failed publishes and queries (each followed by a back-off).
    pub errors: AtomicU64,
    /// Rows waiting in the outbox at the last measurement.
    pub backlog_rows: AtomicI64,
    /// Age of the oldest waiting row at the last measurement, ms.
    pub backlog_oldest_ms: AtomicI64,
    /// False while publishes fail (NATS unreachable, stream unavailable).
    pub healthy: AtomicBool,
    /// False while the outbox cannot be read or cleaned (database unreachable).
    pub database_ok: AtomicBool,
}

impl RelayStats {
    /// The counters as JSON (for the bus's status subject).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "published": self.published.load(Ordering::Relaxed),
            "duplicates": self.duplicates.load(Ordering::Relaxed),
            "invalid": self.invalid.load(Ordering::Relaxed),
            "dead_letter_failures": self.dead_letter_failures.load(Ordering::Relaxed),
            "parked": self.parked.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "backlog_rows": self.backlog_rows.load(Ordering::Relaxed),
            "backlog_oldest_ms": self.backlog_oldest_ms.load(Ordering::Relaxed),
            "healthy": self.healthy.load(Ordering::Relaxed),
            "database_ok": self.database_ok.load(Ordering::Relaxed),
        })
    }

    /// Publishing works and the database answers.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.database_ok.load(Ordering::Relaxed)
    }
}
