//! Reading the events stream back: an ordered consumer over stored events,
//! filtered by hook, entity and object, from a position ([`ReplayFrom`]) up to the
//! head or on live ([`replay_events`], [`EventReplay`]). The plugin SDK runs a
//! plugin's handlers over it (its replay and start-up catch-up); `hookbus replay`
//! prints or re-delivers what it reads; `hookbus rebuild` applies it to a store.
#![allow(clippy::module_name_repetitions)]

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use core_events::{Envelope, HandlerSpec, Hook, ObjectKey, SubjectError, Subjects};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tracing::debug;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayFrom {
    /// The oldest event the stream still holds.
    #[default]
    Start,
    /// This stream sequence (`0` means the same as [`ReplayFrom::Start`]). A
    /// sequence the stream no longer holds is an error
    /// ([`ReplayError::BeforeOldest`]); one past the head waits for new events.
    /// For a plugin's catch-up, the events before it count as handled already
    /// (the plugin's own saved state has them): live deliveries of them are
    /// answered without running the handler.
    Sequence(u64),
    /// The first event stored at or after this time. A time before the oldest
    /// retained event, once the stream has removed older ones, is an error
    /// ([`ReplayError::BeforeOldest`]).
    Time(DateTime<Utc>),
}

impl fmt::Display for ReplayFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayFrom::Start | ReplayFrom::Sequence(0) => f.write_str("the start"),
            ReplayFrom::Sequence(n) => write!(f, "stream sequence {n}"),
            ReplayFrom::Time(t) => write!(f, "time {}", rfc3339(*t)),
        }
    }
}

/// What [`replay_events`] reads.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Where to start (default: the oldest retained event).
    pub from: ReplayFrom,
    /// Only these hooks (standard names; empty = every hook). Only notification
    /// hooks (`after_*`) have events.
    pub hooks: Vec<Hook>,
    /// Only events about these entities (exact names; empty = every entity).
    pub entities: Vec<String>,
    /// Only events about these objects (`entry/42`: one object's history; empty =
    /// every object).
    pub objects: Vec<ObjectKey>,
    /// `true` (the default): the stream of events ends after the last event that
    /// was in the stream when it was read (the server's `pending` count reached
    /// 0), or at once when nothing matches. `false`: it goes on with new events
    /// as they are stored, until dropped.
    pub until_caught_up: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            from: ReplayFrom::Start,
            hooks: Vec::new(),
            entities: Vec::new(),
            objects: Vec::new(),
            until_caught_up: true,
        }
    }
}

/// One stored event, as [`replay_events`] reads it: untouched bytes plus where
/// and when it was stored.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplayedEvent {
    /// The event subject as stored, `<prefix>.events.<object>.<action>.<entity-token>.<object-id>.<partition>`.
    pub subject: String,
    /// The event's headers as published (`Nats-Msg-Id`, `Pagoda-Object`, `Pagoda-Hook`,
    /// `Pagoda-Entity`, `traceparent`); empty when it had none.
    pub headers: HeaderMap,
    /// The CloudEvents envelope, as published.
    pub payload: Bytes,
    /// Its sequence in the events stream.
    pub stream_seq: u64,
    /// When the stream stored it.
    pub time: DateTime<Utc>,
    /// Matching events after this one in the stream when it was read: `0` means
    /// this was the last one (the replay had caught up then).
    pub pending: u64,
}

impl ReplayedEvent {
    /// An event as if read from the stream (for tests of code that consumes
    /// replays).
    pub fn new(
        subject: impl Into<String>,
        headers: HeaderMap,
        payload: Bytes,
        stream_seq: u64,
        time: DateTime<Utc>,
        pending: u64,
    ) -> Self {
        ReplayedEvent {
            subject: subject.into(),
            headers,
            payload,
            stream_seq,
            time,
            pending,
        }
    }

