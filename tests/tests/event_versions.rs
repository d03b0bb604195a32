//! Versioned event types (docs/protocol.md, "Versions"): a plugin built for
//! version 1 of the events handles an event of a later, compatible version, one
//! with a `v2` `dataschema`, an envelope attribute and fields in `data` it does
//! not know, published on the events stream of a real nats-server and dispatched
//! by the bus. And the SDK's types (and the v1 schemas) accept unknown fields
//! everywhere a plugin reads them.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{as_next_version, entity_event, entry_event, publish_raw, start_bus};
use core_events::envelope::{ENTITY_EVENT_SCHEMA, ENTRY_EVENT_SCHEMA};
use core_events::{EntityEvent, EntryEvent, Envelope, Hook};
use hookbus_tests::{NatsServer, ServeOn, assert_eventually, init_tracing, workspace_root};
use pagoda_plugin_sdk::{EntityContext, EntryContext, Plugin, ServeOptions};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);
const ID: &str = "v1-reader";

/// What a handler of the v1 plugin got.
#[derive(Debug)]
enum Seen {
    Entry(Box<Envelope<EntryEvent>>),
    Entity(Box<Envelope<EntityEvent>>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_plugin_handles_a_v2_event() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let bus = start_bus(&server, &[ID]).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let tx2 = tx.clone();
    let plugin = Plugin::builder(ID, "Reads version 1", "1.0.0")
        .on_entry(
            Hook::EntryAfterUpdate,
            "entries",
            move |ctx: EntryContext| {
                let tx = tx.clone();
                async move {
                    tx.send(Seen::Entry(Box::new(ctx.event))).unwrap();
                    Ok(())
                }
            },
        )
        .on_entity(
            Hook::EntityAfterCreate,
            "entities",
            move |ctx: EntityContext| {
                let tx = tx2.clone();
                async move {
                    tx.send(Seen::Entity(Box::new(ctx.event))).unwrap();
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
    bus.registry
        .wait_for(WAIT, |t| t.is_enabled(ID))
        .await
        .unwrap();

    // An entry event of the next version.
    let v1 = entry_event(Hook::EntryAfterUpdate, "customer", 42);
    let v2 = as_next_version(&v1);
    assert_eq!(
        v2["dataschema"],
        "urn:pagoda:hookbus:schema:entry-event-data:v2"
    );
    let seq = publish_raw(
        &client,
        Hook::EntryAfterUpdate,
        "customer",
        v1.object_key(),
        &v2,
    )
    .await;
    let seen = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let Seen::Entry(got) = seen else {
        panic!("expected the entry event, got {seen:?}")
    };
    // Everything version 1 knows is there, unchanged; the rest was ignored.
    assert_eq!(got.id, v1.id);
    assert_eq!(got.pagodaseq, Some(seq));
    assert_eq!(got.dataschema.as_deref(), v2["dataschema"].as_str());
    assert_eq!(got.data, v1.data);
    assert_eq!(got.pagodaentity, "customer");

    // And an entity event.
    let v1 = entity_event(Hook::EntityAfterCreate, 7, "顧客 master");
    let v2 = as_next_version(&v1);
    assert_eq!(
        v2["dataschema"],
        "urn:pagoda:hookbus:schema:entity-event-data:v2"
    );
    publish_raw(
        &client,
        Hook::EntityAfterCreate,
        "顧客 master",
        v1.object_key(),
        &v2,
    )
    .await;
    let seen = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let Seen::Entity(got) = seen else {
        panic!("expected the entity event, got {seen:?}")
    };
    assert_eq!(got.id, v1.id);
    assert_eq!(got.data, v1.data);

    assert_eventually!(bus.stats.delivered.get() == 2, WAIT);
    assert_eq!(bus.stats.dead_lettered.get(), 0);
    assert_eq!(bus.stats.malformed.get(), 0);
    running.shutdown().await.unwrap();
    bus.stop().await.unwrap();
}

/// A validator of a checked-in schema in `schemas/`.
fn validator(file: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(workspace_root().join("schemas").join(file)).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&serde_json::from_str(&text).unwrap())
        .unwrap()
}

/// A compatible change is one version 1 accepts: a v2 event validates against
/// the v1 schemas (they leave unknown fields open), and the `dataschema` of a
/// v1 event is the `$id` of its data schema.
#[test]
fn v2_events_validate_against_the_v1_schemas() {
    let entry = entry_event(Hook::EntryAfterUpdate, "customer", 42);
    assert_eq!(entry.dataschema.as_deref(), Some(ENTRY_EVENT_SCHEMA));
    let v2 = as_next_version(&entry);
    for file in ["entry-event.schema.json", "envelope.schema.json"] {
        let errors: Vec<String> = validator(file)
            .iter_errors(&v2)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
    assert!(validator("entry-event-data.schema.json").is_valid(&v2["data"]));
    let entity = entity_event(Hook::EntityAfterDelete, 7, "customer");
    assert_eq!(entity.dataschema.as_deref(), Some(ENTITY_EVENT_SCHEMA));
    let v2 = as_next_version(&entity);
    assert!(validator("entity-event.schema.json").is_valid(&v2));

    for (file, id) in [
        ("entry-event-data.schema.json", ENTRY_EVENT_SCHEMA),
        ("entity-event-data.schema.json", ENTITY_EVENT_SCHEMA),
    ] {
        let text = std::fs::read_to_string(workspace_root().join("schemas").join(file)).unwrap();
        let schema: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(schema["$id"], id, "{file}");
    }
    // An incompatible change is not one: a v1 field of the wrong type is refused.
    let mut broken = as_next_version(&entry);
    broken["data"]["entry"]["id"] = json!("forty-two");
    assert!(!validator("entry-event.schema.json").is_valid(&broken));
}

/// Fields whose value is free-form JSON or a map of names (an added key there
/// would be data, not an unknown field).
const FREE_FORM: [&str; 6] = [
    "value",
    "default_value",
    "params",
    "body",
    "query",
    "headers",
];

/// Adds a field no version knows to every object of a type in `value`, recursively.
fn add_unknown_fields(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let map_of_names = k == "attrs" && v.is_object();
                if !FREE_FORM.contains(&k.as_str()) && !map_of_names {
                    add_unknown_fields(v);
                }
            }
            map.insert("x_added_in_v2".into(), json!({"any": ["thing"]}));
        }
        Value::Array(items) => items.iter_mut().for_each(add_unknown_fields),
        _ => {}
    }
}

/// Decodes `T` from its own JSON with an unknown field added to every object,
/// and checks that it reads back as without them.
fn tolerant<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut json = serde_json::to_value(value).unwrap();
    add_unknown_fields(&mut json);
    let back: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{} refuses unknown fields: {e}", std::any::type_name::<T>()));
    assert_eq!(&back, value);
}

