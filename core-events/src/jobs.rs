//! Plugin tasks run as jobs: statuses, the work-queue message, the job state a
//! worker and the host share, and the operation-id configuration
//! (`PLUGIN_OPERATION_ID_CONFIG`) checked at host start-up.
//!
//! A job's life (the contract between the host and the SDK worker):
//!
//! - Manifest: `tasks: [{name, offset, description, cancellable (default true), timeout_secs (0 =
//!   none)}]` (core_events::manifest::TaskSpec). Operation id = range start (from the host's
//!   PLUGIN_OPERATION_ID_CONFIG) + offset (core_events::jobs::OperationIds).
//! - Host starts a job: inserts a row in table `jobs` (status PREPARING=1), then
//!   `kv.create("<plugin>.<job_id>", JobState{status: PREPARING, ..})` in bucket `pagoda_jobs`
//!   (Subjects::jobs_bucket), then publishes a `JobRequest` JSON to `pagoda.jobs.<plugin>.<task>`
//!   (Subjects::job) with header `Nats-Msg-Id: job-<id>` into stream PAGODA_JOBS (work queue) and
//!   waits for the ack. Response 201 with the job.
//! - SDK worker (in the plugin process): durable pull consumer named `jobs-<plugin>` on stream
//!   PAGODA_JOBS, filter `pagoda.jobs.<plugin>.>` (Subjects::plugin_jobs), explicit ack, ack_wait
//!   30 s, max_ack_pending = the plugin's task concurrency (default 4). Per message:
//!   1. Parse JobRequest; unreadable → `term` it and log an error.
//!   2. Read the KV entry `<plugin>.<job_id>`; if absent create it PREPARING. If its status is final
//!      (CANCELED, DONE, ERROR, WARNING, TIMEOUT) → ack the message, do not run.
//!   3. Compare-and-set (kv.update with the entry's revision) to PROCESSING (message "started"); on
//!      a revision conflict re-read and go back to 2 (a CANCELED written meanwhile wins).
//!   4. Run the task handler with a TaskContext: `request()` (JobRequest), `params()`, `user()`,
//!      `cancellation()` (a cancel signal, set when the job is cancelled; the SDK reads the key
//!      every second, so a plugin needs no rights on other plugins' keys), `progress(msg).await` (CAS: status
//!      stays PROCESSING, message = msg, updated_at = now). While the handler runs the worker sends
//!      in-progress acks (`AckKind::Progress`) every 10 s and a heartbeat (CAS updated_at) every 10
//!      s.
//!   5. Finish: handler `Ok(TaskOutcome::Done(msg))` → DONE, `Ok(TaskOutcome::Warning(msg))` →
//!      WARNING, `Err(e)` → ERROR with the error text, a panic → ERROR "task panicked: …". Written
//!      by CAS; if the entry became CANCELED meanwhile it stays CANCELED (never overwrite a final
//!      status: JobStatus::can_become). Then ack the message (double_ack).
//!   6. A task name the plugin does not declare → ERROR `plugin '<id>' has no task '<task>'`, ack.
//!   7. A worker killed mid-task: the message is redelivered after ack_wait; state is PROCESSING;
//!      the next worker CASes PROCESSING again (message "restarted") and runs the task again
//!      (at-least-once: tasks should be idempotent; documented).
//! - Host mirrors the KV bucket into the `jobs` table (watch with history from the start, so
//!   nothing is missed across host restarts), only moving forward (JobStatus::can_become). `GET
//!   /api/v2/jobs/<id>/` answers from the KV entry for plugin jobs (fresh) merged with the row.
//! - Cancel: `POST /api/v2/jobs/<id>/cancel/`: PREPARING → CANCELED (the worker then skips it);
//!   PROCESSING and the task is cancellable → CANCELED (the running task sees it via
//!   its cancellation() signal and should stop; whatever it returns afterwards, the status stays
//!   CANCELED); PROCESSING and not cancellable → 409; final → 409 `job <id> already finished
//!   (<STATUS>)`. All by CAS on the KV entry, then the row.
//! - Host timeout sweeper: a PROCESSING job whose task has timeout_secs > 0 and whose updated_at
//!   is older than that → CAS TIMEOUT (message "no heartbeat for N s").

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::PluginManifest;
use crate::model::User;

