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

mod deferred;
pub(crate) mod deliver;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::PriorityPolicy;
use async_nats::jetstream::{self, consumer::pull};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use chrono::Utc;
use core_events::protocol::{DeadLetter, FailedAttempt, headers};
use core_events::{Hook, ObjectKey, Subjects};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DispatcherSettings;
use crate::registry::{Registry, Route};
use deferred::Deferrals;
use deliver::{Delivery, WhenAbsent, deliver};

/// The dispatcher was asked to stop while it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// The share of the events one dispatcher takes: the objects whose
/// [`core_events::object_partition`] among `count` is `index`. `count` 1 is
/// everything ([`Partition::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    /// This partition, `0..count`.
    pub index: u32,
    /// Number of partitions.
    pub count: u32,
}

impl Partition {
    /// One partition: every event.
    pub const ALL: Partition = Partition { index: 0, count: 1 };

    /// True for [`Partition::ALL`].
    pub fn is_all(self) -> bool {
        self.count <= 1
    }

    /// `p<index>of<count>`, or `None` for [`Partition::ALL`]: names this partition's
    /// consumer, lease and deferred queues.
    pub fn tag(self) -> Option<String> {
        (!self.is_all()).then(|| format!("p{}of{}", self.index, self.count))
    }

    /// The durable consumer of this partition on the events stream: `base`, or
    /// `<base>-p<index>of<count>`.
    pub fn consumer(self, base: &str) -> String {
        match self.tag() {
            Some(tag) => format!("{base}-{tag}"),
            None => base.to_owned(),
        }
    }

    /// True when the object of this `Pagoda-Object` value (`entry/42`) is in this
    /// partition.
    pub fn owns(self, object: &str) -> bool {
        self.is_all() || core_events::object_partition(object, self.count) == self.index
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tag() {
            Some(tag) => f.write_str(&tag),
            None => f.write_str("all"),
        }
    }
}

/// What the dispatcher knows of one event without parsing its payload.
#[derive(Debug, Clone)]
pub(crate) struct EventMeta {
    pub(crate) id: Arc<str>,
    pub(crate) hook: Hook,
    pub(crate) entity: String,
    pub(crate) object: ObjectKey,
    pub(crate) seq: u64,
    pub(crate) redelivered: u64,
    /// The event's own headers, passed on to handlers.
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

impl EventMeta {
    fn from_event(
        subjects: &Subjects,
        msg: &async_nats::Message,
        seq: u64,
        redelivered: u64,
    ) -> Result<Self, String> {
        let (hook, entity) = subjects
            .parse_event(&msg.subject)
            .map_err(|e| e.to_string())?;
        if !hook.kind().is_notification() {
            // Synchronous hooks are called over request/reply (`hookbus::sync_hooks`),
            // never dispatched as events: their handlers answer a different body.
            return Err(format!(
                "hook '{hook}' is synchronous: it is called over request/reply before the change, never published as an event"
            ));
        }
        let headers = msg.headers.clone().unwrap_or_default();
        let object = match headers.get(core_events::protocol::headers::OBJECT) {
            Some(v) => v.as_str().parse::<ObjectKey>()?,
            None => core_events::envelope::object_of_event(hook.object(), &msg.payload).map_err(
                |e| {
                    format!(
                        "no {} header, and {e}",
                        core_events::protocol::headers::OBJECT
                    )
                },
            )?,
        };
        if object.kind != hook.object() {
            return Err(format!(
                "object '{object}' does not fit hook '{hook}' (expected a {})",
                hook.object()
            ));
        }
        let id: Arc<str> = headers
            .get(core_events::protocol::headers::MSG_ID)
            .map(|v| v.as_str().into())
            .unwrap_or_else(|| format!("seq-{seq}").into());
        Ok(EventMeta {
            id,
            hook,
            entity,
            object,
            seq,
            redelivered,
            headers,
            payload: msg.payload.clone(),
        })
    }

