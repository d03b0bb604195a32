//! Entries and their values: each write one transaction with its event.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use core_events::hook::Hook;
use core_events::model::{Attribute, Entity, Entry, ObjectRef, User};
use core_events::request::{EntryChanges, NewEntry};

use super::{check_name, check_text, conflict_on_unique, invalid, user_ref};
use crate::Store;
use crate::{
    StoreError, WriteContext, format_time, is_unique_violation, load, not_found, now, values,
};

impl Store {
    /// Creates an entry of an active entity; emits `entry.after_create`.
    ///
    /// Values are checked against their attribute's type; mandatory attributes
    /// need a value; attributes with a default get it when the entry names none.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no active entity, [`StoreError::Invalid`] listing
    /// every problem, [`StoreError::Conflict`] for a taken name.
    pub async fn create_entry(
        &self,
        entity_id: i64,
        new: &NewEntry,
        ctx: &WriteContext,
    ) -> Result<Entry, StoreError> {
        let mut tx = self.begin().await?;
        let entity = crate::load::entities_with_attrs(&mut tx, &[entity_id])
            .await?
            .remove(&entity_id)
            .filter(|e| e.is_active)
            .ok_or_else(|| not_found("entity", entity_id))?;
        let values = check_new_entry(&entity, new)?;
        let created = now();
        let t = format_time(&created);
        let (uid, uname) = user_ref(ctx.user.as_ref());
        let row = sqlx::query(
            "INSERT INTO entries (entity_id, name, note, is_active, created_time, \
             created_user_id, created_user, updated_time) \
             VALUES ($1, $2, $3, TRUE, $4, $5, $6, $4) RETURNING id",
        )
        .bind(entity_id)
        .bind(&new.name)
        .bind(&new.note)
        .bind(&t)
        .bind(uid)
        .bind(uname)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                entry_conflict(&new.name, &entity.name)
            } else {
                StoreError::Db(e)
            }
        })?;
        let id: i64 = row.try_get(0)?;
        // The entry as stored, built here rather than read back: a new entry has
        // exactly these values (one statement for all of them).
        let rows: Vec<(i64, i64, &Value)> = values.iter().map(|(a, v)| (id, *a, v)).collect();
        let value_ids: HashMap<i64, i64> = insert_values(&mut tx, &rows, true)
            .await?
            .into_iter()
            .map(|((_, attr_id), value_id)| (attr_id, value_id))
            .collect();
        let entry = new_entry_snapshot(
            id,
            new,
            &entity,
            created,
            ctx.user.as_ref(),
            &values,
            &value_ids,
        );
        self.emit_entry(&mut tx, Hook::EntryAfterCreate, &entity, &entry, None, ctx)
            .await?;
        self.commit(tx).await?;
        Ok(entry)
    }

    /// Changes an active entry's name, note and values; emits `entry.after_update`
    /// with the previous state.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no active entry, [`StoreError::Invalid`] listing
    /// every problem, [`StoreError::Conflict`] for a taken name.
    pub async fn update_entry(
        &self,
        id: i64,
        changes: &EntryChanges,
        ctx: &WriteContext,
    ) -> Result<Entry, StoreError> {
        let mut tx = self.begin().await?;
        let (entity, previous) = lock_entry(&mut tx, id, true).await?;
        let mut problems = Vec::new();
        if let Some(name) = &changes.name {
            check_name("entry", name, &mut problems);
        }
        if let Some(note) = &changes.note {
            check_text("entry note", note, &mut problems);
        }
        let values = check_values(&entity, &changes.attrs, &mut problems);
        for attr in entity.attrs.iter().filter(|a| a.is_mandatory) {
            if changes.attrs.get(&attr.name).is_some_and(Value::is_null) {
                problems.push(format!("attribute '{}' is mandatory", attr.name));
            }
        }
        invalid(problems)?;
        sqlx::query(
            "UPDATE entries SET name = COALESCE($2, name), note = COALESCE($3, note), \
             updated_time = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(changes.name.as_deref())
        .bind(changes.note.as_deref())
        .bind(format_time(&now()))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            conflict_on_unique(e, || {
                format!(
                    "entry '{}' already exists in entity '{}'",
                    changes.name.as_deref().unwrap_or_default(),
                    entity.name
                )
            })
        })?;
        upsert_values(&mut tx, id, &values).await?;
        let entry = load::entry_of(&mut tx, id, &entity)
            .await?
            .ok_or_else(|| not_found("entry", id))?;
        self.emit_entry(
            &mut tx,
            Hook::EntryAfterUpdate,
            &entity,
            &entry,
            Some(previous),
            ctx,
        )
        .await?;
        self.commit(tx).await?;
        Ok(entry)
    }

    /// Soft-deletes an entry; emits `entry.after_delete`.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no active entry.
    pub async fn delete_entry(&self, id: i64, ctx: &WriteContext) -> Result<Entry, StoreError> {
        self.set_entry_active(id, false, ctx).await
    }

    /// Restores a deleted entry; emits `entry.after_restore`.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no deleted entry, [`StoreError::Conflict`] when
    /// an active entry took its name.
    pub async fn restore_entry(&self, id: i64, ctx: &WriteContext) -> Result<Entry, StoreError> {
        self.set_entry_active(id, true, ctx).await
    }

    async fn set_entry_active(
        &self,
        id: i64,
        active: bool,
        ctx: &WriteContext,
    ) -> Result<Entry, StoreError> {
        let mut tx = self.begin().await?;
        let (entity, previous) = lock_entry(&mut tx, id, !active).await?;
        sqlx::query("UPDATE entries SET is_active = $2, updated_time = $3 WHERE id = $1")
            .bind(id)
            .bind(active)
            .bind(format_time(&now()))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                conflict_on_unique(e, || {
                    format!(
                        "an active entry of entity '{}' is named '{}'",
                        entity.name, previous.name
                    )
                })
            })?;
        let entry = load::entry_of(&mut tx, id, &entity)
            .await?
            .ok_or_else(|| not_found("entry", id))?;
        let hook = if active {
            Hook::EntryAfterRestore
        } else {
            Hook::EntryAfterDelete
        };
        self.emit_entry(&mut tx, hook, &entity, &entry, Some(previous), ctx)
            .await?;
        self.commit(tx).await?;
        Ok(entry)
    }

    /// An entry (active or deleted) with its values.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is none.
    pub async fn entry(&self, id: i64) -> Result<Entry, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let entity_id = load::entry_entity_id(&mut conn, id)
            .await?
            .ok_or_else(|| not_found("entry", id))?;
        let entity = load::entity(&mut conn, entity_id, false)
            .await?
            .ok_or_else(|| not_found("entity", entity_id))?;
        load::entry_of(&mut conn, id, &entity)
            .await?
            .ok_or_else(|| not_found("entry", id))
    }

    /// Entries of an entity by id (active only unless `include_deleted`).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when the entity does not exist.
    pub async fn list_entries(
        &self,
        entity_id: i64,
        include_deleted: bool,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let entity = load::entity(&mut conn, entity_id, false)
            .await?
            .ok_or_else(|| not_found("entity", entity_id))?;
        load::entries_of(&mut conn, &entity, include_deleted).await
    }
}