    /// Parses the payload as an envelope with untyped `data`.
    ///
    /// # Errors
    ///
    /// When the payload is not a CloudEvents envelope.
    pub fn envelope(&self) -> Result<Envelope<serde_json::Value>, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// Parses the payload as a typed envelope (`Envelope<EntryEvent>` for entry
    /// hooks, `Envelope<EntityEvent>` for entity hooks).
    ///
    /// # Errors
    ///
    /// When the payload is not an envelope of that shape.
    pub fn decode<D: DeserializeOwned>(&self) -> Result<Envelope<D>, serde_json::Error> {
        let mut envelope: Envelope<D> = serde_json::from_slice(&self.payload)?;
        envelope.pagodaseq = Some(self.stream_seq);
        Ok(envelope)
    }

    /// The hook and the (decoded) entity name, read from the subject.
    ///
    /// # Errors
    ///
    /// [`SubjectError::NotAnEventSubject`] for a subject that is not an event
    /// subject under `subjects`' prefix.
    pub fn hook_and_entity(&self, subjects: &Subjects) -> Result<(Hook, String), SubjectError> {
        subjects.parse_event(&self.subject)
    }

    /// A header of the event, when present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(HeaderValue::as_str)
    }
}

/// Why a replay could not start or go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The requested position is older than the oldest event the stream holds.
    #[error(
        "cannot replay from {requested}: stream '{stream}' no longer holds it; the oldest retained event is sequence {oldest_seq}{oldest_time} and older events were removed by the stream's retention ({retention}). Replay from sequence {oldest_seq} or later, or from the start to take everything retained"
    )]
    BeforeOldest {
        /// The events stream.
        stream: String,
        /// The position asked for.
        requested: ReplayFrom,
        /// The oldest sequence the stream holds (when it holds none: the next
        /// sequence it will store).
        oldest_seq: u64,
        /// `, stored <time>` for the oldest retained event, or `` (nothing retained).
        oldest_time: String,
        /// The stream's limits, e.g. `max_age 30d, max_bytes unlimited, max_msgs unlimited`.
        retention: String,
    },
    /// The events stream does not exist.
    #[error(
        "events stream '{stream}' does not exist: is the bus provisioned? (`hookbus run` or `hookbus provision` creates it)"
    )]
    MissingStream {
        /// The stream name.
        stream: String,
    },
    /// A hook that has no events (a synchronous hook) was asked for.
    #[error(
        "hook '{0}' is synchronous and has no events in the stream; replay takes notification hooks (after_*)"
    )]
    NotAnEventHook(Hook),
    /// An entity name cannot be used in a filter.
    #[error("bad filter: {0}")]
    Filter(#[from] SubjectError),
    /// Reading the stream's state failed.
    #[error("could not read stream '{stream}': {source}")]
    Stream {
        /// The stream name.
        stream: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::Error,
    },
    /// [`ServeOptions::backfill`](crate::ServeOptions::backfill) and
    /// [`ServeOptions::replay`](crate::ServeOptions::replay) were both set.
    #[error(
        "serve options ask for both a backfill and a replay from {0}: a plugin starts with one of them (backfill: the latest event of every object; replay: every event from a position)"
    )]
    BackfillWithReplay(ReplayFrom),
    /// The replay consumer could not be created.
    #[error("could not create the replay consumer on stream '{stream}': {source}")]
    Consumer {
        /// The stream name.
        stream: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::Error,
    },
    /// Reading events failed and the consumer could not recover.
    #[error(
        "reading stream '{stream}' failed after sequence {after_seq}: {source}; replay again from sequence {next}",
        next = after_seq + 1
    )]
    Read {
        /// The stream name.
        stream: String,
        /// The last sequence read before the failure (0: none).
        after_seq: u64,
        /// What async-nats reported.
        #[source]
        source: async_nats::Error,
    },
}

/// The subjects a replay filters on: the events of `hooks` (empty: all) about
/// `entities` (empty: all), without overlaps (the server rejects overlapping
/// filters).
///
/// # Errors
///
/// [`ReplayError::NotAnEventHook`] for a synchronous hook; [`ReplayError::Filter`]
/// for an entity name that cannot be encoded (empty or too long).
pub fn filter_subjects(
    subjects: &Subjects,
    hooks: &[Hook],
    entities: &[String],
) -> Result<Vec<String>, ReplayError> {
    filter_subjects_for(subjects, hooks, entities, &[])
}

