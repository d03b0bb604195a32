//! The reference host's metrics, served on its `/metrics` (Prometheus text
//! format, as the bus's; the histograms use the bus's [`LATENCY_BUCKETS`]): its
//! HTTP requests and connections, the calls it makes to plugins (synchronous
//! hooks through [`crate::sync_hooks::SyncHooks`], plugin API routes), the sizes
//! of its entry write batches and, when it relays in-process, the relay's
//! backlog ([`RelayGauges`], the same series as the bus's).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `hookbus_host_http_requests_total` | method, route, status | HTTP requests by route template (`/api/v2/entries/{id}/`; `unmatched` for paths no route matches) and status |
//! | `hookbus_host_http_request_duration_seconds` | method, route | time to the response head (histogram) |
//! | `hookbus_host_http_connections` | | open HTTP connections |
//! | `hookbus_host_http_connection_limit` | | the connection limit in force |
//! | `hookbus_host_http_timeouts_total` | kind | connections cut waiting for a request header (`header`), requests answered 408 waiting for their body (`body`) |
//! | `hookbus_sync_hook_calls_total` | hook, plugin, handler, outcome | calls by outcome: `ok`, `no_responders`, `timeout`, `handler_error`, `bad_reply`, `request_failed` |
//! | `hookbus_sync_hook_duration_seconds` | hook, plugin, handler | call latency (histogram) |
//! | `hookbus_plugin_api_requests_total` | plugin, route, status | plugin API route requests by HTTP status |
//! | `hookbus_plugin_api_duration_seconds` | plugin, route | route latency (histogram) |
//! | `hookbus_host_entry_batch_size` | | entry creations per write transaction (histogram) |
//! | `hookbus_relay_backlog_rows`, `hookbus_relay_oldest_row_age_seconds` | | the in-process relay's backlog (absent with `--no-relay`) |

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::RelayGauges;
use crate::stats::LATENCY_BUCKETS;

/// Upper bounds of the entry batch size histogram buckets (a last `+Inf` follows;
/// batches hold at most `hookbus_host::writer::MAX_BATCH`).
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

