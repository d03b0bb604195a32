//! Backfill: a plugin that joins late bootstraps from the **latest event of every
//! object**, then follows live events with no gap and no duplicate.
//!
//! A full replay ([`crate::replay`]) runs every stored event; a backfill runs one
//! event per object: the newest one, which carries the object's whole state
//! (an `after_create` or `after_update` event holds the full entry or entity).
//! An object whose latest event is an `after_delete` gets that event: the plugin
//! learns the object is gone (and may have never seen it before).
//!
//! | what | for |
//! |---|---|
//! | [`ServeOptions::backfill`](crate::ServeOptions::backfill) = `true` | a new plugin: its handlers run over the latest event of every object, then it serves live events (the hand-over is the [catch-up](crate::replay#the-catch-up-and-why-it-has-no-gap-and-no-duplicate)'s) |
//! | [`Plugin::backfill`] | the same handlers over the latest events, without serving |
//! | [`latest_events`] | the raw latest events as a [`Stream`](futures::Stream), filtered by hook, entity and object; with [`BackfillOptions::follow`], then every new event (`hookbus replay --latest-per-object`) |
//!
//! # How it reads the stream (the raw protocol)
//!
//! Event subjects carry the object (`<prefix>.events.entry.after_update.customer.42`,
//! stored with a partition token appended), so JetStream's *deliver last per
//! subject* gives the last stored event of every (object, action, entity). One
//! object has several such subjects (its last `after_create`, its last
//! `after_update`, …), so the backfill keeps, per object, only the event with the
//! highest stream sequence. The object is the event's `Pagoda-Object` header
//! (`entry/42`; every event has it), else the envelope's `subject`: the backfill
//! never parses subjects.
//!
//! 1. Create an ordered consumer on the events stream with
//!    `deliver_policy: last_per_subject`, filtered by the handlers' subjects.
//! 2. **Then** read the stream's last sequence `B` (`state.last_seq`). Every
//!    event up to `B` is either the last of its subject when the consumer was
//!    created (delivered first) or was stored after it (delivered after those,
//!    as a last-per-subject consumer goes on with every new event): for every
//!    object, its latest event up to `B` is among the delivered ones. (Reading `B`
//!    before creating the consumer would miss an object whose subject got a
//!    newer event in between.)
//! 3. Read in stream order until an event with sequence `>= B`, or one the
//!    server reports as the last pending (`num_pending == 0`); nothing to read
//!    when the consumer's `num_pending` is 0 once `B` is known. Events after `B`
//!    are left out: they come live.
//! 4. Per object, keep the event with the highest sequence; run them in stream
//!    order.
//! 5. Everything up to `B` counts as done; follow from `B + 1`: a consumer with
//!    `deliver_policy: by_start_sequence`, `opt_start_seq: B + 1` (the raw form),
//!    or, for a plugin, the catch-up from `B + 1` while live deliveries of
//!    sequence `<= B` are answered without running the handler.
//!
//! So each object's latest state as of `B` is handled once, and every later
//! event once, in order. The backfill holds one event per object in memory
//! (the latest) until it has read up to `B`.
//!
//! # Example: a new plugin bootstraps its index
//!
//! ```no_run
//! use pagoda_plugin_sdk::{Hook, Plugin, ServeOptions};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let plugin = Plugin::builder("search-index", "Search index", "1.0.0")
//!     .on_entry(Hook::EntryAfterCreate, "created", |ctx| async move {
//!         tracing::info!(id = ctx.event.data.entry.id, replay = ctx.is_replay, "index");
//!         Ok(())
//!     })
//!     .on_entry(Hook::EntryAfterUpdate, "updated", |ctx| async move {
//!         tracing::info!(id = ctx.event.data.entry.id, replay = ctx.is_replay, "reindex");
//!         Ok(())
//!     })
//!     .on_entry(Hook::EntryAfterDelete, "deleted", |ctx| async move {
//!         tracing::info!(id = ctx.event.data.entry.id, "drop from the index");
//!         Ok(())
//!     })
//!     .build()?;
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let options = ServeOptions { backfill: true, ..ServeOptions::default() };
//! let running = plugin.serve(client.clone(), options).await?;
//! if let Some(progress) = running.wait_caught_up().await {
//!     tracing::info!(objects = progress.events, through = progress.replayed_through, "backfilled");
//! }
//! # running.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Example: the raw latest events
//!
//! ```no_run
//! use futures::TryStreamExt;
//! use pagoda_plugin_sdk::backfill::{BackfillOptions, latest_events};
//! use pagoda_plugin_sdk::Hook;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let options = BackfillOptions {
//!     entities: vec!["customer".to_owned()],
//!     ..BackfillOptions::default()
//! };
//! let mut events = latest_events(&js, &Default::default(), options).await?;
//! println!("{} objects as of sequence {}", events.latest_count(), events.through());
//! while let Some(event) = events.try_next().await? {
//!     println!("{} {:?}", event.stream_seq, event.header("Pagoda-Object"));
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use core_events::protocol::headers;
use core_events::{Hook, ObjectKey, Subjects};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plugin::Plugin;
use crate::replay::{
    self, CatchUpGate, EventReplay, ReplayError, ReplayFrom, ReplayProgress, ReplayedEvent, Runner,
};