    /// Reads a delivery back from the deferred stream.
    fn from_deferred(msg: &async_nats::Message) -> Option<Self> {
        let mut headers = msg.headers.clone()?;
        let get = |name: &str| headers.get(name).map(|v| v.to_string());
        let hook = Hook::parse(&get(core_events::protocol::headers::HOOK)?).ok()?;
        let object: ObjectKey = get(core_events::protocol::headers::OBJECT)?.parse().ok()?;
        let entity =
            core_events::subject::decode_entity(&get(core_events::protocol::headers::ENTITY)?)
                .ok()?;
        let seq = get(core_events::protocol::headers::STREAM_SEQ)?
            .parse()
            .ok()?;
        let redelivered = get(core_events::protocol::headers::REDELIVERED)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let raw_id = get(core_events::protocol::headers::MSG_ID)?;
        // The deferred copy's Nats-Msg-Id is "<event id>.<plugin>.<handler>.deferred".
        let id: Arc<str> = raw_id.split('.').next().unwrap_or_default().into();
        headers.insert(core_events::protocol::headers::MSG_ID, &*id);
        Some(EventMeta {
            id,
            hook,
            entity,
            object,
            seq,
            redelivered,
            headers,
            payload: msg.payload.clone(),
        })
    }
}

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

/// Per-object queues: at most one runner per object; the runner takes the
/// object's events in arrival (= stream) order.
#[derive(Default)]
struct Lanes {
    queues: std::sync::Mutex<HashMap<ObjectKey, VecDeque<EventMeta>>>,
    /// Latest ack subject per in-flight stream sequence (a redelivery replaces it).
    in_flight: std::sync::Mutex<HashMap<u64, Subject>>,
}

impl Lanes {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, VecDeque<EventMeta>>> {
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subject>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The priority group of the dispatcher consumers on NATS 2.11 and newer
/// ([`pull::Config::priority_groups`], pinned client).
pub const PIN_GROUP: &str = "dispatch";

/// How long the server keeps a dispatcher pinned after its last pull; only
/// matters when a holder died without unpinning and the next one's unpin failed.
pub const PIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the connected server has pinned-client consumers (NATS 2.11 or newer).
pub fn supports_pinning(client: &async_nats::Client) -> bool {
    version_has_pinning(&client.server_info().version)
}

/// Whether a nats-server version (`2.11.0`, `2.12.1-RC.2`) is 2.11 or newer.
fn version_has_pinning(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 11)
}

/// A running dispatcher.
pub struct Dispatcher {
    ctx: Arc<Ctx>,
    lanes: Arc<Lanes>,
    permits: Arc<Semaphore>,
}

/// A problem starting the dispatcher.
#[derive(Debug, thiserror::Error)]
#[error("dispatcher could not start: {what}: {source}")]
pub struct DispatchError {
    what: &'static str,
    #[source]
    source: async_nats::Error,
}

impl Dispatcher {
    /// Runs the dispatcher until `shutdown`, then waits up to the grace period for
    /// in-flight events (unfinished ones are redelivered after a restart).
    ///
    /// # Errors
    ///
    /// [`DispatchError`] when the consumer cannot be created or read.
    pub async fn run(
        client: async_nats::Client,
        subjects: Subjects,
        settings: DispatcherSettings,
        registry: Registry,
        stats: Arc<DispatchStats>,
        shutdown: CancellationToken,
    ) -> Result<(), DispatchError> {
        Self::run_partition(
            client,
            subjects,
            settings,
            registry,
            stats,
            Partition::ALL,
            shutdown,
        )
        .await
    }

