//! The synchronous hooks: a client any host uses to call `entry.validate`, the
//! `before_*` hooks and `get_attrs` over NATS request/reply before it writes (or
//! after it reads), with per-handler timeouts.
//!
//! Handlers are found in the live [`Registry`] (a lock-free snapshot, no KV round
//! trip per call), in dispatch order: priority, then the plugin's position in
//! `ENABLED_PLUGINS`, then declaration order. What each hook does:
//!
//! | hook | how handlers are called | result |
//! |---|---|---|
//! | `entry.validate` | all at once (concurrently) | every error of every validator, in handler order; any error vetoes |
//! | `before_create` / `before_update` | a chain, one after another; each sees the previous one's data | the data as the last handler left it, or the first rejection |
//! | `before_delete` / `before_restore` | one after another | the first veto stops the change |
//! | `get_attrs` | a chain of transforms | the attribute list as the last handler left it |
//!
//! A handler that gives no answer (no replica: "no responders"; no reply within its
//! `timeout_ms`; a `Nats-Service-Error`; a reply that cannot be read) either
//! **blocks** the call with [`SyncHookError::Unavailable`] naming the plugin,
//! handler and reason, or is **skipped** and reported in
//! [`SyncOutcome::skipped`], by its manifest's `on_unavailable` (default: block
//! for validate and before-hooks, skip for get_attrs). A call never waits longer
//! than the handlers' timeouts.
//!
//! A host calls these before writing with [`store::Store`]:
//!
//! ```no_run
//! # async fn demo(hooks: hookbus::sync_hooks::SyncHooks, store: store::Store,
//! #   entity: core_events::Entity, ctx: store::WriteContext)
//! #   -> Result<(), Box<dyn std::error::Error>> {
//! use store::NewEntry;
//! let draft = NewEntry::named("ACME");
//! let draft = hooks.before_create_entry(&entity, draft, &ctx).await?.value;
//! hooks.validate(&entity, &draft, None, &ctx).await?;
//! let entry = store.create_entry(entity.id, &draft, &ctx).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, Request};
use bytes::Bytes;
use core_events::protocol::{codes, headers};
use core_events::sync::{
    BeforeModifyReply, BeforeModifyRequest, FieldError, GetAttrsReply, GetAttrsRequest,
    ValidateReply, ValidateRequest, VetoReply, VetoRequest, parse_reply,
};
use core_events::{Attribute, Entity, EntityAttr, Entry, Hook, OnUnavailable};
use serde::Serialize;
use serde::de::DeserializeOwned;
use store::{EntityChanges, EntryChanges, NewEntity, NewEntry, WriteContext};

use crate::registry::{Registry, Route};

/// One validation error, with the validator that reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationError {
    /// The plugin of the validator.
    pub plugin: String,
    /// The validator (handler) name.
    pub handler: String,
    /// The field: `name`, `note` or an attribute name; `None` for the entry as a whole.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(
                f,
                "{field}: {} ({}/{})",
                self.message, self.plugin, self.handler
            ),
            None => write!(f, "{} ({}/{})", self.message, self.plugin, self.handler),
        }
    }
}

/// A handler that gave no answer and was left out (its policy is `skip`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The plugin.
    pub plugin: String,
    /// The handler.
    pub handler: String,
    /// Why it gave no answer.
    pub reason: String,
}

/// A synchronous hook's result, with the handlers that were skipped.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct SyncOutcome<T> {
    /// The result: the data as the chain left it (or `()` for validate and vetoes).
    pub value: T,
    /// Handlers that gave no answer and whose policy is `skip`, in handler order.
    pub skipped: Vec<Skipped>,
}