/// What [`latest_events`] reads.
#[derive(Debug, Clone, Default)]
pub struct BackfillOptions {
    /// Only these hooks (empty: every notification hook). The latest event of an
    /// object is then the latest *of these hooks*.
    pub hooks: Vec<Hook>,
    /// Only objects of these entities (exact names; empty: every entity).
    pub entities: Vec<String>,
    /// Only these objects (`entry/42`; empty: every object).
    pub objects: Vec<ObjectKey>,
    /// `false` (the default): the stream ends after the latest events.
    /// `true`: it goes on with every event stored after [`LatestEvents::through`],
    /// until dropped.
    pub follow: bool,
}

/// The backfill consumer, created, with its bound `B` read after it.
pub(crate) struct Opened {
    messages: Option<pull::Ordered>,
    stream: String,
    filters: Vec<String>,
    through: u64,
}

/// Creates the last-per-subject consumer, then reads the bound (steps 1–2 of the
/// module docs).
pub(crate) async fn open(
    js: &jetstream::Context,
    subjects: &Subjects,
    filters: Vec<String>,
) -> Result<Opened, ReplayError> {
    let name = subjects.events_stream();
    let stream = replay::events_stream(js, &name).await?;
    let (filter_subject, filter_subjects) = match filters.as_slice() {
        [one] => (one.clone(), Vec::new()),
        _ => (String::new(), filters.clone()),
    };
    let consumer_error = |e: async_nats::Error| ReplayError::Consumer {
        stream: name.clone(),
        source: e,
    };
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            description: Some("hook bus backfill".to_owned()),
            filter_subject,
            filter_subjects,
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| consumer_error(e.into()))?;
    // The bound is read after the consumer exists (see the module docs).
    let through = stream
        .get_info()
        .await
        .map_err(|e| ReplayError::Stream {
            stream: name.clone(),
            source: e.into(),
        })?
        .state
        .last_sequence;
    let pending = consumer
        .info()
        .await
        .map_err(|e| consumer_error(e.into()))?
        .num_pending;
    let messages = if pending == 0 {
        None
    } else {
        Some(
            consumer
                .messages()
                .await
                .map_err(|e| consumer_error(e.into()))?,
        )
    };
    debug!(stream = %name, ?filters, through, pending, "backfill consumer created");
    Ok(Opened {
        messages,
        stream: name,
        filters,
        through,
    })
}

/// The latest event of every object up to the bound, in stream order.
pub(crate) struct Latest {
    events: Vec<ReplayedEvent>,
    through: u64,
    read: u64,
}

impl Opened {
    /// Reads up to the bound, keeping per object the highest sequence (steps 3–4).
    pub(crate) async fn collect(self) -> Result<Latest, ReplayError> {
        let Opened {
            messages,
            stream,
            through,
            ..
        } = self;
        let mut latest: HashMap<String, ReplayedEvent> = HashMap::new();
        let mut read = 0u64;
        let mut last_seq = 0u64;
        if let Some(mut messages) = messages {
            let read_error = |after_seq: u64, source: async_nats::Error| ReplayError::Read {
                stream: stream.clone(),
                after_seq,
                source,
            };
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| read_error(last_seq, e.into()))?;
                let info = message.info().map_err(|e| read_error(last_seq, e))?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                let time = replay::to_chrono(info.published);
                if seq > through {
                    break;
                }
                last_seq = seq;
                read += 1;
                let message = message.message;
                let event = ReplayedEvent::new(
                    message.subject.to_string(),
                    message.headers.unwrap_or_default(),
                    message.payload,
                    seq,
                    time,
                    pending,
                );
                let object = object_of(&event);
                // Sequences only grow: the last one read is the latest.
                latest.insert(object, event);
                if seq >= through || pending == 0 {
                    break;
                }
            }
        }
        let mut events: Vec<ReplayedEvent> = latest.into_values().collect();
        events.sort_by_key(|e| e.stream_seq);
        Ok(Latest {
            events,
            through,
            read,
        })
    }
}

