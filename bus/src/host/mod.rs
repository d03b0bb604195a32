//! The reference host: a thin HTTP layer (`/api/v2/…`) over the model store, with
//! every write going through the synchronous hooks first and committing the model
//! change and its event in one transaction (the outbox).
//!
//! | part | module |
//! |---|---|
//! | errors as JSON with the right status | [`error`] |
//! | `Authorization: Token …` (tokens stored hashed), users and tokens | [`auth`] |
//! | entities and entries: create, read, update, soft delete, restore, list | [`models`] |
//! | plugin API routes `/api/v2/plugins/<id>/…` over request/reply | [`plugin_api`] |
//! | plugin tasks as jobs, operation ids, job status and cancel | [`jobs`] |
//! | the HTTP server: connection limit, header and body timeouts, JSON errors of the HTTP layer, `/metrics` | [`server`] |
//!
//! [`Host::start`] binds the address, loads the registry, checks
//! `PLUGIN_OPERATION_ID_CONFIG` (refusing to start with every problem listed) and
//! serves until [`Host::stop`].

pub mod auth;
pub mod error;
pub mod forget;
pub mod jobs;
pub mod models;
pub mod plugin_api;
pub mod server;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use core_events::Subjects;
use core_events::jobs::OperationIds;
use store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::call_metrics::CallMetrics;
use crate::registry::Registry;
use crate::sync_hooks::SyncHooks;

pub use error::ApiError;
pub use server::HttpSettings;

/// Default limit on a request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// How the host is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Address to serve on (port 0: any free port; see [`Host::addr`]).
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
    pub streams: crate::config::StreamSettings,
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
            streams: crate::config::StreamSettings::default(),
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
    pub limiter: plugin_api::RateLimiter,
    /// Recently seen token keys (by hash) and their users, so a request costs no
    /// database read.
    pub tokens: auth::TokenCache,
    /// Entities recently read for entry writes.
    pub entities: models::EntityCache,
    /// Group commit of entry creations.
    pub entry_writer: writer::EntryWriter,
    /// This host process (a UUID), so it ignores its own cache notices.
    pub instance: String,
    /// The metrics served on `/metrics`.
    pub metrics: Arc<CallMetrics>,
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

/// The whole `/api/v2` router, with `/healthz` and `/metrics`; every request
/// passes the layers of [`server`]: metrics, a request span, the body timeout and
/// the HTTP layer's errors as JSON.
pub fn router(state: HostState) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .merge(auth::routes())
        .merge(models::routes())
        .merge(plugin_api::routes())
        .merge(jobs::routes())
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/metrics", axum::routing::get(server::metrics))
        .fallback(models::no_route)
        .method_not_allowed_fallback(models::no_method)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            server::guard,
        ))
        .layer(
            // A span per request (method, URI); failures are logged where they
            // happen (ApiError), not again here.
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            server::observe,
        ))
        .with_state(state)
}

/// Why the host did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// `PLUGIN_OPERATION_ID_CONFIG` is wrong; every problem, with Pagoda's messages.
    #[error("PLUGIN_OPERATION_ID_CONFIG is invalid:\n  {}", .0.join("\n  "))]
    OperationIds(Vec<String>),
    /// The model store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The registry could not be loaded.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// JetStream set-up failed.
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The subscription to other hosts' cache notices failed.
    #[error("cannot subscribe to the other hosts' cache notices: {0}")]
    Notices(#[from] async_nats::SubscribeError),
}

/// The largest event a write may emit: what the events stream takes over this
/// connection (the server's `max_payload`, the stream's largest message) less
/// room for headers. A write whose event is larger is refused before commit (413).
async fn event_limit(js: &jetstream::Context, config: &HostConfig) -> usize {
    let limit = match crate::publish::event_limit(js, &config.subjects).await {
        Ok(limit) => limit,
        Err(e) => {
            let configured = usize::try_from(config.streams.max_event_bytes).unwrap_or(0);
            let limit = js
                .client()
                .max_payload()
                .min(configured)
                .saturating_sub(crate::publish::HEADER_ROOM);
            tracing::warn!(error = %e, limit, "cannot read the events stream's limits; using the configured ones");
            limit
        }
    };
    tracing::info!(
        max_event_bytes = limit,
        "events larger than this are refused (413)"
    );
    limit
}

