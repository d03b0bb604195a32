//! Bad input to the reference host, on SQLite and PostgreSQL alike: request
//! bodies nesting deeper than `core_events::input::MAX_JSON_DEPTH`, duplicate
//! keys, NUL characters in text, path ids with spaces, default values that do
//! not fit their attribute, and repeated revokes and deactivations. Each is a
//! 400 `invalid_input` naming the field (or, for the repeats, the same answer
//! with nothing recorded twice), and the same on both backends.
#![allow(clippy::unwrap_used, missing_docs)]

use core_events::input::MAX_JSON_DEPTH;
use hookbus_tests::host::{TestHost, call};
use hookbus_tests::{NatsServer, TestDb, stream_events};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use store::Backend;

fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

/// `n` nested objects: `{"x": {"x": … 1 …}}`.
fn deep_object(n: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..n {
        v = json!({ "x": v });
    }
    v
}

/// Asserts a 400 `invalid_input` whose only problem contains `needle`.
#[track_caller]
fn assert_invalid(what: &str, status: StatusCode, body: &Value, needle: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    assert_eq!(body["error"], "invalid_input", "{what}: {body}");
    let errors = body["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e.as_str().unwrap().contains(needle)),
        "{what}: no error with {needle:?} in {body}"
    );
}

/// A raw JSON body (to send what `serde_json` cannot build: duplicate keys).
async fn send_raw(host: &TestHost, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    call(
        host.as_admin(method, path)
            .header("content-type", "application/json")
            .body(body.to_owned()),
    )
    .await
}

