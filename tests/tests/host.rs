//! The reference host end to end: real HTTP (reqwest), a real nats-server, SDK
//! plugins in-process, SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use core_events::{AttrType, Attribute, Envelope, ObjectRef, OnUnavailable};
use hookbus_tests::ServeOn;
use hookbus_tests::host::{TestHost, call};
use hookbus_tests::{NatsServer, TestDb, assert_eventually, stream_events};
use pagoda_plugin_sdk::{
    FieldError, Plugin, PluginBuilder, RunningPlugin, ServeOptions, SyncError, SyncHandler,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use store::{Backend, outbox};

const WAIT: Duration = Duration::from_secs(15);

fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

struct Setup {
    host: TestHost,
    client: async_nats::Client,
    running: Vec<RunningPlugin>,
    // Dropped last: the host and plugins need them until then.
    _db: TestDb,
    _nats: NatsServer,
}

impl Setup {
    async fn stop(self) {
        for p in self.running {
            let _ = p.shutdown().await;
        }
        self.host.stop().await;
    }
}

/// A host with `plugins` served and registered (ENABLED_PLUGINS = their ids in order).
async fn setup(backend: Backend, plugins: Vec<PluginBuilder>) -> Setup {
    setup_with(backend, plugins, |_| {}).await
}

async fn setup_with(
    backend: Backend,
    plugins: Vec<PluginBuilder>,
    configure: impl FnOnce(&mut hookbus_host::HostConfig),
) -> Setup {
    let nats = NatsServer::start().await;
    let db = TestDb::new(backend).await;
    let plugins: Vec<Plugin> = plugins.into_iter().map(|p| p.build().unwrap()).collect();
    let ids: Vec<String> = plugins.iter().map(|p| p.id().to_owned()).collect();
    let host = TestHost::start_with(&nats, &db, |c| {
        c.enabled_plugins = ids.clone();
        configure(c);
    })
    .await;
    let client = nats.connect().await;
    let mut running = Vec::new();
    for p in plugins {
        running.push(p.serve_on(&nats, ServeOptions::default()).await.unwrap());
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    host.wait_registered(&id_refs).await;
    Setup {
        host,
        client,
        running,
        _db: db,
        _nats: nats,
    }
}

async fn create_entity(host: &TestHost, body: Value) -> Value {
    let (status, e) = call(host.as_admin(Method::POST, "/api/v2/entities/").json(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{e}");
    e
}

fn customer() -> Value {
    json!({
        "name": "customer",
        "note": "people",
        "attrs": [
            {"name": "phone", "type": "string"},
            {"name": "age", "type": 256},
        ],
    })
}

/// The event types in the stream, once the outbox is empty and the stream has `n`.
async fn events_once(s: &Setup, n: usize) -> Vec<Envelope<Value>> {
    let store = s.host.store().clone();
    let client = s.client.clone();
    assert_eventually!(
        outbox::backlog(store.pool()).await.unwrap().rows == 0
            && stream_events(&client).await.len() >= n,
        WAIT,
        "the stream did not get {n} events"
    );
    stream_events(&s.client).await
}

/// The events about one object (`entry/<id>`, `entity/<id>`), in stream order.
fn of(events: &[Envelope<Value>], subject: &str) -> Vec<Envelope<Value>> {
    events
        .iter()
        .filter(|e| e.subject.as_deref() == Some(subject))
        .cloned()
        .collect()
}

fn types(events: &[Envelope<Value>]) -> Vec<String> {
    events.iter().map(|e| e.event_type.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_entry_is_not_stored_emits_no_event_and_lists_every_validators_error() {
    for backend in backends() {
        let phone = Plugin::builder("phone-check", "Phone", "1.0.0").on_validate(
            SyncHandler::named("phone").priority(10),
            |ctx| async move {
                let e = &ctx.request.entry;
                let mut errors = Vec::new();
                if !e.attrs.contains_key("phone") {
                    errors.push(FieldError::field("phone", "phone is required"));
                }
                if e.name.starts_with("bad") {
                    errors.push(FieldError::general("bad names are not allowed"));
                }
                Ok(errors)
            },
        );
        let age = Plugin::builder("age-check", "Age", "1.0.0").on_validate(
            SyncHandler::named("adult").priority(20),
            |ctx| async move {
                let age = ctx.request.entry.attrs.get("age").and_then(Value::as_f64);
                Ok(match age {
                    Some(a) if a >= 18.0 => vec![],
                    _ => vec![FieldError::field("age", "must be 18 or older")],
                })
            },
        );
        let s = setup(backend, vec![age, phone]).await;
        let entity = create_entity(&s.host, customer()).await;
        let path = format!("/api/v2/entities/{}/entries/", entity["id"]);

        let (status, body) = call(
            s.host
                .as_user(Method::POST, &path)
                .json(&json!({"name": "bad one", "attrs": {"age": 3}})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{backend:?}: {body}");
        assert_eq!(body["error"], "validation_error");
        assert_eq!(
            body["errors"],
            json!([
                {"plugin": "phone-check", "handler": "phone", "field": "phone", "message": "phone is required"},
                {"plugin": "phone-check", "handler": "phone", "field": null, "message": "bad names are not allowed"},
                {"plugin": "age-check", "handler": "adult", "field": "age", "message": "must be 18 or older"},
            ]),
            "{backend:?}"
        );

        // Nothing stored.
        let (status, list) = call(s.host.as_user(Method::GET, &path)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["results"], json!([]), "{backend:?}");

        // A good entry after it: the stream has the entity's event and the good
        // entry's, never one for the rejected entry.
        let (status, good) = call(
            s.host
                .as_user(Method::POST, &path)
                .json(&json!({"name": "good", "attrs": {"age": 30, "phone": "555"}})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{good}");
        let events = events_once(&s, 2).await;
        let mut all = types(&events);
        all.sort();
        assert_eq!(
            all,
            ["pagoda.entity.after_create", "pagoda.entry.after_create"],
            "{backend:?}"
        );
        let good_events = of(&events, &format!("entry/{}", good["id"]));
        assert_eq!(good_events[0].data["entry"]["name"], "good");
        assert!(
            !events
                .iter()
                .any(|e| e.data.to_string().contains("bad one")),
            "{backend:?}: the rejected entry emitted an event"
        );
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_create_chain_stores_both_plugins_changes_in_priority_order() {
    for backend in backends() {
        // Enabled first, but runs second: priority decides.
        let second = Plugin::builder("second", "Second", "1.0.0").on_before_create_entry(
            SyncHandler::named("append").priority(20),
            |ctx| async move {
                let mut draft = ctx.request.data;
                draft.note.push_str("+second");
                draft
                    .attrs
                    .insert("phone".into(), json!(draft.note.clone()));
                Ok(draft)
            },
        );
        let first = Plugin::builder("first", "First", "1.0.0").on_before_create_entry(
            SyncHandler::named("set").priority(10),
            |ctx| async move {
                let mut draft = ctx.request.data;
                assert_eq!(ctx.request.user.unwrap().username, "user");
                draft.note = "first".into();
                draft.name = draft.name.to_uppercase();
                Ok(draft)
            },
        );
        let s = setup(backend, vec![second, first]).await;
        let entity = create_entity(&s.host, customer()).await;
        let path = format!("/api/v2/entities/{}/entries/", entity["id"]);
        let (status, entry) = call(
            s.host
                .as_user(Method::POST, &path)
                .json(&json!({"name": "acme", "note": "client"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entry}");
        assert_eq!(entry["name"], "ACME");
        assert_eq!(entry["note"], "first+second");

        let id = entry["id"].as_i64().unwrap();
        let stored = s.host.store().entry(id).await.unwrap();
        assert_eq!(stored.name, "ACME", "{backend:?}");
        assert_eq!(stored.note, "first+second");
        let phone = stored.attrs.iter().find(|a| a.name == "phone").unwrap();
        assert_eq!(phone.value, "first+second");
        let events = events_once(&s, 2).await;
        let created = of(&events, &format!("entry/{id}"));
        assert_eq!(created[0].data["entry"]["note"], "first+second");
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_validator_gets_503_with_the_reason_or_is_skipped_never_hangs() {
    for backend in backends() {
        let strict = Plugin::builder("strict", "Strict", "1.0.0")
            .on_validate("v", |_ctx| async move { Ok(vec![]) });
        let lenient = Plugin::builder("lenient", "Lenient", "1.0.0").on_validate(
            SyncHandler::named("v").on_unavailable(OnUnavailable::Skip),
            |_ctx| async move { Ok(vec![]) },
        );
        let stuck = Plugin::builder("stuck", "Stuck", "1.0.0").on_before_create_entry(
            SyncHandler::named("hangs").timeout(Duration::from_millis(300)),
            |ctx| async move {
                if ctx.request.data.name.starts_with("hang") {
                    std::future::pending::<()>().await;
                }
                Ok(ctx.request.data)
            },
        );
        let mut s = setup(backend, vec![strict, lenient, stuck]).await;
        let entity = create_entity(&s.host, customer()).await;
        let path = format!("/api/v2/entities/{}/entries/", entity["id"]);
        let post = |name: &str| {
            s.host
                .as_user(Method::POST, &path)
                .json(&json!({ "name": name }))
        };

        // A before-hook that never answers: 503 within its timeout.
        let started = Instant::now();
        let (status, body) = call(post("hang")).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "hook_unavailable");
        assert_eq!(
            (body["plugin"].as_str(), body["handler"].as_str()),
            (Some("stuck"), Some("hangs"))
        );
        assert_eq!(body["hook"], "entry.before_create");
        assert!(
            body["reason"].as_str().unwrap().contains("300 ms"),
            "{body}"
        );

        // The blocking validator stopped: 503 naming it, nothing stored.
        let strict = s.running.remove(0);
        strict.shutdown().await.unwrap();
        let started = Instant::now();
        let (status, body) = call(post("while-strict-is-down")).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{backend:?}: {body}"
        );
        assert_eq!(body["plugin"], "strict");
        assert_eq!(body["hook"], "entry.validate");
        assert!(
            body["reason"].as_str().unwrap().contains("no responders"),
            "{body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("strict/v is unavailable"),
            "{body}"
        );
        let (_, list) = call(s.host.as_user(Method::GET, &path)).await;
        assert_eq!(list["count"], 0, "{list}");

        // Strict back, the lenient one (skip) down: the write succeeds and says so.
        let strict_again = Plugin::builder("strict", "Strict", "1.0.0")
            .on_validate("v", |_ctx| async move { Ok(vec![]) })
            .build()
            .unwrap();
        s.running.push(
            strict_again
                .serve_on(&s._nats, ServeOptions::default())
                .await
                .unwrap(),
        );
        let lenient = s.running.remove(0);
        lenient.shutdown().await.unwrap();
        let r = post("while-lenient-is-down").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(
            r.headers()[hookbus_host::models::SKIPPED_HEADER],
            "lenient/v"
        );
        let entry: Value = r.json().await.unwrap();
        assert_eq!(entry["name"], "while-lenient-is-down");
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_errors_are_json_with_the_right_status() {
    for backend in backends() {
        let s = setup_with(backend, vec![], |c| c.max_body_bytes = 4096).await;
        let h = &s.host;

        // 401: no header, a bad key, a malformed header; /healthz needs none.
        let (status, body) = call(h.client.get(h.url("/api/v2/entities/"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "not_authenticated");
        let (status, _) = call(h.request(Method::GET, "/api/v2/entities/", "hb_nope")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(
            h.client
                .get(h.url("/api/v2/users/me/"))
                .header("Authorization", "Bearer x"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(h.client.get(h.url("/api/v2/no/such/path/"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let r = h.client.get(h.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);

        // Users and tokens.
        let (status, me) = call(h.as_user(Method::GET, "/api/v2/users/me/")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(me["username"], "user");
        let (status, body) = call(h.as_user(Method::GET, "/api/v2/users/")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"], "permission_denied");
        let (status, users) = call(h.as_admin(Method::GET, "/api/v2/users/")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(users["count"], 2);
        let (status, token) = call(
            h.as_user(Method::POST, "/api/v2/tokens/")
                .json(&json!({"name": "laptop"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{token}");
        let key = token["key"].as_str().unwrap().to_owned();
        assert!(key.starts_with("hb_"));
        let (status, me) = call(h.request(Method::GET, "/api/v2/users/me/", &key)).await;
        assert_eq!(
            (status, me["username"].as_str()),
            (StatusCode::OK, Some("user"))
        );
        // Stored hashed: the key is nowhere in the table.
        let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_tokens")
            .fetch_all(h.store().pool())
            .await
            .unwrap();
        assert!(stored.iter().all(|k| !k.contains(&key[3..])), "{stored:?}");
        assert!(stored.contains(&store::hash_key(&key)));
        let (_, list) = call(h.as_user(Method::GET, "/api/v2/tokens/")).await;
        assert_eq!(list["count"], 2, "{list}");
        assert!(
            list.to_string().find(&key).is_none(),
            "listing shows no key"
        );
        // A normal user cannot revoke the admin's token; revoking one's own works at once.
        let (status, _) = call(h.as_user(Method::DELETE, &format!("/api/v2/tokens/{}/", 1))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, revoked) = call(h.request(
            Method::DELETE,
            &format!("/api/v2/tokens/{}/", token["id"]),
            &key,
        ))
        .await;
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert_eq!(revoked["is_active"], false);
        let (status, _) = call(h.request(Method::GET, "/api/v2/users/me/", &key)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // Both are in the audit trail, by the user who did them.
        let mut audit = h.state().js.get_stream("PAGODA_AUDIT").await.unwrap();
        let last = audit.info().await.unwrap().state.last_sequence;
        let mut trail = Vec::new();
        for seq in 1..=last {
            let m = audit.get_raw_message(seq).await.unwrap();
            trail.push(serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap());
        }
        let of_token: Vec<(&str, &str)> = trail
            .iter()
            .filter(|e| e["details"]["token_id"] == token["id"])
            .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
            .collect();
        assert_eq!(
            of_token,
            [("token.create", "user"), ("token.revoke", "user")],
            "{trail:?}"
        );

        // 403: entity writes need a superuser.
        let (status, body) = call(
            h.as_user(Method::POST, "/api/v2/entities/")
                .json(&customer()),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            body["message"].as_str().unwrap().contains("superuser"),
            "{body}"
        );
        let entity = create_entity(h, customer()).await;
        let entries = format!("/api/v2/entities/{}/entries/", entity["id"]);

        // 404.
        let (status, body) = call(h.as_user(Method::GET, "/api/v2/entries/999999/")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
        let (status, _) = call(
            h.as_user(Method::POST, "/api/v2/entities/999999/entries/")
                .json(&json!({"name": "x"})),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(h.as_user(Method::GET, "/api/v2/no/such/path/")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // 409: a duplicate entry name.
        let (status, _) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "dup"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "dup"})),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{backend:?}: {body}");
        assert_eq!(body["error"], "conflict");
        assert!(body["message"].as_str().unwrap().contains("dup"), "{body}");
        let (status, _) = call(
            h.as_admin(Method::POST, "/api/v2/entities/")
                .json(&customer()),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);

        // Lists are paged.
        for name in ["p2", "p3"] {
            let (status, _) = call(
                h.as_user(Method::POST, &entries)
                    .json(&json!({ "name": name })),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED);
        }
        let (_, page) = call(h.as_user(Method::GET, &format!("{entries}?limit=2"))).await;
        assert_eq!(
            (page["count"].as_i64(), page["next_offset"].as_i64()),
            (Some(2), Some(2)),
            "{page}"
        );
        assert_eq!(page["results"][0]["name"], "dup");
        let (_, page) = call(h.as_user(Method::GET, &format!("{entries}?limit=2&offset=2"))).await;
        assert_eq!(page["count"], 1, "{page}");
        assert_eq!(page["results"][0]["name"], "p3");
        assert!(page["next_offset"].is_null(), "{page}");
        let (_, page) = call(h.as_user(Method::GET, "/api/v2/entities/?limit=1")).await;
        assert_eq!(
            (page["count"].as_i64(), page["next_offset"].as_i64()),
            (Some(1), None),
            "{page}"
        );

        // 400: every problem of a malformed body, each naming its field.
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": 5, "note": ["x"], "attrs": "phone", "colour": "red"})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_input");
        let errors: Vec<String> = serde_json::from_value(body["errors"].clone()).unwrap();
        assert_eq!(errors.len(), 4, "{errors:?}");
        for field in ["'name'", "'note'", "'attrs'", "'colour'"] {
            assert!(
                errors.iter().any(|e| e.contains(field)),
                "{field} not named: {errors:?}"
            );
        }
        let (status, body) = call(
            h.as_admin(Method::POST, "/api/v2/entities/")
                .json(&json!({"name": "x", "attrs": [{"name": "a", "type": "colour"}, {"type": 2, "is_mandatory": "yes"}]})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let text = body["errors"].to_string();
        assert!(
            text.contains("attrs[0].type") && text.contains("unknown attribute type"),
            "{text}"
        );
        assert!(
            text.contains("attrs[1].name") && text.contains("attrs[1].is_mandatory"),
            "{text}"
        );
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .header("Content-Type", "application/json")
                .body("{\"name\": "),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["errors"][0]
                .as_str()
                .unwrap()
                .contains("not valid JSON"),
            "{body}"
        );
        let (status, body) = call(h.as_user(Method::POST, &entries)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["errors"], json!(["field 'name' is required"]));
        let (status, body) = call(h.as_user(Method::POST, &entries).json(&json!([1]))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body["errors"],
            json!(["the body must be a JSON object, not an array"])
        );
        // A value of the wrong type for its attribute (the store's check).
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "n", "attrs": {"age": "old"}})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["errors"][0]
                .as_str()
                .unwrap()
                .contains("'age' is number"),
            "{body}"
        );
        let (status, body) = call(h.as_user(Method::GET, &format!("{entries}?limit=5000"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["errors"][0].as_str().unwrap().contains("limit"),
            "{body}"
        );

        // 413: over the body limit, as JSON.
        let big = "x".repeat(8192);
        let (status, body) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "big", "note": big})),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"], "payload_too_large");
        assert_eq!(body["limit"], 4096);

        // 405 as JSON.
        let (status, body) = call(h.as_user(Method::DELETE, "/api/v2/entities/")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
        s.stop().await;
    }
}

fn computed(entry_name: &str) -> Attribute {
    Attribute {
        id: 0,
        name: "name_length".into(),
        attr_type: AttrType::NUMBER,
        schema: ObjectRef {
            id: 0,
            name: "name_length".into(),
        },
        value: json!(entry_name.len()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_delete_restore_fire_their_before_hooks_and_after_events() {
    for backend in backends() {
        let guard = Plugin::builder("guard", "Guard", "1.0.0")
            .on_before_update_entry("stamp", |ctx| async move {
                let mut changes = ctx.request.data;
                if changes.note.as_deref() == Some("forbidden") {
                    return Err(SyncError::reject("that note is forbidden"));
                }
                if let Some(note) = &mut changes.note {
                    note.push_str(" (checked)");
                }
                Ok(changes)
            })
            .on_before_delete_entry("keep_pinned", |ctx| async move {
                if ctx.request.entry.unwrap().note.starts_with("pinned") {
                    return Err(SyncError::reject("pinned entries stay"));
                }
                Ok(())
            })
            .on_before_restore_entry("no_restore_on_sunday", |ctx| async move {
                if ctx.request.entry.unwrap().name == "sunday" {
                    return Err(SyncError::reject("not today"));
                }
                Ok(())
            })
            .on_before_delete_entity("keep_customer", |ctx| async move {
                if ctx.request.entity.name == "customer" {
                    return Err(SyncError::reject("customer is in use"));
                }
                Ok(())
            })
            .on_before_create_entity("note", |ctx| async move {
                let mut new = ctx.request.data;
                new.note = format!("{} (guarded)", new.note);
                Ok(new)
            })
            .on_get_entity_attrs("mark", |ctx| async move {
                let mut attrs = ctx.request.attrs;
                for a in &mut attrs {
                    a.note = format!("seen by {}", ctx.request.user.as_ref().unwrap().username);
                }
                Ok(attrs)
            })
            .on_get_entry_attrs("length", |ctx| async move {
                let mut attrs = ctx.request.attrs;
                attrs.push(computed(&ctx.request.entry.unwrap().name));
                Ok(attrs)
            })
            .on_validate("no_x", |ctx| async move {
                Ok(if ctx.request.entry.name.contains('x') {
                    vec![FieldError::field("name", "no x, please")]
                } else {
                    vec![]
                })
            });
        let s = setup(backend, vec![guard]).await;
        let h = &s.host;
        let entity = create_entity(h, customer()).await;
        assert_eq!(entity["note"], "people (guarded)");
        let (status, e) =
            call(h.as_admin(Method::GET, &format!("/api/v2/entities/{}/", entity["id"]))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(e["attrs"][1]["type"], 256);
        // entity.get_attrs ran over the definitions; the store is unchanged.
        assert_eq!(e["attrs"][0]["note"], "seen by admin", "{e}");
        let stored = h.store().entity(e["id"].as_i64().unwrap()).await.unwrap();
        assert_eq!(stored.attrs[0].note, "");
        // The entity list runs it too, on every entity of the page.
        let (status, list) = call(h.as_user(Method::GET, "/api/v2/entities/")).await;
        assert_eq!(status, StatusCode::OK);
        let listed = list["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == entity["id"])
            .unwrap_or_else(|| panic!("the entity is listed: {list}"));
        assert_eq!(listed["attrs"][0]["note"], "seen by user", "{list}");
        let entries = format!("/api/v2/entities/{}/entries/", entity["id"]);
        let (_, entry) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "acme", "note": "pinned"})),
        )
        .await;
        let path = format!("/api/v2/entries/{}/", entry["id"]);

        // get_attrs adds a computed attribute on GET.
        let (status, got) = call(h.as_user(Method::GET, &path)).await;
        assert_eq!(status, StatusCode::OK);
        let attrs = got["attrs"].as_array().unwrap();
        assert_eq!(attrs.last().unwrap()["name"], "name_length", "{got}");
        assert_eq!(attrs.last().unwrap()["value"], 4);

        // Update: the before-hook changes it, a veto blocks, the validator checks the merged entry.
        let (status, updated) = call(
            h.as_user(Method::PATCH, &path)
                .json(&json!({"note": "pinned again", "attrs": {"age": 40}})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        assert_eq!(updated["note"], "pinned again (checked)");
        let (status, body) = call(
            h.as_user(Method::PUT, &path)
                .json(&json!({"note": "forbidden"})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            (body["error"].as_str(), body["handler"].as_str()),
            (Some("rejected"), Some("stamp"))
        );
        let (status, body) = call(
            h.as_user(Method::PATCH, &path)
                .json(&json!({"name": "xerox"})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "validation_error", "{body}");

        // Delete: vetoed while pinned, then allowed.
        let (status, body) = call(h.as_user(Method::DELETE, &path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["reason"], "pinned entries stay");
        assert_eq!(body["hook"], "entry.before_delete");
        let (status, _) = call(
            h.as_user(Method::PATCH, &path)
                .json(&json!({"note": "free"})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, deleted) = call(h.as_user(Method::DELETE, &path)).await;
        assert_eq!(status, StatusCode::OK, "{deleted}");
        assert_eq!(deleted["is_active"], false);
        let (status, _) = call(h.as_user(Method::DELETE, &path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, list) = call(h.as_user(Method::GET, &entries)).await;
        assert_eq!(list["count"], 0);
        let (_, list) =
            call(h.as_user(Method::GET, &format!("{entries}?include_deleted=true"))).await;
        assert_eq!(list["count"], 1);

        // Restore: allowed; one named "sunday" is vetoed.
        let (status, restored) = call(h.as_user(Method::POST, &format!("{path}restore/"))).await;
        assert_eq!(status, StatusCode::OK, "{restored}");
        assert_eq!(restored["is_active"], true);
        let (_, sunday) = call(
            h.as_user(Method::POST, &entries)
                .json(&json!({"name": "sunday"})),
        )
        .await;
        let sunday_path = format!("/api/v2/entries/{}/", sunday["id"]);
        let (status, _) = call(h.as_user(Method::DELETE, &sunday_path)).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = call(h.as_user(Method::POST, &format!("{sunday_path}restore/"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["reason"], "not today");

        // Entity delete: vetoed by entity.before_delete.
        let (status, body) = call(h.as_admin(
            Method::DELETE,
            &format!("/api/v2/entities/{}/", entity["id"]),
        ))
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["hook"], "entity.before_delete");

        let events = events_once(&s, 8).await;
        assert_eq!(events.len(), 8, "{backend:?}: {:?}", types(&events));
        let acme = of(&events, &format!("entry/{}", entry["id"]));
        assert_eq!(
            types(&acme),
            [
                "pagoda.entry.after_create",
                "pagoda.entry.after_update",
                "pagoda.entry.after_update",
                "pagoda.entry.after_delete",
                "pagoda.entry.after_restore",
            ],
            "{backend:?}"
        );
        assert_eq!(acme[1].pagodaactor.as_deref(), Some("user"));
        assert_eq!(acme[1].data["entry"]["note"], "pinned again (checked)");
        let sunday = of(&events, &format!("entry/{}", sunday["id"]));
        assert_eq!(
            types(&sunday),
            ["pagoda.entry.after_create", "pagoda.entry.after_delete"]
        );
        let entity_events = of(&events, &format!("entity/{}", entity["id"]));
        assert_eq!(types(&entity_events), ["pagoda.entity.after_create"]);
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_update_and_restore_go_through_hooks_and_the_store() {
    for backend in backends() {
        entity_update_and_restore(backend).await;
    }
}

async fn entity_update_and_restore(backend: Backend) {
    let upper = Plugin::builder("upper", "Upper", "1.0.0").on_before_update_entity(
        "upper",
        |ctx| async move {
            let mut changes = ctx.request.data;
            changes.name = changes.name.map(|n| n.to_uppercase());
            Ok(changes)
        },
    );
    let s = setup(backend, vec![upper]).await;
    let h = &s.host;
    let entity = create_entity(
        h,
        json!({"name": "product", "attrs": [{"name": "price", "type": "number"}]}),
    )
    .await;
    let path = format!("/api/v2/entities/{}/", entity["id"]);
    let (status, e) = call(h.as_admin(Method::PATCH, &path).json(&json!({
        "name": "item",
        "attrs": [{"name": "colour", "type": "string"}, {"id": entity["attrs"][0]["id"], "is_mandatory": true}],
    })))
    .await;
    assert_eq!(status, StatusCode::OK, "{e}");
    assert_eq!(e["name"], "ITEM");
    assert_eq!(e["attrs"].as_array().unwrap().len(), 2);
    assert_eq!(e["attrs"][0]["is_mandatory"], true);
    let (status, _) = call(h.as_user(Method::PATCH, &path).json(&json!({"name": "x"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, deleted) = call(h.as_admin(Method::DELETE, &path)).await;
    assert_eq!(
        (status, deleted["is_active"].as_bool()),
        (StatusCode::OK, Some(false))
    );
    let (_, list) = call(h.as_user(Method::GET, "/api/v2/entities/")).await;
    assert_eq!(list["count"], 0);
    let (status, restored) = call(h.as_admin(Method::POST, &format!("{path}restore/"))).await;
    assert_eq!(
        (status, restored["is_active"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let events = events_once(&s, 4).await;
    assert_eq!(
        types(&events),
        [
            "pagoda.entity.after_create",
            "pagoda.entity.after_update",
            "pagoda.entity.after_delete",
            "pagoda.entity.after_update",
        ]
    );
    // The store's own check still applies: a mandatory attribute without a value.
    let (status, body) = call(
        h.as_user(Method::POST, &format!("{path}entries/"))
            .json(&json!({"name": "thing"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["errors"].to_string().contains("mandatory"), "{body}");
    s.stop().await;
}

fn hookbus() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(hookbus_tests::hookbus_binary());
    for v in hookbus_tests::deploy::SCRUBBED_ENV {
        c.env_remove(v);
    }
    c.kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookbus_token_create_and_hookbus_host_serve_the_api() {
    let nats = NatsServer::start().await;
    let db = TestDb::sqlite();

    // Bootstrap an administrator: the key is printed once, on stdout.
    let out = hookbus()
        .args(["token", "create", "--user", "root", "--superuser"])
        .args(["--database-url", db.url()])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("hb_") && key.len() == 67, "{key}");

    // A port found free can be taken by a parallel test's server (a nats-server
    // monitor also answers /healthz) before the host binds it; the host then
    // exits, and is started again on another port.
    let http = reqwest::Client::new();
    let mut tries = 0;
    let (mut child, base) = loop {
        tries += 1;
        let port = hookbus_tests::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut child = hookbus()
            .args(["host", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", db.url()])
            .envs(nats.env_for(hookbus_tests::HOST_USER))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The host's own answer is `ok`.
            let answer = match http.get(format!("{base}/healthz")).send().await {
                Ok(r) if r.status() == StatusCode::OK => r.text().await.unwrap_or_default(),
                _ => String::new(),
            };
            if answer == "ok" {
                break;
            }
            let exited = child.try_wait().unwrap().is_some();
            assert!(
                Instant::now() < deadline,
                "hookbus host did not serve /healthz"
            );
            if exited {
                assert!(tries < 5, "hookbus host exited at start {tries} times");
                break;
            }
            tokio::time::sleep(hookbus_tests::POLL_INTERVAL).await;
        }
        if child.try_wait().unwrap().is_none() {
            break (child, base);
        }
    };
    let auth = format!("Token {key}");
    let (status, me) = call(
        http.get(format!("{base}/api/v2/users/me/"))
            .header("Authorization", &auth),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["username"].as_str(), me["is_superuser"].as_bool()),
        (Some("root"), Some(true))
    );
    let (status, _) = call(
        http.post(format!("{base}/api/v2/entities/"))
            .header("Authorization", &auth)
            .json(&customer()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // Its relay (on by default) publishes the event.
    let js = jetstream::new(nats.connect().await);
    assert_eventually!(
        hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await == 1,
        WAIT
    );
    // SIGTERM: a clean exit.
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");

    // A wrong PLUGIN_OPERATION_ID_CONFIG: exit non-zero with every problem on stderr.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        hookbus()
            .args(["host", "--listen", "127.0.0.1:0", "--plugin-wait", "1s"])
            .args(["--database-url", db.url()])
            .envs(nats.env_for(hookbus_tests::HOST_USER))
            .env(
                "PLUGIN_OPERATION_ID_CONFIG",
                r#"{"ghost": [5000, 5099], "other": [1, 2]}"#,
            )
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PLUGIN_OPERATION_ID_CONFIG is invalid"),
        "{stderr}"
    );
    assert!(
        stderr.contains("'ghost'") && stderr.contains("'other'"),
        "{stderr}"
    );
}

/// Every record of the host's audit stream, oldest first.
async fn audit_records(h: &TestHost) -> Vec<Value> {
    let mut audit = h.state().js.get_stream("PAGODA_AUDIT").await.unwrap();
    let last = audit.info().await.unwrap().state.last_sequence;
    let mut trail = Vec::new();
    for seq in 1..=last {
        let m = audit.get_raw_message(seq).await.unwrap();
        trail.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    trail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_changed_and_deactivated_by_superusers_and_tokens_follow_at_once() {
    for backend in backends() {
        Box::pin(users_change_and_deactivate(backend)).await;
    }
}

async fn users_change_and_deactivate(backend: Backend) {
    let s = setup(backend, vec![]).await;
    let h = &s.host;
    let user_path = format!("/api/v2/users/{}/", h.user.id);
    let admin_path = format!("/api/v2/users/{}/", h.admin.id);

    // Read: a superuser any user, a user itself only.
    let (status, u) = call(h.as_admin(Method::GET, &user_path)).await;
    assert_eq!(
        (status, u["username"].as_str()),
        (StatusCode::OK, Some("user"))
    );
    let (status, u) = call(h.as_user(Method::GET, &user_path)).await;
    assert_eq!(
        (status, u["id"].as_i64()),
        (StatusCode::OK, Some(h.user.id))
    );
    let (status, body) = call(h.as_user(Method::GET, &admin_path)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "permission_denied");
    let (status, body) = call(h.as_admin(Method::GET, "/api/v2/users/999999/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found");
    let (status, body) = call(h.as_admin(Method::GET, "/api/v2/users/abc/")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Change: superusers only; 404, 400 (every problem), 409 for a taken name.
    let (status, body) = call(
        h.as_user(Method::PUT, &user_path)
            .json(&json!({"is_superuser": true})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "permission_denied");
    let (status, body) = call(h.as_user(Method::DELETE, &admin_path)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = call(
        h.as_admin(Method::PUT, "/api/v2/users/999999/")
            .json(&json!({"email": "x@example.com"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = call(h.as_admin(Method::DELETE, "/api/v2/users/999999/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = call(
        h.as_admin(Method::PUT, &user_path)
            .json(&json!({"is_superuser": "yes", "password": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_input");
    assert_eq!(body["errors"].as_array().unwrap().len(), 2, "{body}");
    let (status, body) = call(
        h.as_admin(Method::PUT, &user_path)
            .json(&json!({"username": " "})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(
        h.as_admin(Method::PUT, &user_path)
            .json(&json!({"username": "admin"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "conflict");

    // The user's key is cached by now; a change shows at once all the same.
    let (status, _) = call(h.as_user(Method::GET, "/api/v2/users/")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, changed) = call(h.as_admin(Method::PUT, &user_path).json(&json!({
        "username": "alice", "email": "alice@example.com", "first_name": "Alice",
        "is_superuser": true,
    })))
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(
        (
            changed["username"].as_str(),
            changed["email"].as_str(),
            changed["first_name"].as_str(),
            changed["last_name"].as_str(),
            changed["is_superuser"].as_bool(),
            changed["is_active"].as_bool(),
        ),
        (
            Some("alice"),
            Some("alice@example.com"),
            Some("Alice"),
            Some(""),
            Some(true),
            Some(true)
        )
    );
    assert_eq!(changed["date_joined"], u["date_joined"]);
    let (status, me) = call(h.as_user(Method::GET, "/api/v2/users/me/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["username"].as_str(), me["is_superuser"].as_bool()),
        (Some("alice"), Some(true))
    );
    let (status, _) = call(h.as_user(Method::GET, "/api/v2/users/")).await;
    assert_eq!(status, StatusCode::OK);
    // PATCH is the same partial change; nothing to change is no change.
    let (status, same) = call(h.as_admin(Method::PATCH, &user_path).json(&json!({}))).await;
    assert_eq!(
        (status, same["username"].as_str()),
        (StatusCode::OK, Some("alice"))
    );
    let (status, demoted) = call(
        h.as_admin(Method::PATCH, &user_path)
            .json(&json!({"is_superuser": false})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{demoted}");
    let (status, _) = call(h.as_user(Method::GET, "/api/v2/users/")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "demotion shows at once");

    // The last active superuser can be neither demoted nor deactivated.
    let (status, body) = call(
        h.as_admin(Method::PUT, &admin_path)
            .json(&json!({"is_superuser": false})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("last active superuser"),
        "{body}"
    );
    let (status, body) = call(
        h.as_admin(Method::PUT, &admin_path)
            .json(&json!({"is_active": false})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = call(h.as_admin(Method::DELETE, &admin_path)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("deactivated"),
        "{body}"
    );
    let (status, me) = call(h.as_admin(Method::GET, "/api/v2/users/me/")).await;
    assert_eq!(
        (
            status,
            me["is_superuser"].as_bool(),
            me["is_active"].as_bool()
        ),
        (StatusCode::OK, Some(true), Some(true))
    );

    // Deactivate: the user's keys (cached ones too) stop working at once.
    let (_, second) = call(
        h.as_admin(Method::POST, "/api/v2/tokens/")
            .json(&json!({"name": "second", "user_id": h.user.id})),
    )
    .await;
    let second_key = second["key"].as_str().unwrap().to_owned();
    for key in [&h.user_token, &second_key] {
        let (status, _) = call(h.request(Method::GET, "/api/v2/users/me/", key)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, gone) = call(h.as_admin(Method::DELETE, &user_path)).await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(gone["is_active"], false);
    for key in [&h.user_token, &second_key] {
        let (status, body) = call(h.request(Method::GET, "/api/v2/users/me/", key)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("inactive"),
            "{body}"
        );
    }
    // Idempotent: deactivating an inactive user answers the same.
    let (status, body) = call(h.as_admin(Method::DELETE, &user_path)).await;
    assert_eq!(status, StatusCode::OK, "already inactive: {body}");
    assert_eq!(body, gone);
    let (_, users) = call(h.as_admin(Method::GET, "/api/v2/users/")).await;
    assert_eq!(users["count"], 2, "a deactivated user is kept: {users}");
    // Reactivated, its keys work again (the tokens were never revoked).
    let (status, back) = call(
        h.as_admin(Method::PUT, &user_path)
            .json(&json!({"is_active": true, "is_superuser": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    let (status, _) = call(h.as_user(Method::GET, "/api/v2/users/me/")).await;
    assert_eq!(status, StatusCode::OK);

    // With another active superuser, one may demote itself; that one is then the last.
    let (status, body) = call(
        h.as_admin(Method::PUT, &admin_path)
            .json(&json!({"is_superuser": false})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = call(h.as_admin(Method::GET, "/api/v2/users/")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(h.as_user(Method::DELETE, &user_path)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // The audit trail: every change and deactivation, by whom, with what changed.
    let trail = audit_records(h).await;
    let of_users: Vec<(&str, &str, &str)> = trail
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("user."))
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["actor"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
            )
        })
        .collect();
    let user_target = format!("user {}", h.user.id);
    let admin_target = format!("user {}", h.admin.id);
    assert_eq!(
        of_users,
        [
            ("user.update", "admin", user_target.as_str()),
            ("user.update", "admin", user_target.as_str()),
            ("user.deactivate", "admin", user_target.as_str()),
            ("user.update", "admin", user_target.as_str()),
            ("user.update", "admin", admin_target.as_str()),
        ],
        "{backend:?}: {trail:?}"
    );
    let first = trail.iter().find(|e| e["action"] == "user.update").unwrap();
    assert_eq!(
        first["details"]["changes"],
        json!({
            "username": {"from": "user", "to": "alice"},
            "email": {"from": "user@example.com", "to": "alice@example.com"},
            "first_name": {"from": "", "to": "Alice"},
            "is_superuser": {"from": false, "to": true},
        })
    );
    assert_eq!(first["type"], "pagoda.audit.user.update");
    let deactivated = trail
        .iter()
        .find(|e| e["action"] == "user.deactivate")
        .unwrap();
    assert_eq!(deactivated["details"]["user_id"], h.user.id);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_list_runs_get_attrs_for_every_entry_concurrently() {
    for backend in backends() {
        Box::pin(entry_list_runs_get_attrs(backend)).await;
    }
}

async fn entry_list_runs_get_attrs(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (in_flight2, most2) = (Arc::clone(&in_flight), Arc::clone(&most));
    let calc = Plugin::builder("calc", "Calc", "1.0.0").on_get_entry_attrs("length", move |ctx| {
        let (in_flight, most) = (Arc::clone(&in_flight2), Arc::clone(&most2));
        async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // Some work, so that calls of one page overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let mut attrs = ctx.request.attrs;
            attrs.push(computed(&ctx.request.entry.unwrap().name));
            Ok(attrs)
        }
    });
    let lenient = Plugin::builder("lenient", "Lenient", "1.0.0")
        .on_get_entry_attrs("extra", |ctx| async move { Ok(ctx.request.attrs) });
    let strict = Plugin::builder("strict", "Strict", "1.0.0").on_get_entry_attrs(
        SyncHandler::named("must").on_unavailable(OnUnavailable::Block),
        |ctx| async move { Ok(ctx.request.attrs) },
    );
    let mut s = setup(backend, vec![calc, lenient, strict]).await;
    let entity = create_entity(&s.host, customer()).await;
    let entries = format!("/api/v2/entities/{}/entries/", entity["id"]);
    let names: Vec<String> = (0..40).map(|i| format!("e{}", "x".repeat(i))).collect();
    for name in &names {
        let (status, body) = call(
            s.host
                .as_user(Method::POST, &entries)
                .json(&json!({"name": name, "attrs": {"age": 1}})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // Every entry of the page, in order, with the computed attribute after its own.
    let r = s
        .host
        .as_user(Method::GET, &format!("{entries}?limit=35"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()
            .get(hookbus_host::models::SKIPPED_HEADER)
            .is_none()
    );
    let page: Value = r.json().await.unwrap();
    assert_eq!(
        (page["count"].as_i64(), page["next_offset"].as_i64()),
        (Some(35), Some(35))
    );
    let results = page["results"].as_array().unwrap();
    for (entry, name) in results.iter().zip(&names) {
        assert_eq!(entry["name"], name.as_str());
        let attrs = entry["attrs"].as_array().unwrap();
        let last = attrs.last().unwrap();
        assert_eq!(
            (last["name"].as_str(), last["value"].as_u64()),
            (Some("name_length"), Some(name.len() as u64)),
            "{backend:?}: {entry}"
        );
        assert!(attrs.iter().any(|a| a["name"] == "age" && a["value"] == 1));
    }
    // The same as a single read gives.
    let (_, one) = call(s.host.as_user(
        Method::GET,
        &format!("/api/v2/entries/{}/", results[3]["id"]),
    ))
    .await;
    assert_eq!(one, results[3]);
    // Concurrently, and bounded.
    let most = most.load(Ordering::SeqCst);
    assert!(
        (2..=hookbus_host::models::LIST_GET_ATTRS_CONCURRENCY).contains(&most),
        "{most} get_attrs calls at once"
    );
    // The stored entries are unchanged; the last page has the rest.
    let (_, rest) = call(s.host.as_user(Method::GET, &format!("{entries}?offset=35"))).await;
    assert_eq!(
        (rest["count"].as_i64(), rest["next_offset"].as_i64()),
        (Some(5), None)
    );
    assert_eq!(
        rest["results"][4]["attrs"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["name"],
        "name_length"
    );
    let stored = s
        .host
        .store()
        .entry(results[0]["id"].as_i64().unwrap())
        .await
        .unwrap();
    assert!(stored.attrs.iter().all(|a| a.name != "name_length"));

    // A skip handler without a replica is left out and named once.
    let lenient = s.running.remove(1);
    lenient.shutdown().await.unwrap();
    let r = s.host.as_user(Method::GET, &entries).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()[hookbus_host::models::SKIPPED_HEADER],
        "lenient/extra"
    );
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["count"], 40);
    assert_eq!(
        page["results"][39]["attrs"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["name"],
        "name_length"
    );

    // A blocking one: the list is 503 naming it, as a single read is.
    let strict = s.running.remove(1);
    strict.shutdown().await.unwrap();
    let started = Instant::now();
    let (status, body) = call(s.host.as_user(Method::GET, &entries)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{backend:?}: {body}"
    );
    assert_eq!(
        (
            body["error"].as_str(),
            body["plugin"].as_str(),
            body["hook"].as_str()
        ),
        (
            Some("hook_unavailable"),
            Some("strict"),
            Some("entry.get_attrs")
        )
    );
    let (status, single) = call(s.host.as_user(
        Method::GET,
        &format!("/api/v2/entries/{}/", results[0]["id"]),
    ))
    .await;
    assert_eq!(
        (status, &single["plugin"]),
        (StatusCode::SERVICE_UNAVAILABLE, &body["plugin"])
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_demotions_always_leave_one_active_superuser() {
    for backend in backends() {
        let s = setup(backend, vec![]).await;
        let store = s.host.store().clone();
        let mut ids = vec![s.host.admin.id];
        for i in 0..5 {
            let (u, _) =
                hookbus_tests::host::user_with_token(&store, &format!("root{i}"), true).await;
            ids.push(u.id);
        }
        // Every superuser demoted or deactivated at once: all but one go through.
        let tasks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .update_user(id, move |u| {
                            if i % 2 == 0 {
                                u.is_superuser = false;
                            } else {
                                u.is_active = false;
                            }
                        })
                        .await
                })
            })
            .collect();
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => {}
                Err(store::StoreError::Conflict(m)) => refused.push(m),
                Err(e) => panic!("{backend:?}: {e}"),
            }
        }
        assert_eq!(refused.len(), 1, "{backend:?}: {refused:?}");
        assert!(refused[0].contains("last active superuser"), "{refused:?}");
        let users = store.list_users(100, 0).await.unwrap();
        let admins = users
            .iter()
            .filter(|u| u.is_active && u.is_superuser)
            .count();
        assert_eq!(admins, 1, "{backend:?}: {users:?}");
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_or_a_user_deactivated_through_one_host_stops_working_on_the_others() {
    for backend in backends() {
        token_and_user_changes_reach_other_hosts(backend).await;
    }
}

async fn token_and_user_changes_reach_other_hosts(backend: Backend) {
    let s = setup(backend, vec![]).await;
    let a = &s.host;
    // A second host process on the same database and NATS.
    let mut config = hookbus_host::HostConfig::new(s._db.url());
    config.listen = ([127, 0, 0, 1], 0).into();
    config.plugin_wait = Duration::from_secs(1);
    let b = hookbus_host::Host::start(s._nats.connect_as(hookbus_tests::HOST_USER).await, config)
        .await
        .unwrap();
    let me_on_b = |key: &str| {
        a.client
            .get(format!("http://{}/api/v2/users/me/", b.addr()))
            .header("Authorization", format!("Token {key}"))
    };
    // Well before B's cache entries would expire on their own.
    let soon = hookbus_host::auth::TOKEN_CACHE_TTL / 3;

    // A token B has cached, revoked through A.
    let (status, token) = call(
        a.as_user(Method::POST, "/api/v2/tokens/")
            .json(&json!({"name": "laptop"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?} {token}");
    let key = token["key"].as_str().unwrap().to_owned();
    assert_eq!(call(me_on_b(&key)).await.0, StatusCode::OK, "{backend:?}");
    assert_eq!(
        call(me_on_b(&a.user_token)).await.0,
        StatusCode::OK,
        "{backend:?}"
    );
    let (status, body) =
        call(a.as_user(Method::DELETE, &format!("/api/v2/tokens/{}/", token["id"]))).await;
    assert_eq!(status, StatusCode::OK, "{backend:?} {body}");
    assert_eventually!(
        call(me_on_b(&key)).await.0 == StatusCode::UNAUTHORIZED,
        soon,
        "{backend:?}: B still takes the token revoked through A"
    );
    // The user's other token still works on B.
    assert_eq!(
        call(me_on_b(&a.user_token)).await.0,
        StatusCode::OK,
        "{backend:?}"
    );

    // The user deactivated through A: B refuses their remaining token too.
    let (status, body) =
        call(a.as_admin(Method::DELETE, &format!("/api/v2/users/{}/", a.user.id))).await;
    assert_eq!(status, StatusCode::OK, "{backend:?} {body}");
    assert_eventually!(
        call(me_on_b(&a.user_token)).await.0 == StatusCode::UNAUTHORIZED,
        soon,
        "{backend:?}: B still takes the token of a user deactivated through A"
    );

    // A notice that is not one is ignored; B stays up and keeps serving.
    s.client
        .publish("pagoda.host.forget", "not json".into())
        .await
        .unwrap();
    s.client.flush().await.unwrap();
    assert_eq!(
        call(
            a.client
                .get(format!("http://{}/api/v2/users/me/", b.addr()))
                .header("Authorization", format!("Token {}", a.admin_token))
        )
        .await
        .0,
        StatusCode::OK,
        "{backend:?}"
    );
    b.stop().await;
    s.stop().await;
}
