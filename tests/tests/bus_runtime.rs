//! The bus runtime under faults: plugins replying with malformed headers, plain
//! (non Services API) plugins, panicking tasks, the `hookbus` binary's health,
//! help, shutdown and error messages under the production NATS configuration.
#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use core_events::{HandlerSpec, Hook, PluginManifest, Subjects, sample};
use hookbus::Publisher;
use hookbus::sync_hooks::SyncHooks;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing};
use store::{NewEntry, WriteContext};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// A plugin written against the raw NATS protocol (no client library): it
/// queue-subscribes to `subjects` in group `queue` and answers every request
/// with `reply_headers` (raw header lines, each ending in `\r\n`) and `body`.
/// Counts the requests it answered. Raw, because a client library refuses or
/// cleans a header value holding a line break, and a malicious plugin would not.
struct RawPlugin {
    answered: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawPlugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_plugin(
    server: &NatsServer,
    credentials: Option<(&str, &str)>,
    subjects: &[String],
    queue: &str,
    reply_headers: &'static [u8],
    body: &'static [u8],
) -> RawPlugin {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
        "protocol": 1, "name": "raw-plugin",
    });
    if let Some((user, password)) = credentials {
        connect["user"] = user.into();
        connect["pass"] = password.into();
    }
    let mut hello = format!("CONNECT {connect}\r\n");
    for (sid, subject) in subjects.iter().enumerate() {
        hello.push_str(&format!("SUB {subject} {queue} {}\r\n", sid + 1));
    }
    hello.push_str("PING\r\n");
    write.write_all(hello.as_bytes()).await.unwrap();
    // The PONG says the server has the subscriptions.
    loop {
        line.clear();
        read.read_line(&mut line).await.unwrap();
        assert!(!line.starts_with("-ERR"), "raw plugin refused: {line}");
        if line.starts_with("PONG") {
            break;
        }
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let task = tokio::spawn(async move {
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (reply, size) = match parts.first().copied() {
                Some("PING") => {
                    let _ = write.write_all(b"PONG\r\n").await;
                    continue;
                }
                // MSG <subject> <sid> [reply] <size>
                Some("MSG") => (
                    (parts.len() == 5).then(|| parts[3].to_owned()),
                    parts[parts.len() - 1].parse::<usize>().unwrap(),
                ),
                // HMSG <subject> <sid> [reply] <header size> <total size>
                Some("HMSG") => (
                    (parts.len() == 6).then(|| parts[3].to_owned()),
                    parts[parts.len() - 1].parse::<usize>().unwrap(),
                ),
                _ => continue,
            };
            let mut payload = vec![0; size + 2];
            read.read_exact(&mut payload).await.unwrap();
            let Some(reply) = reply else { continue };
            let mut headers = b"NATS/1.0\r\n".to_vec();
            headers.extend_from_slice(reply_headers);
            headers.extend_from_slice(b"\r\n");
            let mut out = format!(
                "HPUB {reply} {} {}\r\n",
                headers.len(),
                headers.len() + body.len()
            )
            .into_bytes();
            out.extend_from_slice(&headers);
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n");
            if write.write_all(&out).await.is_err() {
                return;
            }
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    RawPlugin { answered, task }
}

fn manifest(id: &str, handlers: &[(&str, Hook)]) -> PluginManifest {
    let mut m = PluginManifest::new(id, format!("Raw plugin {id}"), "1.0.0");
    for (name, hook) in handlers {
        let mut h = HandlerSpec::new(*name, *hook);
        h.timeout_ms = 2_000;
        h.retry_backoff_ms = vec![20, 40];
        m.handlers.push(h);
    }
    m
}

/// async-nats before 0.52 panicked its connection task on a `\r` inside a received
/// header value: one reply of a plugin stopped the bus's (or the host's) connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_reply_with_carriage_return_in_a_header_does_not_stop_the_bus() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let bus = start_bus(&server, &["crlf"]).await;
    let subjects = Subjects::default();
    server.allow_plugins(&["crlf"]).await;
    let password = NatsServer::password("crlf");
    let plugin = raw_plugin(
        &server,
        Some(("crlf", &password)),
        &[
            subjects.handler("crlf", "created"),
            subjects.handler("crlf", "check"),
        ],
        "crlf",
        b"Pagoda-Note: first\rsecond\r\n",
        b"{}",
    )
    .await;
    register(
        &client,
        &manifest(
            "crlf",
            &[
                ("created", Hook::EntryAfterCreate),
                ("check", Hook::EntryValidate),
            ],
        ),
    )
    .await;
    wait_registered(&bus, &["crlf"]).await;
    let publisher = Publisher::new(js.clone(), subjects.clone());

    // A dispatched delivery answered with the header: the bus takes the answer.
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    assert_eq!(bus.stats.delivered.get(), 1);
    assert_eq!(bus.stats.failed_attempts.get(), 0);

    // A synchronous hook answered the same way, on the host's own connection.
    let host = server.connect().await;
    let hooks = SyncHooks::new(host.clone(), bus.registry.clone());
    let ctx = WriteContext {
        user: Some(sample::user(1, "admin")),
        traceparent: None,
        tracestate: None,
    };
    let outcome = tokio::time::timeout(
        WAIT,
        hooks.validate(
            &sample::entity(1, "customer"),
            &NewEntry::named("ACME"),
            None,
            &ctx,
        ),
    )
    .await
    .expect("validation answered")
    .unwrap();
    assert!(outcome.skipped.is_empty(), "{:?}", outcome.skipped);
    // Counted after its write returns, which may be after the answer arrived.
    assert_eventually!(plugin.answered.load(Ordering::SeqCst) == 2, WAIT);

    // Both connections still work: the bus dispatches on, the host validates on.
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 2))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 2, WAIT);
    assert_eq!(bus.stats.delivered.get(), 2);
    let again = tokio::time::timeout(
        WAIT,
        hooks.validate(
            &sample::entity(1, "customer"),
            &NewEntry::named("ACME 2"),
            None,
            &ctx,
        ),
    )
    .await
    .expect("validation answered")
    .unwrap();
    assert!(again.skipped.is_empty());
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert_eq!(
        host.connection_state(),
        async_nats::connection::State::Connected
    );
    bus.stop().await.unwrap();
}

