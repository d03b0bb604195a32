//! (skeleton: filled in by the host work)

use axum::Router;

use super::HostState;

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
}
