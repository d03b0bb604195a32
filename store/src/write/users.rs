//! Users: creating and reading them.

use sqlx::Row;

use core_events::model::User;
use core_events::request::NewUser;

use super::conflict_on_unique;
use crate::Store;
use crate::{StoreError, format_time, load, not_found, now};

impl Store {
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
}