/// Why a synchronous hook stops a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncHookError {
    /// `entry.validate`: validators reported errors; every one, in handler order.
    #[error("entry is invalid: {}", join(.errors))]
    Invalid {
        /// Every error, in handler (priority) order, each validator's in its order.
        errors: Vec<ValidationError>,
    },
    /// A `before_*` handler rejected the change, or vetoed the delete or restore.
    #[error("{hook} rejected by {plugin}/{handler}: {reason}")]
    Rejected {
        /// The hook.
        hook: Hook,
        /// The plugin.
        plugin: String,
        /// The handler.
        handler: String,
        /// The handler's reason.
        reason: String,
    },
    /// A handler whose policy is `block` gave no answer.
    #[error("{hook} handler {plugin}/{handler} is unavailable: {reason}")]
    Unavailable {
        /// The hook.
        hook: Hook,
        /// The plugin.
        plugin: String,
        /// The handler.
        handler: String,
        /// Why: no responders, a timeout, a handler error, an unreadable reply.
        reason: String,
    },
    /// The request is larger than NATS takes (the server's `max_payload`, less
    /// room for headers): the change is refused, nothing is written.
    #[error(
        "the {hook} request would be {size} bytes; requests to plugins travel by value and may be at most {limit} bytes (the NATS server's max_payload less room for headers): shorten the notes or values"
    )]
    TooLarge {
        /// The hook.
        hook: Hook,
        /// The request's size, bytes.
        size: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// The request could not be encoded (a value that is no JSON).
    #[error("{hook} request could not be encoded: {reason}")]
    Encode {
        /// The hook.
        hook: Hook,
        /// The serializer's message.
        reason: String,
    },
}

fn join(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Calls the synchronous hooks' handlers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SyncHooks {
    client: async_nats::Client,
    registry: Registry,
    metrics: Option<Arc<crate::call_metrics::CallMetrics>>,
}

/// What one handler call gave.
enum Answer<R> {
    Reply(R),
    NoAnswer(String),
}

impl SyncHooks {
    /// A client over a NATS connection and the live registry
    /// ([`Registry::start`], or [`crate::run::Bus::registry`]).
    pub fn new(client: async_nats::Client, registry: Registry) -> Self {
        SyncHooks {
            client,
            registry,
            metrics: None,
        }
    }

