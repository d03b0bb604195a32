//! Group commit of entry creations: many [`NewEntryInput`]s written together,
//! each input getting the answer [`Store::create_entry`] would have given it. On
//! SQLite, one transaction with a few multi-row statements (the entities with
//! their attributes, all the entries, all their values, all their events); on
//! PostgreSQL, three round trips (the entities, the new ids, one statement that
//! inserts everything).

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use core_events::envelope::{EntryEvent, Envelope};
use core_events::hook::Hook;
use core_events::model::{Entity, Entry};
use core_events::request::NewEntry;

use super::load::entities_with_attrs;
use super::write::{check_new_entry, entry_conflict, insert_values, new_entry_snapshot, user_ref};
use super::{
    Backend, ROWS_PER_STATEMENT, StoreError, WriteContext, format_time, not_found, now, outbox,
    values_rows,
};

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
    /// created. The entities are read with their attributes in one query. On
    /// SQLite all entries, all their values and all their events are then
    /// inserted with one statement each (per 1 000 rows); on PostgreSQL the new
    /// ids are read from their sequences and one statement inserts the three.
    /// Should the batch's write fail for another reason before its commit, every
    /// input is retried alone, so each gets its own answer.
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
        if self.backend == Backend::Postgres {
            return self.pg_create_entries(inputs).await;
        }
        let mut tx = self.begin().await?;
        let entities = entities_with_attrs(&mut tx, &entity_ids(inputs)).await?;
        let mut batch = Batch::check(inputs, &entities);

        let t = format_time(&batch.created);
        // The entries; a name an active entry already has is skipped (and is a
        // conflict), the others are returned with their ids.
        let mut entry_ids: HashMap<(i64, String), i64> = HashMap::with_capacity(batch.ready.len());
        for chunk in batch.ready.chunks(ROWS_PER_STATEMENT) {
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
        let mut inserted: Vec<(usize, i64)> = Vec::with_capacity(batch.ready.len());
        for (k, r) in batch.ready.iter().enumerate() {
            let input = &inputs[r.index];
            if let Some(id) = entry_ids.get(&(input.entity_id, input.entry.name.clone())) {
                inserted.push((k, *id));
            }
        }

        // Their values, all in one statement.
        let value_ids = insert_values(&mut tx, &batch.value_rows(&inserted), false).await?;

        // The entries as stored, and their events, all in one statement.
        let envelopes = batch.created(self, inputs, &entities, &inserted, &value_ids);
        let states: Vec<Option<String>> = inserted
            .iter()
            .map(|(k, _)| inputs[batch.ready[*k].index].ctx.tracestate.clone())
            .collect();
        for (chunk, states) in envelopes
            .chunks(ROWS_PER_STATEMENT)
            .zip(states.chunks(ROWS_PER_STATEMENT))
        {
            outbox::insert_traced(&mut tx, chunk, states, self.max_event_bytes).await?;
        }
        if envelopes.is_empty() {
            // Nothing written: no commit, no relay wake-up.
            tx.rollback().await?;
        } else if let Err(e) = tx.commit().await {
            // Not retried one by one: the commit may have happened after all.
            batch.commit_failed(&inserted, &e);
        } else {
            self.outbox_written.notify_one();
        }
        Ok(batch.answers(inputs, &entities))
    }

    /// The batch on PostgreSQL in three round trips instead of ten: the
    /// entities, the ids of the new rows (from their sequences), then one
    /// statement that inserts the entries, their values and their events
    /// (atomic, as every statement is; an entry whose name is taken is skipped
    /// with its values and event). Each statement's text is fixed (the rows
    /// travel as JSON), so it stays prepared.
    async fn pg_create_entries(
        &self,
        inputs: &[NewEntryInput],
    ) -> Result<Vec<Result<Entry, StoreError>>, StoreError> {
        let mut conn = self.writer.acquire().await?;
        let entities = entities_with_attrs(&mut conn, &entity_ids(inputs)).await?;
        let mut batch = Batch::check(inputs, &entities);
        if batch.ready.is_empty() {
            return Ok(batch.answers(inputs, &entities));
        }
        let n_values: usize = batch.ready.iter().map(|r| r.values.len()).sum();
        let (entry_ids, new_value_ids) =
            pg_next_ids(&mut conn, batch.ready.len(), n_values).await?;
        let inserted: Vec<(usize, i64)> = entry_ids.into_iter().enumerate().collect();
        let mut value_ids = HashMap::with_capacity(n_values);
        let mut values = Vec::with_capacity(n_values);
        for ((entry_id, attr_id, value), id) in
            batch.value_rows(&inserted).into_iter().zip(new_value_ids)
        {
            value_ids.insert((entry_id, attr_id), id);
            values.push(serde_json::json!({
                "id": id, "entry_id": entry_id, "attr_id": attr_id, "value": value.to_string(),
            }));
        }
        let entries: Vec<Value> = inserted
            .iter()
            .map(|(k, id)| {
                let input = &inputs[batch.ready[*k].index];
                let (uid, uname) = user_ref(input.ctx.user.as_ref());
                serde_json::json!({
                    "id": id, "entity_id": input.entity_id, "name": input.entry.name,
                    "note": input.entry.note, "uid": uid, "uname": uname,
                })
            })
            .collect();
        let envelopes = batch.created(self, inputs, &entities, &inserted, &value_ids);
        let events = envelopes
            .iter()
            .zip(&inserted)
            .map(|(env, (k, id))| {
                let row = outbox::envelope_row(env, self.max_event_bytes)?;
                let tracestate = &inputs[batch.ready[*k].index].ctx.tracestate;
                Ok(serde_json::json!({
                    "entry_id": id, "event_id": row.event_id, "hook": row.hook,
                    "entity": row.entity, "object": row.object,
                    "traceparent": row.traceparent, "tracestate": tracestate,
                    "payload": row.payload,
                }))
            })
            .collect::<Result<Vec<Value>, StoreError>>()?;
        let written: HashSet<i64> = sqlx::query(
            "WITH e AS ( \
               INSERT INTO entries (id, entity_id, name, note, created_user_id, created_user, \
                 is_active, created_time, updated_time) \
               SELECT x.id, x.entity_id, x.name, x.note, x.uid, x.uname, TRUE, $1, $1 \
               FROM json_to_recordset($2::json) AS x(id BIGINT, entity_id BIGINT, name TEXT, \
                 note TEXT, uid BIGINT, uname TEXT) \
               ORDER BY x.id \
               ON CONFLICT DO NOTHING RETURNING id), \
             v AS ( \
               INSERT INTO attribute_values (id, entry_id, attr_id, value) \
               SELECT x.id, x.entry_id, x.attr_id, x.value \
               FROM json_to_recordset($3::json) AS x(id BIGINT, entry_id BIGINT, attr_id BIGINT, \
                 value TEXT) \
               WHERE x.entry_id IN (SELECT id FROM e)), \
             o AS ( \
               INSERT INTO hookbus_outbox (event_id, hook, entity, object, traceparent, \
                 tracestate, payload) \
               SELECT x.event_id, x.hook, x.entity, x.object, x.traceparent, x.tracestate, \
                 x.payload \
               FROM json_to_recordset($4::json) AS x(entry_id BIGINT, event_id TEXT, hook TEXT, \
                 entity TEXT, object TEXT, traceparent TEXT, tracestate TEXT, payload TEXT) \
               WHERE x.entry_id IN (SELECT id FROM e) \
               ORDER BY x.entry_id) \
             SELECT id FROM e",
        )
        .bind(format_time(&batch.created))
        .bind(Value::Array(entries).to_string())
        .bind(Value::Array(values).to_string())
        .bind(Value::Array(events).to_string())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get("id"))
        .collect::<Result<_, _>>()?;
        // Taken names: not written, so answered as conflicts.
        batch.not_written(
            inserted
                .iter()
                .filter(|(_, id)| !written.contains(id))
                .map(|(k, _)| *k),
        );
        if !written.is_empty() {
            self.outbox_written.notify_one();
        }
        Ok(batch.answers(inputs, &entities))
    }
}

