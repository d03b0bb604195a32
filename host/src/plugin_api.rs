//! Plugin API routes: `/api/v2/plugins/<plugin-id>/<path>` forwarded over
//! request/reply, with a per-token rate limit.
//!
//! For `<METHOD> /api/v2/plugins/<plugin-id>/<path>` the host:
//!
//! 1. finds the plugin in the live registry (404 unless registered and in
//!    `ENABLED_PLUGINS`) and the route its manifest declares for `METHOD path`
//!    (404 without one; paths under `/tasks/` are reserved for
//!    [`super::jobs`] and never forwarded);
//! 2. authenticates the caller (401 without a valid token, unless the route is
//!    `public`; an invalid token is 401 even on a public route);
//! 3. applies the rate limit: per token; anonymous calls of public routes share
//!    one bucket per client IP address when the server records it (else one
//!    shared bucket) (429 with `Retry-After`); task starts use the same buckets;
//! 4. reads the body (413 beyond the smaller of the host's `max_body_bytes` and
//!    [`MAX_API_BODY_BYTES`]); a JSON body (`Content-Type: application/json` or
//!    `…+json`) must parse (400) and is forwarded as JSON, any other body as a
//!    string (400 unless UTF-8), an empty one as `null`;
//! 5. sends an [`ApiRequest`] to `<prefix>.api.<plugin-id>.<route>` and waits up to
//!    the route's `timeout_ms`: no responders → 503 `plugin_unavailable`, no
//!    reply → 504 `plugin_timeout`, a `Nats-Service-Error` reply → 400
//!    `plugin_error` with its text;
//! 6. checks the reply: one [`ApiResponse::parse`] rejects, a status outside
//!    200–599 (HTTP cannot answer 1xx as a final status) or a body with 204,
//!    205 or 304 (which have none) → 502 `plugin_bad_reply` naming the plugin and
//!    the reason;
//! 7. answers with the reply's status, its headers (hop-by-hop ones and
//!    `content-length` dropped) and its body as JSON (`null`: no body; a string
//!    body with a non-JSON `content-type` set by the plugin is sent as that text).
//!
//! Every call of a declared route is counted in the host's metrics
//! (`hookbus_plugin_api_requests_total` by plugin, route and status, and its
//! latency).
//!
//! See `docs/plugin-api-and-jobs.md`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use async_nats::RequestErrorKind;
use async_nats::client::Request;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use core_events::plugin_api::{ApiRequest, ApiResponse, FORWARDED_HEADERS, MAX_API_BODY_BYTES};
use core_events::protocol::headers;
use serde_json::Value;

use super::error::{ApiError, error_response};
use super::rate::RateKey;
use super::state::HostState;
use super::user::MaybeUser;

/// Response headers never copied from a plugin's reply.
const DROPPED_HEADERS: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
        .route("/api/v2/plugins/{plugin}", any(forward))
        .route("/api/v2/plugins/{plugin}/", any(forward))
        .route("/api/v2/plugins/{plugin}/{*path}", any(forward))
}

async fn forward(State(state): State<HostState>, request: axum::extract::Request) -> Response {
    let started = Instant::now();
    let mut called = None;
    let response = match try_forward(&state, request, &mut called).await {
        Ok(response) | Err(response) => response,
    };
    if let Some((plugin, route)) = called {
        state.metrics.api_call(
            &plugin,
            &route,
            response.status().as_u16(),
            started.elapsed(),
        );
    }
    response
}