/// The object an event is about: `Pagoda-Object`, else the envelope's `subject`,
/// else `data.entry.id` / `data.entity.id`; an event without any is its own
/// object (kept, with a warning).
fn object_of(event: &ReplayedEvent) -> String {
    if let Some(object) = event.header(headers::OBJECT).filter(|o| !o.is_empty()) {
        return object.to_owned();
    }
    let envelope: serde_json::Value = serde_json::from_slice(&event.payload).unwrap_or_default();
    if let Some(subject) = envelope["subject"].as_str().filter(|s| !s.is_empty()) {
        return subject.to_owned();
    }
    for kind in ["entry", "entity"] {
        if let Some(id) = envelope["data"][kind]["id"].as_i64() {
            return format!("{kind}/{id}");
        }
    }
    warn!(
        seq = event.stream_seq,
        subject = %event.subject,
        "backfill: event names no object (no Pagoda-Object header, no subject, no data id); kept on its own"
    );
    format!("seq/{}", event.stream_seq)
}

/// The latest event of every object, then (with [`BackfillOptions::follow`])
/// every later event: a [`Stream`](futures::Stream) of [`ReplayedEvent`]s from
/// [`latest_events`]. In stream order throughout. In the latest events,
/// [`ReplayedEvent::pending`] is the number of them still to come.
pub struct LatestEvents {
    latest: VecDeque<ReplayedEvent>,
    count: usize,
    through: u64,
    read: u64,
    stream: String,
    filters: Vec<String>,
    live: Option<EventReplay>,
}

