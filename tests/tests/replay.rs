//! Replay end to end on a real nats-server: a plugin that rebuilds its state while
//! events keep coming ends with the same state as one that consumed live from the
//! start (no gap, no duplicate); replays from a sequence and a time, filtered by
//! hook and entity; positions the stream no longer holds; `hookbus replay`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use common::*;
use core_events::{EntryEvent, Envelope, Hook, Subjects};
use futures::TryStreamExt;
use hookbus::Publisher;
use hookbus_tests::ServeOn;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing};
use pagoda_plugin_sdk::replay::{ReplayError, ReplayFrom, ReplayOptions, replay_events};
use pagoda_plugin_sdk::{EntryContext, Handler, HandlerError, Plugin, ServeError, ServeOptions};

const WAIT: Duration = Duration::from_secs(30);

fn publisher(client: &async_nats::Client) -> Publisher {
    Publisher::new(jetstream::new(client.clone()), Subjects::default())
}

/// Event `i` of a test: about entry `i % objects` of `entity`, the entry named `v<i>`.
fn event(hook: Hook, entity: &str, i: usize, objects: usize) -> Envelope<EntryEvent> {
    let mut e = entry_event(hook, entity, (i % objects) as i64 + 1);
    e.data.entry.name = format!("v{i}");
    e
}

/// One handler call a recording plugin saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    event_id: String,
    seq: u64,
    object: String,
    name: String,
    replay: bool,
    handler: String,
}

/// What a recording plugin saw, in order.
#[derive(Debug, Clone, Default)]
struct Record(Arc<Mutex<Vec<Seen>>>);

impl Record {
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    fn ids(&self) -> HashSet<String> {
        self.all().into_iter().map(|s| s.event_id).collect()
    }

    /// Per object, the event ids in the order they were handled.
    fn per_object(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in self.all() {
            out.entry(s.object).or_default().push(s.event_id);
        }
        out
    }

    /// The state the plugin keeps: per object, the last entry name.
    fn state(&self) -> BTreeMap<String, String> {
        self.all().into_iter().map(|s| (s.object, s.name)).collect()
    }
}

/// A plugin with one handler on `entry.after_create` (optionally for some
/// entities) that records every call.
fn recorder(id: &str, record: &Record, entities: Option<&[&str]>) -> Plugin {
    let rec = record.clone();
    let handler = match entities {
        Some(e) => Handler::named("created").entities(e.iter().copied()),
        None => Handler::named("created"),
    };
    Plugin::builder(id, format!("Recorder {id}"), "1.0.0")
        .on_entry(Hook::EntryAfterCreate, handler, move |ctx: EntryContext| {
            let rec = rec.clone();
            async move {
                rec.0.lock().unwrap().push(Seen {
                    event_id: ctx.event_id().to_string(),
                    seq: ctx.stream_seq,
                    object: ctx.object().to_owned(),
                    name: ctx.event.data.entry.name.clone(),
                    replay: ctx.is_replay,
                    handler: ctx.handler.to_string(),
                });
                Ok(())
            }
        })
        .build()
        .unwrap()
}

fn options(replay: Option<ReplayFrom>) -> ServeOptions {
    ServeOptions {
        registry_wait: Duration::from_secs(10),
        replay,
        replay_bus_wait: Duration::from_secs(10),
        ..ServeOptions::default()
    }
}

