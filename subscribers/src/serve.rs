//! Serving a plugin: one NATS service, one endpoint per handler and per API
//! route, registration in the registry bucket, the job worker of its tasks,
//! bounded concurrency and graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind, KeyValueErrorKind};
use async_nats::service::endpoint::Endpoint;
use async_nats::service::{Request, Service, ServiceExt};
use bytes::Bytes;
use core_events::protocol::HandlerReply;
use core_events::{HandlerSpec, Subjects};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::api::RouteSlot;
use crate::context::{self, EventContext};
use crate::error::{HandlerError, ServeError, one_line};
use crate::plugin::{HandlerFn, NotificationCall, Plugin};
use crate::replay::{self, CatchUpGate, Live, ReplayError, ReplayFrom, ReplayProgress};
use crate::task::{DEFAULT_TASK_CONCURRENCY, JobWorker};

/// Default wait for the registry bucket to appear.
pub const DEFAULT_REGISTRY_WAIT: Duration = Duration::from_secs(30);
/// How often the SDK looks for the registry bucket while waiting.
pub const REGISTRY_POLL: Duration = Duration::from_millis(250);
/// Default number of handler calls running at once in one plugin process.
pub const DEFAULT_MAX_CONCURRENCY: usize = 64;
/// Default time [`RunningPlugin::shutdown`] gives running handlers to finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default wait, before a replay, for the bus to route to the plugin.
pub const DEFAULT_REPLAY_BUS_WAIT: Duration = Duration::from_secs(10);

/// How to serve a plugin.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The deployment's subject namespace: endpoint subjects and the registry
    /// bucket name derive from its prefix (default `pagoda`).
    pub subjects: Subjects,
    /// How long to wait for the registry bucket, which the bus creates, before
    /// giving up (default 30 s), so plugins may start before the bus; the job
    /// worker of a plugin with tasks waits as long for the jobs stream and bucket.
    pub registry_wait: Duration,
    /// Most handler calls running at once in this process, over all handlers
    /// (default 64); further requests wait in the subscription buffer.
    pub max_concurrency: usize,
    /// How long shutdown waits for running handler calls (default 10 s).
    pub shutdown_grace: Duration,
    /// Rebuild state before serving live events: replay the stored events from
    /// this position through the handlers, then go on live without a gap or a
    /// duplicate (see [`crate::replay`]). Default `None`: live events only.
    pub replay: Option<ReplayFrom>,
    /// With `replay`: how long to wait for the running bus to route to this
    /// plugin before replaying anyway (default 10 s).
    pub replay_bus_wait: Duration,
    /// Bootstrap before serving live events: run the handlers over the latest
    /// stored event of every object, then go on live without a gap or a
    /// duplicate (see [`crate::backfill`]); waits for the bus to route to the
    /// plugin as a replay does ([`replay_bus_wait`](Self::replay_bus_wait)).
    /// Default `false`. Not with [`replay`](Self::replay)
    /// ([`ReplayError::BackfillWithReplay`]).
    pub backfill: bool,
    /// Most jobs of the plugin's tasks running at once (default 4): the
    /// `max_ack_pending` of the jobs consumer the replicas share, so the limit
    /// holds over all of them (see [`crate::task`]).
    pub task_concurrency: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            subjects: Subjects::default(),
            registry_wait: DEFAULT_REGISTRY_WAIT,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            replay: None,
            replay_bus_wait: DEFAULT_REPLAY_BUS_WAIT,
            backfill: false,
            task_concurrency: DEFAULT_TASK_CONCURRENCY,
        }
    }
}

/// A plugin being served; [`RunningPlugin::shutdown`] stops it gracefully.
///
/// Dropping it without `shutdown` stops taking requests at once and leaves
/// running handler calls to finish on their own.
#[derive(Debug)]
pub struct RunningPlugin {
    plugin_id: String,
    /// The connection, flushed at the end of a shutdown so that the server has
    /// dropped the endpoints' subscriptions when it returns.
    client: async_nats::Client,
    /// The Services API service; stopped last so `$SRV.STATS` answers while draining.
    service: Option<Service>,
    /// Tells the endpoint loops to stop taking requests.
    stop_taking: CancellationToken,
    /// One loop per endpoint: pulls requests and spawns handler calls.
    endpoint_loops: Vec<JoinHandle<()>>,
    /// Every handler call in flight.
    calls: TaskTracker,
    grace: Duration,
    /// The catch-up replay, when one was asked for.
    replay: Option<ReplayTask>,
    /// The job worker, when the plugin has tasks.
    jobs: Option<JobWorker>,
}

