//! Replaying the events stream: rebuilding a subscriber's state from stored events,
//! then going on live without a gap or a duplicate.
//!
//! Three ways in:
//!
//! | what | for |
//! |---|---|
//! | [`ServeOptions::replay`](crate::ServeOptions::replay) = `Some(`[`ReplayFrom`]`)` | a plugin that rebuilds its state at start-up through its own handlers, then serves live events (the *catch-up*, below) |
//! | [`Plugin::replay`] | the same handlers over the stored events, up to the head of the stream, without serving (offline rebuilds, benchmarks) |
//! | [`replay_events`] | the raw events (subject, headers, payload, sequence, time) as a [`Stream`](futures::Stream), filtered by hook and entity, stopping at the head or following live (the `hookbus replay` command, state rebuilds into a database) |
//!
//! Where to start, [`ReplayFrom`]: the oldest retained event ([`ReplayFrom::Start`],
//! or `Sequence(0)`), a stream sequence, or a time. Asking for a position the stream
//! no longer holds (its retention, `max_age` / `max_bytes`, has removed it) is an
//! error, [`ReplayError::BeforeOldest`], naming the requested position, the oldest
//! retained sequence and its time, and the retention: a replay never starts
//! silently later than asked.
//!
//! # The catch-up, and why it has no gap and no duplicate
//!
//! With `replay` set, [`Plugin::serve`](crate::Plugin::serve):
//!
//! 1. serves its endpoints and registers its manifest, as without replay;
//! 2. waits until the running bus's routing table holds this manifest (it asks
//!    `<prefix>.bus.registry` until the plugin is listed with the registered
//!    revision; without an answer within
//!    [`ServeOptions::replay_bus_wait`](crate::ServeOptions::replay_bus_wait) it
//!    goes on, with a warning);
//! 3. reads the events stream from the requested position with an ordered
//!    consumer filtered on the union of its handlers' hooks and entity filters,
//!    and runs every event through each matching handler, in declaration order,
//!    with the same [`EventContext`](crate::EventContext) a live delivery gets
//!    (`stream_seq` from the stream, [`is_replay`](crate::EventContext::is_replay)
//!    set). It records `replayed_through`, the highest sequence done;
//! 4. stops when it has done an event the server reported as the last matching
//!    one (`pending == 0`) and every live delivery it held back (below) is done.
//!
//! Live deliveries (from the bus, with `Pagoda-Stream-Seq`) are gated meanwhile:
//!
//! - during the catch-up, a live delivery of sequence `s` is **not** run: it waits
//!   until `replayed_through >= s`, then is answered OK (the catch-up ran it). The
//!   wait is short (at most 1 s, and at most 80 % of the handler's timeout, since
//!   the bus holds the event's handler chain meanwhile); past it the delivery is
//!   answered OK at once and the catch-up does not stop before it has run `s`;
//! - after the catch-up, a delivery with `s <= replayed_through` is a duplicate
//!   and is answered OK without calling the handler; every other one runs as
//!   usual.
//!
//! **No gap.** The bus picks an event's handlers from its routing table when it
//! dispatches the event. Once the table holds this plugin (step 2), every event
//! dispatched afterwards is delivered live; every event dispatched earlier was
//! already in the stream when the catch-up's consumer was created (step 3), so
//! the catch-up, which runs until the server reports nothing more pending, reaches
//! it. **No duplicate.** A live delivery is run only when it comes after
//! `replayed_through`; the catch-up runs every event once, in stream order; and
//! the catch-up cannot end before a live delivery it held back, since it waits
//! for the highest held-back sequence.
//!
//! Re-deliveries that carry `Pagoda-Replay: true` (from `hookbus replay
//! --to-plugin`) are not gated: the operator asked for them.
//!
//! # Failures during the catch-up
//!
//! A handler that fails during the catch-up is retried on its own schedule
//! (`retry_backoff_ms`; a permanent error is not retried), exactly as the bus would.
//! After the last attempt the event is **dead-lettered** by the SDK, under the
//! handler's usual dead-letter subject (`<prefix>.dlq.<plugin>.<handler>`, with every
//! attempt and the error, listed by `hookbus dlq`), logged at error level, counted
//! in [`ReplayProgress::dead_lettered`], and the catch-up goes on with the next
//! handler and event. The position is never lost silently: an event is either
//! done or in the dead-letter stream.
//!
//! If the catch-up itself cannot go on (the stream cannot be read),
//! [`RunningPlugin::wait_caught_up`](crate::RunningPlugin::wait_caught_up) reports
//! the error, [`Plugin::serve_until`](crate::Plugin::serve_until) (and so
//! [`run_main`](crate::run_main)) stops the plugin with
//! [`ServeError::Replay`](crate::ServeError::Replay), and live deliveries are run
//! normally from then on.
//!
//! Replicas: each replica that starts with `replay` replays on its own, while live
//! events are shared between replicas by the queue group. Replay suits state that
//! every replica rebuilds (an in-memory index in a single replica) or shared state
//! written idempotently (keyed by the event id).
//!
//! # Example: rebuild a projection at start-up
//!
//! ```no_run
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//!
//! use pagoda_plugin_sdk::replay::ReplayFrom;
//! use pagoda_plugin_sdk::{Hook, Plugin, ServeOptions};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // entry id -> entry name, rebuilt from every stored event, then kept up to date.
//! let names: Arc<Mutex<HashMap<i64, String>>> = Arc::default();
//! let plugin = Plugin::builder("entry-names", "Entry names", "1.0.0")
//!     .state(names.clone())
//!     .on_entry(Hook::EntryAfterCreate, "created", |ctx| async move {
//!         let entry = &ctx.event.data.entry;
//!         if let Ok(mut names) = ctx.state.lock() {
//!             names.insert(entry.id, entry.name.clone());
//!         }
//!         tracing::debug!(seq = ctx.stream_seq, replay = ctx.is_replay, "entry created");
//!         Ok(())
//!     })
//!     .build()?;
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let options = ServeOptions {
//!     replay: Some(ReplayFrom::Start),
//!     ..ServeOptions::default()
//! };
//! let running = plugin.serve(client.clone(), options).await?;
//! if let Some(progress) = running.wait_caught_up().await {
//!     tracing::info!(through = progress.replayed_through, events = progress.events, "caught up");
//! }
//! tokio::signal::ctrl_c().await?;
//! running.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Example: the raw events, up to the head
//!
//! ```no_run
//! use futures::TryStreamExt;
//! use pagoda_plugin_sdk::replay::{ReplayFrom, ReplayOptions, replay_events};
//! use pagoda_plugin_sdk::Hook;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let options = ReplayOptions {
//!     from: ReplayFrom::Sequence(1200),
//!     hooks: vec![Hook::EntryAfterUpdate],
//!     entities: vec!["customer".to_owned()],
//!     // one object's history: objects: vec!["entry/42".parse()?],
//!     ..Default::default()
//! };
//! let mut events = replay_events(&js, &Default::default(), options).await?;
//! println!("{} events to go", events.total_at_start());
//! while let Some(event) = events.try_next().await? {
//!     let envelope = event.envelope()?;
//!     println!("{} {} {}", event.stream_seq, event.subject, envelope.id);
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self};
use bytes::Bytes;
use chrono::Utc;
use core_events::protocol::{FailedAttempt, headers};
use core_events::{EventId, Hook, Subjects};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::context::{self, DeliveryHeaders};
use crate::error::{HandlerError, HandlerErrorKind};
use crate::plugin::{HandlerFn, NotificationCall, Plugin};
use crate::serve::Slot;

