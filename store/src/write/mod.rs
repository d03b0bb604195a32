//! The write operations: each is one transaction with the model change and its
//! event in the outbox.

use serde::Serialize;
use serde_json::Value;
use sqlx::AnyConnection;

use core_events::envelope::{EntityEvent, EntryEvent, Envelope};
use core_events::hook::Hook;
use core_events::model::{AttrType, Entity, Entry, User};
use core_events::request::NewAttr;
use core_events::subject::check_entity_name;

use super::{StoreError, WriteContext, is_unique_violation, load, not_found, outbox, values};

use super::Store;

mod entities;
mod entries;
mod users;

pub(crate) use entries::{check_new_entry, entry_conflict, insert_values, new_entry_snapshot};

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
}

/// Adds the write context's trace to an event and inserts it in the outbox.
async fn insert_event<D: Serialize>(
    conn: &mut AnyConnection,
    mut env: Envelope<D>,
    ctx: &WriteContext,
    max_bytes: Option<usize>,
) -> Result<(), StoreError> {
    env.traceparent.clone_from(&ctx.traceparent);
    outbox::insert_traced(
        conn,
        std::slice::from_ref(&env),
        std::slice::from_ref(&ctx.tracestate),
        max_bytes,
    )
    .await
}
