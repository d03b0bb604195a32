//! Wire protocol between the bus and plugin handlers: header names, the handler
//! reply, and the dead-letter record.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::EventId;
use crate::hook::Hook;

/// Header names. Every delivery to a handler carries the event's headers plus the
/// delivery headers below.
pub mod headers {
    /// The event id; JetStream's de-duplication key.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The object the event is about: `entry/<id>` or `entity/<id>`.
    pub const OBJECT: &str = "Pagoda-Object";
    /// The hook's standard name (`entry.after_create`).
    pub const HOOK: &str = "Pagoda-Hook";
    /// The entity token: the entity name encoded as in the subject (the plain name
    /// is the envelope's `pagodaentity`).
    pub const ENTITY: &str = "Pagoda-Entity";
    /// Delivery: the event's sequence in the events stream.
    pub const STREAM_SEQ: &str = "Pagoda-Stream-Seq";
    /// Delivery: 1 for the first attempt, 2 for the first retry, … (counted within
    /// one dispatch of the event).
    pub const ATTEMPT: &str = "Pagoda-Attempt";
    /// Delivery: how many times JetStream has handed this event to the dispatcher
    /// (above 1 after a dispatcher crash or restart).
    pub const REDELIVERED: &str = "Pagoda-Redelivered";
    /// Delivery: the plugin the delivery is for.
    pub const PLUGIN: &str = "Pagoda-Plugin";
    /// Delivery: the handler the delivery is for.
    pub const HANDLER: &str = "Pagoda-Handler";
    /// Delivery: set when the delivery is a replay, not a live event.
    pub const REPLAY: &str = "Pagoda-Replay";
    /// W3C trace context, carried from the model change to every handler.
    pub const TRACEPARENT: &str = "traceparent";
    /// Services API: set on an error reply, with the error text.
    pub const SERVICE_ERROR: &str = "Nats-Service-Error";
    /// Services API: set on an error reply, with a numeric code.
    pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
    /// Dead letter of a malformed event (`<prefix>.dlq._bus.malformed`): why the
    /// dispatcher could not read it.
    pub const ERROR: &str = "Pagoda-Error";
    /// Dead letter of a malformed event: the subject it was stored under.
    pub const ORIGINAL_SUBJECT: &str = "Pagoda-Original-Subject";
}

/// Error codes a handler may send in `Nats-Service-Error-Code`.
///
/// Codes 400–499 say the event can never succeed (bad data): the delivery is
/// dead-lettered at once, without retries. Any other code is retried on the
/// handler's schedule.
pub mod codes {
    /// The event is bad for this handler: do not retry.
    pub const PERMANENT: u16 = 400;
    /// Something failed that may work later: retry.
    pub const TRANSIENT: u16 = 500;

    /// True when a code means "do not retry".
    pub fn is_permanent(code: u16) -> bool {
        (400..500).contains(&code)
    }
}

/// The body of a successful reply to a notification: empty, or this JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HandlerReply {
    /// `"ok"` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Free text, logged by the bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Largest reply body the bus reads, in bytes.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

impl HandlerReply {
    /// Reads a success reply body.
    ///
    /// # Errors
    ///
    /// [`ReplyError`], saying what is wrong: too large, not JSON, or not an object
    /// of this shape.
    pub fn parse(body: &[u8]) -> Result<HandlerReply, ReplyError> {
        if body.is_empty() {
            return Ok(HandlerReply::default());
        }
        if body.len() > MAX_REPLY_BYTES {
            return Err(ReplyError::TooLarge {
                size: body.len(),
                limit: MAX_REPLY_BYTES,
            });
        }
        let reply: HandlerReply =
            serde_json::from_slice(body).map_err(|e| ReplyError::NotReply {
                reason: e.to_string(),
                preview: preview(body),
            })?;
        match reply.status.as_deref() {
            None | Some("ok") => Ok(reply),
            Some(other) => Err(ReplyError::Status(other.to_owned())),
        }
    }
}

/// Why a reply body (of a notification handler, or of a synchronous hook) cannot
/// be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// Over the limit.
    #[error("reply body is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A notification handler's reply that is not a [`HandlerReply`].
    #[error("reply is not empty and not a JSON reply object ({reason}): {preview}")]
    NotReply {
        /// The JSON error.
        reason: String,
        /// The body's first bytes.
        preview: String,
    },
    /// A synchronous hook's reply that is not of its reply's shape.
    #[error("reply is not a valid reply body ({reason}): {preview}")]
    NotSyncReply {
        /// The JSON error.
        reason: String,
        /// The body's first bytes.
        preview: String,
    },
    /// A status other than `ok`.
    #[error("reply status '{0}' is not 'ok'; report errors with the Nats-Service-Error header")]
    Status(String),
}

/// The first bytes of a body, printable, for error messages.
pub fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
    if body.len() > 80 {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}

/// One failed attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FailedAttempt {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// What went wrong.
    pub error: String,
}

/// A dead letter: a delivery that failed every attempt, stored in the dead-letter
/// stream under `<prefix>.dlq.<plugin>.<handler>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    /// The event id.
    pub event_id: EventId,
    /// The hook.
    pub hook: Hook,
    /// The entity name.
    pub entity: String,
    /// The object (`entry/42`).
    pub object: String,
    /// The plugin whose handler failed.
    pub plugin: String,
    /// The handler that failed.
    pub handler: String,
    /// The event's sequence in the events stream.
    pub stream_seq: u64,
    /// The last error.
    pub error: String,
    /// Every attempt, oldest first.
    pub attempts: Vec<FailedAttempt>,
    /// When the delivery was given up.
    pub dead_lettered_at: DateTime<Utc>,
    /// The whole event, as it was published.
    pub event: serde_json::Value,
    /// Every replay of this dead letter that failed again, oldest first (a replay
    /// that succeeds removes the dead letter; the audit trail keeps both). Carried
    /// over to the dead letter that replaces this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<ReplayRecord>,
}

/// One replay of a dead letter (`hookbus dlq replay`, `<prefix>.bus.dlq.replay`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplayRecord {
    /// When it was replayed.
    pub at: DateTime<Utc>,
    /// Who replayed it (`NATS_USER` or the OS user for `hookbus dlq replay`; the
    /// requester's `actor` for the request/reply service).
    pub actor: String,
    /// The replay run (a UUIDv7, also in the run's audit records).
    pub run: String,
    /// The attempt it made (its number in `attempts`).
    pub attempt: u32,
    /// The dead letter's sequence before the replay.
    pub replaced_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(HandlerReply::parse(b"").unwrap(), HandlerReply::default());
        assert!(HandlerReply::parse(br#"{"status":"ok"}"#).is_ok());
        assert!(HandlerReply::parse(br#"{}"#).is_ok());
        let err = HandlerReply::parse(b"\x00garbage").unwrap_err().to_string();
        assert!(err.contains("not a JSON reply object"), "{err}");
        let err = HandlerReply::parse(br#"{"status":"error"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Nats-Service-Error"), "{err}");
        assert!(HandlerReply::parse(&vec![b'x'; MAX_REPLY_BYTES + 1]).is_err());
        assert!(codes::is_permanent(404));
        assert!(!codes::is_permanent(500));
    }
}