    /// Records every handler call (latency and outcome) in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::call_metrics::CallMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// `entry.validate`: every matching validator checks `entry` (the entry as it
    /// would be written; `existing` is the entry now, for an update). Validators
    /// run concurrently; the result is as if they ran in priority order.
    ///
    /// # Errors
    ///
    /// [`SyncHookError::Invalid`] with every error of every validator, in
    /// priority order; else [`SyncHookError::Unavailable`] for the first blocking
    /// validator that gave no answer.
    pub async fn validate(
        &self,
        entity: &Entity,
        entry: &NewEntry,
        existing: Option<&Entry>,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<()>, SyncHookError> {
        let hook = Hook::EntryValidate;
        let table = self.registry.table();
        let routes: Vec<&Arc<Route>> = table.matching(hook, &entity.name).collect();
        if routes.is_empty() {
            return Ok(SyncOutcome {
                value: (),
                skipped: Vec::new(),
            });
        }
        let body = self.encode(
            hook,
            &ValidateRequest {
                entity: entity.clone(),
                entry: entry.clone(),
                existing: existing.cloned(),
                user: ctx.user.clone(),
            },
        )?;
        let answers = futures::future::join_all(routes.iter().map(|route| {
            self.call::<ValidateReply>(route, body.clone(), ctx.traceparent.as_deref())
        }))
        .await;
        let mut errors = Vec::new();
        let mut skipped = Vec::new();
        let mut blocked = None;
        for (route, answer) in routes.iter().zip(answers) {
            match answer {
                Answer::Reply(reply) => {
                    errors.extend(
                        reply
                            .errors
                            .into_iter()
                            .map(|e: FieldError| ValidationError {
                                plugin: route.plugin.to_string(),
                                handler: route.handler.to_string(),
                                field: e.field,
                                message: e.message,
                            }),
                    );
                }
                Answer::NoAnswer(reason) => {
                    if let Err(e) = unanswered(hook, route, reason, &mut skipped) {
                        blocked.get_or_insert(e);
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(SyncHookError::Invalid { errors });
        }
        match blocked {
            Some(e) => Err(e),
            None => Ok(SyncOutcome { value: (), skipped }),
        }
    }

    /// `entry.before_create`: the chain over the entry to create.
    ///
    /// # Errors
    ///
    /// [`SyncHookError::Rejected`] by the first handler that rejects;
    /// [`SyncHookError::Unavailable`] for a blocking handler that gave no answer.
    pub async fn before_create_entry(
        &self,
        entity: &Entity,
        new: NewEntry,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<NewEntry>, SyncHookError> {
        self.before_chain(
            Hook::EntryBeforeCreate,
            &entity.name,
            Some(entity),
            None,
            new,
            ctx,
        )
        .await
    }

    /// `entry.before_update`: the chain over the changes to `entry`.
    ///
    /// # Errors
    ///
    /// As [`before_create_entry`](Self::before_create_entry).
    pub async fn before_update_entry(
        &self,
        entity: &Entity,
        entry: &Entry,
        changes: EntryChanges,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<EntryChanges>, SyncHookError> {
        self.before_chain(
            Hook::EntryBeforeUpdate,
            &entity.name,
            Some(entity),
            Some(entry),
            changes,
            ctx,
        )
        .await
    }

    /// `entity.before_create`: the chain over the entity to create (entity
    /// filters match the new entity's name).
    ///
    /// # Errors
    ///
    /// As [`before_create_entry`](Self::before_create_entry).
    pub async fn before_create_entity(
        &self,
        new: NewEntity,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<NewEntity>, SyncHookError> {
        let name = new.name.clone();
        self.before_chain(Hook::EntityBeforeCreate, &name, None, None, new, ctx)
            .await
    }

    /// `entity.before_update`: the chain over the changes to `entity` (entity
    /// filters match its current name).
    ///
    /// # Errors
    ///
    /// As [`before_create_entry`](Self::before_create_entry).
    pub async fn before_update_entity(
        &self,
        entity: &Entity,
        changes: EntityChanges,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<EntityChanges>, SyncHookError> {
        self.before_chain(
            Hook::EntityBeforeUpdate,
            &entity.name,
            Some(entity),
            None,
            changes,
            ctx,
        )
        .await
    }

    /// `entry.before_delete`: any handler may veto.
    ///
    /// # Errors
    ///
    /// [`SyncHookError::Rejected`] for the first veto;
    /// [`SyncHookError::Unavailable`] for a blocking handler that gave no answer.
    pub async fn before_delete_entry(
        &self,
        entity: &Entity,
        entry: &Entry,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<()>, SyncHookError> {
        self.veto(Hook::EntryBeforeDelete, entity, Some(entry), ctx)
            .await
    }

    /// `entry.before_restore`: any handler may veto.
    ///
    /// # Errors
    ///
    /// As [`before_delete_entry`](Self::before_delete_entry).
    pub async fn before_restore_entry(
        &self,
        entity: &Entity,
        entry: &Entry,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<()>, SyncHookError> {
        self.veto(Hook::EntryBeforeRestore, entity, Some(entry), ctx)
            .await
    }

    /// `entity.before_delete`: any handler may veto.
    ///
    /// # Errors
    ///
    /// As [`before_delete_entry`](Self::before_delete_entry).
    pub async fn before_delete_entity(
        &self,
        entity: &Entity,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<()>, SyncHookError> {
        self.veto(Hook::EntityBeforeDelete, entity, None, ctx).await
    }

    /// `entry.get_attrs`: the chain of transforms over `entry`'s attributes.
    ///
    /// # Errors
    ///
    /// [`SyncHookError::Unavailable`] for a handler whose policy is `block` (the
    /// default is `skip`) that gave no answer.
    pub async fn get_entry_attrs(
        &self,
        entry: &Entry,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<Vec<Attribute>>, SyncHookError> {
        let request = GetAttrsRequest {
            entity: None,
            entry: Some(entry.clone()),
            attrs: entry.attrs.clone(),
            user: ctx.user.clone(),
        };
        self.attrs_chain(Hook::EntryGetAttrs, &entry.schema.name, request, ctx)
            .await
    }

    /// `entity.get_attrs`: the chain of transforms over `entity`'s attribute
    /// definitions.
    ///
    /// # Errors
    ///
    /// As [`get_entry_attrs`](Self::get_entry_attrs).
    pub async fn get_entity_attrs(
        &self,
        entity: &Entity,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<Vec<EntityAttr>>, SyncHookError> {
        let request = GetAttrsRequest {
            entity: Some(entity.clone()),
            entry: None,
            attrs: entity.attrs.clone(),
            user: ctx.user.clone(),
        };
        self.attrs_chain(Hook::EntityGetAttrs, &entity.name, request, ctx)
            .await
    }

    async fn before_chain<D>(
        &self,
        hook: Hook,
        entity_name: &str,
        entity: Option<&Entity>,
        entry: Option<&Entry>,
        data: D,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<D>, SyncHookError>
    where
        D: Serialize + DeserializeOwned,
    {
        let table = self.registry.table();
        let mut request = BeforeModifyRequest {
            entity: None,
            entry: None,
            data,
            user: None,
        };
        let mut skipped = Vec::new();
        let mut first = true;
        for route in table.matching(hook, entity_name) {
            if first {
                // Cloned only when some handler matches.
                request.entity = entity.cloned();
                request.entry = entry.cloned();
                request.user = ctx.user.clone();
                first = false;
            }
            let body = self.encode(hook, &request)?;
            match self
                .call::<BeforeModifyReply<D>>(route, body, ctx.traceparent.as_deref())
                .await
            {
                Answer::Reply(BeforeModifyReply {
                    reject: Some(reason),
                    ..
                }) => return Err(rejected(hook, route, reason)),
                Answer::Reply(BeforeModifyReply { data, .. }) => {
                    if let Some(data) = data {
                        request.data = data;
                    }
                }
                Answer::NoAnswer(reason) => unanswered(hook, route, reason, &mut skipped)?,
            }
        }
        Ok(SyncOutcome {
            value: request.data,
            skipped,
        })
    }

    async fn veto(
        &self,
        hook: Hook,
        entity: &Entity,
        entry: Option<&Entry>,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<()>, SyncHookError> {
        let table = self.registry.table();
        let mut skipped = Vec::new();
        let mut body = None;
        for route in table.matching(hook, &entity.name) {
            let body = match &body {
                Some(b) => Bytes::clone(b),
                None => {
                    let b = self.encode(
                        hook,
                        &VetoRequest {
                            entity: entity.clone(),
                            entry: entry.cloned(),
                            user: ctx.user.clone(),
                        },
                    )?;
                    body.insert(b).clone()
                }
            };
            match self
                .call::<VetoReply>(route, body, ctx.traceparent.as_deref())
                .await
            {
                Answer::Reply(VetoReply { veto: Some(reason) }) => {
                    return Err(rejected(hook, route, reason));
                }
                Answer::Reply(VetoReply { veto: None }) => {}
                Answer::NoAnswer(reason) => unanswered(hook, route, reason, &mut skipped)?,
            }
        }
        Ok(SyncOutcome { value: (), skipped })
    }

    async fn attrs_chain<A>(
        &self,
        hook: Hook,
        entity_name: &str,
        mut request: GetAttrsRequest<A>,
        ctx: &WriteContext,
    ) -> Result<SyncOutcome<Vec<A>>, SyncHookError>
    where
        A: Serialize + DeserializeOwned,
    {
        let table = self.registry.table();
        let mut skipped = Vec::new();
        for route in table.matching(hook, entity_name) {
            let body = self.encode(hook, &request)?;
            match self
                .call::<GetAttrsReply<A>>(route, body, ctx.traceparent.as_deref())
                .await
            {
                Answer::Reply(GetAttrsReply { attrs }) => {
                    if let Some(attrs) = attrs {
                        request.attrs = attrs;
                    }
                }
                Answer::NoAnswer(reason) => unanswered(hook, route, reason, &mut skipped)?,
            }
        }
        Ok(SyncOutcome {
            value: request.attrs,
            skipped,
        })
    }

    /// A request's body; [`SyncHookError::TooLarge`] when it would not fit in
    /// one NATS message (the connection's `max_payload`, less room for headers).
    fn encode<T: Serialize>(&self, hook: Hook, body: &T) -> Result<Bytes, SyncHookError> {
        let body =
            serde_json::to_vec(body)
                .map(Bytes::from)
                .map_err(|e| SyncHookError::Encode {
                    hook,
                    reason: e.to_string(),
                })?;
        let limit = self
            .client
            .max_payload()
            .saturating_sub(crate::publish::HEADER_ROOM);
        if body.len() > limit {
            return Err(SyncHookError::TooLarge {
                hook,
                size: body.len(),
                limit,
            });
        }
        Ok(body)
    }

    /// One request to one handler, with its timeout.
    async fn call<R: DeserializeOwned + Default>(
        &self,
        route: &Route,
        body: Bytes,
        traceparent: Option<&str>,
    ) -> Answer<R> {
        let started = std::time::Instant::now();
        let (answer, outcome) = if hookbus_kit::trace::enabled() {
            // The CLIENT span of the call, a child of the host's request span; the
            // handler's span in the plugin is its child.
            let span = tracing::info_span!(
                "sync hook call",
                otel.name = %format_args!("call {}.{}", route.plugin, route.handler),
                otel.kind = "client",
                messaging.system = hookbus_kit::trace::fields::SYSTEM,
                messaging.operation.type = "send",
                messaging.destination.name = %route.subject,
                pagoda.hook = route.hook.name(),
                pagoda.plugin = %route.plugin,
                pagoda.handler = %route.handler,
            );
            let (answer, outcome) = tracing::Instrument::instrument(
                self.call_once(route, body, traceparent),
                span.clone(),
            )
            .await;
            if outcome != "ok" {
                let text = match &answer {
                    Answer::NoAnswer(text) => text.as_str(),
                    Answer::Reply(_) => outcome,
                };
                hookbus_kit::trace::fail(&span, outcome, text);
            }
            (answer, outcome)
        } else {
            self.call_once(route, body, traceparent).await
        };
        if let Some(m) = &self.metrics {
            m.sync_call(
                route.hook.name(),
                &route.plugin,
                &route.handler,
                outcome,
                started.elapsed(),
            );
        }
        answer
    }

    /// One call, with its outcome label for the metrics.
    async fn call_once<R: DeserializeOwned + Default>(
        &self,
        route: &Route,
        body: Bytes,
        traceparent: Option<&str>,
    ) -> (Answer<R>, &'static str) {
        let mut h = HeaderMap::new();
        h.insert(headers::HOOK, route.hook.name());
        h.insert(headers::PLUGIN, &*route.plugin);
        h.insert(headers::HANDLER, &*route.handler);
        if hookbus_kit::trace::enabled() {
            hookbus_kit::trace::inject(&tracing::Span::current(), &mut h);
        } else if let Some(tp) = traceparent {
            h.insert(headers::TRACEPARENT, tp);
        }
        let request = Request::new()
            .payload(body)
            .headers(h)
            .timeout(Some(route.timeout));
        match self
            .client
            .send_request(route.subject.to_string(), request)
            .await
        {
            Ok(reply) => {
                if let Some(text) = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::SERVICE_ERROR))
                {
                    let code = reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(headers::SERVICE_ERROR_CODE))
                        .and_then(|v| v.as_str().trim().parse::<u16>().ok())
                        .unwrap_or(codes::TRANSIENT);
                    return (
                        Answer::NoAnswer(format!("handler error {code}: {text}")),
                        "handler_error",
                    );
                }
                match parse_reply::<R>(&reply.payload) {
                    Ok(r) => (Answer::Reply(r), "ok"),
                    Err(e) => (Answer::NoAnswer(format!("bad reply: {e}")), "bad_reply"),
                }
            }
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => (
                    Answer::NoAnswer("no replica is running (no responders)".to_owned()),
                    "no_responders",
                ),
                RequestErrorKind::TimedOut => (
                    Answer::NoAnswer(format!("no reply within {} ms", millis(route.timeout))),
                    "timeout",
                ),
                _ => (
                    Answer::NoAnswer(format!("request failed: {e}")),
                    "request_failed",
                ),
            },
        }
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

fn rejected(hook: Hook, route: &Route, reason: String) -> SyncHookError {
    SyncHookError::Rejected {
        hook,
        plugin: route.plugin.to_string(),
        handler: route.handler.to_string(),
        reason,
    }
}

/// Applies a handler's `on_unavailable` policy to a call that gave no answer.
fn unanswered(
    hook: Hook,
    route: &Route,
    reason: String,
    skipped: &mut Vec<Skipped>,
) -> Result<(), SyncHookError> {
    match route.on_unavailable {
        OnUnavailable::Block => {
            tracing::warn!(%hook, plugin = %route.plugin, handler = %route.handler, %reason, "synchronous hook handler unavailable; blocking");
            Err(SyncHookError::Unavailable {
                hook,
                plugin: route.plugin.to_string(),
                handler: route.handler.to_string(),
                reason,
            })
        }
        OnUnavailable::Skip => {
            tracing::warn!(%hook, plugin = %route.plugin, handler = %route.handler, %reason, "synchronous hook handler unavailable; skipped");
            skipped.push(Skipped {
                plugin: route.plugin.to_string(),
                handler: route.handler.to_string(),
                reason,
            });
            Ok(())
        }
    }
}
