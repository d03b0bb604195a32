//! Operator commands, health, metrics and alerts against a real nats-server:
//! `hookbus tail`, `registry ls`, `dlq show|replay|purge`, `health` (exit code),
//! `/metrics` and `/healthz`, alerts once per state change, degraded plugins.
#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Behaviour, CallLog, TestPlugin, entry_event, test_config, wait_registered};
use core_events::{Hook, Subjects};
use futures::StreamExt;
use hookbus::Publisher;
use hookbus::config::BusConfig;
use hookbus::monitor::{AlertEvent, AlertKind, AlertState};
use hookbus::ops::{self, Ops};
use hookbus::run::Bus;
use hookbus_tests::ServeOn;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing, wait_for};
use pagoda_plugin_sdk::{EntryContext, Handler, Plugin, RunningPlugin, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// Runs `hookbus <args>` against `server` and waits for it (at most 30 s).
async fn run_cli(server: &NatsServer, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(hookbus_tests::hookbus_binary());
    cmd.args(args)
        .envs(server.env_for(hookbus_tests::BUS_USER))
        .env("RUST_LOG", "warn")
        .env_remove("PAGODA_SUBJECT_PREFIX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("hookbus command did not finish in 30 s")
        .unwrap()
}

fn config(enabled: &[&str]) -> BusConfig {
    let mut c = test_config(enabled);
    c.monitor.interval = Duration::from_millis(100);
    c.monitor.ping_timeout = Duration::from_millis(150);
    c
}

async fn start_bus(server: &NatsServer, config: BusConfig) -> Bus {
    Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap()
}

/// A Services API plugin (the SDK) with one handler per `(name, priority, entities)`.
fn sdk_plugin(id: &str, handlers: &[(&str, i32, Option<&[&str]>)]) -> Plugin {
    let mut b = Plugin::builder(id, format!("Plugin {id}"), "1.0.0");
    for (name, priority, entities) in handlers {
        let mut handler = Handler::named(*name).priority(*priority);
        if let Some(e) = entities {
            handler = handler.entities(e.iter().copied());
        }
        b = b.on_entry(
            Hook::EntryAfterCreate,
            handler,
            |_ctx: EntryContext| async { Ok(()) },
        );
    }
    b.build().unwrap()
}

async fn serve(plugin: &Plugin, server: &NatsServer) -> RunningPlugin {
    plugin
        .serve_on(server, ServeOptions::default())
        .await
        .unwrap()
}

fn ops(client: &async_nats::Client) -> Ops {
    let mut o = Ops::new(client.clone(), Subjects::default());
    o.timeout = Duration::from_millis(300);
    o
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test]
async fn tail_shows_only_filtered_events() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = Publisher::new(js.clone(), Subjects::default());
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "product", 1))
        .await
        .unwrap();
    publisher
        .publish(&entry_event(Hook::EntryAfterUpdate, "customer", 2))
        .await
        .unwrap();
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 3))
        .await
        .unwrap();
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 4))
        .await
        .unwrap();

    // Library, readable lines.
    let opts = ops::tail::TailOptions {
        hooks: vec![Hook::EntryAfterCreate],
        entities: vec!["customer".into()],
        objects: vec![],
        json: false,
        from_seq: Some(1),
        count: Some(2),
    };
    let mut out = Vec::new();
    let shown = tokio::time::timeout(WAIT, ops::tail::tail(&ops(&client), &opts, &mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shown, 2);
    let out = text(&out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("seq=3") && lines[1].contains("seq=4"),
        "{out}"
    );
    for l in &lines {
        assert!(
            l.contains("entry.after_create") && l.contains("entity=customer"),
            "{l}"
        );
    }

    // The binary, JSON lines, two hooks.
    let output = run_cli(
        &server,
        &[
            "tail",
            "--from-seq",
            "1",
            "--count",
            "3",
            "--entity",
            "customer",
            "--hook",
            "entry.after_create",
            "--hook",
            "after_update_entry_v2",
            "--json",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4], "{stdout}");
    assert!(events.iter().all(|e| e["entity"] == "customer"));
    assert_eq!(events[0]["hook"], "entry.after_update");
    assert_eq!(events[0]["object"], "entry/2");

    // One object's history (`pagoda.events.entry.*.*.3.*`): another event about
    // entry 3 later, and only its two events are shown.
    publisher
        .publish(&entry_event(Hook::EntryAfterUpdate, "customer", 3))
        .await
        .unwrap();
    let output = run_cli(
        &server,
        &[
            "tail",
            "--from-seq",
            "1",
            "--count",
            "2",
            "--object",
            "entry/3",
            "--json",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let seqs: Vec<(u64, String)> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["hook"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seqs,
        [
            (3, "entry.after_create".to_owned()),
            (5, "entry.after_update".to_owned())
        ],
        "{stdout}"
    );
    // An object no hook of the filter has events about: a usage error.
    let output = run_cli(
        &server,
        &[
            "tail",
            "--hook",
            "entity.after_create",
            "--object",
            "entry/3",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("has no events about entry/3"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test]
async fn registry_ls_shows_effective_order_and_replicas() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let bus = start_bus(&server, config(&["b", "a"])).await;
    let a = sdk_plugin("a", &[("h", 100, Some(&["customer"]))]);
    let b = sdk_plugin("b", &[("h", 100, None), ("g", 10, None)]);
    let c = sdk_plugin("c", &[("h", 1, None)]);
    let _a1 = serve(&a, &server).await;
    let _a2 = serve(&a, &server).await;
    let _b1 = serve(&b, &server).await;
    let _c1 = serve(&c, &server).await;
    wait_registered(&bus, &["a", "b"]).await;
    bus.registry
        .wait_for(WAIT, |t| t.plugins().contains_key("c"))
        .await
        .unwrap();

    let mut out = Vec::new();
    ops::registry::ls(&ops(&client), &Default::default(), &mut out)
        .await
        .unwrap();
    let out = text(&out);
    let row = |id: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // PLUGIN VERSION ENABLED REPLICAS STATUS …
    assert_eq!(row("a")[2..5], ["#2", "2", "ok"], "{out}");
    assert_eq!(row("b")[2..5], ["#1", "1", "ok"], "{out}");
    assert_eq!(row("c")[2..4], ["no", "1"], "{out}");
    assert!(row("c").join(" ").contains("not enabled"), "{out}");
    let order: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "entry.after_create")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert_eq!(order.len(), 3, "{out}");
    assert!(order[0].contains("1. b/g") && order[0].contains("priority=10"));
    assert!(order[1].contains("2. b/h"));
    assert!(order[2].contains("3. a/h") && order[2].contains("entities=customer"));

    // For one entity: a's filter leaves it out.
    let mut out = Vec::new();
    let opts = ops::registry::LsOptions {
        entity: Some("product".into()),
        ..Default::default()
    };
    ops::registry::ls(&ops(&client), &opts, &mut out)
        .await
        .unwrap();
    let out = text(&out);
    assert!(out.contains("1. b/g") && out.contains("2. b/h"), "{out}");
    assert!(!out.contains("a/h"), "{out}");

    // show: replicas and handlers.
    let mut out = Vec::new();
    ops::registry::show(&ops(&client), "a", false, &mut out)
        .await
        .unwrap();
    let out = text(&out);
    assert!(out.contains("replicas:    2"), "{out}");
    assert!(out.contains("position 2 in ENABLED_PLUGINS"), "{out}");
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn dlq_show_replay_to_that_handler_only_and_purge() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let bus = start_bus(&server, config(&["p", "q"])).await;
    let log = CallLog::default();
    let mut p = TestPlugin::new("p", &log)
        .handler("x", Hook::EntryAfterCreate, None, 10)
        .handler("y", Hook::EntryAfterCreate, None, 20);
    let mut q = TestPlugin::new("q", &log).handler("z", Hook::EntryAfterCreate, None, 30);
    p.set("x", Behaviour::Fail(500));
    p.set("y", Behaviour::Fail(500));
    p.start(&server).await;
    q.start(&server).await;
    wait_registered(&bus, &["p", "q"]).await;
    Publisher::new(js.clone(), Subjects::default())
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 7))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    let letters = common::dead_letters(&js).await;
    assert_eq!(letters.len(), 2);
    let o = ops(&client);
    let all = hookbus::dlq::list(
        &js,
        &Subjects::default(),
        &hookbus::dlq::Filter::default(),
        None,
    )
    .await
    .unwrap();
    let seq_of = |h: &str| {
        all.iter()
            .find(|l| l.subject == format!("pagoda.dlq.p.{h}"))
            .unwrap()
            .seq
    };
    let (sx, sy) = (seq_of("x"), seq_of("y"));
    let attempts_y = all.iter().find(|l| l.seq == sy).unwrap().body["attempts"]
        .as_array()
        .unwrap()
        .len();

    // show
    let mut out = Vec::new();
    ops::dlq::show(&o, sx, &mut out).await.unwrap();
    let shown = text(&out);
    assert!(shown.contains("pagoda.dlq.p.x") && shown.contains("\"handler\": \"x\""));

    // ls with a handler filter
    let mut out = Vec::new();
    let n = ops::dlq::ls(
        &o,
        &hookbus::dlq::Filter {
            plugin: Some("p".into()),
            handler: Some("y".into()),
            ..Default::default()
        },
        None,
        false,
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(n, 1, "{}", text(&out));

    // replay x, which works now: removed, and only p/x got it.
    p.set("x", Behaviour::Ok);
    let before = log.len();
    let mut out = Vec::new();
    let sel = ops::dlq::Selection {
        seqs: vec![sx],
        ..Default::default()
    };
    let summary = ops::dlq::replay(&o, &sel, &mut out).await.unwrap();
    assert_eq!(summary.succeeded, 1, "{}", text(&out));
    let new_calls = &log.all()[before..];
    assert_eq!(new_calls.len(), 1, "{new_calls:?}");
    assert_eq!(
        (new_calls[0].plugin.as_str(), new_calls[0].handler.as_str()),
        ("p", "x")
    );
    assert_eq!(new_calls[0].entity_token, "customer");
    assert_eq!(new_calls[0].object, "entry/7");
    let left = common::dead_letters(&js).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, "pagoda.dlq.p.y");

    // replay y, which still fails: kept, with the attempt appended.
    let sel = ops::dlq::Selection {
        filter: hookbus::dlq::Filter::plugin("p"),
        ..Default::default()
    };
    let mut out = Vec::new();
    let summary = ops::dlq::replay(&o, &sel, &mut out).await.unwrap();
    assert_eq!(summary.failed, 1, "{}", text(&out));
    let left = common::dead_letters(&js).await;
    assert_eq!(left.len(), 1);
    let attempts = left[0].1["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), attempts_y + 1);
    assert!(
        attempts.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("test failure 500")
    );

    // purge: refused without --yes, done with it.
    let mut out = Vec::new();
    let sel = ops::dlq::Selection {
        filter: hookbus::dlq::Filter::plugin("p"),
        ..Default::default()
    };
    let refused = ops::dlq::purge(&o, &sel, false, &mut out).await;
    assert!(
        matches!(&refused, Err(ops::OpsError::Usage(m)) if m.contains("would delete 1")),
        "{refused:?}"
    );
    assert_eq!(common::dead_letters(&js).await.len(), 1);
    let purged = ops::dlq::purge(&o, &sel, true, &mut out).await.unwrap();
    assert_eq!(purged, 1);
    assert!(common::dead_letters(&js).await.is_empty());

    // The binary: `dlq` (ls by default) says 0.
    let output = run_cli(&server, &["dlq"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("0 dead letter(s)"));

    // The audit trail: both replays and the purge (the refused purge is not
    // there), and the registrations of p and q seen by the bus.
    let trail = audit_trail(&js).await;
    let actions: Vec<(&str, &str)> = trail
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .filter(|(a, _)| a.starts_with("dlq."))
        .collect();
    assert_eq!(
        actions,
        [
            ("dlq.replay.letter", &*format!("dead letter #{sx} (p/x)")),
            ("dlq.replay", &*format!("dead letters [{sx}]")),
            ("dlq.replay.letter", &*format!("dead letter #{sy} (p/y)")),
            ("dlq.replay", "plugin p"),
            ("dlq.purge", "plugin p"),
        ]
    );
    let purge = trail.iter().find(|e| e["action"] == "dlq.purge").unwrap();
    assert_eq!(purge["details"]["purged"], 1);
    assert_eq!(purge["type"], "pagoda.audit.dlq.purge");
    assert!(!purge["actor"].as_str().unwrap().is_empty());
    bus.stop().await.unwrap();
}

/// Every record of the audit stream, oldest first.
async fn audit_trail(js: &async_nats::jetstream::Context) -> Vec<serde_json::Value> {
    let mut stream = js.get_stream("PAGODA_AUDIT").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn registry_changes_are_audited_once_per_change() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    // Two buses watch the registry: each change is recorded once.
    let bus = start_bus(&server, config(&["p"])).await;
    let bus2 = start_bus(&server, config(&["p"])).await;
    let log = CallLog::default();
    let mut p = TestPlugin::new("p", &log).handler("x", Hook::EntryAfterCreate, None, 10);
    p.start(&server).await;
    wait_registered(&bus, &["p"]).await;
    let kv = js
        .get_key_value(Subjects::default().registry_bucket())
        .await
        .unwrap();
    kv.delete("plugins.p").await.unwrap();
    assert_eventually!(
        audit_trail(&js)
            .await
            .iter()
            .any(|e| e["action"] == "registry.delete"),
        WAIT
    );
    let trail = audit_trail(&js).await;
    let registry: Vec<(&str, &str)> = trail
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        registry,
        [("registry.update", "p"), ("registry.delete", "p")],
        "{trail:#?}"
    );
    assert_eq!(trail[0]["details"]["handlers"], 1);
    bus2.stop().await.unwrap();
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn health_exit_code_follows_replicas() {
    init_tracing();
    let server = NatsServer::start().await;
    let bus = start_bus(&server, config(&["h1"])).await;
    let plugin = sdk_plugin("h1", &[("h", 100, None)]);
    let running = serve(&plugin, &server).await;
    wait_registered(&bus, &["h1"]).await;
    // The dispatcher runs once it holds its lease (under load, a moment after start).
    assert_eventually!(bus.stats.is_running(), WAIT);

    let output = run_cli(&server, &["health"]).await;
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("healthy"), "{stdout}");
    assert!(stdout.contains("relay:"), "{stdout}");

    running.shutdown().await.unwrap();
    let output = run_cli(&server, &["health"]).await;
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("NO REPLICA"), "{stdout}");
    assert!(
        stdout.contains("UNHEALTHY: plugin h1 has no replica"),
        "{stdout}"
    );

    // The JSON form says the same.
    let output = run_cli(&server, &["health", "--json"]).await;
    assert_eq!(output.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    assert_eq!(v["plugins"][0]["replicas"], 0);
    bus.stop().await.unwrap();
}

/// A GET over plain HTTP/1.1: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = text(&buf);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn metrics_and_healthz() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut c = config(&["m"]);
    c.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let bus = start_bus(&server, c).await;
    let addr = bus.http_addr().unwrap();
    let log = CallLog::default();
    let mut m = TestPlugin::new("m", &log)
        .handler("ok", Hook::EntryAfterCreate, None, 10)
        .handler("bad", Hook::EntryAfterCreate, None, 20);
    m.set("bad", Behaviour::Fail(400));
    m.start(&server).await;
    wait_registered(&bus, &["m"]).await;
    let publisher = Publisher::new(js.clone(), Subjects::default());
    for i in 0..3 {
        publisher
            .publish(&entry_event(Hook::EntryAfterCreate, "customer", i))
            .await
            .unwrap();
    }
    assert_eventually!(bus.stats.events_acked.get() == 3, WAIT);

    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"hookbus_handler_deliveries_total{plugin="m",handler="ok"} 3"#,
        r#"hookbus_handler_successes_total{plugin="m",handler="ok"} 3"#,
        r#"hookbus_handler_errors_total{plugin="m",handler="bad"} 3"#,
        r#"hookbus_handler_dead_letters_total{plugin="m",handler="bad"} 3"#,
        r#"hookbus_handler_retries_total{plugin="m",handler="bad"} 0"#,
        r#"hookbus_handler_latency_seconds_count{plugin="m",handler="ok"} 3"#,
        r#"hookbus_handler_lag_events{plugin="m",handler="ok"} 0"#,
        "hookbus_events_acked_total 3",
        "hookbus_dispatcher_running 1",
        "hookbus_stream_last_seq 3",
    ] {
        assert!(body.contains(line), "missing {line} in\n{body}");
    }

    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["dispatcher_running"], true);
    // Pinned-client consumers on NATS 2.11+, not on 2.10.
    assert_eq!(
        v["dispatcher_pinned"],
        hookbus::dispatch::supports_pinning(&client),
        "{body}"
    );
    assert_eq!(
        v["plugins"]["m"]["last_error"],
        "handler error 400: test failure 400"
    );
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut c = config(&["m"]);
    c.dispatcher.metrics = false;
    let bus = start_bus(&server, c).await;
    let log = CallLog::default();
    let mut m = TestPlugin::new("m", &log).handler("ok", Hook::EntryAfterCreate, None, 10);
    m.start(&server).await;
    wait_registered(&bus, &["m"]).await;
    Publisher::new(js, Subjects::default())
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    assert_eq!(bus.stats.delivered.get(), 1, "totals are always counted");
    assert!(bus.stats.handlers.all().is_empty(), "no per-handler stats");
    assert!(
        bus.metrics
            .encode()
            .contains("hookbus_events_acked_total 1")
    );
    bus.stop().await.unwrap();
}

