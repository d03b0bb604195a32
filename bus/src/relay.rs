//! The outbox relay: publishes committed `hookbus_outbox` rows into the events
//! stream and deletes them once the stream has acknowledged them.
//!
//! Guarantees:
//! - **Nothing lost.** A row is deleted only after JetStream acknowledged it. A
//!   publish that fails or times out leaves the row; it is sent again after a
//!   back-off (NATS down: the outbox grows, the relay drains it in order when NATS
//!   is back).
//! - **Nothing twice.** `Nats-Msg-Id` is the event id, so a row sent again (the
//!   relay died between publish and delete, or two relays run) is dropped by the
//!   stream's duplicate window, which must be longer than a relay restart
//!   (default 2 minutes, `StreamSettings::duplicate_window`).
//! - **Per-object order.** Rows are read in id order, always from the lowest id
//!   still in the table, and an object has at most one publish in flight: its
//!   next row is sent only after the previous one is acknowledged as stored. So
//!   even a failed or timed-out publish cannot let a later event of the object
//!   overtake it, and two relays on one database cannot either (each sends an
//!   object's event only after the stream holds the one before). Objects are
//!   independent, so many publishes are in flight at once.
//! - **Low latency when idle.** PostgreSQL: `LISTEN hookbus_outbox` (a trigger
//!   notifies on insert). SQLite: the store of this process wakes the relay on
//!   commit, and a short poll finds other writers' rows.
//!
//! A row that cannot be published (unknown hook, bad object key, a payload that
//! is not JSON, an entity name too long for a subject, a message larger than the
//! server's `max_payload` or the events stream's largest message) is moved to the
//! dead-letter stream under `<prefix>.dlq._relay.invalid` with the reason, then
//! deleted. Never does such a row hold up the rows behind it: should even the
//! dead letter fail (NATS down, no permission), the row stays in the outbox, is
//! set aside (counted in [`RelayStats::parked`], logged) and tried again after a
//! back-off of its own, while the other rows flow.
//!
//! The relay creates no table: it waits until `hookbus_outbox` exists (created
//! by `hookbus migrate` or by the host with the DDL of `docs/outbox.md`) and
//! checks that it has the contract's columns ([`outbox::check_table`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use core_events::{EventId, Hook, ObjectKey, Subjects};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use store::{Backend, OUTBOX_CHANNEL, OutboxRow, Store, StoreError, outbox};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::publish::EncodedEvent;
/// The relay's counters live with the bus's others ([`crate::stats`]).
pub use crate::stats::RelayStats;

/// Settings of the relay.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows read per query.
    pub batch_size: usize,
    /// Most rows read and not yet deleted (publishes in flight plus rows waiting
    /// behind an earlier row of their object).
    pub max_in_flight: usize,
    /// How often the outbox is polled when nothing woke the relay (rows written by
    /// other processes on SQLite; a fallback to `LISTEN` on PostgreSQL).
    pub poll_interval: Duration,
    /// First wait after a failed publish or query; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest wait between retries.
    pub backoff_max: Duration,
    /// How often the backlog (rows, oldest age) is measured.
    pub backlog_interval: Duration,
    /// Largest message the events stream takes when its configuration cannot be
    /// read at start (`StreamSettings::max_event_bytes`); otherwise the stream's
    /// own `max_msg_size` is used. Either way no message larger than the server's
    /// `max_payload` is sent: a larger row (payload and headers) is dead-lettered
    /// instead of being retried forever.
    pub max_payload_bytes: usize,
    /// How long published rows may wait to be deleted together when fewer than a
    /// batch are waiting: under a trickle of writes, one delete per row would
    /// double the writes the database takes (on SQLite, its single writer).
    pub delete_linger: Duration,
}

impl RelaySettings {
    /// Defaults for a backend, taking the largest payload from the streams'
    /// settings (what `hookbus run` and `hookbus relay` use).
    pub fn for_deployment(backend: Backend, streams: &crate::config::StreamSettings) -> Self {
        RelaySettings {
            max_payload_bytes: usize::try_from(streams.max_event_bytes).unwrap_or(usize::MAX),
            ..RelaySettings::for_backend(backend)
        }
    }

