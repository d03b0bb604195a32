//! What a handler receives: the event and its delivery details.

use std::sync::Arc;

use async_nats::HeaderMap;
use core_events::protocol::headers;
use core_events::{EntityEvent, EntryEvent, Envelope, EventId, Hook, ObjectKeyError, UnknownHook};
use serde::de::DeserializeOwned;

/// Why a delivery is not an event for the handler it reached. Its text is the
/// permanent error the handler answers, so it names the header or the payload's
/// problem.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    /// A numeric header that is not a non-negative integer.
    #[error("header {name} is '{value}', which is not a non-negative integer")]
    NotNumber { name: &'static str, value: String },
    /// `Pagoda-Attempt: 0`.
    #[error("header {} is 0; attempts count from 1", headers::ATTEMPT)]
    AttemptZero,
    /// `Pagoda-Attempt` over `u32::MAX`.
    #[error("header {name} is {value}, which is too large", name = headers::ATTEMPT)]
    AttemptTooLarge { value: u64 },
    /// `Pagoda-Hook` names another hook than the handler's.
    #[error(
        "header {} is '{named}' but handler '{handler}' is registered for '{hook}'",
        headers::HOOK
    )]
    OtherHook {
        named: Hook,
        handler: Arc<str>,
        hook: Hook,
    },
    /// `Pagoda-Hook` names no hook.
    #[error("header {name}: {0}", name = headers::HOOK)]
    UnknownHook(UnknownHook),
    /// No payload.
    #[error("payload is empty; expected a CloudEvents envelope for '{0}'")]
    Empty(Hook),
    /// A payload that is not the hook's envelope.
    #[error("payload is not a valid '{hook}' event ({source}): {preview}")]
    Invalid {
        hook: Hook,
        source: serde_json::Error,
        preview: String,
    },
    /// An event of another hook.
    #[error("event type '{event_type}' does not match handler '{handler}', which is registered for '{hook}' (type '{}')", .hook.event_type())]
    WrongType {
        event_type: String,
        handler: Arc<str>,
        hook: Hook,
    },
    /// No `subject`, no `Pagoda-Object` header, and no ids in `data`.
    #[error("payload of '{hook}': {source}")]
    NoObject { hook: Hook, source: ObjectKeyError },
}

impl From<DecodeError> for crate::HandlerError {
    fn from(e: DecodeError) -> Self {
        crate::HandlerError::permanent(e.to_string())
    }
}

/// One delivery of an event to a handler.
///
/// The typed aliases are [`EntryContext`] (entry hooks) and [`EntityContext`]
/// (entity hooks). `S` is the plugin's state
/// ([`PluginBuilder::state`](crate::PluginBuilder::state)), `()` without one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventContext<D, S = ()> {
    /// The event: CloudEvents attributes and the typed payload in `data`.
    /// `pagodaseq` is filled in from the `Pagoda-Stream-Seq` header.
    pub event: Envelope<D>,
    /// The hook the handler is registered for (and the event is about).
    pub hook: Hook,
    /// The plugin id, so shared code can tell plugins apart.
    pub plugin_id: Arc<str>,
    /// The handler name.
    pub handler: Arc<str>,
    /// 1 for the first attempt, 2 for the first retry, …: lets a handler tell a
    /// redelivery from a first try.
    pub attempt: u32,
    /// The event's sequence in the events stream (0 when the bus did not say).
    pub stream_seq: u64,
    /// True when the bus is replaying old events rather than delivering live ones.
    pub is_replay: bool,
    /// W3C trace context of the model change, when it travelled with the event.
    pub traceparent: Option<String>,
    /// The plugin's state, shared by all its handlers.
    pub state: S,
}

/// What an entry handler receives ([`EventContext`] over [`EntryEvent`]).
pub type EntryContext<S = ()> = EventContext<EntryEvent, S>;
/// What an entity handler receives ([`EventContext`] over [`EntityEvent`]).
pub type EntityContext<S = ()> = EventContext<EntityEvent, S>;

