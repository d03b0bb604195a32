//! Plugin tasks run as jobs: long work a user starts through the host
//! (`POST /api/v2/jobs/…`), queued on JetStream and run by a worker inside the
//! plugin process, with its status in the jobs KV bucket.
//!
//! Declare a task with [`PluginBuilder::task`] (name, operation-id offset,
//! handler); its options go with its name, as a [`Task`]
//! ([`description`](Task::description), [`not_cancellable`](Task::not_cancellable),
//! [`timeout`](Task::timeout)). Its operation id is the start of
//! the plugin's range in the host's `PLUGIN_OPERATION_ID_CONFIG` plus the offset.
//!
//! A plugin with tasks serves a worker beside its endpoints (started by
//! [`Plugin::serve`] once the plugin is registered; it waits, like registration,
//! up to [`ServeOptions::registry_wait`](crate::ServeOptions::registry_wait) for
//! the bus to create the jobs stream and bucket): a durable pull
//! consumer `jobs-<plugin-id>` on the work-queue stream `<PREFIX>_JOBS`, filtered to
//! `<prefix>.jobs.<plugin-id>.>`, shared by the plugin's replicas, at most
//! [`ServeOptions::task_concurrency`](crate::ServeOptions::task_concurrency) jobs
//! at once (default 4, over all replicas: it is the consumer's
//! `max_ack_pending`). For each queued [`JobRequest`]:
//!
//! 1. an unreadable request is terminated (never redelivered) and logged; when
//!    it still names a job of this plugin (its `job_id`, `plugin` and `task` are
//!    readable: say, its parameters nest deeper than serde_json's 128 levels),
//!    that job ends in ERROR with the reason;
//! 2. the job's state (key `<plugin-id>.<job-id>` in bucket `<prefix>_jobs`) is read,
//!    or created PREPARING when missing; a job already final (CANCELED, DONE,
//!    ERROR, WARNING, TIMEOUT) is acknowledged and not run;
//! 3. the state becomes PROCESSING ("started", or "restarted" after a worker died
//!    mid-task) by compare-and-set: a cancel written meanwhile wins;
//! 4. the handler runs with a [`TaskContext`]; meanwhile the worker extends the
//!    message's ack deadline and writes a heartbeat (`updated_at`) every 10 s
//!    (every third of the task's `timeout_secs` when that is shorter), and reads
//!    the state every second to notice a cancel;
//! 5. its outcome is written: `Ok(`[`TaskOutcome::Done`]`)` → DONE,
//!    `Ok(`[`TaskOutcome::Warning`]`)` → WARNING, `Err(e)` → ERROR with the error
//!    text, a panic → ERROR "task panicked: …"; a job cancelled meanwhile stays
//!    CANCELED. Then the message is acknowledged;
//! 6. a task the plugin does not declare → ERROR `plugin '<id>' has no task '<task>'`;
//! 7. when the job's state cannot be read or written (NATS trouble) the message
//!    is handed back (redelivered after 5 s).
//!
//! Every state change is a compare-and-set on the entry's revision, so a final
//! status is never overwritten. Delivery is at least once: a worker killed
//! mid-task leaves the message unacknowledged, and another worker runs the task
//! again after the ack wait (30 s). **Tasks should be idempotent.** At shutdown,
//! jobs still running after [`ServeOptions::shutdown_grace`](crate::ServeOptions::shutdown_grace)
//! are stopped and handed back to the queue at once, for another replica.
//!
//! Cancelling: the host writes CANCELED; a running task sees it through its one
//! cancel signal, [`TaskContext::cancellation`] (a [`CancellationToken`], set
//! within about a second: the worker reads the job's state every second while
//! the task runs, and [`TaskContext::progress`] notices it at once): check
//! `is_cancelled()` between steps, or `select!` against `cancelled()`. The task
//! should then stop; whatever it returns, the job stays CANCELED. A task declared
//! [`not_cancellable`](Task::not_cancellable) cannot be cancelled once running
//! (the host answers 409).
//!
//! ```no_run
//! use pagoda_plugin_sdk::{Plugin, Task, TaskOutcome};
//!
//! # fn example() -> Result<(), pagoda_plugin_sdk::ManifestError> {
//! let plugin = Plugin::builder("exporter", "Exporter", "1.0.0")
//!     .task(Task::named("export").description("Exports everything"), 0, |ctx| async move {
//!         for part in 0..10 {
//!             if ctx.cancellation().is_cancelled() {
//!                 return Ok(TaskOutcome::done("stopped: cancelled"));
//!             }
//!             ctx.progress(format!("part {part} of 10")).await?;
//!             // … export one part …
//!         }
//!         Ok(TaskOutcome::done("exported 10 parts"))
//!     })
//!     .build()?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use core_events::jobs::{JobRequest, JobState, JobStatus};
use core_events::{Subjects, TaskSpec, User};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, warn};

