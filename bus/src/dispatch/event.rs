//! What the dispatcher reads of an event: its subject and headers, never its
//! payload ([`EventMeta`]), from the events stream or back from a deferred queue.

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use core_events::{Hook, ObjectKey, ObjectKeyError, SubjectError, Subjects, protocol};

/// Why an event of the stream cannot be dispatched (it is moved to
/// `<prefix>.dlq._bus.malformed` with this text).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EventError {
    /// The subject is not an event subject.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// A synchronous hook's subject: those are never published as events.
    #[error(
        "hook '{0}' is synchronous: it is called over request/reply before the change, never published as an event"
    )]
    Synchronous(Hook),
    /// The `Pagoda-Object` header is not an object key.
    #[error(transparent)]
    Object(#[from] ObjectKeyError),
    /// The `Pagoda-Object` header names another object than the subject.
    #[error("the {header} header says '{header_object}' but the subject names '{object}'", header = protocol::headers::OBJECT)]
    Mismatch {
        /// The object of the subject.
        object: ObjectKey,
        /// The object of the header.
        header_object: ObjectKey,
    },
}

/// What the dispatcher knows of one event without parsing its payload.
#[derive(Debug, Clone)]
pub(crate) struct EventMeta {
    pub(crate) id: Arc<str>,
    pub(crate) hook: Hook,
    pub(crate) entity: String,
    pub(crate) object: ObjectKey,
    pub(crate) seq: u64,
    pub(crate) redelivered: u64,
    /// The event's own headers, passed on to handlers.
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

impl EventMeta {
    /// Reads an event of the events stream: its hook, entity and object from the
    /// subject (a `Pagoda-Object` header, when there is one, must agree).
    pub(super) fn from_event(
        subjects: &Subjects,
        msg: &async_nats::Message,
        seq: u64,
        redelivered: u64,
    ) -> Result<Self, EventError> {
        let core_events::EventSubject {
            hook,
            entity,
            object,
            ..
        } = subjects.parse_event_subject(&msg.subject)?;
        if !hook.kind().is_notification() {
            // Synchronous hooks are called over request/reply (`hookbus::sync_hooks`),
            // never dispatched as events: their handlers answer a different body.
            return Err(EventError::Synchronous(hook));
        }
        let headers = msg.headers.clone().unwrap_or_default();
        if let Some(v) = headers.get(protocol::headers::OBJECT) {
            let header_object = v.as_str().parse::<ObjectKey>()?;
            if header_object != object {
                return Err(EventError::Mismatch {
                    object,
                    header_object,
                });
            }
        }
        let id: Arc<str> = headers
            .get(protocol::headers::MSG_ID)
            .map(|v| v.as_str().into())
            .unwrap_or_else(|| format!("seq-{seq}").into());
        Ok(EventMeta {
            id,
            hook,
            entity,
            object,
            seq,
            redelivered,
            headers,
            payload: msg.payload.clone(),
        })
    }

    /// Reads a delivery back from the deferred stream.
    pub(super) fn from_deferred(msg: &async_nats::Message) -> Option<Self> {
        let mut headers = msg.headers.clone()?;
        let get = |name: &str| headers.get(name).map(|v| v.to_string());
        let hook = Hook::parse(&get(protocol::headers::HOOK)?).ok()?;
        let object: ObjectKey = get(protocol::headers::OBJECT)?.parse().ok()?;
        let entity = core_events::subject::decode_entity(&get(protocol::headers::ENTITY)?).ok()?;
        let seq = get(protocol::headers::STREAM_SEQ)?.parse().ok()?;
        let redelivered = get(protocol::headers::REDELIVERED)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let raw_id = get(protocol::headers::MSG_ID)?;
        // The deferred copy's Nats-Msg-Id is "<event id>.<plugin>.<handler>.deferred".
        let id: Arc<str> = raw_id.split('.').next().unwrap_or_default().into();
        headers.insert(protocol::headers::MSG_ID, &*id);
        Some(EventMeta {
            id,
            hook,
            entity,
            object,
            seq,
            redelivered,
            headers,
            payload: msg.payload.clone(),
        })
    }
}
