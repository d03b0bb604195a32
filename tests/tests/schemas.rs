//! The JSON Schemas in `schemas/` are generated from the Rust types in
//! `core-events`; these tests fail when the checked-in files drift from the types.
//!
//! To regenerate after changing a type:
//!
//! ```text
//! UPDATE_SCHEMAS=1 cargo test -p hookbus-tests --test schemas
//! ```
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use core_events::envelope::{ENTITY_EVENT_SCHEMA, ENTRY_EVENT_SCHEMA};
use core_events::protocol::{DeadLetter, HandlerReply};
use core_events::{EntityEvent, EntryEvent, Envelope, PluginManifest};
use core_events::{request, sync};
use schemars::{Schema, schema_for};

/// Makes one schema.
type Generator = fn() -> Schema;

/// Every checked-in schema: file name in `schemas/` and the type it is generated
/// from. Adding a type is one line here (and a line in `schemas/README.md`).
const SCHEMAS: &[(&str, Generator)] = &[
    ("envelope.schema.json", || {
        schema_for!(Envelope<serde_json::Value>)
    }),
    ("entry-event.schema.json", || {
        schema_for!(Envelope<EntryEvent>)
    }),
    ("entity-event.schema.json", || {
        schema_for!(Envelope<EntityEvent>)
    }),
    ("entry-event-data.schema.json", || {
        with_id(schema_for!(EntryEvent), ENTRY_EVENT_SCHEMA)
    }),
    ("entity-event-data.schema.json", || {
        with_id(schema_for!(EntityEvent), ENTITY_EVENT_SCHEMA)
    }),
    ("plugin-manifest.schema.json", || {
        schema_for!(PluginManifest)
    }),
    ("handler-reply.schema.json", || schema_for!(HandlerReply)),
    ("dead-letter.schema.json", || schema_for!(DeadLetter)),
    ("validate-request.schema.json", || {
        schema_for!(sync::ValidateRequest)
    }),
    ("validate-reply.schema.json", || {
        schema_for!(sync::ValidateReply)
    }),
    ("entry-before-create-request.schema.json", || {
        schema_for!(sync::EntryBeforeCreateRequest)
    }),
    ("entry-before-create-reply.schema.json", || {
        schema_for!(sync::BeforeModifyReply<request::NewEntry>)
    }),
    ("entry-before-update-request.schema.json", || {
        schema_for!(sync::EntryBeforeUpdateRequest)
    }),
    ("entry-before-update-reply.schema.json", || {
        schema_for!(sync::BeforeModifyReply<request::EntryChanges>)
    }),
    ("entity-before-create-request.schema.json", || {
        schema_for!(sync::EntityBeforeCreateRequest)
    }),
    ("entity-before-create-reply.schema.json", || {
        schema_for!(sync::BeforeModifyReply<request::NewEntity>)
    }),
    ("entity-before-update-request.schema.json", || {
        schema_for!(sync::EntityBeforeUpdateRequest)
    }),
    ("entity-before-update-reply.schema.json", || {
        schema_for!(sync::BeforeModifyReply<request::EntityChanges>)
    }),
    ("veto-request.schema.json", || {
        schema_for!(sync::VetoRequest)
    }),
    ("veto-reply.schema.json", || schema_for!(sync::VetoReply)),
    ("entry-get-attrs-request.schema.json", || {
        schema_for!(sync::EntryGetAttrsRequest)
    }),
    ("entry-get-attrs-reply.schema.json", || {
        schema_for!(sync::GetAttrsReply<core_events::Attribute>)
    }),
    ("entity-get-attrs-request.schema.json", || {
        schema_for!(sync::EntityGetAttrsRequest)
    }),
    ("entity-get-attrs-reply.schema.json", || {
        schema_for!(sync::GetAttrsReply<core_events::EntityAttr>)
    }),
    ("api-request.schema.json", || {
        schema_for!(core_events::plugin_api::ApiRequest)
    }),
    ("api-response.schema.json", || {
        schema_for!(core_events::plugin_api::ApiResponse)
    }),
    ("job-request.schema.json", || {
        schema_for!(core_events::jobs::JobRequest)
    }),
    ("job-state.schema.json", || {
        schema_for!(core_events::jobs::JobState)
    }),
    ("dlq-request.schema.json", || {
        schema_for!(hookbus::dlq_service::DlqRequest)
    }),
    ("dlq-list-reply.schema.json", || {
        schema_for!(hookbus::dlq_service::ListReply)
    }),
    ("dlq-replay-reply.schema.json", || {
        schema_for!(hookbus::dlq::ReplayReport)
    }),
    ("dlq-purge-reply.schema.json", || {
        schema_for!(hookbus::dlq::PurgeReport)
    }),
    ("dlq-error-reply.schema.json", || {
        schema_for!(hookbus::dlq_service::ErrorReply)
    }),
];