/// `hookbus <args>` as `user` of the generated configuration, on `server`.
fn hookbus_as(server: &NatsServer, user: &str, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(hookbus_tests::hookbus_binary());
    for v in hookbus_tests::deploy::SCRUBBED_ENV {
        c.env_remove(v);
    }
    c.args(args)
        .env("NATS_URL", server.url())
        .env("NATS_USER", user)
        .env("NATS_PASSWORD", password(user))
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    c
}

/// `hookbus health` as the bus user: (exit code, stdout, stderr).
async fn health(server: &NatsServer, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["health"];
    all.extend_from_slice(args);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        hookbus_as(server, hookbus::nats_config::BUS_USER, &all).output(),
    )
    .await
    .expect("hookbus health finished within 30 s")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The production set-up: `hookbus run` relaying an outbox and `hookbus health`,
/// both as the generated bus user; an SDK plugin as its own user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_under_the_generated_permissions() {
    init_tracing();
    let server = start_server(&["h1"]).await;
    let db = hookbus_tests::TestDb::sqlite();
    // The host's database has its outbox (`hookbus run` creates no table).
    let _migrated = db.store().await;
    let mut bus = hookbus_as(&server, hookbus::nats_config::BUS_USER, &["run"]);
    let _bus = bus
        .env("ENABLED_PLUGINS", "h1")
        .env("HOOKBUS_HTTP_ADDR", "off")
        .env("HOOKBUS_ALERT_INTERVAL", "200ms")
        .env("HOOKBUS_DATABASE_URL", db.url())
        .spawn()
        .unwrap();
    let (plugin_client, _) = connect(&server, "h1").await;
    let plugin = pagoda_plugin_sdk::Plugin::builder("h1", "H1", "1.0.0")
        .on_entry(Hook::EntryAfterCreate, "h", |_ctx| async { Ok(()) })
        .build()
        .unwrap();
    let running = plugin
        .serve(plugin_client, pagoda_plugin_sdk::ServeOptions::default())
        .await
        .unwrap();

    // Polled: the plugin registers and the bus's first check runs meanwhile.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (code, stdout, stderr) = loop {
        let answer = health(&server, &[]).await;
        if answer.0 == Some(0) || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, Some(0), "{stdout}\n{stderr}\n{}", server.log_tail(30));
    assert!(stdout.contains("bus:    ok  NATS connected"), "{stdout}");
    assert!(stdout.contains("relay:  publishing"), "{stdout}");
    assert!(stdout.contains("\nhealthy\n"), "{stdout}");
    running.shutdown().await.unwrap();
}

