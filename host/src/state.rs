//! How the host is set up ([`HostConfig`], [`HttpSettings`]) and what every
//! request handler shares ([`HostState`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use core_events::Subjects;
use core_events::jobs::OperationIds;
use store::Store;

use super::cache::{EntityCache, TokenCache};
use super::rate::RateLimiter;
use super::writer::EntryWriter;
use hookbus::call_metrics::CallMetrics;
use hookbus::config::StreamSettings;
use hookbus::registry::Registry;
use hookbus::sync_hooks::SyncHooks;

/// Every default of the host's settings, as an operator writes it: the one source
/// for [`HostConfig::new`], [`HttpSettings::default`], the `hookbus host` command
/// line and the docs (a test of the command line checks docs/host-api.md).
pub mod defaults {
    /// `--listen`: [`HostConfig::listen`](super::HostConfig::listen).
    pub const LISTEN: &str = "127.0.0.1:8000";
    /// `--database-url` of `hookbus host`.
    pub const DATABASE_URL: &str = "sqlite://pagoda.db";
    /// `--plugin-wait`: [`HostConfig::plugin_wait`](super::HostConfig::plugin_wait).
    pub const PLUGIN_WAIT: &str = "10s";
    /// `--max-body-bytes`: [`HostConfig::max_body_bytes`](super::HostConfig::max_body_bytes).
    pub const MAX_BODY_BYTES: usize = 1024 * 1024;
    /// `--http-header-timeout`: [`HttpSettings::header_timeout`](super::HttpSettings::header_timeout).
    pub const HTTP_HEADER_TIMEOUT: &str = "30s";
    /// `--http-body-timeout`: [`HttpSettings::body_timeout`](super::HttpSettings::body_timeout).
    pub const HTTP_BODY_TIMEOUT: &str = "30s";
    /// `--http-max-connections`: [`HttpSettings::max_connections`](super::HttpSettings::max_connections).
    pub const HTTP_MAX_CONNECTIONS: usize = 1024;
    /// `--plugin-rate`: [`HostConfig::plugin_rate_per_sec`](super::HostConfig::plugin_rate_per_sec).
    pub const PLUGIN_RATE: u32 = 50;
    /// `--plugin-burst`: [`HostConfig::plugin_rate_burst`](super::HostConfig::plugin_rate_burst).
    pub const PLUGIN_BURST: u32 = 100;
}

/// A default of [`defaults`] as a duration (checked by a unit test).
fn default_duration(value: &str) -> Duration {
    hookbus::config::parse_duration(value)
        .unwrap_or_else(|e| panic!("the default {value:?} is not a duration: {e}"))
}

/// Default [`HttpSettings::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = defaults::HTTP_MAX_CONNECTIONS;
/// Timeouts and limits of the host's HTTP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// Longest wait for a request's header, counted from when the connection
    /// waits for it: after it opens, and between the requests of a kept-alive
    /// connection (so this is also the idle timeout). Beyond, the connection
    /// is closed.
    pub header_timeout: Duration,
    /// Longest pause in a request body (no byte received). Beyond, the request
    /// is answered 408 `request_timeout` and the connection closed.
    pub body_timeout: Duration,
    /// Most connections open at once (lowered at start to fit the process's
    /// open-files limit less [`RESERVED_FDS`](super::server::RESERVED_FDS)); further connections wait to be
    /// accepted.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout: default_duration(defaults::HTTP_HEADER_TIMEOUT),
            body_timeout: default_duration(defaults::HTTP_BODY_TIMEOUT),
            max_connections: defaults::HTTP_MAX_CONNECTIONS,
        }
    }
}

/// Default limit on a request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = defaults::MAX_BODY_BYTES;