/// Files in `schemas/` that are not generated here: the README, the AsyncAPI
/// document (generated and checked by `tests/tests/asyncapi.rs`) and the vendored
/// AsyncAPI 3.0 schema it is validated against.
const NOT_GENERATED: &[&str] = &["README.md", "asyncapi.yaml", "vendor"];

/// `schema` with its `$id`: the versioned schema URI that events name in their
/// `dataschema` attribute, so an event's `dataschema` finds its schema file.
fn with_id(mut schema: Schema, id: &str) -> Schema {
    schema.insert("$id".to_owned(), id.into());
    schema
}

fn schemas_dir() -> PathBuf {
    hookbus_tests::workspace_root().join("schemas")
}

/// A schema as it is checked in: pretty-printed JSON with a trailing newline.
fn render(schema: &Schema) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap();
    text.push('\n');
    text
}

fn updating() -> bool {
    std::env::var_os("UPDATE_SCHEMAS").is_some_and(|v| !v.is_empty() && v != "0")
}

#[test]
fn schemas_are_up_to_date() {
    let dir = schemas_dir();
    let mut drifted = Vec::new();
    for (file, generate) in SCHEMAS {
        let path = dir.join(file);
        let expected = render(&generate());
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        if actual == expected {
            continue;
        }
        if updating() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, expected).unwrap();
        } else {
            drifted.push(format!(
                "schemas/{file} drifted from the Rust types; run \
                 `UPDATE_SCHEMAS=1 cargo test -p hookbus-tests --test schemas` and commit"
            ));
        }
    }
    assert!(drifted.is_empty(), "{}", drifted.join("\n"));
}

#[test]
fn no_stray_files_in_schemas_dir() {
    let known: BTreeSet<&str> = SCHEMAS
        .iter()
        .map(|(file, _)| *file)
        .chain(NOT_GENERATED.iter().copied())
        .collect();
    let stray: Vec<String> = std::fs::read_dir(schemas_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !known.contains(name.as_str()))
        .collect();
    assert!(
        stray.is_empty(),
        "files in schemas/ that no Rust type generates: {stray:?}; add them to SCHEMAS in \
         tests/tests/schemas.rs or delete them"
    );
}

#[test]
fn readme_lists_every_schema() {
    let readme = std::fs::read_to_string(schemas_dir().join("README.md")).unwrap();
    let missing: Vec<&str> = SCHEMAS
        .iter()
        .map(|(file, _)| *file)
        .filter(|file| !readme.contains(file))
        .collect();
    assert!(
        missing.is_empty(),
        "schemas/README.md does not describe {missing:?}"
    );
}

#[test]
fn schemas_are_json_schema_documents() {
    for (file, generate) in SCHEMAS {
        let value = serde_json::to_value(generate()).unwrap();
        assert!(
            value["$schema"]
                .as_str()
                .is_some_and(|s| s.contains("json-schema.org")),
            "{file} has no $schema"
        );
        assert!(value["title"].is_string(), "{file} has no title");
    }
}

/// The checked-in schema `file` as a validator.
fn validator(file: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(schemas_dir().join(file)).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{file} is not a valid schema: {e}"))
}

/// Asserts `value` is valid against the checked-in schema `file`.
fn assert_valid(file: &str, value: &serde_json::Value) {
    let errors: Vec<String> = validator(file)
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{file} rejects {value:#}:\n{}",
        errors.join("\n")
    );
}