/// Operation ids of plugin tasks lie in this range (1–99 core, 100–199 custom).
pub const PLUGIN_OPERATION_IDS: std::ops::RangeInclusive<i64> = 200..=9999;

/// A job's status, with Pagoda's codes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Created and queued; no worker has taken it yet (1).
    Preparing,
    /// Finished successfully (2).
    Done,
    /// Failed; the message says why (3).
    Error,
    /// Ran longer than its task's `timeout_secs` without a heartbeat (4).
    Timeout,
    /// A worker is running it (5).
    Processing,
    /// Cancelled by a user (6).
    Canceled,
    /// Finished with a warning (7).
    Warning,
}

impl JobStatus {
    /// Every status, by code.
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Preparing,
        JobStatus::Done,
        JobStatus::Error,
        JobStatus::Timeout,
        JobStatus::Processing,
        JobStatus::Canceled,
        JobStatus::Warning,
    ];

    /// Pagoda's numeric code.
    pub fn code(self) -> i32 {
        match self {
            JobStatus::Preparing => 1,
            JobStatus::Done => 2,
            JobStatus::Error => 3,
            JobStatus::Timeout => 4,
            JobStatus::Processing => 5,
            JobStatus::Canceled => 6,
            JobStatus::Warning => 7,
        }
    }

    /// The status with Pagoda's numeric `code`.
    pub fn from_code(code: i64) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|s| i64::from(s.code()) == code)
    }

    /// `PREPARING`, `DONE`, …
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Preparing => "PREPARING",
            JobStatus::Done => "DONE",
            JobStatus::Error => "ERROR",
            JobStatus::Timeout => "TIMEOUT",
            JobStatus::Processing => "PROCESSING",
            JobStatus::Canceled => "CANCELED",
            JobStatus::Warning => "WARNING",
        }
    }

    /// True once the job can no longer change (DONE, ERROR, TIMEOUT, CANCELED, WARNING).
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Preparing | JobStatus::Processing)
    }

    /// Whether a job may go from `self` to `next`: forward only, never out of a
    /// final status.
    pub fn can_become(self, next: JobStatus) -> bool {
        match self {
            JobStatus::Preparing => next != JobStatus::Preparing,
            JobStatus::Processing => next != JobStatus::Preparing,
            _ => false,
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The message queued for a worker on `<prefix>.jobs.<plugin>.<task>`
/// (`Nats-Msg-Id` = `job-<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRequest {
    /// The job id (the host's).
    pub job_id: i64,
    /// The plugin.
    pub plugin: String,
    /// The task name.
    pub task: String,
    /// The operation id (range start + the task's offset).
    pub operation: i64,
    /// Parameters the job was started with.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Who started it.
    #[serde(default)]
    pub user: Option<User>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A job's state in the jobs KV bucket (key `<plugin>.<job-id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobState {
    /// The job id.
    pub job_id: i64,
    /// The plugin.
    pub plugin: String,
    /// The task name.
    pub task: String,
    /// Its status.
    pub status: JobStatus,
    /// The last message (a progress note, the result, or the error).
    #[serde(default)]
    pub message: String,
    /// When the state last changed (a running job's heartbeat, too).
    pub updated_at: DateTime<Utc>,
}

impl JobState {
    /// The KV key of a job: `<plugin>.<job-id>`.
    pub fn key(plugin: &str, job_id: i64) -> String {
        format!("{plugin}.{job_id}")
    }
}

/// A job as the host's API shows it (`GET /api/v2/jobs/<id>/`): the row of table
/// `jobs`, for plugin jobs merged with the fresher state in the jobs bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    /// The job id.
    pub id: i64,
    /// The operation id (Pagoda's `operation`; range start + the task's offset for plugin tasks).
    pub operation: i64,
    /// The plugin whose task this is (`None` for a core job).
    pub plugin_id: Option<String>,
    /// The task name.
    pub task: String,
    /// Parameters the job was started with.
    pub params: serde_json::Value,
    /// Pagoda's numeric status code (see [`JobStatus::code`]).
    pub status: i32,
    /// The status's name (`PREPARING`, `DONE`, …).
    pub status_name: String,
    /// The last message (a progress note, the result, or the error).
    pub message: String,
    /// Who started it (`None` when the user no longer exists or for system jobs).
    pub user: Option<crate::model::ObjectRef>,
    /// When it was created.
    pub created_time: DateTime<Utc>,
    /// When its state last changed.
    pub updated_time: DateTime<Utc>,
}

