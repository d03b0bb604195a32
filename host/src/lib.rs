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
pub mod cache;
pub mod error;
pub mod forget;
pub mod jobs;
pub mod models;
pub mod plugin_api;
pub mod rate;
pub mod request;
pub mod server;
pub mod state;
pub mod user;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::jetstream;
use axum::Router;
use store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use hookbus::call_metrics::CallMetrics;
use hookbus::registry::Registry;
use hookbus::sync_hooks::SyncHooks;

pub use error::{ApiError, HostError};
pub use state::{DEFAULT_MAX_BODY_BYTES, HostConfig, HostInner, HostState, HttpSettings};

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
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(server::request_span)
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            server::observe,
        ))
        .with_state(state)
}

/// The largest event a write may emit: what the events stream takes over this
/// connection (the server's `max_payload`, the stream's largest message) less
/// room for headers. A write whose event is larger is refused before commit (413).
async fn event_limit(js: &jetstream::Context, config: &HostConfig) -> usize {
    let limit = match hookbus::publish::event_limit(js, &config.subjects).await {
        Ok(limit) => limit,
        Err(e) => {
            let configured = usize::try_from(config.streams.max_event_bytes).unwrap_or(0);
            let limit = js
                .client()
                .max_payload()
                .min(configured)
                .saturating_sub(hookbus::publish::HEADER_ROOM);
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
        hookbus::provision::provision_patiently(
            &js,
            &config.subjects,
            &config.streams,
            hookbus::provision::PROVISION_PATIENCE,
        )
        .await?;
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
                hookbus::relay::RelaySettings::for_deployment(store.backend(), &config.streams);
            let relay = hookbus::relay::Relay::new(
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
        let limiter = rate::RateLimiter::new(config.plugin_rate_per_sec, config.plugin_rate_burst);
        let metrics = Arc::new(metrics);
        let state = HostState::new(HostInner {
            hooks: SyncHooks::new(client.clone(), registry.clone())
                .with_metrics(Arc::clone(&metrics)),
            entry_writer: writer::EntryWriter::with_metrics(store.clone(), Arc::clone(&metrics)),
            store,
            registry,
            client,
            js,
            subjects: config.subjects.clone(),
            operation_ids,
            limiter,
            tokens: cache::TokenCache::default(),
            entities: cache::EntityCache::default(),
            instance: uuid::Uuid::now_v7().to_string(),
            metrics: Arc::clone(&metrics),
            config,
        });
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
    /// its supervisor to start it again ([`hookbus::supervise`]).
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
                let message = hookbus::supervise::panic_message(&*e.into_panic());
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