/// The ids of `entries` new entries and `values` new attribute values, taken
/// from their sequences in one round trip, each list in ascending order.
async fn pg_next_ids(
    conn: &mut AnyConnection,
    entries: usize,
    values: usize,
) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
    let rows = sqlx::query(
        "SELECT 0 AS kind, nextval('entries_id_seq'::regclass) AS id \
         FROM generate_series(1, $1) \
         UNION ALL \
         SELECT 1, nextval('attribute_values_id_seq'::regclass) \
         FROM generate_series(1, $2)",
    )
    .bind(i64::try_from(entries).unwrap_or(i64::MAX))
    .bind(i64::try_from(values).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?;
    let (mut entry_ids, mut value_ids) = (Vec::with_capacity(entries), Vec::with_capacity(values));
    for row in rows {
        let kind: i32 = row.try_get("kind")?;
        let id: i64 = row.try_get("id")?;
        if kind == 0 {
            entry_ids.push(id)
        } else {
            value_ids.push(id)
        }
    }
    if entry_ids.len() != entries || value_ids.len() != values {
        return Err(StoreError::Db(sqlx::Error::Protocol(format!(
            "asked {entries} entry ids and {values} value ids, got {} and {}",
            entry_ids.len(),
            value_ids.len()
        ))));
    }
    entry_ids.sort_unstable();
    value_ids.sort_unstable();
    Ok((entry_ids, value_ids))
}