/// Collects alerts published on `pagoda.alerts.>`.
async fn alert_log(client: &async_nats::Client) -> Arc<std::sync::Mutex<Vec<AlertEvent>>> {
    let mut sub = client.subscribe("pagoda.alerts.>").await.unwrap();
    client.flush().await.unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let event: AlertEvent = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(
                msg.subject.as_str(),
                format!("pagoda.alerts.{}.{}", event.plugin, event.kind.as_str())
            );
            l.lock().unwrap().push(event);
        }
    });
    log
}

async fn wait_checks(bus: &Bus, more: u64) {
    let target = bus.health.checks() + more;
    assert_eventually!(bus.health.checks() >= target, WAIT);
}

#[tokio::test]
async fn no_replica_alert_fires_once_and_resolves_once() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let alerts = alert_log(&client).await;
    let bus = start_bus(&server, config(&["al"])).await;
    let plugin = sdk_plugin("al", &[("h", 100, None)]);
    let running = serve(&plugin, &server).await;
    wait_registered(&bus, &["al"]).await;
    wait_checks(&bus, 3).await;
    assert!(
        alerts.lock().unwrap().is_empty(),
        "{:?}",
        alerts.lock().unwrap()
    );

    running.shutdown().await.unwrap();
    let firing = wait_for(WAIT, || async { alerts.lock().unwrap().first().cloned() }).await;
    assert_eq!(firing.plugin, "al");
    assert_eq!(firing.kind, AlertKind::NoReplica);
    assert_eq!(firing.state, AlertState::Firing);
    assert!(
        bus.health
            .report()
            .alerts
            .iter()
            .any(|a| a.kind == AlertKind::NoReplica)
    );
    wait_checks(&bus, 3).await;
    assert_eq!(alerts.lock().unwrap().len(), 1, "fired once, not per check");

    let _again = serve(&plugin, &server).await;
    assert_eventually!(alerts.lock().unwrap().len() >= 2, WAIT);
    wait_checks(&bus, 3).await;
    let all = alerts.lock().unwrap().clone();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[1].kind, AlertKind::NoReplica);
    assert_eq!(all[1].state, AlertState::Resolved);
    assert!(bus.health.report().alerts.is_empty());
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn continuously_failing_plugin_is_degraded_and_keeps_its_deliveries() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let alerts = alert_log(&client).await;
    let mut c = config(&["d"]);
    c.monitor.degraded_after = Duration::from_millis(300);
    let bus = start_bus(&server, c).await;
    let log = CallLog::default();
    let mut d = TestPlugin::new("d", &log).handler("h", Hook::EntryAfterCreate, None, 10);
    // Fails for about 1.5 s: long enough to be degraded.
    d.manifest.handlers[0].retry_backoff_ms = vec![150; 10];
    d.set("h", Behaviour::Fail(500));
    d.start(&server).await;
    wait_registered(&bus, &["d"]).await;
    Publisher::new(js.clone(), Subjects::default())
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(
        bus.health.report().plugins["d"].degraded,
        WAIT,
        "plugin d is never degraded"
    );
    assert_eventually!(
        alerts
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.kind == AlertKind::Degraded && a.state == AlertState::Firing),
        WAIT
    );
    // Its delivery is not lost: all attempts made, then dead-lettered.
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    assert_eq!(log.count("d", "h"), 11);
    assert_eq!(common::dead_letters(&js).await.len(), 1);
    // A success ends it.
    d.set("h", Behaviour::Ok);
    Publisher::new(js.clone(), Subjects::default())
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 2))
        .await
        .unwrap();
    assert_eventually!(!bus.health.report().plugins["d"].degraded, WAIT);
    bus.stop().await.unwrap();
}

#[test]
fn every_ops_command_has_help_with_examples() {
    for cmd in [
        &["tail", "--help"][..],
        &["registry", "--help"],
        &["dlq", "--help"],
        &["health", "--help"],
    ] {
        let out = Command::new(hookbus_tests::hookbus_binary())
            .args(cmd)
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = text(&out.stdout);
        assert!(help.contains("Examples:"), "{cmd:?}: {help}");
    }
}

/// `hookbus provision` names every stream and bucket that exists after it ran:
/// what it says is what it creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookbus_provision_names_everything_it_creates() {
    init_tracing();
    let server = NatsServer::start().await;
    let out = run_cli(&server, &["provision"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let js = async_nats::jetstream::new(server.connect().await);
    let mut names = js.stream_names();
    let mut created = Vec::new();
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        created.push(name.unwrap());
    }
    assert!(created.len() >= 8, "{created:?}");
    for stream in created {
        let said = stream.strip_prefix("KV_").unwrap_or(&stream);
        assert!(
            stdout.contains(said),
            "{stream} exists but is not named: {stdout}"
        );
    }
}
