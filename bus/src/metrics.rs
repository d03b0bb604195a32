//! The Prometheus export of the bus's counters, and values sampled from NATS.
//!
//! There is one source of truth for what the dispatcher counts: the atomics of
//! [`crate::stats`] ([`DispatchStats`], per handler a [`HandlerStats`]: deliveries,
//! successes, errors, retries, dead letters, a latency histogram, last success and
//! last error; per plugin a [`PluginStats`]: deferred deliveries, replicas,
//! degraded). The same
//! values answer `<prefix>.bus.stats`, feed `/metrics` (through a
//! [`prometheus_client`] collector that reads the atomics at scrape time) and the
//! health and alert checks ([`crate::monitor`]).
//!
//! Recording costs a read-locked map lookup and a few relaxed atomic adds per
//! delivery; it is switched off with
//! [`DispatcherSettings::metrics`](crate::config::DispatcherSettings::metrics).
//!
//! # Adding gauges from another part of the bus
//!
//! [`Metrics::with_registry`] gives the Prometheus registry to register more
//! metrics; [`Metrics::relay`] returns the [`RelayGauges`] of the outbox relay, which
//! the relay updates (they are exported from the first call on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::stats::{DispatchStats, HandlerStats, PluginStats, RelayStats};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Values read from NATS at scrape time (and by the monitor): where the dispatcher
/// stands against the stream head.
#[derive(Debug, Default)]
pub struct Sampled {
    /// The events stream's last sequence.
    pub stream_last_seq: AtomicU64,
    /// Events of the stream the dispatcher consumer has not taken yet (`num_pending`).
    pub pending: AtomicU64,
    /// Events the dispatcher holds and has not acked yet (`num_ack_pending`).
    pub ack_pending: AtomicU64,
}

impl Sampled {
    /// Events not yet fully dispatched: pending plus in hand.
    pub fn backlog(&self) -> u64 {
        self.pending
            .load(Ordering::Relaxed)
            .saturating_add(self.ack_pending.load(Ordering::Relaxed))
    }
}

/// Gauges the outbox relay updates; exported (as `hookbus_relay_*`) from the first
/// [`Metrics::relay`] call on.
#[derive(Debug, Clone, Default)]
pub struct RelayGauges {
    /// `hookbus_relay_backlog_rows`: outbox rows not yet published.
    pub backlog_rows: Gauge,
    /// `hookbus_relay_oldest_row_age_seconds`: age of the oldest unpublished row
    /// (0 when the outbox is empty).
    pub oldest_row_age_seconds: Gauge<f64, AtomicU64>,
    /// `hookbus_relay_parked_rows`: rows the relay can neither publish nor
    /// dead-letter, kept in the outbox for a later try.
    pub parked_rows: Gauge,
}

impl RelayGauges {
    /// Registers the gauges in `registry` (the bus's, or the reference host's
    /// when it relays in-process).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hookbus_relay_backlog_rows",
            "Outbox rows not yet published by the relay",
            self.backlog_rows.clone(),
        );
        registry.register(
            "hookbus_relay_oldest_row_age_seconds",
            "Age of the oldest unpublished outbox row in seconds",
            self.oldest_row_age_seconds.clone(),
        );
        registry.register(
            "hookbus_relay_parked_rows",
            "Outbox rows the relay can neither publish nor dead-letter, kept for a later try",
            self.parked_rows.clone(),
        );
    }
}

/// The bus's metrics: the dispatcher's stats, values sampled from NATS, and a
/// Prometheus registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    stats: Arc<DispatchStats>,
    sampled: Arc<Sampled>,
    registry: Mutex<Registry>,
    relay: OnceLock<RelayGauges>,
    relay_stats: OnceLock<Arc<RelayStats>>,
}

