//! The dead letter of a delivery that failed every attempt: one record
//! ([`DeadLetter`], built by [`record`]), one set of headers ([`headers`]), one
//! write ([`publish`]). The bus's dispatcher and a plugin's replay both write
//! them here, so `hookbus dlq` reads one shape.
//!
//! (Two other records go to the dead-letter stream, each under its own subject:
//! a malformed event, by the dispatcher, with [`malformed_headers`]; and an
//! outbox row the relay cannot publish, by the relay.)

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use core_events::protocol::{DeadLetter, FailedAttempt, headers};
use core_events::{EventId, Hook};

/// What failed: the event and the handler it did not get through.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    /// The event id (nil when the event has none that parses).
    pub event_id: Option<EventId>,
    /// The hook.
    pub hook: Hook,
    /// The entity name.
    pub entity: &'a str,
    /// The object (`entry/42`).
    pub object: &'a str,
    /// The plugin.
    pub plugin: &'a str,
    /// The handler.
    pub handler: &'a str,
    /// The event's sequence in the events stream.
    pub stream_seq: u64,
    /// The event as published (kept as JSON, or as a string if it is not JSON).
    pub payload: &'a [u8],
}

/// The dead-letter record of `failed` after `attempts` (the last one's error is
/// the record's `error`).
pub fn record(failed: Failed<'_>, attempts: Vec<FailedAttempt>) -> DeadLetter {
    let error = attempts.last().map(|a| a.error.clone()).unwrap_or_default();
    DeadLetter {
        event_id: failed.event_id.unwrap_or(EventId(uuid::Uuid::nil())),
        hook: failed.hook,
        entity: failed.entity.to_owned(),
        object: failed.object.to_owned(),
        plugin: failed.plugin.to_owned(),
        handler: failed.handler.to_owned(),
        stream_seq: failed.stream_seq,
        error,
        attempts,
        dead_lettered_at: Utc::now(),
        event: serde_json::from_slice(failed.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(failed.payload).into_owned())
        }),
        replays: Vec::new(),
    }
}

/// The headers of a dead letter: `Nats-Msg-Id` = `msg_id` (so a second write of
/// the same give-up is dropped), the plugin, handler, hook and object, and
/// `Pagoda-Replay: true` when a replay gave up.
pub fn headers(letter: &DeadLetter, msg_id: &str, replay: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id);
    h.insert(headers::PLUGIN, letter.plugin.as_str());
    h.insert(headers::HANDLER, letter.handler.as_str());
    h.insert(headers::HOOK, letter.hook.name());
    h.insert(headers::OBJECT, letter.object.as_str());
    if replay {
        h.insert(headers::REPLAY, "true");
    }
    h
}

/// The headers of a malformed event moved to the dead-letter stream: why
/// (`Pagoda-Error`) and where it was (`Pagoda-Original-Subject`), control
/// characters blanked and each cut at 1,000 characters.
pub fn malformed_headers(subject: &str, error: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::ERROR, sanitize_header(error).as_str());
    h.insert(headers::ORIGINAL_SUBJECT, sanitize_header(subject).as_str());
    h
}

fn sanitize_header(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

/// The body of a dead letter.
///
/// # Errors
///
/// When the record cannot be encoded (it always can: its `event` is JSON).
pub fn body(letter: &DeadLetter) -> Result<Bytes, serde_json::Error> {
    serde_json::to_vec(letter).map(Bytes::from)
}

/// Writes `letter` once to `subject` and waits until the stream stored it.
///
/// # Errors
///
/// When it cannot be encoded, published or acknowledged.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    letter: &DeadLetter,
    msg_id: &str,
    replay: bool,
) -> Result<(), async_nats::Error> {
    let ack = js
        .publish_with_headers(subject, headers(letter, msg_id, replay), body(letter)?)
        .await?;
    ack.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keeps_the_event_and_the_last_error() {
        let attempts = vec![
            FailedAttempt {
                attempt: 1,
                at: Utc::now(),
                error: "first".into(),
            },
            FailedAttempt {
                attempt: 2,
                at: Utc::now(),
                error: "last".into(),
            },
        ];
        let failed = Failed {
            event_id: None,
            hook: Hook::EntryAfterCreate,
            entity: "customer",
            object: "entry/42",
            plugin: "p",
            handler: "h",
            stream_seq: 7,
            payload: b"not json",
        };
        let letter = record(failed, attempts);
        assert_eq!(letter.error, "last");
        assert_eq!(letter.event, serde_json::Value::String("not json".into()));
        assert!(letter.event_id.0.is_nil());
        let h = headers(&letter, "x.p.h.dlq.1", true);
        assert_eq!(h.get(headers::OBJECT).map(|v| v.as_str()), Some("entry/42"));
        assert_eq!(h.get(headers::REPLAY).map(|v| v.as_str()), Some("true"));
        let m = malformed_headers("a\nb", &"e".repeat(2000));
        assert_eq!(
            m.get(headers::ORIGINAL_SUBJECT).map(|v| v.as_str()),
            Some("a b")
        );
        assert_eq!(m.get(headers::ERROR).map(|v| v.as_str().len()), Some(1000));
    }
}
