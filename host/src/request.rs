//! What a request brings: a strict JSON body ([`Body`], [`read_json`]) read field
//! by field with every problem collected ([`Fields`]), query parameters
//! ([`Params`]), ids ([`parse_id`]; from the path: [`EntityId`], [`EntryId`],
//! [`UserId`], [`TokenId`]) and pages of lists ([`Page`]); each problem an
//! [`ApiError`] in the host's JSON shape.

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use core_events::AttrType;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::state::HostState;

/// Default page size of lists.
pub const DEFAULT_LIMIT: i64 = 100;

/// Largest page size of lists.
pub const MAX_LIMIT: i64 = 1000;

/// A JSON object request body. Every way it can be wrong is a JSON error: 413
/// `payload_too_large` over the limit, 400 `invalid_input` for a body that is not
/// a JSON object, or that nests too deep, repeats a key or holds a NUL character
/// ([`read_json`]).
#[derive(Debug)]
pub struct Body(pub Map<String, Value>);

impl FromRequest<HostState> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &HostState) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit }
            } else {
                ApiError::Invalid(vec![format!("cannot read the body: {}", r.body_text())])
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            // No body is an empty object: required fields are then reported by name.
            return Ok(Body(Map::new()));
        }
        match read_json(&bytes, "the body")? {
            Value::Object(map) => Ok(Body(map)),
            other => Err(ApiError::Invalid(vec![format!(
                "the body must be a JSON object, not {}",
                kind(&other)
            )])),
        }
    }
}

/// Reads a JSON request body strictly (see [`core_events::input`]): nesting
/// deeper than [`MAX_JSON_DEPTH`](core_events::input::MAX_JSON_DEPTH), a key
/// given twice and a NUL character are 400 `invalid_input` naming the field;
/// `what` names the document in a syntax error.
///
/// # Errors
///
/// [`ApiError::Invalid`] with the problem.
pub fn read_json(bytes: &[u8], what: &str) -> Result<Value, ApiError> {
    use core_events::input::{InputError, MAX_JSON_DEPTH, parse_strict};
    parse_strict(bytes, MAX_JSON_DEPTH).map_err(|e| {
        ApiError::Invalid(vec![match e {
            InputError::Syntax(e) => format!("{what} is not valid JSON: {e}"),
            other if what.ends_with("body") => other.to_string(),
            other => format!("{what}: {other}"),
        }])
    })
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Body {
    /// A reader of the body's fields that collects every problem.
    pub fn fields(self) -> Fields {
        Fields::new(String::new(), self.0)
    }
}

/// Reads the fields of a JSON object, collecting every problem (with the
/// field's path) instead of stopping at the first; unknown fields are problems
/// too.
#[derive(Debug)]
pub struct Fields {
    pub(crate) prefix: String,
    obj: Map<String, Value>,
    pub(crate) errors: Vec<String>,
}

impl Fields {
    pub(crate) fn new(prefix: String, obj: Map<String, Value>) -> Self {
        Fields {
            prefix,
            obj,
            errors: Vec::new(),
        }
    }

    pub(crate) fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Takes a field; `null` counts as absent.
    pub(crate) fn take(&mut self, key: &str) -> Option<Value> {
        self.obj.remove(key).filter(|v| !v.is_null())
    }

    /// A field that must be present.
    pub fn required<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        match self.take(key) {
            None => {
                self.errors
                    .push(format!("field '{}' is required", self.path(key)));
                None
            }
            Some(v) => self.convert(key, v),
        }
    }

    /// A field that may be absent (or `null`).
    pub fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let v = self.take(key)?;
        self.convert(key, v)
    }

    /// A field that may be absent; `null` is kept as a value (to clear one).
    pub(crate) fn optional_value(&mut self, key: &str) -> Option<Value> {
        self.obj.remove(key)
    }

    pub(crate) fn convert<T: DeserializeOwned>(&mut self, key: &str, v: Value) -> Option<T> {
        match serde_json::from_value(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errors.push(format!("field '{}': {e}", self.path(key)));
                None
            }
        }
    }

    /// An array of objects: a [`Fields`] for each (give each back with
    /// [`absorb`](Self::absorb)).
    pub(crate) fn object_list(&mut self, key: &str) -> Vec<Fields> {
        let Some(v) = self.take(key) else {
            return Vec::new();
        };
        let Value::Array(items) = v else {
            self.errors.push(format!(
                "field '{}' must be an array, not {}",
                self.path(key),
                kind(&v)
            ));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match item {
                Value::Object(obj) => {
                    out.push(Fields::new(format!("{}{key}[{i}].", self.prefix), obj));
                }
                other => self.errors.push(format!(
                    "field '{}{key}[{i}]' must be an object, not {}",
                    self.prefix,
                    kind(&other)
                )),
            }
        }
        out
    }

    /// Takes a nested reader's problems.
    pub(crate) fn absorb(&mut self, sub: Fields) {
        self.errors.extend(sub.into_errors());
    }

    /// An array of objects, each read by `each`.
    pub(crate) fn objects<T>(
        &mut self,
        key: &str,
        mut each: impl FnMut(&mut Fields) -> T,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for mut sub in self.object_list(key) {
            out.push(each(&mut sub));
            self.absorb(sub);
        }
        out
    }

    /// An attribute type: Pagoda's code number or its name.
    pub(crate) fn attr_type(&mut self, key: &str, required: bool) -> Option<AttrType> {
        let v = match self.take(key) {
            Some(v) => v,
            None if required => {
                self.errors
                    .push(format!("field '{}' is required", self.path(key)));
                return None;
            }
            None => return None,
        };
        let found = match &v {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .map(AttrType)
                .filter(|t| t.name().is_some()),
            Value::String(s) => AttrType::from_name(s).or_else(|| {
                s.parse::<u16>()
                    .ok()
                    .map(AttrType)
                    .filter(|t| t.name().is_some())
            }),
            _ => None,
        };
        if found.is_none() {
            self.errors.push(format!(
                "field '{}': unknown attribute type {v}; use a name or code: {}",
                self.path(key),
                AttrType::ALL
                    .iter()
                    .map(|(t, n)| format!("{n} ({})", t.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        found
    }

    pub(crate) fn into_errors(mut self) -> Vec<String> {
        let mut unknown: Vec<&String> = self.obj.keys().collect();
        unknown.sort();
        for key in unknown {
            self.errors
                .push(format!("unknown field '{}{key}'", self.prefix));
        }
        self.errors
    }

    /// Every problem found, unknown fields included.
    ///
    /// # Errors
    ///
    /// [`ApiError::Invalid`] listing them, when there are any.
    pub fn finish(self) -> Result<(), ApiError> {
        let errors = self.into_errors();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Invalid(errors))
        }
    }
}

/// The query string's parameters; a malformed one is 400 `invalid_input` (JSON,
/// like every error).
#[derive(Debug)]
pub struct Params(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| ApiError::Invalid(vec![format!("bad query string: {}", e.body_text())]))
    }
}

