//! Entities and entries over HTTP: create, read, update, soft delete, restore
//! and list, every write running the synchronous hooks first.
//!
//! Order of a write: `before_*` chain (may change the data, or reject) →
//! `entry.validate` (entries; every validator's errors at once) → the store
//! writes the model change and its event in one transaction → `201`/`200` with
//! the object. Handlers that gave no answer and whose manifest says
//! `on_unavailable: skip` are named in the [`SKIPPED_HEADER`] response header.
//! Entry creations are group-committed: concurrent ones share one transaction
//! ([`super::writer`]), each answered as if written alone.
//!
//! | route | who | hooks |
//! |---|---|---|
//! | `GET /api/v2/entities/` | any user | — |
//! | `POST /api/v2/entities/` | superuser | `entity.before_create` → `entity.after_create` |
//! | `GET /api/v2/entities/<id>/` | any user | `entity.get_attrs` |
//! | `PUT`/`PATCH /api/v2/entities/<id>/` | superuser | `entity.before_update` → `entity.after_update` |
//! | `DELETE /api/v2/entities/<id>/` | superuser | `entity.before_delete` → `entity.after_delete` |
//! | `POST /api/v2/entities/<id>/restore/` | superuser | → `entity.after_update` |
//! | `GET /api/v2/entities/<id>/entries/` | any user | `entry.get_attrs` per entry |
//! | `POST /api/v2/entities/<id>/entries/` | any user | `entry.before_create` → `entry.validate` → `entry.after_create` |
//! | `GET /api/v2/entries/<id>/` | any user | `entry.get_attrs` |
//! | `PUT`/`PATCH /api/v2/entries/<id>/` | any user | `entry.before_update` → `entry.validate` → `entry.after_update` |
//! | `DELETE /api/v2/entries/<id>/` | any user | `entry.before_delete` → `entry.after_delete` |
//! | `POST /api/v2/entries/<id>/restore/` | any user | `entry.before_restore` → `entry.after_restore` |

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use core_events::{AttrType, Entity, Entry, ObjectRef};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use store::{AttrChange, EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry, WriteContext};

use super::auth::AuthUser;
use super::{ApiError, HostState};
use crate::sync_hooks::Skipped;

/// Response header naming the hook handlers that gave no answer and were
/// skipped by their `on_unavailable: skip` policy: `plugin/handler` items,
/// comma-separated.
pub const SKIPPED_HEADER: &str = "hookbus-skipped-hooks";

/// Default page size of lists.
pub const DEFAULT_LIMIT: i64 = 100;

/// Largest page size of lists.
pub const MAX_LIMIT: i64 = 1000;

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
        .route("/api/v2/entities/", get(list_entities).post(create_entity))
        .route(
            "/api/v2/entities/{id}/",
            get(get_entity)
                .put(update_entity)
                .patch(update_entity)
                .delete(delete_entity),
        )
        .route("/api/v2/entities/{id}/restore/", post(restore_entity))
        .route(
            "/api/v2/entities/{id}/entries/",
            get(list_entries).post(create_entry),
        )
        .route(
            "/api/v2/entries/{id}/",
            get(get_entry)
                .put(update_entry)
                .patch(update_entry)
                .delete(delete_entry),
        )
        .route("/api/v2/entries/{id}/restore/", post(restore_entry))
}

/// Fallback of unknown paths: 401 without a valid token, else 404.
pub(crate) async fn no_route(_auth: AuthUser) -> ApiError {
    ApiError::NotFound("no such API path".into())
}

/// Fallback of a known path with a method it does not take.
pub(crate) async fn no_method() -> ApiError {
    ApiError::MethodNotAllowed("this path does not take this method".into())
}

// ---------------------------------------------------------------------------
// Request bodies

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

fn kind(v: &Value) -> &'static str {
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
    prefix: String,
    obj: Map<String, Value>,
    errors: Vec<String>,
}

impl Fields {
    fn new(prefix: String, obj: Map<String, Value>) -> Self {
        Fields {
            prefix,
            obj,
            errors: Vec::new(),
        }
    }

    fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Takes a field; `null` counts as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
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
    fn optional_value(&mut self, key: &str) -> Option<Value> {
        self.obj.remove(key)
    }