fn sample_entry_event() -> EntryEvent {
    use core_events::{AttrType, Attribute, Entity, EntityAttr, Entry, ObjectRef, User};
    let now = chrono::Utc::now();
    let customer = ObjectRef {
        id: 7,
        name: "顧客 customer.*".into(),
    };
    let entry = Entry {
        id: 42,
        name: "ACME".into(),
        note: String::new(),
        is_active: true,
        schema: customer.clone(),
        created_time: now,
        created_user: Some(ObjectRef {
            id: 1,
            name: "admin".into(),
        }),
        updated_time: now,
        attrs: vec![Attribute {
            id: 3,
            name: "phone".into(),
            attr_type: AttrType::STRING,
            schema: ObjectRef {
                id: 11,
                name: "phone".into(),
            },
            value: serde_json::json!("+81 3 0000 0000"),
        }],
    };
    EntryEvent {
        entity: Entity {
            id: 7,
            name: customer.name.clone(),
            note: "customers".into(),
            is_active: true,
            created_time: now,
            created_user: None,
            attrs: vec![EntityAttr {
                id: 11,
                name: "phone".into(),
                attr_type: AttrType::STRING,
                is_mandatory: false,
                referral: vec![],
                index: 0,
                is_summarized: false,
                is_delete_in_chain: false,
                note: String::new(),
                default_value: None,
                is_active: true,
            }],
        },
        previous: Some(entry.clone()),
        entry,
        user: Some(User {
            id: 1,
            username: "admin".into(),
            email: "admin@example.invalid".into(),
            first_name: String::new(),
            last_name: String::new(),
            is_active: true,
            is_superuser: true,
            date_joined: now,
        }),
    }
}

#[test]
fn examples_serialized_from_the_types_validate() {
    use core_events::{HandlerSpec, Hook};

    let data = sample_entry_event();
    let mut event = Envelope::entry(Hook::EntryAfterUpdate, "/pagoda/test", data.clone());
    event.pagodaseq = Some(17);
    event.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let event = serde_json::to_value(&event).unwrap();
    assert_valid("entry-event.schema.json", &event);
    assert_valid("envelope.schema.json", &event);
    assert_valid(
        "entry-event-data.schema.json",
        &serde_json::to_value(&data).unwrap(),
    );

    let entity_data = EntityEvent {
        entity: data.entity.clone(),
        previous: None,
        user: None,
    };
    let entity_event = serde_json::to_value(Envelope::entity(
        Hook::EntityAfterCreate,
        "/pagoda/test",
        entity_data.clone(),
    ))
    .unwrap();
    assert_valid("entity-event.schema.json", &entity_event);
    assert_valid("envelope.schema.json", &entity_event);
    assert_valid(
        "entity-event-data.schema.json",
        &serde_json::to_value(&entity_data).unwrap(),
    );

    let mut handler = HandlerSpec::new("audit", Hook::EntryAfterCreate);
    handler.entities = Some(vec!["customer".into()]);
    let manifest = PluginManifest {
        id: "audit-log".into(),
        name: "Audit log".into(),
        version: "1.0.0".into(),
        description: "records every change".into(),
        author: "pagoda".into(),
        handlers: vec![handler],
        api: Vec::new(),
        tasks: Vec::new(),
    };
    assert_valid(
        "plugin-manifest.schema.json",
        &serde_json::to_value(&manifest).unwrap(),
    );

    assert_valid(
        "handler-reply.schema.json",
        &serde_json::to_value(HandlerReply {
            status: Some("ok".into()),
            message: Some("done".into()),
        })
        .unwrap(),
    );

    let dead = DeadLetter {
        event_id: core_events::EventId::new(),
        hook: Hook::EntryAfterUpdate,
        entity: "customer".into(),
        object: "entry/42".into(),
        plugin: "flaky".into(),
        handler: "sometimes".into(),
        stream_seq: 17,
        error: "boom".into(),
        attempts: vec![core_events::protocol::FailedAttempt {
            attempt: 1,
            at: chrono::Utc::now(),
            error: "boom".into(),
        }],
        dead_lettered_at: chrono::Utc::now(),
        event: event.clone(),
        replays: Vec::new(),
    };
    assert_valid(
        "dead-letter.schema.json",
        &serde_json::to_value(&dead).unwrap(),
    );
}