/// An id from a path or query: a positive integer, in decimal digits only
/// (spaces or a sign are refused, not trimmed).
///
/// # Errors
///
/// [`ApiError::Invalid`] naming `what` for anything else.
pub fn parse_id(what: &str, s: &str) -> Result<i64, ApiError> {
    // Digits only: no spaces (`%20%201`), no sign.
    Some(s)
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::Invalid(vec![format!("{what} '{s}' is not a positive integer")]))
}

/// The id in a route's path (`/api/v2/entities/{id}/`) as a typed extractor:
/// [`parse_id`] with the name of what it identifies, so a handler takes
/// `EntityId(id): EntityId` instead of a string it must check.
macro_rules! path_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name(pub i64);

        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = axum::response::Response;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
                use axum::response::IntoResponse;
                let Path(raw) = Path::<String>::from_request_parts(parts, state)
                    .await
                    .map_err(IntoResponse::into_response)?;
                parse_id($what, &raw).map($name).map_err(IntoResponse::into_response)
            }
        }
    };
}

path_id!(
    /// An entity's id from the path (400 `entity id '…' is not a positive integer`).
    EntityId,
    "entity id"
);
path_id!(
    /// An entry's id from the path (400 `entry id '…' is not a positive integer`).
    EntryId,
    "entry id"
);
path_id!(
    /// A user's id from the path (400 `user id '…' is not a positive integer`).
    UserId,
    "user id"
);
path_id!(
    /// A token's id from the path (400 `token id '…' is not a positive integer`).
    TokenId,
    "token id"
);

/// `?limit=&offset=` of a list.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Items per page, 1 to [`MAX_LIMIT`] (default [`DEFAULT_LIMIT`]).
    pub limit: i64,
    /// Items skipped.
    pub offset: i64,
}

impl Page {
    /// Reads `limit` and `offset`.
    ///
    /// # Errors
    ///
    /// [`ApiError::Invalid`] listing every bad value.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Page, ApiError> {
        let mut errors = Vec::new();
        let mut number = |key: &str, default: i64, min: i64, max: i64| match query.get(key) {
            None => default,
            Some(v) => match v.trim().parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => n,
                _ => {
                    errors.push(format!(
                        "query '{key}={v}' must be an integer from {min} to {max}"
                    ));
                    default
                }
            },
        };
        let limit = number("limit", DEFAULT_LIMIT, 1, MAX_LIMIT);
        let offset = number("offset", 0, 0, i64::MAX);
        if errors.is_empty() {
            Ok(Page { limit, offset })
        } else {
            Err(ApiError::Invalid(errors))
        }
    }

    /// The page's items: `{"count", "limit", "offset", "next_offset", "results"}`
    /// (`next_offset` null on the last page).
    pub fn wrap<T: Serialize>(&self, results: Vec<T>) -> Value {
        self.wrap_more(results, None)
    }

    pub(crate) fn wrap_more<T: Serialize>(&self, results: Vec<T>, more: Option<bool>) -> Value {
        let n = i64::try_from(results.len()).unwrap_or(i64::MAX);
        let more = more.unwrap_or(n == self.limit);
        json!({
            "count": n,
            "limit": self.limit,
            "offset": self.offset,
            "next_offset": more.then_some(self.offset + n),
            "results": results,
        })
    }
}