/// [`filter_subjects`], narrowed to the events about `objects` (empty: all);
/// a hook about the other kind of object than one of `objects` has no events
/// about it and is left out for it.
///
/// # Errors
///
/// As [`filter_subjects`]; [`ReplayError::Filter`] when no hook has events about
/// any of `objects`.
pub fn filter_subjects_for(
    subjects: &Subjects,
    hooks: &[Hook],
    entities: &[String],
    objects: &[ObjectKey],
) -> Result<Vec<String>, ReplayError> {
    if let Some(h) = hooks.iter().find(|h| !h.kind().is_notification()) {
        return Err(ReplayError::NotAnEventHook(*h));
    }
    let mut hooks_unique: Vec<Hook> = Vec::new();
    for h in hooks {
        if !hooks_unique.contains(h) {
            hooks_unique.push(*h);
        }
    }
    let mut entities_unique: Vec<&str> = Vec::new();
    for e in entities {
        if !entities_unique.contains(&e.as_str()) {
            entities_unique.push(e);
        }
    }
    let hook_list: Vec<Option<Hook>> = if hooks_unique.is_empty() {
        vec![None]
    } else {
        hooks_unique.into_iter().map(Some).collect()
    };
    let entity_list: Vec<Option<&str>> = if entities_unique.is_empty() {
        vec![None]
    } else {
        entities_unique.into_iter().map(Some).collect()
    };
    let mut object_list: Vec<Option<ObjectKey>> = Vec::new();
    for o in objects {
        if !object_list.contains(&Some(*o)) {
            object_list.push(Some(*o));
        }
    }
    if object_list.is_empty() {
        object_list.push(None);
    }
    if hook_list == [None] && entity_list == [None] && object_list == [None] {
        return Ok(vec![subjects.all_events()]);
    }
    let mut out = Vec::with_capacity(hook_list.len() * entity_list.len() * object_list.len());
    let mut mismatch = None;
    for h in &hook_list {
        for e in &entity_list {
            for o in &object_list {
                match subjects.stored_event_filter(*h, *e, *o) {
                    Ok(f) => out.push(f),
                    Err(err @ SubjectError::ObjectNotOfHook { .. }) => mismatch = Some(err),
                    Err(err) => return Err(err.into()),
                }
            }
        }
    }
    match mismatch {
        Some(err) if out.is_empty() => Err(err.into()),
        _ => Ok(out),
    }
}