use crate::error::{HandlerError, ServeError};
use crate::plugin::{Plugin, PluginBuilder, Task};

/// Default number of jobs one plugin runs at once (over all its replicas).
pub const DEFAULT_TASK_CONCURRENCY: usize = 4;
/// How long a job message may go without an acknowledgement (or an in-progress
/// ack) before it is redelivered.
pub const JOB_ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest time between two heartbeats of a running job.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a running job's state is read to notice a cancel.
pub const CANCEL_POLL: Duration = Duration::from_secs(1);
/// How long one pull for the next job waits at the server.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Wait before pulling again after a failed pull.
const PULL_RETRY: Duration = Duration::from_secs(1);
/// Redelivery delay of a job whose state could not be read or written.
const STATE_RETRY: Duration = Duration::from_secs(5);
/// Attempts at writing a finished job's outcome before handing it back.
const FINISH_ATTEMPTS: u32 = 3;
/// How long stopped jobs get to hand their messages back at shutdown.
const ABORT_WAIT: Duration = Duration::from_secs(2);

/// What a task's future resolves to.
pub type TaskResult = Result<TaskOutcome, HandlerError>;

type BoxTaskFuture = Pin<Box<dyn Future<Output = TaskResult> + Send + 'static>>;
/// A type-erased task handler.
pub(crate) type TaskCall = Arc<dyn Fn(TaskContext) -> BoxTaskFuture + Send + Sync + 'static>;

/// How a task ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    /// Finished: the job becomes DONE with this message.
    Done(String),
    /// Finished with something to look at: the job becomes WARNING with this message.
    Warning(String),
}

impl TaskOutcome {
    /// [`TaskOutcome::Done`] with `message`.
    pub fn done(message: impl Into<String>) -> Self {
        TaskOutcome::Done(message.into())
    }

    /// [`TaskOutcome::Warning`] with `message`.
    pub fn warning(message: impl Into<String>) -> Self {
        TaskOutcome::Warning(message.into())
    }
}

impl<S> PluginBuilder<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Adds a task the host can start as a job (see [`crate::task`]).
    ///
    /// `task` is its name (letters, digits, `-`, `_`; unique in the plugin) or
    /// a [`Task`] with options; `offset` places its operation id in the
    /// plugin's range (`range start + offset`, at most 9799). The task is
    /// cancellable and has no time limit unless its [`Task`] says otherwise.
    pub fn task<F, Fut>(self, task: impl Into<Task>, offset: u32, f: F) -> Self
    where
        F: Fn(TaskContext<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        let state = self.state.clone();
        let call: TaskCall = Arc::new(move |ctx| Box::pin(f(ctx.with_state(state.clone()))));
        let task: Task = task.into();
        self.push_task(task.into_spec(offset), call)
    }
}

/// One run of a task: the job request, its state, and the cancel signal; `S`
/// is the plugin's state ([`PluginBuilder::state`]), `()` without one.
///
/// Cheap to clone, so the task can hand it to work it spawns.
#[derive(Clone)]
pub struct TaskContext<S = ()> {
    inner: Arc<ContextInner>,
    /// The plugin's state, shared by all its handlers.
    pub state: S,
}

struct ContextInner {
    request: JobRequest,
    job: JobCell,
    /// Set once this worker has seen the job CANCELED.
    canceled: CancellationToken,
    /// A child of `canceled`, the task's view of it: cancelling it does not
    /// touch the worker's.
    signal: CancellationToken,
}

