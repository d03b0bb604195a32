//! Dead letters in bulk: every filter of `hookbus::dlq::Filter`, dry runs, the
//! replay rate, the snapshot (dead letters written during a bulk replay or purge
//! are not touched), a replay that fails again (nothing lost, the replay in the
//! record and the audit trail), the bus's request/reply service
//! `pagoda.bus.dlq.list|replay|purge` under the generated NATS users, and the
//! `hookbus dlq` command line.
#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{Behaviour, CallLog, TestPlugin, entry_event, wait_registered};
use core_events::protocol::{DeadLetter, FailedAttempt, headers};
use core_events::{EventId, Hook, Subjects};
use hookbus::dlq::{self, Bound, Filter, PurgeOptions, ReplayOptions, Target};
use hookbus::progress::{Progress, Silent};
use hookbus_tests::{BUS_USER, HOST_USER, NatsServer, init_tracing};

/// Writes a dead letter of `plugin/handler` straight into the stream; returns its sequence.
async fn write_letter(
    js: &jetstream::Context,
    plugin: &str,
    handler: &str,
    hook: Hook,
    entity: &str,
    entry: i64,
    error: &str,
) -> u64 {
    let event = entry_event(hook, entity, entry);
    let letter = DeadLetter {
        event_id: event.id,
        hook,
        entity: entity.to_owned(),
        object: format!("entry/{entry}"),
        plugin: plugin.to_owned(),
        handler: handler.to_owned(),
        stream_seq: 0,
        error: error.to_owned(),
        attempts: vec![FailedAttempt {
            attempt: 1,
            at: chrono::Utc::now(),
            error: error.to_owned(),
        }],
        dead_lettered_at: chrono::Utc::now(),
        event: serde_json::to_value(&event).unwrap(),
        replays: Vec::new(),
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, EventId::new().to_string().as_str());
    js.publish_with_headers(
        Subjects::default().dead_letter(plugin, handler),
        h,
        serde_json::to_vec(&letter).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap()
    .sequence
}

async fn seqs(js: &jetstream::Context, filter: &Filter) -> Vec<u64> {
    dlq::list(js, &Subjects::default(), filter, None)
        .await
        .unwrap_or_else(|e| panic!("{filter:?}: {e}"))
        .iter()
        .map(|l| l.seq)
        .collect()
}

/// Runs `hookbus <args>` as the bus's user and waits for it (at most 30 s).
async fn run_cli(server: &NatsServer, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(hookbus_tests::hookbus_binary());
    cmd.args(args)
        .envs(server.env_for(BUS_USER))
        .env("RUST_LOG", "warn")
        .env_remove("PAGODA_SUBJECT_PREFIX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("hookbus command did not finish in 30 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts `value` is valid against the checked-in schema `schemas/<file>`.
fn assert_schema(file: &str, value: &serde_json::Value) {
    let path = hookbus_tests::workspace_root().join("schemas").join(file);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let errors: Vec<String> = v.iter_errors(value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{file} rejects {value:#}: {errors:?}");
}

/// Asks the bus's dead-letter service as `client`; the request and the reply
/// are checked against their schemas.
async fn ask(
    client: &async_nats::Client,
    verb: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let reply = ask_raw(client, verb, body.clone()).await;
    if reply.get("error").is_some() {
        assert_schema("dlq-error-reply.schema.json", &reply);
    } else {
        assert_schema("dlq-request.schema.json", &body);
        assert_schema(&format!("dlq-{verb}-reply.schema.json"), &reply);
    }
    reply
}

/// Asks the bus's dead-letter service as `client`.
async fn ask_raw(
    client: &async_nats::Client,
    verb: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(format!("pagoda.bus.dlq.{verb}"), body.to_string().into()),
    )
    .await
    .expect("no reply in 20 s")
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test]
async fn each_filter_selects_its_dead_letters_and_bad_filters_name_the_field() {
    init_tracing();
    let server = NatsServer::start().await;
    let bus = common::start_bus(&server, &[]).await;
    let js = jetstream::new(server.connect().await);
    let (ac, au) = (Hook::EntryAfterCreate, Hook::EntryAfterUpdate);
    let s1 = write_letter(&js, "p", "x", ac, "customer", 1, "handler error 500: boom").await;
    let s2 = write_letter(&js, "p", "y", au, "customer", 2, "no reply within 2000 ms").await;
    let s3 = write_letter(
        &js,
        "q",
        "x",
        ac,
        "顧客 master",
        3,
        "handler error 404: Unknown entry",
    )
    .await;
    let t = chrono::Utc::now();
    let s4 = write_letter(&js, "q", "z", au, "customer", 4, "handler error 500: other").await;
    let s5 = write_letter(&js, "p", "x", ac, "order", 5, "bad reply: not JSON").await;
    let all = vec![s1, s2, s3, s4, s5];
    let f = |json: serde_json::Value| -> Filter {
        dlq::from_json(json.to_string().as_bytes()).unwrap()
    };

    assert_eq!(seqs(&js, &Filter::default()).await, all);
    assert_eq!(seqs(&js, &Filter::plugin("p")).await, [s1, s2, s5]);
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"handler": "x"}))).await,
        [s1, s3, s5]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"plugin": "p", "handler": "x"}))).await,
        [s1, s5]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"hook": "entry.after_update"}))).await,
        [s2, s4]
    );
    // Legacy alias.
    assert_eq!(
        seqs(
            &js,
            &f(serde_json::json!({"hook": "after_create_entry_v2"}))
        )
        .await,
        [s1, s3, s5]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"entity": "顧客 master"}))).await,
        [s3]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"since": s2, "until": s4}))).await,
        [s2, s3, s4]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"since": s4.to_string()}))).await,
        [s4, s5]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"since": t.to_rfc3339()}))).await,
        [s4, s5]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"until": t.to_rfc3339()}))).await,
        [s1, s2, s3]
    );
    assert_eq!(seqs(&js, &f(serde_json::json!({"since": "1h"}))).await, all);
    assert!(
        seqs(&js, &f(serde_json::json!({"until": "1h"})))
            .await
            .is_empty()
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"error": "UNKNOWN"}))).await,
        [s3]
    );
    assert_eq!(
        seqs(&js, &f(serde_json::json!({"code": 500}))).await,
        [s1, s4]
    );
    assert_eq!(
        seqs(
            &js,
            &f(serde_json::json!({"plugin": "p", "hook": "entry.after_create", "code": 500}))
        )
        .await,
        [s1]
    );
    // A limit, and paging on with since.
    let page = dlq::list(&js, &Subjects::default(), &Filter::default(), Some(2))
        .await
        .unwrap();
    assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), [s1, s2]);
    let count = dlq::count(
        &js,
        &Subjects::default(),
        &f(serde_json::json!({"code": 500})),
    )
    .await
    .unwrap();
    assert_eq!(count, 2);
    assert_eq!(
        dlq::count(&js, &Subjects::default(), &Filter::plugin("q"))
            .await
            .unwrap(),
        2
    );

    // Bad filters: the error names the field.
    let bad = |json: &str| {
        dlq::from_json::<Filter>(json.as_bytes())
            .unwrap_err()
            .to_string()
    };
    let e = bad(r#"{"hook": "entry.after_creat"}"#);
    assert!(
        e.starts_with("hook: unknown hook 'entry.after_creat'"),
        "{e}"
    );
    let e = bad(r#"{"since": "yesterday"}"#);
    assert!(
        e.starts_with("since: 'yesterday' is not a dead-letter sequence"),
        "{e}"
    );
    let e = bad(r#"{"plugins": "p"}"#);
    assert!(e.contains("unknown field `plugins`"), "{e}");
    let e = bad(r#"{"code": "abc"}"#);
    assert!(e.starts_with("code: "), "{e}");
    let e = Filter {
        since: Some(Bound::Seq(5)),
        until: Some(Bound::Seq(2)),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert_eq!(e, "since: since #5 is after until #2");
    let e = Filter::plugin("p.>").validate().unwrap_err().to_string();
    assert!(e.starts_with("plugin: 'p.>' is not a plugin name"), "{e}");
    assert!(
        dlq::list(&js, &Subjects::default(), &Filter::plugin("a b"), None)
            .await
            .is_err()
    );

    // The service answers the same under the bus's generated user, with errors naming the field.
    let ops = server.connect_as(BUS_USER).await;
    let r = ask(&ops, "list", serde_json::json!({"filter": {"code": 500}})).await;
    let listed: Vec<u64> = r["letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, [s1, s4], "{r}");
    assert_eq!(r["letters"][0]["record"]["plugin"], "p");
    let r = ask(&ops, "list", serde_json::json!({"limit": 2})).await;
    assert_eq!(
        (r["more"].as_bool(), r["next_since"].as_u64()),
        (Some(true), Some(s2 + 1)),
        "{r}"
    );
    let r = ask(
        &ops,
        "list",
        serde_json::json!({"filter": {"hook": "nope"}}),
    )
    .await;
    assert_eq!(r["field"], "filter.hook", "{r}");
    let r = ask(
        &ops,
        "list",
        serde_json::json!({"filter": {"since": 9, "until": 3}}),
    )
    .await;
    assert_eq!(r["field"], "filter.since", "{r}");
    let r = ask(&ops, "replay", serde_json::json!({})).await;
    assert_eq!(r["field"], "filter", "an empty selection needs all: {r}");
    let r = ask(
        &ops,
        "purge",
        serde_json::json!({"seqs": [1], "filter": {"plugin": "p"}}),
    )
    .await;
    assert_eq!(r["field"], "seqs", "{r}");
    let r = ask(
        &ops,
        "purge",
        serde_json::json!({"filter": {"plugin": "p"}, "dry_run": true, "limit": 1}),
    )
    .await;
    assert_eq!(
        (r["matched"].as_u64(), r["purged"].as_u64()),
        (Some(3), Some(0)),
        "{r}"
    );
    assert_eq!(r["sample"].as_array().unwrap().len(), 1);
    let r = ask_raw(&ops, "nonsense", serde_json::json!({})).await;
    assert!(
        r["error"].as_str().unwrap().contains("pagoda.bus.dlq.list"),
        "{r}"
    );
    assert_eq!(
        seqs(&js, &Filter::default()).await,
        all,
        "a dry run deletes nothing"
    );
    // A purge by filter over the service, recorded with the requester's actor.
    let r = ask(
        &ops,
        "purge",
        serde_json::json!({"filter": {"error": "not json"}, "actor": "script-7"}),
    )
    .await;
    assert_eq!(r["purged"], 1, "{r}");
    assert_eq!(seqs(&js, &Filter::default()).await, [s1, s2, s3, s4]);
    let trail = audit_trail(&js).await;
    let purge = trail.iter().find(|e| e["action"] == "dlq.purge").unwrap();
    assert_eq!(purge["actor"], "script-7");
    assert_eq!(purge["details"]["filter"]["error"], "not json");

    // The host and a plugin may not ask it (generated permissions).
    server.allow_plugins(&["p"]).await;
    for user in [HOST_USER, "p"] {
        let c = server.connect_as(user).await;
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            c.request("pagoda.bus.dlq.purge", r#"{"all":true}"#.into()),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "{user} got an answer from the dead-letter service"
        );
    }
    assert_eq!(seqs(&js, &Filter::default()).await.len(), 4);
    bus.stop().await.unwrap();
}

/// Every record of the audit stream, oldest first.
async fn audit_trail(js: &jetstream::Context) -> Vec<serde_json::Value> {
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

/// A progress that, the first time work starts (after the run took its
/// snapshot), writes `n` more dead letters of `p/h` and waits for them.
#[derive(Debug)]
struct WritesDuringRun {
    js: jetstream::Context,
    n: usize,
    written: Arc<Mutex<Vec<u64>>>,
}

impl Progress for WritesDuringRun {
    fn start(&self, _message: &str, _len: Option<u64>) {
        if !self.written.lock().unwrap().is_empty() {
            return;
        }
        let js = self.js.clone();
        let n = self.n;
        let new = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let mut v = Vec::new();
                for i in 0..n {
                    v.push(
                        write_letter(
                            &js,
                            "p",
                            "h",
                            Hook::EntryAfterCreate,
                            "customer",
                            100 + i as i64,
                            "handler error 500: new",
                        )
                        .await,
                    );
                }
                v
            })
        });
        *self.written.lock().unwrap() = new;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_replay_and_purge_work_on_a_snapshot_at_a_bounded_rate() {
    init_tracing();
    let server = NatsServer::start().await;
    let bus = common::start_bus(&server, &["p"]).await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let log = CallLog::default();
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 10);
    p.set("h", Behaviour::Ok);
    p.start(&server).await;
    wait_registered(&bus, &["p"]).await;
    let mut before = Vec::new();
    for i in 0..6 {
        before.push(
            write_letter(
                &js,
                "p",
                "h",
                Hook::EntryAfterCreate,
                "customer",
                i,
                "handler error 500: old",
            )
            .await,
        );
    }
    let subjects = Subjects::default();
    let target = Target::Filter(Filter::plugin("p"));

    // Dry run: the count and a sample, nothing replayed.
    let dry = dlq::replay(
        &client,
        &subjects,
        &target,
        &ReplayOptions {
            dry_run: true,
            sample: 2,
            ..Default::default()
        },
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!((dry.matched, dry.sample.len(), log.len()), (6, 2, 0));
    assert_eq!(dry.sample[0].seq, before[0]);

    // The run: new matching dead letters written after it started are left alone.
    let written = Arc::new(Mutex::new(Vec::new()));
    let progress = WritesDuringRun {
        js: js.clone(),
        n: 3,
        written: written.clone(),
    };
    let rate = 20.0;
    let started = Instant::now();
    let report = dlq::replay(
        &client,
        &subjects,
        &target,
        &ReplayOptions {
            rate,
            ..Default::default()
        },
        &progress,
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let new = written.lock().unwrap().clone();
    assert_eq!(new.len(), 3);
    assert_eq!(
        (report.matched, report.succeeded, report.failed),
        (6, 6, 0),
        "{report:?}"
    );
    assert!(
        new.iter().all(|s| *s > report.last_seq),
        "{new:?} vs {}",
        report.last_seq
    );
    assert_eq!(
        log.count("p", "h"),
        6,
        "only the dead letters present at the start"
    );
    assert_eq!(
        seqs(&js, &Filter::default()).await,
        new,
        "the new ones are still there"
    );
    // 6 replays at 20/s: the 6th starts 5 periods after the first.
    assert!(
        took >= Duration::from_millis(250),
        "6 replays at 20/s took {took:?}"
    );
    eprintln!("6 replays at 20/s took {took:?}");
    let trail = audit_trail(&js).await;
    let letters: Vec<&serde_json::Value> = trail
        .iter()
        .filter(|e| e["action"] == "dlq.replay.letter")
        .collect();
    assert_eq!(letters.len(), 6);
    assert!(
        letters
            .iter()
            .all(|e| e["details"]["run"] == report.run.as_str()
                && e["details"]["outcome"] == "succeeded")
    );
    let run = trail.iter().find(|e| e["action"] == "dlq.replay").unwrap();
    assert_eq!(run["details"]["filter"]["plugin"], "p");
    assert_eq!(
        (
            run["details"]["matched"].as_u64(),
            run["details"]["last_seq"].as_u64()
        ),
        (Some(6), Some(report.last_seq))
    );

    // Purge by a filter the server cannot apply (entity: one by one) and by one it
    // can (plugin: one server-side purge up to the snapshot's end): new ones stay.
    for filter in [
        Filter {
            entity: Some("customer".into()),
            ..Default::default()
        },
        Filter::plugin("p"),
    ] {
        let present = seqs(&js, &Filter::default()).await;
        let written = Arc::new(Mutex::new(Vec::new()));
        let progress = WritesDuringRun {
            js: js.clone(),
            n: 2,
            written: written.clone(),
        };
        let report = dlq::purge(
            &js,
            &subjects,
            &Target::Filter(filter.clone()),
            &PurgeOptions::default(),
            &progress,
        )
        .await
        .unwrap();
        let new = written.lock().unwrap().clone();
        assert_eq!(
            report.purged,
            present.len() as u64,
            "{filter:?}: {report:?}"
        );
        assert_eq!(seqs(&js, &Filter::default()).await, new, "{filter:?}");
    }
    // By sequence.
    let left = seqs(&js, &Filter::default()).await;
    let report = dlq::purge(
        &js,
        &subjects,
        &Target::Seqs(vec![left[0], 999_999]),
        &PurgeOptions::default(),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!((report.matched, report.purged), (1, 1));
    assert_eq!(seqs(&js, &Filter::default()).await, left[1..]);
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn a_replay_that_fails_again_loses_nothing_and_is_recorded() {
    init_tracing();
    let server = NatsServer::start().await;
    let bus = common::start_bus(&server, &["p"]).await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let log = CallLog::default();
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 10);
    p.set("h", Behaviour::Fail(503));
    p.start(&server).await;
    wait_registered(&bus, &["p"]).await;
    // A real dead letter: the dispatcher gives up after its attempts.
    hookbus::Publisher::new(js.clone(), Subjects::default())
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 42))
        .await
        .unwrap();
    let first = hookbus_tests::wait_for(Duration::from_secs(20), || {
        let js = js.clone();
        async move {
            dlq::list(&js, &Subjects::default(), &Filter::default(), None)
                .await
                .ok()
                .and_then(|l| l.into_iter().next())
        }
    })
    .await;
    let old = first.record().unwrap();
    assert!(old.replays.is_empty());

    // Over the service, as the bus's user: fails again.
    let ops = server.connect_as(BUS_USER).await;
    let r = ask(
        &ops,
        "replay",
        serde_json::json!({"filter": {"code": 503}, "actor": "alice", "rate": 100}),
    )
    .await;
    assert_eq!(
        (r["matched"].as_u64(), r["failed"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let new_seq = r["outcomes"][0]["new_seq"].as_u64().unwrap();
    assert_eq!(r["outcomes"][0]["outcome"], "failed");
    let letters = dlq::list(&js, &Subjects::default(), &Filter::default(), None)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "replaced, not added");
    assert_eq!(letters[0].seq, new_seq);
    let new = letters[0].record().unwrap();
    assert_eq!(new.attempts.len(), old.attempts.len() + 1);
    assert_eq!(new.attempts[..old.attempts.len()], old.attempts[..]);
    assert!(
        new.attempts
            .last()
            .unwrap()
            .error
            .contains("handler error 503")
    );
    assert_eq!(
        (new.event_id, &new.event, new.stream_seq),
        (old.event_id, &old.event, old.stream_seq)
    );
    assert_eq!(new.replays.len(), 1);
    let rec = &new.replays[0];
    assert_eq!(
        (rec.actor.as_str(), rec.replaced_seq, rec.run.as_str()),
        ("alice", first.seq, r["run"].as_str().unwrap())
    );
    assert_eq!(rec.attempt, new.attempts.last().unwrap().attempt);

    // Once more with the command line: a second record, carried over.
    let (code, out, err) = run_cli(
        &server,
        &["dlq", "replay", "--plugin", "p", "--rate", "50/s"],
    )
    .await;
    assert_eq!(code, 1, "a failed replay exits 1: {out}{err}");
    assert!(out.contains("failed again (handler error 503"), "{out}");
    let letters = dlq::list(&js, &Subjects::default(), &Filter::default(), None)
        .await
        .unwrap();
    let last = letters[0].record().unwrap();
    assert_eq!(
        (last.attempts.len(), last.replays.len()),
        (old.attempts.len() + 2, 2)
    );
    assert_eq!(last.replays[1].replaced_seq, new_seq);
    let (code, out, _) = run_cli(&server, &["dlq", "show", &letters[0].seq.to_string()]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("replays (2):") && out.contains("by alice"),
        "{out}"
    );
    let trail = audit_trail(&js).await;
    let failed: Vec<_> = trail
        .iter()
        .filter(|e| e["action"] == "dlq.replay.letter" && e["details"]["outcome"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0]["actor"], "alice");
    assert_eq!(failed[0]["details"]["new_seq"].as_u64(), Some(new_seq));
    // The first dead letter is gone; `show` says where it went.
    let (code, out, _) = run_cli(&server, &["dlq", "show", &first.seq.to_string()]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("by alice") && out.contains(&format!("it is now #{new_seq}")),
        "{out}"
    );
    let last_seq = letters[0].seq;

    // Fixed: the replay succeeds and the dead letter goes.
    p.set("h", Behaviour::Ok);
    let calls = log.len();
    let (code, out, err) = run_cli(
        &server,
        &[
            "dlq",
            "replay",
            "--hook",
            "entry.after_create",
            "--entity",
            "customer",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok, dead letter removed"), "{out}");
    assert_eq!(log.len(), calls + 1);
    let (_, out, _) = run_cli(&server, &["dlq", "show", &last_seq.to_string()]).await;
    assert!(out.contains("replayed successfully at"), "{out}");
    let (code, _, err) = run_cli(&server, &["dlq", "show", "999999"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no dead letter #999999"), "{err}");
    assert!(
        dlq::list(&js, &Subjects::default(), &Filter::default(), None)
            .await
            .unwrap()
            .is_empty()
    );
    bus.stop().await.unwrap();
}

#[tokio::test]
async fn the_command_line_filters_dry_runs_and_refuses_bad_flags() {
    init_tracing();
    let server = NatsServer::start().await;
    let bus = common::start_bus(&server, &[]).await;
    let js = jetstream::new(server.connect().await);
    let a = write_letter(
        &js,
        "flaky",
        "always_fails",
        Hook::EntryAfterCreate,
        "customer",
        10,
        "handler error 500: flaky",
    )
    .await;
    let b = write_letter(
        &js,
        "flaky",
        "always_fails",
        Hook::EntryAfterUpdate,
        "order",
        20,
        "no reply within 2000 ms",
    )
    .await;

    let (code, out, err) = run_cli(
        &server,
        &["dlq", "ls", "--hook", "entry.after_create", "--code", "500"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("#{a} ")) && !out.contains(&format!("#{b} ")),
        "{out}"
    );
    assert!(out.contains("1 dead letter(s)"), "{out}");
    let (_, out, _) = run_cli(&server, &["dlq", "ls", "--limit", "1"]).await;
    assert!(
        out.contains(&format!("more with --since {}", a + 1)),
        "{out}"
    );
    let (code, out, _) = run_cli(
        &server,
        &[
            "dlq",
            "replay",
            "--plugin",
            "flaky",
            "--since",
            "2h",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("would replay 2 dead letter(s) of plugin flaky, since "),
        "{out}"
    );
    assert!(
        out.contains(&format!("#{a} ")) && out.contains(&format!("#{b} ")),
        "{out}"
    );
    let (code, out, _) = run_cli(
        &server,
        &["dlq", "purge", "--error", "no reply", "--dry-run"],
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("would purge 1 dead letter(s) of error ~ 'no reply'"),
        "{out}"
    );
    let (code, _, err) = run_cli(&server, &["dlq", "purge", "--error", "no reply"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("would delete 1 dead letter(s)"), "{err}");
    assert_eq!(
        seqs(&js, &Filter::default()).await,
        [a, b],
        "nothing deleted yet"
    );

    for (args, says) in [
        (
            &["dlq", "ls", "--hook", "entry.after_creat"][..],
            "unknown hook 'entry.after_creat'",
        ),
        (
            &["dlq", "ls", "--since", "5", "--until", "2"],
            "--since: since #5 is after until #2",
        ),
        (
            &["dlq", "ls", "--until", "last tuesday"],
            "'last tuesday' is not a dead-letter sequence",
        ),
        (
            &["dlq", "replay", "--rate", "0/s"],
            "rate '0/s' is not a positive number",
        ),
        (
            &["dlq", "replay", "--rate", "5/week"],
            "unknown unit '/week'",
        ),
        (&["dlq", "replay"], "say which dead letters"),
        (
            &["dlq", "purge", "3", "--plugin", "flaky", "--yes"],
            "give sequences or a filter",
        ),
    ] {
        let (code, out, err) = run_cli(&server, args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, out, _) = run_cli(&server, &["dlq", "purge", "--error", "no reply", "--yes"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("purged 1 dead letter(s)"), "{out}");
    assert_eq!(seqs(&js, &Filter::default()).await, [a]);

    // Every `nats req pagoda.bus.dlq.…` example of the docs is a request the
    // service takes (no error reply), as the operator's user.
    let ops = server.connect_as(BUS_USER).await;
    let mut examples = 0;
    for doc in ["docs/operations.md", "docs/protocol.md"] {
        let text = std::fs::read_to_string(hookbus_tests::workspace_root().join(doc)).unwrap();
        for line in text.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("nats req ") else {
                continue;
            };
            let rest = rest.strip_prefix("--timeout 5m ").unwrap_or(rest);
            let Some((subject, body)) = rest.split_once(' ') else {
                continue;
            };
            let Some(verb) = subject.strip_prefix("pagoda.bus.dlq.") else {
                continue;
            };
            let body: serde_json::Value = serde_json::from_str(body.trim_matches('\''))
                .unwrap_or_else(|e| panic!("{doc}: {line}: {e}"));
            let r = ask(&ops, verb, body).await;
            assert!(r.get("error").is_none(), "{doc}: {line}: {r}");
            examples += 1;
        }
    }
    assert!(examples >= 8, "{examples} examples");

    // Every `hookbus dlq` example of docs/operations.md and of `hookbus dlq --help`
    // runs: no usage error other than the documented refusals.
    let (_, help, _) = run_cli(&server, &["dlq", "--help"]).await;
    let ops_doc =
        std::fs::read_to_string(hookbus_tests::workspace_root().join("docs/operations.md"))
            .unwrap();
    let lines: Vec<String> = ops_doc
        .lines()
        .filter_map(|l| l.strip_prefix("$ hookbus "))
        .chain(
            help.lines()
                .skip_while(|l| !l.starts_with("Examples:"))
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.trim().strip_prefix("hookbus ")),
        )
        .filter(|l| l.starts_with("dlq"))
        .map(|l| l.split(" #").next().unwrap().trim().to_owned())
        .collect();
    assert!(lines.len() >= 15, "{lines:?}");
    for line in &lines {
        let args = shell_words(line);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = run_cli(&server, &args).await;
        let refused = err.contains("would delete") || err.contains("no dead letter #");
        assert!(
            code == 0 || code == 1 || (code == 2 && refused),
            "hookbus {line}: exit {code}\n{out}{err}"
        );
    }
    bus.stop().await.unwrap();
}

/// Splits a documented command line into words: spaces, and single quotes.
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

/// A reply the server could not carry: a list is refused naming `limit`; a
/// replay keeps its counts and drops its sample.
#[tokio::test]
async fn replies_larger_than_max_payload_are_cut_or_refused() {
    init_tracing();
    let server = NatsServer::start_for_with(&[], "max_payload: 64KB").await;
    let bus = common::start_bus(&server, &[]).await;
    let js = jetstream::new(server.connect().await);
    for i in 0..3 {
        let seq = write_letter(&js, "big", "h", Hook::EntryAfterCreate, "customer", i, "e").await;
        // The same dead letter with a 30 kB event.
        let mut record = dlq::get(&js, &Subjects::default(), seq)
            .await
            .unwrap()
            .unwrap()
            .body;
        record["event"] = serde_json::Value::String("x".repeat(30_000));
        js.publish("pagoda.dlq.big.h", record.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        js.get_stream("PAGODA_DLQ")
            .await
            .unwrap()
            .delete_message(seq)
            .await
            .unwrap();
    }
    let ops = server.connect_as(BUS_USER).await;
    let r = ask(
        &ops,
        "list",
        serde_json::json!({"filter": {"plugin": "big"}}),
    )
    .await;
    assert_eq!(r["field"], "limit", "{r}");
    assert!(r["error"].as_str().unwrap().contains("max_payload"), "{r}");
    let r = ask(
        &ops,
        "list",
        serde_json::json!({"filter": {"plugin": "big"}, "limit": 1}),
    )
    .await;
    assert_eq!(r["letters"].as_array().unwrap().len(), 1, "{r}");
    let r = ask(
        &ops,
        "replay",
        serde_json::json!({"filter": {"plugin": "big"}, "dry_run": true, "limit": 3}),
    )
    .await;
    assert_eq!(
        (r["matched"].as_u64(), r["truncated"].as_bool()),
        (Some(3), Some(true)),
        "{r}"
    );
    assert_eq!(r["sample"], serde_json::json!([]));
    bus.stop().await.unwrap();
}