impl fmt::Debug for LatestEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatestEvents")
            .field("stream", &self.stream)
            .field("filters", &self.filters)
            .field("count", &self.count)
            .field("through", &self.through)
            .field("read", &self.read)
            .field("follow", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

impl LatestEvents {
    /// The bound `B`: the stream's last sequence when the backfill started. The
    /// latest events are each object's latest up to it; followed events come
    /// after it.
    pub fn through(&self) -> u64 {
        self.through
    }

    /// How many objects have a latest event (the events before following).
    pub fn latest_count(&self) -> usize {
        self.count
    }

    /// How many stored events the backfill read to find them (the last event of
    /// every subject, and events stored while it started).
    pub fn read(&self) -> u64 {
        self.read
    }

    /// The events stream.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The filter subjects.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }
}

impl futures::Stream for LatestEvents {
    type Item = Result<ReplayedEvent, ReplayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if let Some(event) = self.latest.pop_front() {
            return Poll::Ready(Some(Ok(event)));
        }
        match self.live.as_mut() {
            Some(live) => live.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

/// Reads the latest event of every object (see the module docs), filtered by
/// hook, entity and object as [`replay_events`](crate::replay::replay_events)
/// is; with [`BackfillOptions::follow`], then every event stored after them.
///
/// It returns once the latest events are read (they are held in memory, one per
/// object).
///
/// # Errors
///
/// [`ReplayError::MissingStream`], [`ReplayError::Stream`],
/// [`ReplayError::Consumer`] and [`ReplayError::Read`] when the stream cannot be
/// read; [`ReplayError::NotAnEventHook`] and [`ReplayError::Filter`] for bad
/// filters.
pub async fn latest_events(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: BackfillOptions,
) -> Result<LatestEvents, ReplayError> {
    let filters = replay::filter_subjects_for(
        subjects,
        &options.hooks,
        &options.entities,
        &options.objects,
    )?;
    let opened = open(js, subjects, filters.clone()).await?;
    let stream = opened.stream.clone();
    let Latest {
        events,
        through,
        read,
    } = opened.collect().await?;
    let live = if options.follow {
        Some(follow_from(js, subjects, through, filters.clone()).await?)
    } else {
        None
    };
    let count = events.len();
    let latest = events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.pending = (count - i - 1) as u64;
            e
        })
        .collect();
    Ok(LatestEvents {
        latest,
        count,
        through,
        read,
        stream,
        filters,
        live,
    })
}

/// A replay of every event after `through`, following new ones.
async fn follow_from(
    js: &jetstream::Context,
    subjects: &Subjects,
    through: u64,
    filters: Vec<String>,
) -> Result<EventReplay, ReplayError> {
    replay::open(
        js,
        subjects,
        ReplayFrom::Sequence(through + 1),
        filters,
        false,
    )
    .await
}

/// A plugin's backfill, then its catch-up from `B + 1` (started by
/// [`Plugin::serve`] with [`ServeOptions::backfill`](crate::ServeOptions::backfill)).
pub(crate) async fn backfill_then_catch_up(
    runner: Runner,
    opened: Opened,
    gate: Arc<CatchUpGate>,
    stop: CancellationToken,
) -> Result<ReplayProgress, ReplayError> {
    let started = tokio::time::Instant::now();
    let (stream, filters) = (opened.stream.clone(), opened.filters.clone());
    info!(%stream, ?filters, through = opened.through, "backfill: reading the latest event of every object");
    let collected = tokio::select! {
        () = stop.cancelled() => {
            info!("backfill: stopped by shutdown");
            return Ok(gate.progress());
        }
        collected = opened.collect() => collected,
    };
    let latest = match collected {
        Ok(latest) => latest,
        Err(e) => {
            gate.failed(e.to_string());
            return Err(e);
        }
    };
    let (count, through) = (latest.events.len(), latest.through);
    gate.backfill_through(through);
    for event in latest.events {
        if stop.is_cancelled() {
            info!(
                through = gate.progress().replayed_through,
                "backfill: stopped by shutdown"
            );
            return Ok(gate.progress());
        }
        let seq = event.stream_seq;
        let outcome = runner.run_event(event, &stop).await;
        // Never the end: the catch-up from B + 1 decides that.
        gate.done(seq, 1, outcome);
    }
    info!(
        objects = count,
        read = latest.read,
        through,
        elapsed = ?started.elapsed(),
        "backfill: latest events done; catching up from the next sequence"
    );
    // Every event up to B is covered: it is an object's latest (run) or older.
    gate.started(through, false);
    let events = match follow_from(&runner.js, &runner.subjects, through, filters).await {
        Ok(events) => events,
        Err(e) => {
            gate.failed(e.to_string());
            return Err(e);
        }
    };
    replay::catch_up(runner, events, gate, stop).await
}

impl Plugin {
    /// Runs this plugin's handlers over the latest event of every object (each
    /// handler's hooks and entity filter, as a replay), without serving and
    /// without any live delivery, in stream order, with
    /// [`EventContext::is_replay`](crate::EventContext::is_replay) set; failures
    /// are retried and dead-lettered as in a replay. The result's
    /// `replayed_through` is the bound `B`: go on from `B + 1`
    /// ([`ReplayFrom::Sequence`]) to miss nothing.
    ///
    /// ```no_run
    /// # async fn example(plugin: pagoda_plugin_sdk::Plugin) -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let done = plugin.backfill(&client, &Default::default()).await?;
    /// println!("{} objects, as of sequence {}", done.events, done.replayed_through);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`latest_events`].
    pub async fn backfill(
        &self,
        client: &async_nats::Client,
        subjects: &Subjects,
    ) -> Result<ReplayProgress, ReplayError> {
        let runner = self.runner(client, subjects);
        let opened = self.open_backfill(&runner, subjects).await?;
        let latest = opened.collect().await?;
        let stop = CancellationToken::new();
        let mut progress = ReplayProgress {
            replayed_through: latest.through,
            backfill_through: Some(latest.through),
            caught_up: true,
            ..ReplayProgress::default()
        };
        for event in latest.events {
            let outcome = runner.run_event(event, &stop).await;
            progress.events += 1;
            progress.handler_calls += outcome.calls;
            progress.dead_lettered += outcome.dead_lettered;
        }
        Ok(progress)
    }

    /// Opens the backfill consumer on the handlers' subjects.
    pub(crate) async fn open_backfill(
        &self,
        runner: &Runner,
        subjects: &Subjects,
    ) -> Result<Opened, ReplayError> {
        let filters = replay::handler_filter_subjects(subjects, &self.inner.manifest.handlers)?;
        open(&runner.js, subjects, filters).await
    }
}
