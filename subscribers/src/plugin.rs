//! Declaring a plugin: [`Plugin::builder`], its handlers with their options,
//! and the state handed to every handler.
//!
//! Each declaration carries its own options: a plain name (`"greet"`) takes the
//! defaults, a [`Handler`], [`SyncHandler`], [`ApiRoute`] or [`Task`] value sets
//! them (`Handler::named("greet").priority(10).entities(["shop"])`). Each kind of
//! declaration has its own option type, so an option that does not apply (a
//! priority on an API route, `on_unavailable` on a notification handler) does
//! not compile. [`PluginBuilder::default_priority`] and
//! [`PluginBuilder::default_timeout`] set one value for every hook handler that
//! does not set its own.
//!
//! # Shared state
//!
//! [`PluginBuilder::state`] hands one value to every handler declared after it,
//! as `ctx.state` (axum's `State`, in one field): a clone per call, so give an
//! `Arc` (or a handle that is cheap to clone, like a database pool).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! use pagoda_plugin_sdk::{EntryContext, Handler, HandlerResult, Hook, Plugin};
//!
//! #[derive(Default)]
//! struct Counts {
//!     created: AtomicU64,
//! }
//!
//! async fn count(ctx: EntryContext<Arc<Counts>>) -> HandlerResult {
//!     ctx.state.created.fetch_add(1, Ordering::Relaxed);
//!     Ok(())
//! }
//!
//! # fn main() -> Result<(), pagoda_plugin_sdk::ManifestError> {
//! let counts = Arc::new(Counts::default());
//! let plugin = Plugin::builder("counter", "Counter", "1.0.0")
//!     .state(counts.clone())
//!     .default_priority(20)
//!     .on_entry(Hook::EntryAfterCreate, "count", count)
//!     .on_entry(
//!         Hook::EntryAfterUpdate,
//!         Handler::named("count_shop_updates").entities(["shop"]).priority(10),
//!         |ctx| async move {
//!             ctx.state.created.load(Ordering::Relaxed); // the same Counts
//!             Ok(())
//!         },
//!     )
//!     .build()?;
//! assert_eq!(plugin.manifest().handlers[0].priority, 20);
//! assert_eq!(plugin.manifest().handlers[1].priority, 10);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_events::{
    ApiRouteSpec, EntityEvent, EntryEvent, HandlerSpec, Hook, HookKind, ManifestError, ObjectKind,
    OnUnavailable, PluginManifest, TaskSpec, UnknownHook,
};

use crate::api::ApiCall;
use crate::context::EventContext;
use crate::error::HandlerError;
use crate::task::TaskCall;

/// What a notification handler's future resolves to.
pub type HandlerResult = Result<(), HandlerError>;

type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;
pub(crate) type NotificationCall<D> =
    Arc<dyn Fn(EventContext<D>) -> BoxFuture + Send + Sync + 'static>;

/// A handler function, by the shape of its input and output.
#[derive(Clone)]
pub(crate) enum HandlerFn {
    /// A notification about an entry.
    Entry(NotificationCall<EntryEvent>),
    /// A notification about an entity.
    Entity(NotificationCall<EntityEvent>),
    /// A synchronous hook (request/reply; see [`crate::sync`]).
    Sync(crate::sync::SyncCall),
}

/// A hook given as a [`Hook`] or by name (standard name or legacy alias).
pub trait IntoHook {
    /// The hook.
    ///
    /// # Errors
    ///
    /// [`UnknownHook`] (listing the valid names) for a name that is no hook.
    fn into_hook(self) -> Result<Hook, UnknownHook>;
}

impl IntoHook for Hook {
    fn into_hook(self) -> Result<Hook, UnknownHook> {
        Ok(self)
    }
}

impl IntoHook for &str {
    fn into_hook(self) -> Result<Hook, UnknownHook> {
        Hook::parse(self)
    }
}