    /// Defaults for a backend: SQLite polls every 50 ms, PostgreSQL relies on
    /// `LISTEN` and polls every second.
    pub fn for_backend(backend: Backend) -> Self {
        RelaySettings {
            batch_size: 512,
            max_in_flight: 4096,
            poll_interval: match backend {
                Backend::Sqlite => Duration::from_millis(50),
                Backend::Postgres => Duration::from_secs(1),
            },
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            backlog_interval: Duration::from_secs(1),
            max_payload_bytes: 1024 * 1024,
            delete_linger: Duration::from_millis(20),
        }
    }
}

/// A relay failure that stops it (everything else is retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The database could not be reached at start.
    #[error("outbox relay: {0}")]
    Store(#[from] StoreError),
    /// `hookbus_outbox` lacks columns of the contract (`docs/outbox.md`).
    #[error(
        "outbox relay: the table hookbus_outbox has no column {}; create it with the DDL of docs/outbox.md",
        .0.join(", ")
    )]
    Table(Vec<&'static str>),
}

/// The outbox relay.
#[derive(Debug)]
pub struct Relay {
    store: Store,
    js: jetstream::Context,
    subjects: Subjects,
    settings: RelaySettings,
    stats: Arc<RelayStats>,
    gauges: Option<crate::metrics::RelayGauges>,
    /// The events stream's largest message, read at start.
    stream_max: AtomicU64,
    /// Whether the table has the optional `tracestate` column (read at start).
    tracestate: AtomicBool,
    /// The connection (its `max_payload`, from the server's `INFO`).
    client: async_nats::Client,
    /// Where a panic of the relay's `LISTEN` task is counted (the bus's own
    /// counter with [`Relay::with_task_panics`]).
    panics: Arc<crate::stats::TaskPanics>,
}

/// A row ready to send.
struct Ready {
    id: i64,
    object: Arc<str>,
    event: EncodedEvent,
}

/// A publish's result: duplicate or not, or why it failed.
type Outcome = (i64, Arc<str>, Result<bool, PublishFailed>);

/// Why a publish failed, and whether for good (the message is larger than the
/// server or the stream takes: the row is dead-lettered instead of retried).
#[derive(Debug)]
struct PublishFailed {
    error: jetstream::context::PublishError,
    permanent: bool,
}

impl PublishFailed {
    fn new(error: jetstream::context::PublishError) -> Self {
        // JetStream's "message size exceeds maximum allowed" (error code 10054:
        // the stream's max_msg_size was lowered since the relay read it).
        let permanent = error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
            || error.to_string().contains("error code 10054");
        PublishFailed { error, permanent }
    }
}

impl Relay {
    /// A relay of `store`'s outbox into the events stream of `subjects`.
    pub fn new(
        store: Store,
        js: jetstream::Context,
        subjects: Subjects,
        settings: RelaySettings,
    ) -> Self {
        let stream_max = AtomicU64::new(settings.max_payload_bytes as u64);
        let client = js.client();
        // Healthy until shown otherwise (a failed check, read or publish), so the
        // bus does not report a relay that has not run yet as failing.
        let stats = RelayStats {
            healthy: AtomicBool::new(true),
            database_ok: AtomicBool::new(true),
            ..RelayStats::default()
        };
        Relay {
            store,
            js,
            subjects,
            settings,
            stats: Arc::new(stats),
            gauges: None,
            stream_max,
            tracestate: AtomicBool::new(false),
            client,
            panics: Arc::default(),
        }
    }

    /// Counts a panic of the relay's `LISTEN` task (restarted, logged) in
    /// `panics`, the bus's counter (`hookbus_task_panics_total`).
    #[must_use]
    pub fn with_task_panics(mut self, panics: Arc<crate::stats::TaskPanics>) -> Self {
        self.panics = panics;
        self
    }

