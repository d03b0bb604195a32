//! Backfill end to end on a real nats-server (production profile): a plugin that
//! joins late gets the latest event of every object up to the bound `B`, once
//! each, then every later event once, with objects updated while the backfill
//! runs; the raw `latest_events` stream, with filters and following; `hookbus
//! replay --latest-per-object`; the Python example of the raw protocol.
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use core_events::{EntryEvent, Envelope, Hook, Subjects};
use futures::TryStreamExt;
use hookbus::Publisher;
use hookbus_tests::python::{collect_lines, python};
use hookbus_tests::{NatsServer, ServeOn, assert_eventually, init_tracing, workspace_root};
use pagoda_plugin_sdk::backfill::{BackfillOptions, latest_events};
use pagoda_plugin_sdk::replay::{ReplayOptions, replay_events};
use pagoda_plugin_sdk::{EntryContext, Plugin, ServeOptions};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

fn publisher(client: &async_nats::Client) -> Publisher {
    Publisher::new(jetstream::new(client.clone()), Subjects::default())
}

/// Publishes `hook` about entry `id` of `entity`, named `name`; returns its sequence.
async fn publish(publisher: &Publisher, hook: Hook, entity: &str, id: i64, name: &str) -> u64 {
    let mut e: Envelope<EntryEvent> = entry_event(hook, entity, id);
    e.data.entry.name = name.to_owned();
    publisher.publish(&e).await.unwrap().sequence
}

/// One stored event, as the stream holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Stored {
    seq: u64,
    object: String,
    hook: String,
    event_id: String,
}

/// Every event of the stream, in order (read as the operator).
async fn stored(js: &jetstream::Context) -> Vec<Stored> {
    let subjects = Subjects::default();
    let events: Vec<_> = replay_events(js, &subjects, ReplayOptions::default())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    events
        .into_iter()
        .map(|e| {
            let (hook, _) = e.hook_and_entity(&subjects).unwrap();
            Stored {
                seq: e.stream_seq,
                object: e.header("Pagoda-Object").unwrap().to_owned(),
                hook: hook.to_string(),
                event_id: e.envelope().unwrap().id.to_string(),
            }
        })
        .collect()
}

/// Per object, its event with the highest sequence `<= through`, in stream order.
fn latest_up_to(all: &[Stored], through: u64) -> Vec<Stored> {
    let mut latest: BTreeMap<&str, &Stored> = BTreeMap::new();
    for s in all.iter().filter(|s| s.seq <= through) {
        latest.insert(&s.object, s);
    }
    let mut out: Vec<Stored> = latest.into_values().cloned().collect();
    out.sort();
    out
}

/// One handler call the backfilling plugin saw.
#[derive(Debug, Clone)]
struct Seen {
    stored: Stored,
    name: String,
    replay: bool,
}

