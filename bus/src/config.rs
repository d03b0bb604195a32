//! Configuration of the bus: one typed struct per part, with documented defaults.
//!
//! The defaults are written once, in [`defaults`]: the `Default` impls here parse
//! them, the `hookbus` command line shows them (`default_value = defaults::…`), and
//! a test of the command line checks that the table of docs/operations.md lists the
//! same.

use std::time::Duration;

use core_events::Subjects;

/// Every default of the bus's settings, as an operator writes it (`30d`, `5s`,
/// `unlimited`): the one source for [`BusConfig::default`], the command line's
/// defaults and the docs.
pub mod defaults {
    /// `--nats-url` / `NATS_URL`.
    pub const NATS_URL: &str = "nats://127.0.0.1:4222";
    /// `--prefix` / `PAGODA_SUBJECT_PREFIX`.
    pub const PREFIX: &str = "pagoda";
    /// `--ack-wait-secs`: [`DispatcherSettings::ack_wait`](super::DispatcherSettings::ack_wait), in seconds.
    pub const ACK_WAIT_SECS: u64 = 30;
    /// `--max-parallel-objects`: [`DispatcherSettings::max_parallel_objects`](super::DispatcherSettings::max_parallel_objects).
    pub const MAX_PARALLEL_OBJECTS: usize = 256;
    /// `--lease-ttl`: [`StreamSettings::lease_ttl`](super::StreamSettings::lease_ttl).
    pub const LEASE_TTL: &str = "5s";
    /// `--partitions`: [`DispatcherSettings::partitions`](super::DispatcherSettings::partitions).
    pub const PARTITIONS: u32 = 1;
    /// `--http-addr` of `hookbus run` (a library [`BusConfig`](super::BusConfig) serves nothing unless told).
    pub const HTTP_ADDR: &str = "127.0.0.1:9464";
    /// `--metrics`: [`DispatcherSettings::metrics`](super::DispatcherSettings::metrics).
    pub const METRICS: bool = true;
    /// `--degraded-after`: [`MonitorSettings::degraded_after`](super::MonitorSettings::degraded_after).
    pub const DEGRADED_AFTER: &str = "1h";
    /// `--alert-interval`: [`MonitorSettings::interval`](super::MonitorSettings::interval).
    pub const ALERT_INTERVAL: &str = "10s";
    /// `--alert-error-rate`: [`MonitorSettings::error_rate`](super::MonitorSettings::error_rate).
    pub const ALERT_ERROR_RATE: f64 = 0.5;
    /// `--alert-lag`: [`MonitorSettings::lag_events`](super::MonitorSettings::lag_events).
    pub const ALERT_LAG: u64 = 10_000;
    /// `--alert-backlog-age`: [`MonitorSettings::relay_backlog_age`](super::MonitorSettings::relay_backlog_age).
    pub const ALERT_BACKLOG_AGE: &str = "60s";
    /// `--alive-window`: [`MonitorSettings::alive_window`](super::MonitorSettings::alive_window).
    pub const ALIVE_WINDOW: &str = "1h";
    /// `--events-max-age`: [`StreamSettings::events_max_age`](super::StreamSettings::events_max_age).
    pub const EVENTS_MAX_AGE: &str = "30d";
    /// `--events-max-bytes`: [`StreamSettings::events_max_bytes`](super::StreamSettings::events_max_bytes).
    pub const EVENTS_MAX_BYTES: &str = "unlimited";
    /// `--stream-replicas`: [`StreamSettings::replicas`](super::StreamSettings::replicas).
    pub const STREAM_REPLICAS: usize = 1;
}

