//! The reference host in-process for tests: [`TestHost`].
//!
//! ```no_run
//! # async fn demo() {
//! use hookbus_tests::{NatsServer, TestDb, host::TestHost};
//!
//! let server = NatsServer::start().await;
//! let db = TestDb::sqlite();
//! let host = TestHost::start(&server, &db, &["my-plugin"]).await;
//! // … start SDK plugins on `server.connect().await`, then:
//! host.wait_registered(&["my-plugin"]).await;
//! let me: serde_json::Value = host
//!     .as_user(reqwest::Method::GET, "/api/v2/users/me/")
//!     .send()
//!     .await
//!     .unwrap()
//!     .json()
//!     .await
//!     .unwrap();
//! assert_eq!(me["username"], "user");
//! host.stop().await;
//! # }
//! ```
//!
//! What it sets up: a [`Host`] on `127.0.0.1:0` (its relay on, so events reach
//! the stream) over the test's database and NATS server; a superuser `admin` and
//! a normal user `user`, each with a token; a `reqwest` client (keep-alive).

use std::time::Duration;

use core_events::User;
use hookbus_host::{Host, HostConfig, HostState};
use reqwest::{Method, RequestBuilder};
use store::{NewUser, Store};

use crate::{NatsServer, TestDb};

/// A running host with two users and their tokens.
#[derive(Debug)]
pub struct TestHost {
    /// The host.
    pub host: Host,
    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub base: String,
    /// An HTTP client (keep-alive; no default headers).
    pub client: reqwest::Client,
    /// The superuser `admin`.
    pub admin: User,
    /// `admin`'s token key.
    pub admin_token: String,
    /// The normal user `user`.
    pub user: User,
    /// `user`'s token key.
    pub user_token: String,
}

impl TestHost {
    /// Starts a host with `ENABLED_PLUGINS` = `enabled` and defaults otherwise.
    ///
    /// # Panics
    ///
    /// When the host does not start or the users cannot be created.
    pub async fn start(server: &NatsServer, db: &TestDb, enabled: &[&str]) -> TestHost {
        Self::start_with(server, db, |c| {
            c.enabled_plugins = enabled.iter().map(|s| (*s).to_owned()).collect();
        })
        .await
    }

    /// Starts a host with the configuration `configure` leaves (it starts as
    /// [`HostConfig::new`] for the test database, on `127.0.0.1:0`, with a short
    /// `plugin_wait`).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_with(
        server: &NatsServer,
        db: &TestDb,
        configure: impl FnOnce(&mut HostConfig),
    ) -> TestHost {
        Self::start_on(server.connect_as(crate::HOST_USER).await, db, configure).await
    }

    /// As [`start_with`](Self::start_with), over a connection of the caller's
    /// (say, with the host user's credentials).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_on(
        nats: async_nats::Client,
        db: &TestDb,
        configure: impl FnOnce(&mut HostConfig),
    ) -> TestHost {
        crate::init_tracing();
        let mut config = HostConfig::new(db.url());
        config.listen = ([127, 0, 0, 1], 0).into();
        config.plugin_wait = Duration::from_secs(5);
        configure(&mut config);
        let host = Host::start(nats, config)
            .await
            .unwrap_or_else(|e| panic!("host did not start: {e}"));
        let store = host.state().store.clone();
        let (admin, admin_token) = user_with_token(&store, "admin", true).await;
        let (user, user_token) = user_with_token(&store, "user", false).await;
        TestHost {
            base: format!("http://{}", host.addr()),
            host,
            client: reqwest::Client::new(),
            admin,
            admin_token,
            user,
            user_token,
        }
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with `Authorization: Token <token>`.
    pub fn request(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("Authorization", format!("Token {token}"))
    }

    /// A request as the superuser `admin`.
    pub fn as_admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path, &self.admin_token)
    }

    /// A request as the normal user `user`.
    pub fn as_user(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path, &self.user_token)
    }

    /// The host's shared state (store, hooks, registry, NATS client).
    pub fn state(&self) -> &HostState {
        self.host.state()
    }

    /// The host's model store.
    pub fn store(&self) -> &Store {
        &self.host.state().store
    }

    /// Waits (10 s at most) until the host's registry has every plugin registered
    /// and enabled.
    ///
    /// # Panics
    ///
    /// When one is still missing after 10 s.
    pub async fn wait_registered(&self, plugins: &[&str]) {
        self.state()
            .registry
            .wait_for(Duration::from_secs(10), |t| {
                plugins.iter().all(|p| t.is_enabled(p))
            })
            .await
            .unwrap_or_else(|()| panic!("plugins {plugins:?} were not registered in time"));
    }

    /// Stops the host and waits for it.
    pub async fn stop(self) {
        self.host.stop().await;
    }
}

/// Creates a user (superuser or not) and a token; returns the user and the key.
///
/// # Panics
///
/// When the store fails (a taken username, say).
pub async fn user_with_token(store: &Store, username: &str, superuser: bool) -> (User, String) {
    let user = store
        .create_user(&NewUser {
            username: username.to_owned(),
            email: format!("{username}@example.com"),
            is_superuser: superuser,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("cannot create user {username}: {e}"));
    let (_, key) = store
        .create_token(user.id, "test")
        .await
        .unwrap_or_else(|e| panic!("cannot create a token for {username}: {e}"));
    (user, key)
}

/// Sends a request; returns its status and JSON body (panics, with the text,
/// when the body is not JSON).
pub async fn call(req: RequestBuilder) -> (reqwest::StatusCode, serde_json::Value) {
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let status = r.status();
    let text = r
        .text()
        .await
        .unwrap_or_else(|e| panic!("response {status} has no body: {e}"));
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response {status} is not JSON ({e}): {text}"));
    (status, body)
}
