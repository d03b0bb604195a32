//! The write operations: each is one transaction with the model change and its
//! event in the outbox.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use core_events::envelope::{EntityEvent, EntryEvent, Envelope};
use core_events::hook::Hook;
use core_events::model::{AttrType, Attribute, Entity, Entry, ObjectRef, User};
use core_events::request::{EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry, NewUser};
use core_events::subject::check_entity_name;

use super::{
    StoreError, WriteContext, format_time, is_unique_violation, load, not_found, now, outbox,
    values,
};

use super::Store;

type Tx = sqlx::Transaction<'static, sqlx::Any>;

fn check_name(what: &str, name: &str, problems: &mut Vec<String>) {
    if name.trim().is_empty() {
        problems.push(format!("{what} name is required"));
    } else if let Err(e) = check_entity_name(name) {
        problems.push(format!("{what} name: {e}"));
    } else {
        check_text(&format!("{what} name"), name, problems);
    }
}

/// Text may not hold a NUL character: PostgreSQL's text cannot, and SQLite is
/// held to the same rule (the host refuses it in request bodies already; this
/// catches what a `before_*` hook hands back).
fn check_text(what: &str, text: &str, problems: &mut Vec<String>) {
    if text.contains('\0') {
        problems.push(format!(
            "{what} contains a NUL character (\\u0000), which text may not contain"
        ));
    }
}

fn invalid(problems: Vec<String>) -> Result<(), StoreError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(problems))
    }
}

fn conflict_on_unique(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(message())
    } else {
        StoreError::Db(e)
    }
}

pub(super) fn user_ref(user: Option<&User>) -> (Option<i64>, Option<String>) {
    (user.map(|u| u.id), user.map(|u| u.username.clone()))
}

