//! API tokens of the reference host, user changes ([`Store::update_user`]),
//! and the paged lists it serves (users, entities, entries: at most `limit`
//! objects read per call).
//!
//! A token's key is shown once, when it is created; the store keeps only its
//! SHA-256 hash (`api_tokens.key_hash`), so a leaked database does not leak keys.
//! A request's key is hashed and looked up by hash ([`Store::user_by_key`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use core_events::model::{Entity, Entry, User};

use super::{
    Backend, Store, StoreError, format_time, is_unique_violation, load, not_found, now, parse_time,
};

/// Why a request's API token authenticates nobody (each message is the one the
/// host and the console answer with, as 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    /// The `Authorization` header is not `Token <key>`.
    #[error("malformed Authorization header: expected 'Token <key>'")]
    Malformed,
    /// No active token has this key.
    #[error("invalid token: unknown or revoked")]
    Unknown,
    /// The token's user is deactivated.
    #[error("user '{0}' is inactive")]
    Inactive(String),
}

/// The key of an `Authorization` header value `Token <key>` (the scheme in any
/// case, spaces around the key ignored).
///
/// # Errors
///
/// [`TokenRefused::Malformed`] for anything else, or an empty key.
pub fn token_key(authorization: &str) -> Result<&str, TokenRefused> {
    let (scheme, key) = authorization
        .trim()
        .split_once(' ')
        .ok_or(TokenRefused::Malformed)?;
    let key = key.trim();
    if scheme.eq_ignore_ascii_case("token") && !key.is_empty() {
        Ok(key)
    } else {
        Err(TokenRefused::Malformed)
    }
}

/// Prefix of every key, so a key is recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "hb_";

/// An API token, without its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Token id.
    pub id: i64,
    /// The user it authenticates.
    pub user_id: i64,
    /// A label chosen by its owner.
    pub name: String,
    /// When it was created.
    pub created_time: DateTime<Utc>,
    /// When it was last used (updated at most every few seconds per token).
    pub last_used_time: Option<DateTime<Utc>>,
    /// False once revoked.
    pub is_active: bool,
}

/// A user found by a token key, with the token that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    /// The user (active or not: callers refuse inactive users).
    pub user: User,
    /// The matching token's id.
    pub token_id: i64,
}

/// The SHA-256 hash (lower-case hex) of a key: what `api_tokens.key_hash` holds.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// A new random key: `hb_` and 64 hex digits (two v4 UUIDs, 244 random bits).
pub fn new_key() -> String {
    format!(
        "{TOKEN_PREFIX}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Key of the PostgreSQL advisory lock that serialises user changes
/// ([`Store::update_user`]): "hookuser" in ASCII.
const USERS_LOCK: i64 = 0x686f_6f6b_7573_6572;

const TOKEN_COLUMNS: &str =
    "id, user_id, name, created_time, last_used_time, is_active FROM api_tokens";

/// A flag: BOOLEAN on PostgreSQL, 0/1 INTEGER on SQLite.
fn flag(row: &AnyRow, column: &str) -> Result<bool, sqlx::Error> {
    match row.try_get::<bool, _>(column) {
        Ok(b) => Ok(b),
        Err(_) => row.try_get::<i64, _>(column).map(|v| v != 0),
    }
}

fn token_from_row(row: &AnyRow) -> Result<ApiToken, StoreError> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        name: row.try_get("name")?,
        created_time: parse_time(&row.try_get::<String, _>("created_time")?)?,
        last_used_time: row
            .try_get::<Option<String>, _>("last_used_time")?
            .map(|t| parse_time(&t))
            .transpose()?,
        is_active: flag(row, "is_active")?,
    })
}

