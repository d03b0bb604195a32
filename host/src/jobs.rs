//! Plugin tasks as jobs: `PLUGIN_OPERATION_ID_CONFIG` checked at start-up, jobs
//! started, listed, read and cancelled, their state mirrored from the jobs bucket.
//!
//! The protocol is the one in [`core_events::jobs`]: the host writes the row
//! (PREPARING), creates the KV entry `<plugin>.<job-id>` in the jobs bucket and
//! queues a [`JobRequest`] on the work-queue stream; the plugin's SDK worker moves
//! the KV entry to PROCESSING and then to its final status. The host mirrors the
//! bucket into the `jobs` table (`spawn_background`), answers reads from the KV
//! entry merged with the row, cancels by compare-and-set on the KV entry, and marks
//! PROCESSING jobs whose heartbeat is older than their task's `timeout_secs`
//! TIMEOUT.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /api/v2/plugins/<plugin>/tasks/<task>/` | start a job (JSON params) → 201 job; rate-limited per token like the plugin API routes |
//! | `GET /api/v2/jobs/?limit=&offset=` | the user's jobs, newest first (all for a superuser) |
//! | `GET /api/v2/jobs/<id>/` | one job (403 for another user's unless superuser) |
//! | `POST /api/v2/jobs/<id>/cancel/` | cancel it (409 once finished, or running and not cancellable) |
//!
//! See `docs/plugin-api-and-jobs.md`.

use std::time::Duration;

use async_nats::jetstream::kv;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use core_events::User;
use core_events::jobs::{Job, JobRequest, JobState, JobStatus, NewJob, OperationIds};
use core_events::plugin_api::MAX_API_BODY_BYTES;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::error::{ApiError, HostError, error_response};
use super::rate::RateKey;
use super::state::{HostConfig, HostState};
use super::user::AuthUser;
use hookbus::registry::Registry;
use hookbus_kit::jobs::CasError;

/// Jobs a list returns without `limit`.
const DEFAULT_PAGE: u32 = 100;
/// How often the timeout sweeper looks at PROCESSING jobs.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
        .route(
            "/api/v2/plugins/{plugin}/tasks/{task}/",
            post(start_task).fallback(|| async {
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    Json(json!({
                        "error": "method_not_allowed",
                        "message": "only POST is allowed here: it starts the task as a job",
                    })),
                )
            }),
        )
        .route("/api/v2/jobs/", get(list_jobs))
        .route("/api/v2/jobs/{id}/", get(get_job))
        .route("/api/v2/jobs/{id}/cancel/", post(cancel_job))
}

/// Waits (up to `config.plugin_wait`) for the plugins named in
/// `PLUGIN_OPERATION_ID_CONFIG` to register, then checks the configuration
/// against their manifests.
///
/// Only plugins in `ENABLED_PLUGINS` count as registered (a configured plugin that
/// is registered but not enabled gets Pagoda's "not registered" message), so the
/// wait is for the configured plugins that are enabled.
///
/// # Errors
///
/// [`HostError::OperationIds`] with every problem (Pagoda's messages).
pub async fn operation_ids(
    registry: &Registry,
    config: &HostConfig,
) -> Result<OperationIds, HostError> {
    let text = config.operation_id_config.trim();
    if text.is_empty() {
        return Ok(OperationIds::default());
    }
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) {
        let wanted: Vec<&String> = map
            .keys()
            .filter(|id| config.enabled_plugins.contains(id))
            .collect();
        if !wanted.is_empty()
            && registry
                .wait_for(config.plugin_wait, |t| {
                    wanted.iter().all(|id| t.plugins().contains_key(*id))
                })
                .await
                .is_err()
        {
            tracing::warn!(
                wait_ms = u64::try_from(config.plugin_wait.as_millis()).unwrap_or(u64::MAX),
                "not every plugin named in PLUGIN_OPERATION_ID_CONFIG registered in time"
            );
        }
    }
    let table = registry.table();
    let manifests: Vec<_> = table
        .plugins()
        .values()
        .filter(|p| p.enabled_rank.is_some())
        .map(|p| p.manifest.clone())
        .collect();
    OperationIds::from_config(text, &manifests).map_err(HostError::OperationIds)
}