/// Publishes events `range` (entry.after_create about `objects` entries of
/// `customer`), with many acks in flight; returns their ids.
async fn publish_range(
    publisher: &Publisher,
    range: std::ops::Range<usize>,
    objects: usize,
) -> Vec<String> {
    let mut acks = Vec::new();
    let mut ids = Vec::new();
    for i in range {
        let e = event(Hook::EntryAfterCreate, "customer", i, objects);
        ids.push(e.id.to_string());
        let encoded = hookbus::EncodedEvent::encode(publisher.subjects(), &e).unwrap();
        acks.push(publisher.send(encoded).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaying_subscriber_ends_with_the_state_of_a_live_one() {
    init_tracing();
    // Both users up front: a reload while live-a answers a burst would drop its
    // pending reply permissions (see NatsServer::allow_plugins).
    let server = NatsServer::start_for(&["live-a", "replay-b"]).await;
    let client = server.connect().await;
    let bus = start_bus(&server, &["live-a", "replay-b"]).await;
    let live = Record::default();
    let running_a = recorder("live-a", &live, None)
        .serve_on(&server, options(None))
        .await
        .unwrap();
    wait_registered(&bus, &["live-a"]).await;

    const OBJECTS: usize = 20;
    let publisher = publisher(&client);
    // Phase 1: stored before the replaying plugin exists.
    let mut ids = publish_range(&publisher, 0..200, OBJECTS).await;
    // Phase 2: published while it starts and catches up.
    let during = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for chunk in (200..400).collect::<Vec<_>>().chunks(10) {
                ids.extend(
                    publish_range(&publisher, chunk[0]..chunk[0] + chunk.len(), OBJECTS).await,
                );
            }
            ids
        })
    };
    let replayed = Record::default();
    let running_b = recorder("replay-b", &replayed, None)
        .serve_on(&server, options(Some(ReplayFrom::Start)))
        .await
        .unwrap();
    let progress = tokio::time::timeout(WAIT, running_b.wait_caught_up())
        .await
        .expect("caught up in time")
        .expect("a replay was asked for");
    assert!(
        progress.caught_up && progress.error.is_none(),
        "{progress:?}"
    );
    assert!(progress.events >= 200, "{progress:?}");
    ids.extend(during.await.unwrap());
    // Phase 3: after the catch-up, live only.
    ids.extend(publish_range(&publisher, 400..450, OBJECTS).await);
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(all.len(), 450);

    assert_eventually!(live.ids() == all, WAIT, "live plugin saw every event");
    assert_eventually!(
        replayed.ids() == all,
        WAIT,
        "replaying plugin saw every event"
    );
    let calls = replayed.all();
    assert_eq!(
        calls.len(),
        450,
        "no duplicate in the replaying plugin: {} calls for 450 events",
        calls.len()
    );
    assert_eq!(
        replayed.per_object(),
        live.per_object(),
        "same order per object"
    );
    assert_eq!(replayed.state(), live.state(), "same final state");
    let from_replay = calls.iter().filter(|s| s.replay).count();
    assert!(
        from_replay >= 200,
        "the first 200 came from the replay: {from_replay}"
    );
    assert!(calls.iter().any(|s| !s.replay), "later events came live");
    // The live plugin's seqs per object rise (stream order); the replayed plugin too.
    for rec in [&live, &replayed] {
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for s in rec.all() {
            let prev = last.insert(s.object.clone(), s.seq).unwrap_or(0);
            assert!(prev < s.seq, "{} got seq {} after {prev}", s.object, s.seq);
        }
    }
    running_b.shutdown().await.unwrap();
    running_a.shutdown().await.unwrap();
    bus.stop().await.unwrap();
}

/// Publishes a mix of hooks and entities; returns (seq, hook, entity) in order.
async fn publish_mix(publisher: &Publisher, n: usize) -> Vec<(u64, Hook, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let hook = if i % 3 == 0 {
            Hook::EntryAfterUpdate
        } else {
            Hook::EntryAfterCreate
        };
        let entity = if i % 2 == 0 {
            "customer"
        } else {
            "顧客 master"
        };
        let ack = publisher.publish(&event(hook, entity, i, 5)).await.unwrap();
        out.push((ack.sequence, hook, entity.to_owned()));
    }
    out
}

