//! API errors: JSON bodies `{"error": <code>, "message": …, …}` with the right
//! HTTP status. Every error the host answers has this shape (`Content-Type:
//! application/json`): the handlers' own, and those of the HTTP layer (a body
//! over the limit, an unreadable path or query, a body timeout), which
//! [`super::server`] turns into it. Only a request the HTTP parser cannot read
//! at all (a malformed request line or header: 400, 431, 414) gets a bare status
//! line from hyper before the connection closes, and a connection whose request
//! header does not arrive in time is closed without an answer.
//!
//! | status | `error` | when |
//! |---|---|---|
//! | 400 | `validation_error` | validators rejected the change: `errors` lists every one (plugin, handler, field, message) |
//! | 400 | `rejected` | a `before_*` hook rejected or vetoed the change (`plugin`, `handler`, `hook`) |
//! | 400 | `invalid_input` | the request itself is wrong: `errors` lists every problem |
//! | 400 | `plugin_error` | a plugin API route failed (`plugin_id`) |
//! | 401 | `not_authenticated` | no or an unknown token |
//! | 403 | `permission_denied` | the user may not do this |
//! | 404 | `not_found` | no such object, plugin or route |
//! | 405 | `method_not_allowed` | the path exists, the method does not |
//! | 408 | `request_timeout` | the request body stopped arriving for the body timeout (`timeout_ms`); the connection is closed |
//! | 409 | `conflict` | a name is taken, or the state does not allow it |
//! | 413 | `payload_too_large` | the body is over the limit (`limit`); or the change's event, or a synchronous hook's request, would be larger than NATS takes (`size`, `limit`): nothing is written |
//! | 415, … | the status's reason in snake case (`unsupported_media_type`) | another error of the HTTP layer |
//! | 429 | `rate_limited` | too many requests (`Retry-After`) |
//! | 500 | `internal_error` | the store or NATS failed (logged; the message is generic) |
//! | 502 | `plugin_bad_reply` | a plugin API route's reply cannot be answered: not an `ApiResponse`, a status outside 200–599, a body with 204/205/304 (`plugin_id`, `reason`) |
//! | 503 | `hook_unavailable` / `plugin_unavailable` | a blocking hook's plugin, or a route's plugin, has no replica or failed to answer |
//! | 504 | `plugin_timeout` | a plugin API route did not answer in time |

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use hookbus::sync_hooks::SyncHookError;
use store::StoreError;