/// A plugin's catch-up replay, running beside its endpoints.
#[derive(Debug)]
struct ReplayTask {
    gate: Arc<CatchUpGate>,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<ReplayProgress, ReplayError>>>,
}

/// What an endpoint does with one request it takes.
type ServeCall = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl Plugin {
    /// Serves the plugin on `client`: starts the service and its endpoints (hook
    /// handlers and API routes), registers the manifest in the registry bucket
    /// (waiting for the bus to create it), then starts the job worker when the
    /// plugin has tasks. Call it once per replica; replicas share the work.
    ///
    /// # Errors
    ///
    /// [`ServeError::StartService`] / [`ServeError::AddEndpoint`] when NATS refuses
    /// the service; [`ServeError::RegistryMissing`] when the registry bucket does not
    /// appear within [`ServeOptions::registry_wait`]; [`ServeError::Registry`] and
    /// [`ServeError::Register`] when it cannot be read or written;
    /// [`ServeError::Jobs`] when the plugin has tasks and the jobs stream or bucket
    /// does not appear within [`ServeOptions::registry_wait`], or the consumer
    /// cannot be created; [`ServeError::Replay`] when
    /// [`ServeOptions::replay`] asks for a replay that cannot start (a position the
    /// stream no longer holds, no events stream). Nothing keeps running after an
    /// error.
    ///
    /// With [`ServeOptions::replay`], it returns once the catch-up has started;
    /// [`RunningPlugin::wait_caught_up`] waits for its end.
    pub async fn serve(
        &self,
        client: async_nats::Client,
        options: ServeOptions,
    ) -> Result<RunningPlugin, ServeError> {
        let manifest = &self.inner.manifest;
        let plugin_id: Arc<str> = manifest.id.as_str().into();
        if let (true, Some(from)) = (options.backfill, options.replay) {
            return Err(ServeError::Replay(ReplayError::BackfillWithReplay(from)));
        }
        let gate =
            (options.replay.is_some() || options.backfill).then(|| Arc::new(CatchUpGate::new()));
        let service = client
            .service_builder()
            .queue_group(&manifest.id)
            .description(&manifest.description)
            .metadata(HashMap::from([
                ("plugin_name".to_owned(), manifest.name.clone()),
                (
                    "sdk".to_owned(),
                    format!("pagoda-plugin-sdk/{}", env!("CARGO_PKG_VERSION")),
                ),
            ]))
            .start(&manifest.id, &manifest.version)
            .await
            .map_err(|source| ServeError::StartService {
                plugin: manifest.id.clone(),
                source,
            })?;

        let mut endpoints: Vec<(Endpoint, ServeCall)> =
            Vec::with_capacity(manifest.handlers.len() + manifest.api.len());
        let handlers = manifest.handlers.iter().zip(&self.inner.handlers);
        let routes = manifest.api.iter().zip(&self.inner.routes);
        let declared = handlers
            .map(|(spec, handler)| {
                let subject = options.subjects.handler(&manifest.id, &spec.name);
                let slot = Arc::new(Slot {
                    plugin_id: plugin_id.clone(),
                    handler_name: spec.name.as_str().into(),
                    spec: spec.clone(),
                    handler: handler.clone(),
                    subject: subject.clone(),
                    gate: gate.clone(),
                });
                let serve: ServeCall =
                    Arc::new(move |request| Box::pin(handle(request, slot.clone())));
                (&spec.name, subject, endpoint_metadata(spec), serve)
            })
            .chain(routes.map(|(spec, call)| {
                let subject = options.subjects.api(&manifest.id, &spec.name);
                let slot = Arc::new(RouteSlot {
                    plugin_id: plugin_id.clone(),
                    spec: spec.clone(),
                    call: call.clone(),
                    subject: subject.clone(),
                });
                let serve: ServeCall =
                    Arc::new(move |request| Box::pin(crate::api::handle(request, slot.clone())));
                (&spec.name, subject, route_metadata(spec), serve)
            }));
        for (name, subject, metadata, serve) in declared {
            let added = service
                .endpoint_builder()
                .name(name)
                .metadata(metadata)
                .add(&subject)
                .await;
            match added {
                Ok(endpoint) => endpoints.push((endpoint, serve)),
                Err(source) => {
                    let _stopped = service.stop().await;
                    return Err(ServeError::AddEndpoint {
                        handler: name.clone(),
                        subject,
                        source,
                    });
                }
            }
        }

        let limit = Arc::new(Semaphore::new(options.max_concurrency.max(1)));
        let stop_taking = CancellationToken::new();
        let calls = TaskTracker::new();
        let endpoint_loops = endpoints
            .into_iter()
            .map(|(endpoint, serve)| {
                tokio::spawn(endpoint_loop(
                    endpoint,
                    serve,
                    limit.clone(),
                    calls.clone(),
                    stop_taking.clone(),
                ))
            })
            .collect();
        let mut running = RunningPlugin {
            plugin_id: manifest.id.clone(),
            client: client.clone(),
            service: Some(service),
            stop_taking,
            endpoint_loops,
            calls,
            grace: options.shutdown_grace,
            replay: None,
            jobs: None,
        };
        // The server must know the subscriptions before the bus sees the manifest.
        if let Err(e) = client.flush().await {
            running.abandon().await;
            return Err(ServeError::StartService {
                plugin: manifest.id.clone(),
                source: e.into(),
            });
        }
        let revision = match register(&client, self, &options).await {
            Ok(revision) => revision,
            Err(e) => {
                running.abandon().await;
                return Err(e);
            }
        };
        if !manifest.tasks.is_empty() {
            let worker = crate::task::start(
                &client,
                self,
                &options.subjects,
                options.task_concurrency,
                options.registry_wait,
            )
            .await;
            match worker {
                Ok(worker) => running.jobs = Some(worker),
                Err(e) => {
                    running.abandon().await;
                    return Err(e);
                }
            }
        }
        if let Some(gate) = gate {
            match self
                .start_catch_up(&client, &options, options.replay, revision, gate)
                .await
            {
                Ok(task) => running.replay = Some(task),
                Err(e) => {
                    running.abandon().await;
                    return Err(ServeError::Replay(e));
                }
            }
        }
        info!(
            plugin = %manifest.id,
            version = %manifest.version,
            handlers = manifest.handlers.len(),
            api_routes = manifest.api.len(),
            tasks = manifest.tasks.len(),
            registry = %options.subjects.registry_bucket(),
            "plugin registered and serving"
        );
        Ok(running)
    }

    /// Waits for the bus to route to this manifest revision, opens the replay
    /// consumer (checking the start position; `None`: the backfill consumer) and
    /// spawns the catch-up.
    async fn start_catch_up(
        &self,
        client: &async_nats::Client,
        options: &ServeOptions,
        from: Option<ReplayFrom>,
        revision: u64,
        gate: Arc<CatchUpGate>,
    ) -> Result<ReplayTask, ReplayError> {
        let subjects = &options.subjects;
        replay::wait_for_routing(
            client,
            subjects,
            self.id(),
            revision,
            options.replay_bus_wait,
        )
        .await;
        let runner = self.runner(client, subjects);
        let stop = CancellationToken::new();
        let Some(from) = from else {
            let opened = self.open_backfill(&runner, subjects).await?;
            let handle = tokio::spawn(crate::backfill::backfill_then_catch_up(
                runner,
                opened,
                gate.clone(),
                stop.clone(),
            ));
            return Ok(ReplayTask {
                gate,
                stop,
                handle: Some(handle),
            });
        };
        let filters = replay::handler_filter_subjects(subjects, &self.inner.manifest.handlers)?;
        let events = replay::open(&runner.js, subjects, from, filters, false).await?;
        let handle = tokio::spawn(replay::catch_up(runner, events, gate.clone(), stop.clone()));
        Ok(ReplayTask {
            gate,
            stop,
            handle: Some(handle),
        })
    }

    /// Serves the plugin until `shutdown` completes, then shuts down gracefully.
    /// A shutdown while still waiting for the registry bucket gives up serving
    /// at once (and returns `Ok`). With [`ServeOptions::replay`], a catch-up that
    /// cannot go on stops the plugin with [`ServeError::Replay`].
    ///
    /// # Errors
    ///
    /// As [`Plugin::serve`] and [`RunningPlugin::shutdown`].
    pub async fn serve_until(
        &self,
        client: async_nats::Client,
        options: ServeOptions,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut running = tokio::select! {
            served = self.serve(client, options) => served?,
            () = &mut shutdown => {
                info!(plugin = %self.id(), "shutdown requested before the plugin was registered");
                return Ok(());
            }
        };
        let failed = tokio::select! {
            () = &mut shutdown => None,
            progress = running.wait_caught_up_or_failed() => match progress {
                Some(ReplayProgress { error: Some(_), .. }) => running.take_replay_error().await,
                _ => {
                    shutdown.await;
                    None
                }
            },
        };
        let stopped = running.shutdown().await;
        match failed {
            Some(e) => Err(ServeError::Replay(e)),
            None => stopped,
        }
    }
}

