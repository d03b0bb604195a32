//! Plugin API routes: `/api/v2/plugins/<plugin-id>/<path>` forwarded over
//! request/reply, with a per-token rate limit.
//!
//! (skeleton: filled in by the host work)

use axum::Router;

use super::HostState;

/// Per-token token-bucket rate limiter for plugin API routes.
#[derive(Debug, Default)]
pub struct RateLimiter {}

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
}
