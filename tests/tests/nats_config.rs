//! Least-privilege NATS users (`hookbus nats-config`) on a real nats-server
//! started with the generated `authorization` block: what a plugin cannot do,
//! and that the bus, the SDK and replay work with only their own permissions.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use common::*;
use core_events::{Hook, Subjects};
use futures::StreamExt;
use hookbus::Publisher;
use hookbus::nats_config;
use hookbus_tests::{assert_eventually, init_tracing};
use pagoda_plugin_sdk::replay::{ReplayOptions, replay_events};
use pagoda_plugin_sdk::{Plugin, ServeOptions, SyncHandler};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

/// Waits for a permission violation naming `subject`.
async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(e) = errors.recv().await {
            if e.to_lowercase().contains("permissions violation") && e.contains(subject) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "expected a permissions violation for {subject}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    init_tracing();
    let server = start_server(&["alpha"]).await;
    let refused = async_nats::ConnectOptions::new()
        .user_and_password("alpha".into(), "wrong".into())
        .connect(server.url())
        .await;
    assert!(refused.is_err(), "a wrong password must be refused");
    let anonymous = async_nats::connect(server.url()).await;
    assert!(anonymous.is_err(), "no anonymous access");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_cannot_act_as_bus_host_or_other_plugin() {
    init_tracing();
    let server = start_server(&["alpha", "beta"]).await;
    let (bus_client, _) = connect(&server, nats_config::BUS_USER).await;
    let bus = start_bus_on(&bus_client, &["alpha", "beta"]).await;
    let (alpha, mut errors) = connect(&server, "alpha").await;
    let js = jetstream::new(alpha.clone());

    // Publish an event: refused, and the stream stays empty.
    alpha
        .publish("pagoda.events.entry.after_create.customer.1", Bytes::new())
        .await
        .unwrap();
    expect_violation(&mut errors, "pagoda.events.entry.after_create.customer.1").await;
    let bus_js = jetstream::new(bus_client.clone());
    assert_eq!(stream_len(&bus_js, "PAGODA_EVENTS").await, 0);

    // Serve (impersonate) another plugin's endpoint or its $SRV verbs.
    let _sub = alpha.subscribe("pagoda.hooks.beta.h").await.unwrap();
    expect_violation(&mut errors, "pagoda.hooks.beta.h").await;
    let _sub = alpha
        .queue_subscribe("pagoda.hooks.beta.*", "beta".into())
        .await
        .unwrap();
    expect_violation(&mut errors, "pagoda.hooks.beta.*").await;
    let _sub = alpha.subscribe("$SRV.PING.beta").await.unwrap();
    expect_violation(&mut errors, "$SRV.PING.beta").await;
    // Call another plugin's endpoint or API route.
    alpha
        .publish("pagoda.hooks.beta.h", Bytes::new())
        .await
        .unwrap();
    expect_violation(&mut errors, "pagoda.hooks.beta.h").await;
    alpha
        .publish("pagoda.api.beta.x", Bytes::new())
        .await
        .unwrap();
    expect_violation(&mut errors, "pagoda.api.beta.x").await;
    // Read other users' replies, or other plugins' jobs (planned subjects).
    let _sub = alpha.subscribe("_INBOX.>").await.unwrap();
    expect_violation(&mut errors, "_INBOX.>").await;
    let _sub = alpha.subscribe("_INBOX_beta.>").await.unwrap();
    expect_violation(&mut errors, "_INBOX_beta.>").await;
    let _sub = alpha.subscribe("pagoda.jobs.beta.>").await.unwrap();
    expect_violation(&mut errors, "pagoda.jobs.beta.>").await;
    alpha
        .publish("$JS.API.CONSUMER.MSG.NEXT.PAGODA_JOBS.beta", Bytes::new())
        .await
        .unwrap();
    expect_violation(&mut errors, "$JS.API.CONSUMER.MSG.NEXT.PAGODA_JOBS.beta").await;
    // Touch the bus's dispatcher consumer (or unpin it), dead letters, deferred deliveries.
    for subject in [
        "$JS.API.CONSUMER.DELETE.PAGODA_EVENTS.dispatcher",
        "$JS.API.CONSUMER.MSG.NEXT.PAGODA_EVENTS.dispatcher",
        "$JS.API.CONSUMER.UNPIN.PAGODA_EVENTS.dispatcher",
        "$JS.API.STREAM.PURGE.PAGODA_EVENTS",
        // Nor tell the hosts to drop cached tokens.
        "pagoda.host.forget",
        "pagoda.dlq.beta.h",
        "pagoda.deferred.beta",
        "pagoda.alerts.beta.degraded",
    ] {
        alpha.publish(subject, Bytes::new()).await.unwrap();
        expect_violation(&mut errors, subject).await;
    }

    // A push consumer delivering events to another plugin's endpoint: NATS lets
    // it be created (no check of deliver subjects); the bus's guard deletes it.
    let stream = js.get_stream("PAGODA_EVENTS").await.unwrap();
    let push = stream
        .create_consumer(jetstream::consumer::push::Config {
            name: Some("sneaky".to_owned()),
            deliver_subject: "pagoda.hooks.beta.h".to_owned(),
            ..Default::default()
        })
        .await;
    if push.is_ok() {
        let deleted = nats_config::guard_push_consumers(&bus_js, &Subjects::default())
            .await
            .unwrap();
        assert_eq!(deleted, ["sneaky"]);
        let events = bus_js.get_stream("PAGODA_EVENTS").await.unwrap();
        assert!(events.consumer_info("sneaky").await.is_err());
    }

    // Write another plugin's registry entry: refused, nothing stored.
    let store = js.get_key_value("pagoda_registry").await.unwrap();
    let put = tokio::time::timeout(
        Duration::from_secs(3),
        store.put("plugins.beta", Bytes::from_static(b"{}")),
    )
    .await;
    assert!(!matches!(put, Ok(Ok(_))), "put of plugins.beta must fail");
    expect_violation(&mut errors, "$KV.pagoda_registry.plugins.beta").await;
    let bus_store = bus_js.get_key_value("pagoda_registry").await.unwrap();
    assert!(bus_store.get("plugins.beta").await.unwrap().is_none());
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_sdk_plugin_host_and_replay_work_with_their_own_permissions() {
    init_tracing();
    let server = start_server(&["alpha", "beta"]).await;
    let (bus_client, mut bus_errors) = connect(&server, nats_config::BUS_USER).await;
    let bus = start_bus_on(&bus_client, &["alpha", "beta"]).await;

    // The real SDK with the plugin's credentials: serves, registers, replies.
    let (alpha, mut alpha_errors) = connect(&server, "alpha").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let plugin = Plugin::builder("alpha", "Alpha", "1.0.0")
        .on_entry(Hook::EntryAfterCreate, "created", move |_ctx| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .unwrap();
    let running = plugin
        .serve(alpha.clone(), ServeOptions::default())
        .await
        .unwrap();
    wait_registered(&bus, &["alpha"]).await;

    // The host publishes events with its own credentials.
    let (host, mut host_errors) = connect(&server, nats_config::HOST_USER).await;
    let publisher = Publisher::new(jetstream::new(host.clone()), Subjects::default());
    for id in 1..=3 {
        publisher
            .publish(&entry_event(Hook::EntryAfterCreate, "customer", id))
            .await
            .unwrap();
    }
    assert_eventually!(calls.load(Ordering::SeqCst) == 3, WAIT, "3 deliveries");
    assert_eventually!(bus.stats.events_acked.get() == 3, WAIT, "3 events acked");

    // Replay of the events stream with the plugin's credentials.
    let js = jetstream::new(alpha.clone());
    let replay = replay_events(&js, &Subjects::default(), ReplayOptions::default())
        .await
        .unwrap();
    let replayed: Vec<_> = tokio::time::timeout(WAIT, replay.collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(replayed.len(), 3);
    assert!(replayed.iter().all(Result::is_ok), "{replayed:?}");

    running.shutdown().await.unwrap();
    bus.stop().await.unwrap();
    for (who, errors) in [
        ("bus", &mut bus_errors),
        ("alpha", &mut alpha_errors),
        ("host", &mut host_errors),
    ] {
        if let Ok(e) = errors.try_recv() {
            panic!("{who} got a server error with its own permissions: {e}");
        }
    }
}

/// A binary of the workspace (`cargo build --workspace --bins`; `./test.sh` does).
fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (./test.sh does)",
        bin.display()
    );
    bin
}

/// Kills a child process on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real binaries with `NATS_USER` / `NATS_PASSWORD`: `hookbus run` and the
/// `hello-world` plugin (SDK `run_main`) log in with their own users and
/// inbox prefixes, and an event published by the host reaches the plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_log_in_with_their_users() {
    init_tracing();
    let server = start_server(&["hello-world"]).await;
    let spawn = |bin: &str, args: &[&str], user: &str| {
        Killed(
            std::process::Command::new(binary(bin))
                .args(args)
                .env("NATS_URL", server.url())
                .env("NATS_USER", user)
                .env("NATS_PASSWORD", password(user))
                .env("ENABLED_PLUGINS", "hello-world")
                .env("HOOKBUS_HTTP_ADDR", "off")
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap(),
        )
    };
    let _bus = spawn("hookbus", &["run"], nats_config::BUS_USER);
    let _plugin = spawn("hello-world", &[], "hello-world");

    let (host, mut host_errors) = connect(&server, nats_config::HOST_USER).await;
    let stats = || {
        let host = host.clone();
        async move {
            let reply = host.request("pagoda.bus.stats", Bytes::new()).await.ok()?;
            serde_json::from_slice::<serde_json::Value>(&reply.payload).ok()
        }
    };
    // The bus answers once it runs; the plugin is routed once registered.
    assert_eventually!(
        stats().await.is_some(),
        WAIT,
        "the bus answers with its user"
    );
    let registered = || {
        let host = host.clone();
        async move {
            let Ok(reply) = host.request("pagoda.bus.registry", Bytes::new()).await else {
                return false;
            };
            serde_json::from_slice::<serde_json::Value>(&reply.payload)
                .ok()
                .and_then(|v| v["plugins"]["hello-world"]["enabled_rank"].as_u64())
                == Some(0)
        }
    };
    assert_eventually!(registered().await, WAIT, "hello-world registered itself");
    let publisher = Publisher::new(jetstream::new(host.clone()), Subjects::default());
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "helloworld", 10))
        .await
        .unwrap();
    // hello-world has two handlers for entry.after_create on "helloworld".
    assert_eventually!(
        stats()
            .await
            .is_some_and(|s| s["delivered"] == 2 && s["events_acked"] == 1),
        WAIT,
        "both handlers ran: {:?}",
        stats().await
    );
    assert!(host_errors.try_recv().is_err(), "no violation for the host");
}

