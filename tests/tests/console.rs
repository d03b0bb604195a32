//! The operator console (`hookbus console`) in a real browser: nats-server in
//! the production profile, the host's store (SQLite) with a superuser's and a
//! normal user's tokens, an in-process bus, two SDK plugins (one whose handler
//! fails until the test says otherwise, so its deliveries are dead-lettered),
//! the real `hookbus console` binary, and headless Chromium driven by
//! `tests/browser/console.mjs` (playwright-core): sign in, every tab, a live
//! event, an event's journey, a dead letter replayed and the rest purged, each
//! after its confirmation. The test then checks that the plugin got the
//! replayed event, that the dead letters are gone and the audit trail names the
//! console's user; and, over HTTP, that reads and writes without a token or
//! with a normal user's token are refused (401, 403).
//!
//! A second test runs the console in-process: it does not start on a database
//! without the host's tables, refuses revoked tokens and inactive users at once
//! (401), refuses a live tail beyond its limit (503), and answers unknown routes
//! and methods with JSON errors.
//!
//! `UPDATE_SCREENSHOTS=1` makes the browser script write the screenshots of
//! `docs/console/`.
#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_events::{Hook, Subjects};
use hookbus::Publisher;
use hookbus::config::BusConfig;
use hookbus::run::Bus;
use hookbus_tests::deploy::{PROCESS_WAIT, Process, SCRUBBED_ENV};
use hookbus_tests::host::user_with_token;
use hookbus_tests::{
    BUS_USER, NatsServer, ServeOn, TestDb, assert_eventually, init_tracing, wait_for,
    workspace_root,
};
use pagoda_plugin_sdk::{EntryContext, Handler, HandlerError, Plugin, ServeOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Chromium and playwright-core, installed by `tests/setup/ensure-tools.sh`
/// (its browser step) when missing: the browser's path.
fn ensure_browser(root: &Path) -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM_BIN")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let modules = root.join("tests/browser/node_modules/playwright-core");
    if !chromium.exists() || !modules.exists() {
        let status = std::process::Command::new("bash")
            .arg("-c")
            .arg("HOOKBUS_ENSURE=browser source tests/setup/ensure-tools.sh")
            .current_dir(root)
            .status()
            .expect("bash runs");
        assert!(
            status.success(),
            "tests/setup/ensure-tools.sh (browser) failed"
        );
    }
    assert!(
        chromium.exists(),
        "no Chromium at {} (apt-get install chromium, as root; or set CHROMIUM_BIN)",
        chromium.display()
    );
    assert!(
        modules.exists(),
        "playwright-core is missing: (cd tests/browser && npm ci)"
    );
    chromium
}

/// What the failing plugin saw: ids of the events it handled with success,
/// with whether the delivery was a replay.
#[derive(Debug, Default)]
struct Seen {
    succeeded: Mutex<Vec<(String, bool)>>,
    failing: AtomicBool,
}

fn plugins(seen: &Arc<Seen>) -> (Plugin, Plugin) {
    let audit = Plugin::builder("audit", "Audit", "1.2.0")
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("record").priority(10),
            |_ctx: EntryContext| async { Ok(()) },
        )
        .build()
        .unwrap();
    let seen = seen.clone();
    let sync = Plugin::builder("shop-sync", "Shop sync", "0.9.1")
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("push")
                .priority(50)
                .retry_backoff_ms([20, 40]),
            move |ctx: EntryContext| {
                let seen = seen.clone();
                async move {
                    if seen.failing.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient("shop API answered 503"));
                    }
                    seen.succeeded
                        .lock()
                        .unwrap()
                        .push((ctx.event_id().to_string(), ctx.is_replay));
                    Ok(())
                }
            },
        )
        .on_entity(
            Hook::EntityAfterUpdate,
            Handler::named("schema").entities(["customer"]),
            |_ctx: pagoda_plugin_sdk::EntityContext| async { Ok(()) },
        )
        .build()
        .unwrap();
    (audit, sync)
}

/// Publishes an entry.after_create event with a traceparent; its event id.
async fn publish(publisher: &Publisher, entity: &str, id: i64) -> String {
    let mut event = core_events::sample::entry_event(Hook::EntryAfterCreate, entity, id);
    event.traceparent = Some(format!("00-{TRACE_ID}-00f067aa0ba902b7-01"));
    publisher.publish(&event).await.unwrap();
    event.id.to_string()
}

