//! Appending events to the events stream, idempotently (`Nats-Msg-Id` = event id).
//!
//! This is the path the outbox relay uses; tests and the demo use it directly.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use bytes::Bytes;
use core_events::protocol::headers;
use core_events::subject::encode_entity;
use core_events::{Envelope, EventId, Hook, ObjectKey, SubjectError, Subjects};
use serde::Serialize;

/// An event ready to publish: subject, headers and the envelope bytes.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The event id (also `Nats-Msg-Id`).
    pub id: EventId,
    /// `<prefix>.events.<object>.<action>.<entity-token>.<object-id>`.
    pub subject: String,
    /// `Nats-Msg-Id`, `Pagoda-Object`, `Pagoda-Hook`, `Pagoda-Entity`, `traceparent`.
    pub headers: HeaderMap,
    /// The envelope as JSON.
    pub payload: Bytes,
}

/// A problem encoding or publishing an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The envelope's `type` is not a notification hook.
    #[error("event type '{0}' is not a notification hook (pagoda.<object>.after_*)")]
    NotANotification(String),
    /// The envelope's `subject` is not `entry/<id>` or `entity/<id>`.
    #[error("event subject '{0}' is not 'entry/<id>' or 'entity/<id>'")]
    BadObject(String),
    /// The entity name cannot be encoded.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The payload could not be serialized.
    #[error("event payload could not be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    /// JetStream did not accept the event.
    #[error("jetstream publish failed: {0}")]
    JetStream(#[from] jetstream::context::PublishError),
}

impl EncodedEvent {
    /// Encodes an envelope.
    ///
    /// # Errors
    ///
    /// [`PublishError`] when the envelope is not a notification, names no object,
    /// has an unusable entity name or cannot be serialized.
    pub fn encode<D: Serialize>(
        subjects: &Subjects,
        envelope: &Envelope<D>,
    ) -> Result<Self, PublishError> {
        let hook = envelope
            .hook()
            .filter(|h| h.kind().is_notification())
            .ok_or_else(|| PublishError::NotANotification(envelope.event_type.clone()))?;
        let object = envelope
            .object()
            .filter(|o| o.kind == hook.object())
            .ok_or_else(|| {
                PublishError::BadObject(envelope.subject.clone().unwrap_or_else(|| "(none)".into()))
            })?;
        let payload = Bytes::from(serde_json::to_vec(envelope)?);
        Self::from_parts(
            subjects,
            hook,
            &envelope.pagodaentity,
            object,
            envelope.id,
            envelope.traceparent.as_deref(),
            payload,
        )
    }

    /// Builds the message from already-serialized parts (as an outbox row holds them).
    ///
    /// # Errors
    ///
    /// [`PublishError::Subject`] when the entity name cannot be encoded.
    pub fn from_parts(
        subjects: &Subjects,
        hook: Hook,
        entity: &str,
        object: ObjectKey,
        id: EventId,
        traceparent: Option<&str>,
        payload: Bytes,
    ) -> Result<Self, PublishError> {
        let subject = subjects.event(hook, entity, object.id)?;
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, id.to_string().as_str());
        h.insert(headers::OBJECT, object.to_string().as_str());
        h.insert(headers::HOOK, hook.name());
        h.insert(headers::ENTITY, encode_entity(entity)?.as_str());
        if let Some(tp) = traceparent.filter(|tp| is_header_safe(tp)) {
            h.insert(headers::TRACEPARENT, tp);
        }
        Ok(EncodedEvent {
            id,
            subject,
            headers: h,
            payload,
        })
    }
}

fn is_header_safe(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// Bytes kept for headers under the size limit of an event's envelope: the
/// event's own headers (`Nats-Msg-Id`, `Pagoda-Object`, `Pagoda-Hook`,
/// `Pagoda-Entity` with an entity name of up to 1,024 bytes encoded into at most
/// 3,072, `traceparent`) and those the bus adds when it delivers it to a handler
/// (stream sequence, attempt, plugin and handler names).
pub const HEADER_ROOM: usize = 8 * 1024;

/// The size NATS counts for a header block (`NATS/1.0` line, one line per value,
/// blank line), which `max_payload` and a stream's largest message include.
pub fn headers_len(h: &HeaderMap) -> usize {
    let lines: usize = h
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// The largest message (headers and payload) the events stream takes over this
/// connection: the server's `max_payload` (from the connection's `INFO`) or the
/// events stream's largest message (`max_msg_size`), whichever is smaller.
///
/// # Errors
///
/// When the events stream cannot be read (not provisioned, no permission).
pub async fn message_limit(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<usize, jetstream::context::GetStreamError> {
    let stream = js.get_stream(subjects.events_stream()).await?;
    let stream_max = usize::try_from(stream.cached_info().config.max_message_size)
        .ok()
        .filter(|m| *m > 0)
        .unwrap_or(usize::MAX);
    Ok(js.client().max_payload().min(stream_max))
}

/// The largest event envelope a host may write: [`message_limit`] less
/// [`HEADER_ROOM`]. A write whose event is larger is refused before it commits
/// (`store::Store::with_max_event_bytes`).
///
/// # Errors
///
/// As [`message_limit`].
pub async fn event_limit(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<usize, jetstream::context::GetStreamError> {
    Ok(message_limit(js, subjects)
        .await?
        .saturating_sub(HEADER_ROOM))
}

/// Publishes events into the events stream.
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    subjects: Subjects,
}

impl Publisher {
    /// A publisher over a JetStream context.
    pub fn new(js: jetstream::Context, subjects: Subjects) -> Self {
        Publisher { js, subjects }
    }

    /// The subject namespace.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Publishes an envelope and waits for the stream's acknowledgement.
    ///
    /// # Errors
    ///
    /// As [`EncodedEvent::encode`], and [`PublishError::JetStream`] when the stream
    /// does not acknowledge.
    pub async fn publish<D: Serialize>(
        &self,
        envelope: &Envelope<D>,
    ) -> Result<PublishAck, PublishError> {
        let event = EncodedEvent::encode(&self.subjects, envelope)?;
        Ok(self.send(event).await?.await?)
    }

    /// Sends an encoded event; the returned future resolves to the stream's
    /// acknowledgement, so many publishes can be in flight at once.
    ///
    /// # Errors
    ///
    /// [`PublishError::JetStream`] when the message cannot be sent.
    pub async fn send(&self, event: EncodedEvent) -> Result<PublishAckFuture, PublishError> {
        Ok(self
            .js
            .send_publish(
                event.subject,
                jetstream::message::PublishMessage::build()
                    .payload(event.payload)
                    .headers(event.headers),
            )
            .await?)
    }
}
