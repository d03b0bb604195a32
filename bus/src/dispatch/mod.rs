//! The dispatcher: takes events from a durable consumer on the events stream and
//! calls each matching handler in order.
//!
//! - Handlers for one event run one after another: priority, then the plugin's
//!   position in `ENABLED_PLUGINS`, then declaration order.
//! - Events about one object (an entry, or an entity for entity hooks) are
//!   dispatched in stream order; other objects proceed in parallel, up to
//!   [`DispatcherSettings::max_parallel_objects`].
//! - An event is acked only when every handler has succeeded, been dead-lettered,
//!   or been deferred (its plugin has no replica: see [`deferred`]). A crash at any
//!   point means redelivery, never loss.
//! - The dispatcher reads only the subject and headers of an event; the payload
//!   goes to handlers untouched.
//! - On NATS 2.11 and newer the dispatcher consumers are pinned-client consumers
//!   (priority group [`PIN_GROUP`]): the server delivers to one pull client at a
//!   time, so even two buses that both believe they hold a partition's lease (one
//!   that lost it and has not noticed yet) never dispatch it at once. A dispatcher
//!   unpins when it starts (taking over from a dead holder at once) and when it
//!   stops (handing over at once); the KV lease still decides who runs.
//!
//! | concern | module |
//! |---|---|
//! | what the dispatcher reads of an event ([`EventMeta`](event::EventMeta)) | `event` |
//! | partitions, their pinned-client consumers | [`partition`] |
//! | sharing the partitions among buses by leases | `share` |
//! | the consumer loop: lanes, the handler chain, acks | `consumer` |
//! | holding at start-up, progress acks, giving back at stop | `hold` |
//! | one delivery: request, retries, dead letters | `deliver` |
//! | deferral of deliveries for a plugin with no replica | [`deferred`] |

mod consumer;
mod deferred;
pub(crate) mod deliver;
mod event;
mod hold;
pub mod partition;
pub(crate) mod share;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use core_events::Subjects;
use core_events::protocol::{DeadLetter, FailedAttempt, headers};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use consumer::{DispatchError, Dispatcher};
use deferred::Deferrals;
pub(crate) use event::EventMeta;
pub use partition::{PIN_GROUP, PIN_TIMEOUT, Partition, supports_pinning};

use crate::config::DispatcherSettings;
use crate::registry::{Registry, Route};
use crate::stats::DispatchStats;

/// The dispatcher was asked to stop while it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// State shared by every task of one dispatcher.
pub(crate) struct Ctx {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    settings: DispatcherSettings,
    registry: Registry,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stats: Arc<DispatchStats>,
    deferrals: Deferrals,
    partition: Partition,
    /// Set when a lane task panicked: the dispatcher stops with an error.
    lane_panicked: Arc<std::sync::atomic::AtomicBool>,
}

impl Ctx {
    /// The per-handler stats of `route`, or `None` when metrics are off. Looked up
    /// in the shared map once per route (per routing table), then kept in the route.
    fn handler_stats<'r>(&self, route: &'r Route) -> Option<&'r crate::stats::HandlerStats> {
        if !self.settings.metrics {
            return None;
        }
        Some(route.stats.get_or_init(|| {
            self.stats
                .handlers
                .get_or_create(&route.subject, &route.plugin, &route.handler)
        }))
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Waits until the client is connected (polling; NATS outages are rare and the
    /// wait is short after a reconnect).
    async fn wait_connected(&self) -> Result<(), Stopped> {
        while !self.is_connected() {
            self.pause(Duration::from_millis(50)).await?;
        }
        Ok(())
    }

    /// Sleeps unless shutdown comes first.
    async fn pause(&self, d: Duration) -> Result<(), Stopped> {
        tokio::select! {
            () = self.shutdown.cancelled() => Err(Stopped),
            () = tokio::time::sleep(d) => Ok(()),
        }
    }

    /// Publishes to JetStream, retrying until the stream acknowledges or shutdown.
    async fn publish_until_acked(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), Stopped> {
        let mut wait = Duration::from_millis(100);
        loop {
            let sent = self
                .js
                .send_publish(
                    subject.to_owned(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .headers(headers.clone()),
                )
                .await;
            let result = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(async_nats::Error::from),
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(%subject, error = %e, "publish failed; retrying");
                    self.pause(wait).await?;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Writes a dead letter for a delivery that failed every attempt.
    async fn dead_letter(
        &self,
        route: &Route,
        event: &EventMeta,
        attempts: Vec<FailedAttempt>,
    ) -> Result<(), Stopped> {
        let error = attempts.last().map(|a| a.error.clone()).unwrap_or_default();
        let letter = DeadLetter {
            event_id: event
                .id
                .parse()
                .unwrap_or_else(|_| core_events::EventId(uuid::Uuid::nil())),
            hook: event.hook,
            entity: event.entity.clone(),
            object: event.object.to_string(),
            plugin: route.plugin.to_string(),
            handler: route.handler.to_string(),
            stream_seq: event.seq,
            error: error.clone(),
            attempts,
            dead_lettered_at: Utc::now(),
            event: serde_json::from_slice(&event.payload).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&event.payload).into_owned())
            }),
        };
        let body = serde_json::to_vec(&letter).unwrap_or_default();
        let mut h = HeaderMap::new();
        h.insert(
            headers::MSG_ID,
            format!(
                "{}.{}.{}.dlq.{}",
                event.id, route.plugin, route.handler, event.redelivered
            )
            .as_str(),
        );
        h.insert(headers::PLUGIN, &*route.plugin);
        h.insert(headers::HANDLER, &*route.handler);
        h.insert(headers::HOOK, event.hook.name());
        h.insert(headers::OBJECT, event.object.to_string().as_str());
        let subject = self.subjects.dead_letter(&route.plugin, &route.handler);
        self.publish_until_acked(&subject, h, body.into()).await?;
        self.stats.dead_lettered.inc();
        if let Some(hs) = self.handler_stats(route) {
            hs.dead_lettered(event.seq);
        }
        tracing::error!(
            plugin = %route.plugin, handler = %route.handler, event_id = %event.id,
            seq = event.seq, %error, "delivery dead-lettered"
        );
        Ok(())
    }

    /// Keeps an unreadable message from the events stream in the dead-letter stream.
    async fn malformed(&self, subject: &str, payload: &Bytes, error: &str) -> Result<(), Stopped> {
        let mut h = HeaderMap::new();
        h.insert("Pagoda-Error", sanitize_header(error).as_str());
        h.insert("Pagoda-Original-Subject", sanitize_header(subject).as_str());
        self.stats.malformed.inc();
        tracing::error!(%subject, %error, "malformed event moved to the dead-letter stream");
        self.publish_until_acked(
            &self.subjects.dead_letter("_bus", "malformed"),
            h,
            payload.clone(),
        )
        .await
    }
}

fn sanitize_header(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