/// Starts `hookbus console` on any free port; its process and base URL.
async fn start_console(server: &NatsServer, db: &TestDb) -> (Process, String) {
    let mut command = tokio::process::Command::new(hookbus_tests::hookbus_binary());
    for var in SCRUBBED_ENV {
        command.env_remove(var);
    }
    command
        .args([
            "console",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
        ])
        .envs(server.env_for(BUS_USER))
        .env("RUST_LOG", "info");
    let console = Process::spawn("hookbus console", command);
    let base = wait_for(PROCESS_WAIT, || async {
        console.lines().iter().find_map(|l| {
            let rest = &l[l.find("serving on http://")? + "serving on ".len()..];
            Some(
                rest.split_whitespace()
                    .next()?
                    .trim_end_matches('/')
                    .to_owned(),
            )
        })
    })
    .await;
    (console, base)
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut req = http.request(method, url).json(&serde_json::json!({}));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Token {t}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn console_in_a_browser_replays_and_purges_dead_letters() {
    init_tracing();
    let root = workspace_root();
    let chromium = ensure_browser(&root);
    let server = NatsServer::start_for(&["audit", "shop-sync"]).await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let (_, admin) = user_with_token(&store, "admin", true).await;
    let (_, viewer) = user_with_token(&store, "viewer", false).await;

    let mut config = BusConfig {
        enabled_plugins: vec!["audit".into(), "shop-sync".into()],
        ..Default::default()
    };
    config.dispatcher.ack_wait = Duration::from_secs(2);
    config.monitor.interval = Duration::from_millis(200);
    config.http_addr = None;
    let bus = Bus::start(server.connect_as(BUS_USER).await, config)
        .await
        .unwrap();
    let seen = Arc::new(Seen::default());
    seen.failing.store(true, Ordering::SeqCst);
    let (audit, sync) = plugins(&seen);
    let _audit = audit
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    let _sync = sync
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    bus.registry
        .wait_for(WAIT, |t| t.is_enabled("audit") && t.is_enabled("shop-sync"))
        .await
        .unwrap();

    // Three events; shop-sync/push fails each one three times: three dead letters.
    let operator = server.connect().await;
    let js = async_nats::jetstream::new(operator.clone());
    let publisher = Publisher::new(js.clone(), Subjects::default());
    let first = publish(&publisher, "customer", 1).await;
    publish(&publisher, "customer", 2).await;
    let product = publish(&publisher, "product", 3).await;
    let letters = wait_for(WAIT, || async {
        let l = hookbus::dlq::list(
            &js,
            &Subjects::default(),
            &hookbus::dlq::Filter::plugin("shop-sync"),
            None,
        )
        .await
        .unwrap();
        (l.len() == 3).then_some(l)
    })
    .await;
    let replayed = letters
        .iter()
        .find(|l| l.body["event_id"] == first.as_str())
        .unwrap();
    seen.failing.store(false, Ordering::SeqCst);

    let (mut console, base) = start_console(&server, &db).await;
    let http = reqwest::Client::new();

    // Without a token, with a malformed header, or as a normal user: refused,
    // reads and writes alike, and nothing replayed or purged.
    let replay_url = format!("{base}/api/console/dlq/{}/replay", replayed.seq);
    let purge_url = format!("{base}/api/console/dlq/purge");
    let (status, body) = call(&http, reqwest::Method::POST, &replay_url, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "not_authenticated", "{body}");
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        &replay_url,
        Some("hb_not_a_key"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("invalid token"),
        "{body}"
    );
    for (method, url) in [
        (reqwest::Method::POST, replay_url.as_str()),
        (reqwest::Method::POST, purge_url.as_str()),
        (reqwest::Method::GET, &format!("{base}/api/console/dlq")),
        (reqwest::Method::GET, &format!("{base}/api/console/plugins")),
    ] {
        let (status, body) = call(&http, method.clone(), url, Some(&viewer)).await;
        assert_eq!(status, 403, "{method} {url}: {body}");
        assert_eq!(body["error"], "permission_denied", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("viewer"),
            "{body}"
        );
    }
    let (status, _) = call(&http, reqwest::Method::POST, &purge_url, None).await;
    assert_eq!(status, 401);
    assert_eq!(
        hookbus::dlq::count(&js, &Subjects::default(), &Default::default())
            .await
            .unwrap(),
        3,
        "a refused request changed the dead letters"
    );
    assert!(seen.succeeded.lock().unwrap().is_empty());
    // Bad input: a clear 400, the console stays up.
    let (status, body) = call(
        &http,
        reqwest::Method::GET,
        &format!("{base}/api/console/events?hook=entry.after_creat"),
        Some(&admin),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("after_create"),
        "{body}"
    );
    let (status, body) = call(&http, reqwest::Method::POST, &purge_url, Some(&admin)).await;
    assert_eq!(status, 400, "{body}");

    // The browser.
    let screenshots = (std::env::var("UPDATE_SCREENSHOTS").as_deref() == Ok("1"))
        .then(|| root.join("docs/console"));
    let mut node = tokio::process::Command::new("node");
    node.arg(root.join("tests/browser/console.mjs"))
        .current_dir(root.join("tests/browser"))
        .env("CONSOLE_URL", &base)
        .env("CONSOLE_TOKEN", &admin)
        .env("CHROMIUM_BIN", &chromium)
        .env("REPLAY_SEQ", replayed.seq.to_string())
        .env("EVENT_SEQ", replayed.body["stream_seq"].to_string())
        .env("TRACE_ID", TRACE_ID)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(dir) = &screenshots {
        node.env("SCREENSHOT_DIR", dir);
    }
    let mut node = node.spawn().expect("node runs (Node.js 20 or newer)");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("browser: {line}");
            // The live tail follows: an event published now must show up.
            if line == "tail-following" {
                let id = publish(&publisher, "customer", 4).await;
                eprintln!("published event {id} for the live tail");
            }
            out.push(line);
        }
        node.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser script did not finish within 90 s");
    assert!(
        status.success(),
        "the browser script failed:\n{}\n{}",
        out.join("\n"),
        console.output()
    );
    assert!(out.iter().any(|l| l == "done"), "{}", out.join("\n"));

    // The replays (one by one, then the product's by filter) reached the plugin,
    // as replays; the third was purged without being delivered again.
    assert_eventually!(
        seen.succeeded
            .lock()
            .unwrap()
            .iter()
            .any(|(id, replay)| *id == first && *replay)
            && seen
                .succeeded
                .lock()
                .unwrap()
                .iter()
                .any(|(id, replay)| *id == product && *replay),
        WAIT,
        "shop-sync did not get the replayed event: {:?}",
        seen.succeeded.lock().unwrap()
    );
    let replays = seen
        .succeeded
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, replay)| *replay)
        .count();
    assert_eq!(replays, 2, "{:?}", seen.succeeded.lock().unwrap());
    assert_eq!(
        hookbus::dlq::count(&js, &Subjects::default(), &Default::default())
            .await
            .unwrap(),
        0
    );
    // The audit trail names the console's user.
    let audit_stream = js
        .get_stream(Subjects::default().audit_stream())
        .await
        .unwrap();
    for action in ["dlq.replay", "dlq.purge"] {
        let msg = audit_stream
            .get_last_raw_message_by_subject(&Subjects::default().audit(action))
            .await
            .unwrap();
        let record: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(record["actor"], "console:admin", "{record}");
    }
    assert!(console.is_running(), "{}", console.output());
    let violations: Vec<String> = std::fs::read_to_string(server.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(violations.is_empty(), "{violations:?}");
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn console_needs_the_hosts_tables_and_limits_live_tails() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect_as(BUS_USER).await;
    hookbus::provision::provision(
        &async_nats::jetstream::new(server.connect().await),
        &Subjects::default(),
        &Default::default(),
    )
    .await
    .unwrap();
    let config = hookbus_console::ConsoleConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        max_tails: 1,
        ..Default::default()
    };

    // A database without the host's tables: no start, and it says why.
    let empty = TestDb::sqlite();
    let store = store::Store::connect(empty.url()).await.unwrap();
    let err = hookbus_console::Console::start(client.clone(), store, config.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, hookbus_console::ConsoleError::Store(_)),
        "{err}"
    );

    let db = TestDb::sqlite();
    let store = db.store().await;
    let (_, admin) = user_with_token(&store, "admin", true).await;
    let (retired, retired_key) = user_with_token(&store, "retired", true).await;
    let (revoked, revoked_key) = store.create_token(retired.id, "second").await.unwrap();
    let console = hookbus_console::Console::start(client, store.clone(), config)
        .await
        .unwrap();
    let base = format!("http://{}", console.addr());
    let http = reqwest::Client::new();

    // A revoked token, an inactive superuser: 401, at once.
    let me = format!("{base}/api/console/me");
    let (status, body) = call(&http, reqwest::Method::GET, &me, Some(&revoked_key)).await;
    assert_eq!(
        (status.as_u16(), body["username"].as_str()),
        (200, Some("retired"))
    );
    store.revoke_token(revoked.id).await.unwrap();
    let (status, body) = call(&http, reqwest::Method::GET, &me, Some(&revoked_key)).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (401, Some("not_authenticated")),
        "{body}"
    );
    store
        .update_user(retired.id, |u| u.is_active = false)
        .await
        .unwrap();
    let (status, body) = call(&http, reqwest::Method::GET, &me, Some(&retired_key)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("inactive"),
        "{body}"
    );
    let tail = || {
        http.get(format!("{base}/api/console/events?back=0"))
            .header("Authorization", format!("Token {admin}"))
            .send()
    };
    let first = tail().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let second = tail().await.unwrap();
    assert_eq!(second.status(), 503);
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(body["error"], "unavailable", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("too many live tails"),
        "{body}"
    );
    drop(first);

    let (status, body) = call(
        &http,
        reqwest::Method::GET,
        &format!("{base}/api/console/nothing-here"),
        Some(&admin),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = call(
        &http,
        reqwest::Method::DELETE,
        &format!("{base}/api/console/dlq"),
        Some(&admin),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = call(
        &http,
        reqwest::Method::GET,
        &format!("{base}/api/console/dlq/twelve"),
        Some(&admin),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_input")),
        "{body}"
    );
    // The page itself needs no token; its API does.
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'self'")
    );
    assert!(page.text().await.unwrap().contains("/console.js"));
    tokio::time::timeout(WAIT, console.stop()).await.unwrap();
}