impl<S> std::fmt::Debug for TaskContext<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("request", &self.inner.request)
            .field("canceled", &self.inner.canceled.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl<S> TaskContext<S> {
    /// The same run with `state` as the plugin's state.
    pub fn with_state<T>(self, state: T) -> TaskContext<T> {
        TaskContext {
            inner: self.inner,
            state,
        }
    }

    /// The job request: job id, plugin, task, operation id, parameters, user.
    pub fn request(&self) -> &JobRequest {
        &self.inner.request
    }

    /// The job id (the host's).
    pub fn job_id(&self) -> i64 {
        self.inner.request.job_id
    }

    /// The parameters the job was started with (`null` when none).
    pub fn params(&self) -> &serde_json::Value {
        &self.inner.request.params
    }

    /// The parameters as a `T`.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`] naming what does not fit; returned from the task, it
    /// makes the job ERROR with that text.
    pub fn params_as<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        T::deserialize(&self.inner.request.params)
            .map_err(|e| HandlerError::permanent(format!("job parameters are not valid: {e}")))
    }

    /// Who started the job.
    pub fn user(&self) -> Option<&User> {
        self.inner.request.user.as_ref()
    }

    /// The job's cancel signal, the one way a task observes a cancel: set once
    /// the worker sees the job CANCELED (it reads the job's state every second
    /// while the task runs; [`progress`](Self::progress) notices it at once).
    /// `is_cancelled()` checks it without I/O, between steps; `cancelled()`
    /// resolves once it is set, to `select!` against the work.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.signal
    }

    /// Records a progress note: the job's message becomes `message` (its status
    /// stays PROCESSING).
    ///
    /// # Errors
    ///
    /// A [`HandlerError`] when the state cannot be written (NATS trouble), or when
    /// the job is no longer PROCESSING (cancelled, timed out): then nothing is
    /// written.
    pub async fn progress(&self, message: impl Into<String>) -> Result<(), HandlerError> {
        let message = message.into();
        let stored = self
            .inner
            .job
            .update(|cur| {
                (cur.status == JobStatus::Processing)
                    .then(|| changed(cur, JobStatus::Processing, message.clone()))
            })
            .await
            .map_err(|e| HandlerError::transient(format!("cannot record progress: {e}")))?;
        match stored.status {
            JobStatus::Processing => Ok(()),
            status => {
                if status == JobStatus::Canceled {
                    self.inner.canceled.cancel();
                }
                Err(HandlerError::permanent(format!(
                    "job {} is {status}; progress not recorded",
                    self.job_id()
                )))
            }
        }
    }
}

/// `cur` with a new status and message, updated now.
fn changed(cur: &JobState, status: JobStatus, message: String) -> JobState {
    JobState {
        status,
        message,
        updated_at: Utc::now(),
        ..cur.clone()
    }
}