/// The union of the handlers' hooks and entity filters, without overlaps: one
/// subject per hook when a handler of that hook takes every entity, else one per
/// (hook, entity).
///
/// # Errors
///
/// As [`filter_subjects`].
pub fn handler_filter_subjects(
    subjects: &Subjects,
    handlers: &[HandlerSpec],
) -> Result<Vec<String>, ReplayError> {
    // Per hook, in first-declared order: None = every entity.
    let mut per_hook: Vec<(Hook, Option<Vec<String>>)> = Vec::new();
    // Synchronous handlers have no events to replay.
    for spec in handlers.iter().filter(|s| s.hook.kind().is_notification()) {
        let slot = match per_hook.iter_mut().find(|(h, _)| *h == spec.hook) {
            Some((_, slot)) => slot,
            None => {
                per_hook.push((spec.hook, Some(Vec::new())));
                match per_hook.last_mut() {
                    Some((_, slot)) => slot,
                    None => continue,
                }
            }
        };
        match (slot.as_mut(), &spec.entities) {
            (_, None) => *slot = None,
            (Some(names), Some(more)) => {
                for name in more {
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
            }
            (None, Some(_)) => {}
        }
    }
    let mut out = Vec::new();
    for (hook, entities) in per_hook {
        let entities = entities.unwrap_or_default();
        out.extend(filter_subjects(subjects, &[hook], &entities)?);
    }
    Ok(out)
}

/// Stored events, in stream order, from [`replay_events`]: a
/// [`Stream`](futures::Stream) of [`ReplayedEvent`]s.
///
/// With `until_caught_up` it ends after the last event that was stored when it
/// was read; otherwise it follows new events until dropped. An `Err` item is a
/// read failure the underlying ordered consumer could not recover from; the
/// stream may be polled again, but the caller should rather start a new replay
/// from the last sequence it has.
pub struct EventReplay {
    messages: pull::Ordered,
    stream: String,
    filters: Vec<String>,
    until_caught_up: bool,
    finished: bool,
    total: u64,
    start_after: u64,
    last_seq: u64,
}

impl fmt::Debug for EventReplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventReplay")
            .field("stream", &self.stream)
            .field("filters", &self.filters)
            .field("until_caught_up", &self.until_caught_up)
            .field("finished", &self.finished)
            .field("total", &self.total)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl EventReplay {
    /// How many matching events the stream held from the start position when the
    /// replay started (the server's count; for a progress bar).
    pub fn total_at_start(&self) -> u64 {
        self.total
    }

    /// The sequence just before the first one the replay can give (the start
    /// position minus one): events up to it are not part of this replay.
    pub fn start_after(&self) -> u64 {
        self.start_after
    }

    /// The highest sequence given so far (0: none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The events stream read.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The filter subjects of the replay consumer.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }
}

impl futures::Stream for EventReplay {
    type Item = Result<ReplayedEvent, ReplayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let next = match self.messages.poll_next_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(next) => next,
        };
        let message = match next {
            None => {
                self.finished = true;
                return Poll::Ready(None);
            }
            Some(Err(e)) => {
                return Poll::Ready(Some(Err(ReplayError::Read {
                    stream: self.stream.clone(),
                    after_seq: self.last_seq,
                    source: e.into(),
                })));
            }
            Some(Ok(message)) => message,
        };
        let (stream_seq, pending, time) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                info.pending,
                to_chrono(info.published),
            ),
            Err(e) => {
                return Poll::Ready(Some(Err(ReplayError::Read {
                    stream: self.stream.clone(),
                    after_seq: self.last_seq,
                    source: e,
                })));
            }
        };
        self.last_seq = stream_seq;
        if self.until_caught_up && pending == 0 {
            self.finished = true;
        }
        let message = message.message;
        Poll::Ready(Some(Ok(ReplayedEvent {
            subject: message.subject.to_string(),
            headers: message.headers.unwrap_or_default(),
            payload: message.payload,
            stream_seq,
            time,
            pending,
        })))
    }
}

/// Reads stored events from the events stream, oldest first, through an ordered
/// consumer (ephemeral, no acks, recreated by the client after a hiccup) filtered
/// by hooks and entities.
///
/// ```no_run
/// # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
/// use futures::{FutureExt, StreamExt};
/// use hookbus_kit::replay::{replay_events, ReplayOptions};
///
/// let mut events = replay_events(&js, &Default::default(), ReplayOptions::default()).await?;
/// while let Some(event) = events.next().await {
///     let event = event?;
///     println!("{} {}", event.stream_seq, event.subject);
/// }
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// [`ReplayError::BeforeOldest`] when `options.from` is older than the oldest
/// retained event (see [`ReplayFrom`]); [`ReplayError::MissingStream`],
/// [`ReplayError::Stream`] and [`ReplayError::Consumer`] when the stream cannot
/// be read; [`ReplayError::NotAnEventHook`] and [`ReplayError::Filter`] for bad
/// filters.
pub async fn replay_events(
    js: &jetstream::Context,
    subjects: &Subjects,
    options: ReplayOptions,
) -> Result<EventReplay, ReplayError> {
    let filters = filter_subjects_for(
        subjects,
        &options.hooks,
        &options.entities,
        &options.objects,
    )?;
    open(js, subjects, options.from, filters, options.until_caught_up).await
}

