//! Metrics of the calls a host makes to plugins: synchronous hooks
//! ([`crate::sync_hooks::SyncHooks`]) and plugin API routes. The host serves
//! them on its `/metrics` (Prometheus text format).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `hookbus_sync_hook_calls_total` | hook, plugin, handler, outcome | calls by outcome: `ok`, `no_responders`, `timeout`, `handler_error`, `bad_reply`, `request_failed` |
//! | `hookbus_sync_hook_duration_seconds` | hook, plugin, handler | call latency (histogram) |
//! | `hookbus_plugin_api_requests_total` | plugin, route, status | plugin API route requests by HTTP status |
//! | `hookbus_plugin_api_duration_seconds` | plugin, route | route latency (histogram) |

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::LATENCY_BUCKETS;

type Labels = Vec<(&'static str, String)>;

fn histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Counters and latency histograms of sync-hook calls and plugin API routes.
#[derive(Debug)]
pub struct CallMetrics {
    sync_calls: Family<Labels, Counter>,
    sync_latency: Family<Labels, Histogram, fn() -> Histogram>,
    api_requests: Family<Labels, Counter>,
    api_latency: Family<Labels, Histogram, fn() -> Histogram>,
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
        CallMetrics {
            sync_calls,
            sync_latency,
            api_requests,
            api_latency,
            registry,
        }
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
