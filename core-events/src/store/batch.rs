//! Group commit of entry creations: many [`NewEntryInput`]s written in one
//! transaction with a few multi-row statements (the entities with their
//! attributes, all the entries, all their values, all their events), each input
//! getting the answer [`Store::create_entry`] would have given it.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::write::{
    NewEntry, check_new_entry, entry_conflict, insert_values, new_entry_snapshot, user_ref,
};
use super::{
    ROWS_PER_STATEMENT, StoreError, WriteContext, format_time, not_found, now, outbox, parse_time,
    values_rows,
};
use crate::envelope::{EntryEvent, Envelope};
use crate::hook::Hook;
use crate::model::{AttrType, Entity, EntityAttr, Entry, ObjectRef};

use super::Store;

/// One entry creation of a batch ([`Store::create_entries`]).
#[derive(Debug, Clone)]
pub struct NewEntryInput {
    /// The entity the entry belongs to.
    pub entity_id: i64,
    /// The entry.
    pub entry: NewEntry,
    /// Who creates it and the request's trace.
    pub ctx: WriteContext,
}

/// An input that passed the checks: its index and its values by attribute id.
struct Ready {
    index: usize,
    values: Vec<(i64, Value)>,
}

impl Store {
    /// Creates many entries in **one** transaction, each with its
    /// `entry.after_create` event; answers each input, in order, as
    /// [`Store::create_entry`] would have answered it alone, as if the inputs had
    /// been created one after another in this order.
    ///
    /// An input that fails (no active entity, invalid values, a name taken, also
    /// by an earlier input of the batch) fails alone: the others are still
    /// created. The entities are read with their attributes in one query; all
    /// entries, all their values and all their events are inserted with one
    /// statement each (per 1 000 rows). Should the batch's transaction fail for
    /// another reason, every input is retried alone, so each gets its own answer.
    pub async fn create_entries(&self, inputs: &[NewEntryInput]) -> Vec<Result<Entry, StoreError>> {
        match inputs {
            [] => Vec::new(),
            [one] => vec![self.create_entry(one.entity_id, &one.entry, &one.ctx).await],
            _ => match self.try_create_entries(inputs).await {
                Ok(results) => results,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        n = inputs.len(),
                        "a batch of entry creations failed; creating them one by one"
                    );
                    let mut out = Vec::with_capacity(inputs.len());
                    for one in inputs {
                        out.push(self.create_entry(one.entity_id, &one.entry, &one.ctx).await);
                    }
                    out
                }
            },
        }
    }

    /// The batch in one transaction; `Err` when the transaction failed before
    /// its commit (nothing is written, the caller retries one by one).
    async fn try_create_entries(
        &self,
        inputs: &[NewEntryInput],
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
        let mut tx = self.begin().await?;
        let mut ids: Vec<i64> = inputs.iter().map(|i| i.entity_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let entities = entities_with_attrs(&mut tx, &ids).await?;

        // Checks, in create_entry's order: the entity, the input, then the name
        // (also against the inputs before it in this batch).
        let mut results: Vec<Option<Result<Entry, StoreError>>> =
            inputs.iter().map(|_| None).collect();
        let mut ready = Vec::with_capacity(inputs.len());
        let mut names: HashSet<(i64, &str)> = HashSet::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let Some(entity) = entities.get(&input.entity_id).filter(|e| e.is_active) else {
                results[index] = Some(Err(not_found("entity", input.entity_id)));
                continue;
            };
            match check_new_entry(entity, &input.entry) {
                Err(e) => results[index] = Some(Err(e)),
                Ok(_) if !names.insert((input.entity_id, input.entry.name.as_str())) => {
                    results[index] = Some(Err(entry_conflict(&input.entry.name, &entity.name)));
                }
                Ok(values) => ready.push(Ready { index, values }),
            }
        }

        let created = now();
        let t = format_time(&created);
        // The entries; a name an active entry already has is skipped (and is a
        // conflict), the others are returned with their ids.
        let mut entry_ids: HashMap<(i64, String), i64> = HashMap::with_capacity(ready.len());
        for chunk in ready.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO entries (entity_id, name, note, created_user_id, created_user, \
                 is_active, created_time, updated_time) VALUES {} \
                 ON CONFLICT DO NOTHING RETURNING id, entity_id, name",
                values_rows(chunk.len(), 5, 2, ", TRUE, $1, $1")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .persistent(false)
                .bind(&t);
            for r in chunk {
                let input = &inputs[r.index];
                let (uid, uname) = user_ref(input.ctx.user.as_ref());
                q = q
                    .bind(input.entity_id)
                    .bind(&input.entry.name)
                    .bind(&input.entry.note)
                    .bind(uid)
                    .bind(uname);
            }
            for row in q.fetch_all(&mut *tx).await? {
                entry_ids.insert(
                    (row.try_get("entity_id")?, row.try_get("name")?),
                    row.try_get("id")?,
                );
            }
        }
        let mut inserted: Vec<(&Ready, i64)> = Vec::with_capacity(ready.len());
        for r in &ready {
            let input = &inputs[r.index];
            match entry_ids.get(&(input.entity_id, input.entry.name.clone())) {
                Some(id) => inserted.push((r, *id)),
                None => {
                    let entity = &entities[&input.entity_id];
                    results[r.index] = Some(Err(entry_conflict(&input.entry.name, &entity.name)));
                }
            }
        }

        // Their values, all in one statement.
        let rows: Vec<(i64, i64, &Value)> = inserted
            .iter()
            .flat_map(|(r, id)| r.values.iter().map(move |(a, v)| (*id, *a, v)))
            .collect();
        let value_ids = insert_values(&mut tx, &rows, false).await?;

        // The entries as stored, and their events, all in one statement.
        let mut envelopes = Vec::with_capacity(inserted.len());
        for (r, id) in &inserted {
            let input = &inputs[r.index];
            let entity = &entities[&input.entity_id];
            let ids: HashMap<i64, i64> = r
                .values
                .iter()
                .filter_map(|(a, _)| Some((*a, *value_ids.get(&(*id, *a))?)))
                .collect();
            let entry = new_entry_snapshot(
                *id,
                &input.entry,
                entity,
                created,
                input.ctx.user.as_ref(),
                &r.values,
                &ids,
            );
            let mut env = Envelope::entry(
                Hook::EntryAfterCreate,
                &*self.source,
                EntryEvent {
                    entity: entity.clone(),
                    entry: entry.clone(),
                    previous: None,
                    user: input.ctx.user.clone(),
                },
            );
            env.traceparent.clone_from(&input.ctx.traceparent);
            envelopes.push(env);
            results[r.index] = Some(Ok(entry));
        }
        for chunk in envelopes.chunks(ROWS_PER_STATEMENT) {
            outbox::insert_envelopes(&mut tx, chunk).await?;
        }
        if envelopes.is_empty() {
            // Nothing written: no commit, no relay wake-up.
            tx.rollback().await?;
        } else if let Err(e) = tx.commit().await {
            // Not retried one by one: the commit may have happened after all.
            let message = format!(
                "the commit of {} entry creations failed: {e}",
                envelopes.len()
            );
            for (r, _) in &inserted {
                results[r.index] =
                    Some(Err(StoreError::Db(sqlx::Error::Protocol(message.clone()))));
            }
        } else {
            self.outbox_written.notify_one();
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Conflict("not created".into()))))
            .collect())
    }
}