    fn convert<T: DeserializeOwned>(&mut self, key: &str, v: Value) -> Option<T> {
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
    fn object_list(&mut self, key: &str) -> Vec<Fields> {
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
    fn absorb(&mut self, sub: Fields) {
        self.errors.extend(sub.into_errors());
    }

    /// An array of objects, each read by `each`.
    fn objects<T>(&mut self, key: &str, mut each: impl FnMut(&mut Fields) -> T) -> Vec<T> {
        let mut out = Vec::new();
        for mut sub in self.object_list(key) {
            out.push(each(&mut sub));
            self.absorb(sub);
        }
        out
    }

    /// An attribute type: Pagoda's code number or its name.
    fn attr_type(&mut self, key: &str, required: bool) -> Option<AttrType> {
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

    fn into_errors(mut self) -> Vec<String> {
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

    fn wrap_more<T: Serialize>(&self, results: Vec<T>, more: Option<bool>) -> Value {
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

fn include_deleted(query: &HashMap<String, String>) -> Result<bool, ApiError> {
    match query.get("include_deleted").map(|v| v.trim()) {
        None | Some("" | "false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(v) => Err(ApiError::Invalid(vec![format!(
            "query 'include_deleted={v}' must be true or false"
        )])),
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// Who makes the change and the request's trace.
fn context(auth: &AuthUser, headers: &HeaderMap) -> WriteContext {
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned);
    WriteContext {
        user: Some(auth.user.clone()),
        traceparent,
    }
}

/// A JSON response with the skipped handlers in [`SKIPPED_HEADER`].
fn respond<T: Serialize>(status: StatusCode, value: &T, skipped: &[Skipped]) -> Response {
    let mut response = (status, Json(value)).into_response();
    if !skipped.is_empty() {
        let text = skipped
            .iter()
            .map(|s| format!("{}/{}", s.plugin, s.handler))
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&text) {
            response.headers_mut().insert(SKIPPED_HEADER, v);
        }
    }
    response
}

/// How long an entity read for an entry write is reused (entity writes drop it
/// at once, in every host: [`super::forget`]).
pub const ENTITY_CACHE_TTL: Duration = Duration::from_secs(2);

/// Active entities recently read for entry writes, so creating an entry does not
/// read its entity twice. The store re-reads the entity inside the write's
/// transaction, so values are always checked against the entity as it is; only
/// what hooks see may lag an entity change made by another host process that
/// did not reach this one by NATS ([`super::forget`]) by at most [`ENTITY_CACHE_TTL`].
#[derive(Debug, Default)]
pub struct EntityCache {
    entries: Mutex<HashMap<i64, (Arc<Entity>, Instant)>>,
}

impl EntityCache {
    fn get(&self, id: i64) -> Option<Arc<Entity>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&id)
            .filter(|(_, at)| at.elapsed() < ENTITY_CACHE_TTL)
            .map(|(e, _)| Arc::clone(e))
    }

    fn put(&self, entity: Arc<Entity>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= 10_000 {
            entries.clear();
        }
        entries.insert(entity.id, (entity, Instant::now()));
    }

    /// Drops an entity (after it changed).
    pub fn forget(&self, id: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&id);
    }
}

/// An active entity for an entry write, from the cache or the store.
async fn cached_entity(state: &HostState, id: i64) -> Result<Arc<Entity>, ApiError> {
    if let Some(e) = state.entities.get(id) {
        return Ok(e);
    }
    let entity = Arc::new(active_entity(state, id).await?);
    state.entities.put(Arc::clone(&entity));
    Ok(entity)
}

async fn active_entity(state: &HostState, id: i64) -> Result<Entity, ApiError> {
    let entity = state.store.entity(id).await?;
    if !entity.is_active {
        return Err(ApiError::NotFound(format!(
            "entity {id} not found (it is deleted)"
        )));
    }
    Ok(entity)
}

/// An entry and its entity; the entry must be active (or deleted, for a restore).
async fn entry_and_entity(
    state: &HostState,
    id: i64,
    active: bool,
) -> Result<(Entry, Entity), ApiError> {
    let entry = state.store.entry(id).await?;
    if entry.is_active != active {
        return Err(ApiError::NotFound(if active {
            format!("entry {id} not found (it is deleted)")
        } else {
            format!("deleted entry {id} not found (it is active)")
        }));
    }
    let entity = state.store.entity(entry.schema.id).await?;
    Ok((entry, entity))
}

// ---------------------------------------------------------------------------
// Entities

