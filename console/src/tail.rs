//! The live tail: `GET /api/console/events?hook=&entity=&back=` answers with
//! server-sent events (`text/event-stream`), one `event: event` per stored
//! event, from an ordered consumer on the events stream (ephemeral: the server
//! removes it when the page goes away). `back` (default 20, at most 500) starts
//! that many stored events before the end of the stream, then follows new
//! ones; `hook` (a name or legacy alias) and `entity` (exact name) filter on the
//! server, as `hookbus tail --hook --entity` does.

use std::collections::HashMap;
use std::convert::Infallible;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use core_events::Hook;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::auth::Admin;
use crate::{ConsoleError, ConsoleState};

/// Events shown from before the tail starts, by default and at most.
const BACK_DEFAULT: u64 = 20;
const BACK_MAX: u64 = 500;

/// `hook` and `entity` parameters: a hook name (or alias), an entity name.
pub(crate) fn parse_filter(
    q: &HashMap<String, String>,
) -> Result<(Option<Hook>, Option<String>), ConsoleError> {
    let hook = q
        .get("hook")
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .map(|h| Hook::parse(h).map_err(|e| ConsoleError::Invalid(e.to_string())))
        .transpose()?;
    let entity = q.get("entity").filter(|e| !e.is_empty()).cloned();
    Ok((hook, entity))
}

/// A number parameter, or `default`.
pub(crate) fn number(
    q: &HashMap<String, String>,
    name: &str,
    default: u64,
) -> Result<u64, ConsoleError> {
    match q.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            ConsoleError::Invalid(format!("'{name}' must be a whole number, not {v:?}"))
        }),
    }
}

pub(crate) async fn events(
    State(state): State<ConsoleState>,
    _admin: Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ConsoleError> {
    let (hook, entity) = parse_filter(&q)?;
    let back = number(&q, "back", BACK_DEFAULT)?.min(BACK_MAX);
    let permit =
        state
            .inner
            .tails
            .clone()
            .try_acquire_owned()
            .map_err(|_| ConsoleError::Unavailable {
                what: "too many live tails are open; close one".into(),
                source: "limit reached".into(),
            })?;
    let ops = state.ops();
    let opts = hookbus::ops::tail::TailOptions {
        hooks: hook.into_iter().collect(),
        entities: entity.into_iter().collect(),
        ..Default::default()
    };
    let mut filters = hookbus::ops::tail::filters(&ops, &opts)
        .map_err(|e| ConsoleError::Invalid(e.to_string()))?;
    let (filter_subject, filter_subjects) = if filters.len() == 1 {
        (filters.remove(0), Vec::new())
    } else {
        (String::new(), filters)
    };
    let mut stream = state
        .inner
        .js
        .get_stream(state.subjects().events_stream())
        .await
        .map_err(|e| ConsoleError::nats("cannot open the events stream")(e.into()))?;
    let last = stream
        .info()
        .await
        .map_err(|e| ConsoleError::nats("cannot read the events stream")(e.into()))?
        .state
        .last_sequence;
    let deliver_policy = if back == 0 {
        DeliverPolicy::New
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: last.saturating_sub(back - 1).max(1),
        }
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject,
            filter_subjects,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| ConsoleError::nats("cannot read the events stream")(e.into()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| ConsoleError::nats("cannot read the events stream")(e.into()))?;
    let subjects = state.subjects().clone();
    let events = messages
        .map(move |msg| {
            // The permit is held as long as the stream lives.
            let _held = &permit;
            Ok(match msg {
                Ok(msg) => {
                    let info = msg.info().ok();
                    let seq = info.as_ref().map_or(0, |i| i.stream_sequence);
                    let stored = info.map(|i| {
                        hookbus_kit::replay::to_chrono(i.published)
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    });
                    Event::default().event("event").data(
                        summary(
                            &subjects,
                            seq,
                            &msg.subject,
                            msg.headers.as_ref(),
                            &msg.payload,
                            stored,
                        )
                        .to_string(),
                    )
                }
                Err(e) => Event::default()
                    .event("failure")
                    .data(json!({"message": format!("reading events: {e}")}).to_string()),
            })
        })
        .take_until(state.inner.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The trace id of a W3C `traceparent` (`00-<trace-id>-<span-id>-<flags>`).
pub(crate) fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then(|| id.to_ascii_lowercase())
}

/// One stored event as the tail and the journey show it.
pub(crate) fn summary(
    subjects: &core_events::Subjects,
    seq: u64,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    stored: Option<String>,
) -> Value {
    let parsed = subjects.parse_event_subject(subject).ok();
    let event: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let s = |k: &str| event.get(k).and_then(Value::as_str).map(str::to_owned);
    let traceparent = headers
        .and_then(|h| h.get(core_events::protocol::headers::TRACEPARENT))
        .map(|v| v.as_str().to_owned());
    json!({
        "seq": seq,
        "subject": subject,
        "stored": stored,
        "hook": parsed.as_ref().map(|p| p.hook.name()),
        "entity": parsed.as_ref().map(|p| p.entity.clone()),
        "object": parsed.as_ref().map(|p| p.object.to_string()),
        "partition": parsed.as_ref().and_then(|p| p.partition),
        "id": s("id"),
        "type": s("type"),
        "time": s("time"),
        "actor": s("pagodaactor"),
        "name": event.pointer("/data/entry/name").or_else(|| event.pointer("/data/entity/name")).and_then(Value::as_str),
        "traceparent": traceparent,
        "trace_id": traceparent.as_deref().and_then(trace_id),
        "readable": !event.is_null(),
    })
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn trace_ids_of_traceparents() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(trace_id("00-xyz-1-01"), None);
    }
}