/// Background work of the jobs part (state mirror, timeouts) until `shutdown`.
pub(crate) fn spawn_background(
    state: HostState,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(mirror(state.clone(), shutdown.clone())),
        tokio::spawn(sweep_timeouts(state, shutdown)),
    ]
}

/// Copies every job state written to the jobs bucket into the `jobs` table (only
/// forward), from the bucket's start so nothing is missed across restarts.
async fn mirror(state: HostState, shutdown: CancellationToken) {
    let bucket = state.subjects.jobs_bucket();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let watch = match state.js.get_key_value(&bucket).await {
            Ok(store) => store
                .watch_with_history(">")
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut watch = match watch {
            Ok(w) => {
                backoff = Duration::from_millis(100);
                w
            }
            Err(error) => {
                tracing::warn!(%bucket, %error, "cannot watch the jobs bucket; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => apply_entry(&state, &entry).await,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "jobs bucket watch error; continuing");
                    }
                    None => {
                        tracing::warn!("jobs bucket watch ended; watching again");
                        break;
                    }
                }
            }
        }
    }
}

async fn apply_entry(state: &HostState, entry: &kv::Entry) {
    if entry.operation != kv::Operation::Put {
        return;
    }
    let job_state: JobState = match serde_json::from_slice(&entry.value) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(key = %entry.key, %error, "unreadable job state in the jobs bucket; ignored");
            return;
        }
    };
    if JobState::key(&job_state.plugin, job_state.job_id) != entry.key {
        tracing::warn!(key = %entry.key, "job state stored under a key not its own; ignored");
        return;
    }
    match state.store.job(job_state.job_id).await {
        Ok(row)
            if row.plugin_id.as_deref() == Some(job_state.plugin.as_str())
                && row.task == job_state.task => {}
        Ok(_) => {
            tracing::warn!(key = %entry.key, "job state does not match its row (left over from an earlier database?); ignored");
            return;
        }
        Err(store::StoreError::NotFound { .. }) => {
            tracing::debug!(key = %entry.key, "job state without a row; ignored");
            return;
        }
        Err(error) => {
            tracing::warn!(key = %entry.key, %error, "cannot read the row of a job state");
            return;
        }
    }
    if let Err(error) = state
        .store
        .update_job_status(job_state.job_id, job_state.status, &job_state.message)
        .await
    {
        tracing::warn!(key = %entry.key, %error, "cannot mirror a job state into the table");
    }
}

/// Marks PROCESSING jobs whose task has `timeout_secs` > 0 and whose heartbeat is
/// older than that TIMEOUT.
async fn sweep_timeouts(state: HostState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = sweep_once(&state).await {
            tracing::warn!(%error, "job timeout sweep failed");
        }
    }
}

/// Why a job could not be queued, or a timeout sweep failed.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The jobs bucket could not be opened.
    #[error(transparent)]
    Bucket(#[from] ApiError),
    /// A job state or request could not be encoded.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The job state could not be written.
    #[error("job state: {0}")]
    State(async_nats::Error),
    /// The job could not be published.
    #[error("publish: {0}")]
    Publish(async_nats::Error),
    /// The jobs stream did not acknowledge it.
    #[error("publish ack: {0}")]
    Ack(async_nats::Error),
    /// The jobs stream took it for a duplicate twice.
    #[error("the jobs stream dropped the job as a duplicate")]
    Duplicate,
}

async fn sweep_once(state: &HostState) -> Result<(), JobError> {
    let running = state
        .store
        .plugin_jobs_in_status(JobStatus::Processing, store::MAX_JOB_PAGE)
        .await?;
    if running.is_empty() {
        return Ok(());
    }
    let table = state.registry.table();
    let kv = jobs_kv(state).await?;
    for job in running {
        let Some(plugin) = job.plugin_id.as_deref() else {
            continue;
        };
        let Some(timeout) = table
            .plugins()
            .get(plugin)
            .and_then(|p| p.manifest.task(&job.task))
            .map(|t| t.timeout_secs)
            .filter(|t| *t > 0)
        else {
            continue;
        };
        let limit = chrono::Duration::seconds(i64::try_from(timeout).unwrap_or(i64::MAX / 1000));
        let message = format!("no heartbeat for {timeout} s");
        let result = cas(&kv, plugin, job.id, |s| {
            (s.status == JobStatus::Processing && Utc::now() - s.updated_at > limit)
                .then(|| (JobStatus::Timeout, message.clone()))
                .ok_or(())
        })
        .await;
        if let Ok(Some(_)) = result {
            tracing::warn!(job = job.id, plugin, task = %job.task, timeout, "job timed out");
            let _ = state
                .store
                .update_job_status(job.id, JobStatus::Timeout, &message)
                .await;
        }
    }
    Ok(())
}

