//! W3C trace context over NATS headers, for one trace per model change.
//!
//! The spans of the bus and of the SDK are `tracing` spans; when the binary
//! exports traces ([`crate::telemetry::init`] found an `OTEL_EXPORTER_OTLP_*`
//! endpoint) `tracing-opentelemetry` turns them into OpenTelemetry spans, and
//! these helpers carry their context in the `traceparent` / `tracestate` headers
//! of NATS messages (and in the outbox row). Without an exporter, [`enabled`] is
//! false and the callers create no span and touch no header: tracing off costs
//! one relaxed load per message.
//!
//! Span kinds and attributes follow the OpenTelemetry semantic conventions for
//! messaging; the field names used with `tracing` are in [`fields`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use core_events::protocol::headers;
/// A trace context (re-exported for the bus, which does not depend on `opentelemetry`).
pub use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracestate` header (W3C trace context), carried beside `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// Attribute values of the messaging semantic conventions used by the bus.
pub mod fields {
    /// `messaging.system` of every messaging span: the bus runs on NATS.
    pub const SYSTEM: &str = "nats";
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported, so worth creating and propagating. Set by
/// [`crate::telemetry::init`] when it installs the OpenTelemetry layer.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Marks trace export as on or off for this process (done by
/// [`crate::telemetry::init`]; a test running the bus in process with its own
/// OpenTelemetry layer may set it too).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Reads `traceparent` / `tracestate` from NATS headers.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes `traceparent` / `tracestate` into NATS headers (replacing any there).
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

/// The remote context in `headers` (an empty context when they carry none or an
/// unreadable one).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The remote context of a stored `traceparent` / `tracestate` pair (the outbox
/// row's, the envelope's).
pub fn extract_pair(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let mut map = HashMap::with_capacity(2);
    if let Some(tp) = traceparent {
        map.insert(headers::TRACEPARENT.to_owned(), tp.to_owned());
    }
    if let Some(ts) = tracestate {
        map.insert(TRACESTATE.to_owned(), ts.to_owned());
    }
    TraceContextPropagator::new().extract(&map)
}

/// Whether `parent` is a trace whose start decided not to sample it (a valid
/// context with the `sampled` flag off, as a `parentbased_*` sampler at the host
/// leaves it): the bus then makes no span for the message at all and passes the
/// headers on unchanged, so an unsampled change costs what tracing off costs.
pub fn unsampled(parent: &Context) -> bool {
    let span = parent.span();
    let sc = span.span_context();
    sc.is_valid() && !sc.is_sampled()
}

/// The parent context for a span about the message with `headers`: `None` when
/// traces are off, or when the message's trace was not sampled where it started
/// ([`unsampled`]), so that no span is made.
pub fn traced_parent(headers: &HeaderMap) -> Option<Context> {
    if !enabled() {
        return None;
    }
    // Most messages of a sampled-at-the-start deployment carry an unsampled
    // `traceparent`: read its flags before building a context (which allocates).
    if headers
        .get(core_events::protocol::headers::TRACEPARENT)
        .is_some_and(|tp| unsampled_flags(tp.as_str()))
    {
        return None;
    }
    let parent = extract(headers);
    (!unsampled(&parent)).then_some(parent)
}

/// Whether `traceparent` is a version-00 W3C trace parent with a valid shape
/// whose `sampled` flag is off (`00-<32 hex>-<16 hex>-<flags>`); anything else is
/// left to the propagator.
fn unsampled_flags(traceparent: &str) -> bool {
    let b = traceparent.as_bytes();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    b.len() == 55
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && u8::from_str_radix(&traceparent[53..], 16).is_ok_and(|flags| flags & 1 == 0)
        && b[3..35].iter().any(|&c| c != b'0')
        && b[36..52].iter().any(|&c| c != b'0')
}

/// Writes the context of `span` into `headers` as `traceparent` (and
/// `tracestate` when it has one). Nothing when the span is not recorded.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// The `traceparent` and `tracestate` of `span`, to store (the outbox row);
/// `None` when the span is not recorded. The trace state is `None` when empty.
pub fn pair_of(span: &tracing::Span) -> Option<(String, Option<String>)> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut map: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut map);
    let tp = map.remove(headers::TRACEPARENT)?;
    let ts = map.remove(TRACESTATE).filter(|s| !s.is_empty());
    Some((tp, ts))
}

/// Makes `parent` the parent of `span` (when it holds a remote span). A
/// consumer span also links to it ([`follow_and_link`]).
pub fn follow(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _unrecorded = span.set_parent(parent);
    }
}

/// Makes `parent` the parent of `span` and adds a link to it: a consumer span
/// of the messaging conventions, linked to the message's creation context and
/// kept in its trace.
pub fn follow_and_link(span: &tracing::Span, parent: Context) {
    let sc = parent.span().span_context().clone();
    if sc.is_valid() {
        let _unrecorded = span.set_parent(parent);
        span.add_link(sc);
    }
}

/// When traces are exported, makes the context a received message's `headers`
/// carry (if any) the parent of `span`: a plugin's SERVER span, the child of the
/// bus's delivery attempt or the host's call.
pub fn follow_message(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if enabled()
        && let Some(h) = headers
    {
        follow(span, extract(h));
    }
}

/// [`follow_message`] with a link to that context as well: a CONSUMER span of a
/// queued message (a job), as the messaging conventions describe.
pub fn follow_and_link_message(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if enabled()
        && let Some(h) = headers
    {
        follow_and_link(span, extract(h));
    }
}

/// Adds an event to `span` with string attributes (a retry, a dead letter).
pub fn event(span: &tracing::Span, name: &'static str, attributes: &[(&'static str, String)]) {
    span.add_event(
        name,
        attributes
            .iter()
            .map(|(k, v)| opentelemetry::KeyValue::new(*k, v.clone()))
            .collect(),
    );
}

/// Marks `span` as failed with `error.type` = `kind` and a description.
pub fn fail(span: &tracing::Span, kind: &'static str, description: &str) {
    span.set_attribute("error.type", kind);
    span.set_status(opentelemetry::trace::Status::error(description.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_round_trips_through_headers() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = extract_pair(Some(tp), Some("k=v"));
        assert!(cx.span().span_context().is_valid());
        let mut h = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut h));
        assert_eq!(h.get(headers::TRACEPARENT).map(|v| v.as_str()), Some(tp));
        assert_eq!(h.get(TRACESTATE).map(|v| v.as_str()), Some("k=v"));
        let back = extract(&h);
        assert_eq!(
            back.span().span_context().trace_id(),
            cx.span().span_context().trace_id()
        );
    }

    #[test]
    fn the_fast_flag_check_agrees_with_the_propagator() {
        set_enabled(true);
        for (tp, off) in [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                true,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02",
                true,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
                false,
            ),
            // Invalid ids: no context, so a new root is traced.
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-00",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-00",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-00",
                false,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-00",
                false,
            ),
            ("garbage", false),
        ] {
            assert_eq!(unsampled_flags(tp), off, "{tp}");
            let mut h = HeaderMap::new();
            h.insert(headers::TRACEPARENT, tp);
            assert_eq!(unsampled(&extract(&h)), off, "{tp}: propagator");
            assert_eq!(traced_parent(&h).is_none(), off, "{tp}: traced_parent");
        }
    }

    #[test]
    fn no_or_bad_headers_give_no_parent() {
        assert!(!extract(&HeaderMap::new()).span().span_context().is_valid());
        assert!(
            !extract_pair(Some("garbage"), None)
                .span()
                .span_context()
                .is_valid()
        );
    }
}