pub(crate) use hookbus_kit::replay::open;
pub use hookbus_kit::replay::{
    EventReplay, ReplayError, ReplayFrom, ReplayOptions, ReplayedEvent, filter_subjects,
    filter_subjects_for, format_duration, handler_filter_subjects, replay_events,
};

/// How far a plugin's replay has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayProgress {
    /// The highest stream sequence done (every matching handler ran or the event
    /// was dead-lettered); events up to it count as replayed.
    pub replayed_through: u64,
    /// Events read from the stream.
    pub events: u64,
    /// Handler calls made (an event matching two handlers counts twice; retries
    /// are not counted).
    pub handler_calls: u64,
    /// Handler calls given up after the last retry and dead-lettered.
    pub dead_lettered: u64,
    /// The catch-up is over: live deliveries run normally from now on.
    pub caught_up: bool,
    /// With a [backfill](crate::backfill): its bound `B`, once known. The first
    /// events are the latest of every object up to it; every later event follows.
    pub backfill_through: Option<u64>,
    /// Why the catch-up stopped early, when it did.
    pub error: Option<String>,
}

/// Runs a plugin's handlers over stored events.
pub(crate) struct Runner {
    pub(crate) js: jetstream::Context,
    pub(crate) subjects: Subjects,
    pub(crate) slots: Vec<Arc<Slot>>,
    /// Subjects already parsed: a replay sees the same few (hook × entity) again
    /// and again.
    parsed: std::sync::Mutex<HashMap<String, ParsedSubject>>,
}

