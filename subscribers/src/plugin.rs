//! Declaring a plugin: [`Plugin::builder`], handlers and their options.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_events::{
    ApiRouteSpec, EntityEvent, EntryEvent, HandlerSpec, Hook, HookKind, ManifestError, ObjectKind,
    PluginManifest, TaskSpec, UnknownHook,
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
            routes: Vec::new(),
            tasks: Vec::new(),
            problems: Vec::new(),
            current: Current::None,
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

/// What the per-declaration options (`entities`, `priority`, `public`, …) apply
/// to: the handler, API route or task declared last.
#[derive(Debug, Clone, Copy)]
enum Current {
    /// Nothing declared yet.
    None,
    /// The last declaration was rejected; its problem is already recorded.
    Rejected,
    /// The handler at this index.
    Handler(usize),
    /// The API route at this index.
    Route(usize),
    /// The task at this index.
    Task(usize),
}

/// Declares a plugin's metadata, handlers, API routes and tasks;
/// [`PluginBuilder::build`] validates it.
///
/// Per-handler options ([`entities`](Self::entities), [`priority`](Self::priority),
/// [`timeout`](Self::timeout), [`retry_backoff_ms`](Self::retry_backoff_ms)) apply
/// to the handler declared last. Declaration order is manifest order, the last
/// tie-breaker of dispatch order. API routes ([`api_route`](Self::api_route)) and
/// tasks ([`task`](Self::task)) have options of their own, applying to the route
/// or task declared last.
#[must_use = "a builder does nothing until build() is called"]
pub struct PluginBuilder {
    manifest: PluginManifest,
    handlers: Vec<HandlerFn>,
    routes: Vec<ApiCall>,
    tasks: Vec<TaskCall>,
    problems: Vec<String>,
    current: Current,
}

impl std::fmt::Debug for PluginBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginBuilder")
            .field("manifest", &self.manifest)
            .field("problems", &self.problems)
            .finish_non_exhaustive()
    }
}

impl PluginBuilder {
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