/// Why a job's state could not be read or written.
#[derive(Debug, thiserror::Error)]
enum StateError {
    #[error("cannot read the job state: {0}")]
    Read(#[from] kv::EntryError),
    #[error("the job state is not a JobState: {0}")]
    Unreadable(#[from] serde_json::Error),
    #[error(transparent)]
    Write(#[from] hookbus_kit::jobs::CasError<std::convert::Infallible>),
}

/// A job's entry in the jobs bucket; every write is a compare-and-set.
#[derive(Clone)]
struct JobCell {
    kv: kv::Store,
    key: String,
    /// Job id, plugin and task, for an entry that has to be created.
    seed: JobState,
}

impl JobCell {
    fn new(kv: kv::Store, request: &JobRequest) -> Self {
        JobCell {
            kv,
            key: JobState::key(&request.plugin, request.job_id),
            seed: JobState {
                job_id: request.job_id,
                plugin: request.plugin.clone(),
                task: request.task.clone(),
                status: JobStatus::Preparing,
                message: String::new(),
                updated_at: Utc::now(),
            },
        }
    }

    /// The stored state and its revision, if any.
    async fn entry(&self) -> Result<Option<(u64, JobState)>, StateError> {
        match self.kv.entry(self.key.as_str()).await? {
            Some(entry) if entry.operation == Operation::Put => Ok(Some((
                entry.revision,
                serde_json::from_slice(&entry.value)?,
            ))),
            _ => Ok(None),
        }
    }

    /// The stored state, if any.
    async fn read(&self) -> Result<Option<JobState>, StateError> {
        Ok(self.entry().await?.map(|(_, state)| state))
    }

    /// Writes `next(current)` by compare-and-set ([`hookbus_kit::jobs::update`]),
    /// re-reading after a conflict, until it sticks or `next` gives `None` (keep
    /// the current state). A missing entry is created PREPARING first. Gives the
    /// state stored in the end.
    async fn update(
        &self,
        next: impl Fn(&JobState) -> Option<JobState>,
    ) -> Result<JobState, StateError> {
        let seed = JobState {
            updated_at: Utc::now(),
            ..self.seed.clone()
        };
        let stored = hookbus_kit::jobs::update(&self.kv, &self.key, Some(&seed), |current| {
            Ok::<_, std::convert::Infallible>(next(current))
        })
        .await?;
        Ok(stored.unwrap_or(seed))
    }
}

/// The job worker of a served plugin.
#[derive(Debug)]
pub(crate) struct JobWorker {
    /// Stops pulling new jobs.
    stop: CancellationToken,
    /// Stops running jobs and hands them back to the queue.
    abort: CancellationToken,
    puller: Option<JoinHandle<()>>,
    jobs: TaskTracker,
}

/// What the worker shares with every job it runs.
struct Worker {
    plugin: Plugin,
    kv: kv::Store,
    abort: CancellationToken,
    /// `pagoda.jobs.{plugin}.{task}`: the jobs' subject template (span names).
    job_template: String,
}

/// Opens the jobs bucket and the plugin's consumer, waiting up to `wait` for
/// the bus to create them, and starts pulling jobs.
pub(crate) async fn start(
    client: &async_nats::Client,
    plugin: &Plugin,
    subjects: &Subjects,
    concurrency: usize,
    wait: Duration,
) -> Result<JobWorker, ServeError> {
    let id = plugin.id();
    let started = Instant::now();
    let deadline = started + wait;
    let js = jetstream::new(client.clone());
    let bucket = subjects.jobs_bucket();
    let stream = subjects.jobs_stream();
    let durable = format!("jobs-{id}");
    let concurrency = concurrency.max(1);
    let config = pull::Config {
        durable_name: Some(durable.clone()),
        description: Some(format!("jobs of plugin {id}")),
        filter_subject: subjects.plugin_jobs(id),
        ack_policy: AckPolicy::Explicit,
        ack_wait: JOB_ACK_WAIT,
        max_ack_pending: i64::try_from(concurrency).unwrap_or(i64::MAX),
        ..Default::default()
    };
    let (kv, consumer) = loop {
        let opened = async {
            let kv = js
                .get_key_value(&bucket)
                .await
                .map_err(|e| (format!("open the jobs bucket '{bucket}'"), e.into()))?;
            let consumer: PullConsumer = js
                .create_consumer_on_stream(config.clone(), stream.as_str())
                .await
                .map_err(|e| {
                    (
                        format!("create consumer '{durable}' on stream '{stream}'"),
                        e.into(),
                    )
                })?;
            Ok::<_, (String, async_nats::Error)>((kv, consumer))
        };
        match opened.await {
            Ok(opened) => break opened,
            Err((what, source)) => {
                if Instant::now() >= deadline {
                    return Err(ServeError::Jobs {
                        plugin: id.to_owned(),
                        what: format!(
                            "{what} (waited {:?} for the bus to create stream '{stream}' and bucket '{bucket}': is `hookbus run` up, and up to date?)",
                            started.elapsed()
                        ),
                        source,
                    });
                }
                debug!(error = %source, "{what}; waiting for the bus");
                let next = (Instant::now() + crate::serve::REGISTRY_POLL).min(deadline);
                tokio::time::sleep_until(next).await;
            }
        }
    };
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let jobs = TaskTracker::new();
    let worker = Arc::new(Worker {
        plugin: plugin.clone(),
        kv,
        abort: abort.clone(),
        job_template: subjects.job("{plugin}", "{task}"),
    });
    let puller = tokio::spawn(pull_loop(
        consumer,
        worker,
        Arc::new(Semaphore::new(concurrency)),
        jobs.clone(),
        stop.clone(),
    ));
    info!(plugin = %id, consumer = %durable, stream = %stream, concurrency, "job worker started");
    Ok(JobWorker {
        stop,
        abort,
        puller: Some(puller),
        jobs,
    })
}

impl JobWorker {
    /// Jobs running now.
    pub(crate) fn in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Stops pulling new jobs; running ones go on.
    pub(crate) fn stop_pulling(&self) {
        self.stop.cancel();
    }

    /// Stops pulling, waits for running jobs until `deadline`, then stops the
    /// rest and hands them back to the queue.
    pub(crate) async fn shutdown(&mut self, plugin: &str, deadline: Instant) {
        self.stop.cancel();
        if let Some(puller) = self.puller.take()
            && tokio::time::timeout_at(deadline, puller).await.is_err()
        {
            warn!(
                plugin,
                "the job puller did not stop within the grace period"
            );
        }
        self.jobs.close();
        if tokio::time::timeout_at(deadline, self.jobs.wait())
            .await
            .is_err()
        {
            warn!(
                plugin,
                running = self.jobs.len(),
                "jobs still running after the grace period are stopped and handed back to the queue"
            );
            self.abort.cancel();
            let _ = tokio::time::timeout(ABORT_WAIT, self.jobs.wait()).await;
        }
    }

    /// Stops pulling and every running job at once.
    pub(crate) fn abandon(&mut self) {
        self.stop.cancel();
        self.abort.cancel();
    }
}

/// Pulls one job per free slot and runs each in its own tracked task.
async fn pull_loop(
    consumer: PullConsumer,
    worker: Arc<Worker>,
    limit: Arc<Semaphore>,
    jobs: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            // The semaphore is never closed.
            permit = limit.clone().acquire_owned() => permit.ok(),
        };
        let next = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            next = next_job(&consumer) => next,
        };
        match next {
            Ok(Some(message)) => {
                jobs.spawn(run_job(worker.clone(), message, permit));
            }
            Ok(None) => {}
            Err(e) => {
                warn!(plugin = %worker.plugin.id(), error = %e, "pulling the next job failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(PULL_RETRY) => {}
                }
            }
        }
    }
}