/// A server `max_payload` smaller than docker/'s 2 MB, so the size tests move
/// less data; the limits are read from the server either way.
const SMALL_MAX_PAYLOAD: usize = 256 * 1024;

/// A response body for messages, without its long notes.
fn short(body: &serde_json::Value) -> String {
    let text = body.to_string();
    text.chars().take(400).collect()
}

async fn count(store: &store::Store, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// The host's relay under the host user: a row it cannot publish is
/// dead-lettered (a subject the generated permissions allow it), and the rows
/// behind it are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_relay_dead_letters_a_bad_row_under_its_own_user_and_the_rest_flows() {
    use store::outbox;
    init_tracing();
    let server = start_server(&[]).await;
    let (host, mut host_errors) = connect(&server, nats_config::HOST_USER).await;
    let (bus, _) = connect(&server, nats_config::BUS_USER).await;
    let db = hookbus_tests::TestDb::sqlite();
    let store = db.store().await;
    let subjects = Subjects::default();
    let js = jetstream::new(host.clone());
    hookbus::provision::provision(&js, &subjects, &Default::default())
        .await
        .unwrap();
    let relay = hookbus::relay::Relay::new(
        store.clone(),
        js,
        subjects.clone(),
        hookbus::relay::RelaySettings::for_backend(store.backend()),
    );
    let stats = relay.stats();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));

    // A foreign host's row with an unknown hook, then good rows.
    sqlx::query(
        "INSERT INTO hookbus_outbox (event_id, hook, entity, object, payload) \
         VALUES ('0193a5f0-8c1e-7d2a-9b4f-5e6d7c8b9a01', 'entry.after_craete', 'x', 'entry/1', '{}')",
    )
    .execute(store.writer())
    .await
    .unwrap();
    for id in 1..=3 {
        let mut tx = store.begin().await.unwrap();
        outbox::insert_envelope(
            &mut tx,
            &entry_event(Hook::EntryAfterCreate, "customer", id),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    store.outbox_written().notify_one();
    assert_eventually!(
        outbox::backlog(store.pool()).await.unwrap().rows == 0,
        WAIT,
        "the outbox drained: {}",
        stats.to_json()
    );
    let bus_js = jetstream::new(bus.clone());
    assert_eq!(stream_len(&bus_js, "PAGODA_EVENTS").await, 3);
    let letters = hookbus::dlq::list(
        &bus_js,
        &subjects,
        &hookbus::dlq::Filter::plugin("_relay"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(stats.invalid.load(Ordering::Relaxed), 1);
    stop.cancel();
    task.await.unwrap().unwrap();
    if let Ok(e) = host_errors.try_recv() {
        panic!("the host's relay got a server error: {e}");
    }
    // Only its relay's dead letters: not a plugin's.
    host.publish("pagoda.dlq.alpha.h", Bytes::new())
        .await
        .unwrap();
    expect_violation(&mut host_errors, "pagoda.dlq.alpha.h").await;
}

/// Under the generated users and a server `max_payload` of 256 KiB, on both
/// databases: a write whose event NATS cannot take is refused before commit
/// with 413 naming the size and the limit (from the server), and nothing is
/// stored; an event of exactly the limit is written and reaches a plugin; a
/// synchronous hook's request that cannot fit is a 413 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_larger_than_nats_takes_is_refused_with_413_before_commit() {
    use hookbus_tests::host::{TestHost, call};
    use reqwest::{Method, StatusCode};
    use serde_json::json;
    init_tracing();
    for backend in [store::Backend::Sqlite, store::Backend::Postgres] {
        let server =
            start_server_with(&["sizes"], &format!("max_payload: {SMALL_MAX_PAYLOAD}")).await;
        let (bus_client, _) = connect(&server, nats_config::BUS_USER).await;
        let bus = start_bus_on(&bus_client, &["sizes"]).await;
        let notes = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let seen = notes.clone();
        let plugin = Plugin::builder("sizes", "Sizes", "1.0.0")
            .on_entry(Hook::EntryAfterCreate, "created", move |ctx| {
                seen.lock().unwrap().push(ctx.event.data.entry.note.len());
                async { Ok(()) }
            })
            .on_validate(
                SyncHandler::named("check").entities(["checked"]),
                |_ctx| async { Ok(vec![]) },
            )
            .build()
            .unwrap();
        let (plugin_client, _) = connect(&server, "sizes").await;
        let running = plugin
            .serve(plugin_client, ServeOptions::default())
            .await
            .unwrap();
        wait_registered(&bus, &["sizes"]).await;
        let db = hookbus_tests::TestDb::new(backend).await;
        let (host_client, mut host_errors) = connect(&server, nats_config::HOST_USER).await;
        let h = TestHost::start_on(host_client, &db, |c| {
            c.enabled_plugins = vec!["sizes".to_owned()];
        })
        .await;
        h.wait_registered(&["sizes"]).await;
        // From the server's INFO (smaller than the stream's 1 MiB), less header room.
        let limit = SMALL_MAX_PAYLOAD - hookbus::publish::HEADER_ROOM;

        // An entity whose note makes its event too large.
        let (status, body) = call(
            h.as_admin(Method::POST, "/api/v2/entities/")
                .json(&json!({"name": "big", "note": "n".repeat(limit)})),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{backend:?}: {}",
            short(&body)
        );
        assert_eq!(body["error"], "payload_too_large");
        assert_eq!(body["limit"], limit);
        assert!(
            body["size"].as_u64().unwrap() > limit as u64,
            "{}",
            short(&body)
        );
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(&limit.to_string()), "{}", short(&body));
        assert!(message.contains("entity.after_create"), "{}", short(&body));

        let (status, entity) = call(
            h.as_admin(Method::POST, "/api/v2/entities/")
                .json(&json!({"name": "customer"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{}", short(&entity));
        let entries = format!("/api/v2/entities/{}/entries/", entity["id"]);
        // Too large by 100 bytes: the 413 says by how much.
        let over = limit + 100;
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "e1", "note": "x".repeat(over)})),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", short(&body));
        let size = usize::try_from(body["size"].as_u64().unwrap()).unwrap();
        // The same entry with a note `size - limit` shorter: exactly the limit.
        let fits = over - (size - limit);
        let (status, e1) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "e1", "note": "x".repeat(fits)})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{backend:?}: {}", short(&e1));
        // One byte more: refused.
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "e2", "note": "x".repeat(fits + 1)})),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", short(&body));
        assert_eq!(body["size"], limit + 1);
        // The event of exactly the limit reaches the plugin, through the relay
        // and the bus, each with its own user.
        assert_eventually!(
            notes.lock().unwrap().as_slice() == [fits],
            WAIT,
            "{backend:?}: the plugin got {:?}",
            notes.lock().unwrap()
        );
        // Renaming e1 would emit the entry twice (now and before): refused.
        let path = format!("/api/v2/entries/{}/", e1["id"]);
        let (status, body) = call(
            h.as_user(Method::PATCH, &path)
                .json(&json!({"name": "e1-renamed"})),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", short(&body));
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("entry.after_update")
        );

        // A validator's request that cannot fit in one message: 413, not 503.
        let (status, checked) = call(
            h.as_admin(Method::POST, "/api/v2/entities/")
                .json(&json!({"name": "checked"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{}", short(&checked));
        let (status, body) = call(
            h.as_user(
                Method::POST,
                &format!("/api/v2/entities/{}/entries/", checked["id"]),
            )
            .json(&json!({"name": "c", "note": "x".repeat(limit)})),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", short(&body));
        assert_eq!(body["hook"], "entry.validate", "{}", short(&body));
        assert_eq!(body["limit"], limit);

        // Nothing refused was stored; every stored change has its one event.
        let store = h.store();
        assert_eq!(
            count(store, "SELECT COUNT(*) FROM entities WHERE name = 'big'").await,
            0
        );
        assert_eq!(count(store, "SELECT COUNT(*) FROM entries").await, 1);
        assert_eq!(
            count(store, "SELECT COUNT(*) FROM entries WHERE name = 'e1'").await,
            1
        );
        let bus_js = jetstream::new(bus_client.clone());
        assert_eventually!(
            count(store, "SELECT COUNT(*) FROM hookbus_outbox").await == 0
                && stream_len(&bus_js, "PAGODA_EVENTS").await == 3,
            WAIT,
            "{backend:?}: 3 events (customer, e1, checked)"
        );
        if let Ok(e) = host_errors.try_recv() {
            panic!("the host got a server error: {e}");
        }
        h.stop().await;
        running.shutdown().await.unwrap();
        bus.stop().await.unwrap();
    }
}