/// Forwards the request; sets `called` to the plugin and route name once the
/// route is found.
async fn try_forward(
    state: &HostState,
    request: axum::extract::Request,
    called: &mut Option<(String, String)>,
) -> Result<Response, Response> {
    let (mut parts, body) = request.into_parts();
    let Path(params) = Path::<HashMap<String, String>>::from_request_parts(&mut parts, state)
        .await
        .map_err(IntoResponse::into_response)?;
    let plugin = params.get("plugin").cloned().unwrap_or_default();
    let path = format!("/{}", params.get("path").map_or("", String::as_str));
    let method = parts.method.as_str().to_ascii_uppercase();

    if path.split('/').find(|s| !s.is_empty()) == Some("tasks") {
        return Err(ApiError::NotFound(format!(
            "'/api/v2/plugins/{plugin}/tasks/…' is reserved for plugin tasks: \
             POST /api/v2/plugins/{plugin}/tasks/<task>/ starts one"
        ))
        .into_response());
    }
    let table = state.registry.table();
    let Some(entry) = table.enabled_plugin(&plugin) else {
        return Err(ApiError::NotFound(format!(
            "plugin '{plugin}' is not registered or not enabled"
        ))
        .into_response());
    };
    let Some(route) = entry.manifest.api_route(&method, &path).cloned() else {
        return Err(ApiError::NotFound(format!(
            "plugin '{plugin}' has no API route for {method} {path}"
        ))
        .into_response());
    };
    drop(table);
    *called = Some((plugin.clone(), route.name.clone()));

    let MaybeUser(user) = MaybeUser::from_request_parts(&mut parts, state)
        .await
        .map_err(IntoResponse::into_response)?;
    if user.is_none() && !route.public {
        return Err(ApiError::Unauthenticated(
            "authentication required: send 'Authorization: Token <key>'".into(),
        )
        .into_response());
    }
    let key = match &user {
        Some(u) => RateKey::Token(u.token_id),
        None => parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(RateKey::Anonymous, |c| RateKey::Client(c.0.ip())),
    };
    if let Err(retry_after_secs) = state.limiter.check(key) {
        return Err(ApiError::RateLimited { retry_after_secs }.into_response());
    }

    let query: BTreeMap<String, String> = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map_err(|e| {
            ApiError::Invalid(vec![format!("the query string is not valid: {e}")]).into_response()
        })?
        .0
        .into_iter()
        .collect();
    let forwarded: BTreeMap<String, String> = FORWARDED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = parts.headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect();
    let limit = state.config.max_body_bytes.min(MAX_API_BODY_BYTES);
    let body = read_body(&parts.headers, body, limit).await?;

    let api_request = ApiRequest {
        route: route.name.clone(),
        method,
        path,
        query,
        headers: forwarded,
        body,
        user: user.map(|u| u.user),
    };
    let payload = serde_json::to_vec(&api_request).map_err(|e| {
        ApiError::Internal(format!("cannot encode the API request: {e}")).into_response()
    })?;
    let subject = state.subjects.api(&plugin, &route.name);
    let mut nats_headers = async_nats::HeaderMap::new();
    nats_headers.insert(headers::PLUGIN, plugin.as_str());
    // With traces exported, the call is a CLIENT span (`call <plugin>.<route>`)
    // under the request's span and the plugin's handler span is its child;
    // otherwise the caller's `traceparent` goes on as it came.
    let span = if hookbus_kit::trace::enabled() {
        let span = tracing::info_span!(
            "plugin api call",
            otel.name = %format_args!("call {plugin}.{}", route.name),
            otel.kind = "client",
            messaging.system = hookbus_kit::trace::fields::SYSTEM,
            messaging.operation.type = "send",
            messaging.destination.name = %subject,
            pagoda.plugin = %plugin,
            pagoda.route = %route.name,
        );
        hookbus_kit::trace::inject(&span, &mut nats_headers);
        span
    } else {
        if let Some(tp) = api_request.headers.get("traceparent") {
            nats_headers.insert(headers::TRACEPARENT, tp.as_str());
        }
        tracing::Span::none()
    };
    let nats_request = Request::new()
        .payload(Bytes::from(payload))
        .headers(nats_headers)
        .timeout(Some(route.timeout()));
    let sent = tracing::Instrument::instrument(
        state.client.send_request(subject, nats_request),
        span.clone(),
    )
    .await;
    let reply = match sent {
        Ok(reply) => reply,
        Err(e) => {
            hookbus_kit::trace::fail(&span, "request_failed", &e.to_string());
            let error = match e.kind() {
                RequestErrorKind::NoResponders => ApiError::PluginUnavailable {
                    plugin_id: plugin,
                    message: "no replica is running".into(),
                },
                RequestErrorKind::TimedOut => ApiError::PluginTimeout {
                    plugin_id: plugin,
                    timeout_ms: route.timeout_ms,
                },
                _ => ApiError::PluginUnavailable {
                    plugin_id: plugin,
                    message: format!("request failed: {e}"),
                },
            };
            return Err(error.into_response());
        }
    };
    if let Some(text) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::SERVICE_ERROR))
    {
        hookbus_kit::trace::fail(&span, "plugin_error", text.as_str());
        return Err(ApiError::PluginError {
            plugin_id: plugin,
            message: text.as_str().to_owned(),
        }
        .into_response());
    }
    let bad_reply = |reason: String| {
        tracing::warn!(plugin = %plugin, route = %route.name, %reason, "bad plugin API reply");
        ApiError::PluginBadReply {
            plugin_id: plugin.clone(),
            reason,
        }
        .into_response()
    };
    let answer = ApiResponse::parse(&reply.payload).map_err(|e| bad_reply(e.to_string()))?;
    let status = reply_status(&answer).map_err(|e| bad_reply(e.to_string()))?;
    Ok(into_http(&plugin, status, answer))
}

