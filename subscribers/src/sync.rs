//! Synchronous hook handlers: `entry.validate`, `before_*` and `get_attrs`,
//! called by the host (through `hookbus::sync_hooks`) over request/reply before
//! a change is written or after attributes are read.
//!
//! Declare them with the builder ([`PluginBuilder::on_validate`],
//! [`on_before_create_entry`](PluginBuilder::on_before_create_entry), …); each
//! method names its hook, so no hook argument is needed. A handler's options
//! go with its name, as a [`SyncHandler`](crate::SyncHandler) (`entities`,
//! `priority`, `timeout`, [`on_unavailable`](crate::SyncHandler::on_unavailable)).
//!
//! A handler returns its decision; a [`SyncError::Reject`] rejects the change
//! (vetoes, for `before_delete` / `before_restore`; becomes one entity-wide error,
//! for `validate`). A [`SyncError::Failed`] (or a panic, or running past the
//! timeout) is a handler failure: the host then applies the handler's
//! `on_unavailable` policy (block or skip).
//!
//! ```no_run
//! use pagoda_plugin_sdk::{FieldError, OnUnavailable, Plugin, SyncError, SyncHandler};
//!
//! # fn example() -> Result<(), pagoda_plugin_sdk::ManifestError> {
//! let plugin = Plugin::builder("checks", "Checks", "1.0.0")
//!     .on_validate("no_forbidden", |ctx| async move {
//!         let mut errors = Vec::new();
//!         if ctx.request.entry.name.contains("forbidden") {
//!             errors.push(FieldError::field("name", "the name may not contain 'forbidden'"));
//!         }
//!         Ok(errors)
//!     })
//!     .on_before_create_entry("defaults", |ctx| async move {
//!         let mut draft = ctx.request.data;
//!         draft.note = "created by checks".into();
//!         Ok(draft)
//!     })
//!     .on_before_delete_entry(
//!         SyncHandler::named("keep_pinned").on_unavailable(OnUnavailable::Skip),
//!         |ctx| async move {
//!             if ctx.request.entry.as_ref().is_some_and(|e| e.note == "pinned") {
//!                 return Err(SyncError::reject("pinned entries cannot be deleted"));
//!             }
//!             Ok(())
//!         },
//!     )
//!     .build()?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use core_events::protocol::headers;
use core_events::request::{EntityChanges, EntryChanges, NewEntity, NewEntry};
use core_events::sync::{
    BeforeModifyReply, BeforeModifyRequest, FieldError, GetAttrsReply, GetAttrsRequest,
    ValidateReply, ValidateRequest, VetoReply, VetoRequest,
};
use core_events::{Attribute, EntityAttr, Hook};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::HandlerError;
use crate::plugin::{HandlerFn, PluginBuilder, SyncHandler};

/// One call of a synchronous hook handler; `S` is the plugin's state
/// ([`PluginBuilder::state`]), `()` without one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SyncContext<R, S = ()> {
    /// The request body (see [`core_events::sync`]).
    pub request: R,
    /// The hook.
    pub hook: Hook,
    /// The plugin id.
    pub plugin_id: Arc<str>,
    /// The handler name.
    pub handler: Arc<str>,
    /// W3C trace context of the host's request, when it sent one.
    pub traceparent: Option<String>,
    /// The plugin's state, shared by all its handlers.
    pub state: S,
}

impl<R, S> SyncContext<R, S> {
    /// The same call with `state` as the plugin's state.
    pub fn with_state<T>(self, state: T) -> SyncContext<R, T> {
        SyncContext {
            request: self.request,
            hook: self.hook,
            plugin_id: self.plugin_id,
            handler: self.handler,
            traceparent: self.traceparent,
            state,
        }
    }
}

/// What a synchronous handler's decision can be besides "go on".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Rejects the change (before_create / before_update), vetoes it
    /// (before_delete / before_restore), or is one entity-wide validation error
    /// (validate). The reason is shown to the user.
    #[error("rejected: {0}")]
    Reject(String),
    /// The handler could not decide: the host applies its `on_unavailable`
    /// policy (block or skip).
    #[error(transparent)]
    Failed(#[from] HandlerError),
}

impl SyncError {
    /// Rejects (or vetoes) the change with a reason.
    pub fn reject(reason: impl Into<String>) -> Self {
        SyncError::Reject(reason.into())
    }
}

impl From<anyhow::Error> for SyncError {
    fn from(err: anyhow::Error) -> Self {
        SyncError::Failed(err.into())
    }
}

/// What a synchronous handler's future resolves to.
pub type SyncResult<T> = Result<T, SyncError>;

/// `entry.validate` context.
pub type ValidateContext<S = ()> = SyncContext<ValidateRequest, S>;
/// `before_create` / `before_update` context over the change `D`.
pub type BeforeContext<D, S = ()> = SyncContext<BeforeModifyRequest<D>, S>;
/// `before_delete` / `before_restore` context.
pub type VetoContext<S = ()> = SyncContext<VetoRequest, S>;
/// `get_attrs` context over attributes `A`.
pub type GetAttrsContext<A, S = ()> = SyncContext<GetAttrsRequest<A>, S>;