async fn list_entities(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Params(query): Params,
) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let found = state
        .store
        .entities_page(include_deleted(&query)?, page.limit, page.offset)
        .await?;
    let ctx = context(&auth, &headers);
    let (items, skipped) = entities_get_attrs(&state, found.items, &ctx).await?;
    Ok(respond(
        StatusCode::OK,
        &page.wrap_more(items, Some(found.more)),
        &skipped,
    ))
}

async fn referral(state: &HostState, f: &mut Fields) -> Vec<ObjectRef> {
    let Some(v) = f.take("referral") else {
        return Vec::new();
    };
    let path = f.path("referral");
    let Value::Array(items) = v else {
        f.errors.push(format!(
            "field '{path}' must be an array of entity ids or {{\"id\", \"name\"}}"
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let id = match &item {
            Value::Number(n) => n.as_i64(),
            Value::Object(o) => o.get("id").and_then(Value::as_i64),
            _ => None,
        };
        match id {
            None => f.errors.push(format!(
                "field '{path}[{i}]' must be an entity id or {{\"id\", \"name\"}}, not {}",
                kind(&item)
            )),
            Some(id) => match state.store.entity(id).await {
                Ok(e) => out.push(ObjectRef { id, name: e.name }),
                Err(_) => f
                    .errors
                    .push(format!("field '{path}[{i}]': entity {id} does not exist")),
            },
        }
    }
    out
}

async fn new_attr(state: &HostState, f: &mut Fields) -> Option<NewAttr> {
    let name: Option<String> = f.required("name");
    let attr_type = f.attr_type("type", true);
    let mut attr = NewAttr::new(
        &name.unwrap_or_default(),
        attr_type.unwrap_or(AttrType::STRING),
    );
    attr.is_mandatory = f.optional("is_mandatory").unwrap_or_default();
    attr.is_summarized = f.optional("is_summarized").unwrap_or_default();
    attr.is_delete_in_chain = f.optional("is_delete_in_chain").unwrap_or_default();
    attr.note = f.optional("note").unwrap_or_default();
    attr.default_value = f.optional("default_value");
    attr.referral = referral(state, f).await;
    attr_type.map(|_| attr)
}

async fn create_entity(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    auth.require_superuser("creating an entity")?;
    let mut f = body.fields();
    let name: Option<String> = f.required("name");
    let note: String = f.optional("note").unwrap_or_default();
    let mut attrs = Vec::new();
    for mut af in f.object_list("attrs") {
        if let Some(a) = new_attr(&state, &mut af).await {
            attrs.push(a);
        }
        f.absorb(af);
    }
    f.finish()?;
    let new = NewEntity {
        name: name.unwrap_or_default(),
        note,
        attrs,
    };
    let ctx = context(&auth, &headers);
    let out = state.hooks.before_create_entity(new, &ctx).await?;
    let entity = state.store.create_entity(&out.value, &ctx).await?;
    Ok(respond(StatusCode::CREATED, &entity, &out.skipped))
}

async fn get_entity(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id("entity id", &id)?;
    let mut entity = state.store.entity(id).await?;
    let ctx = context(&auth, &headers);
    let out = state.hooks.get_entity_attrs(&entity, &ctx).await?;
    entity.attrs = out.value;
    Ok(respond(StatusCode::OK, &entity, &out.skipped))
}

fn attr_change(f: &mut Fields) -> AttrChange {
    AttrChange {
        id: f.optional("id"),
        name: f.optional("name"),
        attr_type: f.attr_type("type", false),
        is_mandatory: f.optional("is_mandatory"),
        note: f.optional("note"),
        default_value: f.optional_value("default_value"),
        is_deleted: f.optional("is_deleted").unwrap_or_default(),
    }
}

async fn update_entity(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    auth.require_superuser("changing an entity")?;
    let id = parse_id("entity id", &id)?;
    let mut f = body.fields();
    let changes = EntityChanges {
        name: f.optional("name"),
        note: f.optional("note"),
        attrs: f.objects("attrs", attr_change),
    };
    f.finish()?;
    let entity = active_entity(&state, id).await?;
    let ctx = context(&auth, &headers);
    let out = state
        .hooks
        .before_update_entity(&entity, changes, &ctx)
        .await?;
    let entity = state.store.update_entity(id, &out.value, &ctx).await?;
    state.forget(super::forget::Forget::Entity(id)).await;
    Ok(respond(StatusCode::OK, &entity, &out.skipped))
}

async fn delete_entity(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_superuser("deleting an entity")?;
    let id = parse_id("entity id", &id)?;
    let entity = active_entity(&state, id).await?;
    let ctx = context(&auth, &headers);
    let out = state.hooks.before_delete_entity(&entity, &ctx).await?;
    let entity = state.store.delete_entity(id, &ctx).await?;
    state.forget(super::forget::Forget::Entity(id)).await;
    Ok(respond(StatusCode::OK, &entity, &out.skipped))
}

async fn restore_entity(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_superuser("restoring an entity")?;
    let id = parse_id("entity id", &id)?;
    let ctx = context(&auth, &headers);
    let entity = state.store.restore_entity(id, &ctx).await?;
    state.forget(super::forget::Forget::Entity(id)).await;
    Ok(respond(StatusCode::OK, &entity, &[]))
}

// ---------------------------------------------------------------------------
// Entries

/// How many entries of a list page run their `entry.get_attrs` chain at once.
pub const LIST_GET_ATTRS_CONCURRENCY: usize = 32;

async fn list_entries(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    Params(query): Params,
) -> Result<Response, ApiError> {
    let id = parse_id("entity id", &id)?;
    let page = Page::from_query(&query)?;
    let found = state
        .store
        .entries_page(id, include_deleted(&query)?, page.limit, page.offset)
        .await?;
    let ctx = context(&auth, &headers);
    let (items, skipped) = entries_get_attrs(&state, found.items, &ctx).await?;
    Ok(respond(
        StatusCode::OK,
        &page.wrap_more(items, Some(found.more)),
        &skipped,
    ))
}

/// Runs the `entry.get_attrs` chain over each entry of a list page, as
/// [`get_entry`] does for one (see [`page_get_attrs`]).
async fn entries_get_attrs(
    state: &HostState,
    entries: Vec<Entry>,
    ctx: &WriteContext,
) -> Result<(Vec<Entry>, Vec<Skipped>), ApiError> {
    // Every entry of a page is of one entity, so one look at the routes will do.
    let first = entries.first().map(|e| e.schema.name.as_str());
    let any_handler = any_route(state, core_events::Hook::EntryGetAttrs, first);
    page_get_attrs(entries, any_handler, |mut entry| async move {
        let out = state.hooks.get_entry_attrs(&entry, ctx).await?;
        entry.attrs = out.value;
        Ok((entry, out.skipped))
    })
    .await
}

/// Runs the `entity.get_attrs` chain over each entity of a list page, as
/// [`get_entity`] does for one (see [`page_get_attrs`]).
async fn entities_get_attrs(
    state: &HostState,
    entities: Vec<Entity>,
    ctx: &WriteContext,
) -> Result<(Vec<Entity>, Vec<Skipped>), ApiError> {
    let names = entities.iter().map(|e| e.name.as_str());
    let any_handler = any_route(state, core_events::Hook::EntityGetAttrs, names);
    page_get_attrs(entities, any_handler, |mut entity| async move {
        let out = state.hooks.get_entity_attrs(&entity, ctx).await?;
        entity.attrs = out.value;
        Ok((entity, out.skipped))
    })
    .await
}

/// Whether a handler of `hook` in the routing table matches any of the entity
/// `names`.
fn any_route<'a>(
    state: &HostState,
    hook: core_events::Hook,
    names: impl IntoIterator<Item = &'a str>,
) -> bool {
    let table = state.registry.table();
    names
        .into_iter()
        .any(|name| table.matching(hook, name).next().is_some())
}

/// Runs `run` (a `get_attrs` chain) over each item of a list page:
/// [`LIST_GET_ATTRS_CONCURRENCY`] items at a time, in page order. A blocking
/// handler without an answer fails the whole page (503); skipped handlers are
/// named once each. Without `any_handler` the items are returned as read.
async fn page_get_attrs<T, F, Fut>(
    items: Vec<T>,
    any_handler: bool,
    run: F,
) -> Result<(Vec<T>, Vec<Skipped>), ApiError>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(T, Vec<Skipped>), ApiError>>,
{
    use futures::{StreamExt, TryStreamExt};

    if !any_handler || items.is_empty() {
        return Ok((items, Vec::new()));
    }
    let outcomes: Vec<(T, Vec<Skipped>)> = futures::stream::iter(items)
        .map(run)
        .buffered(LIST_GET_ATTRS_CONCURRENCY)
        .try_collect()
        .await?;
    let mut out = Vec::with_capacity(outcomes.len());
    let mut skipped: Vec<Skipped> = Vec::new();
    for (item, item_skipped) in outcomes {
        out.push(item);
        for s in item_skipped {
            if !skipped
                .iter()
                .any(|k| k.plugin == s.plugin && k.handler == s.handler)
            {
                skipped.push(s);
            }
        }
    }
    Ok((out, skipped))
}

async fn create_entry(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = parse_id("entity id", &id)?;
    let mut f = body.fields();
    let name: Option<String> = f.required("name");
    let note: String = f.optional("note").unwrap_or_default();
    let attrs: BTreeMap<String, Value> = f.optional("attrs").unwrap_or_default();
    f.finish()?;
    let entity = cached_entity(&state, id).await?;
    let new = NewEntry {
        name: name.unwrap_or_default(),
        note,
        attrs,
    };
    let ctx = context(&auth, &headers);
    let before = state.hooks.before_create_entry(&entity, new, &ctx).await?;
    let mut skipped = before.skipped;
    let draft = before.value;
    let validated = state.hooks.validate(&entity, &draft, None, &ctx).await?;
    skipped.extend(validated.skipped);
    // Written with the creations queued with it, in one transaction (group commit).
    let entry = state
        .entry_writer
        .create_entry(entity.id, draft, ctx)
        .await?;
    Ok(respond(StatusCode::CREATED, &entry, &skipped))
}

async fn get_entry(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id("entry id", &id)?;
    let mut entry = state.store.entry(id).await?;
    let ctx = context(&auth, &headers);
    let out = state.hooks.get_entry_attrs(&entry, &ctx).await?;
    entry.attrs = out.value;
    Ok(respond(StatusCode::OK, &entry, &out.skipped))
}

/// The entry as it would be after `changes`: what validators check on an update.
fn merged(entry: &Entry, changes: &EntryChanges) -> NewEntry {
    let mut attrs: BTreeMap<String, Value> = entry
        .attrs
        .iter()
        .filter(|a| !a.value.is_null())
        .map(|a| (a.name.clone(), a.value.clone()))
        .collect();
    for (k, v) in &changes.attrs {
        if v.is_null() {
            attrs.remove(k);
        } else {
            attrs.insert(k.clone(), v.clone());
        }
    }
    NewEntry {
        name: changes.name.clone().unwrap_or_else(|| entry.name.clone()),
        note: changes.note.clone().unwrap_or_else(|| entry.note.clone()),
        attrs,
    }
}

async fn update_entry(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = parse_id("entry id", &id)?;
    let mut f = body.fields();
    let changes = EntryChanges {
        name: f.optional("name"),
        note: f.optional("note"),
        attrs: f.optional("attrs").unwrap_or_default(),
    };
    f.finish()?;
    let (entry, entity) = entry_and_entity(&state, id, true).await?;
    let ctx = context(&auth, &headers);
    let before = state
        .hooks
        .before_update_entry(&entity, &entry, changes, &ctx)
        .await?;
    let mut skipped = before.skipped;
    let changes = before.value;
    let validated = state
        .hooks
        .validate(&entity, &merged(&entry, &changes), Some(&entry), &ctx)
        .await?;
    skipped.extend(validated.skipped);
    let entry = state.store.update_entry(id, &changes, &ctx).await?;
    Ok(respond(StatusCode::OK, &entry, &skipped))
}

async fn delete_entry(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id("entry id", &id)?;
    let (entry, entity) = entry_and_entity(&state, id, true).await?;
    let ctx = context(&auth, &headers);
    let out = state
        .hooks
        .before_delete_entry(&entity, &entry, &ctx)
        .await?;
    let entry = state.store.delete_entry(id, &ctx).await?;
    Ok(respond(StatusCode::OK, &entry, &out.skipped))
}

async fn restore_entry(
    State(state): State<HostState>,
    auth: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id("entry id", &id)?;
    let (entry, entity) = entry_and_entity(&state, id, false).await?;
    let ctx = context(&auth, &headers);
    let out = state
        .hooks
        .before_restore_entry(&entity, &entry, &ctx)
        .await?;
    let entry = state.store.restore_entry(id, &ctx).await?;
    Ok(respond(StatusCode::OK, &entry, &out.skipped))
}
