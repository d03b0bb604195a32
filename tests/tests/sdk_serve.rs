//! The SDK against a real nats-server: registration, the Services API, replies,
//! error codes, isolation of bad payloads and panics, replicas, graceful shutdown.
#![allow(clippy::unwrap_used)]

mod sdk_common;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::service::{Info, PingResponse, Stats};
use core_events::Subjects;
use core_events::protocol::{HandlerReply, headers};
use hookbus_tests::NatsServer;
use pagoda_plugin_sdk::{
    EntityContext, EntryContext, Handler, HandlerError, Hook, Plugin, PluginManifest, ServeError,
    ServeOptions,
};
use sdk_common::{
    create_registry, deliver, delivery_headers, entity_event, entry_event, eventually,
    service_error, until_nobody_answers,
};
use tokio::sync::mpsc;

const ID: &str = "probe";

/// What a probe handler saw.
#[derive(Debug)]
struct Seen {
    handler: String,
    event_id: String,
    attempt: u32,
    stream_seq: u64,
    pagodaseq: Option<u64>,
    is_replay: bool,
    traceparent: Option<String>,
    entity: String,
}

fn seen_entry(ctx: &EntryContext) -> Seen {
    Seen {
        handler: ctx.handler.to_string(),
        event_id: ctx.event_id().to_string(),
        attempt: ctx.attempt,
        stream_seq: ctx.stream_seq,
        pagodaseq: ctx.event.pagodaseq,
        is_replay: ctx.is_replay,
        traceparent: ctx.traceparent.clone(),
        entity: ctx.entity().to_owned(),
    }
}

/// A plugin with one handler of each behaviour; successes are reported on `tx`.
fn probe(tx: mpsc::UnboundedSender<Seen>) -> Plugin {
    let tx2 = tx.clone();
    let tx3 = tx.clone();
    Plugin::builder(ID, "Probe", "1.2.3")
        .description("test plugin")
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("record").priority(10),
            move |ctx: EntryContext| {
                let tx = tx.clone();
                async move {
                    tx.send(seen_entry(&ctx)).unwrap();
                    Ok(())
                }
            },
        )
        .on_entry(
            "after_update_entry_v2",
            "reject",
            |_ctx: EntryContext| async { Err(HandlerError::permanent("bad data: no name")) },
        )
        .on_entry(
            Hook::EntryAfterDelete,
            "flaky",
            |_ctx: EntryContext| async { Err(HandlerError::transient("database is down")) },
        )
        .on_entry(
            Hook::EntryAfterRestore,
            "explode",
            |_ctx: EntryContext| async {
                panic!("boom");
            },
        )
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("customers_only").entities(["customer"]),
            move |ctx: EntryContext| {
                let tx = tx2.clone();
                async move {
                    tx.send(seen_entry(&ctx)).unwrap();
                    Ok(())
                }
            },
        )
        .on_entity(
            Hook::EntityAfterCreate,
            "entity_record",
            move |ctx: EntityContext| {
                let tx = tx3.clone();
                async move {
                    tx.send(Seen {
                        handler: ctx.handler.to_string(),
                        event_id: ctx.event_id().to_string(),
                        attempt: ctx.attempt,
                        stream_seq: ctx.stream_seq,
                        pagodaseq: ctx.event.pagodaseq,
                        is_replay: ctx.is_replay,
                        traceparent: ctx.traceparent.clone(),
                        entity: ctx.event.data.entity.name.clone(),
                    })
                    .unwrap();
                    Ok(())
                }
            },
        )
        .build()
        .unwrap()
}

fn subject(handler: &str) -> String {
    Subjects::default().handler(ID, handler)
}

fn quick_options() -> ServeOptions {
    ServeOptions {
        registry_wait: Duration::from_secs(5),
        ..ServeOptions::default()
    }
}