/// A subject's hook and entity name (`None`: not an event subject).
type ParsedSubject = Option<(Hook, Arc<str>)>;

/// The most subjects [`Runner`] remembers before starting afresh.
const PARSED_SUBJECTS_MAX: usize = 4096;

/// What one event cost.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EventOutcome {
    pub(crate) calls: u64,
    pub(crate) dead_lettered: u64,
}

impl Runner {
    /// Runs every matching handler on one event, in declaration order, each with
    /// its retries; a handler that fails every attempt is dead-lettered.
    pub(crate) async fn run_event(
        &self,
        event: ReplayedEvent,
        stop: &CancellationToken,
    ) -> EventOutcome {
        let mut outcome = EventOutcome::default();
        let Some((hook, entity)) = self.parse_subject(&event.subject, event.stream_seq) else {
            return outcome;
        };
        for slot in &self.slots {
            if slot.spec.hook != hook || !slot.spec.matches_entity(&entity) {
                continue;
            }
            outcome.calls += 1;
            let done = self.run_handler(slot, &entity, &event, stop).await;
            if !done {
                outcome.dead_lettered += 1;
            }
        }
        outcome
    }

    /// The hook and entity of an event subject (remembered); `None`, with a
    /// warning, for a subject that is not an event subject.
    fn parse_subject(&self, subject: &str, seq: u64) -> ParsedSubject {
        let mut parsed = self
            .parsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = parsed.get(subject) {
            return known.clone();
        }
        let result = match self.subjects.parse_event(subject) {
            Ok((hook, entity)) => Some((hook, Arc::from(entity))),
            Err(e) => {
                warn!(seq, error = %e, "replay: not an event subject; skipped");
                None
            }
        };
        if parsed.len() >= PARSED_SUBJECTS_MAX {
            parsed.clear();
        }
        parsed.insert(subject.to_owned(), result.clone());
        result
    }