/// A default of [`defaults`] as a duration (they are checked by a unit test).
fn default_duration(value: &str) -> Duration {
    parse_duration(value).unwrap_or_else(|e| panic!("the default {value:?} is not a duration: {e}"))
}

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
    /// How long audit events (admin actions) are kept.
    pub audit_max_age: Duration,
    /// Lease time of the dispatcher lease (the leases bucket's `max_age`): a
    /// standby `hookbus run` takes over this long after the active one died.
    pub lease_ttl: Duration,
    /// Stream replicas (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// Largest event payload accepted, in bytes (the stream's `max_msg_size`).
    pub max_event_bytes: i32,
    /// Partitions of the events stream (`N` of its `{{partition(N,1,4)}}` subject
    /// transform), fixed when the stream is created. `None` (the host, the relay,
    /// tools): an existing stream is taken as it is and a new one gets 1. `Some(n)`
    /// (the bus: its [`DispatcherSettings::partitions`]): a new stream gets `n`,
    /// and an existing one with another number is an error, since changing it is a
    /// migration (docs/deploy.md).
    pub partitions: Option<u32>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            events_max_age: default_duration(defaults::EVENTS_MAX_AGE),
            events_max_bytes: parse_byte_limit(defaults::EVENTS_MAX_BYTES)
                .unwrap_or_else(|e| panic!("the default events_max_bytes: {e}")),
            duplicate_window: Duration::from_secs(120),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
            audit_max_age: Duration::from_secs(365 * 24 * 3600),
            lease_ttl: default_duration(defaults::LEASE_TTL),
            replicas: defaults::STREAM_REPLICAS,
            max_event_bytes: 1024 * 1024,
            partitions: None,
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
    /// Record per-handler stats (deliveries, errors, latency, last success/error)
    /// for `/metrics`, `<prefix>.bus.stats`, health and alerts. The bus-wide totals
    /// are always counted. Default on.
    pub metrics: bool,
    /// Dispatch only while holding the lease `dispatcher` ([`crate::lease`]), so
    /// that of several buses exactly one dispatches and the others stand by.
    /// Default on.
    pub lease: bool,
    /// Partitions of the events (by object, [`core_events::object_partition`],
    /// computed by nats-server into the last token of the stored subject), each
    /// dispatched by one bus at a time from a consumer filtered on its partition:
    /// several buses share the partitions, each taking its fair share of their
    /// leases, and take over a dead one's. It must equal the events stream's
    /// partition count (set when the bus creates the stream; changing it is a
    /// migration, docs/deploy.md). 1 (the default): one bus dispatches everything
    /// and the others stand by. Needs [`DispatcherSettings::lease`].
    pub partitions: u32,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        DispatcherSettings {
            consumer: "dispatcher".to_owned(),
            max_in_flight: 2048,
            max_parallel_objects: defaults::MAX_PARALLEL_OBJECTS,
            ack_wait: Duration::from_secs(defaults::ACK_WAIT_SECS),
            shutdown_grace: Duration::from_secs(10),
            deferred_poll: Duration::from_millis(250),
            metrics: defaults::METRICS,
            lease: true,
            partitions: defaults::PARTITIONS,
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
    /// Where the bus serves `/healthz` and `/metrics` (`None`: not served). Port 0
    /// picks a free port ([`crate::run::Bus::http_addr`] tells which).
    pub http_addr: Option<std::net::SocketAddr>,
    /// Health checks, degraded plugins and alerts.
    pub monitor: MonitorSettings,
    /// The host's database (`sqlite://…`, `postgres://…`): when set, the bus
    /// migrates it and runs the outbox relay ([`crate::relay`]).
    pub database_url: Option<String>,
}

/// Settings of the monitor: the periodic health check that marks plugins degraded
/// and publishes alerts on `<prefix>.alerts.<plugin>.<kind>`.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// Run the monitor at all.
    pub enabled: bool,
    /// Time between checks.
    pub interval: Duration,
    /// How long a check waits for `$SRV.PING.<plugin>` answers.
    pub ping_timeout: Duration,
    /// Fire `error_rate` when failed attempts / attempts over one interval reach this
    /// (0.0–1.0) …
    pub error_rate: f64,
    /// … and the interval had at least this many attempts.
    pub error_rate_min_attempts: u64,
    /// Fire `lag` when a plugin's lag (events the bus has not finished plus its
    /// deferred deliveries) reaches this.
    pub lag_events: u64,
    /// A plugin whose handlers have failed without a success for this long (and
    /// still fail) is degraded.
    pub degraded_after: Duration,
    /// Fire `backlog` (plugin `_relay`) when the oldest unpublished outbox row is
    /// this old, or the relay cannot publish.
    pub relay_backlog_age: Duration,
    /// A plugin that answers no `$SRV.PING` (a plain queue subscriber, not a
    /// Services API service: none of its replicas answered since the bus started)
    /// counts as alive while its last successful delivery is at most this old and
    /// no delivery found it absent ("no responders") since. Needs
    /// [`DispatcherSettings::metrics`].
    pub alive_window: Duration,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        MonitorSettings {
            enabled: true,
            interval: default_duration(defaults::ALERT_INTERVAL),
            ping_timeout: Duration::from_millis(500),
            error_rate: defaults::ALERT_ERROR_RATE,
            error_rate_min_attempts: 5,
            lag_events: defaults::ALERT_LAG,
            degraded_after: default_duration(defaults::DEGRADED_AFTER),
            relay_backlog_age: default_duration(defaults::ALERT_BACKLOG_AGE),
            alive_window: default_duration(defaults::ALIVE_WINDOW),
        }
    }
}

/// A setting's value that cannot be read; the message names the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Not a number followed by a unit.
    #[error("'{0}' is not a duration; use e.g. 90s, 15m, 1h, 500ms")]
    NotDuration(String),
    /// A unit other than `ms`, `s`, `m`, `h` and `d`.
    #[error("unknown unit '{unit}' in '{value}'; use ms, s, m, h or d")]
    DurationUnit {
        /// The value given.
        value: String,
        /// Its unit.
        unit: String,
    },
    /// A duration that does not fit.
    #[error("'{value}': {reason}")]
    DurationRange {
        /// The value given.
        value: String,
        /// Why it does not fit.
        reason: String,
    },
    /// Not a size.
    #[error(
        "'{0}' is not a size; use a number of bytes, a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 500MB, 10GiB), or 'unlimited'"
    )]
    NotSize(String),
    /// A size below 1 byte or too large.
    #[error("'{0}' is out of range; use at least 1 byte, or 'unlimited'")]
    SizeRange(String),
    /// A duration of 0 where only a positive one makes sense.
    #[error("'{0}' must be more than 0")]
    NotPositive(String),
    /// Not an RFC 3339 time.
    #[error("'{value}' is not an RFC 3339 time ({reason}); use e.g. 2026-11-24T16:00:00Z")]
    NotTime {
        /// The value given.
        value: String,
        /// What the parser found wrong.
        reason: String,
    },
}

