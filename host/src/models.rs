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
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use core_events::{AttrType, Entity, Entry, ObjectRef};
use serde::Serialize;
use serde_json::Value;
use store::{AttrChange, EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry, WriteContext};

use super::error::ApiError;
use super::request::{Body, EntityId, EntryId, Fields, Page, Params, kind};
use super::state::HostState;
use super::user::{Actor, AuthUser};
use hookbus::sync_hooks::Skipped;

/// Response header naming the hook handlers that gave no answer and were
/// skipped by their `on_unavailable: skip` policy: `plugin/handler` items,
/// comma-separated.
pub const SKIPPED_HEADER: &str = "hookbus-skipped-hooks";

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
    Actor { ctx, .. }: Actor,
    Params(query): Params,
) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let found = state
        .store
        .entities_page(include_deleted(&query)?, page.limit, page.offset)
        .await?;
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
    Actor { auth, ctx }: Actor,
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
    let out = state.hooks.before_create_entity(new, &ctx).await?;
    let (ctx, span) = commit_span(ctx);
    let entity =
        tracing::Instrument::instrument(state.store.create_entity(&out.value, &ctx), span).await?;
    Ok(respond(StatusCode::CREATED, &entity, &out.skipped))
}

async fn get_entity(
    State(state): State<HostState>,
    Actor { ctx, .. }: Actor,
    EntityId(id): EntityId,
) -> Result<Response, ApiError> {
    let mut entity = state.store.entity(id).await?;
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
    Actor { auth, ctx }: Actor,
    EntityId(id): EntityId,
    body: Body,
) -> Result<Response, ApiError> {
    auth.require_superuser("changing an entity")?;
    let mut f = body.fields();
    let changes = EntityChanges {
        name: f.optional("name"),
        note: f.optional("note"),
        attrs: f.objects("attrs", attr_change),
    };
    f.finish()?;
    let entity = active_entity(&state, id).await?;
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
    Actor { auth, ctx }: Actor,
    EntityId(id): EntityId,
) -> Result<Response, ApiError> {
    auth.require_superuser("deleting an entity")?;
    let entity = active_entity(&state, id).await?;
    let out = state.hooks.before_delete_entity(&entity, &ctx).await?;
    let entity = state.store.delete_entity(id, &ctx).await?;
    state.forget(super::forget::Forget::Entity(id)).await;
    Ok(respond(StatusCode::OK, &entity, &out.skipped))
}

async fn restore_entity(
    State(state): State<HostState>,
    Actor { auth, ctx }: Actor,
    EntityId(id): EntityId,
) -> Result<Response, ApiError> {
    auth.require_superuser("restoring an entity")?;
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
    Actor { ctx, .. }: Actor,
    EntityId(id): EntityId,
    Params(query): Params,
) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let found = state
        .store
        .entries_page(id, include_deleted(&query)?, page.limit, page.offset)
        .await?;
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
    Actor { ctx, .. }: Actor,
    EntityId(id): EntityId,
    body: Body,
) -> Result<Response, ApiError> {
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
    let before = state.hooks.before_create_entry(&entity, new, &ctx).await?;
    let mut skipped = before.skipped;
    let draft = before.value;
    let validated = state.hooks.validate(&entity, &draft, None, &ctx).await?;
    skipped.extend(validated.skipped);
    // Written with the creations queued with it, in one transaction (group commit).
    let (ctx, span) = commit_span(ctx);
    let entry = tracing::Instrument::instrument(
        state.entry_writer.create_entry(entity.id, draft, ctx),
        span,
    )
    .await?;
    Ok(respond(StatusCode::CREATED, &entry, &skipped))
}

async fn get_entry(
    State(state): State<HostState>,
    Actor { ctx, .. }: Actor,
    EntryId(id): EntryId,
) -> Result<Response, ApiError> {
    let mut entry = state.store.entry(id).await?;
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
    Actor { ctx, .. }: Actor,
    EntryId(id): EntryId,
    body: Body,
) -> Result<Response, ApiError> {
    let mut f = body.fields();
    let changes = EntryChanges {
        name: f.optional("name"),
        note: f.optional("note"),
        attrs: f.optional("attrs").unwrap_or_default(),
    };
    f.finish()?;
    let (entry, entity) = entry_and_entity(&state, id, true).await?;
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
    Actor { ctx, .. }: Actor,
    EntryId(id): EntryId,
) -> Result<Response, ApiError> {
    let (entry, entity) = entry_and_entity(&state, id, true).await?;
    let out = state
        .hooks
        .before_delete_entry(&entity, &entry, &ctx)
        .await?;
    let entry = state.store.delete_entry(id, &ctx).await?;
    Ok(respond(StatusCode::OK, &entry, &out.skipped))
}

async fn restore_entry(
    State(state): State<HostState>,
    Actor { ctx, .. }: Actor,
    EntryId(id): EntryId,
) -> Result<Response, ApiError> {
    let (entry, entity) = entry_and_entity(&state, id, false).await?;
    let out = state
        .hooks
        .before_restore_entry(&entity, &entry, &ctx)
        .await?;
    let entry = state.store.restore_entry(id, &ctx).await?;
    Ok(respond(StatusCode::OK, &entry, &out.skipped))
}

/// With traces exported, the span of a write's store transaction (`store commit`,
/// a child of the request's span), and the write context carrying its
/// `traceparent`: the outbox row keeps it, so the relay's publish is its child.
/// Without, no span and the context unchanged.
fn commit_span(mut ctx: WriteContext) -> (WriteContext, tracing::Span) {
    if !hookbus_kit::trace::enabled() {
        return (ctx, tracing::Span::none());
    }
    let span = tracing::info_span!(
        "store commit",
        otel.name = "store commit",
        otel.kind = "internal",
        db.operation.name = "commit",
    );
    if let Some((tp, ts)) = hookbus_kit::trace::pair_of(&span) {
        ctx.traceparent = Some(tp);
        ctx.tracestate = ts;
    }
    (ctx, span)
}