/// A plugin with a handler on each entry notification hook, recording every
/// call. Its first call waits until `release` is true (at most `WAIT`), after
/// saying so on `started`: the test stores events while the backfill runs.
fn recorder(
    id: &str,
    record: &Arc<Mutex<Vec<Seen>>>,
    started: watch::Sender<bool>,
    release: watch::Receiver<bool>,
) -> Plugin {
    let started = Arc::new(started);
    let mut builder = Plugin::builder(id, "Backfill recorder", "1.0.0");
    for (hook, name) in [
        (Hook::EntryAfterCreate, "created"),
        (Hook::EntryAfterUpdate, "updated"),
        (Hook::EntryAfterDelete, "deleted"),
    ] {
        let (record, started, release) = (record.clone(), started.clone(), release.clone());
        builder = builder.on_entry(hook, name, move |ctx: EntryContext| {
            let (record, started, mut release) = (record.clone(), started.clone(), release.clone());
            async move {
                if !started.send_replace(true) {
                    // The first call: hold the backfill until the test has stored more.
                    let released = tokio::time::timeout(WAIT, release.wait_for(|r| *r)).await;
                    assert!(released.is_ok(), "not released within {WAIT:?}");
                }
                record.lock().unwrap().push(Seen {
                    stored: Stored {
                        seq: ctx.stream_seq,
                        object: ctx.object().to_owned(),
                        hook: ctx.hook.to_string(),
                        event_id: ctx.event_id().to_string(),
                    },
                    name: ctx.event.data.entry.name.clone(),
                    replay: ctx.is_replay,
                });
                Ok(())
            }
        });
    }
    builder.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_plugin_gets_the_latest_event_of_every_object_then_every_later_one() {
    init_tracing();
    let server = NatsServer::start_for(&["late-b"]).await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let bus = start_bus(&server, &["late-b"]).await;
    let publisher = publisher(&client);

    // Before the plugin: 10 customers, each created and updated 3 times (the
    // updates interleaved across objects); 2 suppliers; customer 4 deleted.
    const OBJECTS: i64 = 10;
    for id in 1..=OBJECTS {
        publish(
            &publisher,
            Hook::EntryAfterCreate,
            "customer",
            id,
            &format!("c{id}-v0"),
        )
        .await;
    }
    for round in 1..=3 {
        for id in 1..=OBJECTS {
            let name = format!("c{id}-v{round}");
            publish(&publisher, Hook::EntryAfterUpdate, "customer", id, &name).await;
        }
    }
    for id in 101..=102 {
        publish(
            &publisher,
            Hook::EntryAfterCreate,
            "supplier",
            id,
            &format!("s{id}"),
        )
        .await;
    }
    let deleted_seq = publish(&publisher, Hook::EntryAfterDelete, "customer", 4, "c4-gone").await;

    let record: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (started_tx, mut started_rx) = watch::channel(false);
    let (release_tx, release_rx) = watch::channel(false);
    let options = ServeOptions {
        registry_wait: Duration::from_secs(10),
        replay_bus_wait: Duration::from_secs(10),
        backfill: true,
        ..ServeOptions::default()
    };
    let running = recorder("late-b", &record, started_tx, release_rx)
        .serve_on(&server, options)
        .await
        .unwrap();

    // While the backfill runs (its first handler call is held): updates to
    // objects already handled and not yet, a new object, a deletion.
    tokio::time::timeout(WAIT, started_rx.wait_for(|s| *s))
        .await
        .expect("the backfill called a handler")
        .unwrap();
    let mut during = Vec::new();
    for id in [1, 5, 10, 2] {
        let name = format!("c{id}-v4");
        during.push(publish(&publisher, Hook::EntryAfterUpdate, "customer", id, &name).await);
    }
    during.push(publish(&publisher, Hook::EntryAfterCreate, "customer", 11, "c11-v0").await);
    during.push(publish(&publisher, Hook::EntryAfterDelete, "customer", 3, "c3-gone").await);
    release_tx.send_replace(true);

    let progress = tokio::time::timeout(WAIT, running.wait_caught_up())
        .await
        .expect("caught up in time")
        .expect("a backfill was asked for");
    assert!(
        progress.caught_up && progress.error.is_none(),
        "{progress:?}"
    );
    let through = progress.backfill_through.expect("the bound is reported");
    assert!(
        through >= deleted_seq && through < during[0],
        "the bound {through} is the last sequence before the plugin started ({deleted_seq}), before the events stored during the backfill ({during:?})"
    );

    // After the hand-over: live.
    let mut after = Vec::new();
    for id in [1, 11, 7] {
        let name = format!("c{id}-v9");
        after.push(publish(&publisher, Hook::EntryAfterUpdate, "customer", id, &name).await);
    }

    let all = stored(&js).await;
    let latest = latest_up_to(&all, through);
    let later: Vec<Stored> = all.iter().filter(|s| s.seq > through).cloned().collect();
    let expected = latest.len() + later.len();
    assert_eq!(latest.len(), 12, "10 customers and 2 suppliers: {latest:?}");
    assert_eq!(later.len(), 9, "{later:?}");
    assert_eventually!(
        record.lock().unwrap().len() >= expected,
        WAIT,
        "{expected} calls expected; got {:?}",
        record.lock().unwrap()
    );
    // Let the bus finish its live deliveries (those up to B are answered as
    // duplicates), so that a duplicate call would show.
    assert_eventually!(bus.stats.delivered.get() >= later.len() as u64, WAIT);
    let calls = record.lock().unwrap().clone();
    assert_eq!(calls.len(), expected, "no duplicate: {calls:#?}");

    // First the latest of every object up to B, in stream order, once each.
    let backfilled: Vec<Stored> = calls[..latest.len()]
        .iter()
        .map(|c| c.stored.clone())
        .collect();
    assert_eq!(
        backfilled, latest,
        "the backfill: each object's latest event up to B"
    );
    assert!(calls[..latest.len()].iter().all(|c| c.replay));
    let names: BTreeMap<String, String> = calls[..latest.len()]
        .iter()
        .map(|c| (c.stored.object.clone(), c.name.clone()))
        .collect();
    assert_eq!(
        names["entry/1"], "c1-v3",
        "the latest state, not an older one"
    );
    assert_eq!(names["entry/102"], "s102");
    let gone = calls.iter().find(|c| c.stored.seq == deleted_seq).unwrap();
    assert_eq!(
        (gone.stored.hook.as_str(), gone.name.as_str()),
        ("entry.after_delete", "c4-gone"),
        "a deleted object's latest event is its deletion"
    );

    // Then every later event exactly once, per object in stream order.
    let rest: Vec<Stored> = calls[latest.len()..]
        .iter()
        .map(|c| c.stored.clone())
        .collect();
    let rest_set: HashSet<&Stored> = rest.iter().collect();
    assert_eq!(rest_set.len(), rest.len(), "no duplicate: {rest:?}");
    assert_eq!(rest_set, later.iter().collect::<HashSet<_>>(), "no gap");
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for s in calls.iter().map(|c| &c.stored) {
        let prev = last.insert(s.object.clone(), s.seq).unwrap_or(0);
        assert!(prev < s.seq, "{} got seq {} after {prev}", s.object, s.seq);
    }
    // The events stored after the hand-over came live.
    for c in calls.iter().filter(|c| after.contains(&c.stored.seq)) {
        assert!(!c.replay, "{c:?} came live");
    }
    assert_eq!(bus.stats.dead_lettered.get(), 0);

    running.shutdown().await.unwrap();
    bus.stop().await.unwrap();
}

/// Runs `hookbus replay <args>`; returns (success, stdout, stderr).
async fn hookbus_replay(server: &NatsServer, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(hookbus_tests::hookbus_binary());
    command
        .arg("replay")
        .args(args)
        .envs(server.env_for(hookbus_tests::BUS_USER))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Stores a history: customers 1–4 created and updated, customer 2 deleted,
/// suppliers 7–8 created and 7 updated. Returns the stream's events.
async fn history(server: &NatsServer) -> Vec<Stored> {
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = publisher(&client);
    for id in 1..=4 {
        publish(
            &publisher,
            Hook::EntryAfterCreate,
            "customer",
            id,
            &format!("c{id}-v0"),
        )
        .await;
    }
    for id in [7, 8] {
        publish(
            &publisher,
            Hook::EntryAfterCreate,
            "supplier",
            id,
            &format!("s{id}-v0"),
        )
        .await;
    }
    for round in 1..=2 {
        for id in [3, 1, 4] {
            let name = format!("c{id}-v{round}");
            publish(&publisher, Hook::EntryAfterUpdate, "customer", id, &name).await;
        }
    }
    publish(&publisher, Hook::EntryAfterUpdate, "supplier", 7, "s7-v1").await;
    publish(&publisher, Hook::EntryAfterDelete, "customer", 2, "c2-gone").await;
    stored(&js).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_events_and_hookbus_replay_latest_per_object() {
    init_tracing();
    let server = NatsServer::start().await;
    let all = history(&server).await;
    let head = all.last().unwrap().seq;
    let latest = latest_up_to(&all, head);
    assert_eq!(latest.len(), 6);
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    let seqs = |events: &[pagoda_plugin_sdk::replay::ReplayedEvent]| {
        events.iter().map(|e| e.stream_seq).collect::<Vec<_>>()
    };
    let want = |pred: &dyn Fn(&Stored) -> bool| {
        latest
            .iter()
            .filter(|s| pred(s))
            .map(|s| s.seq)
            .collect::<Vec<_>>()
    };

    // Every object.
    let events = latest_events(&js, &subjects, BackfillOptions::default())
        .await
        .unwrap();
    assert_eq!((events.through(), events.latest_count()), (head, 6));
    let got: Vec<_> = events.try_collect().await.unwrap();
    assert_eq!(seqs(&got), want(&|_| true));
    let objects: Vec<&str> = got
        .iter()
        .map(|e| e.header("Pagoda-Object").unwrap())
        .collect();
    assert_eq!(
        objects.iter().collect::<HashSet<_>>().len(),
        6,
        "{objects:?}"
    );

    // Filtered by entity, by hook (the latest *create* of every object), by object.
    let options = BackfillOptions {
        entities: vec!["supplier".to_owned()],
        ..Default::default()
    };
    let got: Vec<_> = latest_events(&js, &subjects, options)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        seqs(&got),
        want(&|s| s.object == "entry/7" || s.object == "entry/8")
    );
    let options = BackfillOptions {
        hooks: vec![Hook::EntryAfterCreate],
        ..Default::default()
    };
    let got: Vec<_> = latest_events(&js, &subjects, options)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let creates: Vec<u64> = all
        .iter()
        .filter(|s| s.hook == "entry.after_create")
        .map(|s| s.seq)
        .collect();
    assert_eq!(seqs(&got), creates);
    let options = BackfillOptions {
        objects: vec!["entry/3".parse().unwrap()],
        ..Default::default()
    };
    let got: Vec<_> = latest_events(&js, &subjects, options)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(seqs(&got), want(&|s| s.object == "entry/3"));

    // Following: the latest, then every new event.
    let options = BackfillOptions {
        follow: true,
        ..Default::default()
    };
    let mut events = latest_events(&js, &subjects, options).await.unwrap();
    let publisher = publisher(&server.connect().await);
    let new1 = publish(&publisher, Hook::EntryAfterUpdate, "customer", 1, "c1-v3").await;
    let new2 = publish(&publisher, Hook::EntryAfterCreate, "customer", 5, "c5-v0").await;
    let mut got = Vec::new();
    while got.len() < 8 {
        let next = tokio::time::timeout(WAIT, events.try_next()).await.unwrap();
        got.push(next.unwrap().unwrap());
    }
    let mut wanted = want(&|_| true);
    wanted.extend([new1, new2]);
    assert_eq!(seqs(&got), wanted);

    // The command line: JSON lines of the latest events as of the head.
    let (ok, stdout, stderr) = hookbus_replay(&server, &["--latest-per-object"]).await;
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let all = stored(&js).await;
    let latest_now = latest_up_to(&all, all.last().unwrap().seq);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        latest_now.iter().map(|s| s.seq).collect::<Vec<_>>(),
        "{stdout}"
    );
    let deleted = lines
        .iter()
        .find(|l| l["event"]["data"]["entry"]["id"] == 2)
        .unwrap();
    assert_eq!(deleted["event"]["type"], "pagoda.entry.after_delete");
    assert_eq!(
        lines
            .iter()
            .find(|l| l["event"]["data"]["entry"]["id"] == 1)
            .unwrap()["event"]["data"]["entry"]["name"],
        "c1-v3"
    );
    assert!(stderr.contains("7 event(s)"), "{stderr}");
    let (ok, stdout, _) =
        hookbus_replay(&server, &["--latest-per-object", "--entity", "supplier"]).await;
    assert!(ok);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    // It reads from the start: a start position is refused, naming both flags.
    let (ok, _, stderr) =
        hookbus_replay(&server, &["--latest-per-object", "--from-seq", "3"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("--latest-per-object") && stderr.contains("--from-seq"),
        "{stderr}"
    );

    // Re-delivered to a handler: its hook and entities are the filter, so it gets
    // the latest *update* of every customer.
    let seen: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let rec = seen.clone();
    let plugin = Plugin::builder("redo-latest", "Redo latest", "1.0.0")
        .on_entry(
            Hook::EntryAfterUpdate,
            pagoda_plugin_sdk::Handler::named("updated").entities(["customer"]),
            move |ctx: EntryContext| {
                let rec = rec.clone();
                async move {
                    assert!(ctx.is_replay);
                    let name = ctx.event.data.entry.name.clone();
                    rec.lock().unwrap().push((ctx.stream_seq, name));
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let running = plugin
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    let (ok, _, stderr) = hookbus_replay(
        &server,
        &[
            "--latest-per-object",
            "--to-plugin",
            "redo-latest",
            "--handler",
            "updated",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let mut names: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, n)| n.clone())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["c1-v3", "c3-v2", "c4-v2"],
        "{:?}",
        seen.lock().unwrap()
    );
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|(s, _)| *s).collect();
    assert!(seqs.is_sorted(), "in stream order: {seqs:?}");
    running.shutdown().await.unwrap();
}

/// The Python example of the raw protocol (`docs/examples/backfill.py`): its
/// latest events match the stream's, then it follows live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_backfill_example_reads_the_latest_events_then_follows() {
    init_tracing();
    let python = python();
    let server = NatsServer::start_for(&["py-backfill"]).await;
    let all = history(&server).await;
    let latest = latest_up_to(&all, all.last().unwrap().seq);
    let script = workspace_root().join("docs/examples/backfill.py");
    let mut child = tokio::process::Command::new(&python)
        .arg("-u")
        .arg(&script)
        .envs(server.env_for("py-backfill"))
        .env_remove("PAGODA_SUBJECT_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = collect_lines(child.stdout.take().unwrap());
    let stderr = collect_lines(child.stderr.take().unwrap());
    let output = || {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            stdout.lock().unwrap().join("\n"),
            stderr.lock().unwrap().join("\n")
        )
    };
    let through = format!("through {}", all.last().unwrap().seq);
    assert_eventually!(
        stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("through")),
        WAIT,
        "{}",
        output()
    );
    let publisher = publisher(&server.connect().await);
    let new = publish(&publisher, Hook::EntryAfterUpdate, "customer", 3, "c3-v3").await;
    let live = format!("live {new} entry/3 entry.after_update");
    assert_eventually!(stdout.lock().unwrap().contains(&live), WAIT, "{}", output());
    let lines = stdout.lock().unwrap().clone();
    let mut expected: Vec<String> = latest
        .iter()
        .map(|s| format!("latest {} {} {}", s.seq, s.object, s.hook))
        .collect();
    expected.push(through);
    expected.push(live);
    assert_eq!(lines, expected, "{}", output());
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_an_empty_stream_is_over_at_once_and_asking_for_a_replay_too_is_refused() {
    init_tracing();
    let server = NatsServer::start_for(&["empty-b"]).await;
    let bus = start_bus(&server, &["empty-b"]).await;
    let record: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (started_tx, _started_rx) = watch::channel(false);
    let (_release_tx, release_rx) = watch::channel(true);
    let plugin = recorder("empty-b", &record, started_tx, release_rx);

    let both = ServeOptions {
        backfill: true,
        replay: Some(pagoda_plugin_sdk::ReplayFrom::Start),
        ..ServeOptions::default()
    };
    let err = plugin.serve_on(&server, both).await.unwrap_err();
    assert!(
        err.to_string().contains("both a backfill and a replay"),
        "{err}"
    );

    let options = ServeOptions {
        backfill: true,
        replay_bus_wait: Duration::from_secs(10),
        ..ServeOptions::default()
    };
    let running = plugin.serve_on(&server, options).await.unwrap();
    let progress = tokio::time::timeout(WAIT, running.wait_caught_up())
        .await
        .unwrap()
        .unwrap();
    assert!(
        progress.caught_up && progress.error.is_none(),
        "{progress:?}"
    );
    assert_eq!((progress.backfill_through, progress.events), (Some(0), 0));
    // Then live.
    let client = server.connect().await;
    let seq = publish(
        &publisher(&client),
        Hook::EntryAfterCreate,
        "customer",
        1,
        "c1",
    )
    .await;
    assert_eventually!(record.lock().unwrap().len() == 1, WAIT);
    let call = record.lock().unwrap()[0].clone();
    assert_eq!((call.stored.seq, call.replay), (seq, false));
    running.shutdown().await.unwrap();
    bus.stop().await.unwrap();
}

/// A measurement, not a check: the latest events of 20,000 objects with 5 events
/// each (100,000 stored) against reading the whole stream, alternated 3 times,
/// medians. `cargo test -p hookbus-tests --test backfill -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn measure_backfill_against_a_full_read() {
    const OBJECTS: usize = 20_000;
    const PER_OBJECT: usize = 5;
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = publisher(&client);
    let mut acks = Vec::new();
    for round in 0..PER_OBJECT {
        for id in 0..OBJECTS {
            let hook = if round == 0 {
                Hook::EntryAfterCreate
            } else {
                Hook::EntryAfterUpdate
            };
            let mut e: Envelope<EntryEvent> = entry_event(hook, "customer", id as i64 + 1);
            e.data.entry.name = format!("v{round}");
            let encoded = hookbus::EncodedEvent::encode(publisher.subjects(), &e).unwrap();
            acks.push(publisher.send(encoded).await.unwrap());
            if acks.len() >= 1000 {
                for ack in acks.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let subjects = Subjects::default();
    let (mut latest_ms, mut full_ms) = (Vec::new(), Vec::new());
    let mut read = 0;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let events = latest_events(&js, &subjects, BackfillOptions::default())
            .await
            .unwrap();
        read = events.read();
        let got: Vec<_> = events.try_collect().await.unwrap();
        assert_eq!(got.len(), OBJECTS);
        latest_ms.push(started.elapsed().as_secs_f64() * 1e3);

        let started = std::time::Instant::now();
        let all: Vec<_> = replay_events(&js, &subjects, ReplayOptions::default())
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(all.len(), OBJECTS * PER_OBJECT);
        full_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "bench: backfill objects={OBJECTS} events={} read={read} latest_ms={:.0} full_read_ms={:.0} server={}",
        OBJECTS * PER_OBJECT,
        median(&mut latest_ms),
        median(&mut full_ms),
        hookbus_tests::nats_server_binary().display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookbus_replay_latest_per_object_follow_goes_on_with_new_events() {
    init_tracing();
    let server = NatsServer::start().await;
    let all = history(&server).await;
    let latest = latest_up_to(&all, all.last().unwrap().seq);
    let mut child = tokio::process::Command::new(hookbus_tests::hookbus_binary())
        .args(["replay", "--latest-per-object", "--follow"])
        .envs(server.env_for(hookbus_tests::BUS_USER))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = collect_lines(child.stdout.take().unwrap());
    let stderr = collect_lines(child.stderr.take().unwrap());
    let seqs = || {
        stdout
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eventually!(
        seqs().len() == latest.len(),
        WAIT,
        "{:?} {:?}",
        stdout.lock().unwrap(),
        stderr.lock().unwrap()
    );
    let publisher = publisher(&server.connect().await);
    let new = publish(&publisher, Hook::EntryAfterUpdate, "customer", 2, "c2-back").await;
    let mut want: Vec<u64> = latest.iter().map(|s| s.seq).collect();
    want.push(new);
    assert_eventually!(seqs() == want, WAIT, "{:?}", stdout.lock().unwrap());
    child.kill().await.unwrap();
}