impl IntoHook for String {
    fn into_hook(self) -> Result<Hook, UnknownHook> {
        Hook::parse(&self)
    }
}

impl IntoHook for &String {
    fn into_hook(self) -> Result<Hook, UnknownHook> {
        Hook::parse(self)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Implements the name conversions and the options both kinds of hook handler
/// have (`entities`, `priority`, `timeout`).
macro_rules! hook_handler_options {
    ($ty:ident) => {
        impl From<&str> for $ty {
            fn from(name: &str) -> Self {
                $ty::named(name)
            }
        }

        impl From<String> for $ty {
            fn from(name: String) -> Self {
                $ty::named(name)
            }
        }

        impl From<&String> for $ty {
            fn from(name: &String) -> Self {
                $ty::named(name.as_str())
            }
        }

        impl $ty {
            /// Only these entity names (exact, case-sensitive); without it the
            /// handler sees every entity.
            pub fn entities<I, N>(mut self, names: I) -> Self
            where
                I: IntoIterator<Item = N>,
                N: Into<String>,
            {
                self.common.entities = Some(names.into_iter().map(Into::into).collect());
                self
            }

            /// Lower runs first; default [`PluginBuilder::default_priority`], else 100.
            pub fn priority(mut self, priority: i32) -> Self {
                self.common.priority = Some(priority);
                self
            }

            /// How long the handler has to answer one call (whole milliseconds);
            /// default [`PluginBuilder::default_timeout`], else 5 s.
            pub fn timeout(mut self, timeout: Duration) -> Self {
                self.common.timeout_ms = Some(millis(timeout));
                self
            }
        }
    };
}

/// What every hook handler can set; `None` takes the plugin's default.
#[derive(Debug, Clone, Default)]
struct CommonOptions {
    name: String,
    entities: Option<Vec<String>>,
    priority: Option<i32>,
    timeout_ms: Option<u64>,
}

impl CommonOptions {
    fn named(name: impl Into<String>) -> Self {
        CommonOptions {
            name: name.into(),
            ..CommonOptions::default()
        }
    }
}

/// A notification handler's name and options, given where it is declared
/// ([`PluginBuilder::on_entry`], [`PluginBuilder::on_entity`]); a plain name
/// converts into one with the defaults.
///
/// ```
/// use std::time::Duration;
/// use pagoda_plugin_sdk::Handler;
///
/// let greet = Handler::named("greet")
///     .entities(["shop"])
///     .priority(10)
///     .timeout(Duration::from_secs(2))
///     .retry_backoff_ms([200, 1_000]);
/// # let _ = greet;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Handler {
    common: CommonOptions,
    retry_backoff_ms: Option<Vec<u64>>,
}

impl Handler {
    /// A handler named `name` (letters, digits, `-`, `_`; unique in the
    /// plugin), with the defaults.
    pub fn named(name: impl Into<String>) -> Self {
        Handler {
            common: CommonOptions::named(name),
            retry_backoff_ms: None,
        }
    }

    /// The retry schedule: the waits in milliseconds before each retry; after
    /// the last, the delivery is dead-lettered. `[]` dead-letters on the first
    /// failure. Default `[100, 500, 2000, 10000]`.
    pub fn retry_backoff_ms(mut self, waits: impl IntoIterator<Item = u64>) -> Self {
        self.retry_backoff_ms = Some(waits.into_iter().collect());
        self
    }

    /// As [`retry_backoff_ms`](Self::retry_backoff_ms), with durations.
    pub fn retry_backoff(self, waits: impl IntoIterator<Item = Duration>) -> Self {
        self.retry_backoff_ms(waits.into_iter().map(millis))
    }
}

hook_handler_options!(Handler);

/// A synchronous handler's name and options, given where it is declared
/// ([`PluginBuilder::on_validate`], …); a plain name converts into one with the
/// defaults.
///
/// ```
/// use pagoda_plugin_sdk::{OnUnavailable, SyncHandler};
///
/// let hide = SyncHandler::named("hide_secrets").priority(5).on_unavailable(OnUnavailable::Block);
/// # let _ = hide;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct SyncHandler {
    common: CommonOptions,
    on_unavailable: Option<OnUnavailable>,
}