/// An error answered as JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 `invalid_input`: every problem with the request.
    #[error("invalid input: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// 400/503: a synchronous hook stopped the change.
    #[error(transparent)]
    Hook(#[from] SyncHookError),
    /// 400 `plugin_error`: a plugin API route answered with an error.
    #[error("plugin {plugin_id} failed: {message}")]
    PluginError {
        /// The plugin.
        plugin_id: String,
        /// Its message.
        message: String,
    },
    /// 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405: the path exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 413 `payload_too_large`: the body is over the host's limit (bytes).
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// 413 `payload_too_large`: the change's event would be larger than the
    /// event bus takes; nothing was written.
    #[error("{message}")]
    EventTooLarge {
        /// What is too large, with both sizes.
        message: String,
        /// Its size, bytes.
        size: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// 429 with `Retry-After` seconds.
    #[error("rate limit exceeded; retry after {retry_after_secs} s")]
    RateLimited {
        /// Seconds to wait.
        retry_after_secs: u64,
    },
    /// 503 `plugin_unavailable`: a plugin API route's plugin has no replica.
    #[error("plugin {plugin_id} is unavailable: {message}")]
    PluginUnavailable {
        /// The plugin.
        plugin_id: String,
        /// Why.
        message: String,
    },
    /// 502 `plugin_bad_reply`: a plugin API route's reply cannot be answered.
    #[error("plugin {plugin_id} answered an invalid reply: {reason}")]
    PluginBadReply {
        /// The plugin.
        plugin_id: String,
        /// What is wrong with the reply.
        reason: String,
    },
    /// 408 `request_timeout`: the request body stopped arriving.
    #[error("the request body did not arrive: nothing was received for {timeout_ms} ms")]
    RequestTimeout {
        /// The body timeout.
        timeout_ms: u64,
    },
    /// 504 `plugin_timeout`.
    #[error("plugin {plugin_id} did not answer within {timeout_ms} ms")]
    PluginTimeout {
        /// The plugin.
        plugin_id: String,
        /// The route's timeout.
        timeout_ms: u64,
    },
    /// 500: the store or NATS failed (logged; the message is generic).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Invalid(problems) => ApiError::Invalid(problems),
            StoreError::EventTooLarge { size, limit, .. } => ApiError::EventTooLarge {
                message: e.to_string(),
                size,
                limit,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::PluginError { .. } => StatusCode::BAD_REQUEST,
            ApiError::Hook(SyncHookError::Unavailable { .. })
            | ApiError::PluginUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Hook(SyncHookError::Encode { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Hook(SyncHookError::TooLarge { .. }) | ApiError::EventTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Hook(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PluginTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::PluginBadReply { .. } => StatusCode::BAD_GATEWAY,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let message = self.to_string();
        match self {
            ApiError::Invalid(errors) => {
                json!({"error": "invalid_input", "message": message, "errors": errors})
            }
            ApiError::Hook(SyncHookError::Invalid { errors }) => {
                json!({"error": "validation_error", "message": message, "errors": errors})
            }
            ApiError::Hook(SyncHookError::Rejected {
                hook,
                plugin,
                handler,
                reason,
            }) => json!({
                "error": "rejected", "message": message, "hook": hook,
                "plugin": plugin, "handler": handler, "reason": reason,
            }),
            ApiError::Hook(SyncHookError::Unavailable {
                hook,
                plugin,
                handler,
                reason,
            }) => json!({
                "error": "hook_unavailable", "message": message, "hook": hook,
                "plugin": plugin, "handler": handler, "reason": reason,
            }),
            ApiError::Hook(SyncHookError::TooLarge {
                hook, size, limit, ..
            }) => json!({
                "error": "payload_too_large", "message": message, "hook": hook,
                "size": size, "limit": limit,
            }),
            ApiError::Hook(_) => json!({"error": "internal_error", "message": message}),
            ApiError::PluginError { plugin_id, message } => {
                json!({"error": "plugin_error", "message": message, "plugin_id": plugin_id})
            }
            ApiError::Unauthenticated(_) => {
                json!({"error": "not_authenticated", "message": message})
            }
            ApiError::Forbidden(_) => json!({"error": "permission_denied", "message": message}),
            ApiError::NotFound(_) => json!({"error": "not_found", "message": message}),
            ApiError::Conflict(_) => json!({"error": "conflict", "message": message}),
            ApiError::MethodNotAllowed(_) => {
                json!({"error": "method_not_allowed", "message": message})
            }
            ApiError::TooLarge { limit } => {
                json!({"error": "payload_too_large", "message": message, "limit": limit})
            }
            ApiError::EventTooLarge { size, limit, .. } => json!({
                "error": "payload_too_large", "message": message, "size": size, "limit": limit,
            }),
            ApiError::RateLimited { retry_after_secs } => json!({
                "error": "rate_limited", "message": message, "retry_after": retry_after_secs,
            }),
            ApiError::PluginUnavailable { plugin_id, .. } => {
                json!({"error": "plugin_unavailable", "message": message, "plugin_id": plugin_id})
            }
            ApiError::PluginTimeout { plugin_id, .. } => {
                json!({"error": "plugin_timeout", "message": message, "plugin_id": plugin_id})
            }
            ApiError::PluginBadReply { plugin_id, reason } => json!({
                "error": "plugin_bad_reply", "message": message, "plugin_id": plugin_id,
                "reason": reason,
            }),
            ApiError::RequestTimeout { timeout_ms } => {
                json!({"error": "request_timeout", "message": message, "timeout_ms": timeout_ms})
            }
            ApiError::Internal(_) => {
                json!({"error": "internal_error", "message": "internal error; see the host log"})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        match self {
            ApiError::RateLimited { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            // The rest of the body is not read: the connection cannot carry another request.
            ApiError::RequestTimeout { .. } => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON error the [`ApiError`] variants do not cover.
pub(crate) fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "message": message})),
    )
        .into_response()
}

/// Marks a response that is a plugin's reply (its status and body are the
/// plugin's, never rewritten into the host's error shape).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PluginReply;

/// Why the host did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// `PLUGIN_OPERATION_ID_CONFIG` is wrong; every problem, with Pagoda's messages.
    #[error("PLUGIN_OPERATION_ID_CONFIG is invalid:\n  {}", .0.join("\n  "))]
    OperationIds(Vec<String>),
    /// The model store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The registry could not be loaded.
    #[error(transparent)]
    Registry(#[from] hookbus::registry::RegistryError),
    /// JetStream set-up failed.
    #[error(transparent)]
    Provision(#[from] hookbus::provision::ProvisionError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The subscription to other hosts' cache notices failed.
    #[error("cannot subscribe to the other hosts' cache notices: {0}")]
    Notices(#[from] async_nats::SubscribeError),
}
