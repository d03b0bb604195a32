//! The bus daemon: provisioning, the registry, the dispatcher and the status
//! responder, under one shutdown token.

use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::BusConfig;
use crate::dispatch::{DispatchError, DispatchStats, Dispatcher};
use crate::provision::{ProvisionError, provision};
use crate::registry::{Registry, RegistryError};

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
    Database(#[from] core_events::store::StoreError),
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
    others: Vec<JoinHandle<()>>,
}

impl Bus {
    /// Provisions streams and bucket, loads the registry and starts dispatching.
    ///
    /// # Errors
    ///
    /// [`RunError`] when provisioning, the registry or the status responder fail.
    pub async fn start(client: async_nats::Client, config: BusConfig) -> Result<Bus, RunError> {
        let js = jetstream::new(client.clone());
        provision(&js, &config.subjects, &config.streams).await?;
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
        let status_task = spawn_status(
            &client,
            &config,
            registry.clone(),
            metrics.clone(),
            shutdown.child_token(),
        )
        .await?;
        let health =
            crate::monitor::Health::new(client.clone(), &config, registry.clone(), metrics.clone());
        let mut others = vec![registry_task, status_task];
        match crate::audit::watch_registry(
            js.clone(),
            config.subjects.clone(),
            shutdown.child_token(),
        )
        .await
        {
            Ok(task) => others.push(task),
            Err(e) => tracing::error!(error = %e, "cannot watch the registry for the audit trail"),
        }
        others.push(health.spawn_responder(shutdown.child_token()).await?);
        others.push(health.spawn_monitor(shutdown.child_token()));
        let mut http_addr = None;
        if let Some(addr) = config.http_addr {
            // A taken port must not stop dispatching: say so loudly and go on.
            match crate::http::serve(addr, health.clone(), shutdown.child_token()).await {
                Ok((bound, task)) => {
                    http_addr = Some(bound);
                    others.push(task);
                }
                Err(e) => tracing::error!(%addr, error = %e,
                    "cannot serve /healthz and /metrics; running without them"),
            }
        }
        if let Some(url) = &config.database_url {
            let store = core_events::store::Store::connect(url).await?;
            store.migrate().await?;
            let settings =
                crate::relay::RelaySettings::for_deployment(store.backend(), &config.streams);
            let relay =
                crate::relay::Relay::new(store, js.clone(), config.subjects.clone(), settings)
                    .with_gauges(metrics.relay().clone());
            metrics.set_relay_stats(relay.stats());
            let token = shutdown.child_token();
            others.push(tokio::spawn(async move {
                if let Err(e) = relay.run(token).await {
                    tracing::error!(error = %e, "outbox relay stopped");
                }
            }));
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
        })
    }

    /// Where `/healthz` and `/metrics` are served, if they are.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// A token that stops the bus when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the bus stops (after its shutdown token is cancelled, or the
    /// dispatcher fails).
    ///
    /// # Errors
    ///
    /// [`RunError::Dispatch`] when the dispatcher failed.
    pub async fn wait(self) -> Result<(), RunError> {
        let result = self.dispatcher.await;
        self.shutdown.cancel();
        for t in self.others {
            let _ = t.await;
        }
        match result {
            Ok(r) => Ok(r?),
            Err(e) => Err(RunError::Panicked(e.to_string())),
        }
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

/// Runs the bus until `shutdown` is cancelled.
///
/// # Errors
///
/// As [`Bus::start`] and [`Bus::wait`].
pub async fn run(
    client: async_nats::Client,
    config: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let bus = Bus::start(client, config).await?;
    let token = bus.shutdown_token();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        token.cancel();
    });
    bus.wait().await
}

/// A name for this process as a lease holder: host name, process id and a random part.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "bus".to_owned());
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &id[id.len() - 8..])
}

/// Dispatches while this bus holds the dispatcher lease; stands by otherwise.
/// A lost lease stops the dispatcher (unfinished events go back to the stream
/// and to the next holder, after their ack wait) and this bus stands by again.
async fn dispatch_under_lease(
    lease: crate::lease::Lease,
    client: async_nats::Client,
    config: BusConfig,
    registry: Registry,
    stats: Arc<DispatchStats>,
    shutdown: CancellationToken,
) -> Result<(), DispatchError> {
    let mut settings = config.dispatcher.clone();
    // Unfinished events must be given up before the next holder sees them again.
    settings.shutdown_grace = settings.shutdown_grace.min(settings.ack_wait / 3);
    loop {
        stats.set_standby(true);
        let Some(held) = lease.acquire(&shutdown).await else {
            stats.set_standby(false);
            return Ok(());
        };
        stats.set_standby(false);
        let run = shutdown.child_token();
        let lost = held.lost();
        let stop = run.clone();
        let watcher = tokio::spawn(async move {
            tokio::select! {
                () = lost.cancelled() => stop.cancel(),
                () = stop.cancelled() => {}
            }
        });
        let result = Dispatcher::run(
            client.clone(),
            config.subjects.clone(),
            settings.clone(),
            registry.clone(),
            stats.clone(),
            run.clone(),
        )
        .await;
        run.cancel();
        let _ = watcher.await;
        let was_lost = held.lost().is_cancelled();
        held.release().await;
        result?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if was_lost {
            tracing::warn!("dispatcher lease lost; standing by");
        }
    }
}

/// Answers `<prefix>.bus.registry` (the routing table as the bus sees it: plugins,
/// enabled or not, rejected manifests) and `<prefix>.bus.stats` (dispatcher counters).
async fn spawn_status(
    client: &async_nats::Client,
    config: &BusConfig,
    registry: Registry,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, RunError> {
    let prefix = config.subjects.prefix().to_owned();
    let mut sub = client.subscribe(format!("{prefix}.bus.*")).await?;
    let client = client.clone();
    Ok(tokio::spawn(async move {
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
                // Answered by crate::monitor::Health::spawn_responder.
                Some("health") => continue,
                _ => serde_json::to_vec(&serde_json::json!({
                    "error": format!(
                        "unknown status subject '{}'; use {prefix}.bus.registry or {prefix}.bus.stats",
                        msg.subject
                    )
                })),
            };
            if let Ok(body) = body {
                let _ = client.publish(reply, body.into()).await;
            }
        }
    }))
}