    /// Adds a handler for an entry notification hook (`entry.after_create`,
    /// `after_update`, `after_delete`, `after_restore`, or their legacy aliases).
    ///
    /// The handler is called once per delivery with an [`EntryContext`](crate::EntryContext);
    /// `Ok(())` acknowledges it, a [`HandlerError`] asks for a retry (transient) or
    /// a dead letter (permanent). A hook of another kind is reported by `build()`.
    pub fn on_entry<F, Fut>(self, hook: impl IntoHook, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(EventContext<EntryEvent>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let f: NotificationCall<EntryEvent> = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.declare(hook, name.into(), ObjectKind::Entry, HandlerFn::Entry(f))
    }

    /// Adds a handler for an entity notification hook (`entity.after_create`,
    /// `after_update`, `after_delete`, or their legacy aliases).
    ///
    /// As [`on_entry`](Self::on_entry), with an [`EntityContext`](crate::EntityContext).
    pub fn on_entity<F, Fut>(self, hook: impl IntoHook, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(EventContext<EntityEvent>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let f: NotificationCall<EntityEvent> = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.declare(hook, name.into(), ObjectKind::Entity, HandlerFn::Entity(f))
    }

    fn declare(
        self,
        hook: impl IntoHook,
        name: String,
        object: ObjectKind,
        handler: HandlerFn,
    ) -> Self {
        let label = if name.is_empty() {
            format!("handler #{}", self.manifest.handlers.len() + 1)
        } else {
            format!("handler '{name}'")
        };
        let hook = match hook.into_hook() {
            Ok(hook) => hook,
            Err(e) => return self.reject(format!("{label}: {e}")),
        };
        if hook.object() != object {
            let method = match object {
                ObjectKind::Entry => "on_entry",
                ObjectKind::Entity => "on_entity",
            };
            return self.reject(format!(
                "{label}: '{hook}' is an {} hook; {method} takes {object} hooks (use on_{} for it)",
                hook.object(),
                hook.object()
            ));
        }
        if hook.kind() != HookKind::Notification {
            return self.reject(format!(
                "{label}: '{hook}' is a synchronous hook ({:?}); {method} takes notification hooks (after_*); use {} for it",
                hook.kind(),
                sync_method(hook),
                method = match object {
                    ObjectKind::Entry => "on_entry",
                    ObjectKind::Entity => "on_entity",
                },
            ));
        }
        self.push_handler(name, hook, handler)
    }

    /// Declares a synchronous handler (its method names the hook).
    pub(crate) fn declare_sync(self, hook: Hook, name: String, handler: HandlerFn) -> Self {
        self.push_handler(name, hook, handler)
    }

    fn push_handler(mut self, name: String, hook: Hook, handler: HandlerFn) -> Self {
        self.manifest.handlers.push(HandlerSpec::new(name, hook));
        self.handlers.push(handler);
        self.current = Current::Handler(self.handlers.len() - 1);
        self
    }

    /// Records a problem with an option, keeping what it applies to.
    fn reject_option(mut self, problem: String) -> Self {
        self.problems.push(problem);
        self
    }

    fn reject(mut self, problem: String) -> Self {
        self.problems.push(problem);
        self.current = Current::Rejected;
        self
    }

    /// Applies a per-handler option to the handler declared last.
    pub(crate) fn with_current_spec(
        self,
        option: &str,
        apply: impl FnOnce(&mut HandlerSpec),
    ) -> Self {
        self.with_current(option, apply)
    }

    fn with_current(mut self, option: &str, apply: impl FnOnce(&mut HandlerSpec)) -> Self {
        match self.current {
            Current::Handler(i) => apply(&mut self.manifest.handlers[i]),
            Current::Rejected => {}
            Current::None => self.problems.push(format!(
                "{option}() was called before any handler was declared; handler options apply to the handler declared last"
            )),
            Current::Route(_) | Current::Task(_) => {
                let problem = format!(
                    "{option}() applies to hook handlers; the last declaration is {}",
                    self.current_label()
                );
                self.problems.push(problem);
            }
        }
        self
    }

    /// Declares an API route (see [`crate::api`]).
    pub(crate) fn push_route(mut self, spec: ApiRouteSpec, call: ApiCall) -> Self {
        self.manifest.api.push(spec);
        self.routes.push(call);
        self.current = Current::Route(self.routes.len() - 1);
        self
    }

    /// Applies an API route option to the route declared last.
    pub(crate) fn with_current_route(
        mut self,
        option: &str,
        apply: impl FnOnce(&mut ApiRouteSpec),
    ) -> Self {
        match self.current {
            Current::Route(i) => apply(&mut self.manifest.api[i]),
            Current::Rejected => {}
            _ => {
                let problem = format!(
                    "{option}() applies to API routes (api_route); the last declaration is {}",
                    self.current_label()
                );
                self.problems.push(problem);
            }
        }
        self
    }

    /// Declares a task (see [`crate::task`]).
    pub(crate) fn push_task(mut self, spec: TaskSpec, call: TaskCall) -> Self {
        self.manifest.tasks.push(spec);
        self.tasks.push(call);
        self.current = Current::Task(self.tasks.len() - 1);
        self
    }

    /// Applies a task option to the task declared last.
    pub(crate) fn with_current_task(
        mut self,
        option: &str,
        apply: impl FnOnce(&mut TaskSpec),
    ) -> Self {
        match self.current {
            Current::Task(i) => apply(&mut self.manifest.tasks[i]),
            Current::Rejected => {}
            _ => {
                let problem = format!(
                    "{option}() applies to tasks (task); the last declaration is {}",
                    self.current_label()
                );
                self.problems.push(problem);
            }
        }
        self
    }

    /// What the options apply to now, for messages.
    fn current_label(&self) -> String {
        match self.current {
            Current::None | Current::Rejected => "nothing".to_owned(),
            Current::Handler(i) => format!("handler '{}'", self.manifest.handlers[i].name),
            Current::Route(i) => format!("api route '{}'", self.manifest.api[i].name),
            Current::Task(i) => format!("task '{}'", self.manifest.tasks[i].name),
        }
    }

    /// Limits the last handler to these entity names (exact, case-sensitive).
    /// Without it the handler sees every entity.
    pub fn entities<I, S>(self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        self.with_current("entities", |spec| spec.entities = Some(names))
    }

    /// The last handler's priority: lower runs first; the default is 100.
    pub fn priority(self, priority: i32) -> Self {
        self.with_current("priority", |spec| spec.priority = priority)
    }

    /// How long the bus waits for the last handler to answer one delivery, or
    /// the host for the last API route to answer one request (else HTTP 504);
    /// default 5 s, whole milliseconds. For a task, see
    /// [`task_timeout`](Self::task_timeout).
    pub fn timeout(self, timeout: Duration) -> Self {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.current {
            Current::Route(_) => self.with_current_route("timeout", |spec| spec.timeout_ms = ms),
            Current::Task(i) => {
                let problem = format!(
                    "timeout() applies to hook handlers and API routes; task '{}' takes task_timeout()",
                    self.manifest.tasks[i].name
                );
                self.reject_option(problem)
            }
            _ => self.with_current("timeout", |spec| spec.timeout_ms = ms),
        }
    }

    /// The last handler's retry schedule: the waits in milliseconds before each
    /// retry; after the last, the delivery is dead-lettered. `[]` dead-letters on
    /// the first failure. Default `[100, 500, 2000, 10000]`.
    pub fn retry_backoff_ms(self, waits: impl IntoIterator<Item = u64>) -> Self {
        let waits: Vec<u64> = waits.into_iter().collect();
        self.with_current("retry_backoff_ms", |spec| spec.retry_backoff_ms = waits)
    }

    /// As [`retry_backoff_ms`](Self::retry_backoff_ms), with durations.
    pub fn retry_backoff(self, waits: impl IntoIterator<Item = Duration>) -> Self {
        self.retry_backoff_ms(
            waits
                .into_iter()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
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
    /// the plugin's one NATS service); tasks with a bad name or offset; options
    /// given to the wrong kind of declaration.
    pub fn build(self) -> Result<Plugin, ManifestError> {
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
    fn options_apply_to_the_last_handler_in_order() {
        let plugin = Plugin::builder("p", "P", "1.0.0")
            .on_entry("after_create_entry_v2", "a", ok)
            .entities(["customer"])
            .priority(10)
            .on_entity(Hook::EntityAfterDelete, "b", ok)
            .timeout(Duration::from_millis(250))
            .retry_backoff_ms([50, 100])
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
    fn wrong_hooks_are_reported_together() {
        let err = Plugin::builder("p", "P", "1.0.0")
            .priority(1)
            .on_entry("entry.after_creat", "a", ok)
            .priority(5)
            .on_entry(Hook::EntityAfterCreate, "b", ok)
            .on_entry(Hook::EntryValidate, "c", ok)
            .build()
            .expect_err("invalid plugin");
        let msg = err.to_string();
        for needle in [
            "priority() was called before any handler",
            "unknown hook 'entry.after_creat' (did you mean 'entry.after_create'?)",
            "'entity.after_create' is an entity hook; on_entry takes entry hooks",
            "'entry.validate' is a synchronous hook (Validate); on_entry takes notification hooks (after_*); use on_validate for it",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
        assert_eq!(err.plugin.as_deref(), Some("p"));
    }
}
