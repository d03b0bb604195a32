//! Entities and their attributes: each write one transaction with its event.

use std::collections::HashSet;

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use core_events::hook::Hook;
use core_events::model::Entity;
use core_events::request::{EntityChanges, NewAttr, NewEntity};

use super::{
    check_attr_type, check_default, check_name, check_text, conflict_on_unique, insert_attr,
    invalid, user_ref,
};
use crate::Store;
use crate::{StoreError, WriteContext, format_time, load, not_found, now};

impl Store {
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