impl SyncHandler {
    /// A synchronous handler named `name` (letters, digits, `-`, `_`; unique in
    /// the plugin), with the defaults.
    pub fn named(name: impl Into<String>) -> Self {
        SyncHandler {
            common: CommonOptions::named(name),
            on_unavailable: None,
        }
    }

    /// What the host does when the handler gives no answer (no replica, past
    /// its timeout, an error): [`OnUnavailable::Block`] fails the change,
    /// [`OnUnavailable::Skip`] leaves the handler out. Default: block for
    /// validate and before-hooks, skip for get_attrs.
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.on_unavailable = Some(policy);
        self
    }
}

hook_handler_options!(SyncHandler);

/// An API route's name and options, given where it is declared
/// ([`PluginBuilder::api_route`]); a plain name converts into one with the
/// defaults (authenticated users only, 5 s).
#[derive(Debug, Clone)]
#[must_use]
pub struct ApiRoute {
    name: String,
    public: bool,
    timeout_ms: Option<u64>,
}

impl ApiRoute {
    /// A route named `name` (letters, digits, `-`, `_`; distinct from the
    /// handler names), with the defaults.
    pub fn named(name: impl Into<String>) -> Self {
        ApiRoute {
            name: name.into(),
            public: false,
            timeout_ms: None,
        }
    }

    /// Lets requests without a token reach the route (its
    /// [`ApiContext::user`](crate::ApiContext::user) is then `None`). By
    /// default, as in Pagoda, only authenticated users do.
    pub fn public(mut self) -> Self {
        self.public = true;
        self
    }

    /// How long the host waits for an answer before it answers HTTP 504 (whole
    /// milliseconds); default 5 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(millis(timeout));
        self
    }

    pub(crate) fn into_spec(self, method: &str, path: String) -> ApiRouteSpec {
        let mut spec = ApiRouteSpec::new(self.name, method, path);
        spec.public = self.public;
        if let Some(ms) = self.timeout_ms {
            spec.timeout_ms = ms;
        }
        spec
    }
}

impl From<&str> for ApiRoute {
    fn from(name: &str) -> Self {
        ApiRoute::named(name)
    }
}

impl From<String> for ApiRoute {
    fn from(name: String) -> Self {
        ApiRoute::named(name)
    }
}

/// A task's name and options, given where it is declared
/// ([`PluginBuilder::task`]); a plain name converts into one with the defaults
/// (cancellable, no heartbeat timeout).
#[derive(Debug, Clone)]
#[must_use]
pub struct Task {
    name: String,
    description: String,
    cancellable: bool,
    timeout_secs: u64,
}

impl Task {
    /// A task named `name` (letters, digits, `-`, `_`; unique in the plugin),
    /// with the defaults.
    pub fn named(name: impl Into<String>) -> Self {
        Task {
            name: name.into(),
            description: String::new(),
            cancellable: true,
            timeout_secs: 0,
        }
    }

    /// What the task does (shown with its jobs).
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// A running job cannot be cancelled (the host answers 409). By default it
    /// can; a job still waiting in the queue always can.
    pub fn not_cancellable(mut self) -> Self {
        self.cancellable = false;
        self
    }

    /// How long a running job may go without a heartbeat before the host marks
    /// it TIMEOUT (whole seconds, rounded up; zero: no limit, the default). The
    /// worker writes heartbeats while the task runs, so this catches workers
    /// that died or hang, not long tasks.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        self
    }

    pub(crate) fn into_spec(self, offset: u32) -> TaskSpec {
        let mut spec = TaskSpec::new(self.name, offset);
        spec.description = self.description;
        spec.cancellable = self.cancellable;
        spec.timeout_secs = self.timeout_secs;
        spec
    }
}