/// Entities with their active attribute definitions, by id, read in one query.
pub(super) async fn entities_with_attrs(
    conn: &mut AnyConnection,
    ids: &[i64],
) -> Result<HashMap<i64, Entity>, StoreError> {
    let mut out: HashMap<i64, Entity> = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "SELECT e.id, e.name, e.note, e.is_active, e.created_time, e.created_user_id, \
             e.created_user, a.id AS a_id, a.name AS a_name, a.type AS a_type, \
             a.is_mandatory AS a_is_mandatory, a.referral AS a_referral, \
             a.position AS a_position, a.is_summarized AS a_is_summarized, \
             a.is_delete_in_chain AS a_is_delete_in_chain, a.note AS a_note, \
             a.default_value AS a_default_value \
             FROM entities e LEFT JOIN entity_attrs a ON a.entity_id = e.id AND a.is_active \
             WHERE e.id IN (",
        );
        for i in 0..chunk.len() {
            let _ = write!(sql, "{}${}", if i == 0 { "" } else { ", " }, i + 1);
        }
        sql.push_str(") ORDER BY e.id, a.position, a.id");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if chunk.len() > 1 {
            q = q.persistent(false);
        }
        for id in chunk {
            q = q.bind(*id);
        }
        for row in q.fetch_all(&mut *conn).await? {
            let id: i64 = row.try_get("id")?;
            let entity = match out.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(entity_from_row(&row)?),
            };
            if let Some(attr) = attr_from_joined_row(&row)? {
                entity.attrs.push(attr);
            }
        }
    }
    Ok(out)
}

/// A flag: BOOLEAN on PostgreSQL, 0/1 INTEGER on SQLite; `None` for NULL.
fn flag(row: &AnyRow, column: &str) -> Result<Option<bool>, sqlx::Error> {
    match row.try_get::<Option<bool>, _>(column) {
        Ok(b) => Ok(b),
        Err(_) => row
            .try_get::<Option<i64>, _>(column)
            .map(|v| v.map(|v| v != 0)),
    }
}

fn entity_from_row(row: &AnyRow) -> Result<Entity, StoreError> {
    let user_id: Option<i64> = row.try_get("created_user_id")?;
    let user_name: Option<String> = row.try_get("created_user")?;
    Ok(Entity {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        note: row.try_get("note")?,
        is_active: flag(row, "is_active")?.unwrap_or(false),
        created_time: parse_time(&row.try_get::<String, _>("created_time")?)?,
        created_user: user_id.map(|id| ObjectRef {
            id,
            name: user_name.unwrap_or_default(),
        }),
        attrs: Vec::new(),
    })
}

/// The attribute of a joined row; `None` when the entity has none (NULLs).
fn attr_from_joined_row(row: &AnyRow) -> Result<Option<EntityAttr>, StoreError> {
    let Some(id) = row.try_get::<Option<i64>, _>("a_id")? else {
        return Ok(None);
    };
    let referral: String = row.try_get("a_referral")?;
    let default_value: Option<String> = row.try_get("a_default_value")?;
    Ok(Some(EntityAttr {
        id,
        name: row.try_get("a_name")?,
        attr_type: AttrType(u16::try_from(row.try_get::<i64, _>("a_type")?).unwrap_or(0)),
        is_mandatory: flag(row, "a_is_mandatory")?.unwrap_or(false),
        referral: serde_json::from_str(&referral)
            .map_err(|e| StoreError::Corrupt(format!("referral: {e}")))?,
        index: i32::try_from(row.try_get::<i64, _>("a_position")?).unwrap_or(0),
        is_summarized: flag(row, "a_is_summarized")?.unwrap_or(false),
        is_delete_in_chain: flag(row, "a_is_delete_in_chain")?.unwrap_or(false),
        note: row.try_get("a_note")?,
        default_value: default_value
            .map(|v| {
                serde_json::from_str(&v)
                    .map_err(|e| StoreError::Corrupt(format!("default_value: {e}")))
            })
            .transpose()?,
        is_active: true,
    }))
}