async fn jobs_kv(state: &HostState) -> Result<kv::Store, ApiError> {
    let bucket = state.subjects.jobs_bucket();
    state
        .js
        .get_key_value(&bucket)
        .await
        .map_err(|e| ApiError::Internal(format!("jobs bucket '{bucket}': {e}")))
}

/// Changes the state of a plugin job in the jobs bucket by compare-and-set
/// ([`hookbus_kit::jobs::update`]): `decide` gives the new status and message,
/// or refuses. `Ok(None)`: the job has no entry.
async fn cas<E>(
    kv: &kv::Store,
    plugin: &str,
    job_id: i64,
    mut decide: impl FnMut(&JobState) -> Result<(JobStatus, String), E>,
) -> Result<Option<JobState>, CasError<E>> {
    let key = JobState::key(plugin, job_id);
    hookbus_kit::jobs::update(kv, &key, None, |current| {
        let (status, message) = decide(current)?;
        Ok(Some(JobState {
            status,
            message,
            updated_at: Utc::now(),
            ..current.clone()
        }))
    })
    .await
}

/// The job with the fresher state of its KV entry (plugin jobs), when that state is
/// ahead of the row.
async fn fresh(state: &HostState, job: Job) -> Job {
    if job.plugin_id.is_none() {
        return job;
    }
    match jobs_kv(state).await {
        Ok(kv) => fresh_from(&kv, job).await,
        Err(_) => job,
    }
}

/// As [`fresh`], with the bucket already open.
async fn fresh_from(kv: &kv::Store, mut job: Job) -> Job {
    let Some(plugin) = job.plugin_id.as_deref() else {
        return job;
    };
    let Ok(Some(entry)) = kv.entry(JobState::key(plugin, job.id)).await else {
        return job;
    };
    let Ok(kv_state) = serde_json::from_slice::<JobState>(&entry.value) else {
        return job;
    };
    let ahead = job
        .job_status()
        .is_some_and(|s| s == kv_state.status || s.can_become(kv_state.status));
    if ahead {
        job.set_status(kv_state.status, kv_state.message);
        job.updated_time = job.updated_time.max(kv_state.updated_at);
    }
    job
}

/// The job id of the path, or a 400 naming the problem.
fn job_id(path: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::Invalid(vec![format!("the job id must be an integer: {e}")]))
}

fn check_owner(job: &Job, user: &User) -> Result<(), ApiError> {
    if user.is_superuser || job.user.as_ref().is_some_and(|u| u.id == user.id) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "job {} belongs to another user",
            job.id
        )))
    }
}