    /// [`Dispatcher::run`] for one partition: its own durable consumer on the
    /// events stream (which reads every event and acks the other partitions'
    /// at once) and its own deferred queues.
    ///
    /// # Errors
    ///
    /// [`DispatchError`] when the consumer cannot be created or read.
    pub async fn run_partition(
        client: async_nats::Client,
        subjects: Subjects,
        settings: DispatcherSettings,
        registry: Registry,
        stats: Arc<DispatchStats>,
        partition: Partition,
        shutdown: CancellationToken,
    ) -> Result<(), DispatchError> {
        let js = jetstream::new(client.clone());
        let name = partition.consumer(&settings.consumer);
        let err = |what| move |e: async_nats::Error| DispatchError { what, source: e };
        let stream = js
            .get_stream(subjects.events_stream())
            .await
            .map_err(|e| err("events stream")(e.into()))?;
        let deliver_policy = first_delivery(&stream, &settings.consumer, partition).await;
        let pinning = supports_pinning(&client);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("Pagoda hook bus dispatcher, partition {partition}")),
            deliver_policy,
            filter_subject: subjects.all_events(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_ack_pending: i64::try_from(settings.max_in_flight).unwrap_or(i64::MAX),
            max_deliver: -1,
            priority_groups: if pinning {
                vec![PIN_GROUP.to_owned()]
            } else {
                Vec::new()
            },
            priority_policy: if pinning {
                PriorityPolicy::PinnedClient
            } else {
                PriorityPolicy::None
            },
            priority_timeout: if pinning { PIN_TIMEOUT } else { Duration::ZERO },
            ..Default::default()
        };
        let mut consumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| err("dispatcher consumer")(e.into()))?;
        let pinned = pinned_consumer(&stream, &mut consumer, config).await;
        if pinned {
            // Whoever is pinned no longer holds this partition's lease (it died, or
            // lost it): take over at once rather than after its pin times out.
            if let Err(e) = stream.unpin_consumer(&name, PIN_GROUP).await {
                tracing::debug!(error = %e, consumer = %name, "unpin at start");
            }
        }
        // Events another dispatcher took and did not finish (it crashed, or lost
        // its lease) come back only after their ack wait; newer events of the same
        // objects must not overtake them. Hold everything until they are back.
        let mut hold = {
            let mut consumer = consumer.clone();
            let info = consumer
                .info()
                .await
                .map_err(|e| err("dispatcher consumer info")(e.into()))?;
            Hold::new(
                u64::try_from(info.num_ack_pending).unwrap_or(0),
                info.delivered.stream_sequence,
                settings.ack_wait + Duration::from_secs(1),
            )
        };
        let tracker = TaskTracker::new();
        let ctx = Arc::new(Ctx {
            client,
            js,
            subjects,
            settings: settings.clone(),
            registry,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            stats,
            deferrals: Deferrals::default(),
            partition,
            lane_panicked: Arc::default(),
        });
        if let Err(e) = ctx.resume_deferred().await {
            tracing::warn!(error = %e, "could not read deferred deliveries at start; they resume with the next deferral");
        }
        let dispatcher = Dispatcher {
            ctx: ctx.clone(),
            lanes: Arc::new(Lanes::default()),
            permits: Arc::new(Semaphore::new(settings.max_parallel_objects.max(1))),
        };
        let keepalive = {
            let (lanes, ctx) = (dispatcher.lanes.clone(), ctx.clone());
            crate::supervise::spawn_supervised(
                "dispatcher keepalive",
                ctx.stats.task_panics.clone(),
                shutdown.clone(),
                move || keep_alive(lanes.clone(), ctx.clone()),
            )
        };
        let pull = consumer
            .stream()
            .max_messages_per_batch(settings.max_in_flight.clamp(1, 512))
            .heartbeat(Duration::from_secs(5));
        // A pinned client keeps its pin by pulling: expire pulls well within the pin timeout.
        let pull = if pinned {
            pull.expires(PIN_TIMEOUT / 3).group(PIN_GROUP)
        } else {
            pull.expires(Duration::from_secs(30))
        };
        let mut messages = pull
            .messages()
            .await
            .map_err(|e| err("consumer messages")(e.into()))?;
        tracing::info!(consumer = %name, %partition, pinned, "dispatcher running");
        ctx.stats.set_running(partition, true, pinned);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = hold.expired() => {
                    tracing::warn!(missing = hold.remaining,
                        "events left unfinished by an earlier dispatcher did not all come back within the ack wait; dispatching the held events");
                    for msg in hold.release() {
                        dispatcher.accept(msg).await;
                    }
                }
                next = messages.next() => match next {
                    Some(Ok(msg)) => {
                        let ours = partition.is_all() || dispatcher.takes(&msg, &mut hold).await;
                        if ours && let Some(msg) = hold.offer(msg) {
                            dispatcher.accept(msg).await;
                        }
                        for msg in hold.all_back() {
                            dispatcher.accept(msg).await;
                        }
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "consumer stream hiccup"),
                    None => {
                        tracing::error!("consumer stream ended");
                        break;
                    }
                }
            }
        }
        ctx.stats.set_running(partition, false, pinned);
        // Give back what the consumer already sent and nobody started on, so the
        // next holder of this partition gets it at once rather than after the ack wait.
        give_back(&mut messages, &mut hold).await;
        drop(messages);
        if pinned {
            // The next holder is pinned at once rather than after the pin timeout.
            if let Err(e) = stream.unpin_consumer(&name, PIN_GROUP).await {
                tracing::debug!(error = %e, consumer = %name, "unpin at stop");
            }
        }
        keepalive.abort();
        tracker.close();
        if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; unfinished events will be redelivered");
        }
        if ctx.lane_panicked.load(Ordering::Acquire) {
            return Err(DispatchError {
                what: "a lane task panicked (see the log); the dispatcher stopped",
                source: "task panicked".into(),
            });
        }
        Ok(())
    }

    /// For a partitioned dispatcher: true when `msg` is about an object of its
    /// partition; else acks it at once (another partition's dispatcher takes it)
    /// and returns false. An event without a readable object goes to partition 0,
    /// which moves it to the dead-letter stream.
    async fn takes(&self, msg: &jetstream::Message, hold: &mut Hold) -> bool {
        let partition = self.ctx.partition;
        let ours = match msg.headers.as_ref().and_then(|h| h.get(headers::OBJECT)) {
            Some(object) => partition.owns(object.as_str()),
            None => match self
                .ctx
                .subjects
                .parse_event(&msg.subject)
                .map_err(|e| e.to_string())
                .and_then(|(hook, _)| {
                    core_events::envelope::object_of_event(hook.object(), &msg.payload)
                }) {
                Ok(object) => partition.owns(&object.to_string()),
                Err(_) => partition.index == 0,
            },
        };
        if ours {
            return true;
        }
        if let Some(reply) = &msg.reply {
            let _ = self
                .ctx
                .client
                .publish(reply.clone(), Bytes::from_static(b"+ACK"))
                .await;
        }
        if let Ok(info) = msg.info() {
            hold.skipped(info.stream_sequence);
        }
        false
    }

    async fn accept(&self, msg: jetstream::Message) {
        let (seq, redelivered) = match msg.info() {
            Ok(info) => (
                info.stream_sequence,
                u64::try_from(info.delivered).unwrap_or(1),
            ),
            Err(e) => {
                tracing::error!(error = %e, "message without JetStream metadata ignored");
                return;
            }
        };
        let msg = msg.message;
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        {
            let mut in_flight = self.lanes.in_flight();
            if let Some(old) = in_flight.get_mut(&seq) {
                // A redelivery of an event still being worked on: ack the newest copy later.
                *old = reply;
                return;
            }
            in_flight.insert(seq, reply);
        }
        let event = match EventMeta::from_event(&self.ctx.subjects, &msg, seq, redelivered) {
            Ok(e) => e,
            Err(error) => {
                let ctx = self.ctx.clone();
                let lanes = self.lanes.clone();
                self.ctx.tracker.spawn(async move {
                    if ctx
                        .malformed(&msg.subject, &msg.payload, &error)
                        .await
                        .is_ok()
                    {
                        ack(&ctx, &lanes, seq).await;
                    }
                });
                return;
            }
        };
        let key = event.object;
        {
            let mut queues = self.lanes.queues();
            if let Some(q) = queues.get_mut(&key) {
                q.push_back(event);
                return;
            }
            queues.insert(key, VecDeque::new());
        }
        let ctx = self.ctx.clone();
        let lanes = self.lanes.clone();
        let permits = self.permits.clone();
        // A panic here would leave the object's lane (and its unacked events)
        // stuck for good: it stops the dispatcher with an error instead, so that
        // the events are redelivered in order to the next one.
        let guard = crate::supervise::StopOnPanic {
            task: "dispatcher lane",
            panics: self.ctx.stats.task_panics.clone(),
            failed: self.ctx.lane_panicked.clone(),
            stop: self.ctx.shutdown.clone(),
        };
        self.ctx.tracker.spawn(async move {
            let _guard = guard;
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let mut next = Some(event);
            while let Some(event) = next {
                let seq = event.seq;
                if process(&ctx, event).await.is_err() {
                    // Shutdown: leave the rest unacked; they are redelivered after a restart.
                    lanes.queues().remove(&key);
                    return;
                }
                ack(&ctx, &lanes, seq).await;
                let mut queues = lanes.queues();
                next = queues.get_mut(&key).and_then(VecDeque::pop_front);
                if next.is_none() {
                    queues.remove(&key);
                }
            }
        });
    }
}