impl RunningPlugin {
    /// The plugin id.
    pub fn plugin_id(&self) -> &str {
        &self.plugin_id
    }

    /// Handler calls (hooks and API routes) running now.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Jobs of the plugin's tasks running now in this process.
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.as_ref().map_or(0, JobWorker::in_flight)
    }

    /// The catch-up replay's progress, live (`None` when
    /// [`ServeOptions::replay`] was not set).
    pub fn replay_progress(&self) -> Option<watch::Receiver<ReplayProgress>> {
        self.replay.as_ref().map(|r| r.gate.subscribe())
    }

    /// Waits until the catch-up replay is over: caught up
    /// ([`ReplayProgress::caught_up`]), or stopped by an error
    /// ([`ReplayProgress::error`]). `None` when [`ServeOptions::replay`] was not
    /// set.
    pub async fn wait_caught_up(&self) -> Option<ReplayProgress> {
        let mut rx = self.replay_progress()?;
        let progress = rx
            .wait_for(|p| p.caught_up || p.error.is_some())
            .await
            .map(|p| p.clone())
            .ok();
        progress.or_else(|| self.replay.as_ref().map(|r| r.gate.progress()))
    }

    /// As [`wait_caught_up`](Self::wait_caught_up), but pending forever without a replay.
    async fn wait_caught_up_or_failed(&self) -> Option<ReplayProgress> {
        match self.wait_caught_up().await {
            Some(progress) => Some(progress),
            None => std::future::pending().await,
        }
    }

    /// The catch-up's error, once it has failed.
    async fn take_replay_error(&mut self) -> Option<ReplayError> {
        let handle = self.replay.as_mut()?.handle.take()?;
        match handle.await {
            Ok(Err(e)) => Some(e),
            _ => None,
        }
    }

    /// Stops gracefully: stops taking requests (unsubscribes every endpoint) and
    /// jobs, runs the requests already received, waits for running handler calls
    /// to reply and for running jobs to finish, then stops the service. Jobs still
    /// running after [`ServeOptions::shutdown_grace`] are stopped and handed back
    /// to the queue at once, for another replica (tasks run at least once). The
    /// manifest stays in the registry: the plugin may come back and the bus keeps
    /// its deliveries. Afterwards the caller may `drain()` the client.
    ///
    /// # Errors
    ///
    /// [`ServeError::GraceExpired`] when handler calls are still running after
    /// [`ServeOptions::shutdown_grace`]; they are left to finish on their own.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        let deadline = Instant::now() + self.grace;
        info!(
            plugin = %self.plugin_id,
            in_flight = self.calls.len(),
            jobs = self.jobs_in_flight(),
            "plugin shutting down"
        );
        self.stop_taking.cancel();
        if let Some(jobs) = &self.jobs {
            jobs.stop_pulling();
        }
        if let Some(replay) = self.replay.as_mut() {
            replay.stop.cancel();
            if let Some(handle) = replay.handle.take()
                && tokio::time::timeout_at(deadline, handle).await.is_err()
            {
                warn!(plugin = %self.plugin_id, "the replay did not stop within the grace period");
            }
        }
        for handle in &mut self.endpoint_loops {
            if tokio::time::timeout_at(deadline, &mut *handle)
                .await
                .is_err()
            {
                handle.abort();
            }
        }
        self.calls.close();
        let drained = tokio::time::timeout_at(deadline, self.calls.wait()).await;
        if let Some(jobs) = self.jobs.as_mut() {
            jobs.shutdown(&self.plugin_id, deadline).await;
        }
        if let Some(service) = self.service.take() {
            // Stopping only signals tasks; it cannot fail in practice.
            if let Err(e) = service.stop().await {
                warn!(plugin = %self.plugin_id, error = %e, "stopping the service failed");
            }
        }
        // The unsubscriptions went out with the endpoints; a flush returns once
        // the server has them, so a request sent after `shutdown` finds no
        // responder instead of a subscription that is going away.
        if tokio::time::timeout_at(
            deadline.max(Instant::now() + Duration::from_secs(1)),
            self.client.flush(),
        )
        .await
        .is_err()
        {
            warn!(plugin = %self.plugin_id, "the connection did not flush at shutdown");
        }
        match drained {
            Ok(()) => {
                info!(plugin = %self.plugin_id, "plugin stopped");
                Ok(())
            }
            Err(_) => Err(ServeError::GraceExpired {
                grace: self.grace,
                in_flight: self.calls.len(),
            }),
        }
    }

    /// Stops everything at once, for a `serve` that failed half-way.
    async fn abandon(&mut self) {
        self.stop_taking.cancel();
        if let Some(replay) = self.replay.take() {
            replay.stop.cancel();
        }
        if let Some(jobs) = self.jobs.as_mut() {
            jobs.abandon();
        }
        for handle in self.endpoint_loops.drain(..) {
            handle.abort();
        }
        if let Some(service) = self.service.take() {
            let _stopped = service.stop().await;
        }
    }
}