fn check_attr_type(name: &str, t: AttrType, problems: &mut Vec<String>) {
    if t.name().is_none() {
        problems.push(format!(
            "attribute '{name}' has unknown type {}; known: {}",
            t.0,
            AttrType::ALL
                .iter()
                .map(|(t, n)| format!("{n} ({})", t.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

/// Checks an attribute's `default_value` exactly as an explicit value of the
/// attribute is checked (it is stored in every entry created without one).
fn check_default(name: &str, t: AttrType, default: Option<&Value>, problems: &mut Vec<String>) {
    if t.name().is_none() {
        return; // reported by check_attr_type
    }
    if let Some(problem) = default.and_then(|d| values::check_typed(name, t, d)) {
        problems.push(format!("default_value: {problem}"));
    }
}

async fn insert_attr(
    conn: &mut AnyConnection,
    entity_id: i64,
    attr: &NewAttr,
    position: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO entity_attrs (entity_id, name, type, is_mandatory, referral, position, \
         is_summarized, is_delete_in_chain, note, default_value, is_active) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, TRUE)",
    )
    .bind(entity_id)
    .bind(&attr.name)
    .bind(i64::from(attr.attr_type.0))
    .bind(attr.is_mandatory)
    .bind(serde_json::to_string(&attr.referral).unwrap_or_else(|_| "[]".into()))
    .bind(position)
    .bind(attr.is_summarized)
    .bind(attr.is_delete_in_chain)
    .bind(&attr.note)
    .bind(attr.default_value.as_ref().map(Value::to_string))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    async fn commit(&self, tx: Tx) -> Result<(), StoreError> {
        tx.commit().await?;
        self.outbox_written.notify_one();
        Ok(())
    }

    async fn emit_entity(
        &self,
        conn: &mut AnyConnection,
        hook: Hook,
        entity: &Entity,
        previous: Option<Entity>,
        ctx: &WriteContext,
    ) -> Result<(), StoreError> {
        let env = Envelope::entity(
            hook,
            &*self.source,
            EntityEvent {
                entity: entity.clone(),
                previous,
                user: ctx.user.clone(),
            },
        );
        insert_event(conn, env, ctx, self.max_event_bytes).await
    }

    async fn emit_entry(
        &self,
        conn: &mut AnyConnection,
        hook: Hook,
        entity: &Entity,
        entry: &Entry,
        previous: Option<Entry>,
        ctx: &WriteContext,
    ) -> Result<(), StoreError> {
        let env = Envelope::entry(
            hook,
            &*self.source,
            EntryEvent {
                entity: entity.clone(),
                entry: entry.clone(),
                previous,
                user: ctx.user.clone(),
            },
        );
        insert_event(conn, env, ctx, self.max_event_bytes).await
    }

    /// Reads the changed entity, adds its event and commits.
    async fn finish_entity(
        &self,
        mut tx: Tx,
        id: i64,
        hook: Hook,
        previous: Entity,
        ctx: &WriteContext,
    ) -> Result<Entity, StoreError> {
        let entity = load::entity(&mut tx, id, false)
            .await?
            .ok_or_else(|| not_found("entity", id))?;
        self.emit_entity(&mut tx, hook, &entity, Some(previous), ctx)
            .await?;
        self.commit(tx).await?;
        Ok(entity)
    }

    /// Creates a user (users emit no events).
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] without a username, [`StoreError::Conflict`] when it is taken.
    pub async fn create_user(&self, new: &NewUser) -> Result<User, StoreError> {
        if new.username.trim().is_empty() {
            return Err(StoreError::Invalid(vec!["username is required".into()]));
        }
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "INSERT INTO users (username, email, first_name, last_name, is_superuser, date_joined) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(&new.username)
        .bind(&new.email)
        .bind(&new.first_name)
        .bind(&new.last_name)
        .bind(new.is_superuser)
        .bind(format_time(&now()))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict_on_unique(e, || format!("user '{}' already exists", new.username)))?;
        let id: i64 = row.try_get(0)?;
        let user = load::user(&mut tx, id)
            .await?
            .ok_or_else(|| not_found("user", id))?;
        tx.commit().await?;
        Ok(user)
    }

    /// A user by id.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is none.
    pub async fn user(&self, id: i64) -> Result<User, StoreError> {
        let mut conn = self.pool.acquire().await?;
        load::user(&mut conn, id)
            .await?
            .ok_or_else(|| not_found("user", id))
    }

    /// A user by username.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} WHERE username = $1",
            load::USER_COLUMNS
        )))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(load::user_from_row)
        .transpose()
    }

    /// Creates an entity with its attribute definitions; emits `entity.after_create`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] listing every problem of the input,
    /// [`StoreError::Conflict`] when an active entity has the name.
    pub async fn create_entity(
        &self,
        new: &NewEntity,
        ctx: &WriteContext,
    ) -> Result<Entity, StoreError> {
        let mut problems = Vec::new();
        check_name("entity", &new.name, &mut problems);
        check_text("entity note", &new.note, &mut problems);
        let mut seen = HashSet::new();
        for a in &new.attrs {
            check_name("attribute", &a.name, &mut problems);
            check_text("attribute note", &a.note, &mut problems);
            check_attr_type(&a.name, a.attr_type, &mut problems);
            check_default(
                &a.name,
                a.attr_type,
                a.default_value.as_ref(),
                &mut problems,
            );
            if !seen.insert(a.name.as_str()) {
                problems.push(format!("attribute '{}' is defined twice", a.name));
            }
        }
        invalid(problems)?;
        let mut tx = self.begin().await?;
        let t = format_time(&now());
        let (uid, uname) = user_ref(ctx.user.as_ref());
        let row = sqlx::query(
            "INSERT INTO entities (name, note, is_active, created_time, created_user_id, \
             created_user, updated_time) VALUES ($1, $2, TRUE, $3, $4, $5, $3) RETURNING id",
        )
        .bind(&new.name)
        .bind(&new.note)
        .bind(&t)
        .bind(uid)
        .bind(uname)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict_on_unique(e, || format!("entity '{}' already exists", new.name)))?;
        let id: i64 = row.try_get(0)?;
        for (i, attr) in new.attrs.iter().enumerate() {
            insert_attr(&mut tx, id, attr, i64::try_from(i).unwrap_or(i64::MAX)).await?;
        }
        let entity = load::entity(&mut tx, id, false)
            .await?
            .ok_or_else(|| not_found("entity", id))?;
        self.emit_entity(&mut tx, Hook::EntityAfterCreate, &entity, None, ctx)
            .await?;
        self.commit(tx).await?;
        Ok(entity)
    }

    /// Changes an entity's name, note and attribute definitions; emits
    /// `entity.after_update` with the previous state.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no active entity `id`, [`StoreError::Invalid`]
    /// listing every problem, [`StoreError::Conflict`] for a taken name.
    pub async fn update_entity(
        &self,
        id: i64,
        changes: &EntityChanges,
        ctx: &WriteContext,
    ) -> Result<Entity, StoreError> {
        let mut tx = self.begin().await?;
        let previous = lock_entity(&mut tx, id, true).await?;
        let mut problems = Vec::new();
        if let Some(name) = &changes.name {
            check_name("entity", name, &mut problems);
        }
        if let Some(note) = &changes.note {
            check_text("entity note", note, &mut problems);
        }
        let mut names: HashSet<String> = previous.attrs.iter().map(|a| a.name.clone()).collect();
        for c in &changes.attrs {
            if let Some(note) = &c.note {
                check_text("attribute note", note, &mut problems);
            }
            match c.id {
                Some(aid) => {
                    let Some(old) = previous.attrs.iter().find(|a| a.id == aid) else {
                        problems.push(format!(
                            "attribute {aid} is not an active attribute of entity '{}'",
                            previous.name
                        ));
                        continue;
                    };
                    if !c.is_deleted {
                        let name = c.name.as_deref().unwrap_or(&old.name);
                        check_default(name, old.attr_type, c.default_value.as_ref(), &mut problems);
                    }
                    if c.is_deleted {
                        names.remove(&old.name);
                    } else if let Some(n) = c.name.as_ref().filter(|n| **n != old.name) {
                        check_name("attribute", n, &mut problems);
                        names.remove(&old.name);
                        if !names.insert(n.clone()) {
                            problems.push(format!("attribute '{n}' already exists"));
                        }
                    }
                }
                None => match (&c.name, c.attr_type) {
                    (Some(n), Some(t)) => {
                        check_name("attribute", n, &mut problems);
                        check_attr_type(n, t, &mut problems);
                        check_default(n, t, c.default_value.as_ref(), &mut problems);
                        if !names.insert(n.clone()) {
                            problems.push(format!("attribute '{n}' already exists"));
                        }
                    }
                    _ => problems.push("a new attribute needs a name and a type".into()),
                },
            }
        }
        invalid(problems)?;
        sqlx::query(
            "UPDATE entities SET name = COALESCE($2, name), note = COALESCE($3, note), \
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
                    "entity '{}' already exists",
                    changes.name.as_deref().unwrap_or_default()
                )
            })
        })?;
        let mut position = i64::try_from(previous.attrs.len()).unwrap_or(0);
        for c in &changes.attrs {
            match (c.id, c.name.as_deref(), c.attr_type) {
                (Some(aid), _, _) if c.is_deleted => {
                    sqlx::query("UPDATE entity_attrs SET is_active = FALSE WHERE id = $1")
                        .bind(aid)
                        .execute(&mut *tx)
                        .await?;
                }
                (Some(aid), name, _) => {
                    sqlx::query(
                        "UPDATE entity_attrs SET name = COALESCE($2, name), \
                         is_mandatory = COALESCE($3, is_mandatory), note = COALESCE($4, note), \
                         default_value = COALESCE($5, default_value) WHERE id = $1",
                    )
                    .bind(aid)
                    .bind(name)
                    .bind(c.is_mandatory)
                    .bind(c.note.as_deref())
                    .bind(c.default_value.as_ref().map(Value::to_string))
                    .execute(&mut *tx)
                    .await?;
                }
                (None, Some(name), Some(t)) => {
                    let mut attr = NewAttr::new(name, t);
                    attr.is_mandatory = c.is_mandatory.unwrap_or(false);
                    attr.note = c.note.clone().unwrap_or_default();
                    attr.default_value.clone_from(&c.default_value);
                    insert_attr(&mut tx, id, &attr, position).await?;
                    position += 1;
                }
                _ => {}
            }
        }
        self.finish_entity(tx, id, Hook::EntityAfterUpdate, previous, ctx)
            .await
    }

    /// Soft-deletes an entity with no active entries; emits `entity.after_delete`.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no active entity `id`, [`StoreError::Conflict`]
    /// while it has active entries.
    pub async fn delete_entity(&self, id: i64, ctx: &WriteContext) -> Result<Entity, StoreError> {
        let mut tx = self.begin().await?;
        let previous = lock_entity(&mut tx, id, true).await?;
        let entries: i64 =
            sqlx::query("SELECT COUNT(*) FROM entries WHERE entity_id = $1 AND is_active")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        if entries > 0 {
            return Err(StoreError::Conflict(format!(
                "entity '{}' still has {entries} active entries; delete them first",
                previous.name
            )));
        }
        set_entity_active(&mut tx, id, false).await?;
        self.finish_entity(tx, id, Hook::EntityAfterDelete, previous, ctx)
            .await
    }

    /// Restores a deleted entity. There is no entity restore hook: this emits
    /// `entity.after_update` (`previous.is_active` is false).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no deleted entity `id`, [`StoreError::Conflict`]
    /// when an active entity took its name.
    pub async fn restore_entity(&self, id: i64, ctx: &WriteContext) -> Result<Entity, StoreError> {
        let mut tx = self.begin().await?;
        let previous = lock_entity(&mut tx, id, false).await?;
        set_entity_active(&mut tx, id, true)
            .await
            .map_err(|e| match e {
                StoreError::Db(e) => conflict_on_unique(e, || {
                    format!("an active entity is named '{}'", previous.name)
                }),
                e => e,
            })?;
        self.finish_entity(tx, id, Hook::EntityAfterUpdate, previous, ctx)
            .await
    }

    /// An entity (active or deleted) with its active attribute definitions.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is none.
    pub async fn entity(&self, id: i64) -> Result<Entity, StoreError> {
        let mut conn = self.pool.acquire().await?;
        load::entity(&mut conn, id, false)
            .await?
            .ok_or_else(|| not_found("entity", id))
    }

    /// The active entity with this name.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is none.
    pub async fn entity_by_name(&self, name: &str) -> Result<Entity, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let id = load::entity_id_by_name(&mut conn, name)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "entity",
                id: format!("'{name}'"),
            })?;
        load::entity(&mut conn, id, false)
            .await?
            .ok_or_else(|| not_found("entity", id))
    }

    /// Entities by id (active only unless `include_deleted`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn list_entities(&self, include_deleted: bool) -> Result<Vec<Entity>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut out = Vec::new();
        for id in load::entity_ids(&mut conn, include_deleted).await? {
            if let Some(e) = load::entity(&mut conn, id, false).await? {
                out.push(e);
            }
        }
        Ok(out)
    }

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
        let entity = super::batch::entities_with_attrs(&mut tx, &[entity_id])
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