/// Opens a replay on explicit filter subjects.
pub async fn open(
    js: &jetstream::Context,
    subjects: &Subjects,
    from: ReplayFrom,
    filters: Vec<String>,
    until_caught_up: bool,
) -> Result<EventReplay, ReplayError> {
    let name = subjects.events_stream();
    let stream = events_stream(js, &name).await?;
    check_retained(&name, stream.cached_info(), from)?;
    let deliver_policy = match from {
        ReplayFrom::Start | ReplayFrom::Sequence(0) => DeliverPolicy::All,
        ReplayFrom::Sequence(n) => DeliverPolicy::ByStartSequence { start_sequence: n },
        ReplayFrom::Time(t) => DeliverPolicy::ByStartTime {
            start_time: to_nats_time(t).map_err(|source| ReplayError::Consumer {
                stream: name.clone(),
                source,
            })?,
        },
    };
    let (filter_subject, filter_subjects) = match filters.as_slice() {
        [one] => (one.clone(), Vec::new()),
        _ => (String::new(), filters.clone()),
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            description: Some("hook bus replay".to_owned()),
            filter_subject,
            filter_subjects,
            deliver_policy,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| ReplayError::Consumer {
            stream: name.clone(),
            source: e.into(),
        })?;
    let info = consumer.cached_info();
    let total = info.num_pending;
    let start_after = info.delivered.stream_sequence;
    debug!(stream = %name, ?filters, %from, total, start_after, "replay consumer created");
    let messages = consumer
        .messages()
        .await
        .map_err(|e| ReplayError::Consumer {
            stream: name.clone(),
            source: e.into(),
        })?;
    Ok(EventReplay {
        messages,
        stream: name,
        filters,
        until_caught_up,
        finished: until_caught_up && total == 0,
        total,
        start_after,
        last_seq: 0,
    })
}

/// The events stream `name`, or why it cannot be read ([`ReplayError::MissingStream`]
/// when it does not exist).
pub async fn events_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::stream::Stream, ReplayError> {
    js.get_stream(name).await.map_err(|e| {
        if matches!(
            e.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        ) {
            ReplayError::MissingStream {
                stream: name.to_owned(),
            }
        } else {
            ReplayError::Stream {
                stream: name.to_owned(),
                source: e.into(),
            }
        }
    })
}

/// Refuses a start position the stream no longer holds.
fn check_retained(
    stream: &str,
    info: &jetstream::stream::Info,
    from: ReplayFrom,
) -> Result<(), ReplayError> {
    let first = info.state.first_sequence;
    let dropped = first > 1;
    let held = info.state.messages > 0;
    let first_time = held.then(|| to_chrono(info.state.first_timestamp));
    let too_old = match from {
        ReplayFrom::Start | ReplayFrom::Sequence(0) => false,
        ReplayFrom::Sequence(n) => n < first,
        ReplayFrom::Time(t) => {
            dropped
                && match first_time {
                    Some(oldest) => t < oldest,
                    // Everything stored was removed: a time before the age limit
                    // asks for removed events.
                    None => {
                        let max_age = info.config.max_age;
                        !max_age.is_zero()
                            && chrono::Duration::from_std(max_age)
                                .is_ok_and(|age| t < Utc::now() - age)
                    }
                }
        }
    };
    if !too_old {
        return Ok(());
    }
    Err(ReplayError::BeforeOldest {
        stream: stream.to_owned(),
        requested: from,
        oldest_seq: first,
        oldest_time: match first_time {
            Some(t) => format!(", stored {}", rfc3339(t)),
            None => " (the stream holds no events now)".to_owned(),
        },
        retention: retention_text(&info.config),
    })
}

/// `max_age 30d, max_bytes unlimited, max_msgs unlimited`.
pub fn retention_text(config: &jetstream::stream::Config) -> String {
    let age = if config.max_age.is_zero() {
        "unlimited".to_owned()
    } else {
        format_duration(config.max_age)
    };
    let limit = |n: i64| {
        if n <= 0 {
            "unlimited".to_owned()
        } else {
            n.to_string()
        }
    };
    format!(
        "max_age {age}, max_bytes {}, max_msgs {}",
        limit(config.max_bytes),
        limit(config.max_messages)
    )
}