impl Drop for RunningPlugin {
    fn drop(&mut self) {
        self.stop_taking.cancel();
        if let Some(replay) = &self.replay {
            replay.stop.cancel();
        }
        if let Some(jobs) = &self.jobs {
            jobs.stop_pulling();
        }
        if let Some(service) = self.service.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _stopped = service.stop().await;
            });
        }
    }
}

fn endpoint_metadata(spec: &HandlerSpec) -> HashMap<String, String> {
    let entities = spec
        .entities
        .as_ref()
        .map_or_else(|| "*".to_owned(), |names| names.join(","));
    HashMap::from([
        ("hook".to_owned(), spec.hook.name().to_owned()),
        ("priority".to_owned(), spec.priority.to_string()),
        ("entities".to_owned(), entities),
        ("timeout_ms".to_owned(), spec.timeout_ms.to_string()),
    ])
}

fn route_metadata(spec: &core_events::ApiRouteSpec) -> HashMap<String, String> {
    HashMap::from([
        ("kind".to_owned(), "api".to_owned()),
        ("method".to_owned(), spec.method.clone()),
        ("path".to_owned(), spec.path.clone()),
        ("public".to_owned(), spec.public.to_string()),
        ("timeout_ms".to_owned(), spec.timeout_ms.to_string()),
    ])
}