    /// Also keeps these Prometheus gauges (`/metrics`) up to date.
    #[must_use]
    pub fn with_gauges(mut self, gauges: crate::metrics::RelayGauges) -> Self {
        self.gauges = Some(gauges);
        self
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown`: then stops sending, waits for the publishes in
    /// flight and deletes what was acknowledged.
    ///
    /// # Errors
    ///
    /// Never after start: failures are logged, counted and retried.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        if !self.wait_for_table(&shutdown).await? {
            return Ok(());
        }
        self.read_stream_max().await;
        let wake = self.store.outbox_written();
        if self.store.backend() == Backend::Postgres {
            let url = self.store.url().to_owned();
            let notify = Arc::clone(&wake);
            let stop = shutdown.clone();
            crate::supervise::spawn_supervised(
                "relay listener",
                Arc::clone(&self.panics),
                shutdown.clone(),
                move || listen(url.clone(), Arc::clone(&notify), stop.clone()),
            );
        }
        let mut state = State {
            relay: &self,
            held: BTreeSet::new(),
            waiting: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            fetching: FuturesUnordered::new(),
            deleting: FuturesUnordered::new(),
            dead: FuturesUnordered::new(),
            parked: HashMap::new(),
            rejected: HashMap::new(),
            acked: Vec::new(),
            acked_since: None,
            deleted_during_read: Vec::new(),
            resetting: false,
            backoff: self.settings.backoff_min,
            retry_at: None,
        };
        self.stats.healthy.store(true, Ordering::Relaxed);
        self.stats.database_ok.store(true, Ordering::Relaxed);
        let mut backlog_tick = tokio::time::interval(self.settings.backlog_interval);
        backlog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A read is due: at start, after a full batch, a wake-up, a poll tick or a reset.
        let mut due = true;
        let mut next_poll = Instant::now() + self.settings.poll_interval;
        loop {
            if state.resetting && state.in_flight.is_empty() && state.fetching.is_empty() {
                state.reset();
                due = true;
            }
            state.release_parked();
            if due && state.can_fetch() {
                due = false;
                next_poll = Instant::now() + self.settings.poll_interval;
                state.start_fetch();
            }
            let batch = self.settings.batch_size;
            if state.acked.is_empty() {
                state.acked_since = None;
            } else if state.acked_since.is_none() {
                state.acked_since = Some(Instant::now());
            }
            let linger_over = state.acked_since.map(|t| t + self.settings.delete_linger);
            if state.deleting.is_empty()
                && (state.acked.len() >= batch
                    || (state.in_flight.is_empty()
                        && linger_over.is_some_and(|t| t <= Instant::now())))
            {
                state.start_delete();
                state.acked_since = None;
            }
            let mut wait_until = state
                .retry_at
                .map_or(next_poll, |t| t.max(next_poll.min(t)));
            if let (Some(t), true) = (state.acked_since, state.deleting.is_empty()) {
                wait_until = wait_until.min(t + self.settings.delete_linger);
            }
            if let Some(t) = state
                .parked
                .values()
                .filter(|p| p.waiting)
                .map(|p| p.retry_at)
                .min()
            {
                wait_until = wait_until.min(t);
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(outcome) = state.in_flight.next() => {
                    state.settle(outcome).await;
                    // Settle whatever else is ready without waiting.
                    while let Some(Some(outcome)) = state.in_flight.next().now_or_never() {
                        state.settle(outcome).await;
                    }
                }
                Some(rows) = state.fetching.next() => due |= state.accept(rows).await,
                Some((id, result)) = state.dead.next() => state.dead_lettered(id, result),
                Some((ids, result)) = state.deleting.next() => state.deleted(ids, result),
                _ = backlog_tick.tick() => self.measure_backlog().await,
                () = wake.notified(), if !due => due = true,
                () = tokio::time::sleep_until(wait_until), if !due => due = true,
            }
        }
        // Shutdown: settle what is in flight (bounded by the publish timeout).
        while let Some(outcome) = state.in_flight.next().await {
            state.settle(outcome).await;
        }
        while let Some((id, result)) = state.dead.next().await {
            state.dead_lettered(id, result);
        }
        while let Some((ids, result)) = state.deleting.next().await {
            state.deleted(ids, result);
        }
        if !state.acked.is_empty() {
            state.start_delete();
            while let Some((ids, result)) = state.deleting.next().await {
                state.deleted(ids, result);
            }
        }
        self.measure_backlog().await;
        Ok(())
    }

    /// Waits until `hookbus_outbox` exists with the contract's columns. False
    /// when `shutdown` came first.
    async fn wait_for_table(&self, shutdown: &CancellationToken) -> Result<bool, RelayError> {
        let mut wait = self.settings.backoff_min;
        loop {
            match outbox::check_table(self.store.pool(), self.store.backend()).await {
                Ok(outbox::TableState::Ready) => {
                    // A table of the older contract has no `tracestate`: rows then carry none.
                    let has = outbox::has_tracestate(self.store.pool(), self.store.backend())
                        .await
                        .unwrap_or(false);
                    self.tracestate.store(has, Ordering::Relaxed);
                    return Ok(true);
                }
                Ok(outbox::TableState::MissingColumns(columns)) => {
                    return Err(RelayError::Table(columns));
                }
                Ok(outbox::TableState::Missing) => tracing::warn!(
                    "outbox relay: the table hookbus_outbox does not exist yet; waiting for it \
                     (`hookbus migrate` creates it with the reference host's tables, or create it \
                     with the DDL of docs/outbox.md)"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay: cannot read the database; retrying");
                }
            }
            self.stats.database_ok.store(false, Ordering::Relaxed);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(self.settings.backoff_max);
        }
    }

    /// Reads the events stream's largest message (kept from the settings when
    /// the stream cannot be read).
    async fn read_stream_max(&self) {
        match self.js.get_stream(self.subjects.events_stream()).await {
            Ok(stream) => {
                let max = stream.cached_info().config.max_message_size;
                let max = u64::try_from(max)
                    .ok()
                    .filter(|m| *m > 0)
                    .unwrap_or(u64::MAX);
                self.stream_max.store(max, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(
                error = %e,
                fallback = self.settings.max_payload_bytes,
                "outbox relay: cannot read the events stream's largest message size"
            ),
        }
    }

    /// The largest message (headers and payload) that can be published now: the
    /// server's `max_payload` or the stream's largest message.
    fn message_limit(&self) -> usize {
        let stream = usize::try_from(self.stream_max.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        self.client.max_payload().min(stream)
    }

    async fn measure_backlog(&self) {
        match outbox::backlog(self.store.pool()).await {
            Ok(b) => {
                self.stats.backlog_rows.store(b.rows, Ordering::Relaxed);
                self.stats
                    .backlog_oldest_ms
                    .store(b.oldest_age_us / 1000, Ordering::Relaxed);
                if let Some(g) = &self.gauges {
                    g.backlog_rows.set(b.rows);
                    g.parked_rows.set(self.stats.parked.load(Ordering::Relaxed));
                    g.oldest_row_age_seconds.set(b.oldest_age_us as f64 / 1e6);
                }
                if !self.stats.healthy.load(Ordering::Relaxed) && b.rows > 0 {
                    tracing::warn!(
                        backlog_rows = b.rows,
                        oldest_age_ms = b.oldest_age_us / 1000,
                        "outbox relay: publishing fails; the outbox keeps growing"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "outbox relay: cannot measure the backlog"),
        }
    }

    /// Turns a row into a message, or says why it cannot be published.
    fn prepare(&self, row: &OutboxRow) -> Result<EncodedEvent, RowError> {
        let hook = Hook::parse(&row.hook)?;
        if !hook.kind().is_notification() {
            return Err(RowError::NotNotification(row.hook.clone()));
        }
        let object: ObjectKey = row.object.parse()?;
        if object.kind != hook.object() {
            return Err(RowError::WrongObject {
                object: row.object.clone(),
                hook,
            });
        }
        let id: EventId = row.event_id.parse().map_err(|e| RowError::EventId {
            id: row.event_id.clone(),
            reason: format!("{e}"),
        })?;
        let limit = self.message_limit();
        if row.payload.len() > limit {
            return Err(RowError::TooLarge {
                size: row.payload.len(),
                limit,
            });
        }
        serde_json::from_str::<serde::de::IgnoredAny>(&row.payload)
            .map_err(|e| RowError::NotJson(e.to_string()))?;
        let event = EncodedEvent::from_parts(
            &self.subjects,
            hook,
            &row.entity,
            object,
            id,
            row.traceparent.as_deref(),
            Bytes::from(row.payload.clone()),
        )
        .map_err(|e| RowError::Encode(e.to_string()))?;
        let mut event = event;
        if let Some(ts) = row
            .tracestate
            .as_deref()
            .filter(|ts| ts.len() <= 512 && ts.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        {
            event.headers.insert(hookbus_kit::trace::TRACESTATE, ts);
        }
        let size = event.payload.len() + crate::publish::headers_len(&event.headers);
        if size > limit {
            return Err(RowError::TooLarge { size, limit });
        }
        Ok(event)
    }

    /// Moves an unpublishable row to the dead-letter stream: the returned future
    /// resolves once the stream stored it (or why not), so the relay goes on
    /// meanwhile.
    fn dead_letter(
        &self,
        row: &OutboxRow,
        error: &RowError,
    ) -> BoxFuture<'static, (i64, Result<(), async_nats::Error>)> {
        tracing::error!(
            outbox_id = row.id,
            event_id = %row.event_id,
            hook = %row.hook,
            object = %row.object,
            %error,
            "outbox relay: row cannot be published; moved to the dead-letter stream"
        );
        let body = serde_json::json!({
            "kind": "invalid_outbox_row",
            "error": error.to_string(),
            "event_id": row.event_id,
            "hook": row.hook,
            "entity": row.entity,
            "object": row.object,
            "outbox_id": row.id,
            "traceparent": row.traceparent,
            // A payload too large for the events stream is too large here too.
            "payload": truncated(&row.payload, MAX_DEAD_PAYLOAD),
            "payload_bytes": row.payload.len(),
            "failed_at": chrono::Utc::now(),
        });
        let (plugin, handler) = crate::nats_config::RELAY_DLQ;
        let subject = self.subjects.dead_letter(plugin, handler);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            core_events::protocol::headers::MSG_ID,
            format!("relay-invalid-{}", row.event_id).as_str(),
        );
        let js = self.js.clone();
        let id = row.id;
        Box::pin(async move {
            let sent = js
                .send_publish(
                    subject,
                    jetstream::message::PublishMessage::build()
                        .payload(Bytes::from(body.to_string()))
                        .headers(headers),
                )
                .await;
            let result = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(async_nats::Error::from),
                Err(e) => Err(e.into()),
            };
            (id, result)
        })
    }
}

type Fetched = Result<Vec<OutboxRow>, StoreError>;
type Deleted = (Vec<i64>, Result<u64, StoreError>);

/// Why an outbox row cannot be published; its dead letter carries this text.
#[derive(Debug, Clone, thiserror::Error)]
enum RowError {
    /// The hook column names no hook.
    #[error(transparent)]
    Hook(#[from] core_events::UnknownHook),
    /// A synchronous hook: never an event.
    #[error("hook '{0}' is not a notification (only after_* hooks are events)")]
    NotNotification(String),
    /// The object column is not an object key.
    #[error(transparent)]
    Object(#[from] core_events::ObjectKeyError),
    /// The object is of the other kind than the hook's.
    #[error("object '{object}' is not a {} (hook {})", .hook.object(), .hook.name())]
    WrongObject {
        /// The object column.
        object: String,
        /// The row's hook.
        hook: Hook,
    },
    /// The event id column is not a UUID.
    #[error("event_id '{id}' is not a UUID: {reason}")]
    EventId {
        /// The event id column.
        id: String,
        /// Why.
        reason: String,
    },
    /// Larger than the events stream takes.
    #[error(
        "message of {size} bytes (payload and headers) is larger than the events stream takes ({limit} bytes: the server's max_payload or the stream's largest message)"
    )]
    TooLarge {
        /// The message's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The payload column is not JSON.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// The event could not be encoded (subject, headers).
    #[error("{0}")]
    Encode(String),
    /// The stream refused it for good (too large for the server).
    #[error("{0}")]
    Refused(String),
}

/// An unpublishable row whose dead letter failed: when it is tried again.
struct Parked {
    retry_at: Instant,
    backoff: Duration,
    /// False while its next try is under way.
    waiting: bool,
}

/// Most payload bytes kept in an invalid row's dead letter.
const MAX_DEAD_PAYLOAD: usize = 64 * 1024;

/// At most `max` bytes of `s`, cut on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The relay loop's state.
struct State<'a> {
    relay: &'a Relay,
    /// Ids read and not yet deleted: never read again while held.
    held: BTreeSet<i64>,
    /// Per object with a publish in flight: its later rows, in id order.
    waiting: HashMap<Arc<str>, VecDeque<Ready>>,
    in_flight: FuturesUnordered<BoxFuture<'static, Outcome>>,
    /// The read in progress (at most one), so publishing goes on meanwhile.
    fetching: FuturesUnordered<BoxFuture<'static, Fetched>>,
    /// The delete in progress (at most one).
    deleting: FuturesUnordered<BoxFuture<'static, Deleted>>,
    /// Dead letters being stored (their rows are held meanwhile).
    dead: FuturesUnordered<BoxFuture<'static, (i64, Result<(), async_nats::Error>)>>,
    /// Unpublishable rows whose dead letter failed, by id: held (not read again)
    /// until their retry time.
    parked: HashMap<i64, Parked>,
    /// Rows the stream refused for good (too large), by id, with the reason:
    /// dead-lettered when read again.
    rejected: HashMap<i64, RowError>,
    /// Acknowledged ids to delete.
    acked: Vec<i64>,
    /// Since when `acked` has not been empty.
    acked_since: Option<Instant>,
    /// Deleted while a read was running (which may still return them): released
    /// from `held` once that read is handled.
    deleted_during_read: Vec<i64>,
    /// A publish failed: send nothing new, let the rest settle, then forget every
    /// unacknowledged row and read again from the table.
    resetting: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl State<'_> {
    /// A read may start: none running, no reset or back-off under way, and room
    /// for a batch (or nothing in flight at all).
    fn can_fetch(&mut self) -> bool {
        if let Some(t) = self.retry_at {
            if Instant::now() < t {
                return false;
            }
            self.retry_at = None;
        }
        let room = self
            .relay
            .settings
            .max_in_flight
            .saturating_sub(self.held.len());
        self.fetching.is_empty()
            && !self.resetting
            && (room >= self.relay.settings.batch_size || (room > 0 && self.in_flight.is_empty()))
    }

    fn start_fetch(&mut self) {
        let room = self.relay.settings.max_in_flight - self.held.len();
        let limit = self.relay.settings.batch_size.min(room);
        let pool = self.relay.store.pool().clone();
        let held = self.held.clone();
        let tracestate = self.relay.tracestate.load(Ordering::Relaxed);
        self.fetching.push(Box::pin(async move {
            outbox::fetch_rows(&pool, &held, limit, tracestate).await
        }));
    }

    fn start_delete(&mut self) {
        let ids = std::mem::take(&mut self.acked);
        let pool = self.relay.store.writer().clone();
        self.deleting.push(Box::pin(async move {
            let result = outbox::delete(&pool, &ids).await;
            (ids, result)
        }));
    }

    fn deleted(&mut self, ids: Vec<i64>, result: Result<u64, StoreError>) {
        match result {
            Ok(_) if !self.fetching.is_empty() => self.deleted_during_read.extend(ids),
            Ok(_) => {
                for id in ids {
                    self.held.remove(&id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: cannot delete published rows; retrying");
                self.acked.extend(ids);
                self.fail();
            }
        }
    }

    /// Sends or queues each row read. True when the batch was full (read again).
    async fn accept(&mut self, fetched: Fetched) -> bool {
        let rows = match fetched {
            Ok(rows) => {
                if !self.relay.stats.database_ok.swap(true, Ordering::Relaxed) {
                    tracing::info!("outbox relay: the database answers again");
                }
                rows
            }
            Err(e) => {
                if self.relay.stats.database_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "outbox relay: cannot read the outbox; retrying");
                }
                for id in std::mem::take(&mut self.deleted_during_read) {
                    self.held.remove(&id);
                }
                self.fail();
                return false;
            }
        };
        let full = rows.len() >= self.relay.settings.batch_size;
        for row in rows {
            if self.held.contains(&row.id) {
                continue;
            }
            let prepared = match self.rejected.remove(&row.id) {
                Some(error) => Err(error),
                None => self.relay.prepare(&row),
            };
            let ready = match prepared {
                Ok(event) if self.parked.remove(&row.id).is_some() => {
                    // Publishable after all (a larger max_payload since).
                    self.relay.stats.parked.fetch_sub(1, Ordering::Relaxed);
                    Ready {
                        id: row.id,
                        object: row.object.as_str().into(),
                        event,
                    }
                }
                Ok(event) => Ready {
                    id: row.id,
                    object: row.object.as_str().into(),
                    event,
                },
                Err(error) => {
                    // Held while its dead letter is stored; the rows behind it go on.
                    self.held.insert(row.id);
                    self.dead.push(self.relay.dead_letter(&row, &error));
                    continue;
                }
            };
            self.held.insert(ready.id);
            if self.resetting {
                // A publish failed meanwhile: read it again after the reset.
                self.held.remove(&ready.id);
            } else if let Some(queue) = self.waiting.get_mut(&ready.object) {
                queue.push_back(ready);
            } else {
                self.waiting
                    .insert(Arc::clone(&ready.object), VecDeque::new());
                self.send(ready).await;
            }
        }
        for id in std::mem::take(&mut self.deleted_during_read) {
            self.held.remove(&id);
        }
        full
    }

    async fn send(&mut self, ready: Ready) {
        let Ready {
            id,
            object,
            mut event,
        } = ready;
        // The producer span of the trace the outbox row started (only when traces
        // are exported): the message carries its context, not the row's.
        // No span when traces are off or the row's trace is not sampled: its
        // traceparent then goes on as it is.
        let span = match hookbus_kit::trace::traced_parent(&event.headers) {
            Some(parent) => publish_span(&mut event, parent),
            None => tracing::Span::none(),
        };
        let sent = self
            .relay
            .js
            .send_publish(
                event.subject,
                jetstream::message::PublishMessage::build()
                    .payload(event.payload)
                    .headers(event.headers),
            )
            .await;
        let fut: BoxFuture<'static, Outcome> = match sent {
            Ok(ack) => Box::pin(settle_ack(id, object, ack, span)),
            Err(e) => {
                hookbus_kit::trace::fail(&span, "publish_failed", &e.to_string());
                Box::pin(std::future::ready((id, object, Err(PublishFailed::new(e)))))
            }
        };
        self.in_flight.push(fut);
    }

    async fn settle(&mut self, (id, object, result): Outcome) {
        match result {
            Ok(duplicate) => {
                let counter = if duplicate {
                    &self.relay.stats.duplicates
                } else {
                    &self.relay.stats.published
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.acked.push(id);
                if !self.relay.stats.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("outbox relay: publishing again");
                }
                self.backoff = self.relay.settings.backoff_min;
                let next = self.waiting.get_mut(&object).and_then(VecDeque::pop_front);
                match next {
                    Some(ready) if !self.resetting => self.send(ready).await,
                    Some(ready) => {
                        // Not sent: forget it so it is read again after the reset.
                        self.held.remove(&ready.id);
                    }
                    None => {
                        self.waiting.remove(&object);
                    }
                }
            }
            Err(PublishFailed { error, permanent }) => {
                if permanent {
                    // Read again after the reset, and dead-lettered instead of sent.
                    tracing::warn!(outbox_id = id, %error, "outbox relay: the stream refuses this row for good");
                    self.rejected
                        .insert(id, RowError::Refused(error.to_string()));
                } else if self.relay.stats.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, "outbox relay: publish failed; backing off and retrying");
                }
                self.held.remove(&id);
                if let Some(queue) = self.waiting.remove(&object) {
                    for r in queue {
                        self.held.remove(&r.id);
                    }
                }
                self.fail();
            }
        }
    }

    /// A dead letter was stored (the row is deleted with the published ones) or
    /// failed (the row is set aside and tried again after its own back-off).
    fn dead_lettered(&mut self, id: i64, result: Result<(), async_nats::Error>) {
        let stats = &self.relay.stats;
        match result {
            Ok(()) => {
                stats.invalid.fetch_add(1, Ordering::Relaxed);
                if self.parked.remove(&id).is_some() {
                    stats.parked.fetch_sub(1, Ordering::Relaxed);
                }
                self.acked.push(id);
            }
            Err(error) => {
                stats.dead_letter_failures.fetch_add(1, Ordering::Relaxed);
                stats.errors.fetch_add(1, Ordering::Relaxed);
                let min = self.relay.settings.backoff_min;
                let max = self.relay.settings.backoff_max;
                let parked = self.parked.entry(id).or_insert_with(|| {
                    stats.parked.fetch_add(1, Ordering::Relaxed);
                    Parked {
                        retry_at: Instant::now(),
                        backoff: min,
                        waiting: true,
                    }
                });
                parked.retry_at = Instant::now() + parked.backoff;
                parked.waiting = true;
                tracing::error!(
                    outbox_id = id,
                    %error,
                    retry_in_ms = parked.backoff.as_millis() as u64,
                    "outbox relay: an unpublishable row cannot be dead-lettered either; \
                     it stays in the outbox and is tried again later, the other rows go on"
                );
                parked.backoff = (parked.backoff * 2).min(max);
            }
        }
    }

    /// Lets the parked rows whose time has come be read again.
    fn release_parked(&mut self) {
        let now = Instant::now();
        for (id, p) in &mut self.parked {
            if p.waiting && p.retry_at <= now {
                p.waiting = false;
                self.held.remove(id);
            }
        }
    }

    /// Enters back-off: nothing new is sent until the in-flight publishes settle
    /// and the wait is over.
    fn fail(&mut self) {
        self.relay.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.resetting = true;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(self.relay.settings.backoff_max);
    }

    /// After a failure, once nothing is in flight: forget every row not
    /// acknowledged, so the next read starts again from the table in id order.
    fn reset(&mut self) {
        for (_, queue) in self.waiting.drain() {
            for r in queue {
                self.held.remove(&r.id);
            }
        }
        self.resetting = false;
    }
}

async fn settle_ack(
    id: i64,
    object: Arc<str>,
    ack: PublishAckFuture,
    span: tracing::Span,
) -> Outcome {
    let result = ack.await.map(|a| a.duplicate).map_err(PublishFailed::new);
    if let Err(e) = &result {
        hookbus_kit::trace::fail(&span, "publish_failed", &e.error.to_string());
    }
    // The span ends here, with the stream's acknowledgement.
    drop(span);
    (id, object, result)
}

/// The relay's PRODUCER span of one event (`send <subject template>`), a child of
/// the context the outbox row stored (the host's request); its context replaces
/// the row's in the message's `traceparent` / `tracestate`, so the dispatcher's
/// span follows it.
fn publish_span(event: &mut EncodedEvent, parent: hookbus_kit::trace::Context) -> tracing::Span {
    let template = event.subject.rsplitn(3, '.').nth(2).map_or_else(
        || event.subject.clone(),
        |base| format!("{base}.{{entity}}.{{object_id}}"),
    );
    let span = tracing::info_span!(
        parent: None,
        "relay publish",
        otel.name = %format_args!("send {template}"),
        otel.kind = "producer",
        messaging.system = hookbus_kit::trace::fields::SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %event.subject,
        messaging.destination.template = %template,
        messaging.message.id = %event.id,
    );
    hookbus_kit::trace::follow(&span, parent);
    hookbus_kit::trace::inject(&span, &mut event.headers);
    span
}

/// Forwards PostgreSQL notifications of new outbox rows to `wake`; reconnects
/// after errors (the poll covers the gaps).
async fn listen(url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut wait = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(OUTBOX_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(mut l) => {
                wait = Duration::from_millis(200);
                wake.notify_one();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        n = l.recv() => match n {
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "outbox relay: LISTEN connection lost; polling until it is back");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: cannot LISTEN; polling instead");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}