/// Events held at start-up until those an earlier dispatcher left unfinished
/// are redelivered, so that per-object order holds across a crash or a take-over.
struct Hold {
    /// Unfinished events of the earlier dispatcher not yet back.
    remaining: u64,
    /// The last stream sequence delivered before this dispatcher started.
    upto: u64,
    deadline: Option<tokio::time::Instant>,
    held: std::collections::BTreeMap<u64, jetstream::Message>,
}

impl Hold {
    fn new(pending: u64, upto: u64, wait: Duration) -> Hold {
        if pending > 0 {
            tracing::info!(
                pending,
                upto,
                "an earlier dispatcher left events unfinished; holding newer events until they are redelivered"
            );
        }
        Hold {
            remaining: pending,
            upto,
            deadline: (pending > 0).then(|| tokio::time::Instant::now() + wait),
            held: std::collections::BTreeMap::new(),
        }
    }

    /// The message back when nothing is held, else `None` (kept).
    fn offer(&mut self, msg: jetstream::Message) -> Option<jetstream::Message> {
        if self.deadline.is_none() {
            return Some(msg);
        }
        let Ok(info) = msg.info() else {
            return Some(msg);
        };
        let seq = info.stream_sequence;
        // A second copy of a held event replaces the first (its reply subject is newer).
        if self.held.insert(seq, msg).is_none() && seq <= self.upto {
            self.remaining = self.remaining.saturating_sub(1);
        }
        None
    }