async fn srv<T: serde::de::DeserializeOwned>(client: &async_nats::Client, subject: String) -> T {
    let reply = client.request(subject, "".into()).await.unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn stats(client: &async_nats::Client) -> HashMap<String, (usize, usize)> {
    let stats: Stats = srv(client, format!("$SRV.STATS.{ID}")).await;
    stats
        .endpoints
        .into_iter()
        .map(|e| (e.name, (e.requests, e.errors)))
        .collect()
}

#[test]
fn build_rejects_bad_manifests_with_pagodas_messages() {
    let err = Plugin::builder("", " ", "").build().unwrap_err();
    assert_eq!(
        err.problems,
        [
            "Plugin ID is required",
            "Plugin name is required",
            "Plugin version is required"
        ]
    );
    let err = Plugin::builder("bad id!", "x", "1").build().unwrap_err();
    assert!(err.problems.contains(
        &"Plugin ID must contain only alphanumeric characters, hyphens, and underscores".to_owned()
    ));
    assert!(err.to_string().contains("semantic version"), "{err}");

    let err = Plugin::builder("p", "P", "1.0.0")
        .on_entry("after_create_entry", "h", |_: EntryContext| async {
            Ok(())
        })
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("h2").entities(Vec::<String>::new()),
            |_: EntryContext| async { Ok(()) },
        )
        .on_entry(Hook::EntryAfterUpdate, "h2", |_: EntryContext| async {
            Ok(())
        })
        .build()
        .unwrap_err();
    let msg = err.to_string();
    for needle in [
        "invalid plugin manifest for 'p'",
        "unknown hook 'after_create_entry'",
        "valid hooks: entry.before_create, entry.after_create",
        "entities is an empty list",
        "the name is used by another handler",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_registers_and_answers_the_services_api() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let plugin = probe(tx);
    let running = plugin.serve(client.clone(), quick_options()).await.unwrap();

    // (b) the manifest is in the registry, readable by the bus.
    let stored = registry.get("plugins.probe").await.unwrap().unwrap();
    let manifest = PluginManifest::from_json(&stored).unwrap();
    assert_eq!(&manifest, plugin.manifest());
    let names: Vec<_> = manifest.handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "record",
            "reject",
            "flaky",
            "explode",
            "customers_only",
            "entity_record"
        ]
    );
    assert_eq!(manifest.handlers[1].hook, Hook::EntryAfterUpdate);

    // (c) PING, INFO and STATS.
    let ping: PingResponse = srv(&client, format!("$SRV.PING.{ID}")).await;
    assert_eq!((ping.name.as_str(), ping.version.as_str()), (ID, "1.2.3"));
    let info: Info = srv(&client, format!("$SRV.INFO.{ID}")).await;
    assert_eq!(info.description, "test plugin");
    assert_eq!(info.endpoints.len(), 6);
    let record = info.endpoints.iter().find(|e| e.name == "record").unwrap();
    assert_eq!(record.subject, "pagoda.hooks.probe.record");
    assert_eq!(record.queue_group, ID);
    assert_eq!(record.metadata["hook"], "entry.after_create");
    assert_eq!(record.metadata["priority"], "10");
    assert_eq!(record.metadata["entities"], "*");
    let filtered = info
        .endpoints
        .iter()
        .find(|e| e.name == "customers_only")
        .unwrap();
    assert_eq!(filtered.metadata["entities"], "customer");
    assert_eq!(filtered.metadata["priority"], "100");

    let before = stats(&client).await;
    assert_eq!(before.len(), 6);
    assert_eq!(before["record"], (0, 0));
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    deliver(
        &client,
        subject("record"),
        &env,
        delivery_headers(&env, ID, "record", 1, 1),
    )
    .await;
    let env = entry_event(Hook::EntryAfterUpdate, "customer");
    deliver(
        &client,
        subject("reject"),
        &env,
        delivery_headers(&env, ID, "reject", 2, 1),
    )
    .await;
    let after = stats(&client).await;
    assert_eq!(after["record"], (1, 0));
    assert_eq!(after["reject"], (1, 1));

    running.shutdown().await.unwrap();
    // On shutdown the manifest stays; the service is gone.
    assert!(registry.get("plugins.probe").await.unwrap().is_some());
    until_nobody_answers(&client, &format!("$SRV.PING.{ID}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_reach_typed_handlers_and_errors_carry_codes() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let running = probe(tx)
        .serve(client.clone(), quick_options())
        .await
        .unwrap();

    // (d) a valid delivery: attempt and sequence come from the headers.
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let mut h = delivery_headers(&env, ID, "record", 42, 3);
    h.insert(headers::REPLAY, "true");
    h.insert(
        headers::TRACEPARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let reply = deliver(&client, subject("record"), &env, h).await;
    assert_eq!(service_error(&reply), None);
    assert!(reply.payload.is_empty());
    let seen = rx.recv().await.unwrap();
    assert_eq!(seen.handler, "record");
    assert_eq!(seen.event_id, env.id.to_string());
    assert_eq!((seen.attempt, seen.stream_seq), (3, 42));
    assert_eq!(seen.pagodaseq, Some(42));
    assert!(seen.is_replay);
    assert_eq!(
        seen.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(seen.entity, "customer");

    // Entity hooks get the entity payload.
    let env = entity_event(Hook::EntityAfterCreate, "server");
    let h = delivery_headers(&env, ID, "entity_record", 5, 1);
    let reply = deliver(&client, subject("entity_record"), &env, h).await;
    assert_eq!(service_error(&reply), None);
    let seen = rx.recv().await.unwrap();
    assert_eq!(
        (seen.handler.as_str(), seen.entity.as_str()),
        ("entity_record", "server")
    );
    assert_eq!((seen.attempt, seen.stream_seq), (1, 5));

    // An entity outside the filter is acknowledged without calling the handler.
    let env = entry_event(Hook::EntryAfterCreate, "supplier");
    let h = delivery_headers(&env, ID, "customers_only", 6, 1);
    let reply = deliver(&client, subject("customers_only"), &env, h).await;
    assert_eq!(service_error(&reply), None);
    let body = HandlerReply::parse(&reply.payload).unwrap();
    assert!(body.message.unwrap().contains("skipped"));

    // (e) permanent -> 400, transient -> 500.
    let env = entry_event(Hook::EntryAfterUpdate, "customer");
    let reply = deliver(
        &client,
        subject("reject"),
        &env,
        delivery_headers(&env, ID, "reject", 7, 1),
    )
    .await;
    assert_eq!(
        service_error(&reply),
        Some(("400".to_owned(), "bad data: no name".to_owned()))
    );
    let env = entry_event(Hook::EntryAfterDelete, "customer");
    let reply = deliver(
        &client,
        subject("flaky"),
        &env,
        delivery_headers(&env, ID, "flaky", 8, 1),
    )
    .await;
    assert_eq!(
        service_error(&reply),
        Some(("500".to_owned(), "database is down".to_owned()))
    );

    // Garbage gets a 400 naming the problem; the plugin keeps serving.
    let reply = client
        .request(subject("record"), "not json at all".into())
        .await
        .unwrap();
    let (code, text) = service_error(&reply).unwrap();
    assert_eq!(code, "400");
    assert!(
        text.contains("payload is not a valid 'entry.after_create' event"),
        "{text}"
    );
    // An event of another hook is refused too.
    let env = entity_event(Hook::EntityAfterCreate, "customer");
    let payload = serde_json::to_vec(&env).unwrap();
    let reply = client
        .request(subject("record"), payload.into())
        .await
        .unwrap();
    let (code, text) = service_error(&reply).unwrap();
    assert_eq!(code, "400");
    assert!(text.contains("does not match handler 'record'"), "{text}");
    // A malformed delivery header is named.
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let mut h = delivery_headers(&env, ID, "record", 9, 1);
    h.insert(headers::ATTEMPT, "first");
    let reply = deliver(&client, subject("record"), &env, h).await;
    let (code, text) = service_error(&reply).unwrap();
    assert_eq!(code, "400");
    assert!(text.contains("Pagoda-Attempt"), "{text}");

    // A panicking handler gives a 500; the plugin keeps serving.
    let env = entry_event(Hook::EntryAfterRestore, "customer");
    let reply = deliver(
        &client,
        subject("explode"),
        &env,
        delivery_headers(&env, ID, "explode", 10, 1),
    )
    .await;
    assert_eq!(
        service_error(&reply),
        Some(("500".to_owned(), "handler panicked: boom".to_owned()))
    );
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let reply = deliver(
        &client,
        subject("record"),
        &env,
        delivery_headers(&env, ID, "record", 11, 1),
    )
    .await;
    assert_eq!(service_error(&reply), None);
    assert_eq!(rx.recv().await.unwrap().event_id, env.id.to_string());

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_split_the_work_each_request_once() {
    let server = NatsServer::start().await;
    let setup = server.connect().await;
    create_registry(&setup, "pagoda_registry").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, String)>();
    let mut replicas = Vec::new();
    for replica in 0..2 {
        let tx = tx.clone();
        let plugin = Plugin::builder(ID, "Probe", "1.2.3")
            .on_entry(
                Hook::EntryAfterCreate,
                "record",
                move |ctx: EntryContext| {
                    let tx = tx.clone();
                    async move {
                        tx.send((replica, ctx.event_id().to_string())).unwrap();
                        Ok(())
                    }
                },
            )
            .build()
            .unwrap();
        let client = server.connect().await;
        replicas.push(plugin.serve(client, quick_options()).await.unwrap());
    }
    drop(tx);

    const N: usize = 60;
    let requester = server.connect().await;
    let mut sent = Vec::new();
    let mut calls = Vec::new();
    for seq in 0..N {
        let env = entry_event(Hook::EntryAfterCreate, "customer");
        sent.push(env.id.to_string());
        let client = requester.clone();
        calls.push(tokio::spawn(async move {
            let h = delivery_headers(&env, ID, "record", seq as u64 + 1, 1);
            deliver(&client, subject("record"), &env, h).await
        }));
    }
    for call in calls {
        assert_eq!(service_error(&call.await.unwrap()), None);
    }
    for r in replicas {
        r.shutdown().await.unwrap();
    }
    let mut per_replica = [0usize; 2];
    let mut handled = Vec::new();
    while let Some((replica, id)) = rx.recv().await {
        per_replica[replica] += 1;
        handled.push(id);
    }
    handled.sort();
    sent.sort();
    assert_eq!(handled, sent, "every request handled exactly once");
    assert!(
        per_replica.iter().all(|n| *n > 0),
        "both replicas took work: {per_replica:?}"
    );
}

/// A plugin whose handler reports that it started, then waits to be released.
fn slow_plugin(
    started: mpsc::UnboundedSender<()>,
    release: std::sync::Arc<tokio::sync::Notify>,
) -> Plugin {
    Plugin::builder("slow", "Slow", "1.0.0")
        .on_entry(Hook::EntryAfterCreate, "wait", move |_ctx: EntryContext| {
            let started = started.clone();
            let release = release.clone();
            async move {
                started.send(()).unwrap();
                release.notified().await;
                Ok(())
            }
        })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_in_flight_handlers() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let plugin = slow_plugin(started_tx, release.clone());
    let running = plugin.serve(client.clone(), quick_options()).await.unwrap();

    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let requester = client.clone();
    let subject = Subjects::default().handler("slow", "wait");
    let request = tokio::spawn({
        let subject = subject.clone();
        async move {
            let h = delivery_headers(&env, "slow", "wait", 1, 1);
            deliver(&requester, subject, &env, h).await
        }
    });
    started.recv().await.unwrap();
    assert_eq!(running.in_flight(), 1);

    let mut shutdown = tokio::spawn(running.shutdown());
    // Shutdown does not return while the handler runs…
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut shutdown)
            .await
            .is_err(),
        "shutdown returned before the in-flight handler finished"
    );
    // …and no longer takes requests.
    until_nobody_answers(&client, &subject).await;
    // Released, the handler replies and shutdown completes.
    release.notify_one();
    let reply = request.await.unwrap();
    assert_eq!(service_error(&reply), None);
    shutdown.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_after_the_grace_period() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let options = ServeOptions {
        shutdown_grace: Duration::from_millis(200),
        ..quick_options()
    };
    let running = slow_plugin(started_tx, release)
        .serve(client.clone(), options)
        .await
        .unwrap();
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let payload = serde_json::to_vec(&env).unwrap();
    let subject = Subjects::default().handler("slow", "wait");
    // Fire and forget: nobody waits for this reply.
    client
        .publish_with_reply(subject, "_INBOX.ignored", payload.into())
        .await
        .unwrap();
    started.recv().await.unwrap();
    let err = running.shutdown().await.unwrap_err();
    assert!(
        matches!(err, ServeError::GraceExpired { in_flight: 1, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_registry_is_a_clear_error_after_the_wait() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let options = ServeOptions {
        registry_wait: Duration::from_millis(600),
        ..ServeOptions::default()
    };
    let started = std::time::Instant::now();
    let err = probe(tx).serve(client.clone(), options).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(600));
    let msg = err.to_string();
    assert!(
        msg.contains(
            "registry bucket 'pagoda_registry' does not exist: is the bus running? (hookbus run provisions it)"
        ),
        "{msg}"
    );
    assert!(matches!(err, ServeError::RegistryMissing { .. }));
    // Nothing is left serving.
    until_nobody_answers(&client, &format!("$SRV.PING.{ID}")).await;
    until_nobody_answers(&client, &subject("record")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_late_registry_and_honours_the_prefix() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let options = ServeOptions {
        subjects: Subjects::new("acme.pagoda").unwrap(),
        registry_wait: Duration::from_secs(10),
        ..ServeOptions::default()
    };
    let serving = tokio::spawn({
        let client = client.clone();
        async move { probe(tx).serve(client, options).await }
    });
    // The endpoints answer before the bucket exists (served before registered)…
    let subject = Subjects::new("acme.pagoda").unwrap().handler(ID, "record");
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let reply = eventually("the endpoint to answer", Duration::from_secs(5), || {
        let client = client.clone();
        let subject = subject.clone();
        let env = env.clone();
        async move {
            let h = delivery_headers(&env, ID, "record", 1, 1);
            let payload = serde_json::to_vec(&env).unwrap();
            client
                .request_with_headers(subject, h, payload.into())
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(service_error(&reply), None);
    assert_eq!(rx.recv().await.unwrap().event_id, env.id.to_string());
    assert!(
        !serving.is_finished(),
        "serve returned before the registry existed"
    );
    // …and registration completes once the bus creates the bucket.
    let registry = create_registry(&client, "acme_pagoda_registry").await;
    let running = serving.await.unwrap().unwrap();
    assert!(registry.get("plugins.probe").await.unwrap().is_some());
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_timeout_is_stopped_with_a_500() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let plugin = Plugin::builder("hang", "Hang", "1.0.0")
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("forever").timeout(Duration::from_millis(100)),
            |_ctx: EntryContext| std::future::pending::<Result<(), HandlerError>>(),
        )
        .build()
        .unwrap();
    let running = plugin.serve(client.clone(), quick_options()).await.unwrap();
    let env = entry_event(Hook::EntryAfterCreate, "customer");
    let h = delivery_headers(&env, "hang", "forever", 1, 1);
    let subject = Subjects::default().handler("hang", "forever");
    let reply = deliver(&client, subject, &env, h).await;
    assert_eq!(
        service_error(&reply),
        Some((
            "500".to_owned(),
            "handler timed out after 100 ms".to_owned()
        ))
    );
    let handle = &running;
    eventually("the call to end", Duration::from_secs(5), || async move {
        (handle.in_flight() == 0).then_some(())
    })
    .await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let options = ServeOptions {
        max_concurrency: 1,
        ..quick_options()
    };
    let running = slow_plugin(started_tx, release.clone())
        .serve(client.clone(), options)
        .await
        .unwrap();
    let subject = Subjects::default().handler("slow", "wait");
    let mut requests = Vec::new();
    for seq in 1..=2 {
        let client = client.clone();
        let subject = subject.clone();
        requests.push(tokio::spawn(async move {
            let env = entry_event(Hook::EntryAfterCreate, "customer");
            let h = delivery_headers(&env, "slow", "wait", seq, 1);
            deliver(&client, subject, &env, h).await
        }));
    }
    started.recv().await.unwrap();
    // With one slot, the second call waits for the first.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), started.recv())
            .await
            .is_err(),
        "a second call started while the only slot was taken"
    );
    assert_eq!(running.in_flight(), 1);
    release.notify_one();
    started.recv().await.unwrap();
    release.notify_one();
    for request in requests {
        assert_eq!(service_error(&request.await.unwrap()), None);
    }
    running.shutdown().await.unwrap();
}
