//! The bus's HTTP endpoints: `/healthz` (JSON, 200 when NATS is connected and the
//! dispatcher runs, else 503) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::monitor::Health;

/// Binds `addr` and serves `/healthz` and `/metrics` until `shutdown`. Returns the
/// bound address (useful with port 0) and the server task.
///
/// # Errors
///
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(health)
        // A span per request (method, path), as on the reference host.
        .layer(tower_http::trace::TraceLayer::new_for_http());
    tracing::info!(addr = %bound, "serving /healthz and /metrics");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((bound, task))
}

async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    health.sample().await;
    let report = health.report();
    let code = if report.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(report))
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    health.sample().await;
    metrics_response(health.metrics().encode())
}

/// The `Content-Type` of `/metrics` (the text [`prometheus_client`] encodes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `/metrics` answer (the bus's and the reference host's).
pub fn metrics_response(text: String) -> axum::response::Response {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response()
}