/// Takes the entry's row lock and reads it (with its entity) as it was before the change.
async fn lock_entry(
    conn: &mut AnyConnection,
    id: i64,
    active: bool,
) -> Result<(Entity, Entry), StoreError> {
    let missing = || StoreError::NotFound {
        what: if active { "entry" } else { "deleted entry" },
        id: id.to_string(),
    };
    let n =
        sqlx::query("UPDATE entries SET is_active = is_active WHERE id = $1 AND is_active = $2")
            .bind(id)
            .bind(active)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    if n == 0 {
        return Err(missing());
    }
    let entity_id = load::entry_entity_id(conn, id).await?.ok_or_else(missing)?;
    let entity = load::entity(conn, entity_id, false)
        .await?
        .ok_or_else(|| not_found("entity", entity_id))?;
    let entry = load::entry_of(conn, id, &entity)
        .await?
        .ok_or_else(missing)?;
    Ok((entity, entry))
}

/// Checks values by attribute name; returns `(attr id, value)` of the good ones.
fn check_values(
    entity: &Entity,
    attrs: &BTreeMap<String, Value>,
    problems: &mut Vec<String>,
) -> Vec<(i64, Value)> {
    let mut out = Vec::with_capacity(attrs.len());
    for (name, value) in attrs {
        match entity.attrs.iter().find(|a| &a.name == name) {
            None => problems.push(format!(
                "entity '{}' has no attribute '{name}' (it has: {})",
                entity.name,
                entity
                    .attrs
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(attr) => match values::check(attr, value) {
                Some(problem) => problems.push(problem),
                None => out.push((attr.id, value.clone())),
            },
        }
    }
    out
}

/// Checks a new entry against its entity: its name, its values, the mandatory
/// attributes; returns `(attr id, value)` to store, defaults included.
pub(crate) fn check_new_entry(
    entity: &Entity,
    new: &NewEntry,
) -> Result<Vec<(i64, Value)>, StoreError> {
    let mut problems = Vec::new();
    check_name("entry", &new.name, &mut problems);
    check_text("entry note", &new.note, &mut problems);
    let mut values = check_values(entity, &new.attrs, &mut problems);
    for attr in &entity.attrs {
        if !new.attrs.contains_key(&attr.name) {
            if let Some(d) = attr.default_value.clone().filter(|d| !d.is_null()) {
                // A default stored before defaults were checked may not fit:
                // refused like an explicit value, never copied into the entry.
                match values::check(attr, &d) {
                    None => values.push((attr.id, d)),
                    Some(problem) => problems.push(format!(
                        "default_value: {problem} (give a value, or change the attribute's default)"
                    )),
                }
            } else if attr.is_mandatory {
                problems.push(format!("attribute '{}' is mandatory", attr.name));
            }
        }
    }
    invalid(problems)?;
    Ok(values)
}

/// The conflict of a new entry whose name an active entry of the entity has.
pub(crate) fn entry_conflict(name: &str, entity: &str) -> StoreError {
    StoreError::Conflict(format!(
        "entry '{name}' already exists in entity '{entity}'"
    ))
}

/// A new entry as stored: `values` by attribute id, `value_ids` their row ids
/// by attribute id.
pub(crate) fn new_entry_snapshot(
    id: i64,
    new: &NewEntry,
    entity: &Entity,
    created: chrono::DateTime<chrono::Utc>,
    user: Option<&User>,
    values: &[(i64, Value)],
    value_ids: &HashMap<i64, i64>,
) -> Entry {
    Entry {
        id,
        name: new.name.clone(),
        note: new.note.clone(),
        is_active: true,
        schema: ObjectRef {
            id: entity.id,
            name: entity.name.clone(),
        },
        created_time: created,
        created_user: user.map(|u| ObjectRef {
            id: u.id,
            name: u.username.clone(),
        }),
        updated_time: created,
        attrs: entity
            .attrs
            .iter()
            .filter_map(|attr| {
                let (_, value) = values.iter().find(|(a, _)| *a == attr.id)?;
                Some(Attribute {
                    id: *value_ids.get(&attr.id)?,
                    name: attr.name.clone(),
                    attr_type: attr.attr_type,
                    schema: ObjectRef {
                        id: attr.id,
                        name: attr.name.clone(),
                    },
                    value: value.clone(),
                })
            })
            .collect(),
    }
}

/// Inserts attribute values `(entry id, attribute id, value)`, one statement per
/// [`ROWS_PER_STATEMENT`](crate::ROWS_PER_STATEMENT) rows; returns each value's
/// row id by (entry id, attribute id). `prepared` keeps the statements prepared
/// (a single entry's values: one statement per number of values).
pub(crate) async fn insert_values(
    conn: &mut AnyConnection,
    rows: &[(i64, i64, &Value)],
    prepared: bool,
) -> Result<HashMap<(i64, i64), i64>, StoreError> {
    let mut ids = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(crate::ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO attribute_values (entry_id, attr_id, value) VALUES {} \
             RETURNING id, entry_id, attr_id",
            crate::values_rows(chunk.len(), 3, 1, "")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(prepared);
        for (entry_id, attr_id, value) in chunk {
            q = q.bind(*entry_id).bind(*attr_id).bind(value.to_string());
        }
        for row in q.fetch_all(&mut *conn).await? {
            ids.insert(
                (row.try_get("entry_id")?, row.try_get("attr_id")?),
                row.try_get("id")?,
            );
        }
    }
    Ok(ids)
}

async fn upsert_values(
    conn: &mut AnyConnection,
    entry_id: i64,
    values: &[(i64, Value)],
) -> Result<(), StoreError> {
    for (attr_id, value) in values {
        sqlx::query(
            "INSERT INTO attribute_values (entry_id, attr_id, value) VALUES ($1, $2, $3) \
             ON CONFLICT (entry_id, attr_id) DO UPDATE SET value = excluded.value",
        )
        .bind(entry_id)
        .bind(attr_id)
        .bind(value.to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