#[test]
fn synchronous_hook_examples_validate() {
    use core_events::request::NewEntry;
    use core_events::sync::{BeforeModifyReply, FieldError, ValidateReply, ValidateRequest};
    let data = sample_entry_event();
    let request = ValidateRequest {
        entity: data.entity.clone(),
        entry: NewEntry::named("forbidden ACME").value("phone", serde_json::json!("+81")),
        existing: Some(data.entry.clone()),
        user: data.user.clone(),
    };
    assert_valid(
        "validate-request.schema.json",
        &serde_json::to_value(&request).unwrap(),
    );
    let reply = ValidateReply {
        errors: vec![
            FieldError::field("name", "contains 'forbidden'"),
            FieldError::general("x"),
        ],
    };
    assert_valid(
        "validate-reply.schema.json",
        &serde_json::to_value(&reply).unwrap(),
    );
    assert_valid("validate-reply.schema.json", &serde_json::json!({}));
    let reply = BeforeModifyReply {
        data: Some(NewEntry::named("ACME")),
        reject: None,
    };
    assert_valid(
        "entry-before-create-reply.schema.json",
        &serde_json::to_value(&reply).unwrap(),
    );
    assert_valid("veto-reply.schema.json", &serde_json::json!({"veto": "no"}));
    assert!(
        validator("veto-reply.schema.json")
            .iter_errors(&serde_json::json!({"veto": 5}))
            .next()
            .is_some()
    );
}

/// What docs/protocol.md calls optional is optional for every consumer: an event
/// without `time`, `subject`, `datacontenttype` and `dataschema` (as a foreign
/// host may publish it) validates against the schemas, is read by the SDK's
/// types, and gives its object from `data`.
#[test]
fn an_event_without_its_optional_attributes_is_valid_everywhere() {
    let mut event = serde_json::to_value(Envelope::entry(
        core_events::Hook::EntryAfterCreate,
        "/pagoda/test",
        sample_entry_event(),
    ))
    .unwrap();
    for optional in ["time", "subject", "datacontenttype", "dataschema"] {
        event.as_object_mut().unwrap().remove(optional);
    }
    assert_valid("envelope.schema.json", &event);
    assert_valid("entry-event.schema.json", &event);
    let typed: Envelope<core_events::EntryEvent> = serde_json::from_value(event.clone()).unwrap();
    assert_eq!(typed.time, None);
    assert_eq!(
        typed.object_key().to_string(),
        format!("entry/{}", typed.data.entry.id)
    );
    assert_eq!(
        core_events::envelope::object_of_event(
            core_events::hook::ObjectKind::Entry,
            event.to_string().as_bytes()
        )
        .unwrap(),
        typed.object_key()
    );
}

#[test]
fn schemas_reject_malformed_payloads() {
    let mut event = serde_json::to_value(Envelope::entry(
        core_events::Hook::EntryAfterCreate,
        "/pagoda/test",
        sample_entry_event(),
    ))
    .unwrap();
    event.as_object_mut().unwrap().remove("id");
    assert!(!validator("envelope.schema.json").is_valid(&event));
    event["id"] = serde_json::json!("not-a-uuid");
    assert!(!validator("envelope.schema.json").is_valid(&event));
    event["id"] = serde_json::json!(core_events::EventId::new());
    event["time"] = serde_json::json!("yesterday");
    assert!(!validator("envelope.schema.json").is_valid(&event));

    // Required by the schema exactly where the bus requires it.
    let empty = serde_json::json!({});
    assert!(!validator("plugin-manifest.schema.json").is_valid(&empty));
    assert!(
        PluginManifest::from_json(b"{}").is_err(),
        "the bus refuses it too"
    );
    let minimal = serde_json::json!({"id": "x", "name": "X", "version": "1.0.0"});
    assert_valid("plugin-manifest.schema.json", &minimal);
    PluginManifest::from_json(minimal.to_string().as_bytes()).unwrap();

    let manifest =
        serde_json::json!({"id": "x", "handlers": [{"name": "h", "hook": "entry.no_such_hook"}]});
    assert!(!validator("plugin-manifest.schema.json").is_valid(&manifest));
    let manifest = serde_json::json!({"id": "x", "unknown_field": 1});
    assert!(!validator("plugin-manifest.schema.json").is_valid(&manifest));
    let manifest = serde_json::json!({"id": "x", "handlers": [{"name": "h", "hook": "entry.after_create", "timeout_ms": -1}]});
    assert!(!validator("plugin-manifest.schema.json").is_valid(&manifest));
}
