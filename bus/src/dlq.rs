//! The dead-letter stream: listing, showing, replaying and purging dead letters.
//!
//! A replay sends the stored event to the one handler that failed it, as the
//! dispatcher would (same delivery headers, plus `Pagoda-Replay: true`), in one
//! attempt with the handler's timeout. On success the dead letter is deleted; on
//! failure a new dead letter with the attempt appended replaces it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use core_events::Subjects;
use core_events::protocol::{DeadLetter, FailedAttempt, headers};
use futures::StreamExt;

use crate::dispatch::deliver::{Attempt, delivery_headers, request};

/// One message of the dead-letter stream.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// `<prefix>.dlq.<plugin>.<handler>` (`<prefix>.dlq._bus.malformed` for unreadable events).
    pub subject: String,
    /// Its sequence in the dead-letter stream.
    pub seq: u64,
    /// The record (a [`core_events::protocol::DeadLetter`]), or `Null` when the
    /// body is not JSON (a malformed event keeps its original bytes).
    pub body: serde_json::Value,
}

impl StoredDeadLetter {
    /// The record, when the body is one.
    pub fn record(&self) -> Option<DeadLetter> {
        serde_json::from_value(self.body.clone()).ok()
    }
}

/// Which dead letters: all, one plugin's, or one handler's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this plugin's.
    pub plugin: Option<String>,
    /// Only this handler's (needs `plugin`).
    pub handler: Option<String>,
}

impl Filter {
    /// The subject filter on the dead-letter stream.
    pub fn subject(&self, subjects: &Subjects) -> String {
        match (&self.plugin, &self.handler) {
            (Some(p), Some(h)) => subjects.dead_letter(p, h),
            (Some(p), None) => format!("{}.dlq.{p}.>", subjects.prefix()),
            (None, _) => subjects.all_dead_letters(),
        }
    }

    /// Says what the filter selects, for messages.
    pub fn describe(&self) -> String {
        match (&self.plugin, &self.handler) {
            (Some(p), Some(h)) => format!("handler {p}/{h}"),
            (Some(p), None) => format!("plugin {p}"),
            (None, _) => "all plugins".to_owned(),
        }
    }
}

/// Every dead letter, oldest first, optionally only one plugin's.
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn list(
    js: &jetstream::Context,
    subjects: &Subjects,
    plugin: Option<&str>,
) -> Result<Vec<StoredDeadLetter>, async_nats::Error> {
    let filter = Filter {
        plugin: plugin.map(str::to_owned),
        handler: None,
    };
    list_filtered(js, subjects, &filter, |_, _| {}).await
}

/// The dead letters `filter` selects, oldest first; `progress(done, total)` is called
/// after each one.
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn list_filtered(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: &Filter,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<StoredDeadLetter>, async_nats::Error> {
    let consumer = js
        .get_stream(subjects.dlq_stream())
        .await?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.subject(subjects),
            ..Default::default()
        })
        .await?;
    let pending = usize::try_from(consumer.cached_info().num_pending)?;
    let mut out = Vec::with_capacity(pending);
    let mut messages = consumer.messages().await?.take(pending);
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
        out.push(StoredDeadLetter {
            subject: msg.subject.to_string(),
            seq,
            body: serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null),
        });
        progress(out.len(), pending);
    }
    Ok(out)
}

