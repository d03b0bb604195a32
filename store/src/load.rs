//! Reading rows back into the typed models (the snapshots events carry).

use sqlx::any::AnyRow;
use std::collections::HashMap;

use sqlx::{AnyConnection, Row};

use core_events::model::{AttrType, Attribute, Entity, EntityAttr, Entry, ObjectRef, User};

use super::{ROWS_PER_STATEMENT, StoreError, parse_time};

const ENTITY_COLUMNS: &str =
    "id, name, note, is_active, created_time, created_user_id, created_user FROM entities";
const ATTR_COLUMNS: &str = "id, entity_id, name, type, is_mandatory, referral, position, \
     is_summarized, is_delete_in_chain, note, default_value, is_active FROM entity_attrs";
const ENTRY_COLUMNS: &str = "id, entity_id, name, note, is_active, created_time, \
     created_user_id, created_user, updated_time FROM entries";
pub(super) const USER_COLUMNS: &str = "id, username, email, first_name, last_name, is_active, \
     is_superuser, date_joined FROM users";

fn user_ref(row: &AnyRow) -> Result<Option<ObjectRef>, sqlx::Error> {
    let id: Option<i64> = row.try_get("created_user_id")?;
    let name: Option<String> = row.try_get("created_user")?;
    Ok(id.map(|id| ObjectRef {
        id,
        name: name.unwrap_or_default(),
    }))
}

/// A flag: BOOLEAN on PostgreSQL, 0/1 INTEGER on SQLite.
fn flag(row: &AnyRow, column: &str) -> Result<bool, sqlx::Error> {
    match row.try_get::<bool, _>(column) {
        Ok(b) => Ok(b),
        Err(_) => row.try_get::<i64, _>(column).map(|v| v != 0),
    }
}

fn json(column: &str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub(super) fn user_from_row(row: &AnyRow) -> Result<User, StoreError> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        first_name: row.try_get("first_name")?,
        last_name: row.try_get("last_name")?,
        is_active: flag(row, "is_active")?,
        is_superuser: flag(row, "is_superuser")?,
        date_joined: parse_time(&row.try_get::<String, _>("date_joined")?)?,
    })
}

fn attr_from_row(row: &AnyRow) -> Result<EntityAttr, StoreError> {
    let referral: String = row.try_get("referral")?;
    let default_value: Option<String> = row.try_get("default_value")?;
    Ok(EntityAttr {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        attr_type: AttrType(u16::try_from(row.try_get::<i64, _>("type")?).unwrap_or(0)),
        is_mandatory: flag(row, "is_mandatory")?,
        referral: serde_json::from_str(&referral)
            .map_err(|e| StoreError::Corrupt(format!("referral: {e}")))?,
        index: i32::try_from(row.try_get::<i64, _>("position")?).unwrap_or(0),
        is_summarized: flag(row, "is_summarized")?,
        is_delete_in_chain: flag(row, "is_delete_in_chain")?,
        note: row.try_get("note")?,
        default_value: default_value
            .map(|v| json("default_value", &v))
            .transpose()?,
        is_active: flag(row, "is_active")?,
    })
}

/// Attribute definitions of an entity, by position then id; inactive ones too if asked.
pub(super) async fn attrs(
    conn: &mut AnyConnection,
    entity_id: i64,
    include_inactive: bool,
) -> Result<Vec<EntityAttr>, StoreError> {
    let sql = if include_inactive {
        format!("SELECT {ATTR_COLUMNS} WHERE entity_id = $1 ORDER BY position, id")
    } else {
        format!("SELECT {ATTR_COLUMNS} WHERE entity_id = $1 AND is_active ORDER BY position, id")
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(entity_id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(attr_from_row).collect()
}

/// An entity with its active attribute definitions (or all of them).
pub(super) async fn entity(
    conn: &mut AnyConnection,
    id: i64,
    include_inactive_attrs: bool,
) -> Result<Option<Entity>, StoreError> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTITY_COLUMNS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let mut entity = entity_from_row(&row)?;
    entity.attrs = attrs(conn, id, include_inactive_attrs).await?;
    Ok(Some(entity))
}

fn entity_from_row(row: &AnyRow) -> Result<Entity, StoreError> {
    Ok(Entity {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        note: row.try_get("note")?,
        is_active: flag(row, "is_active")?,
        created_time: parse_time(&row.try_get::<String, _>("created_time")?)?,
        created_user: user_ref(row)?,
        attrs: Vec::new(),
    })
}

/// Ids of entities, active only or all, by id.
pub(super) async fn entity_ids(
    conn: &mut AnyConnection,
    include_deleted: bool,
) -> Result<Vec<i64>, StoreError> {
    let sql = if include_deleted {
        "SELECT id FROM entities ORDER BY id"
    } else {
        "SELECT id FROM entities WHERE is_active ORDER BY id"
    };
    let rows = sqlx::query(sql).fetch_all(&mut *conn).await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()?)
}