/// The HTTP status of a plugin's reply, if HTTP can answer it: a final status
/// (200–599), without a body for 204, 205 and 304.
///
/// # Errors
///
/// [`BadStatus`]: the reason it cannot.
fn reply_status(answer: &ApiResponse) -> Result<StatusCode, BadStatus> {
    let code = answer.status;
    if !(200..=599).contains(&code) {
        return Err(BadStatus::NotFinal(code));
    }
    let status = StatusCode::from_u16(code).map_err(|e| BadStatus::Invalid {
        code,
        reason: e.to_string(),
    })?;
    if matches!(code, 204 | 205 | 304) && !answer.body.is_null() {
        return Err(BadStatus::BodyNotAllowed(code));
    }
    Ok(status)
}

/// Why HTTP cannot answer a plugin's reply status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum BadStatus {
    /// Not 200 to 599.
    #[error("status {0} is not a final HTTP status (200-599; 1xx are interim)")]
    NotFinal(u16),
    /// Not a status `http` takes.
    #[error("status {code} is not valid: {reason}")]
    Invalid {
        /// The status.
        code: u16,
        /// Why.
        reason: String,
    },
    /// 204, 205 or 304 with a body.
    #[error("status {0} has no body, and the reply has one (send \"body\": null)")]
    BodyNotAllowed(u16),
}

/// Reads the request body within `limit` bytes and turns it into the JSON value
/// forwarded to the plugin.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, Response> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over {limit} bytes, the limit of plugin API routes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) => {
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(err) = source {
                if err.to_string().contains("length limit") {
                    return Err(too_large());
                }
                source = err.source();
            }
            return Err(ApiError::Invalid(vec![format!(
                "the request body could not be read: {e}"
            )])
            .into_response());
        }
    };
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence == "application/json" || essence.ends_with("+json") {
        // Strictly, like every request body: depth limit, no duplicate keys, no NUL.
        super::request::read_json(&bytes, "the request body").map_err(IntoResponse::into_response)
    } else {
        String::from_utf8(bytes.to_vec())
            .map(Value::String)
            .map_err(|_| {
                ApiError::Invalid(vec![
                "the request body is neither JSON (Content-Type: application/json) nor UTF-8 text"
                    .into(),
            ])
                .into_response()
            })
    }
}

/// The HTTP response for a plugin's reply (its status checked by [`reply_status`]).
fn into_http(plugin: &str, status: StatusCode, answer: ApiResponse) -> Response {
    let mut out_headers = HeaderMap::new();
    for (name, value) in &answer.headers {
        let lower = name.to_ascii_lowercase();
        if DROPPED_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        match (
            HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                out_headers.append(n, v);
            }
            _ => {
                tracing::warn!(plugin, header = %name, "dropped a reply header that HTTP cannot carry")
            }
        }
    }
    let plugin_type = out_headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let body = match (&answer.body, plugin_type) {
        (Value::Null, _) => Body::empty(),
        (Value::String(text), Some(t)) if !t.contains("json") => Body::from(text.clone()),
        (value, t) => {
            if t.is_none() {
                out_headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            Body::from(value.to_string())
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = out_headers;
    response.extensions_mut().insert(super::error::PluginReply);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::RateLimiter;
    use serde_json::json;

    #[test]
    fn buckets_refuse_beyond_the_burst_and_name_the_wait() {
        let limiter = RateLimiter::new(1, 3);
        for _ in 0..3 {
            assert_eq!(limiter.check(RateKey::Token(1)), Ok(()));
        }
        assert_eq!(limiter.check(RateKey::Token(1)), Err(1));
        assert_eq!(
            limiter.check(RateKey::Token(2)),
            Ok(()),
            "keys are separate"
        );
        let unlimited = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert_eq!(unlimited.check(RateKey::Anonymous), Ok(()));
        }
    }

    #[test]
    fn replies_become_http_responses() {
        let mut answer = ApiResponse::with_status(201, json!({"ok": true}));
        answer.headers.insert("X-Custom".into(), "1".into());
        answer
            .headers
            .insert("Transfer-Encoding".into(), "chunked".into());
        let status = reply_status(&answer).unwrap();
        let r = into_http("p", status, answer);
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["x-custom"], "1");
        assert!(r.headers().get("transfer-encoding").is_none());
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn replies_http_cannot_answer_are_refused_with_the_reason() {
        for (status, body) in [(100, Value::Null), (101, json!("x")), (99, Value::Null)] {
            let answer = ApiResponse::with_status(status, body);
            let reason = reply_status(&answer).unwrap_err().to_string();
            assert!(reason.contains(&status.to_string()), "{reason}");
        }
        for status in [204, 205, 304] {
            let reason = reply_status(&ApiResponse::with_status(status, json!({"a": 1})))
                .unwrap_err()
                .to_string();
            assert!(reason.contains("no body"), "{reason}");
            assert!(reply_status(&ApiResponse::with_status(status, Value::Null)).is_ok());
        }
        assert_eq!(
            reply_status(&ApiResponse::with_status(599, Value::Null)),
            Ok(StatusCode::from_u16(599).unwrap())
        );
    }
}
