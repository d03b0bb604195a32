//! Group commit of entry creations, on SQLite and PostgreSQL: through the store
//! (`Store::create_entries`: each input answered as if created alone, in order)
//! and through the host (many concurrent creations, some with a taken name or
//! invalid values: each gets its own answer, every stored entry has exactly one
//! event, none is lost).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use core_events::{AttrType, Envelope, Hook};
use hookbus_tests::host::{TestHost, call};
use hookbus_tests::{NatsServer, TestDb, assert_eventually, stream_events};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use store::{
    Backend, NewAttr, NewEntity, NewEntry, NewEntryInput, NewUser, StoreError, WriteContext, outbox,
};

const WAIT: Duration = Duration::from_secs(30);

fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

/// The entity both stores of the batch test create: a phone, and an age with a default.
fn customer_entity() -> NewEntity {
    NewEntity::named("customer")
        .attr(NewAttr::new("phone", AttrType::STRING))
        .attr({
            let mut a = NewAttr::new("age", AttrType::NUMBER);
            a.default_value = Some(json!(7));
            a
        })
}

/// Its second entity: a mandatory city.
fn shop_entity() -> NewEntity {
    NewEntity::named("shop").attr({
        let mut a = NewAttr::new("city", AttrType::STRING);
        a.is_mandatory = true;
        a
    })
}

/// The outbox rows' payloads, in id order.
async fn outbox_events(store: &store::Store) -> Vec<Envelope<Value>> {
    outbox::fetch(store.pool(), &Default::default(), 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| serde_json::from_str(&r.payload).unwrap())
        .collect()
}