impl Store {
    /// Creates a token for user `user_id`; returns it with its key, which is not
    /// stored and cannot be read again.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no such user; [`StoreError::Invalid`] for a
    /// name over 200 characters.
    pub async fn create_token(
        &self,
        user_id: i64,
        name: &str,
    ) -> Result<(ApiToken, String), StoreError> {
        if name.chars().count() > 200 {
            return Err(StoreError::Invalid(vec![
                "token name is longer than 200 characters".into(),
            ]));
        }
        self.user(user_id).await?;
        let key = new_key();
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "INSERT INTO api_tokens (user_id, key_hash, name, created_time, is_active) \
             VALUES ($1, $2, $3, $4, TRUE) RETURNING id",
        )
        .bind(user_id)
        .bind(hash_key(&key))
        .bind(name)
        .bind(format_time(&now()))
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get(0)?;
        let token = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} WHERE id = $1"
        )))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let token = token_from_row(&token)?;
        tx.commit().await?;
        Ok((token, key))
    }

    /// The user an active token's key authenticates, or `None` for an unknown or
    /// revoked key. Looks the key up by its hash.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn user_by_key(&self, key: &str) -> Result<Option<TokenUser>, StoreError> {
        let row = sqlx::query(
            "SELECT t.id AS token_id, u.id, u.username, u.email, u.first_name, u.last_name, \
             u.is_active, u.is_superuser, u.date_joined \
             FROM api_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.key_hash = $1 AND t.is_active = TRUE",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(TokenUser {
            user: load::user_from_row(&row)?,
            token_id: row.try_get("token_id")?,
        }))
    }

    /// The active user an active token's key authenticates: the one rule of the
    /// reference host and the operator console.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails; inside, [`TokenRefused`] for
    /// an unknown or revoked key, or a deactivated user.
    pub async fn authenticate(
        &self,
        key: &str,
    ) -> Result<Result<TokenUser, TokenRefused>, StoreError> {
        Ok(match self.user_by_key(key).await? {
            None => Err(TokenRefused::Unknown),
            Some(found) if !found.user.is_active => {
                Err(TokenRefused::Inactive(found.user.username))
            }
            Some(found) => Ok(found),
        })
    }

    /// Records that token `id` was used now.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn touch_token(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_tokens SET last_used_time = $2 WHERE id = $1")
            .bind(id)
            .bind(format_time(&now()))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// A token by id (active or revoked).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is none.
    pub async fn token(&self, id: i64) -> Result<ApiToken, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found("token", id))?;
        token_from_row(&row)
    }

    /// A user's tokens by id (revoked ones too, marked inactive).
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn tokens_of(&self, user_id: i64) -> Result<Vec<ApiToken>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} WHERE user_id = $1 ORDER BY id"
        )))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(token_from_row)
        .collect()
    }

    /// Revokes token `id`: its key no longer authenticates. Revoking a revoked
    /// token is a no-op.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is no such token.
    pub async fn revoke_token(&self, id: i64) -> Result<ApiToken, StoreError> {
        self.revoke_token_once(id).await.map(|(token, _)| token)
    }

    /// As [`revoke_token`](Self::revoke_token), and whether this call revoked it
    /// (false: it was revoked already). Of concurrent calls exactly one revokes.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is no such token.
    pub async fn revoke_token_once(&self, id: i64) -> Result<(ApiToken, bool), StoreError> {
        let n = sqlx::query("UPDATE api_tokens SET is_active = FALSE WHERE id = $1 AND is_active")
            .bind(id)
            .execute(&self.writer)
            .await?
            .rows_affected();
        // Not found, or revoked already.
        Ok((self.token(id).await?, n > 0))
    }

    /// Changes user `id` to what `change` makes of it, in one transaction, and
    /// returns the user before and after. `change` may set the username, e-mail,
    /// names, `is_active` and `is_superuser`; the id and `date_joined` are kept.
    /// Nothing is written when nothing changed.
    ///
    /// A change that would leave no active superuser (deactivating or demoting
    /// the last one) is refused. On PostgreSQL user changes take a transaction
    /// lock, so two concurrent demotions cannot each count the other as the
    /// remaining superuser; on SQLite writes are serial anyway.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for no such user; [`StoreError::Invalid`] for an
    /// empty username; [`StoreError::Conflict`] when the username is taken or the
    /// user is the last active superuser.
    pub async fn update_user<F>(&self, id: i64, change: F) -> Result<(User, User), StoreError>
    where
        F: FnOnce(&mut User) + Send,
    {
        let mut tx = self.begin().await?;
        if self.backend() == Backend::Postgres {
            sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                .bind(USERS_LOCK)
                .fetch_one(&mut *tx)
                .await?;
        }
        let before = load::user(&mut tx, id)
            .await?
            .ok_or_else(|| not_found("user", id))?;
        let mut after = before.clone();
        change(&mut after);
        after.id = before.id;
        after.date_joined = before.date_joined;
        if after.username.trim().is_empty() {
            return Err(StoreError::Invalid(vec![
                "username must not be empty".into(),
            ]));
        }
        if after == before {
            tx.commit().await?;
            return Ok((before, after));
        }
        let was_admin = before.is_active && before.is_superuser;
        if was_admin && !(after.is_active && after.is_superuser) {
            let others: i64 = sqlx::query(
                "SELECT COUNT(*) FROM users \
                 WHERE is_active = TRUE AND is_superuser = TRUE AND id <> $1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            if others == 0 {
                return Err(StoreError::Conflict(format!(
                    "user '{}' is the last active superuser: it cannot be {}; \
                     make another user an active superuser first",
                    before.username,
                    if after.is_active {
                        "demoted"
                    } else {
                        "deactivated"
                    }
                )));
            }
        }
        sqlx::query(
            "UPDATE users SET username = $2, email = $3, first_name = $4, last_name = $5, \
             is_active = $6, is_superuser = $7 WHERE id = $1",
        )
        .bind(id)
        .bind(&after.username)
        .bind(&after.email)
        .bind(&after.first_name)
        .bind(&after.last_name)
        .bind(after.is_active)
        .bind(after.is_superuser)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("user '{}' already exists", after.username))
            } else {
                StoreError::Db(e)
            }
        })?;
        let after = load::user(&mut tx, id)
            .await?
            .ok_or_else(|| not_found("user", id))?;
        tx.commit().await?;
        Ok((before, after))
    }

    /// Users by id, `limit` from `offset`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn list_users(&self, limit: i64, offset: i64) -> Result<Vec<User>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} ORDER BY id LIMIT $1 OFFSET $2",
            load::USER_COLUMNS
        )))
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(load::user_from_row)
        .collect()
    }
}

