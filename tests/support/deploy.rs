//! The production deployment, as processes: `nats-server` with the generated
//! users and the `docker/` limits, `hookbus run` as the bus's user, `hookbus
//! host` (relaying its outbox) as the host's user, and example plugin binaries
//! each as its own user. Every process is killed on drop.
//!
//! ```no_run
//! # async fn demo() {
//! use hookbus_tests::{TestDb, deploy::Deployment};
//!
//! let db = TestDb::sqlite();
//! let mut deployment = Deployment::start(&db, &["hello-world", "audit-log"]).await;
//! let (status, body) = deployment.post("/api/v2/entities/", serde_json::json!({"name": "shop"})).await;
//! # }
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{BUS_USER, HOST_USER, NatsServer, POLL_INTERVAL, TestDb, hookbus_binary, poll_until};

/// How long processes get to start, answer or exit.
pub const PROCESS_WAIT: Duration = Duration::from_secs(30);

/// One running child process and the lines it printed so far (stdout and
/// stderr together).
#[derive(Debug)]
pub struct Process {
    /// The process; killed on drop.
    pub child: Child,
    /// What it is (for messages).
    pub name: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `command` with stdout and stderr collected.
    ///
    /// # Panics
    ///
    /// When it cannot be started.
    pub fn spawn(name: &str, mut command: Command) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        Process {
            child,
            name: name.to_owned(),
            lines,
        }
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many printed lines contain every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        self.lines()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its output, for a failure message.
    pub fn output(&self) -> String {
        format!("--- {} ---\n{}", self.name, self.lines().join("\n"))
    }
}

/// A binary of this workspace next to `hookbus` (`target/<profile>/<name>`).
///
/// # Panics
///
/// When it has not been built (`cargo build --workspace --bins`; `./test.sh`
/// does).
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = hookbus_binary().with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (./test.sh does)",
        path.display()
    );
    path
}

/// The deployment: server, bus, host and plugins, all as processes.
#[derive(Debug)]
pub struct Deployment {
    /// The production-profile server.
    pub nats: NatsServer,
    /// `hookbus run`.
    pub bus: Process,
    /// `hookbus host` (with its relay).
    pub host: Process,
    /// The plugins, by id.
    pub plugins: Vec<Process>,
    /// `http://127.0.0.1:<port>` of the host.
    pub base: String,
    /// A superuser's token key.
    pub token: String,
    /// An HTTP client.
    pub http: reqwest::Client,
    /// Variables every process of the deployment got (see
    /// [`Deployment::start_with_env`]).
    pub env: Vec<(String, String)>,
}

/// Environment variables a test's `hookbus` or plugin child must not inherit
/// from the test's own environment (each test sets what it means).
pub const SCRUBBED_ENV: [&str; 14] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "HOOKBUS_DATABASE_URL",
    "HOOKBUS_HOST_LISTEN",
    "HOOKBUS_HTTP_ADDR",
    "HOOKBUS_ALERT_INTERVAL",
    "ENABLED_PLUGINS",
    "PLUGIN_OPERATION_ID_CONFIG",
    "NATS_URL",
    "NATS_USER",
    "NATS_PASSWORD",
    "PAGODA_SUBJECT_PREFIX",
    "RUST_LOG",
];

fn hookbus(args: &[&str]) -> Command {
    let mut command = Command::new(hookbus_binary());
    for var in SCRUBBED_ENV {
        command.env_remove(var);
    }
    command.args(args).env("RUST_LOG", "info");
    command
}