#[tokio::test]
async fn a_batch_answers_each_input_as_if_created_alone_in_order() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let user = store
            .create_user(&NewUser {
                username: "ann".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let ctx = WriteContext {
            user: Some(user.clone()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: Some("pagoda=1".into()),
        };
        let customer = store.create_entity(&customer_entity(), &ctx).await.unwrap();
        let shop = store.create_entity(&shop_entity(), &ctx).await.unwrap();
        let gone = store
            .create_entity(&NewEntity::named("gone"), &ctx)
            .await
            .unwrap();
        store.delete_entity(gone.id, &ctx).await.unwrap();
        let taken = store
            .create_entry(customer.id, &NewEntry::named("taken"), &ctx)
            .await
            .unwrap();
        let before = outbox_events(&store).await.len();

        let input = |entity_id: i64, entry: NewEntry| NewEntryInput {
            entity_id,
            entry,
            ctx: ctx.clone(),
        };
        let inputs = vec![
            // 0: fine, values and the default
            input(
                customer.id,
                NewEntry::named("a").value("phone", json!("+81 3")),
            ),
            // 1: a name an active entry has
            input(customer.id, NewEntry::named("taken")),
            // 2: fine in another entity
            input(shop.id, NewEntry::named("a").value("city", json!("Tokyo"))),
            // 3: the name of input 0: the later one conflicts
            input(customer.id, NewEntry::named("a")),
            // 4: invalid: a bad value, an unknown attribute, a missing mandatory one
            input(
                shop.id,
                NewEntry::named("b")
                    .value("nope", json!(1))
                    .value("city", json!({"x": 1})),
            ),
            // 5: a deleted entity
            input(gone.id, NewEntry::named("c")),
            // 6: an entity that never was
            input(999_999, NewEntry::named("d")),
            // 7: fine, no values but the default
            input(customer.id, NewEntry::named("e")),
        ];
        let results = store.create_entries(&inputs).await;
        assert_eq!(results.len(), inputs.len());

        // What each creation answers alone, in the same order, on a copy of the
        // model: the batch must answer the same.
        let alone_db = TestDb::new(backend).await;
        let alone = alone_db.store().await;
        alone
            .create_user(&NewUser {
                username: "ann".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let ids = [
            (
                customer.id,
                alone
                    .create_entity(&customer_entity(), &ctx)
                    .await
                    .unwrap()
                    .id,
            ),
            (
                shop.id,
                alone.create_entity(&shop_entity(), &ctx).await.unwrap().id,
            ),
        ];
        let g = alone
            .create_entity(&NewEntity::named("gone"), &ctx)
            .await
            .unwrap();
        alone.delete_entity(g.id, &ctx).await.unwrap();
        alone
            .create_entry(ids[0].1, &NewEntry::named("taken"), &ctx)
            .await
            .unwrap();
        let map: HashMap<i64, i64> = ids.into_iter().chain([(gone.id, g.id)]).collect();
        for (i, (input, got)) in inputs.iter().zip(&results).enumerate() {
            let entity_id = map.get(&input.entity_id).copied().unwrap_or(999_999);
            let want = alone.create_entry(entity_id, &input.entry, &ctx).await;
            match (got, &want) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got.name, want.name, "input {i}");
                    assert_eq!(got.note, want.note, "input {i}");
                    assert_eq!(got.schema.name, want.schema.name, "input {i}");
                    assert_eq!(got.created_user, want.created_user, "input {i}");
                    let values = |e: &core_events::Entry| {
                        e.attrs
                            .iter()
                            .map(|a| (a.name.clone(), a.value.clone()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(values(got), values(want), "input {i}");
                }
                (Err(got), Err(want)) => {
                    assert_eq!(got.to_string(), want.to_string(), "input {i}");
                    assert_eq!(
                        std::mem::discriminant(got),
                        std::mem::discriminant(want),
                        "input {i}"
                    );
                }
                (got, want) => panic!("input {i}: batch {got:?}, alone {want:?}"),
            }
        }
        assert!(matches!(results[1], Err(StoreError::Conflict(_))));
        assert!(matches!(results[3], Err(StoreError::Conflict(_))));
        match &results[4] {
            Err(StoreError::Invalid(problems)) => assert_eq!(problems.len(), 2, "{problems:?}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(results[5], Err(StoreError::NotFound { .. })));
        assert!(matches!(results[6], Err(StoreError::NotFound { .. })));

        // Each created entry is stored as answered, with exactly one event that
        // carries it, the actor and the trace.
        let created: Vec<&core_events::Entry> =
            results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(created.len(), 3);
        // Written together (not one by one after a failed batch): one time.
        assert!(
            created
                .iter()
                .all(|e| e.created_time == created[0].created_time),
            "{created:?}"
        );
        // Ids ascend in input order, and so do their events in the outbox, as
        // when created one by one.
        assert!(created.windows(2).all(|w| w[0].id < w[1].id), "{created:?}");
        let events = outbox_events(&store).await;
        assert_eq!(events.len(), before + created.len());
        // Every row keeps the write's trace state (the tracestate column).
        let rows = outbox::fetch(store.pool(), &Default::default(), 10_000)
            .await
            .unwrap();
        assert!(
            rows.iter()
                .all(|r| r.tracestate.as_deref() == Some("pagoda=1")),
            "{rows:?}"
        );
        let order: Vec<String> = events[before..]
            .iter()
            .filter_map(|e| e.subject.clone())
            .collect();
        let want: Vec<String> = created.iter().map(|e| format!("entry/{}", e.id)).collect();
        assert_eq!(order, want);
        for entry in &created {
            assert_eq!(&store.entry(entry.id).await.unwrap(), *entry);
            let mine: Vec<_> = events
                .iter()
                .filter(|e| e.subject == Some(format!("entry/{}", entry.id)))
                .collect();
            assert_eq!(mine.len(), 1, "entry {}", entry.id);
            assert_eq!(mine[0].hook(), Some(Hook::EntryAfterCreate));
            assert_eq!(mine[0].data["entry"], serde_json::to_value(entry).unwrap());
            assert_eq!(mine[0].pagodaactor.as_deref(), Some("ann"));
            assert_eq!(mine[0].traceparent, ctx.traceparent);
        }
        assert_eq!(
            store.list_entries(customer.id, false).await.unwrap().len(),
            3
        );
        assert_ne!(created[0].id, taken.id);

        // A batch with nothing to create writes nothing.
        let none = store
            .create_entries(&[inputs[1].clone(), inputs[5].clone()])
            .await;
        assert!(none.iter().all(Result::is_err));
        assert_eq!(outbox_events(&store).await.len(), before + created.len());
        store.close().await;
        alone.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_each_get_their_answer_and_exactly_one_event() {
    for backend in backends() {
        let nats = NatsServer::start().await;
        let db = TestDb::new(backend).await;
        let host = TestHost::start(&nats, &db, &[]).await;
        let client = nats.connect().await;
        let (status, entity) = call(host.as_admin(Method::POST, "/api/v2/entities/").json(
            &json!({
                "name": "customer",
                "attrs": [{"name": "phone", "type": "string"}, {"name": "age", "type": "number"}],
            }),
        ))
        .await;
        assert_eq!(status, StatusCode::CREATED, "{entity}");
        let path = format!("/api/v2/entities/{}/entries/", entity["id"]);
        let (status, taken) = call(
            host.as_user(Method::POST, &path)
                .json(&json!({"name": "taken"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{taken}");

        // 200 unique names, 20 creations of one name, 10 of a taken name, 10
        // with a bad value: all at once.
        let mut bodies = Vec::new();
        for i in 0..200 {
            bodies.push(
                json!({"name": format!("e-{i}"), "attrs": {"phone": format!("{i}"), "age": i}}),
            );
        }
        for i in 0..20 {
            bodies.push(json!({"name": "twin", "note": format!("{i}")}));
        }
        for _ in 0..10 {
            bodies.push(json!({"name": "taken"}));
        }
        for i in 0..10 {
            bodies.push(json!({"name": format!("bad-{i}"), "attrs": {"age": "old"}}));
        }
        // Interleaved, so the kinds share batches.
        let mut order: Vec<usize> = (0..bodies.len()).collect();
        order.sort_by_key(|i| (i * 7919) % bodies.len());
        let answers = futures::future::join_all(order.iter().map(|&i| {
            let req = host.as_user(Method::POST, &path).json(&bodies[i]);
            async move { (i, call(req).await) }
        }))
        .await;

        let mut created: BTreeMap<i64, Value> = BTreeMap::new();
        let mut twins = Vec::new();
        for (i, (status, body)) in answers {
            let name = bodies[i]["name"].as_str().unwrap();
            match name {
                "twin" => twins.push((status, body)),
                "taken" => {
                    assert_eq!(status, StatusCode::CONFLICT, "{body}");
                    assert!(
                        body.to_string()
                            .contains("entry 'taken' already exists in entity 'customer'"),
                        "{body}"
                    );
                }
                n if n.starts_with("bad-") => {
                    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
                    assert!(body.to_string().contains("age"), "{body}");
                }
                _ => {
                    assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
                    assert_eq!(body["name"], name);
                    let values: BTreeMap<String, Value> = body["attrs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|a| (a["name"].as_str().unwrap().to_owned(), a["value"].clone()))
                        .collect();
                    assert_eq!(values["phone"], bodies[i]["attrs"]["phone"]);
                    assert_eq!(values["age"], bodies[i]["attrs"]["age"]);
                    assert!(created.insert(body["id"].as_i64().unwrap(), body).is_none());
                }
            }
        }
        let won: Vec<&Value> = twins
            .iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(won.len(), 1, "{twins:?}");
        assert!(
            twins
                .iter()
                .filter(|(s, _)| *s != StatusCode::CREATED)
                .all(|(s, b)| *s == StatusCode::CONFLICT
                    && b.to_string().contains("entry 'twin' already exists")),
            "{twins:?}"
        );
        created.insert(won[0]["id"].as_i64().unwrap(), won[0].clone());
        created.insert(taken["id"].as_i64().unwrap(), taken.clone());

        // Stored as answered.
        let stored = host
            .store()
            .list_entries(entity["id"].as_i64().unwrap(), false)
            .await
            .unwrap();
        assert_eq!(stored.len(), created.len());
        for e in &stored {
            assert_eq!(serde_json::to_value(e).unwrap(), created[&e.id]);
        }

        // Exactly one event per entry, carrying the entry as answered; none lost.
        let store = host.store().clone();
        let expected = 1 + created.len();
        assert_eventually!(
            outbox::backlog(store.pool()).await.unwrap().rows == 0
                && stream_events(&client).await.len() >= expected,
            WAIT,
            "the stream did not get {expected} events"
        );
        let events = stream_events(&client).await;
        assert_eq!(events.len(), expected);
        let mut seen = BTreeMap::new();
        for e in events
            .iter()
            .filter(|e| e.hook() == Some(Hook::EntryAfterCreate))
        {
            let id = e.data["entry"]["id"].as_i64().unwrap();
            assert_eq!(e.subject, Some(format!("entry/{id}")));
            assert_eq!(e.data["entry"], created[&id]);
            assert_eq!(e.pagodaactor.as_deref(), Some("user"));
            assert!(seen.insert(id, ()).is_none(), "entry {id} has two events");
        }
        assert_eq!(seen.len(), created.len());
        host.stop().await;
    }
}