/// One page of a list: the objects and whether more follow.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage<T> {
    /// The objects, by id.
    pub items: Vec<T>,
    /// True when objects follow this page.
    pub more: bool,
}

impl Store {
    /// Entities by id, `limit` from `offset` (active only unless `include_deleted`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn entities_page(
        &self,
        include_deleted: bool,
        limit: i64,
        offset: i64,
    ) -> Result<ListPage<Entity>, StoreError> {
        let sql = if include_deleted {
            "SELECT id FROM entities ORDER BY id LIMIT $1 OFFSET $2"
        } else {
            "SELECT id FROM entities WHERE is_active ORDER BY id LIMIT $1 OFFSET $2"
        };
        let mut conn = self.pool.acquire().await?;
        let ids = page_ids(
            &mut conn,
            sqlx::query(sql),
            &[limit.saturating_add(1), offset],
        )
        .await?;
        let more = ids.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        for id in ids
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
        {
            if let Some(e) = load::entity(&mut conn, id, false).await? {
                items.push(e);
            }
        }
        Ok(ListPage { items, more })
    }

    /// Entries of an entity by id, `limit` from `offset` (active only unless
    /// `include_deleted`).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when the entity does not exist.
    pub async fn entries_page(
        &self,
        entity_id: i64,
        include_deleted: bool,
        limit: i64,
        offset: i64,
    ) -> Result<ListPage<Entry>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let entity = load::entity(&mut conn, entity_id, false)
            .await?
            .ok_or_else(|| not_found("entity", entity_id))?;
        let mut items = load::entries_page_of(
            &mut conn,
            &entity,
            include_deleted,
            Some((limit.saturating_add(1), offset)),
        )
        .await?;
        let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(ListPage { items, more })
    }
}

/// Ids of one page (the query reads one more than the page's limit, to know
/// whether more follow), with `args` bound in order.
async fn page_ids(
    conn: &mut sqlx::AnyConnection,
    mut query: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
    args: &[i64],
) -> Result<Vec<i64>, StoreError> {
    for a in args {
        query = query.bind(*a);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_key_reads_the_token_scheme_only() {
        assert_eq!(super::token_key("Token abc"), Ok("abc"));
        assert_eq!(super::token_key("  token   abc  "), Ok("abc"));
        for bad in ["Bearer abc", "Token", "Token    ", "abc", ""] {
            assert_eq!(
                super::token_key(bad),
                Err(super::TokenRefused::Malformed),
                "{bad:?}"
            );
        }
    }

    use super::*;

    #[test]
    fn keys_are_random_and_hashed_as_hex() {
        let a = new_key();
        let b = new_key();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == 3 + 64, "{a}");
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