impl Job {
    /// The status as a [`JobStatus`] (`None` only for a code written by hand).
    pub fn job_status(&self) -> Option<JobStatus> {
        JobStatus::from_code(i64::from(self.status))
    }

    /// Sets the status (code and name) and the message.
    pub fn set_status(&mut self, status: JobStatus, message: impl Into<String>) {
        self.status = status.code();
        self.status_name = status.name().to_owned();
        self.message = message.into();
    }
}

/// What a new job is created from (it starts PREPARING).
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// The user starting it.
    pub user_id: Option<i64>,
    /// Its operation id.
    pub operation: i64,
    /// The plugin (`None` for a core job).
    pub plugin_id: Option<String>,
    /// The task name.
    pub task: String,
    /// Its parameters.
    pub params: serde_json::Value,
}

/// Operation ids of plugin tasks, as assigned from `PLUGIN_OPERATION_ID_CONFIG`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationIds {
    /// `(plugin, task)` → operation id.
    pub by_task: BTreeMap<(String, String), i64>,
    /// Each plugin's configured range.
    pub ranges: BTreeMap<String, (i64, i64)>,
}

impl OperationIds {
    /// Parses `PLUGIN_OPERATION_ID_CONFIG` (`{"hello-world": [5000, 5099]}`) and
    /// checks it against the registered plugins' tasks, collecting every problem
    /// with Pagoda's messages:
    ///
    /// - `Operation ID range for plugin '<id>' must be a tuple of (start: int, end: int)`
    /// - `Plugin '<id>' is configured in PLUGIN_OPERATION_ID_CONFIG but not registered`
    /// - `Operation ID range (<s>, <e>) for plugin '<id>' is invalid. Range must be within 200-9999 and start <= end.`
    /// - `Offset <n> for operation '<op>' in plugin '<id>' exceeds range size <size>. Range: <s>-<e>`
    /// - `Operation ID <n> for operation '<op>' in plugin '<id>' is already in use.`
    ///
    /// An empty or absent configuration is valid (no task can be started).
    ///
    /// # Errors
    ///
    /// Every problem, in configuration order.
    pub fn from_config(config: &str, plugins: &[PluginManifest]) -> Result<Self, Vec<String>> {
        let config = config.trim();
        if config.is_empty() {
            return Ok(OperationIds::default());
        }
        let map: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(config) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(other) => {
                return Err(vec![format!(
                    "PLUGIN_OPERATION_ID_CONFIG must be a JSON object of plugin id to [start, end], not {other}"
                )]);
            }
            Err(e) => {
                return Err(vec![format!(
                    "PLUGIN_OPERATION_ID_CONFIG is not valid JSON: {e}"
                )]);
            }
        };
        let mut problems = Vec::new();
        let mut ids = OperationIds::default();
        let mut used: BTreeMap<i64, (String, String)> = BTreeMap::new();
        for (plugin, range) in &map {
            let pair = range.as_array().and_then(|a| match a.as_slice() {
                [s, e] => Some((s.as_i64()?, e.as_i64()?)),
                _ => None,
            });
            let Some((start, end)) = pair else {
                problems.push(format!(
                    "Operation ID range for plugin '{plugin}' must be a tuple of (start: int, end: int)"
                ));
                continue;
            };
            let Some(manifest) = plugins.iter().find(|m| m.id == *plugin) else {
                problems.push(format!(
                    "Plugin '{plugin}' is configured in PLUGIN_OPERATION_ID_CONFIG but not registered"
                ));
                continue;
            };
            if !(PLUGIN_OPERATION_IDS.contains(&start)
                && PLUGIN_OPERATION_IDS.contains(&end)
                && start <= end)
            {
                problems.push(format!(
                    "Operation ID range ({start}, {end}) for plugin '{plugin}' is invalid. Range must be within 200-9999 and start <= end."
                ));
                continue;
            }
            ids.ranges.insert(plugin.clone(), (start, end));
            let size = end - start + 1;
            for task in &manifest.tasks {
                let offset = i64::from(task.offset);
                if offset >= size {
                    problems.push(format!(
                        "Offset {offset} for operation '{}' in plugin '{plugin}' exceeds range size {size}. Range: {start}-{end}",
                        task.name
                    ));
                    continue;
                }
                let id = start + offset;
                if used.contains_key(&id) {
                    problems.push(format!(
                        "Operation ID {id} for operation '{}' in plugin '{plugin}' is already in use.",
                        task.name
                    ));
                    continue;
                }
                used.insert(id, (plugin.clone(), task.name.clone()));
                ids.by_task.insert((plugin.clone(), task.name.clone()), id);
            }
        }
        if problems.is_empty() {
            Ok(ids)
        } else {
            Err(problems)
        }
    }

    /// The operation id of `plugin`'s `task`, if configured.
    pub fn get(&self, plugin: &str, task: &str) -> Option<i64> {
        self.by_task
            .get(&(plugin.to_owned(), task.to_owned()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::TaskSpec;

    fn plugin(id: &str, tasks: &[(&str, u32)]) -> PluginManifest {
        let mut m = PluginManifest::new(id, id, "1.0.0");
        m.tasks = tasks.iter().map(|(n, o)| TaskSpec::new(*n, *o)).collect();
        m
    }

    #[test]
    fn a_valid_configuration_assigns_start_plus_offset() {
        let plugins = [plugin("hello-world", &[("count", 0), ("export", 3)])];
        let ids = OperationIds::from_config(r#"{"hello-world": [5000, 5099]}"#, &plugins).unwrap();
        assert_eq!(ids.get("hello-world", "count"), Some(5000));
        assert_eq!(ids.get("hello-world", "export"), Some(5003));
        assert_eq!(
            OperationIds::from_config("", &plugins).unwrap(),
            OperationIds::default()
        );
    }

    #[test]
    fn every_problem_is_reported_with_pagodas_messages() {
        let plugins = [
            plugin("a", &[("t", 0), ("u", 20)]),
            plugin("b", &[("v", 5)]),
            plugin("c", &[]),
        ];
        let problems = OperationIds::from_config(
            r#"{"a": [300, 309], "b": [295, 400], "c": [100, 50], "d": [1000, 1001], "e": "x"}"#,
            &plugins,
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "Offset 20 for operation 'u' in plugin 'a' exceeds range size 10. Range: 300-309",
                "Operation ID 300 for operation 'v' in plugin 'b' is already in use.",
                "Operation ID range (100, 50) for plugin 'c' is invalid. Range must be within 200-9999 and start <= end.",
                "Plugin 'd' is configured in PLUGIN_OPERATION_ID_CONFIG but not registered",
                "Operation ID range for plugin 'e' must be a tuple of (start: int, end: int)",
            ]
        );
    }

    #[test]
    fn statuses_move_forward_only() {
        assert!(JobStatus::Preparing.can_become(JobStatus::Processing));
        assert!(JobStatus::Processing.can_become(JobStatus::Canceled));
        assert!(!JobStatus::Canceled.can_become(JobStatus::Processing));
        assert!(!JobStatus::Done.can_become(JobStatus::Error));
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::from_code(i64::from(s.code())), Some(s));
        }
    }
}