/// The command of example plugin `id`, as its own user; files it keeps (the
/// audit-log journal) go in the server's temp dir.
fn plugin_command(nats: &NatsServer, id: &str, env: &[(String, String)]) -> Command {
    let mut command = Command::new(workspace_binary(id));
    for var in SCRUBBED_ENV {
        command.env_remove(var);
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(nats.env_for(id))
        .env("RUST_LOG", "info")
        .env("AUDIT_LOG_PATH", nats.dir().join(format!("{id}.jsonl")))
        .env_remove("PAGODA_SUBJECT_PREFIX");
    command
}

impl Deployment {
    /// Starts everything on `db` with `plugins` (example binaries of
    /// `subscribers/src/bin`) enabled in that order, and waits until the host
    /// answers and every plugin is registered with the bus.
    ///
    /// # Panics
    ///
    /// When a part does not start within [`PROCESS_WAIT`].
    pub async fn start(db: &TestDb, plugins: &[&str]) -> Deployment {
        Self::start_with_env(db, plugins, &[]).await
    }

    /// [`Deployment::start`] with `env` set for the bus, the host and every
    /// plugin (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`); `{service}` in a value
    /// becomes the process's name (`hookbus-run`, `hookbus-host`, the plugin id).
    ///
    /// # Panics
    ///
    /// As [`Deployment::start`].
    pub async fn start_with_env(db: &TestDb, plugins: &[&str], env: &[(&str, &str)]) -> Deployment {
        crate::init_tracing();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let env_of = |service: &str| -> Vec<(String, String)> {
            env.iter()
                .map(|(k, v)| (k.clone(), v.replace("{service}", service)))
                .collect()
        };
        let nats = NatsServer::start_for(plugins).await;
        let enabled = plugins.join(",");

        // The bus.
        let mut command = hookbus(&["run"]);
        command
            .envs(env_of("hookbus-run"))
            .envs(nats.env_for(BUS_USER))
            .env("ENABLED_PLUGINS", &enabled)
            // Any free port for /healthz and /metrics (tests run side by side).
            .env("HOOKBUS_HTTP_ADDR", "127.0.0.1:0")
            .env("HOOKBUS_ALERT_INTERVAL", "1s");
        let bus = Process::spawn("hookbus run", command);

        // An administrator's token (the key is printed once, on stdout).
        let out = hookbus(&["token", "create", "--user", "root", "--superuser"])
            .args(["--database-url", db.url()])
            .output()
            .await
            .expect("hookbus token create runs");
        assert!(
            out.status.success(),
            "hookbus token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();

        // The plugins, before the host: a host given PLUGIN_OPERATION_ID_CONFIG
        // waits for the plugins it names to register before it serves.
        let mut running = Vec::new();
        for id in plugins {
            running.push(Process::spawn(id, plugin_command(&nats, id, &env_of(id))));
        }

        // The host, relaying its outbox; on another port when a parallel test
        // took the one found free.
        let http = reqwest::Client::new();
        let mut tries = 0;
        let (host, base) = loop {
            tries += 1;
            let port = crate::free_port();
            let base = format!("http://127.0.0.1:{port}");
            let mut command = hookbus(&["host", "--listen", &format!("127.0.0.1:{port}")]);
            command
                .args(["--database-url", db.url()])
                .envs(env_of("hookbus-host"))
                .envs(nats.env_for(HOST_USER))
                .env("ENABLED_PLUGINS", &enabled);
            let mut host = Process::spawn("hookbus host", command);
            let deadline = Instant::now() + PROCESS_WAIT;
            let mut up = false;
            while Instant::now() < deadline && host.is_running() {
                if let Ok(r) = http.get(format!("{base}/healthz")).send().await
                    && r.status() == StatusCode::OK
                    && r.text().await.unwrap_or_default() == "ok"
                {
                    up = true;
                    break;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            if up {
                break (host, base);
            }
            assert!(
                tries < 5 && !host.is_running(),
                "hookbus host did not serve /healthz:\n{}",
                host.output()
            );
        };

        let deployment = Deployment {
            nats,
            bus,
            host,
            plugins: running,
            base,
            token,
            http,
            env,
        };
        deployment.wait_registered(plugins).await;
        deployment
    }

    /// Waits until the bus's registry holds every plugin of `ids`.
    ///
    /// # Panics
    ///
    /// When one is missing after [`PROCESS_WAIT`].
    pub async fn wait_registered(&self, ids: &[&str]) {
        let js = async_nats::jetstream::new(self.nats.connect().await);
        let all = poll_until(PROCESS_WAIT, || async {
            let Ok(kv) = js
                .get_key_value(core_events::Subjects::default().registry_bucket())
                .await
            else {
                return false;
            };
            for id in ids {
                if !matches!(kv.get(format!("plugins.{id}")).await, Ok(Some(_))) {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(all, "plugins {ids:?} did not register:\n{}", self.outputs());
    }

    /// The plugin process `id`.
    ///
    /// # Panics
    ///
    /// When it is not part of the deployment.
    pub fn plugin(&self, id: &str) -> &Process {
        self.plugins
            .iter()
            .find(|p| p.name == id)
            .unwrap_or_else(|| panic!("no plugin {id} in this deployment"))
    }

    /// Kills plugin `id` with SIGKILL (deliveries in flight die with it).
    ///
    /// # Panics
    ///
    /// When it is not part of the deployment.
    pub async fn kill_plugin(&mut self, id: &str) {
        let plugin = self
            .plugins
            .iter_mut()
            .find(|p| p.name == id)
            .unwrap_or_else(|| panic!("no plugin {id} in this deployment"));
        let _ = plugin.child.kill().await;
    }

    /// Starts plugin `id` again (after [`kill_plugin`](Self::kill_plugin)); its
    /// output continues the old process's.
    ///
    /// # Panics
    ///
    /// When it is not part of the deployment or does not start.
    pub async fn restart_plugin(&mut self, id: &str) {
        let index = self
            .plugins
            .iter()
            .position(|p| p.name == id)
            .unwrap_or_else(|| panic!("no plugin {id} in this deployment"));
        let _ = self.plugins[index].child.kill().await;
        let old = self.plugins[index].lines.clone();
        let env: Vec<(String, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.replace("{service}", id)))
            .collect();
        let mut fresh = Process::spawn(id, plugin_command(&self.nats, id, &env));
        // Keep one record of everything the plugin printed, before and after.
        let before = old
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        {
            let mut lines = fresh
                .lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let after = std::mem::take(&mut *lines);
            *lines = before;
            lines.extend(after);
        }
        fresh.name = id.to_owned();
        self.plugins[index] = fresh;
    }

    /// Every process's output, for a failure message.
    pub fn outputs(&self) -> String {
        let mut out = vec![self.bus.output(), self.host.output()];
        out.extend(self.plugins.iter().map(Process::output));
        out.join("\n")
    }

    /// The server log's lines reporting a permission violation (`Permissions
    /// Violation`, `Publish Violation`, `Subscription Violation`): none is
    /// expected from a component doing its own job.
    pub fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(self.nats.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_owned)
            .collect()
    }

    /// A request to the host's `path` with the superuser's token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Token {}", self.token))
    }

    /// POSTs `body` as JSON to `path`; the status and the JSON answer.
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        crate::host::call(self.request(reqwest::Method::POST, path).json(&body)).await
    }

    /// GETs `path`; the status and the JSON answer.
    pub async fn get(&self, path: &str) -> (StatusCode, serde_json::Value) {
        crate::host::call(self.request(reqwest::Method::GET, path)).await
    }

    /// Runs `hookbus <args>` as the bus's user (an operator's commands) and
    /// returns its exit code and stdout.
    ///
    /// # Panics
    ///
    /// When it does not end within [`PROCESS_WAIT`].
    pub async fn hookbus(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut command = hookbus(args);
        command
            .envs(self.nats.env_for(BUS_USER))
            .env("RUST_LOG", "warn");
        let out = tokio::time::timeout(PROCESS_WAIT, command.output())
            .await
            .unwrap_or_else(|_| panic!("hookbus {args:?} did not end within {PROCESS_WAIT:?}"))
            .expect("hookbus runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