/// A plain queue-subscriber plugin (async-nats, no Services API: it answers no
/// `$SRV.PING`) that the bus delivers to successfully is alive, not `NO REPLICA`;
/// once a delivery finds it gone, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_subscriber_plugin_is_alive_by_its_deliveries() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut config = test_config(&["plain"]);
    config.monitor.interval = Duration::from_millis(100);
    config.monitor.ping_timeout = Duration::from_millis(150);
    let bus = hookbus::run::Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    let log = CallLog::default();
    let mut plugin = TestPlugin::new("plain", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    plugin.start(&server).await;
    wait_registered(&bus, &["plain"]).await;
    let publisher = Publisher::new(js.clone(), Subjects::default());
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    assert_eq!(log.count("plain", "h"), 1);

    // Checks after the delivery: pinged, no replica answers, yet alive.
    let checks = bus.health.checks();
    assert_eventually!(bus.health.checks() >= checks + 3, WAIT);
    let report = bus.health.report();
    let p = &report.plugins["plain"];
    assert_eq!(p.replicas, Some(0), "{p:?}");
    assert!(p.delivering, "{p:?}");
    assert!(report.alerts.is_empty(), "{:?}", report.alerts);
    let mut ops = hookbus::ops::Ops::new(client.clone(), Subjects::default());
    ops.timeout = Duration::from_millis(300);
    let health = hookbus::ops::health::check(&ops).await.unwrap();
    assert!(health.healthy, "{:?}", health.problems);
    assert_eq!(health.plugins[0].status, "ok");
    assert!(
        health.notes[0].contains("plain answers no $SRV.PING"),
        "{:?}",
        health.notes
    );

    // Gone: the next delivery finds no responders (deferred), and it is NO REPLICA.
    plugin.stop();
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 2))
        .await
        .unwrap();
    assert_eventually!(bus.stats.deferred.get() == 1, WAIT);
    assert_eventually!(
        bus.health
            .report()
            .alerts
            .iter()
            .any(|a| a.plugin == "plain" && a.kind == hookbus::monitor::AlertKind::NoReplica),
        WAIT
    );
    let health = hookbus::ops::health::check(&ops).await.unwrap();
    assert!(!health.healthy);
    assert_eq!(health.plugins[0].status, "NO REPLICA");
    bus.stop().await.unwrap();
}

/// A binary next to the test executable (`target/<profile>/<name>`).
fn binary(name: &str) -> std::path::PathBuf {
    let bin = hookbus_tests::hookbus_binary().with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// Every binary answers `--help` and exits 0 without connecting (the URL given
/// leads nowhere); a plugin binary refuses an argument it does not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_binary_answers_help_without_connecting() {
    for (bin, expected) in [
        ("hookbus", "--nats-url"),
        ("hello-world", "HELLO_PRIORITY"),
        ("audit-log", "AUDIT_LOG_PATH"),
        ("flaky", "FLAKY_MODE"),
    ] {
        let mut cmd = tokio::process::Command::new(binary(bin));
        for v in hookbus_tests::deploy::SCRUBBED_ENV {
            cmd.env_remove(v);
        }
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            cmd.arg("--help")
                .env("NATS_URL", "nats://127.0.0.1:1")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{bin} --help did not exit: it started instead"))
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{bin}: {stdout}");
        assert!(stdout.contains("Usage:"), "{bin}: {stdout}");
        assert!(stdout.contains(expected), "{bin}: {stdout}");
        if bin != "hookbus" {
            assert!(stdout.contains("NATS_URL"), "{bin}: {stdout}");
            let out = tokio::process::Command::new(binary(bin))
                .arg("--nats-url=x")
                .kill_on_drop(true)
                .output()
                .await
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{bin}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--nats-url=x'")
            );
        }
    }
}

