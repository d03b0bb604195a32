//! One delivery of one event to one handler: attempts, the retry schedule, and
//! the decision between success, dead letter and deferral — made in one place.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, HeaderValue};
use chrono::Utc;
use core_events::protocol::{FailedAttempt, HandlerReply, codes, headers};

use super::ctx::{Ctx, Stopped};
use super::event::EventMeta;
use crate::registry::Route;

/// How one attempt ended.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// The handler answered with success.
    Ok,
    /// The handler failed, timed out or answered something unreadable.
    Failed { error: String, permanent: bool },
    /// No replica of the plugin is subscribed.
    NoResponders,
}

/// What to do when the plugin has no replica running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenAbsent {
    /// Hand back [`Delivery::Absent`] so the caller can defer the delivery.
    ReturnAbsent,
    /// Keep polling until a replica is back (used when draining deferred deliveries).
    Wait,
}

/// How a delivery ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The handler succeeded.
    Done,
    /// Every attempt failed; a dead letter was written.
    DeadLettered,
    /// No replica is running (only with [`WhenAbsent::ReturnAbsent`]).
    Absent,
}

/// The headers of a delivery: the event's own headers plus the delivery headers
/// (`Pagoda-Stream-Seq`, `Pagoda-Attempt`, `Pagoda-Redelivered`, `Pagoda-Plugin`,
/// `Pagoda-Handler`). Dead-letter replays use the same.
pub(crate) fn delivery_headers(
    event_headers: &HeaderMap,
    seq: u64,
    attempt: u32,
    redelivered: u64,
    plugin: &str,
    handler: &str,
) -> HeaderMap {
    let mut h: HeaderMap = event_headers.clone();
    h.insert(headers::STREAM_SEQ, HeaderValue::from(seq));
    h.insert(headers::ATTEMPT, HeaderValue::from(attempt));
    h.insert(headers::REDELIVERED, HeaderValue::from(redelivered));
    h.insert(headers::PLUGIN, plugin);
    h.insert(headers::HANDLER, handler);
    h
}

/// One attempt; `span` is the event's CONSUMER span (none when the event is not
/// traced), the parent of the attempt's CLIENT span. Spans are passed, not
/// entered: entering one on every poll of a delivery costs more than the span.
pub(crate) async fn attempt(
    ctx: &Ctx,
    route: &Route,
    event: &EventMeta,
    n: u32,
    span: &tracing::Span,
) -> Attempt {
    let mut h = delivery_headers(
        &event.headers,
        event.seq,
        n,
        event.redelivered,
        &route.plugin,
        &route.handler,
    );
    // No span when the event has none (traces off, or its trace not sampled):
    // the delivery carries the event's headers as they are.
    if span.is_disabled() {
        return request(
            &ctx.client,
            route.subject.to_string(),
            h,
            event.payload.clone(),
            route.timeout,
        )
        .await;
    }
    let span = attempt_span(span, route, event, n);
    hookbus_kit::trace::inject(&span, &mut h);
    let result = request(
        &ctx.client,
        route.subject.to_string(),
        h,
        event.payload.clone(),
        route.timeout,
    )
    .await;
    match &result {
        Attempt::Ok => {}
        Attempt::Failed { error, permanent } => hookbus_kit::trace::fail(
            &span,
            if *permanent {
                "permanent_failure"
            } else {
                "transient_failure"
            },
            error,
        ),
        Attempt::NoResponders => {
            hookbus_kit::trace::fail(
                &span,
                "no_responders",
                "no replica of the plugin is running",
            );
        }
    }
    result
}

/// The CLIENT span of one delivery attempt (`deliver <plugin>.<handler>`), a
/// child of the dispatcher's process span; its context goes in the request's
/// `traceparent`, so the plugin's handler span is its child.
fn attempt_span(parent: &tracing::Span, route: &Route, event: &EventMeta, n: u32) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "delivery attempt",
        otel.name = %format_args!("deliver {}.{}", route.plugin, route.handler),
        otel.kind = "client",
        messaging.system = hookbus_kit::trace::fields::SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = "deliver",
        messaging.destination.name = %route.subject,
        messaging.message.id = %event.id,
        pagoda.plugin = %route.plugin,
        pagoda.handler = %route.handler,
        pagoda.attempt = n,
    )
}