/// How the host is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Address to serve on (port 0: any free port; see [`Host::addr`](super::Host::addr)).
    pub listen: SocketAddr,
    /// Model store URL (`sqlite://file.db`, `postgres://…`).
    pub database_url: String,
    /// Subject namespace.
    pub subjects: Subjects,
    /// `ENABLED_PLUGINS`, in order.
    pub enabled_plugins: Vec<String>,
    /// `PLUGIN_OPERATION_ID_CONFIG` (JSON; empty for none).
    pub operation_id_config: String,
    /// How long start-up waits for the plugins named in `PLUGIN_OPERATION_ID_CONFIG`
    /// to register before checking it.
    pub plugin_wait: Duration,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Timeouts and the connection limit of the HTTP server.
    pub http: HttpSettings,
    /// Requests per second each token may make to plugin API routes (429 beyond); 0: no limit.
    pub plugin_rate_per_sec: u32,
    /// Burst allowed above the rate.
    pub plugin_rate_burst: u32,
    /// Run the outbox relay in this process (default). Off when `hookbus run
    /// --database-url` relays the same database instead; two relays are safe too.
    pub relay: bool,
    /// Retention and limits of the streams the host provisions.
    pub streams: StreamSettings,
}

impl HostConfig {
    /// Defaults: port 8000 on localhost, SQLite file `pagoda.db`.
    pub fn new(database_url: impl Into<String>) -> Self {
        HostConfig {
            listen: defaults::LISTEN
                .parse()
                .unwrap_or_else(|e| panic!("the default listen address: {e}")),
            database_url: database_url.into(),
            subjects: Subjects::default(),
            enabled_plugins: Vec::new(),
            operation_id_config: String::new(),
            plugin_wait: default_duration(defaults::PLUGIN_WAIT),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            http: HttpSettings::default(),
            plugin_rate_per_sec: defaults::PLUGIN_RATE,
            plugin_rate_burst: defaults::PLUGIN_BURST,
            relay: true,
            streams: StreamSettings::default(),
        }
    }
}

/// What every request handler shares. Cheap to clone.
#[derive(Clone)]
pub struct HostState {
    inner: Arc<HostInner>,
}

/// The parts of [`HostState`].
pub struct HostInner {
    /// The model store.
    pub store: Store,
    /// The synchronous hooks client.
    pub hooks: SyncHooks,
    /// The live registry.
    pub registry: Registry,
    /// The NATS connection.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
    /// Subject namespace.
    pub subjects: Subjects,
    /// Operation ids of plugin tasks.
    pub operation_ids: OperationIds,
    /// The configuration the host was started with.
    pub config: HostConfig,
    /// Per-token rate limits on plugin API routes.
    pub limiter: RateLimiter,
    /// Recently seen token keys (by hash) and their users, so a request costs no
    /// database read.
    pub tokens: TokenCache,
    /// Entities recently read for entry writes.
    pub entities: EntityCache,
    /// Group commit of entry creations.
    pub entry_writer: EntryWriter,
    /// This host process (a UUID), so it ignores its own cache notices.
    pub instance: String,
    /// The metrics served on `/metrics`.
    pub metrics: Arc<CallMetrics>,
}

impl HostState {
    /// The state over `inner`.
    pub(crate) fn new(inner: HostInner) -> HostState {
        HostState {
            inner: Arc::new(inner),
        }
    }
}

impl std::ops::Deref for HostState {
    type Target = HostInner;
    fn deref(&self) -> &HostInner {
        &self.inner
    }
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_to_the_documented_values() {
        let http = HttpSettings::default();
        assert_eq!(http.header_timeout, Duration::from_secs(30));
        assert_eq!(http.body_timeout, Duration::from_secs(30));
        assert_eq!(http.max_connections, 1024);
        let config = HostConfig::new("sqlite::memory:");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8000)));
        assert_eq!(config.plugin_wait, Duration::from_secs(10));
        assert_eq!(config.max_body_bytes, 1024 * 1024);
        assert_eq!(
            (config.plugin_rate_per_sec, config.plugin_rate_burst),
            (50, 100)
        );
    }
}
