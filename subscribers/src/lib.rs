//! The Rust SDK for Pagoda hook bus plugins.
//!
//! A plugin is one NATS Services API service (name = plugin id, version = plugin
//! version, queue group = plugin id, so replicas share the work) with one endpoint
//! per handler on `<prefix>.hooks.<plugin-id>.<handler>`. Serving it registers the
//! plugin's manifest in the registry bucket the bus watches; the bus then delivers
//! each event to each matching handler as a request, in priority order, retrying
//! or dead-lettering failures. `nats micro ls/info/stats` shows every plugin and
//! handler.
//!
//! | part | what it is | module |
//! |---|---|---|
//! | [`Plugin::builder`], [`PluginBuilder`], [`Handler`], [`SyncHandler`], [`ApiRoute`], [`Task`] | declare a plugin and its handlers, each with its options; plugin-wide defaults; the state handed to every handler; validated by `build()` | [`plugin`] |
//! | [`EntryContext`], [`EntityContext`] | what a handler receives: the typed event, attempt, stream sequence, replay flag | [`context`] |
//! | [`HandlerError`], [`ResultExt`] | a handler's failure: transient (retried, code 500) or permanent (dead-lettered, code 400) | [`error`] |
//! | [`Plugin::serve`], [`ServeOptions`], [`RunningPlugin`] | serve and register; bounded concurrency; graceful shutdown | [`serve`] |
//! | [`ReplayFrom`], [`ServeOptions::replay`], [`Plugin::replay`], [`replay::replay_events`] | rebuild state from the stored events, then go on live without a gap or a duplicate; raw replays | [`replay`] |
//! | [`ServeOptions::backfill`], [`Plugin::backfill`], [`backfill::latest_events`] | a plugin that joins late: the latest event of every object, then live events without a gap or a duplicate | [`backfill`] |
//! | [`PluginBuilder::on_validate`], [`SyncContext`], [`SyncError`] | synchronous hooks (validate, before_*, get_attrs) over request/reply | [`sync`] |
//! | [`PluginBuilder::api_route`], [`ApiContext`], [`ApiResponse`] | plugin API routes: HTTP requests under `/api/v2/plugins/<id>/…`, forwarded by the host over request/reply | [`api`] |
//! | [`PluginBuilder::task`], [`TaskContext`], [`TaskOutcome`] | plugin tasks run as jobs: a JetStream work queue, state and cancel in the jobs bucket | [`task`] |
//! | [`User`], [`Entity`], [`Entry`], [`EntryEvent`], [`NewEntry`], [`ValidateRequest`], … | the model, event and request types handlers see, re-exported from `pagoda-core-events`: a plugin depends on this crate alone | (this page) |
//! | [`run_main`], [`run()`], [`RunConfig`] | the whole `main` of a plugin binary (env config, tracing, signals, drain) | [`run`](mod@run) |
//!
//! Delivery protocol: the request payload is the CloudEvents envelope
//! (`Envelope<EntryEvent>` or `Envelope<EntityEvent>`); headers carry the event id,
//! hook, entity, object, stream sequence, attempt and trace context (see
//! [`core_events::protocol::headers`]). A success reply has an empty body; an error
//! reply sets `Nats-Service-Error` and `Nats-Service-Error-Code` (400–499 permanent,
//! 500 transient). A payload that is not an event for the handler's hook gets a
//! 400 naming what is wrong; a panicking handler gets a 500; the plugin keeps
//! serving either way.
//!
//! Synchronous hooks (validate, before_*, get_attrs) are declared with their own
//! builder methods ([`PluginBuilder::on_validate`], …, see [`sync`]): the request
//! body is the hook's request and the reply carries the handler's decision.
//!
//! API routes ([`PluginBuilder::api_route`]) are endpoints of the same service on
//! `<prefix>.api.<plugin-id>.<route>`: the request body is an [`ApiRequest`] and
//! the reply an [`ApiResponse`]. Tasks ([`PluginBuilder::task`]) are run by a
//! job worker the plugin serves beside its endpoints (see [`task`]).
//!
//! # Example
//!
//! ```no_run
//! use pagoda_plugin_sdk::{EntryContext, Handler, HandlerError, Hook, Plugin, ServeOptions};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let plugin = Plugin::builder("hello-world", "Hello World", "1.0.0")
//!     .description("Greets new entries")
//!     .on_entry(
//!         Hook::EntryAfterCreate,
//!         Handler::named("greet").entities(["helloworld"]).priority(50),
//!         |ctx: EntryContext| async move {
//!             if ctx.event.data.entry.name.is_empty() {
//!                 return Err(HandlerError::permanent("entry has no name"));
//!             }
//!             tracing::info!(entry = %ctx.event.data.entry.name, attempt = ctx.attempt, "hello");
//!             Ok(())
//!         },
//!     )
//!     .build()?;
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let running = plugin.serve(client.clone(), ServeOptions::default()).await?;
//! tokio::signal::ctrl_c().await?;
//! running.shutdown().await?;
//! client.drain().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

// The Rust examples of the guides are compiled (and run, unless `no_run`) as
// doc tests, so they keep up with the API.
#[cfg(doctest)]
#[doc = include_str!("../../docs/writing-a-plugin.md")]
mod writing_a_plugin {}
#[cfg(doctest)]
#[doc = include_str!("../../docs/plugin-api-and-jobs.md")]
mod plugin_api_and_jobs {}
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

pub mod api;
pub mod backfill;
pub mod context;
pub mod error;
pub mod plugin;
pub mod replay;
pub mod run;
pub mod serve;
pub mod sync;
pub mod task;

pub use api::{ApiContext, ApiResult};
pub use context::{EntityContext, EntryContext, EventContext};
pub use error::{HandlerError, HandlerErrorKind, ResultExt, ServeError};
pub use plugin::{
    ApiRoute, Handler, HandlerResult, IntoHook, Plugin, PluginBuilder, SyncHandler, Task,
};
pub use replay::{ReplayError, ReplayFrom, ReplayProgress};
pub use run::{RunConfig, RunError, run, run_main, server_addrs};
pub use serve::{RunningPlugin, ServeOptions};
pub use sync::{
    BeforeContext, GetAttrsContext, SyncContext, SyncError, SyncResult, ValidateContext,
    VetoContext,
};
pub use task::{TaskContext, TaskOutcome, TaskResult};
/// The cancel signal of a running task ([`TaskContext::cancellation`]).
pub use tokio_util::sync::CancellationToken;

// What handlers see, so that a plugin depends on this crate alone.
pub use core_events::jobs::{JobRequest, JobState, JobStatus};
pub use core_events::plugin_api::{ApiRequest, ApiResponse};
pub use core_events::request::{
    AttrChange, EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry,
};
pub use core_events::sync::{
    BeforeModifyReply, BeforeModifyRequest, FieldError, GetAttrsReply, GetAttrsRequest,
    ValidateReply, ValidateRequest, VetoReply, VetoRequest,
};
pub use core_events::{
    ApiRouteSpec, AttrType, Attribute, Entity, EntityAttr, EntityEvent, Entry, EntryEvent,
    Envelope, EventId, HandlerSpec, Hook, HookKind, ManifestError, ObjectKind, ObjectRef,
    OnUnavailable, PluginManifest, Subjects, TaskSpec, UnknownHook, User,
};
