//! The outbox table `hookbus_outbox`: rows written in the model change's
//! transaction, read and deleted by the relay. The table is a contract for hosts
//! in other languages too (`docs/outbox.md`):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `id` | integer, generated | order: the relay publishes each object's rows in `id` order |
//! | `event_id` | text, unique | the CloudEvents `id` (a UUID); becomes `Nats-Msg-Id` |
//! | `hook` | text | e.g. `entry.after_create` (legacy aliases accepted) |
//! | `entity` | text | the entity name, as is (the relay encodes the subject token) |
//! | `object` | text | `entry/<id>` or `entity/<id>`: the ordering key |
//! | `traceparent` | text, nullable | W3C trace context, passed to handlers |
//! | `tracestate` | text, nullable, optional | W3C trace state beside it (read when the table has it) |
//! | `payload` | text | the CloudEvents envelope, JSON |
//! | `created_at` | bigint, default now | µs since the epoch; backlog age |

use std::collections::BTreeSet;
use std::fmt::Write as _;

use sqlx::{AnyConnection, AnyPool, Row};

use core_events::envelope::Envelope;

use super::{Backend, StoreError};

/// One outbox row as the relay reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Generated id (publish order per object).
    pub id: i64,
    /// CloudEvents id, `Nats-Msg-Id`.
    pub event_id: String,
    /// Hook name.
    pub hook: String,
    /// Entity name.
    pub entity: String,
    /// `entry/<id>` or `entity/<id>`.
    pub object: String,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// W3C trace state (`None` when empty or the table has no such column).
    pub tracestate: Option<String>,
    /// The envelope JSON.
    pub payload: String,
    /// When the row was written, µs since the epoch.
    pub created_at: i64,
}

/// How far the relay is behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Rows waiting to be published.
    pub rows: i64,
    /// Age of the oldest waiting row, µs (0 when empty).
    pub oldest_age_us: i64,
}

/// Inserts an event in the caller's transaction.
///
/// # Errors
///
/// [`StoreError::Db`] when the insert fails; [`StoreError::Invalid`] when the
/// envelope names no object or cannot be serialized.
pub async fn insert_envelope<D: serde::Serialize>(
    conn: &mut AnyConnection,
    env: &Envelope<D>,
) -> Result<(), StoreError> {
    insert_envelopes(conn, std::slice::from_ref(env)).await
}

/// Inserts events in the caller's transaction with one statement (in the
/// order given, so their ids follow it).
///
/// # Errors
///
/// As [`insert_envelope`].
pub async fn insert_envelopes<D: serde::Serialize>(
    conn: &mut AnyConnection,
    envs: &[Envelope<D>],
) -> Result<(), StoreError> {
    insert_envelopes_within(conn, envs, None).await
}

/// As [`insert_envelopes`], refusing (before anything is inserted) an envelope
/// larger than `max_bytes` with [`StoreError::EventTooLarge`].
///
/// # Errors
///
/// As [`insert_envelope`], and [`StoreError::EventTooLarge`].
pub async fn insert_envelopes_within<D: serde::Serialize>(
    conn: &mut AnyConnection,
    envs: &[Envelope<D>],
    max_bytes: Option<usize>,
) -> Result<(), StoreError> {
    insert_traced(conn, envs, &[], max_bytes).await
}

