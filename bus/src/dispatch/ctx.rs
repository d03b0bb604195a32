//! What every task of one dispatcher shares ([`Ctx`]): the connection, the
//! settings, the routing table, the counters, the per-plugin deferral counts;
//! and what they all do with it: publish until acknowledged, write dead letters,
//! keep unreadable events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use core_events::Subjects;
use core_events::protocol::FailedAttempt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::event::EventMeta;
use super::partition::Partition;
use crate::config::DispatcherSettings;
use crate::registry::{Registry, Route};
use crate::stats::{DeferredGauge, DispatchStats};

/// The dispatcher was asked to stop while it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// State shared by every task of one dispatcher.
pub(crate) struct Ctx {
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) subjects: Subjects,
    pub(super) settings: DispatcherSettings,
    pub(super) registry: Registry,
    pub(super) shutdown: CancellationToken,
    pub(super) tracker: TaskTracker,
    pub(super) stats: Arc<DispatchStats>,
    pub(super) deferrals: Deferrals,
    pub(super) partition: Partition,
    /// Set when a lane task panicked: the dispatcher stops with an error.
    pub(super) lane_panicked: Arc<std::sync::atomic::AtomicBool>,
}

impl Ctx {
    /// The dispatcher's CONSUMER span of one event (`<operation> <subject
    /// template>`: `process` live, `deliver_deferred` from a deferred queue): a
    /// child of the producer context the message carries (the relay's publish),
    /// with a link to it, as the messaging conventions describe. A disabled span
    /// (no span at all) when traces are off or the event's trace was not sampled
    /// ([`hookbus_kit::trace::traced_parent`]). It is passed to the deliveries,
    /// the parent of their spans, not entered around them.
    pub(super) fn process_span(&self, event: &EventMeta, operation: &'static str) -> tracing::Span {
        let Some(parent) = hookbus_kit::trace::traced_parent(&event.headers) else {
            return tracing::Span::none();
        };
        let template = self.subjects.event_template(event.hook);
        let span = tracing::info_span!(
            parent: None,
            "dispatch process",
            otel.name = %format_args!("{operation} {template}"),
            otel.kind = "consumer",
            messaging.system = hookbus_kit::trace::fields::SYSTEM,
            messaging.operation.type = "process",
            messaging.operation.name = operation,
            messaging.destination.name = %self
                .subjects
                .event(event.hook, &event.entity, event.object.id)
                .unwrap_or_default(),
            messaging.destination.template = %template,
            messaging.consumer.group.name = %self.partition.consumer(&self.settings.consumer),
            messaging.destination.partition.id = self.partition.index,
            messaging.message.id = %event.id,
            pagoda.stream_seq = event.seq,
            pagoda.redelivered = event.redelivered,
        );
        hookbus_kit::trace::follow_and_link(&span, parent);
        span
    }

    /// The per-handler stats of `route`, or `None` when metrics are off. Looked up
    /// in the shared map once per route (per routing table), then kept in the route.
    pub(super) fn handler_stats<'r>(
        &self,
        route: &'r Route,
    ) -> Option<&'r crate::stats::HandlerStats> {
        if !self.settings.metrics {
            return None;
        }
        Some(route.stats.get_or_init(|| {
            self.stats
                .handlers
                .get_or_create(&route.subject, &route.plugin, &route.handler)
        }))
    }

    pub(super) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Waits until the client is connected (polling; NATS outages are rare and the
    /// wait is short after a reconnect).
    pub(super) async fn wait_connected(&self) -> Result<(), Stopped> {
        while !self.is_connected() {
            self.pause(Duration::from_millis(50)).await?;
        }
        Ok(())
    }

    /// Sleeps unless shutdown comes first.
    pub(super) async fn pause(&self, d: Duration) -> Result<(), Stopped> {
        tokio::select! {
            () = self.shutdown.cancelled() => Err(Stopped),
            () = tokio::time::sleep(d) => Ok(()),
        }
    }

    /// Publishes to JetStream, retrying until the stream acknowledges or shutdown.
    pub(super) async fn publish_until_acked(
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
    pub(super) async fn dead_letter(
        &self,
        route: &Route,
        event: &EventMeta,
        attempts: Vec<FailedAttempt>,
    ) -> Result<(), Stopped> {
        let object = event.object.to_string();
        let failed = hookbus_kit::dlq::Failed {
            event_id: event.id.parse().ok(),
            hook: event.hook,
            entity: &event.entity,
            object: &object,
            plugin: &route.plugin,
            handler: &route.handler,
            stream_seq: event.seq,
            payload: &event.payload,
        };
        let letter = hookbus_kit::dlq::record(failed, attempts);
        let error = letter.error.clone();
        let body = hookbus_kit::dlq::body(&letter).unwrap_or_default();
        let msg_id = format!(
            "{}.{}.{}.dlq.{}",
            event.id, route.plugin, route.handler, event.redelivered
        );
        let h = hookbus_kit::dlq::headers(&letter, &msg_id, false);
        let subject = self.subjects.dead_letter(&route.plugin, &route.handler);
        self.publish_until_acked(&subject, h, body).await?;
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
    pub(super) async fn malformed(
        &self,
        subject: &str,
        payload: &Bytes,
        error: &str,
    ) -> Result<(), Stopped> {
        let h = hookbus_kit::dlq::malformed_headers(subject, error);
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

/// Per-plugin deferral state, shared by the dispatcher and the drainer.
#[derive(Default)]
pub(crate) struct Deferrals {
    plugins: std::sync::Mutex<HashMap<Arc<str>, Arc<DeferredGauge>>>,
}

impl Deferrals {
    /// Number of deliveries waiting for `plugin`.
    pub(crate) fn outstanding(&self, plugin: &str) -> u64 {
        self.lock().get(plugin).map_or(0, |n| n.get())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<DeferredGauge>>> {
        self.plugins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counter for `plugin`, and whether it was just created.
    pub(super) fn counter(&self, plugin: &str) -> (Arc<DeferredGauge>, bool) {
        let mut map = self.lock();
        if let Some(c) = map.get(plugin) {
            return (c.clone(), false);
        }
        let c = Arc::new(DeferredGauge::default());
        map.insert(plugin.into(), c.clone());
        (c, true)
    }
}
