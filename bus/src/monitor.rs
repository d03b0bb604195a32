//! The bus's own health: the periodic check that counts plugin replicas
//! (`$SRV.PING.<plugin>`), marks failing plugins degraded and publishes alerts, and
//! the health report served on `<prefix>.bus.health` and `/healthz`.
//!
//! Alerts go to `<prefix>.alerts.<plugin>.<kind>` as JSON ([`AlertEvent`]), once per
//! state change (`firing`, then `resolved`), with a log line. Kinds:
//!
//! | kind | fires when | resolves when |
//! |---|---|---|
//! | `no_replica` | an enabled, registered plugin answers no `$SRV.PING` and has had no successful delivery within [`MonitorSettings::alive_window`] (or one found it absent since) | a replica answers, or a delivery succeeds |
//! | `error_rate` | failed attempts / attempts over one check interval ≥ [`MonitorSettings::error_rate`] (with at least [`MonitorSettings::error_rate_min_attempts`] attempts) | an interval with attempts is below the rate |
//! | `lag` | events the bus has not finished plus the plugin's deferred deliveries ≥ [`MonitorSettings::lag_events`] | below it |
//! | `degraded` | the plugin has failed without a success for [`MonitorSettings::degraded_after`] | a success |
//!
//! A degraded plugin keeps getting its deliveries (retried and dead-lettered as
//! usual); it is only shown as degraded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use core_events::Subjects;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{BusConfig, MonitorSettings};
use crate::metrics::{Metrics, delivering, handler_lag};
use crate::registry::Registry;
use crate::stats::now_ms;

/// Asks every replica of a Services API service (`$SRV.<verb>.<name>`, verb `PING`,
/// `INFO` or `STATS`) and collects the answers that come within `timeout`, one per
/// replica (deduplicated by the service instance `id`).
///
/// # Errors
///
/// When the request cannot be sent.
pub async fn services(
    client: &async_nats::Client,
    verb: &str,
    name: &str,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(format!("$SRV.{verb}.{name}"), inbox, Bytes::new())
        .await?;
    client.flush().await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out: Vec<serde_json::Value> = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
            continue;
        };
        if !out
            .iter()
            .any(|o| o.get("id").is_some() && o["id"] == v["id"])
        {
            out.push(v);
        }
    }
    let _ = sub.unsubscribe().await;
    out.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(out)
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// An enabled, registered plugin has no replica answering `$SRV.PING`.
    NoReplica,
    /// Too many failed attempts in one check interval.
    ErrorRate,
    /// Too many events still to dispatch for the plugin.
    Lag,
    /// The plugin has failed continuously for the configured time.
    Degraded,
    /// The outbox relay (plugin `_relay`) is behind: its oldest unpublished row
    /// is older than the threshold, or it cannot publish.
    Backlog,
}

impl AlertKind {
    /// The kind's name, as in the subject.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::NoReplica => "no_replica",
            AlertKind::ErrorRate => "error_rate",
            AlertKind::Lag => "lag",
            AlertKind::Degraded => "degraded",
            AlertKind::Backlog => "backlog",
        }
    }
}

/// `firing` or `resolved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition started.
    Firing,
    /// The condition ended.
    Resolved,
}

/// The body of an alert on `<prefix>.alerts.<plugin>.<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Plugin id.
    pub plugin: String,
    /// What it is about.
    pub kind: AlertKind,
    /// Firing or resolved.
    pub state: AlertState,
    /// The measured value (replicas, error rate, lag in events, seconds failing).
    pub value: f64,
    /// The threshold it was compared with.
    pub threshold: f64,
    /// One line for people.
    pub message: String,
    /// When the state changed (RFC 3339).
    pub at: String,
}