    /// An event of another partition went by (and was acked): it no longer counts
    /// as one to wait for.
    fn skipped(&mut self, seq: u64) {
        if self.deadline.is_some() && seq <= self.upto && !self.held.contains_key(&seq) {
            self.remaining = self.remaining.saturating_sub(1);
        }
    }

    /// Everything held, in stream order, once every unfinished event is back
    /// (holding ends); nothing otherwise.
    fn all_back(&mut self) -> Vec<jetstream::Message> {
        if self.deadline.is_none() || self.remaining > 0 {
            return Vec::new();
        }
        tracing::info!(
            "unfinished events of an earlier dispatcher are back; dispatching in stream order"
        );
        self.release()
    }

    /// Everything held, in stream order; holding ends.
    fn release(&mut self) -> Vec<jetstream::Message> {
        self.deadline = None;
        self.remaining = 0;
        std::mem::take(&mut self.held).into_values().collect()
    }

    /// Resolves when holding should end although not everything came back.
    async fn expired(&self) {
        match self.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }
}

/// Where a partition's new consumer starts. A fresh system starts at the
/// beginning of the stream. When the bus switches to partitions (or to another
/// number of them), a new partition consumer starts where the dispatcher
/// consumers that exist left off: after the lowest ack floor among them, so
/// nothing is skipped (a few events may be delivered again: delivery is
/// at-least-once).
async fn first_delivery(
    stream: &jetstream::stream::Stream,
    base: &str,
    partition: Partition,
) -> jetstream::consumer::DeliverPolicy {
    use jetstream::consumer::DeliverPolicy;
    let name = partition.consumer(base);
    if stream.consumer_info(&name).await.is_ok() {
        return DeliverPolicy::All;
    }
    let mut names = stream.consumer_names();
    let mut floor: Option<u64> = None;
    while let Some(Ok(other)) = names.next().await {
        let ours = other == base || other.starts_with(&format!("{base}-p"));
        if !ours || other == name {
            continue;
        }
        if let Ok(info) = stream.consumer_info(&other).await {
            let f = info.ack_floor.stream_sequence;
            floor = Some(floor.map_or(f, |x| x.min(f)));
        }
    }
    match floor {
        Some(f) if f > 0 => {
            tracing::info!(consumer = %name, from = f + 1,
                "new partition consumer starts where the existing dispatcher consumers left off");
            DeliverPolicy::ByStartSequence {
                start_sequence: f + 1,
            }
        }
        _ => DeliverPolicy::All,
    }
}