type BoxReply = Pin<Box<dyn Future<Output = Result<Bytes, HandlerError>> + Send + 'static>>;

/// A type-erased synchronous handler: request body and call details in, reply
/// body out.
pub(crate) type SyncCall = Arc<dyn Fn(SyncInput) -> BoxReply + Send + Sync + 'static>;

/// What the endpoint hands a synchronous handler.
pub(crate) struct SyncInput {
    pub(crate) payload: Bytes,
    pub(crate) hook: Hook,
    pub(crate) plugin_id: Arc<str>,
    pub(crate) handler: Arc<str>,
    pub(crate) traceparent: Option<String>,
}

/// Wraps a typed handler: decodes the request (a bad one is a permanent 400),
/// calls it with the plugin's `state`, and encodes its decision with `reply`.
fn erase<Req, Out, S, F, Fut, Rep>(
    handler: F,
    state: S,
    reply: fn(SyncResult<Out>) -> Result<Rep, HandlerError>,
) -> SyncCall
where
    Req: DeserializeOwned + Send + 'static,
    Out: Send + 'static,
    Rep: Serialize + 'static,
    S: Clone + Send + Sync + 'static,
    F: Fn(SyncContext<Req, S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = SyncResult<Out>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |input: SyncInput| {
        let handler = handler.clone();
        let state = state.clone();
        Box::pin(async move {
            let request: Req = serde_json::from_slice(&input.payload).map_err(|e| {
                HandlerError::permanent(format!(
                    "request is not a valid '{}' request body: {e}",
                    input.hook
                ))
            })?;
            let ctx = SyncContext {
                request,
                hook: input.hook,
                plugin_id: input.plugin_id,
                handler: input.handler,
                traceparent: input.traceparent,
                state,
            };
            let decided = reply(handler(ctx).await)?;
            serde_json::to_vec(&decided)
                .map(Bytes::from)
                .map_err(|e| HandlerError::transient(format!("reply cannot be encoded: {e}")))
        })
    })
}

fn validate_reply(result: SyncResult<Vec<FieldError>>) -> Result<ValidateReply, HandlerError> {
    match result {
        Ok(errors) => Ok(ValidateReply { errors }),
        Err(SyncError::Reject(reason)) => Ok(ValidateReply {
            errors: vec![FieldError::general(reason)],
        }),
        Err(SyncError::Failed(e)) => Err(e),
    }
}

fn before_reply<D>(result: SyncResult<D>) -> Result<BeforeModifyReply<D>, HandlerError> {
    match result {
        Ok(data) => Ok(BeforeModifyReply {
            data: Some(data),
            reject: None,
        }),
        Err(SyncError::Reject(reason)) => Ok(BeforeModifyReply {
            data: None,
            reject: Some(reason),
        }),
        Err(SyncError::Failed(e)) => Err(e),
    }
}

fn veto_reply(result: SyncResult<()>) -> Result<VetoReply, HandlerError> {
    match result {
        Ok(()) => Ok(VetoReply { veto: None }),
        Err(SyncError::Reject(reason)) => Ok(VetoReply { veto: Some(reason) }),
        Err(SyncError::Failed(e)) => Err(e),
    }
}

fn attrs_reply<A>(result: SyncResult<Vec<A>>) -> Result<GetAttrsReply<A>, HandlerError> {
    match result {
        Ok(attrs) => Ok(GetAttrsReply { attrs: Some(attrs) }),
        Err(SyncError::Reject(reason)) => Err(HandlerError::permanent(format!(
            "a get_attrs handler cannot reject (it transforms the attribute list): {reason}"
        ))),
        Err(SyncError::Failed(e)) => Err(e),
    }
}