/// `30d`, `12h`, `90m`, `45s`, `1500ms`: the largest whole unit.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A NATS timestamp as a chrono time.
pub fn to_chrono(t: async_nats::datetime::DateTime) -> DateTime<Utc> {
    let nanos = t.unix_timestamp_nanos();
    let secs = i64::try_from(nanos.div_euclid(1_000_000_000)).unwrap_or_default();
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or_default();
    DateTime::from_timestamp(secs, sub).unwrap_or_default()
}

fn to_nats_time(t: DateTime<Utc>) -> Result<async_nats::datetime::DateTime, async_nats::Error> {
    let nanos = i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos());
    async_nats::datetime::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_have_no_overlaps() {
        let s = Subjects::default();
        assert_eq!(filter_subjects(&s, &[], &[]).unwrap(), ["pagoda.events.>"]);
        assert_eq!(
            filter_subjects(
                &s,
                &[Hook::EntryAfterCreate, Hook::EntryAfterCreate],
                &["a b".to_owned()]
            )
            .unwrap(),
            ["pagoda.events.entry.after_create.a%20b.>"]
        );
        assert_eq!(
            filter_subjects(&s, &[], &["x".to_owned(), "x".to_owned()]).unwrap(),
            ["pagoda.events.*.*.x.>"]
        );
        let entry42: ObjectKey = "entry/42".parse().unwrap();
        assert_eq!(
            filter_subjects_for(&s, &[], &[], &[entry42, entry42]).unwrap(),
            ["pagoda.events.entry.*.*.42.*"]
        );
        assert_eq!(
            filter_subjects_for(
                &s,
                &[Hook::EntryAfterUpdate, Hook::EntityAfterUpdate],
                &[],
                &[entry42]
            )
            .unwrap(),
            ["pagoda.events.entry.after_update.*.42.*"]
        );
        let err = filter_subjects_for(&s, &[Hook::EntityAfterUpdate], &[], &[entry42]).unwrap_err();
        assert!(
            err.to_string().contains("has no events about entry/42"),
            "{err}"
        );
        let err = filter_subjects(&s, &[Hook::EntryValidate], &[]).unwrap_err();
        assert!(err.to_string().contains("synchronous"), "{err}");
        assert!(filter_subjects(&s, &[], &[String::new()]).is_err());

        let mut all = HandlerSpec::new("a", Hook::EntryAfterCreate);
        let mut some = HandlerSpec::new("b", Hook::EntryAfterCreate);
        some.entities = Some(vec!["customer".into()]);
        let mut other = HandlerSpec::new("c", Hook::EntityAfterUpdate);
        other.entities = Some(vec!["x".into(), "y".into()]);
        let mut other2 = HandlerSpec::new("d", Hook::EntityAfterUpdate);
        other2.entities = Some(vec!["y".into(), "z".into()]);
        assert_eq!(
            handler_filter_subjects(&s, &[some.clone(), all.clone(), other, other2]).unwrap(),
            [
                "pagoda.events.entry.after_create.*.>",
                "pagoda.events.entity.after_update.x.>",
                "pagoda.events.entity.after_update.y.>",
                "pagoda.events.entity.after_update.z.>",
            ]
        );
        all.entities = Some(vec!["customer".into()]);
        assert_eq!(
            handler_filter_subjects(&s, &[some, all]).unwrap(),
            ["pagoda.events.entry.after_create.customer.>"]
        );
    }

    #[test]
    fn durations_and_positions_read_well() {
        assert_eq!(format_duration(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(format_duration(Duration::from_secs(7_200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(ReplayFrom::Sequence(0).to_string(), "the start");
        assert_eq!(ReplayFrom::Sequence(7).to_string(), "stream sequence 7");
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(ReplayFrom::Time(t).to_string(), "time 2023-11-14T22:13:20Z");
        assert_eq!(to_chrono(to_nats_time(t).unwrap()), t);
    }
}