impl From<&str> for Task {
    fn from(name: &str) -> Self {
        Task::named(name)
    }
}

impl From<String> for Task {
    fn from(name: String) -> Self {
        Task::named(name)
    }
}

/// A validated plugin: its manifest and one handler function per manifest handler.
///
/// Cheap to clone; [`Plugin::serve`] it once per replica.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

pub(crate) struct PluginInner {
    pub(crate) manifest: PluginManifest,
    /// The manifest as stored in the registry, serialized once at build time.
    pub(crate) manifest_json: Bytes,
    /// `handlers[i]` serves `manifest.handlers[i]`.
    pub(crate) handlers: Vec<HandlerFn>,
    /// `routes[i]` serves `manifest.api[i]`.
    pub(crate) routes: Vec<ApiCall>,
    /// `tasks[i]` runs `manifest.tasks[i]`.
    pub(crate) tasks: Vec<TaskCall>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("manifest", &self.inner.manifest)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// Starts declaring a plugin. `id` (letters, digits, `-`, `_`) is also its NATS
    /// service name and queue group; `version` must be a semantic version.
    pub fn builder(
        id: impl Into<String>,
        name: impl Into<String>,
        version: impl Into<String>,
    ) -> PluginBuilder {
        PluginBuilder {
            manifest: PluginManifest::new(id, name, version),
            handlers: Vec::new(),
            options: Vec::new(),
            routes: Vec::new(),
            tasks: Vec::new(),
            problems: Vec::new(),
            default_priority: None,
            default_timeout_ms: None,
            state: (),
        }
    }

    /// The manifest registered for this plugin.
    pub fn manifest(&self) -> &PluginManifest {
        &self.inner.manifest
    }

    /// The plugin id.
    pub fn id(&self) -> &str {
        &self.inner.manifest.id
    }
}

/// The options a hook handler set itself, applied over the plugin's defaults
/// by `build()`.
#[derive(Debug, Clone, Copy, Default)]
struct OwnOptions {
    priority: Option<i32>,
    timeout_ms: Option<u64>,
}

/// Declares a plugin's metadata, handlers, API routes and tasks;
/// [`PluginBuilder::build`] validates it.
///
/// Each declaration takes its options with it (see [`crate::plugin`]).
/// Declaration order is manifest order, the last tie-breaker of dispatch order.
/// `S` is the state handed to the handlers ([`state`](Self::state)); `()` until
/// one is given.
#[must_use = "a builder does nothing until build() is called"]
pub struct PluginBuilder<S = ()> {
    manifest: PluginManifest,
    handlers: Vec<HandlerFn>,
    /// `options[i]`: what `manifest.handlers[i]` set itself.
    options: Vec<OwnOptions>,
    routes: Vec<ApiCall>,
    tasks: Vec<TaskCall>,
    problems: Vec<String>,
    default_priority: Option<i32>,
    default_timeout_ms: Option<u64>,
    /// Cloned into every handler's context.
    pub(crate) state: S,
}

impl<S> std::fmt::Debug for PluginBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginBuilder")
            .field("manifest", &self.manifest)
            .field("problems", &self.problems)
            .finish_non_exhaustive()
    }
}

impl PluginBuilder<()> {
    /// Hands `state` to every handler, route and task declared after this call,
    /// as `ctx.state` (their contexts are then `EntryContext<S>`,
    /// `SyncContext<R, S>`, `ApiContext<S>`, `TaskContext<S>`). Each call gets a
    /// clone: give an `Arc<…>` or another cheap handle. See [`crate::plugin`].
    pub fn state<S>(self, state: S) -> PluginBuilder<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        PluginBuilder {
            manifest: self.manifest,
            handlers: self.handlers,
            options: self.options,
            routes: self.routes,
            tasks: self.tasks,
            problems: self.problems,
            default_priority: self.default_priority,
            default_timeout_ms: self.default_timeout_ms,
            state,
        }
    }
}