/// What a plugin looks like to the bus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginHealth {
    /// Its manifest is registered (and valid).
    pub registered: bool,
    /// It is in `ENABLED_PLUGINS` (position, 0-based).
    pub enabled_rank: Option<usize>,
    /// Replicas that answered the monitor's last `$SRV.PING` (`None`: not checked yet).
    pub replicas: Option<i64>,
    /// Failing continuously for the configured time.
    pub degraded: bool,
    /// Deliveries waiting in the deferred stream.
    pub deferred: u64,
    /// Last success of any of its handlers (RFC 3339).
    pub last_success: Option<String>,
    /// Last failed attempt of any of its handlers (RFC 3339).
    pub last_error_at: Option<String>,
    /// Its text.
    pub last_error: Option<String>,
    /// First failure since the last success (RFC 3339).
    pub failing_since: Option<String>,
    /// Events the bus has not finished plus the plugin's deferred deliveries.
    pub lag: u64,
    /// Alive by its deliveries: it never answered `$SRV.PING` since the bus
    /// started (a plain queue subscriber), had a successful delivery within
    /// [`MonitorSettings::alive_window`] and none found it absent since. Such a
    /// plugin is not reported without replica.
    #[serde(default)]
    pub delivering: bool,
}

/// The bus's health report (`<prefix>.bus.health`, `/healthz`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BusHealth {
    /// `ok` when NATS is connected and the dispatcher runs, else `unhealthy`.
    pub status: String,
    /// The NATS connection state (`connected`, `disconnected`, `pending`).
    pub nats: String,
    /// The dispatcher takes events.
    pub dispatcher_running: bool,
    /// `active` (this bus dispatches), `standby` (another bus holds the
    /// dispatcher lease) or `stopped`.
    #[serde(default)]
    pub dispatcher_role: String,
    /// The events stream's partition count (`N` of its `{{partition(N,1,4)}}`
    /// subject transform, which the bus checked at start-up): the events are
    /// dispatched in this many partitions (1: not partitioned).
    #[serde(default)]
    pub partitions: u32,
    /// The partitions this bus dispatches now (when partitioned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dispatcher_partitions: Vec<u32>,
    /// The dispatcher's consumers are pinned-client ones (NATS 2.11+): the
    /// server delivers to this bus only.
    #[serde(default)]
    pub dispatcher_pinned: bool,
    /// `ENABLED_PLUGINS`, in order.
    pub enabled_plugins: Vec<String>,
    /// Events of the stream not yet taken by the dispatcher.
    pub pending: u64,
    /// Events the dispatcher holds and has not acked.
    pub ack_pending: u64,
    /// Events acked since the bus started.
    pub events_acked: u64,
    /// Checks the monitor has done.
    pub monitor_checks: u64,
    /// Every registered or enabled plugin.
    pub plugins: BTreeMap<String, PluginHealth>,
    /// Alerts firing now.
    pub alerts: Vec<AlertEvent>,
    /// The outbox relay's counters and backlog, when this bus runs one
    /// (`published`, `duplicates`, `invalid`, `errors`, `backlog_rows`,
    /// `backlog_oldest_ms`, `healthy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<serde_json::Value>,
    /// Panics of the bus's long-lived tasks since it started, by task (each task
    /// was started again; [`crate::supervise`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub task_panics: BTreeMap<String, u64>,
}

