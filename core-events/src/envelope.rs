//! The event envelope: CloudEvents 1.0, JSON structured mode, with Pagoda extensions.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hook::{Hook, ObjectKind};
use crate::model::{Entity, Entry, User};
use crate::subject::{ObjectKey, ObjectKeyError};

/// A stable event id (a UUIDv7: time-ordered). Also the `Nats-Msg-Id` of the event,
/// so JetStream drops a second publish of the same event, and the key a handler
/// uses to stay idempotent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        EventId::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for EventId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(EventId)
    }
}

/// The CloudEvents `specversion` this crate writes.
pub const SPEC_VERSION: &str = "1.0";

/// A hook event: CloudEvents 1.0 attributes, Pagoda extension attributes and the
/// payload in `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope<D = serde_json::Value> {
    /// Always `1.0`.
    pub specversion: String,
    /// The event id (UUIDv7); equal to the `Nats-Msg-Id` header.
    pub id: EventId,
    /// Who produced the event, e.g. `/pagoda/host`.
    pub source: String,
    /// `pagoda.<object>.<action>`, e.g. `pagoda.entry.after_create`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the change happened. Optional (CloudEvents); every event this bus
    /// makes has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    /// The object the event is about: `entry/<id>` or `entity/<id>`. Optional
    /// (CloudEvents); when absent, readers take the object from the
    /// `Pagoda-Object` header or from `data` ([`Envelope::object`] for typed
    /// events). Every event this bus makes has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `application/json` when present. Optional (CloudEvents: JSON is implied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// Identifies the JSON Schema of `data` (see `schemas/`). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    /// Extension: the name of the entity concerned (the entry's entity for entry hooks).
    pub pagodaentity: String,
    /// Extension: the user who made the change, by username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagodaactor: Option<String>,
    /// Extension: the event's sequence in the events stream. Not part of the
    /// stored event (it is assigned on publish); readers fill it in from the
    /// `Pagoda-Stream-Seq` header or the JetStream message metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagodaseq: Option<u64>,
    /// Extension (CloudEvents distributed tracing): W3C trace context of the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The payload: full snapshots of the models involved.
    pub data: D,
}

/// `dataschema` of entry events: names the version of the schema of their `data`
/// ([`EntryEvent`]; the `$id` of `schemas/entry-event-data.schema.json`). A
/// compatible change of the data (an added optional field) keeps the event `type`
/// and moves this to the next version; see docs/protocol.md, "Versions".
pub const ENTRY_EVENT_SCHEMA: &str = "urn:pagoda:hookbus:schema:entry-event-data:v1";
/// `dataschema` of entity events: the version of the schema of their `data`
/// ([`EntityEvent`]; the `$id` of `schemas/entity-event-data.schema.json`).
pub const ENTITY_EVENT_SCHEMA: &str = "urn:pagoda:hookbus:schema:entity-event-data:v1";

impl<D> Envelope<D> {
    /// A new envelope with a fresh id and the current time.
    pub fn new(
        hook: Hook,
        source: impl Into<String>,
        object: ObjectKey,
        entity: impl Into<String>,
        data: D,
    ) -> Self {
        Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id: EventId::new(),
            source: source.into(),
            event_type: hook.event_type(),
            time: Some(Utc::now()),
            subject: Some(object.to_string()),
            datacontenttype: Some("application/json".to_owned()),
            dataschema: Some(
                match hook.object() {
                    ObjectKind::Entry => ENTRY_EVENT_SCHEMA,
                    ObjectKind::Entity => ENTITY_EVENT_SCHEMA,
                }
                .to_owned(),
            ),
            pagodaentity: entity.into(),
            pagodaactor: None,
            pagodaseq: None,
            traceparent: None,
            data,
        }
    }

    /// The hook, from `type`; `None` when `type` is not a Pagoda hook.
    pub fn hook(&self) -> Option<Hook> {
        Hook::from_event_type(&self.event_type)
    }

    /// The object, from `subject`; `None` when it is absent or not
    /// `entry/<id>` or `entity/<id>`.
    pub fn object(&self) -> Option<ObjectKey> {
        self.subject.as_deref()?.parse().ok()
    }
}

impl Envelope<EntryEvent> {
    /// An entry event: object, entity and actor are taken from the payload.
    pub fn entry(hook: Hook, source: impl Into<String>, data: EntryEvent) -> Self {
        let object = ObjectKey {
            kind: ObjectKind::Entry,
            id: data.entry.id,
        };
        let entity = data.entity.name.clone();
        let actor = data.user.as_ref().map(|u| u.username.clone());
        let mut env = Envelope::new(hook, source, object, entity, data);
        env.pagodaactor = actor;
        env
    }

