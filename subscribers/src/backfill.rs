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

use std::sync::Arc;

use core_events::Subjects;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::plugin::Plugin;
use crate::replay::{self, CatchUpGate, ReplayError, ReplayProgress, Runner};

pub use hookbus_kit::backfill::{BackfillOptions, LatestEvents, latest_events};
pub(crate) use hookbus_kit::backfill::{Opened, follow_from, open};

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