/// A running host.
#[derive(Debug)]
pub struct Host {
    addr: SocketAddr,
    state: HostState,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Host {
    /// Opens (and migrates) the store, provisions streams and buckets, loads the
    /// registry, checks `PLUGIN_OPERATION_ID_CONFIG`, binds and serves.
    ///
    /// # Errors
    ///
    /// [`HostError`]: with [`HostError::OperationIds`] the host refuses to start.
    pub async fn start(client: async_nats::Client, config: HostConfig) -> Result<Host, HostError> {
        let store = Store::connect(&config.database_url).await?;
        store.migrate().await?;
        let js = jetstream::new(client.clone());
        crate::provision::provision(&js, &config.subjects, &config.streams).await?;
        let store = store.with_max_event_bytes(event_limit(&js, &config).await);
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let (registry, registry_task) = Registry::start(
            &js,
            config.subjects.clone(),
            config.enabled_plugins.clone(),
            shutdown.child_token(),
        )
        .await?;
        tasks.push(registry_task);
        let operation_ids = match jobs::operation_ids(&registry, &config).await {
            Ok(ids) => ids,
            Err(e) => {
                shutdown.cancel();
                return Err(e);
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(source) => {
                shutdown.cancel();
                return Err(HostError::Bind {
                    addr: config.listen,
                    source,
                });
            }
        };
        let addr = listener.local_addr().map_err(|source| HostError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut metrics = CallMetrics::new();
        if config.relay {
            let settings =
                crate::relay::RelaySettings::for_deployment(store.backend(), &config.streams);
            let relay = crate::relay::Relay::new(
                store.clone(),
                js.clone(),
                config.subjects.clone(),
                settings,
            )
            .with_gauges(metrics.relay_gauges());
            let token = shutdown.child_token();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = relay.run(token).await {
                    tracing::error!(error = %e, "outbox relay stopped");
                }
            }));
        }
        let limiter =
            plugin_api::RateLimiter::new(config.plugin_rate_per_sec, config.plugin_rate_burst);
        let metrics = Arc::new(metrics);
        let state = HostState {
            inner: Arc::new(HostInner {
                hooks: SyncHooks::new(client.clone(), registry.clone())
                    .with_metrics(Arc::clone(&metrics)),
                entry_writer: writer::EntryWriter::with_metrics(
                    store.clone(),
                    Arc::clone(&metrics),
                ),
                store,
                registry,
                client,
                js,
                subjects: config.subjects.clone(),
                operation_ids,
                limiter,
                tokens: auth::TokenCache::default(),
                entities: models::EntityCache::default(),
                instance: uuid::Uuid::now_v7().to_string(),
                metrics: Arc::clone(&metrics),
                config,
            }),
        };
        match forget::listen(state.clone(), shutdown.child_token()).await {
            Ok(task) => tasks.push(task),
            Err(e) => {
                shutdown.cancel();
                return Err(e.into());
            }
        }
        let app = router(state.clone());
        tasks.push(tokio::spawn(server::serve(
            listener,
            app,
            state.config.http,
            metrics,
            shutdown.clone(),
        )));
        tasks.extend(jobs::spawn_background(state.clone(), shutdown.clone()));
        tracing::info!(%addr, relay = state.config.relay, "host serving /api/v2");
        Ok(Host {
            addr,
            state,
            shutdown,
            tasks,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (store, hooks, registry).
    pub fn state(&self) -> &HostState {
        &self.state
    }

    /// A token that stops the host when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Completes when one of the host's long-lived tasks (relay, HTTP server, job
    /// mirror and timeouts, cache notices) ended with a panic, with its message
    /// (logged); pending while they run. `hookbus host` then stops and exits 1, for
    /// its supervisor to start it again ([`crate::supervise`]).
    pub async fn panicked(&mut self) -> String {
        loop {
            if self.tasks.is_empty() {
                return std::future::pending().await;
            }
            let (result, i, _) = futures::future::select_all(self.tasks.iter_mut()).await;
            self.tasks.remove(i);
            if let Err(e) = result
                && e.is_panic()
            {
                let message = crate::supervise::panic_message(&*e.into_panic());
                tracing::error!(panic = %message, "a task of the host panicked");
                return message;
            }
        }
    }

    /// Stops serving and waits for in-flight requests.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
