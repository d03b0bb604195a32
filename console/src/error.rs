//! The console's errors, answered as JSON `{"error": <code>, "message": …}`
//! (the reference host's shape).
//!
//! | status | `error` | when |
//! |---|---|---|
//! | 400 | `invalid_input` | a bad parameter or body (an unknown hook, a sequence that is not a number, a purge without `confirm`) |
//! | 401 | `not_authenticated` | no token, a malformed header, an unknown or revoked token, an inactive user |
//! | 403 | `permission_denied` | the user is not a superuser |
//! | 404 | `not_found` | no such route, dead letter or event |
//! | 405 | `method_not_allowed` | the path exists, the method does not |
//! | 500 | `internal_error` | the store failed (logged; the message is generic) |
//! | 503 | `unavailable` | NATS or the bus failed or did not answer; too many live tails |

use std::net::SocketAddr;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error of the console: at start-up, or answered to a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// 400.
    #[error("{0}")]
    Invalid(String),
    /// 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 503: NATS, a stream or the bus.
    #[error("{what}: {source}")]
    Unavailable {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
    /// 500: the token store.
    #[error("the token store failed: {0}")]
    Store(#[from] store::StoreError),
    /// The listening address cannot be bound (start-up only).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ConsoleError {
    /// A 503 for a failed NATS call doing `what`.
    pub(crate) fn nats(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> ConsoleError {
        let what = what.into();
        move |source| ConsoleError::Unavailable { what, source }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ConsoleError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
            ConsoleError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "not_authenticated"),
            ConsoleError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_denied"),
            ConsoleError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ConsoleError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ConsoleError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ConsoleError::Store(_) | ConsoleError::Bind { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            tracing::warn!(error = %self, "console request failed");
            match self {
                ConsoleError::Unavailable { .. } => self.to_string(),
                _ => "internal error; see the console's log".to_owned(),
            }
        } else {
            self.to_string()
        };
        let mut response =
            (status, Json(json!({"error": code, "message": message}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Token"),
            );
        }
        response
    }
}
