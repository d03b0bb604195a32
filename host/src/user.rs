//! Who makes a request: [`AuthUser`] (a valid token) or [`MaybeUser`]; read from
//! `Authorization: Token <key>` in [`super::auth`]; [`Actor`]: the user with the
//! context of the writes a request makes.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use core_events::User;
use store::WriteContext;

use super::error::ApiError;
use super::state::HostState;

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

impl AuthUser {
    /// 403 unless the user is a superuser.
    ///
    /// # Errors
    ///
    /// [`ApiError::Forbidden`] naming `what` needs a superuser.
    pub fn require_superuser(&self, what: &str) -> Result<(), ApiError> {
        if self.user.is_superuser {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{what} needs a superuser; user '{}' is not one",
                self.user.username
            )))
        }
    }
}

/// Who makes a change, and the context its writes carry: the authenticated user
/// and the request's W3C `traceparent` (at most 128 bytes, else none) and
/// `tracestate` (at most 512), which the
/// outbox row keeps so the event continues the request's trace.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The user (401 without a valid token).
    pub auth: AuthUser,
    /// The user and trace every write of this request carries.
    pub ctx: WriteContext,
}

impl FromRequestParts<HostState> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HostState,
    ) -> Result<Self, Self::Rejection> {
        let auth = AuthUser::from_request_parts(parts, state).await?;
        // With traces exported, the writes continue the request's span (which
        // took the caller's `traceparent` as its parent); otherwise the caller's
        // header is passed on as it came.
        let header = |name: &str, max: usize| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= max)
                .map(str::to_owned)
        };
        let (traceparent, tracestate) = if hookbus_kit::trace::enabled() {
            hookbus_kit::trace::pair_of(&tracing::Span::current())
                .map_or((None, None), |(tp, ts)| (Some(tp), ts))
        } else {
            let traceparent = header("traceparent", 128);
            let tracestate = traceparent.as_ref().and(header("tracestate", 512));
            (traceparent, tracestate)
        };
        let ctx = WriteContext {
            user: Some(auth.user.clone()),
            traceparent,
            tracestate,
        };
        Ok(Actor { auth, ctx })
    }
}