/// Parses a positive duration: [`parse_duration`], refusing 0.
///
/// # Errors
///
/// As [`parse_duration`], and [`ValueError::NotPositive`] for 0.
pub fn parse_positive_duration(value: &str) -> Result<Duration, ValueError> {
    match parse_duration(value)? {
        d if d.is_zero() => Err(ValueError::NotPositive(value.to_owned())),
        d => Ok(d),
    }
}

/// Parses an RFC 3339 time such as `2026-11-24T16:00:00Z`.
///
/// # Errors
///
/// [`ValueError::NotTime`] naming the value and what is wrong with it.
pub fn parse_time(value: &str) -> Result<chrono::DateTime<chrono::Utc>, ValueError> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| ValueError::NotTime {
            value: value.to_owned(),
            reason: e.to_string(),
        })
}

/// Parses a duration such as `90s`, `15m`, `1h`, `500ms` or a plain number of seconds.
///
/// Hand-written rather than `humantime`'s: a plain number is seconds and
/// fractions (`1.5h`) are taken, and a week (`1w`) is refused, as the bus's
/// settings always were.
///
/// # Errors
///
/// [`ValueError`], naming the accepted forms.
pub fn parse_duration(value: &str) -> Result<Duration, ValueError> {
    let v = value.trim();
    let (num, unit) = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((v, ""), |i| v.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| ValueError::NotDuration(value.to_owned()))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => {
            return Err(ValueError::DurationUnit {
                value: value.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| ValueError::DurationRange {
        value: value.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses a stream size limit: `unlimited` (also `-1` or `0`), a number of bytes,
/// or a number with a unit: `K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB` (powers of 1000)
/// or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), e.g. `500MB`, `10GiB`. Gives
/// `-1` for unlimited, as JetStream's `max_bytes` wants.
///
/// # Errors
///
/// [`ValueError`], naming the accepted forms.
pub fn parse_byte_limit(value: &str) -> Result<i64, ValueError> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("unlimited") || v == "-1" || v == "0" {
        return Ok(-1);
    }
    let bad = || ValueError::NotSize(value.to_owned());
    let (num, unit) = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((v, ""), |i| v.split_at(i));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (n * factor).round();
    if !(1.0..=9.0e18).contains(&bytes) {
        return Err(ValueError::SizeRange(value.to_owned()));
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok(bytes as i64)
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
    fn defaults_parse_to_the_documented_values() {
        let streams = StreamSettings::default();
        assert_eq!(streams.events_max_age, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(streams.events_max_bytes, -1);
        assert_eq!(streams.lease_ttl, Duration::from_secs(5));
        assert_eq!(streams.replicas, 1);
        let dispatcher = DispatcherSettings::default();
        assert_eq!(dispatcher.ack_wait, Duration::from_secs(30));
        assert_eq!(dispatcher.max_parallel_objects, 256);
        assert_eq!(dispatcher.partitions, 1);
        assert!(dispatcher.metrics);
        let monitor = MonitorSettings::default();
        assert_eq!(monitor.interval, Duration::from_secs(10));
        assert_eq!(monitor.degraded_after, Duration::from_secs(3600));
        assert_eq!(monitor.relay_backlog_age, Duration::from_secs(60));
        assert_eq!(monitor.alive_window, Duration::from_secs(3600));
        assert!((monitor.error_rate - 0.5).abs() < f64::EPSILON);
        assert_eq!(monitor.lag_events, 10_000);
        assert_eq!(defaults::PREFIX, Subjects::default().prefix());
    }

    #[test]
    fn enabled_plugins_keep_order() {
        assert_eq!(
            parse_enabled_plugins(" a, b ,,c"),
            vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]
        );
        assert!(parse_enabled_plugins("").is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1w").is_err());
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn byte_limits() {
        assert_eq!(parse_byte_limit("unlimited"), Ok(-1));
        assert_eq!(parse_byte_limit("-1"), Ok(-1));
        assert_eq!(parse_byte_limit("0"), Ok(-1));
        assert_eq!(parse_byte_limit("1048576"), Ok(1_048_576));
        assert_eq!(parse_byte_limit("500MB"), Ok(500_000_000));
        assert_eq!(parse_byte_limit("10GiB"), Ok(10 * 1024 * 1024 * 1024));
        assert_eq!(parse_byte_limit("1.5k"), Ok(1500));
        let err = parse_byte_limit("10 parsecs").unwrap_err().to_string();
        assert!(err.contains("'10 parsecs' is not a size"), "{err}");
    }
}
