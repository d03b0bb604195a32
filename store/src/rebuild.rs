//! Rebuilding the model store from the event stream, and comparing stores.
//!
//! Every event carries full snapshots, so applying the events of the stream in
//! order to an empty store reproduces the original: entities with their
//! attribute definitions (removed ones stay, inactive), entries with their
//! values, deleted and restored states. Applying never writes to the outbox.
//!
//! The stream keeps the order of each object's events but not the commit order
//! across objects, so while rebuilding, states that never existed together can
//! meet (a new entity named like one that is renamed a moment later). The
//! rebuild therefore drops the name-uniqueness indexes while it runs and
//! re-creates them at the end, which checks the final state; and an entry event
//! that comes before its entity's first event inserts the entity from its
//! snapshot (the entity's own events then overwrite it).

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use core_events::envelope::{EntityEvent, EntryEvent, Envelope};
use core_events::hook::ObjectKind;
use core_events::model::{Entity, EntityAttr, Entry};

use super::{Backend, Store, StoreError, format_time, load};

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// An entity's state was set from the snapshot.
    Entity(i64),
    /// An entry's state was set from the snapshot.
    Entry(i64),
    /// Not a model change (say, an event of another kind); nothing to do.
    Skipped(String),
    /// Not a readable event (not JSON, not an envelope, its data not the
    /// hook's, or nesting deeper than serde_json reads): nothing applied, and
    /// the rest of the batch goes on. Why, naming the event.
    Unreadable(String),
}

/// Everything the events determine, for comparing two stores.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSnapshot {
    /// Entities by id, each with every attribute definition (removed ones too).
    pub entities: Vec<Entity>,
    /// Entries by id, deleted ones too, with the values of active attributes.
    pub entries: Vec<Entry>,
    /// Every stored value: (value id, entry id, attribute id, JSON text).
    pub values: Vec<(i64, i64, i64, String)>,
}

const UNIQUE_INDEXES: [(&str, &str); 2] = [
    (
        "entities_active_name",
        "CREATE UNIQUE INDEX entities_active_name ON entities (name) WHERE is_active",
    ),
    (
        "entries_active_name",
        "CREATE UNIQUE INDEX entries_active_name ON entries (entity_id, name) WHERE is_active",
    ),
];

