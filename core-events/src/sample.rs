//! Sample objects: minimal, valid snapshots for demos, documentation, benchmarks
//! and tests, so they all build events the same way.

use chrono::Utc;

use crate::envelope::{EntityEvent, EntryEvent, Envelope};
use crate::hook::Hook;
use crate::model::{Entity, Entry, ObjectRef, User};

/// The `source` of sample events.
pub const SOURCE: &str = "/pagoda/sample";

/// An active superuser.
pub fn user(id: i64, username: &str) -> User {
    User {
        id,
        username: username.into(),
        email: format!("{username}@example.com"),
        first_name: String::new(),
        last_name: String::new(),
        is_active: true,
        is_superuser: true,
        date_joined: Utc::now(),
    }
}

/// An active entity with no attribute definitions.
pub fn entity(id: i64, name: &str) -> Entity {
    Entity {
        id,
        name: name.into(),
        note: String::new(),
        is_active: true,
        created_time: Utc::now(),
        created_user: None,
        attrs: vec![],
    }
}

/// An active entry of `entity` with no attribute values.
pub fn entry(id: i64, name: &str, entity: &Entity) -> Entry {
    let now = Utc::now();
    Entry {
        id,
        name: name.into(),
        note: String::new(),
        is_active: true,
        schema: ObjectRef {
            id: entity.id,
            name: entity.name.clone(),
        },
        created_time: now,
        created_user: None,
        updated_time: now,
        attrs: vec![],
    }
}

/// An entry event about entry `entry_id` (named `entry-<id>`) of entity
/// `entity_name` (id 1), made by user `admin`.
pub fn entry_event(hook: Hook, entity_name: &str, entry_id: i64) -> Envelope<EntryEvent> {
    let entity = entity(1, entity_name);
    let entry = entry(entry_id, &format!("entry-{entry_id}"), &entity);
    Envelope::entry(
        hook,
        SOURCE,
        EntryEvent {
            entity,
            entry,
            previous: None,
            user: Some(user(1, "admin")),
        },
    )
}

/// An entity event about entity `id` named `name`, made by user `admin`.
pub fn entity_event(hook: Hook, id: i64, name: &str) -> Envelope<EntityEvent> {
    Envelope::entity(
        hook,
        SOURCE,
        EntityEvent {
            entity: entity(id, name),
            previous: None,
            user: Some(user(1, "admin")),
        },
    )
}