async fn collect(js: &jetstream::Context, options: ReplayOptions) -> Vec<(u64, Hook, String)> {
    let subjects = Subjects::default();
    let events = replay_events(js, &subjects, options).await.unwrap();
    let events: Vec<_> = events.try_collect().await.unwrap();
    events
        .into_iter()
        .map(|e| {
            let (hook, entity) = e.hook_and_entity(&subjects).unwrap();
            (e.stream_seq, hook, entity)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_start_at_a_sequence_or_a_time_filtered_by_hook_and_entity() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = publisher(&client);
    let first = publish_mix(&publisher, 12).await;
    let between = Utc::now();
    let second = publish_mix(&publisher, 12).await;
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();

    // Everything, from the start; Sequence(0) is the same.
    assert_eq!(collect(&js, ReplayOptions::default()).await, all);
    let from0 = ReplayOptions {
        from: ReplayFrom::Sequence(0),
        ..Default::default()
    };
    assert_eq!(collect(&js, from0).await, all);

    // The consumer starts where asked.
    let at5 = ReplayOptions {
        from: ReplayFrom::Sequence(5),
        ..Default::default()
    };
    let opened = replay_events(&js, &Subjects::default(), at5).await.unwrap();
    assert_eq!(
        (opened.start_after(), opened.total_at_start()),
        (4, all.len() as u64 - 4)
    );

    // From a sequence, one hook.
    let got = collect(
        &js,
        ReplayOptions {
            from: ReplayFrom::Sequence(5),
            hooks: vec![Hook::EntryAfterUpdate],
            ..Default::default()
        },
    )
    .await;
    let want: Vec<_> = all
        .iter()
        .filter(|(s, h, _)| *s >= 5 && *h == Hook::EntryAfterUpdate)
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // From a time, one entity (with a name that needs escaping), legacy hook name.
    let got = collect(
        &js,
        ReplayOptions {
            from: ReplayFrom::Time(between),
            hooks: vec![Hook::parse("after_create_entry_v2").unwrap()],
            entities: vec!["顧客 master".to_owned()],
            ..Default::default()
        },
    )
    .await;
    let want: Vec<_> = second
        .iter()
        .filter(|(_, h, e)| *h == Hook::EntryAfterCreate && e == "顧客 master")
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // Nothing matches: ends at once.
    let none = ReplayOptions {
        entities: vec!["nobody".to_owned()],
        ..Default::default()
    };
    assert!(collect(&js, none).await.is_empty());

    // One object's history (`pagoda.events.entry.*.*.3.*`): entry 3 is the 3rd and
    // 8th event of each batch.
    let entry3 = ReplayOptions {
        objects: vec!["entry/3".parse().unwrap()],
        ..Default::default()
    };
    let want: Vec<_> = [2, 7, 14, 19].iter().map(|&i| all[i].clone()).collect();
    assert_eq!(collect(&js, entry3).await, want);

    // Following: the stream goes on past the head.
    let follow = ReplayOptions {
        from: ReplayFrom::Sequence(all.len() as u64),
        until_caught_up: false,
        ..Default::default()
    };
    let mut events = replay_events(&js, &Subjects::default(), follow)
        .await
        .unwrap();
    let last = events.try_next().await.unwrap().unwrap();
    assert_eq!(last.stream_seq, all.len() as u64);
    assert_eq!(last.pending, 0);
    let later = publisher
        .publish(&event(Hook::EntryAfterCreate, "customer", 99, 5))
        .await
        .unwrap();
    let next = tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.stream_seq, later.sequence);
    assert_eq!(next.envelope().unwrap().subject.as_deref(), Some("entry/5"));

    // A plugin's own handlers over the stored events: its entity filter applies.
    let record = Record::default();
    let plugin = recorder("offline", &record, Some(&["customer"]));
    let done = plugin
        .replay(&client, &Subjects::default(), ReplayFrom::Sequence(13))
        .await
        .unwrap();
    let want: Vec<u64> = all
        .iter()
        .chain(std::iter::once(&(
            later.sequence,
            Hook::EntryAfterCreate,
            "customer".to_owned(),
        )))
        .filter(|(s, h, e)| *s >= 13 && *h == Hook::EntryAfterCreate && e == "customer")
        .map(|(s, _, _)| *s)
        .collect();
    let seen: Vec<u64> = record.all().iter().map(|s| s.seq).collect();
    assert_eq!(seen, want);
    assert!(
        record
            .all()
            .iter()
            .all(|s| s.replay && s.handler == "created")
    );
    assert_eq!(done.events, want.len() as u64);
    assert_eq!(done.replayed_through, *want.last().unwrap());
    assert!(done.caught_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_before_the_oldest_retained_event_says_so() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = publisher(&client);
    for i in 0..10 {
        publisher
            .publish(&event(Hook::EntryAfterCreate, "customer", i, 3))
            .await
            .unwrap();
    }
    let stream = js.get_stream("PAGODA_EVENTS").await.unwrap();
    stream.purge().keep(5).await.unwrap();

    let from = |from| ReplayOptions {
        from,
        ..Default::default()
    };
    let err = replay_events(&js, &Subjects::default(), from(ReplayFrom::Sequence(2)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReplayError::BeforeOldest { oldest_seq: 6, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    for needle in [
        "cannot replay from stream sequence 2",
        "stream 'PAGODA_EVENTS' no longer holds it",
        "the oldest retained event is sequence 6, stored 20",
        "max_age 30d, max_bytes unlimited",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
    let err = replay_events(
        &js,
        &Subjects::default(),
        from(ReplayFrom::Time(Utc::now() - chrono::Duration::hours(1))),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot replay from time "),
        "{err}"
    );

    // The oldest retained, or the start, are fine.
    let at = collect(&js, from(ReplayFrom::Sequence(6))).await;
    assert_eq!(at.iter().map(|e| e.0).collect::<Vec<_>>(), [6, 7, 8, 9, 10]);
    assert_eq!(collect(&js, from(ReplayFrom::Start)).await, at);

    // A plugin asking for it does not start.
    let _bus = start_bus(&server, &["late"]).await;
    let record = Record::default();
    let served = recorder("late", &record, None)
        .serve_on(
            &server,
            ServeOptions {
                replay_bus_wait: Duration::from_millis(200),
                ..options(Some(ReplayFrom::Sequence(1)))
            },
        )
        .await;
    match served {
        Err(ServeError::Replay(ReplayError::BeforeOldest { oldest_seq, .. })) => {
            assert_eq!(oldest_seq, 6);
        }
        other => panic!("expected a BeforeOldest error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_during_a_replay_is_retried_then_dead_lettered() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = publisher(&client);
    publish_range(&publisher, 0..5, 5).await;
    let attempts: Arc<Mutex<BTreeMap<u64, Vec<u32>>>> = Arc::default();
    let seen = attempts.clone();
    let plugin = Plugin::builder("flaky-replay", "Flaky replay", "1.0.0")
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("created").retry_backoff_ms([10, 10]),
            move |ctx: EntryContext| {
                let seen = seen.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .entry(ctx.stream_seq)
                        .or_default()
                        .push(ctx.attempt);
                    match (ctx.stream_seq, ctx.attempt) {
                        (2, _) => Err(HandlerError::transient("seq 2 always fails")),
                        (4, 1) => Err(HandlerError::transient("seq 4 fails once")),
                        _ => Ok(()),
                    }
                }
            },
        )
        .build()
        .unwrap();
    let done = plugin
        .replay(&client, &Subjects::default(), ReplayFrom::Start)
        .await
        .unwrap();
    assert_eq!(
        (
            done.events,
            done.handler_calls,
            done.dead_lettered,
            done.replayed_through
        ),
        (5, 5, 1, 5),
        "{done:?}"
    );
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts[&2], [1, 2, 3], "retried on the handler's schedule");
    assert_eq!(attempts[&4], [1, 2]);
    assert_eq!(attempts[&5], [1], "the replay went on after the failure");
    let letters = dead_letters(&js).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (subject, letter) = &letters[0];
    assert_eq!(subject, "pagoda.dlq.flaky-replay.created");
    assert_eq!(letter["stream_seq"], 2);
    assert_eq!(letter["attempts"].as_array().unwrap().len(), 3);
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("seq 2 always fails"),
        "{letter}"
    );
    assert_eq!(letter["event"]["type"], "pagoda.entry.after_create");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookbus_replay_prints_json_lines_and_redelivers_to_a_handler() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &Subjects::default(), &Default::default())
        .await
        .unwrap();
    let publisher = publisher(&client);
    let all = publish_mix(&publisher, 9).await;

    // stdout: JSON lines, filtered.
    let (ok, stdout, stderr) = hookbus_replay(
        &server,
        &["--from-seq", "2", "--hook", "entry.after_create"],
    )
    .await;
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<u64> = all
        .iter()
        .filter(|(s, h, _)| *s >= 2 && *h == Hook::EntryAfterCreate)
        .map(|(s, _, _)| *s)
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        want
    );
    let first = &lines[0];
    assert!(
        first["subject"]
            .as_str()
            .unwrap()
            .starts_with("pagoda.events.entry.after_create.")
    );
    assert_eq!(first["event"]["type"], "pagoda.entry.after_create");
    assert!(chrono::DateTime::parse_from_rfc3339(first["time"].as_str().unwrap()).is_ok());
    assert!(
        stderr.contains(&format!("{} event(s)", want.len())),
        "{stderr}"
    );

    // Entity filter with a name that needs escaping.
    let (ok, stdout, _) = hookbus_replay(&server, &["--entity", "顧客 master"]).await;
    assert!(ok);
    assert_eq!(
        stdout.lines().count(),
        all.iter().filter(|(_, _, e)| e == "顧客 master").count()
    );

    // Bad input is named.
    let (ok, _, stderr) = hookbus_replay(&server, &["--hook", "entry.after_creat"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("did you mean 'entry.after_create'"),
        "{stderr}"
    );
    js.get_stream("PAGODA_EVENTS")
        .await
        .unwrap()
        .purge()
        .keep(6)
        .await
        .unwrap();
    let (ok, _, stderr) = hookbus_replay(&server, &["--from-seq", "1"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("the oldest retained event is sequence 4"),
        "{stderr}"
    );

    // Re-delivery to one handler: its hook and entity filter apply; one failure is
    // reported, the rest go on, the exit status says so.
    let record = Record::default();
    let rec = record.clone();
    let plugin = Plugin::builder("redo", "Redo", "1.0.0")
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("created").entities(["customer"]),
            move |ctx: EntryContext| {
                let rec = rec.clone();
                async move {
                    if ctx.stream_seq == 5 {
                        return Err(HandlerError::permanent("seq 5 is bad on purpose"));
                    }
                    rec.0.lock().unwrap().push(Seen {
                        event_id: ctx.event_id().to_string(),
                        seq: ctx.stream_seq,
                        object: ctx.object().to_owned(),
                        name: ctx.event.data.entry.name.clone(),
                        replay: ctx.is_replay,
                        handler: ctx.handler.to_string(),
                    });
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let running = plugin.serve_on(&server, options(None)).await.unwrap();
    let (ok, stdout, stderr) =
        hookbus_replay(&server, &["--to-plugin", "redo", "--handler", "created"]).await;
    assert!(!ok, "a failed re-delivery makes the exit status non-zero");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("seq=5") && stderr.contains("seq 5 is bad on purpose"),
        "{stderr}"
    );
    assert!(stderr.contains("1 failed"), "{stderr}");
    let want: Vec<u64> = all
        .iter()
        .filter(|(s, h, e)| *s >= 4 && *s != 5 && *h == Hook::EntryAfterCreate && e == "customer")
        .map(|(s, _, _)| *s)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(record.all().iter().map(|s| s.seq).collect::<Vec<_>>(), want);
    assert!(record.all().iter().all(|s| s.replay));

    let (ok, _, stderr) =
        hookbus_replay(&server, &["--to-plugin", "redo", "--handler", "nope"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("plugin 'redo' declares no handler 'nope'; its handlers: created"),
        "{stderr}"
    );
    running.shutdown().await.unwrap();
}
