//! Jobs (table `jobs`): created PREPARING, read, listed newest first, and moved
//! forward only ([`JobStatus::can_become`]).

use sqlx::Row;
use sqlx::any::AnyRow;

use core_events::jobs::{Job, JobStatus, NewJob};
use core_events::model::ObjectRef;

use super::{Store, StoreError, format_time, not_found, now, parse_time};

const JOB_COLUMNS: &str = "j.id, j.user_id, u.username, j.operation, j.plugin_id, j.task, \
     j.params, j.status, j.message, j.created_time, j.updated_time \
     FROM jobs j LEFT JOIN users u ON u.id = j.user_id";

/// Most jobs one list call returns.
pub const MAX_JOB_PAGE: u32 = 1000;

/// How often [`Store::update_job_status`] re-reads a row another writer changed
/// under it before giving up.
const CAS_ATTEMPTS: usize = 8;

fn job_from_row(row: &AnyRow) -> Result<Job, StoreError> {
    let code: i64 = row.try_get("status")?;
    let status = JobStatus::from_code(code)
        .ok_or_else(|| StoreError::Corrupt(format!("job status code {code} is unknown")))?;
    let params: String = row.try_get("params")?;
    let user_id: Option<i64> = row.try_get("user_id")?;
    let username: Option<String> = row.try_get("username")?;
    let mut job = Job {
        id: row.try_get("id")?,
        operation: row.try_get("operation")?,
        plugin_id: row.try_get("plugin_id")?,
        task: row.try_get("task")?,
        params: serde_json::from_str(&params)
            .map_err(|e| StoreError::Corrupt(format!("job params: {e}")))?,
        status: 0,
        status_name: String::new(),
        message: String::new(),
        user: user_id.map(|id| ObjectRef {
            id,
            name: username.unwrap_or_default(),
        }),
        created_time: parse_time(&row.try_get::<String, _>("created_time")?)?,
        updated_time: parse_time(&row.try_get::<String, _>("updated_time")?)?,
    };
    job.set_status(status, row.try_get::<String, _>("message")?);
    Ok(job)
}

impl Store {
    /// Creates a job in status PREPARING.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] without a task name, [`StoreError::Db`] when the
    /// database fails.
    pub async fn create_job(&self, new: &NewJob) -> Result<Job, StoreError> {
        if new.task.trim().is_empty() {
            return Err(StoreError::Invalid(vec!["a job needs a task name".into()]));
        }
        let params = serde_json::to_string(&new.params)
            .map_err(|e| StoreError::Invalid(vec![format!("job params: {e}")]))?;
        let t = format_time(&now());
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "INSERT INTO jobs (user_id, operation, plugin_id, task, params, status, message, \
             created_time, updated_time) VALUES ($1, $2, $3, $4, $5, $6, '', $7, $7) RETURNING id",
        )
        .bind(new.user_id)
        .bind(new.operation)
        .bind(new.plugin_id.clone())
        .bind(&new.task)
        .bind(params)
        .bind(i64::from(JobStatus::Preparing.code()))
        .bind(t)
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get(0)?;
        tx.commit().await?;
        self.job(id).await
    }

    /// A job by id.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is none.
    pub async fn job(&self, id: i64) -> Result<Job, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} WHERE j.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()?
        .ok_or_else(|| not_found("job", id))
    }

    /// Jobs newest first: those of `user_id`, or everyone's with `None`; at most
    /// `limit` (capped at [`MAX_JOB_PAGE`]) after skipping `offset`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn list_jobs(
        &self,
        user_id: Option<i64>,
        limit: u32,
        offset: u64,
    ) -> Result<Vec<Job>, StoreError> {
        let limit = i64::from(limit.min(MAX_JOB_PAGE));
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let rows = match user_id {
            Some(user) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} WHERE j.user_id = $1 ORDER BY j.id DESC LIMIT $2 OFFSET $3"
            )))
            .bind(user)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {JOB_COLUMNS} ORDER BY j.id DESC LIMIT $1 OFFSET $2"
                )))
                .bind(limit)
                .bind(offset)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(job_from_row).collect()
    }

    /// Plugin jobs in `status`, oldest first, at most `limit` (the host's timeout
    /// sweeper reads the PROCESSING ones).
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when the database fails.
    pub async fn plugin_jobs_in_status(
        &self,
        status: JobStatus,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} WHERE j.status = $1 AND j.plugin_id IS NOT NULL \
             ORDER BY j.id LIMIT $2"
        )))
        .bind(i64::from(status.code()))
        .bind(i64::from(limit.min(MAX_JOB_PAGE)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Moves a job to `status` with `message`, only forward
    /// ([`JobStatus::can_become`]: never back to PREPARING, never out of a final
    /// status). Returns the job after the change, or `None` when the move is not
    /// allowed (the row is left as it is). Safe against concurrent writers: the
    /// row changes only if its status is still the one read.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is no such job, [`StoreError::Db`] when
    /// the database fails.
    pub async fn update_job_status(
        &self,
        id: i64,
        status: JobStatus,
        message: &str,
    ) -> Result<Option<Job>, StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.job(id).await?;
            let Some(from) = current.job_status() else {
                return Ok(None);
            };
            if !from.can_become(status) {
                return Ok(None);
            }
            let changed = sqlx::query(
                "UPDATE jobs SET status = $1, message = $2, updated_time = $3 \
                 WHERE id = $4 AND status = $5",
            )
            .bind(i64::from(status.code()))
            .bind(message)
            .bind(format_time(&now()))
            .bind(id)
            .bind(i64::from(from.code()))
            .execute(&self.writer)
            .await?
            .rows_affected();
            if changed == 1 {
                return self.job(id).await.map(Some);
            }
        }
        Err(StoreError::Conflict(format!(
            "job {id} kept changing while its status was being set to {status}"
        )))
    }
}
