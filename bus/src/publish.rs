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
    /// `<prefix>.events.<object>.<action>.<entity-token>`.
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
        let subject = subjects.event(hook, entity)?;
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