/// Adds the write context's trace to an event and inserts it in the outbox.
async fn insert_event<D: Serialize>(
    conn: &mut AnyConnection,
    mut env: Envelope<D>,
    ctx: &WriteContext,
    max_bytes: Option<usize>,
) -> Result<(), StoreError> {
    env.traceparent.clone_from(&ctx.traceparent);
    outbox::insert_envelopes_within(conn, std::slice::from_ref(&env), max_bytes).await
}

/// Takes the entity's row lock (PostgreSQL; SQLite holds the database lock) and
/// reads it as it was before the change.
async fn lock_entity(
    conn: &mut AnyConnection,
    id: i64,
    active: bool,
) -> Result<Entity, StoreError> {
    let n =
        sqlx::query("UPDATE entities SET is_active = is_active WHERE id = $1 AND is_active = $2")
            .bind(id)
            .bind(active)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    if n == 0 {
        return Err(StoreError::NotFound {
            what: if active { "entity" } else { "deleted entity" },
            id: id.to_string(),
        });
    }
    load::entity(conn, id, false)
        .await?
        .ok_or_else(|| not_found("entity", id))
}

async fn set_entity_active(
    conn: &mut AnyConnection,
    id: i64,
    active: bool,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE entities SET is_active = $2, updated_time = $3 WHERE id = $1")
        .bind(id)
        .bind(active)
        .bind(format_time(&now()))
        .execute(&mut *conn)
        .await?;
    Ok(())
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
pub(super) fn check_new_entry(
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
pub(super) fn entry_conflict(name: &str, entity: &str) -> StoreError {
    StoreError::Conflict(format!(
        "entry '{name}' already exists in entity '{entity}'"
    ))
}

/// A new entry as stored: `values` by attribute id, `value_ids` their row ids
/// by attribute id.
pub(super) fn new_entry_snapshot(
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
/// [`ROWS_PER_STATEMENT`](super::ROWS_PER_STATEMENT) rows; returns each value's
/// row id by (entry id, attribute id). `prepared` keeps the statements prepared
/// (a single entry's values: one statement per number of values).
pub(super) async fn insert_values(
    conn: &mut AnyConnection,
    rows: &[(i64, i64, &Value)],
    prepared: bool,
) -> Result<HashMap<(i64, i64), i64>, StoreError> {
    let mut ids = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(super::ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO attribute_values (entry_id, attr_id, value) VALUES {} \
             RETURNING id, entry_id, attr_id",
            super::values_rows(chunk.len(), 3, 1, "")
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
