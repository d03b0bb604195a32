//! The host's HTTP server: an accept loop limited to
//! [`HttpSettings::max_connections`] open connections, hyper HTTP/1 connections
//! with a header read timeout, and the layers every request passes: a body
//! timeout, JSON errors from the HTTP layer, metrics and a request span.
//!
//! | limit | setting | default | beyond it |
//! |---|---|---|---|
//! | a request's header must arrive within | [`HttpSettings::header_timeout`] | 30 s | the connection is closed without an answer |
//! | a kept-alive connection may wait for its next request | the same (hyper counts a header from when the connection waits for it) | 30 s | the connection is closed |
//! | a request body may pause (no byte received) | [`HttpSettings::body_timeout`] | 30 s | 408 `request_timeout`, and the connection is closed |
//! | open connections | [`HttpSettings::max_connections`], lowered to fit the open-files limit | 1024 | further connections wait in the listen backlog until one closes |
//!
//! Connections over the limit are not refused: like Go's `netutil.LimitListener`,
//! the loop stops accepting, so they wait in the kernel's backlog (no file
//! descriptor is spent on them) and are served in turn as idle or slow
//! connections are closed by the timeouts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use super::error::ApiError;
use super::error::{PluginReply, error_response};
use super::state::{HostState, HttpSettings};
use hookbus::call_metrics::CallMetrics;

/// File descriptors kept for everything but HTTP connections (database pool,
/// NATS, SQLite's files, logs) when the connection limit is fitted to the
/// open-files limit.
pub const RESERVED_FDS: u64 = 128;

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux);
/// `None` when unknown or unlimited.
fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The connection limit in force: `configured`, lowered so that the connections
/// and [`RESERVED_FDS`] fit in `open_files` (at least 8).
pub fn connection_limit(configured: usize, open_files: Option<u64>) -> usize {
    let configured = configured.max(1);
    match open_files {
        Some(limit) => {
            let fits =
                usize::try_from(limit.saturating_sub(RESERVED_FDS).max(8)).unwrap_or(usize::MAX);
            configured.min(fits)
        }
        None => configured,
    }
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting and waits
/// for the open connections to finish their requests (idle ones close at once).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: HttpSettings,
    metrics: Arc<CallMetrics>,
    shutdown: CancellationToken,
) {
    let open_files = open_files_limit();
    let limit = connection_limit(settings.max_connections, open_files);
    if limit < settings.max_connections {
        tracing::warn!(
            configured = settings.max_connections,
            limit,
            open_files,
            "HTTP connection limit lowered to fit the open-files limit (raise it with ulimit -n)"
        );
    }
    metrics
        .connection_limit
        .set(i64::try_from(limit).unwrap_or(i64::MAX));
    let slots = Arc::new(Semaphore::new(limit));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    // The limit is logged when reached, at most once a minute.
    let mut warned: Option<Instant> = None;
    loop {
        if slots.available_permits() == 0
            && warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            warned = Some(Instant::now());
            tracing::warn!(
                limit,
                "HTTP connection limit reached: new connections wait to be accepted"
            );
        }
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors, most likely: wait for some to close.
                        tracing::error!(error = %e, "cannot accept an HTTP connection");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            () = shutdown.cancelled() => break,
                        }
                    }
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // No Nagle: a response's last segment must not wait for the client's
        // delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let router = app.clone();
        // With connection info, so anonymous calls of public plugin routes are
        // rate-limited per client IP.
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        let metrics = Arc::clone(&metrics);
        metrics.connections.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                if e.is_timeout() {
                    metrics.http_timeout("header");
                }
                tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
            }
            metrics.connections.dec();
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Errors of one connection that `accept` reports (the next accept is fine).
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// The innermost layer: a body timeout on the request, and every error
/// response of the HTTP layer (axum's rejections) in the host's JSON shape.
pub(crate) async fn guard(
    State(state): State<HostState>,
    mut request: Request,
    next: Next,
) -> Response {
    let timed_out = Arc::new(AtomicBool::new(false));
    if !request.body().is_end_stream() {
        let flag = Arc::clone(&timed_out);
        let body = std::mem::take(request.body_mut());
        let body = TimeoutBody::new(state.config.http.body_timeout, body).map_err(move |e| {
            if e.is::<TimeoutError>() {
                flag.store(true, Ordering::Relaxed);
            }
            e
        });
        *request.body_mut() = Body::new(body);
    }
    let response = next.run(request).await;
    if timed_out.load(Ordering::Relaxed) {
        state.metrics.http_timeout("body");
        let timeout_ms =
            u64::try_from(state.config.http.body_timeout.as_millis()).unwrap_or(u64::MAX);
        return ApiError::RequestTimeout { timeout_ms }.into_response();
    }
    if !response.status().is_client_error() && !response.status().is_server_error()
        || response.extensions().get::<PluginReply>().is_some()
        || is_json(&response)
    {
        return response;
    }
    as_json(response, state.config.max_body_bytes).await
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"))
}

