//! Configuration of the bus: one typed struct per part, with documented defaults.

use std::time::Duration;

use core_events::Subjects;

/// Limits and settings of the streams and bucket the bus provisions.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// How long events are kept (0 = forever). Replays can go back this far.
    pub events_max_age: Duration,
    /// Largest size of the events stream in bytes (-1 = unlimited); oldest events go first.
    pub events_max_bytes: i64,
    /// Window in which a second publish with the same `Nats-Msg-Id` is dropped. Must
    /// cover the outbox relay's restart time.
    pub duplicate_window: Duration,
    /// How long dead letters are kept.
    pub dlq_max_age: Duration,
    /// Stream replicas (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// Largest event payload accepted, in bytes (the stream's `max_msg_size`).
    pub max_event_bytes: i32,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            events_max_age: Duration::from_secs(30 * 24 * 3600),
            events_max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
            replicas: 1,
            max_event_bytes: 1024 * 1024,
        }
    }
}

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    /// Durable consumer name on the events stream.
    pub consumer: String,
    /// Events taken from the stream and not yet finished (the consumer's
    /// `max_ack_pending`): bounds memory and the redelivery burst after a crash.
    pub max_in_flight: usize,
    /// Objects dispatched in parallel. Events about one object always go one at a time.
    pub max_parallel_objects: usize,
    /// Time the server waits for an ack before redelivering. The dispatcher sends
    /// progress acks for events it still works on, so this only matters after a crash.
    pub ack_wait: Duration,
    /// How long shutdown waits for in-flight events before giving up on them (they
    /// are redelivered after a restart).
    pub shutdown_grace: Duration,
    /// How often a deferred delivery is retried while its plugin has no replica.
    pub deferred_poll: Duration,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        DispatcherSettings {
            consumer: "dispatcher".to_owned(),
            max_in_flight: 2048,
            max_parallel_objects: 256,
            ack_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            deferred_poll: Duration::from_millis(250),
        }
    }
}

/// Everything the bus daemon needs.
#[derive(Debug, Clone, Default)]
pub struct BusConfig {
    /// Subject prefix and derived names.
    pub subjects: Subjects,
    /// Plugins that are dispatched to, in tie-break order (Pagoda's `ENABLED_PLUGINS`).
    pub enabled_plugins: Vec<String>,
    /// Streams and bucket.
    pub streams: StreamSettings,
    /// Dispatcher.
    pub dispatcher: DispatcherSettings,
}

/// Splits Pagoda's comma-separated `ENABLED_PLUGINS` value, dropping blanks.
pub fn parse_enabled_plugins(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_plugins_keep_order() {
        assert_eq!(
            parse_enabled_plugins(" a, b ,,c"),
            vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]
        );
        assert!(parse_enabled_plugins("").is_empty());
    }
}