/// Waits for the registry bucket and puts the manifest.
async fn register(
    client: &async_nats::Client,
    plugin: &Plugin,
    options: &ServeOptions,
) -> Result<u64, ServeError> {
    let manifest = &plugin.inner.manifest;
    let js = jetstream::new(client.clone());
    let bucket = options.subjects.registry_bucket();
    let started = Instant::now();
    let deadline = started + options.registry_wait;
    let store = loop {
        match js.get_key_value(&bucket).await {
            Ok(store) => break store,
            Err(e) if e.kind() == KeyValueErrorKind::GetBucket => {
                if Instant::now() >= deadline {
                    return Err(if bucket_is_missing(&e) {
                        ServeError::RegistryMissing {
                            bucket,
                            waited: started.elapsed(),
                        }
                    } else {
                        ServeError::Registry { bucket, source: e }
                    });
                }
                debug!(bucket = %bucket, error = %e, "waiting for the registry bucket");
                let next = (Instant::now() + REGISTRY_POLL).min(deadline);
                tokio::time::sleep_until(next).await;
            }
            Err(e) => return Err(ServeError::Registry { bucket, source: e }),
        }
    };
    let key = manifest.registry_key();
    store
        .put(&key, plugin.inner.manifest_json.clone())
        .await
        .map_err(|source| ServeError::Register {
            plugin: manifest.id.clone(),
            bucket,
            key,
            source,
        })
}

