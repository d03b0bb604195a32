//! Plugin API routes: the request the host forwards to a plugin's API endpoint
//! and the reply it expects.
//!
//! The host answers `<METHOD> /api/v2/plugins/<plugin-id>/<path>` for a route the
//! plugin declares in its manifest ([`crate::manifest::ApiRouteSpec`]) by sending
//! an [`ApiRequest`] to `<prefix>.api.<plugin-id>.<route>` (a NATS Services API
//! endpoint, queue group = plugin id) and turning the [`ApiResponse`] into the
//! HTTP response. A reply with a `Nats-Service-Error` header is a plugin error:
//! HTTP 400 `{"error": "plugin_error", "message": …, "plugin_id": …}`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::User;

/// Largest request body the host forwards, in bytes.
pub const MAX_API_BODY_BYTES: usize = 256 * 1024;
/// Largest reply a plugin may send, in bytes.
pub const MAX_API_REPLY_BYTES: usize = 1024 * 1024;
/// Request headers the host forwards (lower case); others stay at the host
/// (`authorization` never leaves it).
pub const FORWARDED_HEADERS: [&str; 4] = ["accept", "content-type", "user-agent", "traceparent"];

/// What the host sends to a plugin API endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiRequest {
    /// The route name from the manifest.
    pub route: String,
    /// HTTP method, upper case.
    pub method: String,
    /// The path below `/api/v2/plugins/<plugin-id>`, starting with `/`.
    pub path: String,
    /// Query parameters (the last value of a repeated one).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Forwarded request headers ([`FORWARDED_HEADERS`]), names in lower case.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body: JSON as it was sent, a JSON string for a non-JSON body, `null` for none.
    #[serde(default)]
    pub body: serde_json::Value,
    /// The authenticated user; `None` only on a route declared `public`.
    #[serde(default)]
    pub user: Option<User>,
}

/// What a plugin API endpoint replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiResponse {
    /// HTTP status, 100–599 (default 200).
    #[serde(default = "default_status")]
    pub status: u16,
    /// Response headers (hop-by-hop and `content-length` are dropped by the host).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body, sent as JSON (`null`: no body).
    #[serde(default)]
    pub body: serde_json::Value,
}

fn default_status() -> u16 {
    200
}

impl ApiResponse {
    /// A 200 response with a JSON body.
    pub fn ok(body: serde_json::Value) -> Self {
        ApiResponse {
            status: 200,
            headers: BTreeMap::new(),
            body,
        }
    }

    /// A response with `status` and a JSON body.
    pub fn with_status(status: u16, body: serde_json::Value) -> Self {
        ApiResponse {
            status,
            headers: BTreeMap::new(),
            body,
        }
    }

    /// Reads and checks a plugin's reply: size, JSON shape, status range, header
    /// names and values.
    ///
    /// # Errors
    ///
    /// [`ApiReplyError`], naming what is wrong.
    pub fn parse(body: &[u8]) -> Result<ApiResponse, ApiReplyError> {
        if body.len() > MAX_API_REPLY_BYTES {
            return Err(ApiReplyError::TooLarge {
                size: body.len(),
                limit: MAX_API_REPLY_BYTES,
            });
        }
        let reply: ApiResponse = serde_json::from_slice(body)
            .map_err(|e| ApiReplyError::NotApiResponse(e.to_string()))?;
        if !(100..=599).contains(&reply.status) {
            return Err(ApiReplyError::Status(reply.status));
        }
        for (name, value) in &reply.headers {
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
            if !name_ok {
                return Err(ApiReplyError::HeaderName(name.clone()));
            }
            if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                return Err(ApiReplyError::HeaderValue(name.clone()));
            }
        }
        Ok(reply)
    }
}

/// Why a plugin route's reply cannot be sent on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiReplyError {
    /// Over the limit.
    #[error("reply is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The reply's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON of [`ApiResponse`]'s shape.
    #[error("reply is not an ApiResponse: {0}")]
    NotApiResponse(String),
    /// A status outside 100 to 599.
    #[error("reply status {0} is outside 100..=599")]
    Status(u16),
    /// A header name that is not a token.
    #[error("reply header name '{0}' is not a valid header name")]
    HeaderName(String),
    /// A header value with control characters.
    #[error("reply header '{0}' has control characters")]
    HeaderValue(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked() {
        assert_eq!(ApiResponse::parse(br#"{}"#).unwrap().status, 200);
        assert!(
            ApiResponse::parse(br#"{"status": 700}"#)
                .unwrap_err()
                .to_string()
                .contains("700")
        );
        assert!(
            ApiResponse::parse(br#"{"headers": {"x y": "1"}}"#)
                .unwrap_err()
                .to_string()
                .contains("x y")
        );
        assert!(
            ApiResponse::parse(b"nope")
                .unwrap_err()
                .to_string()
                .contains("ApiResponse")
        );
        assert!(
            ApiResponse::parse(br#"{"status": 200, "extra": 1}"#)
                .unwrap_err()
                .to_string()
                .contains("extra")
        );
    }
}