macro_rules! sync_methods {
    ($(
        $(#[$doc:meta])*
        $method:ident => $hook:expr, $req:ty, $out:ty, $reply:ident;
    )*) => {
        impl<S> PluginBuilder<S>
        where
            S: Clone + Send + Sync + 'static,
        {
            $(
                $(#[$doc])*
                ///
                /// `handler` is its name or a [`SyncHandler`] with options.
                pub fn $method<F, Fut>(self, handler: impl Into<SyncHandler>, f: F) -> Self
                where
                    F: Fn(SyncContext<$req, S>) -> Fut + Send + Sync + 'static,
                    Fut: Future<Output = SyncResult<$out>> + Send + 'static,
                {
                    let call = erase::<$req, $out, S, F, Fut, _>(f, self.state.clone(), $reply);
                    self.declare_sync($hook, handler.into(), HandlerFn::Sync(call))
                }
            )*
        }
    };
}

sync_methods! {
    /// Adds an `entry.validate` handler: return every problem found
    /// (`Ok(vec![])` accepts). Every matching validator runs; any error vetoes
    /// the change, and the host gets all errors of all validators at once.
    on_validate => Hook::EntryValidate, ValidateRequest, Vec<FieldError>, validate_reply;
    /// Adds an `entry.before_create` handler: return the entry to create
    /// (modified or not; the next handler sees it), or reject.
    on_before_create_entry => Hook::EntryBeforeCreate, BeforeModifyRequest<NewEntry>, NewEntry, before_reply;
    /// Adds an `entry.before_update` handler: return the changes (modified or
    /// not), or reject. `ctx.request.entry` is the entry as it is now.
    on_before_update_entry => Hook::EntryBeforeUpdate, BeforeModifyRequest<EntryChanges>, EntryChanges, before_reply;
    /// Adds an `entity.before_create` handler: return the entity to create
    /// (modified or not), or reject.
    on_before_create_entity => Hook::EntityBeforeCreate, BeforeModifyRequest<NewEntity>, NewEntity, before_reply;
    /// Adds an `entity.before_update` handler: return the changes (modified or
    /// not), or reject. `ctx.request.entity` is the entity as it is now.
    on_before_update_entity => Hook::EntityBeforeUpdate, BeforeModifyRequest<EntityChanges>, EntityChanges, before_reply;
    /// Adds an `entry.before_delete` handler: `Ok(())` lets the delete go on,
    /// [`SyncError::reject`] vetoes it.
    on_before_delete_entry => Hook::EntryBeforeDelete, VetoRequest, (), veto_reply;
    /// Adds an `entry.before_restore` handler: `Ok(())` or a veto.
    on_before_restore_entry => Hook::EntryBeforeRestore, VetoRequest, (), veto_reply;
    /// Adds an `entity.before_delete` handler: `Ok(())` or a veto.
    on_before_delete_entity => Hook::EntityBeforeDelete, VetoRequest, (), veto_reply;
    /// Adds an `entry.get_attrs` handler: return the attribute list, transformed
    /// (the next handler sees it).
    on_get_entry_attrs => Hook::EntryGetAttrs, GetAttrsRequest<Attribute>, Vec<Attribute>, attrs_reply;
    /// Adds an `entity.get_attrs` handler: return the attribute definitions,
    /// transformed.
    on_get_entity_attrs => Hook::EntityGetAttrs, GetAttrsRequest<EntityAttr>, Vec<EntityAttr>, attrs_reply;
}

/// Serves one request of a synchronous handler, in the endpoint's call task
/// (no further task hop: the host is waiting): a panic becomes a 500, and a call
/// running past the handler's timeout is dropped and answered with a 500.
pub(crate) async fn serve_sync(
    slot: &crate::serve::Slot,
    request: &async_nats::service::Request,
    f: &SyncCall,
) -> Result<Bytes, HandlerError> {
    let traceparent = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::TRACEPARENT))
        .map(|v| v.to_string());
    let input = SyncInput {
        payload: request.message.payload.clone(),
        hook: slot.spec.hook,
        plugin_id: slot.plugin_id.clone(),
        handler: slot.handler_name.clone(),
        traceparent,
    };
    crate::serve::guarded(f(input), slot.spec.timeout()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Plugin;
    use core_events::OnUnavailable;

    #[test]
    fn sync_handlers_are_declared_with_their_hooks_and_policies() {
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .on_validate(SyncHandler::named("v").priority(10), |_ctx| async {
                Ok(vec![])
            })
            .on_before_create_entry(
                SyncHandler::named("b").on_unavailable(OnUnavailable::Skip),
                |ctx| async move { Ok(ctx.request.data) },
            )
            .on_get_entity_attrs("g", |ctx| async move { Ok(ctx.request.attrs) })
            .build()
            .expect("valid plugin");
        let m = plugin.manifest();
        assert_eq!(m.handlers[0].hook, Hook::EntryValidate);
        assert_eq!(m.handlers[0].priority, 10);
        assert_eq!(m.handlers[0].on_unavailable(), OnUnavailable::Block);
        assert_eq!(m.handlers[1].hook, Hook::EntryBeforeCreate);
        assert_eq!(m.handlers[1].on_unavailable(), OnUnavailable::Skip);
        assert_eq!(m.handlers[2].on_unavailable(), OnUnavailable::Skip);
    }

    #[tokio::test]
    async fn decisions_become_reply_bodies() {
        let call = erase::<ValidateRequest, Vec<FieldError>, _, _, _, _>(
            |_ctx| async { Err(SyncError::reject("no")) },
            (),
            validate_reply,
        );
        let entity = core_events::sample::entity(1, "customer");
        let body = serde_json::to_vec(&ValidateRequest {
            entity,
            entry: NewEntry::named("x"),
            existing: None,
            user: None,
        })
        .unwrap();
        let out = call(SyncInput {
            payload: body.into(),
            hook: Hook::EntryValidate,
            plugin_id: "p".into(),
            handler: "v".into(),
            traceparent: None,
        })
        .await
        .unwrap();
        assert_eq!(&out[..], br#"{"errors":[{"message":"no"}]}"#);
        let err = call(SyncInput {
            payload: Bytes::from_static(b"nope"),
            hook: Hook::EntryValidate,
            plugin_id: "p".into(),
            handler: "v".into(),
            traceparent: None,
        })
        .await
        .unwrap_err();
        assert!(
            err.message()
                .contains("not a valid 'entry.validate' request"),
            "{err}"
        );
    }
}