async fn request_bodies_are_read_strictly(backend: Backend) {
    let nats = NatsServer::start().await;
    let db = TestDb::new(backend).await;
    let h = TestHost::start(&nats, &db, &[]).await;

    // Depth: an object attribute whose default nests right at the limit is
    // taken (the body is level 1, `attrs` 2, the attribute 3), one level more
    // is refused naming the field.
    let at_limit = deep_object(MAX_JSON_DEPTH - 3);
    let (status, entity) = call(h.as_admin(Method::POST, "/api/v2/entities/").json(&json!({
        "name": "deep",
        "attrs": [{"name": "o", "type": "object", "default_value": at_limit}],
    })))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entity}");
    let entity_id = entity["id"].as_i64().unwrap();
    let (status, body) = call(h.as_admin(Method::POST, "/api/v2/entities/").json(&json!({
        "name": "deeper",
        "attrs": [{"name": "o", "type": "object", "default_value": deep_object(MAX_JSON_DEPTH - 2)}],
    })))
    .await;
    assert_invalid(
        "default_value one level too deep",
        status,
        &body,
        "field 'attrs[0].default_value' nests arrays and objects deeper than 32 levels",
    );
    // Far deeper (the issue's 123 levels; serde_json alone stops at 128): the same.
    let (status, body) = call(h.as_admin(Method::POST, "/api/v2/entities/").json(&json!({
        "name": "deepest",
        "attrs": [{"name": "o", "type": "object", "default_value": deep_object(123)}],
    })))
    .await;
    assert_invalid("123 levels", status, &body, "attrs[0].default_value");
    let path = format!("/api/v2/entities/{entity_id}/entries/");
    let (status, body) = call(
        h.as_user(Method::POST, &path)
            .json(&json!({"name": "e", "attrs": {"o": deep_object(MAX_JSON_DEPTH)}})),
    )
    .await;
    assert_invalid("entry value", status, &body, "field 'attrs.o'");
    // An entry that takes the deepest default: its event is readable (serde_json).
    let (status, entry) = call(h.as_user(Method::POST, &path).json(&json!({"name": "e"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entry}");
    assert_eq!(entry["attrs"][0]["value"], at_limit);
    let client = nats.connect().await;
    hookbus_tests::wait_until(std::time::Duration::from_secs(15), || {
        let client = client.clone();
        async move {
            stream_events(&client)
                .await
                .iter()
                .any(|e| e.event_type == "pagoda.entry.after_create")
        }
    })
    .await;

    // Duplicate keys, at the top and nested.
    let (status, body) = send_raw(
        &h,
        Method::POST,
        "/api/v2/entities/",
        r#"{"name": "a", "name": "b"}"#,
    )
    .await;
    assert_invalid(
        "duplicate name",
        status,
        &body,
        "field 'name' is given twice (duplicate key 'name')",
    );
    let (status, body) = send_raw(
        &h,
        Method::POST,
        &path,
        r#"{"name": "dup", "attrs": {"o": 1, "o": 2}}"#,
    )
    .await;
    assert_invalid(
        "duplicate value",
        status,
        &body,
        "field 'attrs.o' is given twice",
    );

    // NUL in every text field: 400 naming it, nothing stored (PostgreSQL's
    // text cannot hold it, SQLite would: both refuse it alike).
    let nul = "a\u{0}b";
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/api/v2/entities/".into(),
            json!({"name": nul}),
            "name",
        ),
        (
            Method::POST,
            "/api/v2/entities/".into(),
            json!({"name": "n", "note": nul}),
            "note",
        ),
        (
            Method::POST,
            "/api/v2/entities/".into(),
            json!({"name": "n", "attrs": [{"name": nul, "type": "string"}]}),
            "attrs[0].name",
        ),
        (
            Method::POST,
            "/api/v2/entities/".into(),
            json!({"name": "n", "attrs": [{"name": "s", "type": "string", "note": nul}]}),
            "attrs[0].note",
        ),
        (
            Method::PATCH,
            format!("/api/v2/entities/{entity_id}/"),
            json!({"name": nul}),
            "name",
        ),
        (Method::POST, path.clone(), json!({"name": nul}), "name"),
        (
            Method::POST,
            path.clone(),
            json!({"name": "n", "note": nul}),
            "note",
        ),
        (
            Method::PATCH,
            format!("/api/v2/entries/{}/", entry["id"]),
            json!({"note": nul}),
            "note",
        ),
        (
            Method::POST,
            "/api/v2/users/".into(),
            json!({"username": nul}),
            "username",
        ),
        (
            Method::POST,
            "/api/v2/users/".into(),
            json!({"username": "u2", "email": nul}),
            "email",
        ),
        (
            Method::POST,
            "/api/v2/users/".into(),
            json!({"username": "u2", "first_name": nul, "last_name": "x"}),
            "first_name",
        ),
        (
            Method::PATCH,
            format!("/api/v2/users/{}/", h.user.id),
            json!({"last_name": nul}),
            "last_name",
        ),
        (
            Method::POST,
            "/api/v2/tokens/".into(),
            json!({"name": nul}),
            "name",
        ),
    ];
    for (method, p, body, field) in cases {
        let what = format!("{backend:?}: NUL in {field} of {method} {p}");
        let (status, answer) = call(h.as_admin(method, &p).json(&body)).await;
        assert_invalid(
            &what,
            status,
            &answer,
            &format!("field '{field}' contains a NUL character"),
        );
    }
    let (_, users) = call(h.as_admin(Method::GET, "/api/v2/users/")).await;
    assert_eq!(users["count"], 2, "{backend:?}: {users}");

    // Path ids: digits only. `%20%201` is not entry 1.
    for bad in ["%20%201", "1%20", "+1", "0", "-1", "1.0"] {
        let p = format!("/api/v2/entries/{bad}/");
        let (status, body) = call(h.as_admin(Method::DELETE, &p)).await;
        assert_invalid(&p, status, &body, "entry id '");
        assert!(
            body["errors"][0]
                .as_str()
                .unwrap()
                .contains("is not a positive integer"),
            "{body}"
        );
    }
    let (status, body) = call(h.as_admin(Method::GET, "/api/v2/entities/%201/")).await;
    assert_invalid("entity id", status, &body, "entity id ' 1'");
    let (_, still) =
        call(h.as_user(Method::GET, &format!("/api/v2/entries/{}/", entry["id"]))).await;
    assert_eq!(still["is_active"], true, "{still}");

    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_read_strictly_on_both_backends() {
    for backend in backends() {
        request_bodies_are_read_strictly(backend).await;
    }
}

async fn default_values_are_checked_like_explicit_values(backend: Backend) {
    let nats = NatsServer::start().await;
    let db = TestDb::new(backend).await;
    let h = TestHost::start(&nats, &db, &[]).await;

    let (status, body) = call(h.as_admin(Method::POST, "/api/v2/entities/").json(&json!({
        "name": "bad defaults",
        "attrs": [
            {"name": "s", "type": "string", "default_value": {"a": 1}},
            {"name": "n", "type": "number", "default_value": "NaN-text"},
            {"name": "d", "type": "date", "default_value": "2026-99-99"},
            {"name": "b", "type": "boolean", "default_value": "yes"},
            {"name": "ok", "type": "number", "default_value": 3},
        ],
    })))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{backend:?}: {body}");
    let errors: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        errors,
        [
            "default_value: attribute 's' is string and takes a string; got {\"a\":1}",
            "default_value: attribute 'n' is number and takes a number; got \"NaN-text\"",
            "default_value: attribute 'd' is date and takes a date 'YYYY-MM-DD'; got \"2026-99-99\"",
            "default_value: attribute 'b' is boolean and takes true or false; got \"yes\"",
        ],
        "{backend:?}"
    );
    // The same words as an explicit value of the attribute.
    let (status, entity) = call(h.as_admin(Method::POST, "/api/v2/entities/").json(&json!({
        "name": "good defaults",
        "attrs": [
            {"name": "n", "type": "number", "default_value": 7},
            {"name": "d", "type": "date", "default_value": "2026-12-04"},
        ],
    })))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entity}");
    let id = entity["id"].as_i64().unwrap();
    let (status, body) = call(
        h.as_user(Method::POST, &format!("/api/v2/entities/{id}/entries/"))
            .json(&json!({"name": "x", "attrs": {"n": "NaN-text"}})),
    )
    .await;
    assert_invalid(
        "explicit",
        status,
        &body,
        "attribute 'n' is number and takes a number; got \"NaN-text\"",
    );

    // Changing a default, or adding an attribute with one: checked the same way.
    let n_id = entity["attrs"][0]["id"].as_i64().unwrap();
    let (status, body) = call(
        h.as_admin(Method::PATCH, &format!("/api/v2/entities/{id}/"))
            .json(&json!({"attrs": [
                {"id": n_id, "default_value": "NaN-text"},
                {"name": "when", "type": "date", "default_value": "2026-99-99"},
            ]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{backend:?}: {body}");
    assert_eq!(
        body["errors"],
        json!([
            "default_value: attribute 'n' is number and takes a number; got \"NaN-text\"",
            "default_value: attribute 'when' is date and takes a date 'YYYY-MM-DD'; got \"2026-99-99\"",
        ]),
        "{backend:?}"
    );
    // Nothing was changed: entries still get the good default.
    let (status, entry) = call(
        h.as_user(Method::POST, &format!("/api/v2/entities/{id}/entries/"))
            .json(&json!({"name": "y"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entry}");
    let values: Vec<&Value> = entry["attrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["value"])
        .collect();
    assert_eq!(values, [&json!(7), &json!("2026-12-04")], "{entry}");

    // A bad default stored before defaults were checked is refused like an
    // explicit value, never copied into a new entry.
    sqlx::query("UPDATE entity_attrs SET default_value = $1 WHERE id = $2")
        .bind("\"NaN-text\"")
        .bind(n_id)
        .execute(h.store().pool())
        .await
        .unwrap();
    let (status, body) = call(
        h.as_user(Method::POST, &format!("/api/v2/entities/{id}/entries/"))
            .json(&json!({"name": "z"})),
    )
    .await;
    assert_invalid(
        "stored bad default",
        status,
        &body,
        "default_value: attribute 'n' is number and takes a number; got \"NaN-text\"",
    );
    let (status, entry) = call(
        h.as_user(Method::POST, &format!("/api/v2/entities/{id}/entries/"))
            .json(&json!({"name": "z", "attrs": {"n": 1}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{backend:?}: {entry}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_values_are_checked_like_explicit_values_on_both_backends() {
    for backend in backends() {
        default_values_are_checked_like_explicit_values(backend).await;
    }
}

/// The audit records of `action` whose `details.<key>` is `id`.
async fn audited(h: &TestHost, action: &str, key: &str, id: &Value) -> usize {
    let mut audit = h.state().js.get_stream("PAGODA_AUDIT").await.unwrap();
    let last = audit.info().await.unwrap().state.last_sequence;
    let mut n = 0;
    for seq in 1..=last {
        let m = audit.get_raw_message(seq).await.unwrap();
        let e: Value = serde_json::from_slice(&m.payload).unwrap();
        if e["action"] == action && e["details"][key] == *id {
            n += 1;
        }
    }
    n
}

async fn revoking_and_deactivating_twice(backend: Backend) {
    let nats = NatsServer::start().await;
    let db = TestDb::new(backend).await;
    let h = TestHost::start(&nats, &db, &[]).await;

    let (status, token) = call(
        h.as_user(Method::POST, "/api/v2/tokens/")
            .json(&json!({"name": "laptop"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let path = format!("/api/v2/tokens/{}/", token["id"]);
    let (status, first) = call(h.as_user(Method::DELETE, &path)).await;
    assert_eq!(status, StatusCode::OK, "{backend:?}: {first}");
    assert_eq!(first["is_active"], false);
    let (status, second) = call(h.as_user(Method::DELETE, &path)).await;
    assert_eq!(status, StatusCode::OK, "{backend:?}: {second}");
    assert_eq!(first, second, "{backend:?}: the same answer");
    assert_eq!(
        audited(&h, "token.revoke", "token_id", &token["id"]).await,
        1,
        "{backend:?}: one revoke recorded"
    );
    // A token that does not exist is still 404.
    let (status, _) = call(h.as_user(Method::DELETE, "/api/v2/tokens/999999/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, bob) = call(
        h.as_admin(Method::POST, "/api/v2/users/")
            .json(&json!({"username": "bob"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{bob}");
    let path = format!("/api/v2/users/{}/", bob["id"]);
    let (status, first) = call(h.as_admin(Method::DELETE, &path)).await;
    assert_eq!(status, StatusCode::OK, "{backend:?}: {first}");
    assert_eq!(first["is_active"], false);
    let (status, second) = call(h.as_admin(Method::DELETE, &path)).await;
    assert_eq!(status, StatusCode::OK, "{backend:?}: {second}");
    assert_eq!(first, second, "{backend:?}: the same answer");
    assert_eq!(
        audited(&h, "user.deactivate", "user_id", &bob["id"]).await,
        1,
        "{backend:?}: one deactivation recorded"
    );
    let (status, _) = call(h.as_admin(Method::DELETE, "/api/v2/users/999999/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_or_deactivating_a_user_twice_answers_the_same_and_records_once() {
    for backend in backends() {
        revoking_and_deactivating_twice(backend).await;
    }
}

/// The store holds names and notes to the same rule (what a `before_*` hook
/// hands back does not pass through the host's body reader): a NUL is
/// `StoreError::Invalid` naming the field on both databases, not a database
/// error on one and stored on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_refuses_nul_characters_alike_on_both_backends() {
    use store::{EntityChanges, NewEntity, NewEntry, StoreError, WriteContext};

    for backend in backends() {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let ctx = WriteContext::default();
        let invalid = |r: Result<_, StoreError>, needle: &str| match r {
            Err(StoreError::Invalid(problems)) => assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{backend:?}: {problems:?}"
            ),
            Err(other) => panic!("{backend:?}: {needle}: {other}"),
            Ok(_) => panic!("{backend:?}: {needle}: accepted"),
        };
        invalid(
            store
                .create_entity(&NewEntity::named("a\0b"), &ctx)
                .await
                .map(|_| ()),
            "entity name contains a NUL character",
        );
        let entity = store
            .create_entity(&NewEntity::named("fine"), &ctx)
            .await
            .unwrap();
        invalid(
            store
                .update_entity(
                    entity.id,
                    &EntityChanges {
                        note: Some("x\0".into()),
                        ..Default::default()
                    },
                    &ctx,
                )
                .await
                .map(|_| ()),
            "entity note contains a NUL character",
        );
        let mut entry = NewEntry::named("e");
        entry.note = "\0".into();
        invalid(
            store
                .create_entry(entity.id, &entry, &ctx)
                .await
                .map(|_| ()),
            "entry note contains a NUL character",
        );
        assert!(
            store
                .list_entries(entity.id, true)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