fn bucket_is_missing(err: &async_nats::jetstream::context::KeyValueError) -> bool {
    std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<GetStreamError>())
        .is_some_and(|e| match e.kind() {
            GetStreamErrorKind::JetStream(js) => {
                js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            }
            _ => false,
        })
}

/// One handler, as its endpoint loop (and the replay) sees it.
pub(crate) struct Slot {
    pub(crate) plugin_id: Arc<str>,
    pub(crate) handler_name: Arc<str>,
    pub(crate) spec: HandlerSpec,
    pub(crate) handler: HandlerFn,
    pub(crate) subject: String,
    /// The catch-up gate, while the plugin serves with a replay.
    pub(crate) gate: Option<Arc<CatchUpGate>>,
}

/// Pulls requests off one endpoint and runs each in its own tracked task, at
/// most `limit` at once in the process. On shutdown it unsubscribes, then runs
/// the requests already buffered.
async fn endpoint_loop(
    mut endpoint: Endpoint,
    serve: ServeCall,
    limit: Arc<Semaphore>,
    calls: TaskTracker,
    stop: CancellationToken,
) {
    let spawn = |request: Request, permit: Option<OwnedSemaphorePermit>| {
        let call = serve(request);
        calls.spawn(async move {
            call.await;
            drop(permit);
        });
    };
    loop {
        let request = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            next = endpoint.next() => match next {
                Some(request) => request,
                None => return,
            },
        };
        spawn(request, acquire(&limit).await);
    }
    if let Err(e) = endpoint.stop().await {
        debug!(error = %e, "unsubscribing the endpoint failed");
    }
    while let Some(request) = endpoint.next().await {
        spawn(request, acquire(&limit).await);
    }
}

async fn acquire(limit: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    // The semaphore is never closed, so this only fails if it were; then run unbounded.
    limit.clone().acquire_owned().await.ok()
}

/// Runs one delivery and replies.
async fn handle(request: Request, slot: Arc<Slot>) {
    // With traces exported, a SERVER span (`handle <plugin>.<handler>`), the child
    // of the bus's delivery attempt (or the host's sync-hook call) whose context
    // the request's `traceparent` carries.
    let span = tracing::info_span!(
        "hook.deliver",
        otel.name = %format_args!("handle {}.{}", slot.plugin_id, slot.handler_name),
        otel.kind = "server",
        messaging.system = "nats",
        messaging.destination = %slot.subject,
        messaging.destination.name = %slot.subject,
        plugin = %slot.plugin_id,
        handler = %slot.handler_name,
        hook = %slot.spec.hook,
        event_id = tracing::field::Empty,
        attempt = tracing::field::Empty,
    );
    hookbus_kit::trace::follow_message(&span, request.message.headers.as_ref());
    let traced = span.clone();
    async {
        let outcome = match &slot.handler {
            HandlerFn::Entry(f) => deliver(&slot, &request, f).await,
            HandlerFn::Entity(f) => deliver(&slot, &request, f).await,
            HandlerFn::Sync(f) => crate::sync::serve_sync(&slot, &request, f).await,
        };
        if let Err(err) = &outcome {
            if hookbus_kit::trace::enabled() {
                let kind = if err.code() < 500 {
                    "permanent_failure"
                } else {
                    "transient_failure"
                };
                hookbus_kit::trace::fail(&traced, kind, &err.reply_text());
            }
            warn!(
                plugin = %slot.plugin_id,
                handler = %slot.handler_name,
                code = err.code(),
                error = %err.reply_text(),
                "handler failed"
            );
        }
        respond(&request, outcome).await;
    }
    .instrument(span)
    .await;
}