/// An error response of the HTTP layer (plain text) in the host's JSON shape,
/// with the same status and the text as its message.
async fn as_json(response: Response, max_body_bytes: usize) -> Response {
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let status = parts.status;
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut json = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            ApiError::Invalid(vec![text]).into_response()
        }
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
            limit: max_body_bytes,
        }
        .into_response(),
        StatusCode::UNAUTHORIZED => ApiError::Unauthenticated(text).into_response(),
        StatusCode::FORBIDDEN => ApiError::Forbidden(text).into_response(),
        StatusCode::TOO_MANY_REQUESTS => error_response(status, "rate_limited", text),
        s if s.is_server_error() => ApiError::Internal(text).into_response(),
        s => {
            let code = s
                .canonical_reason()
                .unwrap_or("http_error")
                .to_ascii_lowercase()
                .replace([' ', '-'], "_");
            error_response(s, &code, text)
        }
    };
    *json.status_mut() = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in json.headers() {
        if name != header::CONTENT_LENGTH {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
    Response::from_parts(parts, json.into_body())
}

/// The outermost layer: counts every request by method, route template and
/// final status, with its latency (to the response head).
pub(crate) async fn observe(
    State(state): State<HostState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = next.run(request).await;
    state.metrics.http_request(
        method.as_str(),
        route.as_ref().map(MatchedPath::as_str),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// `GET /metrics`: the host's metrics (see [`hookbus::call_metrics`]).
pub(crate) async fn metrics(State(state): State<HostState>) -> Response {
    hookbus::http::metrics_response(state.metrics.encode())
}

/// The span of one request: tower-http's default (DEBUG, method, URI), or, with
/// traces exported, the SERVER span `<METHOD> <route template>` that starts the
/// change's trace (a child of the caller's `traceparent` when it sends one).
pub(crate) fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    use tower_http::trace::MakeSpan as _;
    if !hookbus_kit::trace::enabled() {
        return tower_http::trace::DefaultMakeSpan::new().make_span(request);
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
        url.path = request.uri().path(),
    );
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 512)
    };
    hookbus_kit::trace::follow(
        &span,
        hookbus_kit::trace::extract_pair(
            header(core_events::protocol::headers::TRACEPARENT),
            header(hookbus_kit::trace::TRACESTATE),
        ),
    );
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_fits_the_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             127431               127431               processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(1024));
        assert_eq!(
            parse_open_files_limit(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(connection_limit(1024, Some(1024)), 1024 - 128);
        assert_eq!(connection_limit(100, Some(1024)), 100);
        assert_eq!(connection_limit(1024, Some(100)), 8);
        assert_eq!(connection_limit(1024, None), 1024);
        assert_eq!(connection_limit(0, None), 1);
    }

    async fn converted(status: StatusCode, text: &'static str) -> (StatusCode, serde_json::Value) {
        let response = (status, [(header::ALLOW, "GET")], text).into_response();
        let json = as_json(response, 4096).await;
        let status = json.status();
        assert_eq!(json.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            json.headers()[header::ALLOW],
            "GET",
            "other headers are kept"
        );
        let bytes = axum::body::to_bytes(json.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn the_http_layers_errors_get_the_json_shape_and_keep_their_status() {
        let (status, body) = converted(StatusCode::BAD_REQUEST, "Invalid URL: bad `id`").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_input");
        assert_eq!(body["errors"], serde_json::json!(["Invalid URL: bad `id`"]));
        let (status, body) =
            converted(StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded").await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            (body["error"].as_str(), body["limit"].as_u64()),
            (Some("payload_too_large"), Some(4096))
        );
        let (status, body) = converted(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Expected JSON").await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(body["error"], "unsupported_media_type");
        assert_eq!(body["message"], "Expected JSON");
        let (status, body) = converted(StatusCode::BAD_GATEWAY, "").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body["error"], "internal_error");
        assert_eq!(body["message"], "internal error; see the host log");
    }
}
