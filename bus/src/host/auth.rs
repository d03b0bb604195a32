//! Authentication (`Authorization: Token <key>`, keys stored as SHA-256 hashes),
//! and the users and tokens endpoints.
//!
//! (skeleton: filled in by the host work)

use axum::Router;

use super::HostState;

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
}