impl Store {
    /// True when the store holds no entity and no entry.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let row =
            sqlx::query("SELECT (SELECT COUNT(*) FROM entities) + (SELECT COUNT(*) FROM entries)")
                .fetch_one(&self.pool)
                .await?;
        Ok(row.try_get::<i64, _>(0)? == 0)
    }

    /// Prepares a rebuild: drops the name-uniqueness indexes (see the module docs).
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn begin_rebuild(&self) -> Result<(), StoreError> {
        for (name, _) in UNIQUE_INDEXES {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX IF EXISTS {name}")))
                .execute(&self.writer)
                .await?;
        }
        Ok(())
    }

    /// Ends a rebuild: re-creates the indexes (failing if the final state has
    /// duplicate names) and, on PostgreSQL, moves id sequences past the ids used.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] when two active objects share a name;
    /// [`StoreError::Db`] when the database fails.
    pub async fn finish_rebuild(&self) -> Result<(), StoreError> {
        for (name, create) in UNIQUE_INDEXES {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX IF EXISTS {name}")))
                .execute(&self.writer)
                .await?;
            sqlx::query(create)
                .execute(&self.writer)
                .await
                .map_err(|e| {
                    if super::is_unique_violation(&e) {
                        StoreError::Conflict(format!(
                            "rebuilt store has two active objects with one name ({name}): {e}"
                        ))
                    } else {
                        StoreError::Db(e)
                    }
                })?;
        }
        if self.backend == Backend::Postgres {
            for table in [
                "users",
                "entities",
                "entity_attrs",
                "entries",
                "attribute_values",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                     COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )))
                .execute(&self.writer)
                .await?;
            }
        }
        Ok(())
    }

    /// Applies a batch of events (envelope JSON each) in one transaction, in
    /// order. An event that cannot be read is [`Applied::Unreadable`] and the
    /// others are applied: one bad event never stops a rebuild.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails (nothing of the batch is applied).
    pub async fn apply_events(&self, events: &[&[u8]]) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.begin().await?;
        let mut out = Vec::with_capacity(events.len());
        for bytes in events {
            // Reading fails before anything of the event is written, so the
            // transaction goes on.
            out.push(match apply(&mut tx, bytes).await {
                Err(StoreError::Invalid(problems)) => Applied::Unreadable(problems.join("; ")),
                other => other?,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The state the events determine (see [`ModelSnapshot`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn snapshot(&self) -> Result<ModelSnapshot, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut entities = Vec::new();
        let mut entries = Vec::new();
        for id in load::entity_ids(&mut conn, true).await? {
            let Some(mut entity) = load::entity(&mut conn, id, false).await? else {
                continue;
            };
            entries.extend(load::entries_of(&mut conn, &entity, true).await?);
            entity.attrs = load::attrs(&mut conn, id, true).await?;
            entities.push(entity);
        }
        entries.sort_by_key(|e| e.id);
        let values =
            sqlx::query("SELECT id, entry_id, attr_id, value FROM attribute_values ORDER BY id")
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(ModelSnapshot {
            entities,
            entries,
            values,
        })
    }
}

async fn apply(conn: &mut AnyConnection, bytes: &[u8]) -> Result<Applied, StoreError> {
    let env: Envelope<Value> = serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Invalid(vec![format!("event is not a CloudEvents envelope: {e}")])
    })?;
    let Some(hook) = env.hook().filter(|h| h.kind().is_notification()) else {
        return Ok(Applied::Skipped(format!(
            "event {} of type '{}' is not a model change",
            env.id, env.event_type
        )));
    };
    let bad = |e: serde_json::Error| {
        StoreError::Invalid(vec![format!("event {} ({}): {e}", env.id, hook.name())])
    };
    match hook.object() {
        ObjectKind::Entity => {
            let data: EntityEvent = serde_json::from_value(env.data).map_err(bad)?;
            put_entity(conn, &data.entity, true).await?;
            Ok(Applied::Entity(data.entity.id))
        }
        ObjectKind::Entry => {
            let data: EntryEvent = serde_json::from_value(env.data).map_err(bad)?;
            put_entity(conn, &data.entity, false).await?;
            put_entry(conn, &data.entry).await?;
            Ok(Applied::Entry(data.entry.id))
        }
    }
}

/// Sets an entity and its attribute definitions from a snapshot; with
/// `overwrite` false only inserts what is missing.
async fn put_entity(
    conn: &mut AnyConnection,
    entity: &Entity,
    overwrite: bool,
) -> Result<(), StoreError> {
    let action = if overwrite {
        "DO UPDATE SET name = excluded.name, note = excluded.note, \
         is_active = excluded.is_active, created_time = excluded.created_time, \
         created_user_id = excluded.created_user_id, created_user = excluded.created_user"
    } else {
        "DO NOTHING"
    };
    let t = format_time(&entity.created_time);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO entities (id, name, note, is_active, created_time, created_user_id, \
         created_user, updated_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $5) \
         ON CONFLICT (id) {action}"
    )))
    .bind(entity.id)
    .bind(&entity.name)
    .bind(&entity.note)
    .bind(entity.is_active)
    .bind(&t)
    .bind(entity.created_user.as_ref().map(|u| u.id))
    .bind(entity.created_user.as_ref().map(|u| u.name.clone()))
    .execute(&mut *conn)
    .await?;
    for attr in &entity.attrs {
        put_attr(conn, entity.id, attr, overwrite).await?;
    }
    if overwrite {
        // Attributes the snapshot no longer lists were removed.
        let active: Vec<String> = entity.attrs.iter().map(|a| a.id.to_string()).collect();
        let keep = if active.is_empty() {
            String::new()
        } else {
            format!(" AND id NOT IN ({})", active.join(", "))
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE entity_attrs SET is_active = FALSE WHERE entity_id = $1{keep}"
        )))
        .bind(entity.id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn put_attr(
    conn: &mut AnyConnection,
    entity_id: i64,
    a: &EntityAttr,
    overwrite: bool,
) -> Result<(), StoreError> {
    let action = if overwrite {
        "DO UPDATE SET name = excluded.name, type = excluded.type, \
         is_mandatory = excluded.is_mandatory, referral = excluded.referral, \
         position = excluded.position, is_summarized = excluded.is_summarized, \
         is_delete_in_chain = excluded.is_delete_in_chain, note = excluded.note, \
         default_value = excluded.default_value, is_active = excluded.is_active"
    } else {
        "DO NOTHING"
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO entity_attrs (id, entity_id, name, type, is_mandatory, referral, position, \
         is_summarized, is_delete_in_chain, note, default_value, is_active) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) {action}"
    )))
    .bind(a.id)
    .bind(entity_id)
    .bind(&a.name)
    .bind(i64::from(a.attr_type.0))
    .bind(a.is_mandatory)
    .bind(serde_json::to_string(&a.referral).unwrap_or_else(|_| "[]".into()))
    .bind(i64::from(a.index))
    .bind(a.is_summarized)
    .bind(a.is_delete_in_chain)
    .bind(&a.note)
    .bind(a.default_value.as_ref().map(Value::to_string))
    .bind(a.is_active)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn put_entry(conn: &mut AnyConnection, e: &Entry) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO entries (id, entity_id, name, note, is_active, created_time, \
         created_user_id, created_user, updated_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (id) DO UPDATE SET entity_id = excluded.entity_id, name = excluded.name, \
         note = excluded.note, is_active = excluded.is_active, \
         created_time = excluded.created_time, created_user_id = excluded.created_user_id, \
         created_user = excluded.created_user, updated_time = excluded.updated_time",
    )
    .bind(e.id)
    .bind(e.schema.id)
    .bind(&e.name)
    .bind(&e.note)
    .bind(e.is_active)
    .bind(format_time(&e.created_time))
    .bind(e.created_user.as_ref().map(|u| u.id))
    .bind(e.created_user.as_ref().map(|u| u.name.clone()))
    .bind(format_time(&e.updated_time))
    .execute(&mut *conn)
    .await?;
    for a in &e.attrs {
        sqlx::query(
            "INSERT INTO attribute_values (id, entry_id, attr_id, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET value = excluded.value",
        )
        .bind(a.id)
        .bind(e.id)
        .bind(a.schema.id)
        .bind(a.value.to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