/// One dead letter by its sequence in the dead-letter stream (`None` when there is none).
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn get(
    js: &jetstream::Context,
    subjects: &Subjects,
    seq: u64,
) -> Result<Option<StoredDeadLetter>, async_nats::Error> {
    let stream = js.get_stream(subjects.dlq_stream()).await?;
    match stream.get_raw_message(seq).await {
        Ok(msg) => Ok(Some(StoredDeadLetter {
            subject: msg.subject.to_string(),
            seq,
            body: serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null),
        })),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How many dead letters `filter` selects.
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn count(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: &Filter,
) -> Result<u64, async_nats::Error> {
    let stream = js.get_stream(subjects.dlq_stream()).await?;
    let mut per_subject = stream.info_with_subjects(filter.subject(subjects)).await?;
    let mut n = 0u64;
    while let Some(item) = per_subject.next().await {
        n += u64::try_from(item?.1).unwrap_or(0);
    }
    Ok(n)
}

/// Dead letters per `<plugin>.<handler>` (`_bus.malformed` included).
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn counts(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<std::collections::BTreeMap<(String, String), u64>, async_nats::Error> {
    let stream = js.get_stream(subjects.dlq_stream()).await?;
    let mut per_subject = stream
        .info_with_subjects(subjects.all_dead_letters())
        .await?;
    let prefix = format!("{}.dlq.", subjects.prefix());
    let mut out = std::collections::BTreeMap::new();
    while let Some(item) = per_subject.next().await {
        let (subject, n) = item?;
        if let Some((p, h)) = subject
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.split_once('.'))
        {
            out.insert((p.to_owned(), h.to_owned()), u64::try_from(n).unwrap_or(0));
        }
    }
    Ok(out)
}

/// Deletes the dead letters `filter` selects; returns how many.
///
/// # Errors
///
/// When the stream cannot be purged.
pub async fn purge(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: &Filter,
) -> Result<u64, async_nats::Error> {
    let stream = js.get_stream(subjects.dlq_stream()).await?;
    let response = stream.purge().filter(filter.subject(subjects)).await?;
    Ok(response.purged)
}

/// How a replay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The handler succeeded; the dead letter was deleted.
    Succeeded,
    /// The handler failed again; the dead letter was replaced by one with the new
    /// attempt appended, at this sequence.
    Failed {
        /// What went wrong.
        error: String,
        /// The replacing dead letter's sequence.
        new_seq: u64,
    },
}

/// A dead letter that cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Not a dead-letter record (for example `<prefix>.dlq._bus.malformed`).
    #[error("dead letter {seq} on {subject} is not a handler's dead letter; it cannot be replayed")]
    NotReplayable {
        /// Its sequence.
        seq: u64,
        /// Its subject.
        subject: String,
    },
    /// NATS failed.
    #[error("dead letter {seq}: {source}")]
    Nats {
        /// Its sequence.
        seq: u64,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
}

/// Default timeout of a replay when the handler's manifest cannot be read.
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The handler's `timeout_ms` from its manifest in the registry bucket.
async fn handler_timeout(
    js: &jetstream::Context,
    subjects: &Subjects,
    plugin: &str,
    handler: &str,
) -> Option<Duration> {
    let store = js.get_key_value(subjects.registry_bucket()).await.ok()?;
    let value = store
        .get(core_events::manifest::registry_key(plugin))
        .await
        .ok()??;
    let manifest = core_events::PluginManifest::from_json(&value).ok()?;
    manifest
        .handlers
        .iter()
        .find(|h| h.name == handler)
        .map(core_events::HandlerSpec::timeout)
}

/// The event a dead letter is about: the original message from the events stream
/// when it is still there (exact bytes and headers), else rebuilt from the record.
async fn original_event(
    js: &jetstream::Context,
    subjects: &Subjects,
    letter: &DeadLetter,
) -> (HeaderMap, bytes::Bytes) {
    let event_id = letter.event_id.to_string();
    if let Ok(stream) = js.get_stream(subjects.events_stream()).await
        && let Ok(msg) = stream.get_raw_message(letter.stream_seq).await
        && msg
            .headers
            .get(headers::MSG_ID)
            .is_some_and(|v| v.as_str() == event_id)
    {
        return (msg.headers, msg.payload);
    }
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, event_id.as_str());
    h.insert(headers::OBJECT, letter.object.as_str());
    h.insert(headers::HOOK, letter.hook.name());
    if let Ok(token) = core_events::subject::encode_entity(&letter.entity) {
        h.insert(headers::ENTITY, token.as_str());
    }
    let payload = match &letter.event {
        serde_json::Value::String(s) => bytes::Bytes::from(s.clone().into_bytes()),
        other => serde_json::to_vec(other).unwrap_or_default().into(),
    };
    (h, payload)
}