/// `hookbus run` stops within a bound after SIGTERM even when NATS is gone
/// (it took more than 10 s, waiting for requests that could not be answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookbus_run_stops_quickly_when_nats_is_gone() {
    init_tracing();
    let mut server = start_server(&["p"]).await;
    let (host, _) = connect(&server, hookbus::nats_config::HOST_USER).await;
    let db = hookbus_tests::TestDb::sqlite();
    let mut bus = hookbus_as(&server, hookbus::nats_config::BUS_USER, &["run"])
        .env("ENABLED_PLUGINS", "p")
        .env("HOOKBUS_HTTP_ADDR", "off")
        .env("HOOKBUS_DATABASE_URL", db.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Running: it answers, and its dispatcher holds the lease.
    assert_eventually!(
        host.request("pagoda.bus.health", bytes::Bytes::new())
            .await
            .ok()
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
            .is_some_and(|h| h["dispatcher_running"] == true),
        WAIT
    );
    server.kill();
    let pid = rustix::process::Pid::from_raw(i32::try_from(bus.id().unwrap()).unwrap()).unwrap();
    let asked = std::time::Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), bus.wait())
        .await
        .expect("hookbus run exited")
        .unwrap();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "hookbus run took {took:?} to stop ({status})"
    );
}

/// A refused password: the cause is said once, not once per layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_reported_once() {
    let server = start_server(&[]).await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        hookbus_as(&server, hookbus::nats_config::BUS_USER, &["health"])
            .env("NATS_PASSWORD", "wrong")
            .output(),
    )
    .await
    .expect("hookbus health gave up")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("hookbus: error: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("cannot connect to NATS at"), "{line}");
    assert_eq!(
        line.to_lowercase()
            .matches("authorization violation")
            .count(),
        1,
        "{line}"
    );
}

/// A Services API plugin (the SDK) is counted by `$SRV.PING` only: once it stops,
/// it is `NO REPLICA` at once, recent successful deliveries or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_plugin_that_stops_is_no_replica_despite_recent_deliveries() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut config = test_config(&["svc"]);
    config.monitor.interval = Duration::from_millis(100);
    config.monitor.ping_timeout = Duration::from_millis(150);
    let bus = hookbus::run::Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    let plugin = pagoda_plugin_sdk::Plugin::builder("svc", "Svc", "1.0.0")
        .on_entry(Hook::EntryAfterCreate, "h", |_ctx| async { Ok(()) })
        .build()
        .unwrap();
    let running = plugin
        .serve(
            server.connect().await,
            pagoda_plugin_sdk::ServeOptions::default(),
        )
        .await
        .unwrap();
    wait_registered(&bus, &["svc"]).await;
    Publisher::new(js.clone(), Subjects::default())
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    assert_eventually!(bus.health.report().plugins["svc"].replicas == Some(1), WAIT);
    running.shutdown().await.unwrap();
    assert_eventually!(
        bus.health
            .report()
            .alerts
            .iter()
            .any(|a| a.plugin == "svc" && a.kind == hookbus::monitor::AlertKind::NoReplica),
        WAIT
    );
    assert!(!bus.health.report().plugins["svc"].delivering);
    let mut ops = hookbus::ops::Ops::new(client.clone(), Subjects::default());
    ops.timeout = Duration::from_millis(300);
    let health = hookbus::ops::health::check(&ops).await.unwrap();
    assert_eq!(health.plugins[0].status, "NO REPLICA");
    bus.stop().await.unwrap();
}

/// A watched task that panics stops the bus with an error (`hookbus run` exits 1),
/// counted, instead of being silently gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_watched_task_stops_the_bus_with_an_error() {
    init_tracing();
    let server = NatsServer::start().await;
    let mut bus = start_bus(&server, &[]).await;
    let stats = bus.stats.clone();
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    bus.watch(
        "test task",
        tokio::spawn(async move {
            let _ = ready.await;
            panic!("on purpose");
        }),
    );
    let _ = go.send(());
    let result = tokio::time::timeout(WAIT, bus.wait())
        .await
        .expect("the bus stopped");
    let Err(hookbus::run::RunError::Panicked(message)) = result else {
        panic!("expected Panicked, got {result:?}");
    };
    assert_eq!(message, "test task: on purpose");
    assert_eq!(stats.task_panics.get("test task"), 1);
    assert!(!stats.is_running());
}
