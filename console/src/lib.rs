//! The operator console: `hookbus console` serves one web page (plain HTML,
//! JavaScript and CSS, embedded in the binary) and the JSON API it reads, under
//! `/api/console/`.
//!
//! | tab | API | reads |
//! |---|---|---|
//! | Plugins | `GET /api/console/plugins` | the bus's health, registry and counters (`<prefix>.bus.health`, `.registry`, `.stats`), `$SRV.PING` replicas, deferred and dead-letter counts |
//! | Live tail | `GET /api/console/events?hook=&entity=&back=` | server-sent events from an ordered consumer on the events stream |
//! | Event journey | `GET /api/console/journey?seq=` or `?id=` | the stored event and its headers (trace id), the dispatcher consumer's position, the handlers that match it now with their dead letters, deferred deliveries and counters |
//! | Dead letters | `GET /api/console/dlq`, `GET /api/console/dlq/{seq}`, `POST /api/console/dlq/{seq}/replay`, `POST /api/console/dlq/purge` | the dead-letter stream, through [`hookbus::dlq`] |
//!
//! Every route of the API takes `Authorization: Token <key>`, a token of the
//! reference host (`hookbus token create`, `POST /api/v2/tokens/`), looked up in
//! the host's store; the console answers only superusers, reads included (the
//! console shows every event's payload, across all entities): 401
//! `not_authenticated` without a valid token, 403 `permission_denied` for
//! another user. Replays and purges are recorded in the audit trail with the
//! user's name (`console:<username>`). The token is sent in a header, never in
//! a cookie, so another site cannot make a browser act with it.
//!
//! ```no_run
//! # async fn demo(client: async_nats::Client) -> Result<(), hookbus_console::ConsoleError> {
//! use hookbus_console::{Console, ConsoleConfig};
//!
//! let store = store::Store::connect("sqlite://pagoda.db").await?;
//! let console = Console::start(client, store, ConsoleConfig::default()).await?;
//! println!("open http://{}/", console.addr());
//! console.stop().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod api;
mod assets;
mod auth;
mod dlq;
mod error;
mod tail;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use core_events::Subjects;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::ConsoleError;

/// Defaults of [`ConsoleConfig`] (and of `hookbus console`'s flags).
pub mod defaults {
    /// Where the console listens: loopback only, reached through an SSH tunnel
    /// or a port-forward.
    pub const LISTEN: &str = "127.0.0.1:8090";
    /// Live tails open at once (each holds an ordered consumer on the events stream).
    pub const MAX_TAILS: usize = 16;
}

/// How the console is set up.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Address to serve on (port 0: any free port, see [`Console::addr`]).
    pub listen: SocketAddr,
    /// The deployment's subject prefix.
    pub subjects: Subjects,
    /// Live tails open at once; more are answered 503.
    pub max_tails: usize,
    /// How long the plugins page waits for `$SRV.PING` answers and the bus.
    pub ping_timeout: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            subjects: Subjects::default(),
            max_tails: defaults::MAX_TAILS,
            ping_timeout: Duration::from_millis(500),
        }
    }
}

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct ConsoleState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    store: store::Store,
    tails: Arc<Semaphore>,
    ping_timeout: Duration,
    shutdown: CancellationToken,
}

impl ConsoleState {
    /// The state of a console over `client` (connected as the operator: the bus's
    /// NATS user) and the host's `store` (its API tokens).
    pub fn new(client: async_nats::Client, store: store::Store, config: &ConsoleConfig) -> Self {
        ConsoleState {
            inner: Arc::new(Inner {
                js: async_nats::jetstream::new(client.clone()),
                client,
                subjects: config.subjects.clone(),
                store,
                tails: Arc::new(Semaphore::new(config.max_tails.max(1))),
                ping_timeout: config.ping_timeout,
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The operator commands' context over the console's connection.
    fn ops(&self) -> hookbus::ops::Ops {
        let mut ops = hookbus::ops::Ops::new(self.inner.client.clone(), self.subjects().clone());
        ops.timeout = self.inner.ping_timeout;
        ops
    }

    fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }
}

/// The console's routes: the page and its assets, and the API.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/console.js", get(assets::script))
        .route("/console.css", get(assets::style))
        .route("/api/console/me", get(api::me))
        .route("/api/console/plugins", get(api::plugins))
        .route("/api/console/events", get(tail::events))
        .route("/api/console/journey", get(api::journey))
        .route("/api/console/dlq", get(api::dlq_list))
        .route("/api/console/dlq/purge", post(api::dlq_purge))
        .route("/api/console/dlq/replay", post(api::dlq_replay_bulk))
        .route("/api/console/dlq/{seq}", get(api::dlq_get))
        .route("/api/console/dlq/{seq}/replay", post(api::dlq_replay))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
}

/// A running console.
#[derive(Debug)]
pub struct Console {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Console {
    /// Checks that `store` has the host's tables, binds `config.listen` and
    /// serves until [`Console::stop`].
    ///
    /// # Errors
    ///
    /// [`ConsoleError::Store`] when the token table cannot be read (not the
    /// host's database, or not migrated), [`ConsoleError::Bind`] when the address
    /// cannot be bound.
    pub async fn start(
        client: async_nats::Client,
        store: store::Store,
        config: ConsoleConfig,
    ) -> Result<Console, ConsoleError> {
        // A lookup of a key no one has: fails when there is no token table.
        store.user_by_key("hb_console_start_probe").await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ConsoleError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
            addr: config.listen,
            source,
        })?;
        let state = ConsoleState::new(client, store, &config);
        let shutdown = state.inner.shutdown.clone();
        let app = router(state);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        tracing::info!(%addr, "console serving on http://{addr}/");
        Ok(Console {
            addr,
            shutdown,
            task,
        })
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the server stops (after [`Console::stop`], or when it fails).
    ///
    /// # Errors
    ///
    /// When serving failed.
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Stops serving: live tails end, requests in flight finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Err(e) = self.wait().await {
            tracing::warn!(error = %e, "console server failed");
        }
    }
}
