//! The latest event of every object: a last-per-subject read of the events
//! stream, grouped by `Pagoda-Object`, bounded by the stream's last sequence B
//! read after the consumer exists, then (optionally) on from B + 1
//! ([`latest_events`]). The plugin SDK's backfill runs a plugin's handlers over
//! it; `hookbus replay --latest-per-object` prints it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use core_events::protocol::headers;
use core_events::{Hook, ObjectKey, Subjects};
use futures::StreamExt;
use tracing::{debug, warn};

use crate::replay::{self, EventReplay, ReplayError, ReplayFrom, ReplayedEvent};

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
pub struct Opened {
    /// The last-per-subject consumer (`None` when there is nothing to read).
    pub messages: Option<pull::Ordered>,
    /// The events stream's name.
    pub stream: String,
    /// The filter subjects.
    pub filters: Vec<String>,
    /// The bound B: the stream's last sequence, read after the consumer was created.
    pub through: u64,
}

/// Creates the last-per-subject consumer, then reads the bound (steps 1–2 of the
/// module docs).
pub async fn open(
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
pub struct Latest {
    /// The events, in stream order.
    pub events: Vec<ReplayedEvent>,
    /// The bound B.
    pub through: u64,
    /// How many messages the read took.
    pub read: u64,
}

impl Opened {
    /// Reads up to the bound, keeping per object the highest sequence (steps 3–4).
    pub async fn collect(self) -> Result<Latest, ReplayError> {
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
pub async fn follow_from(
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