impl<S> PluginBuilder<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// What the plugin does (shown by `nats micro info` and in the registry).
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.manifest.description = description.into();
        self
    }

    /// Who wrote the plugin.
    pub fn author(mut self, author: impl Into<String>) -> Self {
        self.manifest.author = author.into();
        self
    }

    /// The priority of every hook handler (notification or synchronous) that
    /// does not set its own, wherever it is declared; without it, 100. Lower
    /// runs first.
    pub fn default_priority(mut self, priority: i32) -> Self {
        self.default_priority = Some(priority);
        self
    }

    /// The timeout of every hook handler (notification or synchronous) that
    /// does not set its own, wherever it is declared; without it, 5 s. API
    /// routes and tasks have their own.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout_ms = Some(millis(timeout));
        self
    }

    /// Adds a handler for an entry notification hook (`entry.after_create`,
    /// `after_update`, `after_delete`, `after_restore`, or their legacy aliases).
    ///
    /// `handler` is its name (`"greet"`) or a [`Handler`] with options. `f` is
    /// called once per delivery with an [`EntryContext`](crate::EntryContext);
    /// `Ok(())` acknowledges it, a [`HandlerError`] asks for a retry (transient)
    /// or a dead letter (permanent). A hook of another kind is reported by
    /// `build()`.
    pub fn on_entry<F, Fut>(self, hook: impl IntoHook, handler: impl Into<Handler>, f: F) -> Self
    where
        F: Fn(EventContext<EntryEvent, S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let state = self.state.clone();
        let call: NotificationCall<EntryEvent> =
            Arc::new(move |ctx| Box::pin(f(ctx.with_state(state.clone()))));
        self.declare(
            hook,
            handler.into(),
            ObjectKind::Entry,
            HandlerFn::Entry(call),
        )
    }

    /// Adds a handler for an entity notification hook (`entity.after_create`,
    /// `after_update`, `after_delete`, or their legacy aliases).
    ///
    /// As [`on_entry`](Self::on_entry), with an [`EntityContext`](crate::EntityContext).
    pub fn on_entity<F, Fut>(self, hook: impl IntoHook, handler: impl Into<Handler>, f: F) -> Self
    where
        F: Fn(EventContext<EntityEvent, S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let state = self.state.clone();
        let call: NotificationCall<EntityEvent> =
            Arc::new(move |ctx| Box::pin(f(ctx.with_state(state.clone()))));
        self.declare(
            hook,
            handler.into(),
            ObjectKind::Entity,
            HandlerFn::Entity(call),
        )
    }

    fn declare(
        mut self,
        hook: impl IntoHook,
        handler: Handler,
        object: ObjectKind,
        call: HandlerFn,
    ) -> Self {
        let name = &handler.common.name;
        let label = if name.is_empty() {
            format!("handler #{}", self.manifest.handlers.len() + 1)
        } else {
            format!("handler '{name}'")
        };
        let method = match object {
            ObjectKind::Entry => "on_entry",
            ObjectKind::Entity => "on_entity",
        };
        let hook = match hook.into_hook() {
            Ok(hook) => hook,
            Err(e) => {
                self.problems.push(format!("{label}: {e}"));
                return self;
            }
        };
        if hook.object() != object {
            self.problems.push(format!(
                "{label}: '{hook}' is an {} hook; {method} takes {object} hooks (use on_{} for it)",
                hook.object(),
                hook.object()
            ));
            return self;
        }
        if hook.kind() != HookKind::Notification {
            self.problems.push(format!(
                "{label}: '{hook}' is a synchronous hook ({:?}); {method} takes notification hooks (after_*); use {} for it",
                hook.kind(),
                sync_method(hook),
            ));
            return self;
        }
        let mut spec = HandlerSpec::new(handler.common.name.clone(), hook);
        if let Some(waits) = handler.retry_backoff_ms {
            spec.retry_backoff_ms = waits;
        }
        self.push_handler(spec, handler.common, call)
    }

    /// Declares a synchronous handler (its method names the hook).
    pub(crate) fn declare_sync(self, hook: Hook, handler: SyncHandler, call: HandlerFn) -> Self {
        let mut spec = HandlerSpec::new(handler.common.name.clone(), hook);
        spec.on_unavailable = handler.on_unavailable;
        self.push_handler(spec, handler.common, call)
    }

    fn push_handler(
        mut self,
        mut spec: HandlerSpec,
        common: CommonOptions,
        call: HandlerFn,
    ) -> Self {
        spec.entities = common.entities;
        self.manifest.handlers.push(spec);
        self.options.push(OwnOptions {
            priority: common.priority,
            timeout_ms: common.timeout_ms,
        });
        self.handlers.push(call);
        self
    }

    /// Declares an API route (see [`crate::api`]).
    pub(crate) fn push_route(mut self, spec: ApiRouteSpec, call: ApiCall) -> Self {
        self.manifest.api.push(spec);
        self.routes.push(call);
        self
    }

    /// Declares a task (see [`crate::task`]).
    pub(crate) fn push_task(mut self, spec: TaskSpec, call: TaskCall) -> Self {
        self.manifest.tasks.push(spec);
        self.tasks.push(call);
        self
    }

    /// Validates everything declared and gives the plugin.
    ///
    /// # Errors
    ///
    /// [`ManifestError`] listing every problem: Pagoda's id/name/version messages
    /// ("Plugin ID is required", …), unknown hook names (with the valid names),
    /// hooks of the wrong object or kind, duplicate or malformed handler names, bad
    /// entity filters, priorities, timeouts and retry schedules; API routes with a
    /// bad method, path or timeout, or the name of a handler (both are endpoints of
    /// the plugin's one NATS service); tasks with a bad name or offset.
    pub fn build(mut self) -> Result<Plugin, ManifestError> {
        for (spec, own) in self.manifest.handlers.iter_mut().zip(&self.options) {
            if let Some(priority) = own.priority.or(self.default_priority) {
                spec.priority = priority;
            }
            if let Some(ms) = own.timeout_ms.or(self.default_timeout_ms) {
                spec.timeout_ms = ms;
            }
        }
        let mut problems = match self.manifest.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.problems,
        };
        problems.extend(self.problems);
        for route in &self.manifest.api {
            if self.manifest.handlers.iter().any(|h| h.name == route.name) {
                problems.push(format!(
                    "api route '{}': the name is used by a handler; routes and handlers are endpoints of one NATS service and need distinct names",
                    route.name
                ));
            }
        }
        let manifest_json = if problems.is_empty() {
            match serde_json::to_vec(&self.manifest) {
                Ok(json) => Bytes::from(json),
                Err(e) => {
                    problems.push(format!("manifest cannot be serialized: {e}"));
                    Bytes::new()
                }
            }
        } else {
            Bytes::new()
        };
        if !problems.is_empty() {
            let id_ok =
                core_events::subject::check_token_name("plugin id", &self.manifest.id).is_ok();
            return Err(ManifestError {
                plugin: id_ok.then(|| self.manifest.id.clone()),
                problems,
            });
        }
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                manifest: self.manifest,
                manifest_json,
                handlers: self.handlers,
                routes: self.routes,
                tasks: self.tasks,
            }),
        })
    }
}