/// Replays one dead letter to its handler (one attempt). `timeout`: the handler's
/// `timeout_ms` from the registry when `None`.
///
/// # Errors
///
/// [`ReplayError`] when the letter is not replayable or NATS fails; a handler failure
/// is [`Replayed::Failed`], not an error.
pub async fn replay(
    client: &async_nats::Client,
    subjects: &Subjects,
    stored: &StoredDeadLetter,
    timeout: Option<Duration>,
) -> Result<Replayed, ReplayError> {
    let seq = stored.seq;
    let nats = |e: async_nats::Error| ReplayError::Nats { seq, source: e };
    let Some(mut letter) = stored.record() else {
        return Err(ReplayError::NotReplayable {
            seq,
            subject: stored.subject.clone(),
        });
    };
    let js = jetstream::new(client.clone());
    let timeout = match timeout {
        Some(t) => t,
        None => handler_timeout(&js, subjects, &letter.plugin, &letter.handler)
            .await
            .unwrap_or(DEFAULT_REPLAY_TIMEOUT),
    };
    let (event_headers, payload) = original_event(&js, subjects, &letter).await;
    let n = letter
        .attempts
        .iter()
        .map(|a| a.attempt)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let mut h = delivery_headers(
        &event_headers,
        letter.stream_seq,
        n,
        1,
        &letter.plugin,
        &letter.handler,
    );
    h.insert(headers::REPLAY, "true");
    let subject = subjects.handler(&letter.plugin, &letter.handler);
    let error = match request(client, subject, h, payload, timeout).await {
        Attempt::Ok => None,
        Attempt::NoResponders => Some(format!(
            "no responders: plugin '{}' has no replica running",
            letter.plugin
        )),
        Attempt::Failed { error, .. } => Some(error),
    };
    let stream = js
        .get_stream(subjects.dlq_stream())
        .await
        .map_err(|e| nats(e.into()))?;
    let Some(error) = error else {
        stream
            .delete_message(seq)
            .await
            .map_err(|e| nats(e.into()))?;
        tracing::info!(plugin = %letter.plugin, handler = %letter.handler, seq, "dead letter replayed");
        return Ok(Replayed::Succeeded);
    };
    let now = chrono::Utc::now();
    letter.attempts.push(FailedAttempt {
        attempt: n,
        at: now,
        error: error.clone(),
    });
    letter.error = error.clone();
    letter.dead_lettered_at = now;
    let mut dh = HeaderMap::new();
    dh.insert(
        headers::MSG_ID,
        format!(
            "{}.{}.{}.dlq.replay.{seq}.{n}",
            letter.event_id, letter.plugin, letter.handler
        )
        .as_str(),
    );
    dh.insert(headers::PLUGIN, letter.plugin.as_str());
    dh.insert(headers::HANDLER, letter.handler.as_str());
    dh.insert(headers::HOOK, letter.hook.name());
    dh.insert(headers::OBJECT, letter.object.as_str());
    let body = serde_json::to_vec(&letter).map_err(|e| nats(e.into()))?;
    let ack = js
        .publish_with_headers(stored.subject.clone(), dh, body.into())
        .await
        .map_err(|e| nats(e.into()))?
        .await
        .map_err(|e| nats(e.into()))?;
    stream
        .delete_message(seq)
        .await
        .map_err(|e| nats(e.into()))?;
    tracing::warn!(plugin = %letter.plugin, handler = %letter.handler, seq, new_seq = ack.sequence, %error, "dead letter replay failed; kept");
    Ok(Replayed::Failed {
        error,
        new_seq: ack.sequence,
    })
}
