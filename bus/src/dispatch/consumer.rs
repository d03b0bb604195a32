//! The consumer loop: a durable pull consumer on the events stream (one per
//! partition), per-object lanes, the handler chain of each event, and its ack.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::consumer::PriorityPolicy;
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use core_events::{ObjectKey, Subjects};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ctx::{Ctx, Deferrals, Stopped};
use super::deliver::{Delivery, WhenAbsent, deliver};
use super::event::EventMeta;
use super::hold::{Hold, give_back, keep_alive};
use super::partition::{
    PIN_GROUP, PIN_TIMEOUT, Partition, filtered_consumer, first_delivery, pinned_consumer,
    supports_pinning,
};
use crate::config::DispatcherSettings;
use crate::registry::Registry;
use crate::stats::DispatchStats;

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
    /// events stream, filtered on the server to the partition's events
    /// (`<prefix>.events.*.*.*.*.<index>`: the stream's subject transform appends
    /// the partition), and its own deferred queues. `partition.count` must be the
    /// stream's partition count ([`crate::provision::events_partitions`]).
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
            filter_subject: subjects.partition_events(partition.index),
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
        filtered_consumer(&stream, &mut consumer, &config.filter_subject)
            .await
            .map_err(err("dispatcher consumer filter"))?;
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
                move || {
                    let lanes = lanes.clone();
                    keep_alive(ctx.client.clone(), ctx.settings.ack_wait, move || {
                        lanes.in_flight().values().cloned().collect()
                    })
                },
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
        // A reconnect (another server of a cluster, or the same one back) loses
        // the events the server had sent on the dead connection: they come back
        // only after the ack wait, and newer events of their objects must not
        // overtake them. `received` is the highest sequence this dispatcher got.
        let nats_stats = ctx.client.statistics();
        let mut connects = nats_stats
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut received = hold.upto();
        let mut info_consumer = consumer.clone();
        tracing::info!(consumer = %name, %partition, pinned, "dispatcher running");
        let index = (!partition.is_all()).then_some(partition.index);
        ctx.stats.set_running(index, true, pinned);
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
                        let now = nats_stats.connects.load(std::sync::atomic::Ordering::Relaxed);
                        if now != connects {
                            connects = now;
                            if !hold.is_holding() {
                                match info_consumer.info().await {
                                    Ok(info) => {
                                        let wait = settings.ack_wait + Duration::from_secs(1);
                                        if let Some(h) = Hold::after_reconnect(received, info.delivered.stream_sequence, wait) {
                                            hold = h;
                                        }
                                    }
                                    Err(e) => tracing::warn!(error = %e, "reconnected, and cannot read the consumer to tell whether events were lost on the old connection"),
                                }
                            }
                        }
                        if let Ok(info) = msg.info() {
                            received = received.max(info.stream_sequence);
                        }
                        if let Some(msg) = hold.offer(msg) {
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
        ctx.stats.set_running(index, false, pinned);
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
                let error = error.to_string();
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

/// Dispatches one event to every matching handler, in order, then acks it.
/// With traces exported, the deliveries' spans are children of the event's
/// CONSUMER span (`Ctx::process_span`).
async fn process(ctx: &Arc<Ctx>, event: EventMeta) -> Result<(), Stopped> {
    let span = ctx.process_span(&event, "process");
    let table = ctx.registry.table();
    for route in table.matching(event.hook, &event.entity) {
        if ctx.deferrals.outstanding(&route.plugin) > 0 {
            ctx.defer(route, &event).await?;
            continue;
        }
        if deliver(ctx, route, &event, WhenAbsent::ReturnAbsent, &span).await? == Delivery::Absent {
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