    /// The object: from `subject`, else the entry in `data` (`subject` is
    /// optional).
    pub fn object_key(&self) -> ObjectKey {
        self.object().unwrap_or(ObjectKey {
            kind: ObjectKind::Entry,
            id: self.data.entry.id,
        })
    }
}

impl Envelope<EntityEvent> {
    /// An entity event: object, entity and actor are taken from the payload.
    pub fn entity(hook: Hook, source: impl Into<String>, data: EntityEvent) -> Self {
        let object = ObjectKey {
            kind: ObjectKind::Entity,
            id: data.entity.id,
        };
        let entity = data.entity.name.clone();
        let actor = data.user.as_ref().map(|u| u.username.clone());
        let mut env = Envelope::new(hook, source, object, entity, data);
        env.pagodaactor = actor;
        env
    }

    /// The object: from `subject`, else the entity in `data` (`subject` is
    /// optional).
    pub fn object_key(&self) -> ObjectKey {
        self.object().unwrap_or(ObjectKey {
            kind: ObjectKind::Entity,
            id: self.data.entity.id,
        })
    }
}

/// The object of a serialized event whose `subject` may be absent: its
/// `subject` when present, else the id in `data` (`data.entry.id` for entry
/// hooks, `data.entity.id` for entity hooks; `kind` says which).
///
/// # Errors
///
/// A sentence saying what is missing or malformed.
pub fn object_of_event(kind: ObjectKind, payload: &[u8]) -> Result<ObjectKey, ObjectKeyError> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        subject: Option<String>,
        #[serde(default)]
        data: Option<DataProbe>,
    }
    #[derive(Deserialize)]
    struct DataProbe {
        #[serde(default)]
        entry: Option<IdProbe>,
        #[serde(default)]
        entity: Option<IdProbe>,
    }
    #[derive(Deserialize)]
    struct IdProbe {
        id: i64,
    }
    let probe: Probe =
        serde_json::from_slice(payload).map_err(|e| ObjectKeyError::NotEvent(e.to_string()))?;
    if let Some(subject) = probe.subject {
        return subject.parse();
    }
    let data = probe.data.as_ref();
    let id = match kind {
        ObjectKind::Entry => data.and_then(|d| d.entry.as_ref()),
        ObjectKind::Entity => data.and_then(|d| d.entity.as_ref()),
    }
    .map(|p| p.id)
    .ok_or(ObjectKeyError::NoObject(kind))?;
    Ok(ObjectKey { kind, id })
}

/// Payload of every entry notification (`entry.after_create`, `after_update`,
/// `after_delete`, `after_restore`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntryEvent {
    /// The entry's entity, with its attribute definitions.
    pub entity: Entity,
    /// The entry after the change, with every attribute value.
    pub entry: Entry,
    /// The entry before the change (updates, deletes and restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Entry>,
    /// The user who made the change.
    #[serde(default)]
    pub user: Option<User>,
}

/// Payload of every entity notification (`entity.after_create`, `after_update`, `after_delete`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntityEvent {
    /// The entity after the change, with its attribute definitions.
    pub entity: Entity,
    /// The entity before the change (updates and deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Entity>,
    /// The user who made the change.
    #[serde(default)]
    pub user: Option<User>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_entry_event() -> EntryEvent {
        let sample = crate::sample::entry_event(Hook::EntryAfterCreate, "customer", 42);
        sample.data
    }

    #[test]
    fn envelope_is_cloudevents_structured_json() {
        let env = Envelope::entry(Hook::EntryAfterCreate, "/pagoda/test", sample_entry_event());
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "pagoda.entry.after_create");
        assert_eq!(json["subject"], "entry/42");
        assert_eq!(json["pagodaentity"], "customer");
        assert_eq!(json["pagodaactor"], "admin");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(
            json["dataschema"],
            "urn:pagoda:hookbus:schema:entry-event-data:v1"
        );
        assert_eq!(env.id.0.get_version_num(), 7);
        assert!(json.get("pagodaseq").is_none());
        let back: Envelope<EntryEvent> = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.hook(), Some(Hook::EntryAfterCreate));
        assert_eq!(back.object().unwrap().id, 42);
    }

    #[test]
    fn ids_are_time_ordered() {
        let a = EventId::new();
        let b = EventId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<EventId>().unwrap(), a);
    }
}