impl<D> EventContext<D> {
    /// A context for a first, live delivery of `event`, e.g. to call a handler in a
    /// unit test. The hook is read from the event's `type` (an event whose `type`
    /// is no hook gets [`Hook::EntryAfterCreate`]).
    pub fn new(plugin_id: &str, handler: &str, event: Envelope<D>) -> Self {
        EventContext {
            hook: event.hook().unwrap_or(Hook::EntryAfterCreate),
            stream_seq: event.pagodaseq.unwrap_or_default(),
            traceparent: event.traceparent.clone(),
            event,
            plugin_id: plugin_id.into(),
            handler: handler.into(),
            attempt: 1,
            is_replay: false,
            state: (),
        }
    }
}

impl<D, S> EventContext<D, S> {
    /// The same delivery with `state` as the plugin's state, e.g. to call a
    /// handler of a plugin with state in a unit test.
    pub fn with_state<T>(self, state: T) -> EventContext<D, T> {
        EventContext {
            event: self.event,
            hook: self.hook,
            plugin_id: self.plugin_id,
            handler: self.handler,
            attempt: self.attempt,
            stream_seq: self.stream_seq,
            is_replay: self.is_replay,
            traceparent: self.traceparent,
            state,
        }
    }

    /// The event id: the key to stay idempotent under at-least-once delivery.
    pub fn event_id(&self) -> EventId {
        self.event.id
    }

    /// The entity name the event is about (the entry's entity for entry hooks).
    pub fn entity(&self) -> &str {
        &self.event.pagodaentity
    }

    /// The object the event is about, as `entry/42` or `entity/7` (from the
    /// envelope's `subject`, else the `Pagoda-Object` header, else `data`).
    pub fn object(&self) -> &str {
        self.event.subject.as_deref().unwrap_or_default()
    }

    /// True when this is a retry of a delivery that failed before.
    pub fn is_retry(&self) -> bool {
        self.attempt > 1
    }

    /// One greppable line about the delivery:
    /// `<handler> <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k>`
    /// (plus ` replay` for replays).
    pub fn describe(&self) -> String {
        format!(
            "{} {} entity={} object={} seq={} attempt={}{}",
            self.handler,
            self.hook,
            self.entity(),
            self.object(),
            self.stream_seq,
            self.attempt,
            if self.is_replay { " replay" } else { "" }
        )
    }
}

/// Delivery details read from the request headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeliveryHeaders {
    pub(crate) attempt: Option<u32>,
    pub(crate) stream_seq: Option<u64>,
    pub(crate) hook: Option<String>,
    pub(crate) replay: bool,
    pub(crate) traceparent: Option<String>,
    /// `Pagoda-Object`: the object, for an event without `subject`.
    pub(crate) object: Option<String>,
}

impl DeliveryHeaders {
    /// Reads the delivery headers; absent ones stay `None`.
    ///
    /// # Errors
    ///
    /// A sentence naming the header whose value is malformed.
    pub(crate) fn parse(map: Option<&HeaderMap>) -> Result<Self, DecodeError> {
        let Some(map) = map else {
            return Ok(DeliveryHeaders::default());
        };
        let text = |name: &str| map.get(name).map(|v| v.as_str().to_owned());
        let number = |name: &'static str| -> Result<Option<u64>, DecodeError> {
            text(name)
                .map(|value| {
                    value
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| DecodeError::NotNumber { name, value })
                })
                .transpose()
        };
        let attempt = match number(headers::ATTEMPT)? {
            None => None,
            Some(0) => return Err(DecodeError::AttemptZero),
            Some(n) => {
                Some(u32::try_from(n).map_err(|_| DecodeError::AttemptTooLarge { value: n })?)
            }
        };
        let replay = text(headers::REPLAY).is_some_and(|v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "" | "0" | "false" | "no"
            )
        });
        Ok(DeliveryHeaders {
            attempt,
            stream_seq: number(headers::STREAM_SEQ)?,
            hook: text(headers::HOOK),
            replay,
            traceparent: text(headers::TRACEPARENT),
            object: text(headers::OBJECT),
        })
    }
}