/// The builder method for a synchronous hook.
fn sync_method(hook: Hook) -> &'static str {
    match hook {
        Hook::EntryValidate => "on_validate",
        Hook::EntryBeforeCreate => "on_before_create_entry",
        Hook::EntryBeforeUpdate => "on_before_update_entry",
        Hook::EntityBeforeCreate => "on_before_create_entity",
        Hook::EntityBeforeUpdate => "on_before_update_entity",
        Hook::EntryBeforeDelete => "on_before_delete_entry",
        Hook::EntryBeforeRestore => "on_before_restore_entry",
        Hook::EntityBeforeDelete => "on_before_delete_entity",
        Hook::EntryGetAttrs => "on_get_entry_attrs",
        Hook::EntityGetAttrs => "on_get_entity_attrs",
        _ => "on_entry or on_entity",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ok<D>(_: EventContext<D>) -> HandlerResult {
        Ok(())
    }

    #[test]
    fn options_go_with_their_handler_over_the_defaults() {
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .on_entry(
                "after_create_entry_v2",
                Handler::named("a").entities(["customer"]).priority(10),
                ok,
            )
            .on_entity(
                Hook::EntityAfterDelete,
                Handler::named("b")
                    .timeout(Duration::from_millis(250))
                    .retry_backoff_ms([50, 100]),
                ok,
            )
            .build()
            .expect("valid plugin");
        let m = plugin.manifest();
        assert_eq!(m.handlers.len(), 2);
        assert_eq!(m.handlers[0].name, "a");
        assert_eq!(m.handlers[0].hook, Hook::EntryAfterCreate);
        assert_eq!(m.handlers[0].entities, Some(vec!["customer".to_owned()]));
        assert_eq!(m.handlers[0].priority, 10);
        assert_eq!(m.handlers[1].priority, 100);
        assert_eq!(m.handlers[1].timeout_ms, 250);
        assert_eq!(m.handlers[1].retry_backoff_ms, [50, 100]);
        assert_eq!(plugin.inner.handlers.len(), 2);
    }

    #[test]
    fn plugin_defaults_apply_to_every_handler_that_sets_none() {
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .on_entry(Hook::EntryAfterCreate, "a", ok)
            .default_priority(7)
            .on_entry(Hook::EntryAfterUpdate, Handler::named("b").priority(3), ok)
            .on_validate("c", |_ctx| async { Ok(vec![]) })
            .default_timeout(Duration::from_millis(900))
            .build()
            .expect("valid plugin");
        let m = plugin.manifest();
        let priorities: Vec<i32> = m.handlers.iter().map(|h| h.priority).collect();
        assert_eq!(priorities, [7, 3, 7]);
        assert!(m.handlers.iter().all(|h| h.timeout_ms == 900));
    }

    #[test]
    fn wrong_hooks_are_reported_together() {
        let err = Plugin::builder("p", "P", "1.0.0")
            .on_entry("entry.after_creat", "a", ok)
            .on_entry(Hook::EntityAfterCreate, "b", ok)
            .on_entry(Hook::EntryValidate, "c", ok)
            .build()
            .expect_err("invalid plugin");
        let msg = err.to_string();
        for needle in [
            "unknown hook 'entry.after_creat' (did you mean 'entry.after_create'?)",
            "'entity.after_create' is an entity hook; on_entry takes entry hooks",
            "'entry.validate' is a synchronous hook (Validate); on_entry takes notification hooks (after_*); use on_validate for it",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
        assert_eq!(err.plugin.as_deref(), Some("p"));
    }

    #[tokio::test]
    async fn handlers_get_the_plugin_state() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .state(seen.clone())
            .on_entry(Hook::EntryAfterCreate, "a", |ctx| async move {
                if let Ok(mut seen) = ctx.state.lock() {
                    seen.push(ctx.handler.to_string());
                }
                Ok(())
            })
            .build()
            .expect("valid plugin");
        let HandlerFn::Entry(call) = &plugin.inner.handlers[0] else {
            panic!("not an entry handler");
        };
        let event = core_events::sample::entry_event(Hook::EntryAfterCreate, "customer", 1);
        call(EventContext::new("p", "a", event)).await.expect("ok");
        assert_eq!(*seen.lock().expect("lock"), ["a"]);
    }
}
