//! Authentication (`Authorization: Token <key>`, keys stored as SHA-256 hashes),
//! and the users and tokens endpoints.
//!
//! (skeleton: filled in by the host work)

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use core_events::User;

use super::{ApiError, HostState};

/// The authenticated user of a request (401 `not_authenticated` without a valid token).
#[derive(Debug, Clone)]
pub struct AuthUser {
    /// The user.
    pub user: User,
    /// The id of the token used (the key of per-token rate limits).
    pub token_id: i64,
}

/// The authenticated user, if the request has a valid token (an invalid one is still 401).
#[derive(Debug, Clone)]
pub struct MaybeUser(pub Option<AuthUser>);

impl FromRequestParts<HostState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HostState,
    ) -> Result<Self, Self::Rejection> {
        match MaybeUser::from_request_parts(parts, state).await?.0 {
            Some(user) => Ok(user),
            None => Err(ApiError::Unauthenticated(
                "authentication required: send 'Authorization: Token <key>'".into(),
            )),
        }
    }
}

impl FromRequestParts<HostState> for MaybeUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HostState,
    ) -> Result<Self, Self::Rejection> {
        let _ = (parts, state);
        Ok(MaybeUser(None))
    }
}

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
}