/// Sends one delivery request and classifies the reply.
pub(crate) async fn request(
    client: &async_nats::Client,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
    timeout: Duration,
) -> Attempt {
    let request = async_nats::Request::new()
        .payload(payload)
        .headers(headers)
        .timeout(Some(timeout));
    match client.send_request(subject, request).await {
        Ok(reply) => classify_reply(reply.headers.as_ref(), &reply.payload),
        Err(e) => match e.kind() {
            RequestErrorKind::NoResponders => Attempt::NoResponders,
            RequestErrorKind::TimedOut => Attempt::Failed {
                error: format!("no reply within {} ms", timeout.as_millis()),
                permanent: false,
            },
            RequestErrorKind::MaxPayloadExceeded => Attempt::Failed {
                error: "event is larger than the server's max_payload".to_owned(),
                permanent: true,
            },
            _ => Attempt::Failed {
                error: format!("request failed: {e}"),
                permanent: false,
            },
        },
    }
}

/// Classifies a handler's reply from its headers and body (see the protocol's
/// Replies table): a `Nats-Service-Error` header is a failure, permanent for a
/// 4xx `Nats-Service-Error-Code`; otherwise the body must be a success reply.
/// Total over any input (property-tested): the body is bounded by
/// [`HandlerReply::parse`], header values are only compared and parsed.
pub(crate) fn classify_reply(reply_headers: Option<&HeaderMap>, payload: &[u8]) -> Attempt {
    let service_error =
        reply_headers.and_then(|h| h.get(headers::SERVICE_ERROR).map(|v| v.to_string()));
    if let Some(text) = service_error {
        let code = reply_headers
            .and_then(|h| h.get(headers::SERVICE_ERROR_CODE))
            .and_then(|v| v.as_str().trim().parse::<u16>().ok())
            .unwrap_or(codes::TRANSIENT);
        Attempt::Failed {
            error: format!("handler error {code}: {text}"),
            permanent: codes::is_permanent(code),
        }
    } else {
        match HandlerReply::parse(payload) {
            Ok(_) => Attempt::Ok,
            Err(e) => Attempt::Failed {
                error: format!("bad reply: {e}"),
                permanent: false,
            },
        }
    }
}