async fn start_task(
    State(state): State<HostState>,
    AuthUser { user, token_id }: AuthUser,
    Path((plugin, task)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    state
        .limiter
        .check(RateKey::Token(token_id))
        .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs })?;
    let table = state.registry.table();
    let Some(entry) = table.enabled_plugin(&plugin) else {
        return Err(ApiError::NotFound(format!(
            "plugin '{plugin}' is not registered or not enabled"
        )));
    };
    if entry.manifest.task(&task).is_none() {
        return Err(ApiError::NotFound(format!(
            "plugin '{plugin}' has no task '{task}'"
        )));
    }
    drop(table);
    let Some(operation) = state.operation_ids.get(&plugin, &task) else {
        return Err(ApiError::Conflict(
            if state.operation_ids.ranges.contains_key(&plugin) {
                format!(
                    "task '{task}' of plugin '{plugin}' has no operation id: it was not declared when the host started; restart the host"
                )
            } else {
                format!(
                    "plugin '{plugin}' has no operation-id range: add it to PLUGIN_OPERATION_ID_CONFIG, e.g. {{\"{plugin}\": [5000, 5099]}}"
                )
            },
        ));
    };
    if body.len() > MAX_API_BODY_BYTES {
        return Ok(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the task parameters are {} bytes; the limit is {MAX_API_BODY_BYTES}",
                body.len()
            ),
        ));
    }
    let params: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        super::request::read_json(&body, "the task parameters")?
    };
    let job = state
        .store
        .create_job(&NewJob {
            user_id: Some(user.id),
            operation,
            plugin_id: Some(plugin.clone()),
            task: task.clone(),
            params: params.clone(),
        })
        .await?;
    if let Err(e) = enqueue(&state, &job, &user, params).await {
        let message = format!("could not be queued: {e}");
        let _ = state
            .store
            .update_job_status(job.id, JobStatus::Error, &message)
            .await;
        return Err(ApiError::Internal(format!("job {} {message}", job.id)));
    }
    tracing::info!(job = job.id, %plugin, %task, operation, user = %user.username, "job queued");
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

/// The KV entry (PREPARING), then the work-queue message.
async fn enqueue(state: &HostState, job: &Job, user: &User, params: Value) -> Result<(), JobError> {
    let plugin = job.plugin_id.clone().unwrap_or_default();
    let kv = jobs_kv(state).await?;
    let initial = JobState {
        job_id: job.id,
        plugin: plugin.clone(),
        task: job.task.clone(),
        status: JobStatus::Preparing,
        message: String::new(),
        updated_at: Utc::now(),
    };
    let bytes = serde_json::to_vec(&initial)?;
    let key = JobState::key(&plugin, job.id);
    match kv.create(key.as_str(), bytes.clone().into()).await {
        Ok(_) => {}
        // The row was just created, so an entry under its id is left over from an
        // earlier database (the table was reset, the bucket kept): replace it, or
        // the worker would take its old final status for this job's.
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            tracing::warn!(%key, "replacing a stale job state left over from an earlier database");
            kv.put(key.as_str(), bytes.into())
                .await
                .map_err(|e| JobError::State(e.into()))?;
        }
        Err(e) => return Err(JobError::State(e.into())),
    }
    let request = JobRequest {
        job_id: job.id,
        plugin: plugin.clone(),
        task: job.task.clone(),
        operation: job.operation,
        params,
        user: Some(user.clone()),
        created_at: job.created_time,
    };
    let payload = serde_json::to_vec(&request)?;
    let subject = state.subjects.job(&plugin, &job.task);
    // With traces exported, the publish is a PRODUCER span
    // (`send pagoda.jobs.{plugin}.{task}`) under the request's span; the worker's
    // CONSUMER span is its child.
    let mut trace_headers = async_nats::HeaderMap::new();
    let span = if hookbus_kit::trace::enabled() {
        let template = state.subjects.job("{plugin}", "{task}");
        let span = tracing::info_span!(
            "job publish",
            otel.name = %format_args!("send {template}"),
            otel.kind = "producer",
            messaging.system = hookbus_kit::trace::fields::SYSTEM,
            messaging.operation.type = "send",
            messaging.destination.name = %subject,
            messaging.destination.template = %template,
            messaging.message.id = %format_args!("job-{}", job.id),
            pagoda.plugin = %plugin,
            pagoda.task = %job.task,
            pagoda.job_id = job.id,
        );
        hookbus_kit::trace::inject(&span, &mut trace_headers);
        span
    } else {
        tracing::Span::none()
    };
    let publish = |msg_id: String| {
        let mut headers = trace_headers.clone();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        let (subject, payload) = (subject.clone(), payload.clone());
        async move {
            state
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| JobError::Publish(e.into()))?
                .await
                .map_err(|e| JobError::Ack(e.into()))
        }
    };
    let ack = tracing::Instrument::instrument(publish(format!("job-{}", job.id)), span.clone())
        .await
        .inspect_err(|e| hookbus_kit::trace::fail(&span, "publish_failed", &e.to_string()))?;
    if ack.duplicate {
        // `job-<id>` was used within the stream's duplicate window by a job of an
        // earlier database (the table was reset): this job was dropped as its
        // duplicate. Queue it under an id of its own.
        let msg_id = format!("job-{}-{}", job.id, job.created_time.timestamp_micros());
        tracing::warn!(job = job.id, %msg_id, "job message id taken by an earlier database's job");
        let ack = publish(msg_id).await?;
        if ack.duplicate {
            return Err(JobError::Duplicate);
        }
    }
    Ok(())
}