/// The SDK tolerates unknown fields in everything a plugin decodes: the
/// envelope, the event data and its models, the synchronous hooks' requests,
/// API route requests and jobs. (The host's own input stays strict: manifests
/// and API route replies refuse unknown fields.)
#[test]
fn what_a_plugin_decodes_tolerates_unknown_fields() {
    use core_events::request::NewEntry;
    use core_events::sync::{
        BeforeModifyRequest, EntityGetAttrsRequest, EntryGetAttrsRequest, ValidateRequest,
        VetoRequest,
    };

    let entry = entry_event(Hook::EntryAfterUpdate, "customer", 42);
    tolerant(&entry);
    tolerant(&entity_event(Hook::EntityAfterUpdate, 7, "customer"));
    let data = entry.data.clone();
    tolerant(&data.entity);
    tolerant(&data.entry);
    tolerant(&data.user);
    tolerant(&ValidateRequest {
        entity: data.entity.clone(),
        entry: NewEntry::named("ACME").value("phone", json!("+81")),
        existing: Some(data.entry.clone()),
        user: data.user.clone(),
    });
    tolerant(&VetoRequest {
        entity: data.entity.clone(),
        entry: Some(data.entry.clone()),
        user: data.user.clone(),
    });
    tolerant(&EntryGetAttrsRequest {
        entity: None,
        entry: Some(data.entry.clone()),
        attrs: data.entry.attrs.clone(),
        user: data.user.clone(),
    });
    tolerant(&EntityGetAttrsRequest {
        entity: Some(data.entity.clone()),
        entry: None,
        attrs: data.entity.attrs.clone(),
        user: data.user.clone(),
    });
    tolerant(&BeforeModifyRequest {
        entity: Some(data.entity.clone()),
        entry: None,
        data: NewEntry::named("ACME").value("phone", json!("+81")),
        user: data.user.clone(),
    });
    tolerant(&core_events::plugin_api::ApiRequest {
        route: "greet".into(),
        method: "GET".into(),
        path: "/greet".into(),
        query: [("name".to_owned(), "Ada".to_owned())].into(),
        headers: [("accept".to_owned(), "application/json".to_owned())].into(),
        body: json!({"a": 1}),
        user: data.user.clone(),
    });
    tolerant(&core_events::jobs::JobRequest {
        job_id: 42,
        plugin: "hello-world".into(),
        task: "count".into(),
        operation: 5000,
        params: json!({"to": 10}),
        user: data.user.clone(),
        created_at: chrono::Utc::now(),
    });

    // Strict where the host reads: a manifest with an unknown field is refused.
    let manifest = json!({"id": "x", "name": "X", "version": "1.0.0", "colour": "blue"});
    assert!(core_events::PluginManifest::from_json(manifest.to_string().as_bytes()).is_err());
}