/// As [`insert_envelopes_within`], with the `tracestate` of each envelope
/// (`tracestates[i]` for `envs[i]`; missing ones are none).
pub(crate) async fn insert_traced<D: serde::Serialize>(
    conn: &mut AnyConnection,
    envs: &[Envelope<D>],
    tracestates: &[Option<String>],
    max_bytes: Option<usize>,
) -> Result<(), StoreError> {
    if envs.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO hookbus_outbox (event_id, hook, entity, object, traceparent, tracestate, payload) VALUES {}",
        super::values_rows(envs.len(), 7, 1, "")
    );
    // One event's statement is always the same: keep it prepared.
    let rows = envs
        .iter()
        .enumerate()
        .map(|(i, env)| {
            let mut row = envelope_row(env, max_bytes)?;
            row.tracestate = tracestates.get(i).cloned().flatten();
            Ok(row)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(envs.len() == 1);
    for row in rows {
        q = q
            .bind(row.event_id)
            .bind(row.hook)
            .bind(row.entity)
            .bind(row.object)
            .bind(row.traceparent)
            .bind(row.tracestate)
            .bind(row.payload);
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// The columns of an event's outbox row (but its id and time).
pub(super) struct EnvelopeRow {
    pub event_id: String,
    pub hook: &'static str,
    pub entity: String,
    pub object: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub payload: String,
}

/// An event's outbox row: its envelope serialized, and the columns the relay
/// reads without parsing it; [`StoreError::EventTooLarge`] when the envelope is
/// larger than `max_bytes`.
pub(super) fn envelope_row<D: serde::Serialize>(
    env: &Envelope<D>,
    max_bytes: Option<usize>,
) -> Result<EnvelopeRow, StoreError> {
    let payload = serde_json::to_string(env)
        .map_err(|e| StoreError::Invalid(vec![format!("event cannot be serialized: {e}")]))?;
    let hook = env.hook().ok_or_else(|| {
        StoreError::Invalid(vec![format!("unknown event type '{}'", env.event_type)])
    })?;
    if let Some(limit) = max_bytes.filter(|limit| payload.len() > *limit) {
        return Err(StoreError::EventTooLarge {
            hook: hook.name().to_owned(),
            size: payload.len(),
            limit,
        });
    }
    Ok(EnvelopeRow {
        event_id: env.id.to_string(),
        hook: hook.name(),
        entity: env.pagodaentity.clone(),
        object: env
            .object()
            .ok_or_else(|| {
                StoreError::Invalid(vec![format!(
                    "event subject {:?} is not 'entry/<id>' or 'entity/<id>'",
                    env.subject
                )])
            })?
            .to_string(),
        traceparent: env.traceparent.clone(),
        tracestate: None,
        payload,
    })
}

const ROW_COLUMNS: &str =
    "id, event_id, hook, entity, object, traceparent, payload, created_at FROM hookbus_outbox";
const ROW_COLUMNS_TRACESTATE: &str = "id, event_id, hook, entity, object, traceparent, tracestate, payload, created_at FROM hookbus_outbox";

/// Ids the relay holds (sent, not yet deleted), as runs of consecutive ids for
/// `NOT BETWEEN` filters; `None` when there are too many runs for one query.
fn held_runs(held: &BTreeSet<i64>, max_runs: usize) -> Option<Vec<(i64, i64)>> {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for &id in held {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == id => *end = id,
            _ => {
                if runs.len() == max_runs {
                    return None;
                }
                runs.push((id, id));
            }
        }
    }
    Some(runs)
}

/// Reads up to `limit` rows in id order, leaving out the ids in `held`.
///
/// It always reads from the lowest id, so a row that committed late with a
/// lower id than rows already read (PostgreSQL assigns ids before commit) is
/// still read before any later row of its object. The held ids are skipped with
/// one index range scan per gap between runs of held ids (few: held ids are
/// mostly consecutive), so a read costs the rows it returns, not the rows held.
///
/// # Errors
///
/// [`StoreError::Db`] when the query fails; [`StoreError::Corrupt`] for a row
/// whose columns cannot be read.
pub async fn fetch(
    pool: &AnyPool,
    held: &BTreeSet<i64>,
    limit: usize,
) -> Result<Vec<OutboxRow>, StoreError> {
    fetch_rows(pool, held, limit, true).await
}

/// As [`fetch`]; `tracestate` says whether the table has the optional
/// `tracestate` column ([`has_tracestate`]): without it, rows have none.
///
/// # Errors
///
/// As [`fetch`].
pub async fn fetch_rows(
    pool: &AnyPool,
    held: &BTreeSet<i64>,
    limit: usize,
    tracestate: bool,
) -> Result<Vec<OutboxRow>, StoreError> {
    let columns = if tracestate {
        ROW_COLUMNS_TRACESTATE
    } else {
        ROW_COLUMNS
    };
    let sql = match held_runs(held, 32) {
        Some(runs) if !runs.is_empty() => {
            // The gaps around the runs: (-inf, a0), (b0, a1), …, (bN, +inf).
            let mut gaps: Vec<(Option<i64>, Option<i64>)> = Vec::with_capacity(runs.len() + 1);
            let mut lo = None;
            for (a, b) in &runs {
                if lo.is_none_or(|lo: i64| lo < *a) {
                    gaps.push((lo, Some(a - 1)));
                }
                lo = Some(b + 1);
            }
            gaps.push((lo, None));
            let parts: Vec<String> = gaps
                .iter()
                .enumerate()
                .map(|(i, (lo, hi))| {
                    let cond = match (lo, hi) {
                        (Some(lo), Some(hi)) => format!("id >= {lo} AND id <= {hi}"),
                        (Some(lo), None) => format!("id >= {lo}"),
                        (None, Some(hi)) => format!("id <= {hi}"),
                        (None, None) => "TRUE".to_owned(),
                    };
                    format!(
                        "SELECT * FROM (SELECT {columns} WHERE {cond} ORDER BY id LIMIT {limit}) AS g{i}"
                    )
                })
                .collect();
            format!(
                "SELECT * FROM ({}) AS u ORDER BY id LIMIT {limit}",
                parts.join(" UNION ALL ")
            )
        }
        Some(_) => format!("SELECT {columns} ORDER BY id LIMIT {limit}"),
        // Too many runs for one query: read past them and skip them here.
        None => format!("SELECT {columns} ORDER BY id LIMIT {}", limit + held.len()),
    };
    // Not cached: the text changes with the held ids.
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .persistent(false)
        .fetch_all(pool)
        .await?;
    let mut out = Vec::with_capacity(rows.len().min(limit));
    for row in rows {
        let id: i64 = row.try_get("id")?;
        if held.contains(&id) {
            continue;
        }
        out.push(OutboxRow {
            id,
            event_id: row.try_get("event_id")?,
            hook: row.try_get("hook")?,
            entity: row.try_get("entity")?,
            object: row.try_get("object")?,
            traceparent: row.try_get("traceparent")?,
            tracestate: if tracestate {
                row.try_get::<Option<String>, _>("tracestate")?
                    .filter(|s| !s.is_empty())
            } else {
                None
            },
            payload: row.try_get("payload")?,
            created_at: row.try_get("created_at")?,
        });
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// Deletes published rows. `ids` need not be sorted; consecutive ids are
/// deleted with one range condition.
///
/// On PostgreSQL the delete commits without waiting for the WAL flush
/// (`synchronous_commit = off` for this transaction only): a delete lost in a
/// server crash only makes the relay publish those rows again, which the
/// stream's duplicate window drops.
///
/// # Errors
///
/// [`StoreError::Db`] when the delete fails.
pub async fn delete(pool: &AnyPool, ids: &[i64]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let set: BTreeSet<i64> = ids.iter().copied().collect();
    let runs = held_runs(&set, usize::MAX).unwrap_or_default();
    let mut deleted = 0;
    let mut tx = pool.begin().await?;
    if tx.backend_name() == "PostgreSQL" {
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
    }
    for chunk in runs.chunks(200) {
        let mut sql = String::from("DELETE FROM hookbus_outbox WHERE");
        for (i, (a, b)) in chunk.iter().enumerate() {
            let _ = write!(
                sql,
                "{} id BETWEEN {a} AND {b}",
                if i == 0 { "" } else { " OR" }
            );
        }
        deleted += sqlx::query(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    Ok(deleted)
}

/// Rows waiting and the age of the oldest.
///
/// # Errors
///
/// [`StoreError::Db`] when the query fails.
pub async fn backlog(pool: &AnyPool) -> Result<Backlog, StoreError> {
    let row = sqlx::query("SELECT COUNT(*), MIN(created_at) FROM hookbus_outbox")
        .fetch_one(pool)
        .await?;
    let rows: i64 = row.try_get(0)?;
    let oldest: Option<i64> = row.try_get(1)?;
    let oldest_age_us = oldest.map_or(0, |t| (super::now().timestamp_micros() - t).max(0));
    Ok(Backlog {
        rows,
        oldest_age_us,
    })
}

/// The columns of `hookbus_outbox` the relay reads (and the host writes).
pub const COLUMNS: [&str; 8] = [
    "id",
    "event_id",
    "hook",
    "entity",
    "object",
    "traceparent",
    "payload",
    "created_at",
];

/// What [`check_table`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// The table has every column of [`COLUMNS`].
    Ready,
    /// There is no `hookbus_outbox` table (yet).
    Missing,
    /// The table lacks these columns.
    MissingColumns(Vec<&'static str>),
}

/// Checks that `hookbus_outbox` exists with the columns of the contract
/// (`docs/outbox.md`), creating nothing: the relay needs only this table,
/// whoever created it (`hookbus migrate`, or a host with the documented DDL).
/// On PostgreSQL the table is looked up in the schemas of the search path.
///
/// # Errors
///
/// [`StoreError::Db`] when the query fails.
pub async fn check_table(pool: &AnyPool, backend: Backend) -> Result<TableState, StoreError> {
    let found = columns(pool, backend).await?;
    if found.is_empty() {
        return Ok(TableState::Missing);
    }
    let missing: Vec<&'static str> = COLUMNS
        .into_iter()
        .filter(|c| !found.contains(*c))
        .collect();
    Ok(if missing.is_empty() {
        TableState::Ready
    } else {
        TableState::MissingColumns(missing)
    })
}

/// Whether `hookbus_outbox` has the optional `tracestate` column (added by the
/// migration `20261205000001_outbox_tracestate`; a table of the older contract
/// works without it).
///
/// # Errors
///
/// [`StoreError::Db`] when the query fails.
pub async fn has_tracestate(pool: &AnyPool, backend: Backend) -> Result<bool, StoreError> {
    Ok(columns(pool, backend).await?.contains("tracestate"))
}

/// The column names of `hookbus_outbox`, lower case (empty without the table).
async fn columns(pool: &AnyPool, backend: Backend) -> Result<BTreeSet<String>, StoreError> {
    let sql = match backend {
        Backend::Sqlite => "SELECT name FROM pragma_table_info('hookbus_outbox')",
        Backend::Postgres => {
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_name = 'hookbus_outbox' \
             AND table_schema = (SELECT n.nspname::text FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.oid = to_regclass('hookbus_outbox'))"
        }
    };
    let rows = sqlx::query(sql).fetch_all(pool).await?;
    let mut found = BTreeSet::new();
    for row in rows {
        let name: String = row.try_get(0)?;
        found.insert(name.to_lowercase());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ids_become_runs() {
        let held: BTreeSet<i64> = [1, 2, 3, 5, 7, 8].into_iter().collect();
        assert_eq!(held_runs(&held, 10), Some(vec![(1, 3), (5, 5), (7, 8)]));
        assert_eq!(held_runs(&held, 2), None);
        assert_eq!(held_runs(&BTreeSet::new(), 2), Some(vec![]));
    }
}