    /// One handler on one event with its retry schedule. False when it was given
    /// up (dead-lettered) or stopped.
    async fn run_handler(
        &self,
        slot: &Slot,
        entity: &str,
        event: &ReplayedEvent,
        stop: &CancellationToken,
    ) -> bool {
        let seq = event.stream_seq;
        let mut failures: Vec<FailedAttempt> = Vec::new();
        loop {
            let n = u32::try_from(failures.len() + 1).unwrap_or(u32::MAX);
            // What a live delivery's headers would say (Pagoda-Stream-Seq,
            // Pagoda-Attempt, Pagoda-Replay: true, traceparent); the hook is the
            // subject's, already matched.
            let delivery = DeliveryHeaders {
                attempt: Some(n),
                stream_seq: Some(seq),
                hook: None,
                replay: true,
                traceparent: event.header(headers::TRACEPARENT).map(str::to_owned),
                object: event.header(headers::OBJECT).map(str::to_owned),
            };
            let result = match &slot.handler {
                HandlerFn::Entry(f) => call(slot, f, &event.payload, delivery).await,
                HandlerFn::Entity(f) => call(slot, f, &event.payload, delivery).await,
                // Synchronous handlers have no events; `runner` leaves them out.
                HandlerFn::Sync(_) => Ok(()),
            };
            let err = match result {
                Ok(()) => return true,
                Err(err) => err,
            };
            let text = err.reply_text();
            warn!(
                plugin = %slot.plugin_id, handler = %slot.handler_name, seq, attempt = n,
                kind = %err.kind(), error = %text, "replay: handler failed"
            );
            failures.push(FailedAttempt {
                attempt: n,
                at: Utc::now(),
                error: text,
            });
            let wait = hookbus_kit::retry::next_wait(
                &slot.spec.retry_schedule(),
                failures.len(),
                err.kind() != HandlerErrorKind::Transient,
            );
            match wait {
                Some(wait) => {
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                None => {
                    self.dead_letter(slot, entity, event, failures).await;
                    return false;
                }
            }
        }
    }

    /// Stores a dead letter for a handler that failed every attempt of a replayed
    /// event (same record and subject as the bus's).
    async fn dead_letter(
        &self,
        slot: &Slot,
        entity: &str,
        replayed: &ReplayedEvent,
        attempts: Vec<FailedAttempt>,
    ) {
        let (payload, h, seq) = (&replayed.payload, &replayed.headers, replayed.stream_seq);
        let event: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let header = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        let event_id: Option<EventId> = header(headers::MSG_ID)
            .or_else(|| event["id"].as_str().map(str::to_owned))
            .and_then(|id| id.parse().ok());
        let object = header(headers::OBJECT)
            .or_else(|| event["subject"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let failed = hookbus_kit::dlq::Failed {
            event_id,
            hook: slot.spec.hook,
            entity,
            object: &object,
            plugin: &slot.plugin_id,
            handler: &slot.handler_name,
            stream_seq: seq,
            payload,
        };
        let letter = hookbus_kit::dlq::record(failed, attempts);
        let (event_id, error_text) = (letter.event_id, letter.error.clone());
        let msg_id = format!(
            "{event_id}.{}.{}.dlq.replay",
            slot.plugin_id, slot.handler_name
        );
        let subject = self
            .subjects
            .dead_letter(&slot.plugin_id, &slot.handler_name);
        let stored =
            hookbus_kit::dlq::publish(&self.js, subject.clone(), &letter, &msg_id, true).await;
        match stored {
            Ok(()) => error!(
                plugin = %slot.plugin_id, handler = %slot.handler_name, %event_id, seq,
                error = %error_text, %subject,
                "replay: handler failed every attempt; dead-lettered, replay goes on"
            ),
            Err(e) => error!(
                plugin = %slot.plugin_id, handler = %slot.handler_name, %event_id, seq,
                error = %error_text, dlq_error = %e,
                "replay: handler failed every attempt and the dead letter could not be stored; replay goes on (replay from this sequence to run it again)"
            ),
        }
    }
}

/// Decodes a replayed event exactly as a live delivery and calls the handler,
/// with the same guards as a live call: a panic and a call past the handler's
/// `timeout_ms` become transient errors. Unlike a live call it runs in the
/// replay's own task (events are handled one at a time anyway), which saves a
/// task spawn and two thread wake-ups per event.
async fn call<D>(
    slot: &Slot,
    f: &NotificationCall<D>,
    payload: &Bytes,
    delivery: DeliveryHeaders,
) -> Result<(), HandlerError>
where
    D: DeserializeOwned + Send + 'static,
{
    let ctx = context::decode_delivery(
        slot.spec.hook,
        &slot.plugin_id,
        &slot.handler_name,
        payload,
        delivery,
    )?;
    crate::serve::guarded(f(ctx), slot.spec.timeout()).await
}

impl Plugin {
    /// Runs this plugin's handlers over the stored events from `from` up to the
    /// head of the stream (the events stored when it starts), without serving and
    /// without any live delivery: every event matching a handler's hook and entity
    /// filter runs through that handler, in stream order, with
    /// [`EventContext::is_replay`](crate::EventContext::is_replay) set. Failures
    /// are retried and dead-lettered as in the catch-up (see the module docs).
    ///
    /// ```no_run
    /// # async fn example(plugin: pagoda_plugin_sdk::Plugin) -> Result<(), Box<dyn std::error::Error>> {
    /// use pagoda_plugin_sdk::replay::ReplayFrom;
    ///
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let done = plugin.replay(&client, &Default::default(), ReplayFrom::Start).await?;
    /// println!("replayed {} events through seq {}", done.events, done.replayed_through);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`replay_events`]; a read failure part-way ([`ReplayError::Read`]) names
    /// the last sequence done.
    pub async fn replay(
        &self,
        client: &async_nats::Client,
        subjects: &Subjects,
        from: ReplayFrom,
    ) -> Result<ReplayProgress, ReplayError> {
        let runner = self.runner(client, subjects);
        let filters = handler_filter_subjects(subjects, &self.inner.manifest.handlers)?;
        let mut events = open(&runner.js, subjects, from, filters, true).await?;
        let stop = CancellationToken::new();
        let mut progress = ReplayProgress {
            replayed_through: events.start_after(),
            ..ReplayProgress::default()
        };
        while let Some(event) = events.next().await {
            let event = event?;
            let seq = event.stream_seq;
            let outcome = runner.run_event(event, &stop).await;
            progress.events += 1;
            progress.handler_calls += outcome.calls;
            progress.dead_lettered += outcome.dead_lettered;
            progress.replayed_through = progress.replayed_through.max(seq);
        }
        progress.caught_up = true;
        Ok(progress)
    }

    pub(crate) fn runner(&self, client: &async_nats::Client, subjects: &Subjects) -> Runner {
        let plugin_id: Arc<str> = self.inner.manifest.id.as_str().into();
        Runner {
            js: jetstream::new(client.clone()),
            subjects: subjects.clone(),
            slots: self
                .inner
                .manifest
                .handlers
                .iter()
                .zip(&self.inner.handlers)
                .filter(|(spec, _)| spec.hook.kind().is_notification())
                .map(|(spec, handler)| {
                    Arc::new(Slot {
                        plugin_id: plugin_id.clone(),
                        handler_name: spec.name.as_str().into(),
                        spec: spec.clone(),
                        handler: handler.clone(),
                        subject: subjects.handler(&plugin_id, &spec.name),
                        gate: None,
                    })
                })
                .collect(),
            parsed: std::sync::Mutex::default(),
        }
    }
}

/// The longest a live delivery waits for the catch-up to reach it.
const LIVE_WAIT_MAX: Duration = Duration::from_secs(1);

/// Shared by the catch-up and the live endpoints of one plugin process.
#[derive(Debug)]
pub(crate) struct CatchUpGate {
    progress: watch::Sender<ReplayProgress>,
    /// The highest sequence a live delivery was answered for before the catch-up
    /// reached it: the catch-up does not end before it. Read and written only
    /// under the `progress` lock (inside `send_modify` / `send_if_modified`).
    promised: AtomicU64,
}

/// What a live delivery does, decided by the gate.
#[derive(Debug)]
pub(crate) enum Live {
    /// Run the handler.
    Run,
    /// Answer OK with this message, without running the handler.
    Answered(String),
}

enum Admit {
    Run,
    Duplicate(u64),
    Wait,
}

impl CatchUpGate {
    pub(crate) fn new() -> Self {
        CatchUpGate {
            progress: watch::Sender::new(ReplayProgress::default()),
            promised: AtomicU64::new(0),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<ReplayProgress> {
        self.progress.subscribe()
    }

    /// Decides a live delivery of stream sequence `seq` (see the module docs).
    pub(crate) async fn live(&self, seq: u64, handler_timeout: Duration) -> Live {
        if seq == 0 {
            return Live::Run;
        }
        let mut admit = Admit::Wait;
        self.progress.send_if_modified(|p| {
            admit = if p.caught_up || p.error.is_some() {
                if seq <= p.replayed_through {
                    Admit::Duplicate(p.replayed_through)
                } else {
                    Admit::Run
                }
            } else {
                self.promised.fetch_max(seq, Ordering::SeqCst);
                Admit::Wait
            };
            false
        });
        match admit {
            Admit::Run => Live::Run,
            Admit::Duplicate(through) => Live::Answered(format!(
                "duplicate: sequence {seq} was already replayed (replayed through {through})"
            )),
            Admit::Wait => {
                let budget = LIVE_WAIT_MAX.min(handler_timeout.mul_f64(0.8));
                let mut rx = self.progress.subscribe();
                // Reached or not, the answer is read below.
                drop(
                    tokio::time::timeout(
                        budget,
                        rx.wait_for(|p| {
                            p.replayed_through >= seq || p.caught_up || p.error.is_some()
                        }),
                    )
                    .await,
                );
                let p = rx.borrow().clone();
                if p.replayed_through >= seq {
                    Live::Answered(format!("replayed: sequence {seq} was run by the replay"))
                } else if p.caught_up || p.error.is_some() {
                    Live::Run
                } else {
                    Live::Answered(format!(
                        "queued for the replay: sequence {seq} will be run by the replay (at {} now)",
                        p.replayed_through
                    ))
                }
            }
        }
    }

    /// The catch-up starts: events up to `start_after` are not part of it.
    /// `nothing_pending`: the stream holds no matching event from the start.
    pub(crate) fn started(&self, start_after: u64, nothing_pending: bool) {
        self.progress.send_modify(|p| {
            p.replayed_through = p.replayed_through.max(start_after);
            if nothing_pending && p.replayed_through >= self.promised.load(Ordering::SeqCst) {
                p.caught_up = true;
            }
        });
    }

    /// One event done. Returns true when the catch-up is over.
    pub(crate) fn done(&self, seq: u64, pending: u64, outcome: EventOutcome) -> bool {
        let mut over = false;
        self.progress.send_modify(|p| {
            p.replayed_through = p.replayed_through.max(seq);
            p.events += 1;
            p.handler_calls += outcome.calls;
            p.dead_lettered += outcome.dead_lettered;
            if pending == 0 && p.replayed_through >= self.promised.load(Ordering::SeqCst) {
                p.caught_up = true;
            }
            over = p.caught_up;
        });
        over
    }

    /// A backfill knows its bound.
    pub(crate) fn backfill_through(&self, through: u64) {
        self.progress
            .send_modify(|p| p.backfill_through = Some(through));
    }

    /// The catch-up cannot go on.
    pub(crate) fn failed(&self, error: String) {
        self.progress.send_modify(|p| {
            let promised = self.promised.load(Ordering::SeqCst);
            if promised > p.replayed_through {
                error!(
                    replayed_through = p.replayed_through, promised,
                    "replay stopped before live deliveries it had answered for were run: restart the plugin to replay them"
                );
            }
            p.error = Some(error);
        });
    }

    /// The progress now.
    pub(crate) fn progress(&self) -> ReplayProgress {
        self.progress.borrow().clone()
    }
}

/// Waits until the running bus routes to this plugin's manifest `revision`
/// (`<prefix>.bus.registry` lists it with that revision or a later one), or
/// `wait` has passed (a warning, then the replay goes on).
pub(crate) async fn wait_for_routing(
    client: &async_nats::Client,
    subjects: &Subjects,
    plugin_id: &str,
    revision: u64,
    wait: Duration,
) {
    const POLL: Duration = Duration::from_millis(100);
    const ASK: Duration = Duration::from_secs(1);
    let subject = format!("{}.bus.registry", subjects.prefix());
    let deadline = Instant::now() + wait;
    loop {
        let asked = tokio::time::timeout(ASK, client.request(subject.clone(), Bytes::new())).await;
        let issue = match asked {
            Ok(Ok(reply)) => match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
                Ok(table) => {
                    let entry = &table["plugins"][plugin_id];
                    match entry["revision"].as_u64() {
                        Some(r) if r >= revision => {
                            if entry["enabled_rank"].is_null() {
                                warn!(
                                    plugin = plugin_id,
                                    "the bus lists this plugin but it is not in ENABLED_PLUGINS: it sends no live events; replaying anyway"
                                );
                            } else {
                                debug!(
                                    plugin = plugin_id,
                                    revision = r,
                                    "the bus routes to this plugin"
                                );
                            }
                            return;
                        }
                        Some(r) => {
                            format!("the bus has revision {r} of the manifest, not yet {revision}")
                        }
                        None => "the bus does not list the plugin yet".to_owned(),
                    }
                }
                Err(e) => format!("unreadable answer on {subject}: {e}"),
            },
            Ok(Err(e)) => format!("no answer on {subject}: {e}"),
            Err(_) => format!("no answer on {subject} within {ASK:?}"),
        };
        if Instant::now() >= deadline {
            warn!(
                plugin = plugin_id,
                waited = ?wait,
                last = %issue,
                "could not confirm that the bus routes to this plugin; replaying anyway (events the bus dispatches before it does are covered by the replay only if they were stored before the replay started)"
            );
            return;
        }
        debug!(plugin = plugin_id, %issue, "waiting for the bus to route to this plugin");
        tokio::time::sleep(POLL.min(deadline - Instant::now())).await;
    }
}

/// The catch-up task: runs every event through the handlers until caught up (see
/// the module docs), recording progress in `gate`.
pub(crate) async fn catch_up(
    runner: Runner,
    mut events: EventReplay,
    gate: Arc<CatchUpGate>,
    stop: CancellationToken,
) -> Result<ReplayProgress, ReplayError> {
    let started = Instant::now();
    gate.started(events.start_after(), events.total_at_start() == 0);
    info!(
        stream = %events.stream_name(),
        filters = ?events.filters(),
        after = events.start_after(),
        events = events.total_at_start(),
        "replay: catching up"
    );
    if !gate.progress().caught_up {
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => {
                    let progress = gate.progress();
                    info!(through = progress.replayed_through, "replay: stopped by shutdown before catching up");
                    return Ok(progress);
                }
                next = events.next() => next,
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    gate.failed(e.to_string());
                    return Err(e);
                }
                None => {
                    let e = ReplayError::Read {
                        stream: events.stream_name().to_owned(),
                        after_seq: events.last_seq(),
                        source: "the replay consumer ended".into(),
                    };
                    gate.failed(e.to_string());
                    return Err(e);
                }
            };
            let (seq, pending) = (event.stream_seq, event.pending);
            let outcome = runner.run_event(event, &stop).await;
            if gate.done(seq, pending, outcome) {
                break;
            }
        }
    }
    let progress = gate.progress();
    info!(
        through = progress.replayed_through,
        events = progress.events,
        handler_calls = progress.handler_calls,
        dead_lettered = progress.dead_lettered,
        elapsed = ?started.elapsed(),
        "replay: caught up; serving live events"
    );
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_runs_new_skips_duplicates_and_waits_for_the_catch_up() {
        let gate = Arc::new(CatchUpGate::new());
        gate.started(10, false);
        // During the catch-up: a delivery at 12 waits for the catch-up to reach it.
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.live(12, Duration::from_secs(5)).await })
        };
        // The catch-up reaches the head (pending 0) at 11, but 12 was promised: not over.
        tokio::task::yield_now().await;
        while gate.promised.load(Ordering::SeqCst) < 12 {
            tokio::task::yield_now().await;
        }
        assert!(!gate.done(11, 0, EventOutcome::default()));
        assert!(gate.done(12, 0, EventOutcome::default()));
        match waiting.await.unwrap() {
            Live::Answered(m) => assert!(m.starts_with("replayed"), "{m}"),
            Live::Run => panic!("a replayed event must not run again"),
        }
        assert!(matches!(
            gate.live(12, Duration::from_secs(5)).await,
            Live::Answered(_)
        ));
        assert!(matches!(
            gate.live(13, Duration::from_secs(5)).await,
            Live::Run
        ));
        assert!(matches!(
            gate.live(0, Duration::from_secs(5)).await,
            Live::Run
        ));
        let p = gate.progress();
        assert_eq!((p.replayed_through, p.events, p.caught_up), (12, 2, true));
    }

    #[tokio::test]
    async fn a_delivery_the_catch_up_is_far_from_is_answered_and_held() {
        let gate = CatchUpGate::new();
        gate.started(0, false);
        match gate.live(50, Duration::from_millis(50)).await {
            Live::Answered(m) => assert!(m.starts_with("queued for the replay"), "{m}"),
            Live::Run => panic!("must not run during the catch-up"),
        }
        // Pending 0 at 40 does not end the catch-up: 50 was answered for.
        assert!(!gate.done(40, 0, EventOutcome::default()));
        assert!(gate.done(50, 0, EventOutcome::default()));
    }
}