impl Metrics {
    /// Metrics over `stats`.
    pub fn new(stats: Arc<DispatchStats>) -> Metrics {
        let sampled = Arc::new(Sampled::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector {
            stats: stats.clone(),
            sampled: sampled.clone(),
        }));
        Metrics {
            stats,
            sampled,
            registry: Mutex::new(registry),
            relay: OnceLock::new(),
            relay_stats: OnceLock::new(),
        }
    }

    /// The dispatcher's counters.
    pub fn stats(&self) -> &Arc<DispatchStats> {
        &self.stats
    }

    /// Values sampled from NATS (see [`Metrics::sample`]).
    pub fn sampled(&self) -> &Sampled {
        &self.sampled
    }

    /// Lets another part of the bus register metrics of its own.
    pub fn with_registry<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Attaches the counters of the relay this bus runs (once).
    pub fn set_relay_stats(&self, stats: Arc<RelayStats>) {
        let _ = self.relay_stats.set(stats);
    }

    /// The counters of the relay this bus runs, if it runs one.
    pub fn relay_stats(&self) -> Option<&Arc<RelayStats>> {
        self.relay_stats.get()
    }

    /// The relay's gauges, registered on first call.
    pub fn relay(&self) -> &RelayGauges {
        self.relay.get_or_init(|| {
            let gauges = RelayGauges::default();
            self.with_registry(|r| gauges.register(r));
            gauges
        })
    }

    /// Reads the dispatcher consumers (one per partition) and the events stream
    /// head from NATS: pending is the most any of them has not taken yet, ack
    /// pending their sum.
    ///
    /// # Errors
    ///
    /// When a consumer or the stream cannot be read.
    pub async fn sample(
        &self,
        js: &async_nats::jetstream::Context,
        subjects: &core_events::Subjects,
        consumers: &[String],
    ) -> Result<(), async_nats::Error> {
        let mut stream = js.get_stream(subjects.events_stream()).await?;
        let last = stream.info().await?.state.last_sequence;
        self.sampled.stream_last_seq.store(last, Ordering::Relaxed);
        let (mut pending, mut ack_pending) = (0, 0);
        for consumer in consumers {
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(consumer).await?;
            let info = c.info().await?;
            pending = info.num_pending.max(pending);
            ack_pending += u64::try_from(info.num_ack_pending).unwrap_or(0);
        }
        self.sampled.pending.store(pending, Ordering::Relaxed);
        self.sampled
            .ack_pending
            .store(ack_pending, Ordering::Relaxed);
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// True when `handlers` (one plugin's) show it alive without `$SRV.PING`: a
/// successful delivery at most `window` before `now_ms`, and no attempt that found
/// no replica since.
pub fn delivering(handlers: &[Arc<HandlerStats>], now_ms: i64, window: Duration) -> bool {
    let max = |f: fn(&HandlerStats) -> i64| handlers.iter().map(|h| f(h)).max().unwrap_or(0);
    let success = max(|h| h.last_success_ms.load(Ordering::Relaxed));
    let absent = max(|h| h.last_absent_ms.load(Ordering::Relaxed));
    let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    success > 0 && success > absent && now_ms.saturating_sub(success) <= window
}

/// Lag of a handler: events the bus has not finished plus its plugin's deferred
/// deliveries.
pub fn handler_lag(sampled: &Sampled, plugin: Option<&PluginStats>) -> u64 {
    sampled
        .backlog()
        .saturating_add(plugin.map_or(0, PluginStats::deferred))
}

/// Exports [`DispatchStats`] at scrape time.
#[derive(Debug)]
struct StatsCollector {
    stats: Arc<DispatchStats>,
    sampled: Arc<Sampled>,
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

type HandlerValue = fn(&HandlerStats) -> u64;

/// Per-handler counters: name, help, value.
const HANDLER_COUNTERS: [(&str, &str, HandlerValue); 6] = [
    (
        "hookbus_handler_deliveries",
        "Deliveries started per handler (retries not counted)",
        |h| h.deliveries.load(Ordering::Relaxed),
    ),
    (
        "hookbus_handler_successes",
        "Deliveries that succeeded per handler",
        |h| h.successes.load(Ordering::Relaxed),
    ),
    (
        "hookbus_handler_errors",
        "Failed attempts per handler (every failed retry counts)",
        |h| h.errors.load(Ordering::Relaxed),
    ),
    (
        "hookbus_handler_retries",
        "Attempts after the first per handler",
        |h| h.retries.load(Ordering::Relaxed),
    ),
    (
        "hookbus_handler_dead_letters",
        "Deliveries dead-lettered per handler",
        |h| h.dead_letters.load(Ordering::Relaxed),
    ),
    (
        "hookbus_handler_deferred",
        "Deliveries deferred per handler because the plugin had no replica",
        |h| h.deferred.load(Ordering::Relaxed),
    ),
];

impl prometheus_client::collector::Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        counter(
            &mut enc,
            "hookbus_events_acked",
            "Events fully dispatched and acked",
            s.events_acked.get(),
        )?;
        counter(
            &mut enc,
            "hookbus_deliveries_succeeded",
            "Successful handler deliveries, all handlers",
            s.delivered.get(),
        )?;
        counter(
            &mut enc,
            "hookbus_attempts_failed",
            "Failed handler attempts, all handlers",
            s.failed_attempts.get(),
        )?;
        counter(
            &mut enc,
            "hookbus_dead_letters",
            "Deliveries dead-lettered, all handlers",
            s.dead_lettered.get(),
        )?;
        counter(
            &mut enc,
            "hookbus_deferrals",
            "Deliveries deferred because their plugin had no replica, all plugins",
            s.deferred.get(),
        )?;
        counter(
            &mut enc,
            "hookbus_malformed_events",
            "Events that could not be read (moved to <prefix>.dlq._bus.malformed)",
            s.malformed.get(),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "hookbus_task_panics",
                "Panics of the bus's long-lived tasks, by task (each was logged, and the task started again or the bus stopped)",
                None,
                MetricType::Counter,
            )?;
            for (task, n) in s.task_panics.all() {
                m.encode_family(&[("task", task)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        gauge(
            &mut enc,
            "hookbus_dispatcher_running",
            "1 while the dispatcher runs",
            i64::from(s.is_running()),
        )?;
        let sampled = &self.sampled;
        let as_i64 = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        gauge(
            &mut enc,
            "hookbus_stream_last_seq",
            "Last sequence of the events stream",
            as_i64(&sampled.stream_last_seq),
        )?;
        gauge(
            &mut enc,
            "hookbus_dispatcher_pending_events",
            "Events the dispatcher consumer has not taken yet (num_pending)",
            as_i64(&sampled.pending),
        )?;
        gauge(
            &mut enc,
            "hookbus_dispatcher_ack_pending_events",
            "Events the dispatcher holds and has not acked yet (num_ack_pending)",
            as_i64(&sampled.ack_pending),
        )?;

        let handlers = s.handlers.all();
        for (name, help, value) in HANDLER_COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for h in &handlers {
                let labels = [("plugin", &*h.plugin), ("handler", &*h.handler)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&value(h), None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "hookbus_handler_latency_seconds",
                "Time from request to reply of handler attempts",
                None,
                MetricType::Histogram,
            )?;
            for h in &handlers {
                let labels = [("plugin", &*h.plugin), ("handler", &*h.handler)];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    h.latency.sum_seconds(),
                    h.latency.count(),
                    &h.latency.buckets(),
                    None,
                )?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "hookbus_handler_last_success_timestamp_seconds",
                "Unix time of the handler's last success (0 = none)",
                None,
                MetricType::Gauge,
            )?;
            for h in &handlers {
                let labels = [("plugin", &*h.plugin), ("handler", &*h.handler)];
                m.encode_family(&labels)?
                    .encode_gauge(&(h.last_success_ms.load(Ordering::Relaxed) / 1000))?;
            }
        }
        let plugins = s.plugins.all();
        {
            let mut m = enc.encode_descriptor(
                "hookbus_handler_lag_events",
                "Events the handler may still have to see: events the dispatcher has not finished plus its plugin's deferred deliveries",
                None,
                MetricType::Gauge,
            )?;
            for h in &handlers {
                let p = s.plugins.get(&h.plugin);
                let labels = [("plugin", &*h.plugin), ("handler", &*h.handler)];
                let lag = handler_lag(sampled, p.as_deref());
                m.encode_family(&labels)?
                    .encode_gauge(&i64::try_from(lag).unwrap_or(i64::MAX))?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "hookbus_plugin_deferred_deliveries",
                "Deliveries waiting in the deferred stream for a plugin with no replica",
                None,
                MetricType::Gauge,
            )?;
            for (id, p) in &plugins {
                m.encode_family(&[("plugin", id.as_str())])?
                    .encode_gauge(&i64::try_from(p.deferred()).unwrap_or(i64::MAX))?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "hookbus_plugin_replicas",
                "Replicas that answered the monitor's last $SRV.PING (-1 = not checked yet)",
                None,
                MetricType::Gauge,
            )?;
            for (id, p) in &plugins {
                m.encode_family(&[("plugin", id.as_str())])?
                    .encode_gauge(&p.replicas.load(Ordering::Relaxed))?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "hookbus_plugin_degraded",
                "1 while the plugin is degraded (failing continuously)",
                None,
                MetricType::Gauge,
            )?;
            for (id, p) in &plugins {
                m.encode_family(&[("plugin", id.as_str())])?
                    .encode_gauge(&i64::from(p.degraded.load(Ordering::Relaxed)))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::DeferredGauge;

    #[test]
    fn histogram_buckets_and_encoding() {
        let stats = Arc::new(DispatchStats::default());
        let p: Arc<str> = "p".into();
        let h: Arc<str> = "h".into();
        let subject: Arc<str> = "pagoda.hooks.p.h".into();
        let hs = stats.handlers.get_or_create(&subject, &p, &h);
        hs.deliveries.fetch_add(1, Ordering::Relaxed);
        hs.success(Duration::from_micros(700), 3);
        hs.failure(Some(Duration::from_secs(20)), "boom");
        let metrics = Metrics::new(stats);
        metrics.relay().backlog_rows.set(7);
        let text = metrics.encode();
        assert!(
            text.contains(r#"hookbus_handler_deliveries_total{plugin="p",handler="h"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"hookbus_handler_latency_seconds_bucket{le="0.001",plugin="p",handler="h"} 1"#
            ) || text.contains(
                r#"hookbus_handler_latency_seconds_bucket{plugin="p",handler="h",le="0.001"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("hookbus_relay_backlog_rows 7"), "{text}");
        assert_eq!(hs.last_error(), "boom");
        assert_ne!(hs.failing_since_ms.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn task_panics_are_exported() {
        let stats = Arc::new(DispatchStats::default());
        stats.task_panics.record("monitor");
        stats.task_panics.record("monitor");
        let text = Metrics::new(stats).encode();
        assert!(
            text.contains(r#"hookbus_task_panics_total{task="monitor"} 2"#),
            "{text}"
        );
    }

    /// The deferral gauge is raised before the append: a drainer that finishes the
    /// delivery before the append returns lowers it from 1, not from 0.
    #[tokio::test]
    async fn deferred_gauge_counts_before_the_append_and_never_wraps() {
        let gauge = DeferredGauge::default();
        let appended: Result<(), ()> = gauge
            .counted(async {
                assert_eq!(gauge.get(), 1, "counted before the append");
                // The drainer takes the delivery and finishes it at once.
                gauge.done();
                Ok(())
            })
            .await;
        assert_eq!(appended, Ok(()));
        assert_eq!(gauge.get(), 0);
        // A failed append takes its count back.
        let failed: Result<(), &str> = gauge.counted(async { Err("stopped") }).await;
        assert_eq!(failed, Err("stopped"));
        assert_eq!(gauge.get(), 0);
        // Whatever the order, never below 0 nor past the top.
        gauge.done();
        assert_eq!(gauge.get(), 0);
        gauge.add(u64::MAX);
        gauge.add(5);
        assert_eq!(gauge.get(), u64::MAX);
    }

    /// The monitor's lag sums the sampled backlog and the deferred gauges of every
    /// dispatcher without overflowing (it panicked with `attempt to add with overflow`).
    #[test]
    fn handler_lag_saturates() {
        let stats = DispatchStats::default();
        let a = Arc::new(DeferredGauge::default());
        let b = Arc::new(DeferredGauge::default());
        stats.plugins.track_deferred("p", &a);
        stats.plugins.track_deferred("p", &b);
        a.add(3);
        b.add(4);
        let p = stats.plugins.get("p").unwrap();
        assert_eq!(p.deferred(), 7);
        let sampled = Sampled::default();
        sampled.pending.store(10, Ordering::Relaxed);
        assert_eq!(handler_lag(&sampled, Some(&p)), 17);
        // A stopped dispatcher's gauge no longer counts.
        drop(b);
        assert_eq!(p.deferred(), 3);
        a.add(u64::MAX);
        sampled.ack_pending.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(handler_lag(&sampled, Some(&p)), u64::MAX);
        assert_eq!(sampled.backlog(), u64::MAX);
    }
}