/// The next queued job, or `None` when none came within [`PULL_EXPIRES`].
async fn next_job(
    consumer: &PullConsumer,
) -> Result<Option<jetstream::Message>, async_nats::Error> {
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(PULL_EXPIRES)
        .messages()
        .await?;
    batch.next().await.transpose()
}

/// What becomes of a job message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Handled: acknowledge it (and wait for the server to confirm).
    Ack,
    /// Unreadable: never deliver it again.
    Term,
    /// Hand it back, to be delivered again after the delay.
    Nak(Option<Duration>),
}

/// Runs one job message and settles it.
async fn run_job(
    worker: Arc<Worker>,
    message: jetstream::Message,
    _permit: Option<OwnedSemaphorePermit>,
) {
    // With traces exported, a CONSUMER span (`process pagoda.jobs.{plugin}.{task}`),
    // a child of the host's PRODUCER span whose context the message carries,
    // and linked to it.
    let span = tracing::info_span!(
        "plugin.job",
        otel.name = %format_args!("process {}", worker.job_template),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination = %message.subject,
        messaging.destination.name = %message.subject,
        messaging.destination.template = %worker.job_template,
        plugin = %worker.plugin.id(),
        job_id = tracing::field::Empty,
        task = tracing::field::Empty,
    );
    hookbus_kit::trace::follow_and_link_message(&span, message.headers.as_ref());
    async {
        let settle = match serde_json::from_slice::<JobRequest>(&message.payload) {
            Err(e) => worker.unreadable(&message.payload, &e).await,
            Ok(request) if request.plugin != worker.plugin.id() => {
                error!(for_plugin = %request.plugin, "job request is for another plugin; terminated");
                Settle::Term
            }
            Ok(request) => {
                let span = tracing::Span::current();
                span.record("job_id", request.job_id);
                span.record("task", request.task.as_str());
                let job = JobCell::new(worker.kv.clone(), &request);
                match worker.run(&job, request, &message).await {
                    Ok(settle) => settle,
                    Err(e) => {
                        error!(error = %e, "job state unavailable; the job is handed back");
                        Settle::Nak(Some(STATE_RETRY))
                    }
                }
            }
        };
        let settled = match settle {
            Settle::Ack => message.double_ack().await,
            Settle::Term => message.ack_with(AckKind::Term).await,
            Settle::Nak(delay) => message.ack_with(AckKind::Nak(delay)).await,
        };
        if let Err(e) = settled {
            warn!(error = %e, ?settle, "could not settle the job message");
        }
    }
    .instrument(span)
    .await;
}

/// The parts of a job request that name its job, read even when the rest of
/// the request cannot be (serde_json skips the other fields without a depth
/// limit).
#[derive(serde::Deserialize)]
struct JobHead {
    job_id: i64,
    plugin: String,
    task: String,
}