/// Delivers `event` to `route`, retrying on the route's schedule and dead-lettering
/// after the last failure. An attempt that failed while the connection to NATS was
/// down is not counted: the delivery waits for the connection and tries again.
pub(crate) async fn deliver(
    ctx: &Ctx,
    route: &Route,
    event: &EventMeta,
    when_absent: WhenAbsent,
    span: &tracing::Span,
) -> Result<Delivery, Stopped> {
    let mut failures: Vec<FailedAttempt> = Vec::new();
    let mut absent_wait = ctx.settings.deferred_poll;
    let stats = ctx.handler_stats(route);
    let mut started = false;
    loop {
        ctx.wait_connected().await?;
        let n = u32::try_from(failures.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let sent = stats.as_ref().map(|_| Instant::now());
        let result = attempt(ctx, route, event, n, span).await;
        if let Some(hs) = &stats {
            if !started && !matches!(result, Attempt::NoResponders) {
                started = true;
                hs.deliveries.fetch_add(1, Ordering::Relaxed);
            }
            if n > 1 && !matches!(result, Attempt::NoResponders) {
                hs.retries.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(hs), Attempt::NoResponders) = (&stats, &result) {
            hs.absent();
        }
        match result {
            Attempt::Ok => {
                ctx.stats.delivered.inc();
                if let (Some(hs), Some(t)) = (&stats, sent) {
                    hs.success(t.elapsed(), event.seq);
                }
                return Ok(Delivery::Done);
            }
            Attempt::NoResponders => match when_absent {
                WhenAbsent::ReturnAbsent => return Ok(Delivery::Absent),
                WhenAbsent::Wait => {
                    ctx.pause(absent_wait).await?;
                    absent_wait = (absent_wait * 2).min(Duration::from_secs(2));
                }
            },
            Attempt::Failed { error, permanent } => {
                if !ctx.is_connected() {
                    tracing::debug!(%error, "attempt failed while disconnected; not counted");
                    continue;
                }
                ctx.stats.failed_attempts.inc();
                if let (Some(hs), Some(t)) = (&stats, sent) {
                    hs.failure(Some(t.elapsed()), &error);
                }
                tracing::warn!(
                    plugin = %route.plugin, handler = %route.handler,
                    event_id = %event.id, seq = event.seq, attempt = n, permanent, %error,
                    "handler attempt failed"
                );
                failures.push(FailedAttempt {
                    attempt: n,
                    at: Utc::now(),
                    error,
                });
                let next = hookbus_kit::retry::next_wait(&route.retry, failures.len(), permanent);
                if !span.is_disabled() {
                    // On the process span: the retry, or the dead letter.
                    let what = format!("{}.{}", route.plugin, route.handler);
                    let last_error = failures.last().map(|f| f.error.clone()).unwrap_or_default();
                    match next {
                        Some(wait) => hookbus_kit::trace::event(
                            span,
                            "retry",
                            &[
                                ("pagoda.handler", what),
                                ("pagoda.attempt", n.to_string()),
                                ("pagoda.retry_in_ms", wait.as_millis().to_string()),
                                ("pagoda.error", last_error),
                            ],
                        ),
                        None => hookbus_kit::trace::event(
                            span,
                            "dead_letter",
                            &[
                                ("pagoda.handler", what),
                                ("pagoda.attempts", n.to_string()),
                                ("pagoda.error", last_error),
                                (
                                    "messaging.destination.name",
                                    ctx.subjects.dead_letter(&route.plugin, &route.handler),
                                ),
                            ],
                        ),
                    }
                }
                match next {
                    Some(wait) => ctx.pause(wait).await?,
                    None => {
                        ctx.dead_letter(route, event, failures).await?;
                        return Ok(Delivery::DeadLettered);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod reply_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Any headers and body: a classification, never a panic; a service
        /// error is permanent exactly for codes 400..=499.
        #[test]
        fn any_reply_is_classified(
            error in proptest::option::of("[ -~]{0,40}"),
            code in proptest::option::of("[ -~]{0,8}"),
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut map = HeaderMap::new();
            if let Some(e) = &error {
                map.insert(headers::SERVICE_ERROR, e.as_str());
            }
            if let Some(c) = &code {
                map.insert(headers::SERVICE_ERROR_CODE, c.as_str());
            }
            let attempt = classify_reply(Some(&map), &body);
            match (&error, attempt) {
                (Some(_), Attempt::Failed { permanent, .. }) => {
                    let n = code.as_deref().and_then(|c| c.trim().parse::<u16>().ok());
                    prop_assert_eq!(permanent, n.is_some_and(|n| (400..500).contains(&n)));
                }
                (Some(_), other) => prop_assert!(false, "service error not a failure: {other:?}"),
                (None, Attempt::Ok) => prop_assert!(HandlerReply::parse(&body).is_ok()),
                (None, Attempt::Failed { permanent, error }) => {
                    prop_assert!(!permanent);
                    prop_assert!(error.starts_with("bad reply: "));
                }
                (None, other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }

        /// Any JSON object body without an error header.
        #[test]
        fn json_bodies(status in proptest::option::of("[a-z]{0,4}"), message in "[ -~]{0,20}") {
            let body = serde_json::json!({"status": status, "message": message}).to_string();
            let attempt = classify_reply(None, body.as_bytes());
            let ok = matches!(attempt, Attempt::Ok);
            prop_assert_eq!(ok, status.is_none() || status.as_deref() == Some("ok"));
        }
    }

    #[test]
    fn oversized_and_deep_bodies_are_bad_replies() {
        let big = vec![b' '; core_events::protocol::MAX_REPLY_BYTES + 1];
        assert!(matches!(
            classify_reply(None, &big),
            Attempt::Failed {
                permanent: false,
                ..
            }
        ));
        // Deeper than serde_json's recursion limit (128): an error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(
            classify_reply(None, deep.as_bytes()),
            Attempt::Failed { .. }
        ));
    }
}