impl BusHealth {
    /// True when NATS is connected and the dispatcher runs.
    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

/// When the earliest of these handlers started failing without a success (ms
/// since the epoch), 0 when none is failing.
fn failing_since_ms(handlers: &[Arc<crate::stats::HandlerStats>]) -> i64 {
    handlers
        .iter()
        .map(|h| h.failing_since_ms.load(Ordering::Relaxed))
        .filter(|v| *v > 0)
        .min()
        .unwrap_or(0)
}

fn rfc3339(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(ms))
        .flatten()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Everything the health report and the monitor read; cheap to clone.
#[derive(Clone)]
pub struct Health {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    consumers: Vec<String>,
    partitions: u32,
    enabled: Vec<String>,
    registry: Registry,
    metrics: Arc<Metrics>,
    settings: MonitorSettings,
    checks: Arc<AtomicU64>,
    firing: Arc<std::sync::Mutex<BTreeMap<(String, AlertKind), AlertEvent>>>,
}

impl Health {
    /// The health of the bus described by `config`.
    pub fn new(
        client: async_nats::Client,
        config: &BusConfig,
        registry: Registry,
        metrics: Arc<Metrics>,
    ) -> Health {
        Health {
            js: jetstream::new(client.clone()),
            client,
            subjects: config.subjects.clone(),
            consumers: {
                let count = config.dispatcher.partitions.max(1);
                (0..count)
                    .map(|index| {
                        crate::dispatch::Partition { index, count }
                            .consumer(&config.dispatcher.consumer)
                    })
                    .collect()
            },
            partitions: config.dispatcher.partitions.max(1),
            enabled: config.enabled_plugins.clone(),
            registry,
            metrics,
            settings: config.monitor.clone(),
            checks: Arc::default(),
            firing: Arc::default(),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Re-reads the dispatcher consumer's position from NATS (errors are logged).
    pub async fn sample(&self) {
        if let Err(e) = self
            .metrics
            .sample(&self.js, &self.subjects, &self.consumers)
            .await
        {
            tracing::debug!(error = %e, "could not sample the dispatcher consumer");
        }
    }

    /// True when NATS is connected, the dispatcher runs and the relay (if any)
    /// publishes.
    pub fn is_ok(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
            && (self.metrics.stats().is_running() || self.metrics.stats().is_standby())
            && self.metrics.relay_stats().is_none_or(|r| r.is_healthy())
    }

    /// Checks the monitor has done.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// The report, from the last sampled values.
    pub fn report(&self) -> BusHealth {
        let stats = self.metrics.stats();
        let sampled = self.metrics.sampled();
        let table = self.registry.table();
        let now = now_ms();
        let mut plugins: BTreeMap<String, PluginHealth> = BTreeMap::new();
        let ids = table
            .plugins()
            .keys()
            .cloned()
            .chain(self.enabled.iter().cloned());
        for id in ids {
            let entry = table.plugins().get(&id);
            let p = stats.plugins.get(&id);
            let handlers = stats.handlers.of_plugin(&id);
            let max = |f: fn(&crate::stats::HandlerStats) -> i64| {
                handlers.iter().map(|h| f(h)).max().unwrap_or(0)
            };
            let last_success = max(|h| h.last_success_ms.load(Ordering::Relaxed));
            let last_error_ms = max(|h| h.last_error_ms.load(Ordering::Relaxed));
            let failing_since = failing_since_ms(&handlers);
            let last_error = handlers
                .iter()
                .max_by_key(|h| h.last_error_ms.load(Ordering::Relaxed))
                .map(|h| h.last_error())
                .filter(|e| !e.is_empty());
            let replicas = p
                .as_ref()
                .map(|p| p.replicas.load(Ordering::Relaxed))
                .filter(|r| *r >= 0);
            plugins.insert(
                id.clone(),
                PluginHealth {
                    registered: entry.is_some(),
                    enabled_rank: self.enabled.iter().position(|e| *e == id),
                    replicas,
                    degraded: p
                        .as_ref()
                        .is_some_and(|p| p.degraded.load(Ordering::Relaxed)),
                    deferred: p.as_ref().map_or(0, |p| p.deferred()),
                    last_success: rfc3339(last_success),
                    last_error_at: rfc3339(last_error_ms),
                    last_error,
                    failing_since: rfc3339(failing_since),
                    lag: handler_lag(sampled, p.as_deref()),
                    delivering: !p
                        .as_ref()
                        .is_some_and(|p| p.answered_ping.load(Ordering::Relaxed))
                        && delivering(&handlers, now, self.settings.alive_window),
                },
            );
        }
        let ok = self.is_ok();
        BusHealth {
            status: if ok { "ok" } else { "unhealthy" }.to_owned(),
            nats: match self.client.connection_state() {
                async_nats::connection::State::Connected => "connected",
                async_nats::connection::State::Disconnected => "disconnected",
                async_nats::connection::State::Pending => "pending",
            }
            .to_owned(),
            dispatcher_running: stats.is_running(),
            dispatcher_role: stats.role().to_owned(),
            partitions: self.partitions,
            dispatcher_partitions: stats.partitions(),
            dispatcher_pinned: stats.is_pinned(),
            enabled_plugins: self.enabled.clone(),
            pending: sampled.pending.load(Ordering::Relaxed),
            ack_pending: sampled.ack_pending.load(Ordering::Relaxed),
            events_acked: stats.events_acked.get(),
            monitor_checks: self.checks(),
            plugins,
            alerts: self
                .firing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .cloned()
                .collect(),
            relay: self.metrics.relay_stats().map(|r| r.to_json()),
            task_panics: stats
                .task_panics
                .all()
                .into_iter()
                .map(|(task, n)| (task.to_owned(), n))
                .collect(),
        }
    }

    /// Runs the periodic check until `shutdown` (nothing when the monitor is off),
    /// supervised: a panic is logged and counted and the check starts again
    /// ([`crate::supervise`]). `<prefix>.bus.health` is answered by the bus's
    /// status responder ([`crate::run`]).
    pub fn spawn_monitor(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        let panics = self.metrics.stats().task_panics.clone();
        let token = shutdown.clone();
        crate::supervise::spawn_supervised("monitor", panics, shutdown, move || {
            this.clone().run_checks(token.clone())
        })
    }

    /// The loop of [`Health::spawn_monitor`].
    async fn run_checks(self, shutdown: CancellationToken) {
        if !self.settings.enabled {
            return;
        }
        let mut previous: HashMap<String, (u64, u64)> = HashMap::new();
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            self.check(&mut previous).await;
            self.checks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One check of every enabled, registered plugin.
    async fn check(&self, previous: &mut HashMap<String, (u64, u64)>) {
        self.sample().await;
        let table = self.registry.table();
        let stats = self.metrics.stats();
        let s = &self.settings;
        let now = now_ms();
        let watched: Vec<String> = table
            .plugins()
            .iter()
            .filter(|(_, p)| p.enabled_rank.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        let pings = futures::future::join_all(watched.iter().map(|id| async move {
            services(&self.client, "PING", id, s.ping_timeout)
                .await
                .map(|r| r.len())
        }))
        .await;
        let mut seen: Vec<(String, AlertKind)> = Vec::new();
        for (id, ping) in watched.iter().zip(pings) {
            let p = stats.plugins.get_or_create(id);
            let mut set = |kind: AlertKind, firing: Option<bool>, value: f64, threshold: f64| {
                seen.push((id.clone(), kind));
                if let Some(firing) = firing {
                    self.transition(id, kind, firing, value, threshold);
                }
            };
            // Replicas: those answering $SRV.PING, or alive by recent deliveries.
            let handlers = stats.handlers.of_plugin(id);
            match ping {
                Ok(n) => {
                    let n = i64::try_from(n).unwrap_or(i64::MAX);
                    p.replicas.store(n, Ordering::Relaxed);
                    if n > 0 {
                        p.answered_ping.store(true, Ordering::Relaxed);
                    }
                    let alive = n > 0
                        || (!p.answered_ping.load(Ordering::Relaxed)
                            && delivering(&handlers, now, s.alive_window));
                    set(AlertKind::NoReplica, Some(!alive), n as f64, 1.0);
                }
                Err(e) => {
                    tracing::debug!(plugin = %id, error = %e, "replica ping failed");
                    set(AlertKind::NoReplica, None, 0.0, 1.0);
                }
            }
            // Error rate over the interval.
            let errors: u64 = handlers
                .iter()
                .map(|h| h.errors.load(Ordering::Relaxed))
                .sum();
            let successes: u64 = handlers
                .iter()
                .map(|h| h.successes.load(Ordering::Relaxed))
                .sum();
            let (e0, s0) = previous
                .insert(id.clone(), (errors, successes))
                .unwrap_or((0, 0));
            let (de, ds) = (errors.saturating_sub(e0), successes.saturating_sub(s0));
            let attempts = de + ds;
            let rate = if attempts == 0 {
                0.0
            } else {
                de as f64 / attempts as f64
            };
            let firing = if attempts == 0 {
                None
            } else if attempts >= s.error_rate_min_attempts && rate >= s.error_rate {
                Some(true)
            } else if rate < s.error_rate {
                Some(false)
            } else {
                None
            };
            set(AlertKind::ErrorRate, firing, rate, s.error_rate);
            // Lag.
            let lag = handler_lag(self.metrics.sampled(), Some(&p));
            set(
                AlertKind::Lag,
                Some(lag >= s.lag_events),
                lag as f64,
                s.lag_events as f64,
            );
            // Degraded.
            let failing_since = failing_since_ms(&handlers);
            let last_error = handlers
                .iter()
                .map(|h| h.last_error_ms.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            let after = i64::try_from(s.degraded_after.as_millis()).unwrap_or(i64::MAX);
            let degraded =
                failing_since > 0 && now - failing_since >= after && now - last_error < after;
            p.degraded.store(degraded, Ordering::Relaxed);
            let failing_secs = if failing_since > 0 {
                (now - failing_since) as f64 / 1000.0
            } else {
                0.0
            };
            set(
                AlertKind::Degraded,
                Some(degraded),
                failing_secs,
                s.degraded_after.as_secs_f64(),
            );
        }
        // The outbox relay, when this bus runs one.
        if let Some(relay) = self.metrics.relay_stats() {
            let age_s = relay.backlog_oldest_ms.load(Ordering::Relaxed) as f64 / 1000.0;
            let threshold = s.relay_backlog_age.as_secs_f64();
            let behind = age_s >= threshold || !relay.is_healthy();
            seen.push((RELAY.to_owned(), AlertKind::Backlog));
            self.transition(RELAY, AlertKind::Backlog, behind, age_s, threshold);
        }
        // Plugins no longer watched (unregistered, not enabled): resolve their alerts.
        let stale: Vec<(String, AlertKind)> = self
            .firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for (id, kind) in stale {
            self.transition(&id, kind, false, 0.0, 0.0);
        }
    }

    /// Records the state of one alert; publishes and logs when it changed.
    fn transition(&self, plugin: &str, kind: AlertKind, firing: bool, value: f64, threshold: f64) {
        let key = (plugin.to_owned(), kind);
        let mut map = self
            .firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.contains_key(&key) == firing {
            return;
        }
        let message = alert_message(plugin, kind, firing, value, threshold);
        let event = AlertEvent {
            plugin: plugin.to_owned(),
            kind,
            state: if firing {
                AlertState::Firing
            } else {
                AlertState::Resolved
            },
            value,
            threshold,
            message: message.clone(),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        if firing {
            tracing::warn!(%plugin, kind = kind.as_str(), value, threshold, "alert firing: {message}");
            map.insert(key, event.clone());
        } else {
            tracing::info!(%plugin, kind = kind.as_str(), "alert resolved: {message}");
            map.remove(&key);
        }
        drop(map);
        let subject = format!(
            "{}.alerts.{plugin}.{}",
            self.subjects.prefix(),
            kind.as_str()
        );
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Ok(body) = serde_json::to_vec(&event)
                && let Err(e) = client.publish(subject, body.into()).await
            {
                tracing::warn!(error = %e, "could not publish an alert");
            }
        });
    }
}

/// The name alerts of the outbox relay carry in place of a plugin id.
pub const RELAY: &str = "_relay";

fn alert_message(
    plugin: &str,
    kind: AlertKind,
    firing: bool,
    value: f64,
    threshold: f64,
) -> String {
    match (kind, firing) {
        (AlertKind::NoReplica, true) => {
            format!(
                "plugin '{plugin}' has no replica answering $SRV.PING; its deliveries are deferred"
            )
        }
        (AlertKind::NoReplica, false) => format!("plugin '{plugin}' has a replica again"),
        (AlertKind::ErrorRate, true) => format!(
            "plugin '{plugin}': {:.0}% of attempts failed in the last interval (threshold {:.0}%)",
            value * 100.0,
            threshold * 100.0
        ),
        (AlertKind::ErrorRate, false) => {
            format!("plugin '{plugin}': error rate back under the threshold")
        }
        (AlertKind::Lag, true) => format!(
            "plugin '{plugin}': {value:.0} events still to dispatch (threshold {threshold:.0})"
        ),
        (AlertKind::Lag, false) => format!("plugin '{plugin}': lag back under the threshold"),
        (AlertKind::Degraded, true) => format!(
            "plugin '{plugin}' is degraded: failing without a success for {value:.0} s (threshold {threshold:.0} s)"
        ),
        (AlertKind::Degraded, false) => format!("plugin '{plugin}' is no longer degraded"),
        (AlertKind::Backlog, true) => format!(
            "outbox relay is behind: oldest unpublished row {value:.0} s old (threshold {threshold:.0} s), or publishing fails"
        ),
        (AlertKind::Backlog, false) => "outbox relay has caught up".to_owned(),
    }
}