impl Worker {
    /// A job request that is not a readable [`JobRequest`] (its parameters nest
    /// deeper than serde_json reads, a field has the wrong type): when it still
    /// names a job of this plugin, that job ends in ERROR with the reason, so it
    /// does not stay PREPARING; the message is terminated either way.
    async fn unreadable(&self, payload: &[u8], e: &serde_json::Error) -> Settle {
        let reason = format!("the job request cannot be read: {e}");
        let head = match serde_json::from_slice::<JobHead>(payload) {
            Ok(head) if head.plugin == self.plugin.id() => head,
            _ => {
                error!(error = %e, "job request is not a JobRequest; terminated");
                return Settle::Term;
            }
        };
        let span = tracing::Span::current();
        span.record("job_id", head.job_id);
        span.record("task", head.task.as_str());
        let job = JobCell::new(
            self.kv.clone(),
            &JobRequest {
                job_id: head.job_id,
                plugin: head.plugin,
                task: head.task,
                operation: 0,
                params: serde_json::Value::Null,
                user: None,
                created_at: Utc::now(),
            },
        );
        let written = job
            .update(|cur| {
                cur.status
                    .can_become(JobStatus::Error)
                    .then(|| changed(cur, JobStatus::Error, reason.clone()))
            })
            .await;
        match written {
            Ok(stored) => {
                error!(error = %e, status = %stored.status, "job request cannot be read; the job ends in ERROR and its message is terminated");
                Settle::Term
            }
            Err(state) => {
                error!(error = %e, state_error = %state, "job request cannot be read and the job state cannot be written; the job is handed back");
                Settle::Nak(Some(STATE_RETRY))
            }
        }
    }

    /// Claims the job, runs its task and writes the outcome.
    async fn run(
        &self,
        job: &JobCell,
        request: JobRequest,
        message: &jetstream::Message,
    ) -> Result<Settle, StateError> {
        let manifest = self.plugin.manifest();
        let Some(index) = manifest.tasks.iter().position(|t| t.name == request.task) else {
            let text = format!("plugin '{}' has no task '{}'", manifest.id, request.task);
            let stored = job
                .update(|cur| {
                    cur.status
                        .can_become(JobStatus::Error)
                        .then(|| changed(cur, JobStatus::Error, text.clone()))
                })
                .await?;
            warn!(status = %stored.status, "{text}");
            return Ok(Settle::Ack);
        };
        let spec = &manifest.tasks[index];
        let claimed = job
            .update(|cur| {
                cur.status.can_become(JobStatus::Processing).then(|| {
                    let note = if cur.status == JobStatus::Processing {
                        "restarted"
                    } else {
                        "started"
                    };
                    changed(cur, JobStatus::Processing, note.to_owned())
                })
            })
            .await?;
        if claimed.status != JobStatus::Processing {
            info!(status = %claimed.status, "job already finished; not run");
            return Ok(Settle::Ack);
        }
        info!(note = %claimed.message, "job running");

        let canceled = CancellationToken::new();
        let ctx = TaskContext {
            inner: Arc::new(ContextInner {
                request,
                job: job.clone(),
                signal: canceled.child_token(),
                canceled: canceled.clone(),
            }),
            state: (),
        };
        let call = (self.plugin.inner.tasks[index])(ctx);
        let Some(joined) = self
            .watch(
                job,
                spec,
                message,
                &canceled,
                tokio::spawn(call.in_current_span()),
            )
            .await
        else {
            warn!("job stopped at shutdown; handed back to the queue");
            return Ok(Settle::Nak(None));
        };
        let (status, text) = match joined {
            Ok(Ok(TaskOutcome::Done(text))) => (JobStatus::Done, text),
            Ok(Ok(TaskOutcome::Warning(text))) => (JobStatus::Warning, text),
            Ok(Err(e)) => (JobStatus::Error, e.reply_text()),
            Err(join) if join.is_panic() => (
                JobStatus::Error,
                format!(
                    "task panicked: {}",
                    crate::serve::panic_text(join.into_panic().as_ref())
                ),
            ),
            Err(_) => (JobStatus::Error, "task was stopped".to_owned()),
        };
        let mut attempt = 1;
        let stored = loop {
            let written = job
                .update(|cur| {
                    cur.status
                        .can_become(status)
                        .then(|| changed(cur, status, text.clone()))
                })
                .await;
            match written {
                Ok(stored) => break stored,
                Err(e) if attempt < FINISH_ATTEMPTS => {
                    warn!(error = %e, attempt, "cannot write the job's outcome; trying again");
                    attempt += 1;
                    tokio::time::sleep(PULL_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        };
        if stored.status == status {
            info!(status = %status, message = %text, "job finished");
        } else {
            info!(status = %stored.status, outcome = %status, "job finished after it ended otherwise; its outcome is dropped");
        }
        Ok(Settle::Ack)
    }

    /// Waits for the task, meanwhile extending the message's ack deadline,
    /// writing heartbeats and watching for a cancel. `None` when the worker
    /// stopped it (shutdown grace expired).
    async fn watch(
        &self,
        job: &JobCell,
        spec: &TaskSpec,
        message: &jetstream::Message,
        canceled: &CancellationToken,
        mut call: JoinHandle<TaskResult>,
    ) -> Option<Result<TaskResult, tokio::task::JoinError>> {
        let every = heartbeat_every(spec);
        let mut beat = tokio::time::interval_at(Instant::now() + every, every);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval_at(Instant::now() + CANCEL_POLL, CANCEL_POLL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                joined = &mut call => return Some(joined),
                () = self.abort.cancelled() => {
                    call.abort();
                    return None;
                }
                _ = poll.tick(), if !canceled.is_cancelled() => {
                    if let Ok(Some(state)) = job.read().await
                        && state.status == JobStatus::Canceled
                    {
                        info!("job cancelled");
                        canceled.cancel();
                    }
                }
                _ = beat.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        warn!(error = %e, "cannot extend the job message's ack deadline");
                    }
                    let beat = job
                        .update(|cur| {
                            (cur.status == JobStatus::Processing)
                                .then(|| changed(cur, JobStatus::Processing, cur.message.clone()))
                        })
                        .await;
                    match beat {
                        Ok(state) if state.status == JobStatus::Canceled => canceled.cancel(),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "cannot write the job's heartbeat"),
                    }
                }
            }
        }
    }
}

