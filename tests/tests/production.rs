//! The production deployment as processes (`hookbus run`, `hookbus host`, the
//! example plugin binaries, each as its own generated NATS user, on a
//! nats-server with the `docker/` limits): every committed change reaches the
//! plugins, nothing else is in the stream, nothing stays in the outbox, and no
//! component hits a permission it lacks. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use core_events::Hook;
use hookbus_tests::consistency::Ledger;
use hookbus_tests::deploy::Deployment;
use hookbus_tests::{TestDb, assert_eventually};
use reqwest::StatusCode;
use serde_json::json;
use store::Backend;

const WAIT: Duration = Duration::from_secs(30);

fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_change_reaches_its_plugins_with_no_permission_violation() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let d = Deployment::start(&db, &["hello-world", "audit-log"]).await;
        let mut ledger = Ledger::default();

        let (status, entity) = d
            .post(
                "/api/v2/entities/",
                json!({"name": "helloworld", "attrs": [{"name": "phone", "type": "string"}]}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{entity}");
        let entity_id = entity["id"].as_i64().unwrap();
        ledger.committed(Hook::EntityAfterCreate, format!("entity/{entity_id}"));

        let mut entries = Vec::new();
        for name in ["Hello", "World", "Again"] {
            let (status, entry) = d
                .post(
                    &format!("/api/v2/entities/{entity_id}/entries/"),
                    json!({"name": name, "attrs": {"phone": "123"}}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{entry}");
            // hello-world's before_create filled the note.
            assert_eq!(entry["note"], "created with hello-world", "{entry}");
            let id = entry["id"].as_i64().unwrap();
            ledger.committed(Hook::EntryAfterCreate, format!("entry/{id}"));
            entries.push(id);
        }
        // hello-world's validator vetoes: 400, nothing committed.
        let (status, body) = d
            .post(
                &format!("/api/v2/entities/{entity_id}/entries/"),
                json!({"name": "forbidden fruit"}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

        // Bad input: each refused with a 400 naming what is wrong, nothing
        // committed (the ledger check below finds any event it made).
        let deep = (0..40).fold(json!("x"), |inner, _| json!([inner]));
        let bad_inputs = [
            (
                "/api/v2/entities/".to_owned(),
                json!({"name": "deep", "attrs": [{"name": "d", "type": "string", "default_value": deep}]}),
                "nest",
            ),
            (
                "/api/v2/entities/".to_owned(),
                json!({"name": "typed", "attrs": [{"name": "n", "type": "number", "default_value": "NaN-text"}]}),
                "default_value",
            ),
            (
                format!("/api/v2/entities/{entity_id}/entries/"),
                json!({"name": "nul\u{0}name"}),
                "name",
            ),
        ];
        for (path, body, names) in bad_inputs {
            let (status, answer) = d.post(&path, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
            assert!(
                answer.to_string().contains(names),
                "{path}: the error names {names}: {answer}"
            );
        }
        let (status, answer) = crate_call(
            d.request(
                reqwest::Method::POST,
                &format!("/api/v2/entities/{entity_id}/entries/"),
            )
            .header("content-type", "application/json")
            .body(r#"{"name": "twice", "name": "again"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer.to_string().contains("twice"), "{answer}");

        // Events carry the entry before and after an update: a 600 KB note can be
        // created (one copy), but changing it would make a 1.2 MB event, more
        // than NATS takes. 413 naming the size and the limit, nothing committed.
        let (status, big) = d
            .post(
                &format!("/api/v2/entities/{entity_id}/entries/"),
                json!({"name": "big", "note": "n".repeat(600_000)}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{big}");
        let big_id = big["id"].as_i64().unwrap();
        ledger.committed(Hook::EntryAfterCreate, format!("entry/{big_id}"));
        let (status, answer) = crate_call(
            d.request(
                reqwest::Method::PATCH,
                &format!("/api/v2/entries/{big_id}/"),
            )
            .json(&json!({"note": "m".repeat(600_000)})),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        assert!(
            answer["size"].as_u64().unwrap() > answer["limit"].as_u64().unwrap(),
            "{answer}"
        );

        // An update and a delete of the first entry.
        let first = entries[0];
        let (status, body) = crate_call(
            d.request(reqwest::Method::PATCH, &format!("/api/v2/entries/{first}/"))
                .json(&json!({"note": "changed"})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ledger.committed(Hook::EntryAfterUpdate, format!("entry/{first}"));
        let (status, body) = crate_call(d.request(
            reqwest::Method::DELETE,
            &format!("/api/v2/entries/{first}/"),
        ))
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ledger.committed(Hook::EntryAfterDelete, format!("entry/{first}"));

        // A read through get_attrs and a plugin API route, over request/reply.
        let (status, entry) = d.get(&format!("/api/v2/entries/{}/", entries[1])).await;
        assert_eq!(status, StatusCode::OK, "{entry}");
        let (status, greeting) = d.get("/api/v2/plugins/hello-world/greet").await;
        assert_eq!(status, StatusCode::OK, "{greeting}");
        assert_eq!(greeting["message"], "Hello, root!");

        // Every event reached both plugins (audit-log has one handler for all).
        let audit = d.plugin("audit-log");
        assert_eventually!(
            audit.count(&["[audit-log]", "attempt=1"]) >= ledger.len(),
            WAIT,
            "audit-log got {} of {} events:\n{}",
            audit.count(&["[audit-log]"]),
            ledger.len(),
            d.outputs()
        );
        let hello = d.plugin("hello-world");
        for id in &entries {
            let object = format!("object=entry/{id} ");
            assert_eventually!(
                hello.count(&["entry_created", &object]) == 1,
                WAIT,
                "hello-world did not get entry {id}:\n{}",
                d.outputs()
            );
        }

        // A foreign host's event without the attributes the protocol calls
        // optional (`time`, `subject`, `datacontenttype`, `dataschema`) and without
        // a Pagoda-Object header: every Rust plugin handles it, the object read
        // from `data`. Published as the host's user, straight to the stream.
        let mut foreign = serde_json::to_value(core_events::sample::entry_event(
            Hook::EntryAfterCreate,
            "helloworld",
            987_654,
        ))
        .unwrap();
        for optional in ["time", "subject", "datacontenttype", "dataschema"] {
            foreign.as_object_mut().unwrap().remove(optional);
        }
        let host = d.nats.connect_as(hookbus_tests::HOST_USER).await;
        let subject = core_events::Subjects::default()
            .event(Hook::EntryAfterCreate, "helloworld", 987_654)
            .unwrap();
        async_nats::jetstream::new(host)
            .publish(subject, foreign.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        for plugin in ["hello-world", "audit-log"] {
            assert_eventually!(
                d.plugin(plugin)
                    .count(&["object=entry/987654 ", "attempt=1"])
                    >= 1,
                WAIT,
                "{plugin} did not handle the foreign event:\n{}",
                d.outputs()
            );
        }
        ledger.committed(Hook::EntryAfterCreate, "entry/987654");

        ledger.check(&d.nats, &db.store().await).await;
        // The operator's view: `hookbus health` as the bus's user says all is well.
        let (code, stdout, stderr) = d.hookbus(&["health"]).await;
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(
            stdout.contains("relay:") && stdout.contains("hello-world"),
            "{stdout}"
        );
        let violations = d.violations();
        assert!(
            violations.is_empty(),
            "{backend:?}: permission violations under the generated users:\n{}",
            violations.join("\n")
        );
    }
}

async fn crate_call(req: reqwest::RequestBuilder) -> (StatusCode, serde_json::Value) {
    hookbus_tests::host::call(req).await
}

/// Writes `n` entries named `<prefix>-<i>` into `entity`, recording each 2xx in
/// `ledger`; any other answer (NATS down: a sync hook cannot be asked) is
/// allowed, as long as it commits nothing.
async fn write_entries(d: &Deployment, ledger: &mut Ledger, entity: i64, prefix: &str, n: usize) {
    for i in 0..n {
        let (status, body) = d
            .post(
                &format!("/api/v2/entities/{entity}/entries/"),
                json!({"name": format!("{prefix}-{i}")}),
            )
            .await;
        if status.is_success() {
            ledger.committed(
                Hook::EntryAfterCreate,
                format!("entry/{}", body["id"].as_i64().unwrap()),
            );
        }
    }
}

/// Faults under the production profile: nats-server killed with SIGKILL and
/// restarted between writes, a plugin killed and started again. Afterwards every
/// 2xx write is exactly one event, none without a commit, the outbox is empty,
/// and audit-log's journal has every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_nats_and_plugin_crashes_every_committed_change_is_one_event() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let mut d = Deployment::start(&db, &["hello-world", "audit-log"]).await;
        let mut ledger = Ledger::default();
        let (status, entity) = d.post("/api/v2/entities/", json!({"name": "faults"})).await;
        assert_eq!(status, StatusCode::CREATED, "{entity}");
        let entity_id = entity["id"].as_i64().unwrap();
        ledger.committed(Hook::EntityAfterCreate, format!("entity/{entity_id}"));

        write_entries(&d, &mut ledger, entity_id, "before", 10).await;
        // NATS dies mid-stream (nothing flushed) and comes back on the same port.
        // A write meanwhile cannot ask its sync hooks: it waits for them (5 s)
        // and is refused, committing nothing.
        d.nats.kill();
        write_entries(&d, &mut ledger, entity_id, "during", 1).await;
        d.nats.restart().await;
        write_entries(&d, &mut ledger, entity_id, "after", 10).await;
        // A plugin dies with deliveries in flight and comes back.
        d.kill_plugin("audit-log").await;
        write_entries(&d, &mut ledger, entity_id, "plugin-down", 5).await;
        d.restart_plugin("audit-log").await;

        ledger.check(&d.nats, &db.store().await).await;
        // Every committed change reached audit-log: its journal (idempotent on
        // the event id, so redeliveries after the crash are not counted twice)
        // holds every (object, hook). The journal, not the plugin's output: a kill
        // between the journal's write and the line printed after it loses the line.
        let journal = d.nats.dir().join("audit-log.jsonl");
        let distinct = || {
            let mut seen: Vec<String> = std::fs::read_to_string(&journal)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|r| format!("{} {}", r["object"], r["hook"]))
                .collect();
            seen.sort();
            seen.dedup();
            seen.len()
        };
        // The entity and the ten writes before the crash had NATS (writes right
        // after the restart may wait out their sync hooks while the host
        // reconnects, and be refused: they commit nothing, as the check shows).
        assert!(
            ledger.len() >= 11,
            "most writes succeeded: {}",
            ledger.len()
        );
        assert_eventually!(
            distinct() >= ledger.len(),
            WAIT,
            "audit-log saw {} distinct (object, hook) of {}:\n{}",
            distinct(),
            ledger.len(),
            d.outputs()
        );
    }
}