/// Just the CloudEvents `type` of a payload.
#[derive(serde::Deserialize)]
struct TypeProbe {
    #[serde(rename = "type")]
    event_type: String,
}

/// Builds the context of one delivery from the request payload and headers.
///
/// # Errors
///
/// A sentence saying why the payload is not an event for `hook`: bad headers, not
/// JSON, not the expected envelope, or an event of another hook.
pub(crate) fn decode<D: DeserializeOwned>(
    hook: Hook,
    plugin_id: &Arc<str>,
    handler: &Arc<str>,
    payload: &[u8],
    header_map: Option<&HeaderMap>,
) -> Result<EventContext<D>, DecodeError> {
    let delivery = DeliveryHeaders::parse(header_map)?;
    decode_delivery(hook, plugin_id, handler, payload, delivery)
}

/// As [`decode`], with the delivery details already read (the replay knows them
/// from the stream, without headers to parse).
///
/// # Errors
///
/// As [`decode`].
pub(crate) fn decode_delivery<D: DeserializeOwned>(
    hook: Hook,
    plugin_id: &Arc<str>,
    handler: &Arc<str>,
    payload: &[u8],
    delivery: DeliveryHeaders,
) -> Result<EventContext<D>, DecodeError> {
    if let Some(named) = &delivery.hook {
        match Hook::parse(named) {
            Ok(h) if h == hook => {}
            Ok(named) => {
                return Err(DecodeError::OtherHook {
                    named,
                    handler: handler.clone(),
                    hook,
                });
            }
            Err(e) => return Err(DecodeError::UnknownHook(e)),
        }
    }
    if payload.is_empty() {
        return Err(DecodeError::Empty(hook));
    }
    let invalid = |source: serde_json::Error| DecodeError::Invalid {
        hook,
        source,
        preview: core_events::protocol::preview(payload),
    };
    let wrong_type = |event_type: &str| DecodeError::WrongType {
        event_type: event_type.to_owned(),
        handler: handler.clone(),
        hook,
    };
    let mut event: Envelope<D> = match serde_json::from_slice(payload) {
        Ok(event) => event,
        Err(e) => {
            // An event of another hook is named as such rather than reported as a
            // payload of the wrong shape.
            if let Ok(probe) = serde_json::from_slice::<TypeProbe>(payload)
                && Hook::from_event_type(&probe.event_type) != Some(hook)
            {
                return Err(wrong_type(&probe.event_type));
            }
            return Err(invalid(e));
        }
    };
    if Hook::from_event_type(&event.event_type) != Some(hook) {
        return Err(wrong_type(&event.event_type));
    }
    if let Some(seq) = delivery.stream_seq {
        event.pagodaseq = Some(seq);
    }
    // `subject` is optional: the object then comes from the delivery's
    // Pagoda-Object header, else from the ids in `data`.
    if event.subject.is_none() {
        event.subject = match delivery.object {
            Some(object) => Some(object),
            None => Some(
                core_events::envelope::object_of_event(hook.object(), payload)
                    .map_err(|source| DecodeError::NoObject { hook, source })?
                    .to_string(),
            ),
        };
    }
    let traceparent = delivery.traceparent.or_else(|| event.traceparent.clone());
    Ok(EventContext {
        hook,
        plugin_id: plugin_id.clone(),
        handler: handler.clone(),
        attempt: delivery.attempt.unwrap_or(1),
        stream_seq: event.pagodaseq.unwrap_or_default(),
        is_replay: delivery.replay,
        traceparent,
        event,
        state: (),
    })
}