type Labels = Vec<(&'static str, String)>;

fn histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The methods HTTP requests are counted under (any other: `OTHER`).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

/// The host's metrics (see the module docs). Cheap to record; share it in an `Arc`.
#[derive(Debug)]
pub struct CallMetrics {
    sync_calls: Family<Labels, Counter>,
    sync_latency: Family<Labels, Histogram, fn() -> Histogram>,
    api_requests: Family<Labels, Counter>,
    api_latency: Family<Labels, Histogram, fn() -> Histogram>,
    http_requests: Family<Labels, Counter>,
    http_latency: Family<Labels, Histogram, fn() -> Histogram>,
    http_timeouts: Family<Labels, Counter>,
    /// Open HTTP connections.
    pub connections: Gauge,
    /// The connection limit in force.
    pub connection_limit: Gauge,
    batch_sizes: Histogram,
    relay: Option<RelayGauges>,
    registry: Registry,
}

impl Default for CallMetrics {
    fn default() -> Self {
        CallMetrics::new()
    }
}

impl CallMetrics {
    /// Empty metrics, registered in their own Prometheus registry.
    pub fn new() -> Self {
        let sync_calls = Family::<Labels, Counter>::default();
        let sync_latency: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram);
        let api_requests = Family::<Labels, Counter>::default();
        let api_latency: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram);
        let mut registry = Registry::default();
        registry.register(
            "hookbus_sync_hook_calls",
            "Synchronous hook calls by hook, plugin, handler and outcome",
            sync_calls.clone(),
        );
        registry.register(
            "hookbus_sync_hook_duration_seconds",
            "Synchronous hook call latency by hook, plugin and handler",
            sync_latency.clone(),
        );
        registry.register(
            "hookbus_plugin_api_requests",
            "Plugin API route requests by plugin, route and HTTP status",
            api_requests.clone(),
        );
        registry.register(
            "hookbus_plugin_api_duration_seconds",
            "Plugin API route latency by plugin and route",
            api_latency.clone(),
        );
        let http_requests = Family::<Labels, Counter>::default();
        let http_latency: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram);
        let http_timeouts = Family::<Labels, Counter>::default();
        let connections = Gauge::default();
        let connection_limit = Gauge::default();
        let batch_sizes = Histogram::new(BATCH_BUCKETS);
        registry.register(
            "hookbus_host_http_requests",
            "HTTP requests by method, route template and status",
            http_requests.clone(),
        );
        registry.register(
            "hookbus_host_http_request_duration_seconds",
            "Time from a request to its response head by method and route template",
            http_latency.clone(),
        );
        registry.register(
            "hookbus_host_http_connections",
            "Open HTTP connections",
            connections.clone(),
        );
        registry.register(
            "hookbus_host_http_connection_limit",
            "Most HTTP connections served at once; more wait to be accepted",
            connection_limit.clone(),
        );
        registry.register(
            "hookbus_host_http_timeouts",
            "Connections cut waiting for a request header (kind=header) and requests answered 408 waiting for their body (kind=body)",
            http_timeouts.clone(),
        );
        registry.register(
            "hookbus_host_entry_batch_size",
            "Entry creations written per transaction",
            batch_sizes.clone(),
        );
        CallMetrics {
            sync_calls,
            sync_latency,
            api_requests,
            api_latency,
            http_requests,
            http_latency,
            http_timeouts,
            connections,
            connection_limit,
            batch_sizes,
            relay: None,
            registry,
        }
    }

    /// The gauges of a relay run in-process, registered here on first call
    /// (before [`CallMetrics`] is shared).
    pub fn relay_gauges(&mut self) -> RelayGauges {
        let registry = &mut self.registry;
        self.relay
            .get_or_insert_with(|| {
                let gauges = RelayGauges::default();
                gauges.register(registry);
                gauges
            })
            .clone()
    }

    /// Records one HTTP request: `route` is the matched route template (`None`:
    /// no route matched).
    pub fn http_request(&self, method: &str, route: Option<&str>, status: u16, elapsed: Duration) {
        let method = METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("OTHER");
        let base: Labels = vec![
            ("method", method.to_owned()),
            ("route", route.unwrap_or("unmatched").to_owned()),
        ];
        self.http_latency
            .get_or_create(&base)
            .observe(elapsed.as_secs_f64());
        let mut with_status = base;
        with_status.push(("status", status.to_string()));
        self.http_requests.get_or_create(&with_status).inc();
    }

    /// Counts a connection cut waiting for a header (`header`) or a request
    /// answered 408 waiting for its body (`body`).
    pub fn http_timeout(&self, kind: &str) {
        self.http_timeouts
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    /// Records the size of one entry write batch.
    pub fn entry_batch(&self, size: usize) {
        self.batch_sizes.observe(size as f64);
    }

    /// Records one synchronous hook call.
    pub fn sync_call(
        &self,
        hook: &str,
        plugin: &str,
        handler: &str,
        outcome: &str,
        elapsed: Duration,
    ) {
        let base: Labels = vec![
            ("hook", hook.to_owned()),
            ("plugin", plugin.to_owned()),
            ("handler", handler.to_owned()),
        ];
        self.sync_latency
            .get_or_create(&base)
            .observe(elapsed.as_secs_f64());
        let mut with_outcome = base;
        with_outcome.push(("outcome", outcome.to_owned()));
        self.sync_calls.get_or_create(&with_outcome).inc();
    }

    /// Records one plugin API route request answered with `status`.
    pub fn api_call(&self, plugin: &str, route: &str, status: u16, elapsed: Duration) {
        let base: Labels = vec![("plugin", plugin.to_owned()), ("route", route.to_owned())];
        self.api_latency
            .get_or_create(&base)
            .observe(elapsed.as_secs_f64());
        let mut with_status = base;
        with_status.push(("status", status.to_string()));
        self.api_requests.get_or_create(&with_status).inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_outcome_and_status() {
        let m = CallMetrics::new();
        m.sync_call("entry.validate", "p", "v", "ok", Duration::from_millis(1));
        m.sync_call(
            "entry.validate",
            "p",
            "v",
            "timeout",
            Duration::from_millis(5),
        );
        m.api_call("p", "greet", 200, Duration::from_millis(2));
        let text = m.encode();
        assert!(
            text.contains(
                r#"hookbus_sync_hook_calls_total{hook="entry.validate",plugin="p",handler="v",outcome="timeout"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"hookbus_sync_hook_duration_seconds_count{hook="entry.validate",plugin="p",handler="v"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"hookbus_plugin_api_requests_total{plugin="p",route="greet",status="200"} 1"#
            ),
            "{text}"
        );
    }
}