/// Heartbeats come every [`HEARTBEAT`], or every third of the task's
/// `timeout_secs` when that is shorter (at least every second).
fn heartbeat_every(spec: &TaskSpec) -> Duration {
    if spec.timeout_secs == 0 {
        return HEARTBEAT;
    }
    (Duration::from_secs(spec.timeout_secs) / 3).clamp(Duration::from_secs(1), HEARTBEAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn done(_ctx: TaskContext) -> TaskResult {
        Ok(TaskOutcome::done("ok"))
    }

    #[test]
    fn tasks_are_declared_with_their_options() {
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .task(
                Task::named("count")
                    .description("Counts")
                    .not_cancellable()
                    .timeout(Duration::from_millis(1500)),
                0,
                done,
            )
            .task("export", 3, done)
            .build()
            .expect("valid plugin");
        let tasks = &plugin.manifest().tasks;
        assert_eq!(tasks[0].name, "count");
        assert_eq!(tasks[0].description, "Counts");
        assert!(!tasks[0].cancellable);
        assert_eq!(tasks[0].timeout_secs, 2);
        assert_eq!(tasks[1].offset, 3);
        assert!(tasks[1].cancellable);
        assert_eq!(tasks[1].timeout_secs, 0);
        assert_eq!(plugin.inner.tasks.len(), 2);
    }

    #[test]
    fn bad_tasks_are_reported() {
        let err = Plugin::builder("p", "P", "1.0.0")
            .task("bad name", 9800, done)
            .task("t", 1, done)
            .task("t", 2, done)
            .build()
            .expect_err("invalid plugin");
        let msg = err.to_string();
        for needle in [
            "offset 9800 is larger than 9799",
            "task 't': the name is used by another task",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
    }

    #[test]
    fn heartbeats_come_often_enough_for_the_timeout() {
        let mut spec = TaskSpec::new("t", 0);
        assert_eq!(heartbeat_every(&spec), HEARTBEAT);
        spec.timeout_secs = 12;
        assert_eq!(heartbeat_every(&spec), Duration::from_secs(4));
        spec.timeout_secs = 1;
        assert_eq!(heartbeat_every(&spec), Duration::from_secs(1));
        spec.timeout_secs = 600;
        assert_eq!(heartbeat_every(&spec), HEARTBEAT);
    }
}
