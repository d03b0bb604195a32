//! Deliveries kept for a plugin with no replica running.
//!
//! When a handler's plugin has no responder, the delivery is appended to the
//! plugin's queue in the deferred stream (a work queue) and the event goes on to
//! the other plugins. While a plugin has deferred deliveries, every new delivery
//! for it is appended behind them, so its deliveries stay in stream order per
//! object. One drainer per plugin takes them in order, waits for a replica, and
//! delivers each with the usual retries and dead letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::HeaderValue;
use async_nats::jetstream::{self, consumer::pull};
use core_events::protocol::headers;
use futures::StreamExt;

use super::ctx::{Ctx, Stopped};
use super::deliver::{WhenAbsent, deliver};
use super::event::EventMeta;
use crate::registry::Route;
use crate::stats::DeferredGauge;

impl Ctx {
    /// Appends a delivery to its plugin's deferred queue (waiting for the stream's
    /// acknowledgement) and makes sure a drainer runs for the plugin.
    pub(crate) async fn defer(
        self: &Arc<Self>,
        route: &Route,
        event: &EventMeta,
    ) -> Result<(), Stopped> {
        let mut h = event.headers.clone();
        h.insert(headers::STREAM_SEQ, HeaderValue::from(event.seq));
        h.insert(headers::REDELIVERED, HeaderValue::from(event.redelivered));
        h.insert(headers::PLUGIN, &*route.plugin);
        h.insert(headers::HANDLER, &*route.handler);
        // Dedup key: a crash between this append and the event's ack re-appends the
        // same delivery, which the stream drops.
        h.insert(
            headers::MSG_ID,
            format!("{}.{}.{}.deferred", event.id, route.plugin, route.handler).as_str(),
        );
        let subject = self.deferred_subject(&route.plugin);
        let (counter, created) = self.deferrals.counter(&route.plugin);
        // Counted before the append: the drainer may take and finish the delivery
        // before the append returns, and must not lower the count first.
        counter
            .counted(self.publish_until_acked(&subject, h, event.payload.clone()))
            .await?;
        self.stats.deferred.inc();
        if let Some(hs) = self.handler_stats(route) {
            hs.deferred.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(plugin = %route.plugin, handler = %route.handler, event_id = %event.id, seq = event.seq,
            "plugin has no replica running; delivery deferred");
        if created {
            self.stats.plugins.track_deferred(&route.plugin, &counter);
            self.spawn_drainer(route.plugin.clone(), counter);
        }
        Ok(())
    }

    /// This dispatcher's deferred queue for `plugin` (one per partition).
    fn deferred_subject(&self, plugin: &str) -> String {
        self.subjects
            .deferred_in(plugin, self.partition.tag().as_deref())
    }

    /// Starts drainers for plugins that already have deferred deliveries (after a restart).
    pub(crate) async fn resume_deferred(self: &Arc<Self>) -> Result<(), async_nats::Error> {
        let mut stream = self.js.get_stream(self.subjects.deferred_stream()).await?;
        let info = stream.info().await?;
        if info.state.messages == 0 {
            return Ok(());
        }
        // Each waiting message names its plugin in its subject; count per plugin.
        let mut per_plugin: HashMap<String, u64> = HashMap::new();
        let info = stream
            .info_with_subjects(self.deferred_subject("*"))
            .await?;
        let mut subjects = info;
        while let Some(item) = subjects.next().await {
            let (subject, count) = item?;
            if let Some(plugin) = self.subjects.plugin_of_deferred(&subject) {
                *per_plugin.entry(plugin.to_owned()).or_default() += count as u64;
            }
        }
        for (plugin, count) in per_plugin {
            let (counter, created) = self.deferrals.counter(&plugin);
            counter.add(count);
            tracing::info!(%plugin, waiting = count, "resuming deferred deliveries");
            if created {
                self.stats.plugins.track_deferred(&plugin, &counter);
                self.spawn_drainer(plugin.into(), counter);
            }
        }
        Ok(())
    }

    /// Starts the plugin's drainer, supervised ([`crate::supervise`]): a panic is
    /// logged and counted and the drainer starts again (its delivery in hand is
    /// redelivered by the deferred stream after the ack wait).
    fn spawn_drainer(self: &Arc<Self>, plugin: Arc<str>, counter: Arc<DeferredGauge>) {
        let ctx = self.clone();
        self.tracker.spawn(crate::supervise::supervise(
            "deferred drainer",
            self.stats.task_panics.clone(),
            self.shutdown.clone(),
            move || {
                ctx.clone()
                    .drain_until_stopped(plugin.clone(), counter.clone())
            },
        ));
    }

    /// Drains the plugin's deferred deliveries until shutdown; starts again after a
    /// NATS error.
    async fn drain_until_stopped(self: Arc<Self>, plugin: Arc<str>, counter: Arc<DeferredGauge>) {
        loop {
            match self.drain(&plugin, &counter).await {
                Ok(()) | Err(DrainError::Stopped) => break,
                Err(DrainError::Nats(e)) => {
                    tracing::warn!(%plugin, error = %e, "deferred drainer failed; restarting");
                    if self.pause(std::time::Duration::from_secs(1)).await.is_err() {
                        break;
                    }
                }
            }
        }
    }

    async fn drain(&self, plugin: &str, counter: &DeferredGauge) -> Result<(), DrainError> {
        let stream = self.js.get_stream(self.subjects.deferred_stream()).await?;
        let name = match self.partition.tag() {
            Some(tag) => format!("deferred-{plugin}-{tag}"),
            None => format!("deferred-{plugin}"),
        };
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.deferred_subject(plugin),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.settings.ack_wait,
                    max_ack_pending: 1,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let msg = tokio::select! {
                () = self.shutdown.cancelled() => return Err(DrainError::Stopped),
                next = messages.next() => match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(%plugin, error = %e, "deferred consumer hiccup");
                        continue;
                    }
                    None => return Err(DrainError::Nats("deferred consumer ended".into())),
                },
            };
            let handler = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::HANDLER))
                .map(|v| v.to_string())
                .unwrap_or_default();
            match EventMeta::from_deferred(&msg.message) {
                None => {
                    tracing::error!(%plugin, "unreadable deferred delivery moved to the dead-letter stream");
                    self.malformed(
                        &msg.message.subject,
                        &msg.message.payload,
                        "unreadable deferred delivery",
                    )
                    .await?;
                }
                Some(event) => match self.route_for_deferred(plugin, &handler).await? {
                    Some(route) => {
                        let span = self.process_span(&event, "deliver_deferred");
                        deliver(self, &route, &event, WhenAbsent::Wait, &span).await?;
                    }
                    None => self.handler_gone(plugin, &handler, &event).await?,
                },
            }
            self.ack_until_done(&msg).await?;
            counter.done();
        }
    }

    /// Dead-letters a deferred delivery whose handler its (enabled) plugin no longer declares.
    async fn handler_gone(
        &self,
        plugin: &str,
        handler: &str,
        event: &EventMeta,
    ) -> Result<(), Stopped> {
        let gone = Route {
            plugin: plugin.into(),
            handler: handler.into(),
            subject: self.subjects.handler(plugin, handler).into(),
            hook: event.hook,
            entities: None,
            priority: 0,
            plugin_rank: 0,
            declared: 0,
            timeout: std::time::Duration::ZERO,
            retry: Arc::from([]),
            on_unavailable: core_events::OnUnavailable::default_for(event.hook.kind()),
            stats: std::sync::OnceLock::new(),
        };
        let failure = core_events::protocol::FailedAttempt {
            attempt: 0,
            at: chrono::Utc::now(),
            error: format!("plugin '{plugin}' no longer declares handler '{handler}'"),
        };
        self.dead_letter(&gone, event, vec![failure]).await
    }

    /// The route for a deferred delivery: waits while the plugin is not registered or
    /// not enabled (its deliveries wait for it); `None` when the plugin is enabled but
    /// no longer declares the handler.
    async fn route_for_deferred(
        &self,
        plugin: &str,
        handler: &str,
    ) -> Result<Option<Arc<Route>>, DrainError> {
        loop {
            let table = self.registry.table();
            if let Some(route) = table.route(plugin, handler) {
                return Ok(Some(route.clone()));
            }
            if table.is_enabled(plugin) {
                return Ok(None);
            }
            self.pause(self.settings.deferred_poll * 4)
                .await
                .map_err(|_| DrainError::Stopped)?;
        }
    }

    async fn ack_until_done(&self, msg: &jetstream::Message) -> Result<(), Stopped> {
        loop {
            match msg.double_ack().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(error = %e, "ack of deferred delivery failed; retrying");
                    self.wait_connected().await?;
                    self.pause(std::time::Duration::from_millis(100)).await?;
                }
            }
        }
    }
}

#[derive(Debug)]
enum DrainError {
    Stopped,
    Nats(async_nats::Error),
}

impl From<Stopped> for DrainError {
    fn from(_: Stopped) -> Self {
        DrainError::Stopped
    }
}

impl<E: Into<async_nats::Error>> From<E> for DrainError {
    fn from(e: E) -> Self {
        DrainError::Nats(e.into())
    }
}