/// Replies with the body, or with a Services API error (`Nats-Service-Error`:
/// the error's text and causes, `Nats-Service-Error-Code`: its code).
pub(crate) async fn respond(request: &Request, outcome: Result<Bytes, HandlerError>) {
    let response = outcome.map_err(|err| async_nats::service::error::Error {
        status: err.reply_text(),
        code: usize::from(err.code()),
    });
    if let Err(e) = request.respond(response).await {
        warn!(error = %e, "could not send the reply");
    }
}

/// Runs a handler's future in the current task with the handler guards: a
/// panic, and a call running past `timeout` (then dropped), become transient
/// errors.
pub(crate) async fn guarded<T>(
    call: impl Future<Output = Result<T, HandlerError>>,
    timeout: Duration,
) -> Result<T, HandlerError> {
    use futures::FutureExt as _;
    let call = std::panic::AssertUnwindSafe(call).catch_unwind();
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(HandlerError::transient(format!(
            "handler panicked: {}",
            panic_text(panic.as_ref())
        ))),
        Err(_) => Err(HandlerError::transient(format!(
            "handler timed out after {} ms",
            timeout.as_millis()
        ))),
    }
}

/// Decodes the delivery, applies the entity filter and calls the handler in its
/// own task, so a panic becomes a 500 reply, not a dead plugin. A call running
/// past the handler's `timeout_ms` is aborted and answered with a 500.
async fn deliver<D>(
    slot: &Slot,
    request: &Request,
    f: &NotificationCall<D>,
) -> Result<Bytes, HandlerError>
where
    D: DeserializeOwned + Send + 'static,
{
    let ctx: EventContext<D> = context::decode(
        slot.spec.hook,
        &slot.plugin_id,
        &slot.handler_name,
        &request.message.payload,
        request.message.headers.as_ref(),
    )?;
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(ctx.event_id()));
    span.record("attempt", ctx.attempt);
    if !slot.spec.matches_entity(ctx.entity()) {
        debug!(entity = %ctx.entity(), "entity not in the handler's filter; skipped");
        return Ok(skipped_reply(ctx.entity()));
    }
    // A live delivery while (or after) the plugin replays: the replay may have run
    // it, or will. Re-deliveries marked as replays are what an operator asked for.
    if let Some(gate) = &slot.gate
        && !ctx.is_replay
        && let Live::Answered(message) = gate.live(ctx.stream_seq, slot.spec.timeout()).await
    {
        debug!(seq = ctx.stream_seq, %message, "live delivery answered by the replay");
        return Ok(ok_reply(message));
    }
    call_handler(slot, ctx, f).await.map(|()| Bytes::new())
}

/// Calls the handler in its own task, so a panic becomes a transient error, not a
/// dead plugin; a call running past the handler's `timeout_ms` is aborted and
/// becomes a transient error.
async fn call_handler<D>(
    slot: &Slot,
    ctx: EventContext<D>,
    f: &NotificationCall<D>,
) -> Result<(), HandlerError>
where
    D: Send + 'static,
{
    let mut call = tokio::spawn(f(ctx).in_current_span());
    let Ok(joined) = tokio::time::timeout(slot.spec.timeout(), &mut call).await else {
        // The bus has given up on this attempt and will retry: stop this call so
        // it neither runs beside the retry nor holds a concurrency slot forever.
        call.abort();
        return Err(HandlerError::transient(format!(
            "handler timed out after {} ms",
            slot.spec.timeout_ms
        )));
    };
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            Err(HandlerError::transient(format!(
                "handler panicked: {}",
                panic_text(payload.as_ref())
            )))
        }
        Err(_) => Err(HandlerError::transient("handler task was cancelled")),
    }
}

/// The text of a panic payload, on one line.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned());
    one_line(&text)
}

fn skipped_reply(entity: &str) -> Bytes {
    ok_reply(format!(
        "skipped: entity '{entity}' is not in the handler's entity filter"
    ))
}

/// `{"status":"ok","message":…}`.
fn ok_reply(message: String) -> Bytes {
    let reply = HandlerReply {
        status: Some("ok".to_owned()),
        message: Some(message),
    };
    serde_json::to_vec(&reply)
        .map(Bytes::from)
        .unwrap_or_default()
}
