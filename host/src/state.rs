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

/// Default [`HttpSettings::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`HttpSettings::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`HttpSettings::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
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
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Default limit on a request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

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
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            database_url: database_url.into(),
            subjects: Subjects::default(),
            enabled_plugins: Vec::new(),
            operation_id_config: String::new(),
            plugin_wait: Duration::from_secs(10),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            http: HttpSettings::default(),
            plugin_rate_per_sec: 50,
            plugin_rate_burst: 100,
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