/// The id of the active entity with this name.
pub(super) async fn entity_id_by_name(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query("SELECT id FROM entities WHERE name = $1 AND is_active")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?,
    )
}

/// An entry with its attribute values, given its entity (for names and types).
pub(super) async fn entry_of(
    conn: &mut AnyConnection,
    id: i64,
    entity: &Entity,
) -> Result<Option<Entry>, StoreError> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let mut entry = entry_from_row(&row, entity)?;
    entry.attrs = values(conn, id, entity).await?;
    Ok(Some(entry))
}

fn entry_from_row(row: &AnyRow, entity: &Entity) -> Result<Entry, StoreError> {
    Ok(Entry {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        note: row.try_get("note")?,
        is_active: flag(row, "is_active")?,
        schema: ObjectRef {
            id: entity.id,
            name: entity.name.clone(),
        },
        created_time: parse_time(&row.try_get::<String, _>("created_time")?)?,
        created_user: user_ref(row)?,
        updated_time: parse_time(&row.try_get::<String, _>("updated_time")?)?,
        attrs: Vec::new(),
    })
}

/// The entity id of an entry.
pub(super) async fn entry_entity_id(
    conn: &mut AnyConnection,
    id: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query("SELECT entity_id FROM entries WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get::<i64, _>(0))
        .transpose()?)
}

/// Attribute values of an entry for the entity's active attributes, by attribute order.
async fn values(
    conn: &mut AnyConnection,
    entry_id: i64,
    entity: &Entity,
) -> Result<Vec<Attribute>, StoreError> {
    let rows = sqlx::query("SELECT id, attr_id, value FROM attribute_values WHERE entry_id = $1")
        .bind(entry_id)
        .fetch_all(&mut *conn)
        .await?;
    let mut by_attr = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let attr_id: i64 = row.try_get("attr_id")?;
        let value: String = row.try_get("value")?;
        by_attr.insert(attr_id, (row.try_get::<i64, _>("id")?, value));
    }
    let mut out = Vec::with_capacity(by_attr.len());
    for attr in &entity.attrs {
        if let Some((id, value)) = by_attr.remove(&attr.id) {
            out.push(Attribute {
                id,
                name: attr.name.clone(),
                attr_type: attr.attr_type,
                schema: ObjectRef {
                    id: attr.id,
                    name: attr.name.clone(),
                },
                value: json("value", &value)?,
            });
        }
    }
    Ok(out)
}

/// Entries of an entity (active only, or all), by id.
pub(super) async fn entries_of(
    conn: &mut AnyConnection,
    entity: &Entity,
    include_deleted: bool,
) -> Result<Vec<Entry>, StoreError> {
    entries_page_of(conn, entity, include_deleted, None).await
}

/// Entries of an entity (active only, or all), by id; with `page` =
/// `(limit, offset)` only those.
pub(super) async fn entries_page_of(
    conn: &mut AnyConnection,
    entity: &Entity,
    include_deleted: bool,
    page: Option<(i64, i64)>,
) -> Result<Vec<Entry>, StoreError> {
    let active = if include_deleted {
        ""
    } else {
        " AND is_active"
    };
    let limit = if page.is_some() {
        " LIMIT $2 OFFSET $3"
    } else {
        ""
    };
    let sql = format!("SELECT {ENTRY_COLUMNS} WHERE entity_id = $1{active} ORDER BY id{limit}");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(entity.id);
    if let Some((limit, offset)) = page {
        query = query.bind(limit).bind(offset);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut entry = entry_from_row(row, entity)?;
        entry.attrs = values(conn, entry.id, entity).await?;
        out.push(entry);
    }
    Ok(out)
}

/// A user by id.
pub(super) async fn user(conn: &mut AnyConnection, id: i64) -> Result<Option<User>, StoreError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_COLUMNS} WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(user_from_row)
    .transpose()
}

/// Entities with their active attribute definitions, by id, read in one query.
pub(crate) async fn entities_with_attrs(
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
            let _ = std::fmt::Write::write_fmt(
                &mut sql,
                format_args!("{}${}", if i == 0 { "" } else { ", " }, i + 1),
            );
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
fn flag_opt(row: &AnyRow, column: &str) -> Result<Option<bool>, sqlx::Error> {
    match row.try_get::<Option<bool>, _>(column) {
        Ok(b) => Ok(b),
        Err(_) => row
            .try_get::<Option<i64>, _>(column)
            .map(|v| v.map(|v| v != 0)),
    }
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
        is_mandatory: flag_opt(row, "a_is_mandatory")?.unwrap_or(false),
        referral: serde_json::from_str(&referral)
            .map_err(|e| StoreError::Corrupt(format!("referral: {e}")))?,
        index: i32::try_from(row.try_get::<i64, _>("a_position")?).unwrap_or(0),
        is_summarized: flag_opt(row, "a_is_summarized")?.unwrap_or(false),
        is_delete_in_chain: flag_opt(row, "a_is_delete_in_chain")?.unwrap_or(false),
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