/// Whether `consumer` is (now) a pinned-client consumer. One made before the
/// server had pinning (or by an older bus) gets `wanted`'s priority settings,
/// and keeps the rest of its configuration (where it starts, above all), when
/// the server has pinning; should that fail, it is used as it is (the lease
/// alone decides).
async fn pinned_consumer(
    stream: &jetstream::stream::Stream,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
    wanted: pull::Config,
) -> bool {
    use jetstream::consumer::FromConsumer;

    let is_pinned = |c: &jetstream::consumer::Config| {
        c.priority_policy == PriorityPolicy::PinnedClient && !c.priority_groups.is_empty()
    };
    let current = consumer.cached_info().config.clone();
    if is_pinned(&current) || wanted.priority_policy != PriorityPolicy::PinnedClient {
        return is_pinned(&current);
    }
    let mut config = current;
    config.priority_groups = wanted.priority_groups;
    config.priority_policy = wanted.priority_policy;
    config.priority_timeout = wanted.priority_timeout;
    let updated = match pull::Config::try_from_consumer_config(config) {
        Ok(c) => stream
            .update_consumer(c)
            .await
            .map_err(async_nats::Error::from),
        Err(e) => Err(e),
    };
    match updated {
        Ok(updated) => {
            *consumer = updated;
            is_pinned(&consumer.cached_info().config)
        }
        Err(e) => {
            tracing::warn!(error = %e, consumer = ?consumer.cached_info().name,
                "cannot make the dispatcher consumer a pinned-client one; the lease alone keeps a second bus from dispatching");
            false
        }
    }
}

/// After the dispatcher stopped taking events: gives back (a nak with a short
/// delay) every message still buffered in the consumer stream, those that arrive
/// within a short quiet period, and the held ones, so the next holder of the
/// partition gets them within the delay rather than after the ack wait. The delay
/// keeps them from coming straight back to this dispatcher's own pull.
async fn give_back(messages: &mut jetstream::consumer::pull::Stream, hold: &mut Hold) {
    use jetstream::AckKind;
    let delay = Some(Duration::from_millis(300));
    for msg in hold.release() {
        let _ = msg.ack_with(AckKind::Nak(delay)).await;
    }
    let quiet = Duration::from_millis(50);
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + quiet),
        messages.next(),
    )
    .await
    {
        let _ = msg.ack_with(AckKind::Nak(delay)).await;
    }
}

/// Sends progress acks for every in-flight event so the server does not
/// redeliver events that wait behind others of the same object.
async fn keep_alive(lanes: Arc<Lanes>, ctx: Arc<Ctx>) {
    let every = (ctx.settings.ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let replies: Vec<Subject> = lanes.in_flight().values().cloned().collect();
        for reply in replies {
            let _ = ctx.client.publish(reply, Bytes::from_static(b"+WPI")).await;
        }
    }
}

/// Dispatches one event to every matching handler, in order, then acks it.
async fn process(ctx: &Arc<Ctx>, event: EventMeta) -> Result<(), Stopped> {
    let table = ctx.registry.table();
    for route in table.matching(event.hook, &event.entity) {
        if ctx.deferrals.outstanding(&route.plugin) > 0 {
            ctx.defer(route, &event).await?;
            continue;
        }
        if deliver(ctx, route, &event, WhenAbsent::ReturnAbsent).await? == Delivery::Absent {
            ctx.defer(route, &event).await?;
        }
    }
    Ok(())
}

async fn ack(ctx: &Ctx, lanes: &Lanes, seq: u64) {
    let reply = lanes.in_flight().remove(&seq);
    if let Some(reply) = reply {
        if let Err(e) = ctx.client.publish(reply, Bytes::from_static(b"+ACK")).await {
            tracing::warn!(seq, error = %e, "ack failed; the event will be redelivered");
        }
        ctx.stats.events_acked.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::version_has_pinning;

    #[test]
    fn pinning_from_nats_server_2_11_on() {
        for (version, pinned) in [
            ("2.9.10", false),
            ("2.10.26", false),
            ("2.11.0", true),
            ("2.12.1-RC.2", true),
            ("2.15.1", true),
            ("3.0.0", true),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(version_has_pinning(version), pinned, "{version}");
        }
    }
}
