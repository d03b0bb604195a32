//! One delivery of one event to one handler: attempts, the retry schedule, and
//! the decision between success, dead letter and deferral — made in one place.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, HeaderValue};
use chrono::Utc;
use core_events::protocol::{FailedAttempt, HandlerReply, codes, headers};

use super::{Ctx, EventMeta, Stopped};
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

pub(crate) async fn attempt(ctx: &Ctx, route: &Route, event: &EventMeta, n: u32) -> Attempt {
    let mut h: HeaderMap = event.headers.clone();
    h.insert(headers::STREAM_SEQ, HeaderValue::from(event.seq));
    h.insert(headers::ATTEMPT, HeaderValue::from(n));
    h.insert(headers::REDELIVERED, HeaderValue::from(event.redelivered));
    h.insert(headers::PLUGIN, &*route.plugin);
    h.insert(headers::HANDLER, &*route.handler);
    let request = async_nats::Request::new()
        .payload(event.payload.clone())
        .headers(h)
        .timeout(Some(route.timeout));
    match ctx
        .client
        .send_request(route.subject.to_string(), request)
        .await
    {
        Ok(reply) => {
            let service_error = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::SERVICE_ERROR).map(|v| v.to_string()));
            if let Some(text) = service_error {
                let code = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::SERVICE_ERROR_CODE))
                    .and_then(|v| v.as_str().trim().parse::<u16>().ok())
                    .unwrap_or(codes::TRANSIENT);
                Attempt::Failed {
                    error: format!("handler error {code}: {text}"),
                    permanent: codes::is_permanent(code),
                }
            } else {
                match HandlerReply::parse(&reply.payload) {
                    Ok(_) => Attempt::Ok,
                    Err(e) => Attempt::Failed {
                        error: format!("bad reply: {e}"),
                        permanent: false,
                    },
                }
            }
        }
        Err(e) => match e.kind() {
            RequestErrorKind::NoResponders => Attempt::NoResponders,
            RequestErrorKind::TimedOut => Attempt::Failed {
                error: format!("no reply within {} ms", route.timeout.as_millis()),
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

/// Delivers `event` to `route`, retrying on the route's schedule and dead-lettering
/// after the last failure. An attempt that failed while the connection to NATS was
/// down is not counted: the delivery waits for the connection and tries again.
pub(crate) async fn deliver(
    ctx: &Ctx,
    route: &Route,
    event: &EventMeta,
    when_absent: WhenAbsent,
) -> Result<Delivery, Stopped> {
    let mut failures: Vec<FailedAttempt> = Vec::new();
    let mut absent_wait = ctx.settings.deferred_poll;
    loop {
        ctx.wait_connected().await?;
        let n = u32::try_from(failures.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        match attempt(ctx, route, event, n).await {
            Attempt::Ok => {
                ctx.stats.delivered.inc();
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
                let retries_used = failures.len() - 1;
                match route.retry.get(retries_used) {
                    Some(wait) if !permanent => ctx.pause(*wait).await?,
                    _ => {
                        ctx.dead_letter(route, event, failures).await?;
                        return Ok(Delivery::DeadLettered);
                    }
                }
            }
        }
    }
}