/// `?limit=&offset=` of the job list.
#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<u32>,
    offset: Option<u64>,
}

async fn list_jobs(
    State(state): State<HostState>,
    AuthUser { user, .. }: AuthUser,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| {
        ApiError::Invalid(vec![format!(
            "limit and offset must be non-negative integers: {e}"
        )])
    })?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > store::MAX_JOB_PAGE {
        return Err(ApiError::Invalid(vec![format!(
            "limit {limit} is outside 1..={}",
            store::MAX_JOB_PAGE
        )]));
    }
    let offset = page.offset.unwrap_or(0);
    let owner = (!user.is_superuser).then_some(user.id);
    let rows = state.store.list_jobs(owner, limit, offset).await?;
    let unfinished =
        |job: &Job| job.plugin_id.is_some() && job.job_status().is_some_and(|s| !s.is_final());
    let kv = if rows.iter().any(unfinished) {
        jobs_kv(&state).await.ok()
    } else {
        None
    };
    let mut jobs = Vec::with_capacity(rows.len());
    for job in rows {
        jobs.push(match &kv {
            Some(kv) if unfinished(&job) => fresh_from(kv, job).await,
            _ => job,
        });
    }
    Ok(Json(
        json!({"limit": limit, "offset": offset, "results": jobs}),
    ))
}

async fn get_job(
    State(state): State<HostState>,
    AuthUser { user, .. }: AuthUser,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let id = job_id(id)?;
    let job = state.store.job(id).await?;
    check_owner(&job, &user)?;
    Ok(Json(fresh(&state, job).await))
}

async fn cancel_job(
    State(state): State<HostState>,
    AuthUser { user, .. }: AuthUser,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let id = job_id(id)?;
    let job = fresh(&state, state.store.job(id).await?).await;
    check_owner(&job, &user)?;
    let message = format!("canceled by {}", user.username);
    let cancellable = job
        .plugin_id
        .as_deref()
        .and_then(|p| {
            state
                .registry
                .table()
                .plugins()
                .get(p)
                .and_then(|e| e.manifest.task(&job.task).map(|t| t.cancellable))
        })
        .unwrap_or(true);
    let decide = |status: JobStatus| -> Result<(JobStatus, String), ApiError> {
        if status.is_final() {
            Err(ApiError::Conflict(format!(
                "job {id} already finished ({status})"
            )))
        } else if status == JobStatus::Processing && !cancellable {
            Err(ApiError::Conflict(format!(
                "job {id} is running and its task '{}' cannot be cancelled",
                job.task
            )))
        } else {
            Ok((JobStatus::Canceled, message.clone()))
        }
    };
    let mut done_in_kv = false;
    if let Some(plugin) = job.plugin_id.as_deref() {
        let kv = jobs_kv(&state).await?;
        match cas(&kv, plugin, id, |s| decide(s.status)).await {
            Ok(Some(_)) => done_in_kv = true,
            Ok(None) => {}
            Err(CasError::Refused(e)) => return Err(e),
            Err(e) => return Err(ApiError::Internal(e.to_string())),
        }
    }
    if !done_in_kv {
        decide(job.job_status().unwrap_or(JobStatus::Error))?;
    }
    match state
        .store
        .update_job_status(id, JobStatus::Canceled, &message)
        .await?
    {
        Some(job) => {
            tracing::info!(job = id, user = %user.username, "job canceled");
            Ok(Json(job))
        }
        None if done_in_kv => Ok(Json(fresh(&state, state.store.job(id).await?).await)),
        None => {
            let job = state.store.job(id).await?;
            Err(ApiError::Conflict(format!(
                "job {id} already finished ({})",
                job.status_name
            )))
        }
    }
}
