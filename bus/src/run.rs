//! The bus daemon: provisioning, the registry, the dispatcher and the status
//! responder, under one shutdown token.

use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;
use crate::dispatch::share::dispatch_under_lease;
use crate::dispatch::{DispatchError, Dispatcher};
use crate::provision::{PROVISION_PATIENCE, ProvisionError, provision_patiently};
use crate::registry::{Registry, RegistryError};
use crate::stats::DispatchStats;

/// A problem running the bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Streams or bucket could not be provisioned.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The registry could not be loaded.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The dispatcher failed.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The status responder could not subscribe.
    #[error("status responder could not subscribe: {0}")]
    Status(#[from] async_nats::SubscribeError),
    /// A task of the bus panicked.
    #[error("a bus task panicked: {0}")]
    Panicked(String),
    /// The database of the outbox relay could not be opened or migrated.
    #[error("outbox relay: {0}")]
    Database(#[from] store::StoreError),
}

/// A running bus, in process.
pub struct Bus {
    /// The live registry.
    pub registry: Registry,
    /// Dispatcher counters.
    pub stats: Arc<DispatchStats>,
    /// Metrics over the counters (`/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Health report, monitor and alerts.
    pub health: crate::monitor::Health,
    http_addr: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    dispatcher: JoinHandle<Result<(), DispatchError>>,
    /// The other long-lived tasks, by name: a panic of one stops the bus
    /// ([`Bus::wait`]); the restartable ones are supervised inside.
    others: Vec<(&'static str, JoinHandle<()>)>,
    panics: Arc<crate::stats::TaskPanics>,
}

impl Bus {
    /// Provisions streams and bucket, loads the registry and starts dispatching.
    ///
    /// # Errors
    ///
    /// [`RunError`] when provisioning, the registry or the status responder fail.
    pub async fn start(client: async_nats::Client, config: BusConfig) -> Result<Bus, RunError> {
        let js = jetstream::new(client.clone());
        // The bus's partitions are the events stream's: a new stream gets them,
        // an existing one must have them.
        let streams = crate::config::StreamSettings {
            partitions: Some(config.dispatcher.partitions.max(1)),
            ..config.streams.clone()
        };
        provision_patiently(&js, &config.subjects, &streams, PROVISION_PATIENCE).await?;
        let shutdown = CancellationToken::new();
        let (registry, registry_task) = Registry::start(
            &js,
            config.subjects.clone(),
            config.enabled_plugins.clone(),
            shutdown.child_token(),
        )
        .await?;
        let stats = Arc::new(DispatchStats::default());
        let metrics = Arc::new(crate::metrics::Metrics::new(stats.clone()));
        let panics = stats.task_panics.clone();
        let health =
            crate::monitor::Health::new(client.clone(), &config, registry.clone(), metrics.clone());
        let status_task = spawn_status(
            &client,
            &config,
            registry.clone(),
            health.clone(),
            shutdown.child_token(),
        )
        .await?;
        // Dead letters over request/reply (`<prefix>.bus.dlq.*`, a queue group:
        // with several buses one answers each request).
        let dlq_sub = crate::dlq_service::subscribe(&client, &config.subjects).await?;
        let dlq_task = crate::dlq_service::spawn(
            dlq_sub,
            client.clone(),
            config.subjects.clone(),
            shutdown.child_token(),
        );
        let mut others = vec![
            ("registry watch", registry_task),
            ("status responder", status_task),
            ("dead-letter service", dlq_task),
        ];
        match crate::audit::watch_registry(
            js.clone(),
            config.subjects.clone(),
            shutdown.child_token(),
        )
        .await
        {
            Ok(task) => others.push(("audit watch", task)),
            Err(e) => tracing::error!(error = %e, "cannot watch the registry for the audit trail"),
        }
        others.push(("monitor", health.spawn_monitor(shutdown.child_token())));
        // No consumer may push the events stream to a plugin: a guard deletes one
        // that does, for every bus (`hookbus run` and one in process alike).
        others.push(("consumer guard", {
            let (js, subjects, token) =
                (js.clone(), config.subjects.clone(), shutdown.child_token());
            crate::supervise::spawn_supervised(
                "consumer guard",
                panics.clone(),
                shutdown.child_token(),
                move || {
                    crate::nats_config::run_consumer_guard(
                        js.clone(),
                        subjects.clone(),
                        CONSUMER_GUARD_EVERY,
                        token.clone(),
                    )
                },
            )
        }));
        let mut http_addr = None;
        if let Some(addr) = config.http_addr {
            // A taken port must not stop dispatching: say so loudly and go on.
            match crate::http::serve(addr, health.clone(), shutdown.child_token()).await {
                Ok((bound, task)) => {
                    http_addr = Some(bound);
                    others.push(("http server", task));
                }
                Err(e) => tracing::error!(%addr, error = %e,
                    "cannot serve /healthz and /metrics; running without them"),
            }
        }
        if let Some(url) = &config.database_url {
            // No migration: the relay needs only the outbox table, and waits for it.
            let store = store::Store::connect(url).await?;
            let settings =
                crate::relay::RelaySettings::for_deployment(store.backend(), &config.streams);
            let relay =
                crate::relay::Relay::new(store, js.clone(), config.subjects.clone(), settings)
                    .with_gauges(metrics.relay().clone())
                    .with_task_panics(panics.clone());
            metrics.set_relay_stats(relay.stats());
            let token = shutdown.child_token();
            others.push((
                "outbox relay",
                tokio::spawn(async move {
                    if let Err(e) = relay.run(token).await {
                        tracing::error!(error = %e, "outbox relay stopped");
                    }
                }),
            ));
            tracing::info!("outbox relay started");
        }
        let dispatcher = if config.dispatcher.lease {
            let lease = crate::lease::Lease::open(
                &js,
                &config.subjects,
                "dispatcher",
                &holder_name(),
                config.streams.lease_ttl,
            )
            .await
            .map_err(|e| {
                RunError::Provision(ProvisionError::JetStream {
                    what: "open the leases bucket".into(),
                    source: e,
                })
            })?;
            tokio::spawn(dispatch_under_lease(
                lease,
                client,
                config.clone(),
                registry.clone(),
                stats.clone(),
                shutdown.child_token(),
            ))
        } else {
            tokio::spawn(Dispatcher::run(
                client,
                config.subjects.clone(),
                config.dispatcher.clone(),
                registry.clone(),
                stats.clone(),
                shutdown.child_token(),
            ))
        };
        Ok(Bus {
            registry,
            stats,
            metrics,
            health,
            http_addr,
            shutdown,
            dispatcher,
            others,
            panics,
        })
    }

    /// Where `/healthz` and `/metrics` are served, if they are.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// Watches `task` (a long-lived task of the embedding program) with the bus's
    /// own: when it panics, the bus stops and [`Bus::wait`] returns
    /// [`RunError::Panicked`], the panic counted under `name`.
    pub fn watch(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.others.push((name, task));
    }

    /// A token that stops the bus when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the bus stops: after its shutdown token is cancelled, when the
    /// dispatcher fails, or when one of its long-lived tasks panics (logged and
    /// counted in [`DispatchStats::task_panics`]; the bus then stops, see
    /// [`crate::supervise`]).
    ///
    /// # Errors
    ///
    /// [`RunError::Dispatch`] when the dispatcher failed, [`RunError::Panicked`]
    /// when a task panicked.
    pub async fn wait(self) -> Result<(), RunError> {
        let Bus {
            shutdown,
            mut dispatcher,
            others,
            panics,
            ..
        } = self;
        let mut watched: futures::stream::FuturesUnordered<_> = others
            .into_iter()
            .map(|(name, task)| async move { (name, task.await) })
            .collect();
        let mut failure = None;
        let result = loop {
            tokio::select! {
                r = &mut dispatcher => break r,
                Some((name, r)) = watched.next(), if failure.is_none() => {
                    if let Some(message) = crate::supervise::panicked(name, r, &panics) {
                        tracing::error!(task = name, "a task of the bus panicked; stopping the bus");
                        failure = Some(RunError::Panicked(format!("{name}: {message}")));
                        shutdown.cancel();
                    }
                }
            }
        };
        shutdown.cancel();
        while let Some((name, r)) = watched.next().await {
            if let Some(message) = crate::supervise::panicked(name, r, &panics) {
                failure.get_or_insert(RunError::Panicked(format!("{name}: {message}")));
            }
        }
        match result {
            Ok(r) => r?,
            Err(e) => {
                let message = crate::supervise::panicked("dispatcher", Err(e), &panics)
                    .unwrap_or_else(|| "dispatcher task cancelled".to_owned());
                return Err(RunError::Panicked(format!("dispatcher: {message}")));
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Stops the bus gracefully and waits for it.
    ///
    /// # Errors
    ///
    /// As [`Bus::wait`].
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// How often a bus looks for push consumers on the events stream
/// ([`crate::nats_config::run_consumer_guard`], supervised, in [`Bus::start`]).
const CONSUMER_GUARD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the bus until `shutdown` is cancelled (`hookbus run`).
///
/// The stop is bounded: the dispatcher's grace period plus 5 s, and 1 s once NATS
/// is disconnected (nothing left could be acked or released then).
///
/// # Errors
///
/// As [`Bus::start`] and [`Bus::wait`].
pub async fn run(
    client: async_nats::Client,
    config: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let config_grace = config.dispatcher.shutdown_grace;
    let watch = client.clone();
    let bus = Bus::start(client, config).await?;
    let token = bus.shutdown_token();
    let stop_bound = config_grace + STOP_SLACK;
    let mut wait = Box::pin(bus.wait());
    let result = tokio::select! {
        r = &mut wait => r,
        () = shutdown.cancelled() => {
            token.cancel();
            stop_bounded(&mut wait, &watch, stop_bound).await
        }
    };
    result
}

/// Time a stop may take beyond the dispatcher's grace period (leases released,
/// the relay's last batch) while NATS is connected.
const STOP_SLACK: std::time::Duration = std::time::Duration::from_secs(5);
/// Time a stop may take once NATS is disconnected: nothing left can be acked or
/// released then (events in hand are redelivered after the ack wait, leases
/// expire), so waiting for request timeouts would only delay the exit.
const STOP_DISCONNECTED: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits for a stopping bus at most `bound`, and at most [`STOP_DISCONNECTED`]
/// once `client` is disconnected; then gives up on what is left (logged).
async fn stop_bounded(
    wait: &mut (impl std::future::Future<Output = Result<(), RunError>> + Unpin),
    client: &async_nats::Client,
    bound: std::time::Duration,
) -> Result<(), RunError> {
    use async_nats::connection::State;
    let deadline = tokio::time::Instant::now() + bound;
    let mut disconnected_since: Option<tokio::time::Instant> = None;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut *wait => return r,
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(bound_s = bound.as_secs(), "the bus did not stop in time; exiting (unfinished events are redelivered after the ack wait)");
                return Ok(());
            }
            _ = poll.tick() => {
                if client.connection_state() == State::Connected {
                    disconnected_since = None;
                } else {
                    let since = *disconnected_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= STOP_DISCONNECTED {
                        tracing::warn!("NATS is unreachable; exiting without finishing the stop (unfinished events are redelivered after the ack wait, leases expire)");
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// A name for this process as a lease holder: host name, process id and a random part.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "bus".to_owned());
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &id[id.len() - 8..])
}

/// Answers `<prefix>.bus.registry` (the routing table as the bus sees it: plugins,
/// enabled or not, rejected manifests), `<prefix>.bus.stats` (dispatcher counters)
/// and `<prefix>.bus.health` ([`crate::monitor::BusHealth`]), supervised
/// ([`crate::supervise`]).
///
/// One subscription answers all three: with two subscriptions of one connection
/// matching a request, the server delivers it twice, and under the generated
/// permissions (`allow_responses`) it then refuses the reply (a publish violation
/// on the requester's inbox), so `hookbus health` got no answer.
async fn spawn_status(
    client: &async_nats::Client,
    config: &BusConfig,
    registry: Registry,
    health: crate::monitor::Health,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, RunError> {
    let subject = format!("{}.bus.*", config.subjects.prefix());
    // Subscribed before the bus is started; a restart after a panic subscribes again.
    let first = std::sync::Mutex::new(Some(client.subscribe(subject.clone()).await?));
    let client = client.clone();
    let prefix = config.subjects.prefix().to_owned();
    let panics = health.metrics().stats().task_panics.clone();
    let token = shutdown.clone();
    Ok(crate::supervise::spawn_supervised(
        "status responder",
        panics,
        shutdown,
        move || {
            let first = first
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            answer_status(
                first,
                client.clone(),
                subject.clone(),
                prefix.clone(),
                registry.clone(),
                health.clone(),
                token.clone(),
            )
        },
    ))
}

/// The loop of [`spawn_status`].
async fn answer_status(
    sub: Option<async_nats::Subscriber>,
    client: async_nats::Client,
    subject: String,
    prefix: String,
    registry: Registry,
    health: crate::monitor::Health,
    shutdown: CancellationToken,
) {
    let mut sub = match sub {
        Some(sub) => sub,
        None => loop {
            match client.subscribe(subject.clone()).await {
                Ok(sub) => break sub,
                Err(e) => {
                    tracing::warn!(%subject, error = %e, "status responder cannot subscribe; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        },
    };
    let metrics = health.metrics().clone();
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply) = msg.reply else { continue };
        let body = match msg.subject.as_str().rsplit('.').next() {
            Some("registry") => serde_json::to_vec(&*registry.table()),
            Some("stats") => {
                let mut v = serde_json::to_value(&**metrics.stats()).unwrap_or_default();
                if let (Some(obj), Some(relay)) = (v.as_object_mut(), metrics.relay_stats()) {
                    obj.insert("relay".into(), relay.to_json());
                }
                serde_json::to_vec(&v)
            }
            Some("health") => {
                health.sample().await;
                serde_json::to_vec(&health.report())
            }
            _ => serde_json::to_vec(&serde_json::json!({
                "error": format!(
                    "unknown status subject '{}'; use {prefix}.bus.registry, {prefix}.bus.stats or {prefix}.bus.health",
                    msg.subject
                )
            })),
        };
        if let Ok(body) = body
            && let Err(e) = client.publish(reply, body.into()).await
        {
            tracing::debug!(error = %e, "status reply not sent");
        }
    }
}