/// The distinct entity ids of the inputs, in order.
fn entity_ids(inputs: &[NewEntryInput]) -> Vec<i64> {
    let mut ids: Vec<i64> = inputs.iter().map(|i| i.entity_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A batch under way: each input's answer once known, and the inputs that
/// passed the checks.
struct Batch {
    results: Vec<Option<Result<Entry, StoreError>>>,
    ready: Vec<Ready>,
    created: chrono::DateTime<chrono::Utc>,
}

impl Batch {
    /// Checks, in create_entry's order: the entity, the input, then the name
    /// (also against the inputs before it in this batch).
    fn check(inputs: &[NewEntryInput], entities: &HashMap<i64, Entity>) -> Batch {
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
        Batch {
            results,
            ready,
            created: now(),
        }
    }

    /// The entries `inserted` (`ready` index, entry id) as stored, each the
    /// answer to its input, and their `entry.after_create` events.
    fn created(
        &mut self,
        store: &Store,
        inputs: &[NewEntryInput],
        entities: &HashMap<i64, Entity>,
        inserted: &[(usize, i64)],
        value_ids: &HashMap<(i64, i64), i64>,
    ) -> Vec<Envelope<EntryEvent>> {
        let mut envelopes = Vec::with_capacity(inserted.len());
        for (k, id) in inserted {
            let r = &self.ready[*k];
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
                self.created,
                input.ctx.user.as_ref(),
                &r.values,
                &ids,
            );
            let mut env = Envelope::entry(
                Hook::EntryAfterCreate,
                &*store.source,
                EntryEvent {
                    entity: entity.clone(),
                    entry: entry.clone(),
                    previous: None,
                    user: input.ctx.user.clone(),
                },
            );
            env.traceparent.clone_from(&input.ctx.traceparent);
            envelopes.push(env);
            self.results[r.index] = Some(Ok(entry));
        }
        envelopes
    }

    /// The rows `(entry id, attribute id, value)` of the values of the entries
    /// `inserted` (`ready` index, entry id), in that order.
    fn value_rows(&self, inserted: &[(usize, i64)]) -> Vec<(i64, i64, &Value)> {
        inserted
            .iter()
            .flat_map(|(k, id)| self.ready[*k].values.iter().map(move |(a, v)| (*id, *a, v)))
            .collect()
    }

    /// The entries at these `ready` indexes were not written after all (their
    /// name is taken): [`answers`](Self::answers) names them conflicts.
    fn not_written(&mut self, ready: impl Iterator<Item = usize>) {
        for k in ready {
            self.results[self.ready[k].index] = None;
        }
    }

    /// The commit of `inserted` failed: each gets that error (not retried one by
    /// one: the commit may have happened after all).
    fn commit_failed(&mut self, inserted: &[(usize, i64)], e: &sqlx::Error) {
        let message = format!(
            "the commit of {} entry creations failed: {e}",
            inserted.len()
        );
        for (k, _) in inserted {
            self.results[self.ready[*k].index] =
                Some(Err(StoreError::Db(sqlx::Error::Protocol(message.clone()))));
        }
    }

    /// Each input's answer; a checked input never written (its name taken by an
    /// existing entry) is a conflict.
    fn answers(
        mut self,
        inputs: &[NewEntryInput],
        entities: &HashMap<i64, Entity>,
    ) -> Vec<Result<Entry, StoreError>> {
        for r in &self.ready {
            if self.results[r.index].is_none() {
                let input = &inputs[r.index];
                let entity = &entities[&input.entity_id];
                self.results[r.index] = Some(Err(entry_conflict(&input.entry.name, &entity.name)));
            }
        }
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Conflict("not created".into()))))
            .collect()
    }
}
