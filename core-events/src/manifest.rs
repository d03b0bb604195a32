//! Plugin manifests: what a plugin declares about itself and its handlers.
//!
//! A manifest is stored as JSON in the registry KV bucket under `plugins.<id>`.
//! [`PluginManifest::from_json`] is the one way to read one: it parses and checks
//! everything, and reports every problem at once.

use std::collections::HashSet;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::hook::{Hook, HookKind};
use crate::subject::{check_entity_name, check_token_name};

/// Default handler priority (Pagoda's): lower runs first.
pub const DEFAULT_PRIORITY: i32 = 100;
/// Default time a handler has to answer one delivery.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Default retry schedule: the waits before the 2nd, 3rd, … attempt. After the
/// last one fails the delivery is dead-lettered.
pub const DEFAULT_RETRY_BACKOFF_MS: [u64; 4] = [100, 500, 2_000, 10_000];
/// Allowed priority range.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1_000_000..=1_000_000;
/// Allowed handler timeout range, in milliseconds.
pub const TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 1..=600_000;
/// Most retries a schedule may hold.
pub const MAX_RETRIES: usize = 32;
/// Longest single wait in a retry schedule, in milliseconds.
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Longest plugin id, in characters (ASCII). The id becomes a NATS service
/// name, part of consumer and user names, of subjects and of KV keys; 64 keeps
/// every one of them well inside NATS's limits (255 for a consumer name).
pub const MAX_PLUGIN_ID_LEN: usize = 64;

/// A plugin and its handlers, as registered in the registry bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = require_identity)]
pub struct PluginManifest {
    /// Plugin id: letters, digits, `-` and `_`, at most 64 characters
    /// (`MAX_PLUGIN_ID_LEN`). Also the NATS service name and the queue group of
    /// its endpoints.
    // Defaulted for serde so that a missing one is reported by `validate` with
    // the others; required in the schema (`require_identity`), as the bus
    // requires it.
    #[serde(default)]
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub name: String,
    /// Semantic version (`1.2.3`), as the NATS Services API requires.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub version: String,
    /// What the plugin does.
    #[serde(default)]
    pub description: String,
    /// Who wrote it.
    #[serde(default)]
    pub author: String,
    /// Handlers, in declaration order (the last tie-breaker of dispatch order).
    #[serde(default)]
    pub handlers: Vec<HandlerSpec>,
    /// HTTP routes the host serves under `/api/v2/plugins/<id>/…`, forwarded to the
    /// plugin over request/reply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api: Vec<ApiRouteSpec>,
    /// Tasks the host can start as jobs; each gets the operation id `range start + offset`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskSpec>,
}

/// The manifest schema's `required`: `id`, `name` and `version`, which
/// [`PluginManifest::validate`] requires (serde defaults them only so that every
/// missing one is reported together).
fn require_identity(schema: &mut schemars::Schema) {
    schema.insert(
        "required".to_owned(),
        serde_json::json!(["id", "name", "version"]),
    );
}

/// HTTP methods a plugin API route may declare.
pub const API_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
/// Longest route path accepted, in bytes.
pub const MAX_API_PATH_BYTES: usize = 512;
/// Largest task offset (Pagoda's plugin operation ids end at 9999).
pub const MAX_TASK_OFFSET: u32 = 9_799;

/// One plugin API route: the host answers `<method> /api/v2/plugins/<plugin-id><path>`
/// by calling the plugin's endpoint `<prefix>.api.<plugin-id>.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiRouteSpec {
    /// Route name, unique in the plugin: letters, digits, `-` and `_`.
    pub name: String,
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The path below the plugin's prefix: starts with `/`; a last segment `*`
    /// matches any rest (`/items/*`); segments `{name}` match one segment.
    pub path: String,
    /// `true` lets requests without a token through; by default (Pagoda's) only
    /// authenticated users reach the plugin.
    #[serde(default)]
    pub public: bool,
    /// Milliseconds the plugin has to answer (else 504).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl ApiRouteSpec {
    /// A route for authenticated users with the default timeout.
    pub fn new(name: impl Into<String>, method: &str, path: impl Into<String>) -> Self {
        ApiRouteSpec {
            name: name.into(),
            method: method.to_ascii_uppercase(),
            path: path.into(),
            public: false,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }

    /// Whether the route answers `method path` (path below the plugin prefix).
    /// Trailing slashes are ignored.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if !self.method.eq_ignore_ascii_case(method) {
            return false;
        }
        let want: Vec<&str> = self.path.split('/').filter(|s| !s.is_empty()).collect();
        let got: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut i = 0;
        for (n, seg) in want.iter().enumerate() {
            if *seg == "*" && n + 1 == want.len() {
                return true;
            }
            match got.get(i) {
                Some(g) if seg.starts_with('{') && seg.ends_with('}') && !g.is_empty() => {}
                Some(g) if g == seg => {}
                _ => return false,
            }
            i += 1;
        }
        i == got.len()
    }

    /// The route timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// One task a plugin runs as a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Task name, unique in the plugin: letters, digits, `-` and `_`. Jobs are
    /// queued on `<prefix>.jobs.<plugin-id>.<name>`.
    pub name: String,
    /// Offset in the plugin's operation-id range (`PLUGIN_OPERATION_ID_CONFIG`).
    pub offset: u32,
    /// What the task does.
    #[serde(default)]
    pub description: String,
    /// Whether a running job may be cancelled (it sees the cancel through the SDK).
    #[serde(default = "default_true")]
    pub cancellable: bool,
    /// Seconds a job may stay PROCESSING without a heartbeat before it is marked
    /// TIMEOUT; `0` for no limit.
    #[serde(default)]
    pub timeout_secs: u64,
}

fn default_true() -> bool {
    true
}

impl TaskSpec {
    /// A cancellable task without a time limit.
    pub fn new(name: impl Into<String>, offset: u32) -> Self {
        TaskSpec {
            name: name.into(),
            offset,
            description: String::new(),
            cancellable: true,
            timeout_secs: 0,
        }
    }
}

/// One handler: a hook, an entity filter, a priority and its delivery policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    /// Handler name, unique in the plugin: letters, digits, `-` and `_`. Its endpoint
    /// subject is `<prefix>.hooks.<plugin-id>.<name>`.
    pub name: String,
    /// The hook (standard name or legacy alias).
    pub hook: Hook,
    /// Entity names the handler is for (exact, case-sensitive); absent or `null` for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    /// Lower runs first. Ties: the plugin's position in `ENABLED_PLUGINS`, then
    /// declaration order.
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Milliseconds the handler has to answer one delivery.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Waits in milliseconds before each retry of a failed delivery; the delivery is
    /// dead-lettered after the last. `[]` dead-letters on the first failure.
    #[serde(default = "default_backoff")]
    pub retry_backoff_ms: Vec<u64>,
    /// Synchronous hooks only: what a caller does when the handler does not
    /// answer (no replica, timeout, handler error, bad reply). Absent: the
    /// hook kind's default ([`OnUnavailable::default_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_unavailable: Option<OnUnavailable>,
}

/// What the caller of a synchronous hook does when a handler gives no answer
/// (no replica running, no reply within `timeout_ms`, a handler error, a reply
/// it cannot read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// The change (or read) fails, naming the plugin, handler and reason.
    Block,
    /// The handler is left out (logged, and reported to the caller as skipped).
    Skip,
}

impl OnUnavailable {
    /// The default by hook kind: `block` for validate and before-hooks, `skip`
    /// for get_attrs (notifications do not use it: they are retried).
    pub fn default_for(kind: HookKind) -> OnUnavailable {
        match kind {
            HookKind::GetAttrs | HookKind::Notification => OnUnavailable::Skip,
            HookKind::Validate | HookKind::BeforeModify | HookKind::BeforeVeto => {
                OnUnavailable::Block
            }
        }
    }

    /// `block` or `skip`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Block => "block",
            OnUnavailable::Skip => "skip",
        }
    }
}

fn default_priority() -> i32 {
    DEFAULT_PRIORITY
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_backoff() -> Vec<u64> {
    DEFAULT_RETRY_BACKOFF_MS.to_vec()
}

impl HandlerSpec {
    /// A handler with the default priority, timeout and retry schedule, for all entities.
    pub fn new(name: impl Into<String>, hook: Hook) -> Self {
        HandlerSpec {
            name: name.into(),
            hook,
            entities: None,
            priority: DEFAULT_PRIORITY,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            retry_backoff_ms: default_backoff(),
            on_unavailable: None,
        }
    }

    /// The handler's policy when it gives no answer: its `on_unavailable`, or
    /// the default of its hook's kind.
    pub fn on_unavailable(&self) -> OnUnavailable {
        self.on_unavailable
            .unwrap_or_else(|| OnUnavailable::default_for(self.hook.kind()))
    }

    /// True when the handler's entity filter admits `entity`.
    pub fn matches_entity(&self, entity: &str) -> bool {
        self.entities
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == entity))
    }

    /// The handler timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The retry schedule as durations.
    pub fn retry_schedule(&self) -> Vec<Duration> {
        self.retry_backoff_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect()
    }
}

/// Everything wrong with a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plugin manifest{}: {}", plugin_label(.plugin), .problems.join("; "))]
pub struct ManifestError {
    /// The plugin id, when the manifest had a usable one.
    pub plugin: Option<String>,
    /// Each problem, in a sentence.
    pub problems: Vec<String>,
}

fn plugin_label(plugin: &Option<String>) -> String {
    plugin
        .as_ref()
        .map(|id| format!(" for '{id}'"))
        .unwrap_or_default()
}

impl PluginManifest {
    /// A manifest with no handlers.
    pub fn new(id: impl Into<String>, name: impl Into<String>, version: impl Into<String>) -> Self {
        PluginManifest {
            id: id.into(),
            name: name.into(),
            version: version.into(),
            description: String::new(),
            author: String::new(),
            handlers: Vec::new(),
            api: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// Parses and validates a manifest from JSON.
    ///
    /// # Errors
    ///
    /// [`ManifestError`] listing every problem: JSON that does not fit the format
    /// (including unknown hook names, with a suggestion), and everything
    /// [`PluginManifest::validate`] finds.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError {
                plugin: None,
                problems: vec![format!(
                    "manifest is {} bytes; the limit is {MAX_MANIFEST_BYTES}",
                    bytes.len()
                )],
            });
        }
        let manifest: PluginManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError {
                plugin: None,
                problems: vec![format!("manifest is not valid: {e}")],
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the manifest: Pagoda's id/name/version rules, handler names, entity
    /// filters, priorities, timeouts and retry schedules.
    ///
    /// # Errors
    ///
    /// [`ManifestError`] listing every problem found.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut problems = Vec::new();
        if self.id.is_empty() {
            problems.push("Plugin ID is required".to_owned());
        } else if check_token_name("plugin id", &self.id).is_err() {
            problems.push(
                "Plugin ID must contain only alphanumeric characters, hyphens, and underscores"
                    .to_owned(),
            );
        } else if self.id.len() > MAX_PLUGIN_ID_LEN {
            problems.push(format!(
                "Plugin ID is {} characters long; at most {MAX_PLUGIN_ID_LEN} are allowed",
                self.id.len()
            ));
        }
        if self.name.trim().is_empty() {
            problems.push("Plugin name is required".to_owned());
        }
        if self.version.is_empty() {
            problems.push("Plugin version is required".to_owned());
        } else if !is_semver(&self.version) {
            problems.push(format!(
                "Plugin version '{}' must be a semantic version such as 1.0.0",
                self.version
            ));
        }
        let mut seen = HashSet::new();
        for (i, h) in self.handlers.iter().enumerate() {
            let label = if h.name.is_empty() {
                format!("handler #{}", i + 1)
            } else {
                format!("handler '{}'", h.name)
            };
            if let Err(e) = check_token_name("handler name", &h.name) {
                problems.push(format!("{label}: {e}"));
            } else if !seen.insert(h.name.as_str()) {
                problems.push(format!("{label}: the name is used by another handler"));
            }
            if let Some(entities) = &h.entities {
                if entities.is_empty() {
                    problems.push(format!(
                        "{label}: entities is an empty list, which matches nothing; leave it out to match all entities"
                    ));
                }
                for e in entities {
                    if let Err(err) = check_entity_name(e) {
                        problems.push(format!("{label}: {err}"));
                    }
                }
            }
            if !PRIORITY_RANGE.contains(&h.priority) {
                problems.push(format!(
                    "{label}: priority {} is outside {}..={}",
                    h.priority,
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                ));
            }
            if !TIMEOUT_RANGE_MS.contains(&h.timeout_ms) {
                problems.push(format!(
                    "{label}: timeout_ms {} is outside {}..={}",
                    h.timeout_ms,
                    TIMEOUT_RANGE_MS.start(),
                    TIMEOUT_RANGE_MS.end()
                ));
            }
            if h.retry_backoff_ms.len() > MAX_RETRIES {
                problems.push(format!(
                    "{label}: retry_backoff_ms has {} entries; at most {MAX_RETRIES}",
                    h.retry_backoff_ms.len()
                ));
            }
            if let Some(ms) = h.retry_backoff_ms.iter().find(|ms| **ms > MAX_BACKOFF_MS) {
                problems.push(format!(
                    "{label}: retry wait {ms} ms is longer than {MAX_BACKOFF_MS} ms"
                ));
            }
            if h.on_unavailable.is_some() && h.hook.kind().is_notification() {
                problems.push(format!(
                    "{label}: on_unavailable applies to synchronous hooks only; '{}' is a notification (failures are retried, then dead-lettered)",
                    h.hook
                ));
            }
        }
        self.validate_api(&mut problems);
        self.validate_tasks(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ManifestError {
                plugin: check_token_name("plugin id", &self.id)
                    .is_ok()
                    .then(|| self.id.clone()),
                problems,
            })
        }
    }

    fn validate_api(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        for (i, r) in self.api.iter().enumerate() {
            let label = if r.name.is_empty() {
                format!("api route #{}", i + 1)
            } else {
                format!("api route '{}'", r.name)
            };
            if let Err(e) = check_token_name("api route name", &r.name) {
                problems.push(format!("{label}: {e}"));
            } else if !seen.insert(r.name.as_str()) {
                problems.push(format!("{label}: the name is used by another api route"));
            }
            if !API_METHODS.contains(&r.method.as_str()) {
                problems.push(format!(
                    "{label}: method '{}' is not one of {}",
                    r.method,
                    API_METHODS.join(", ")
                ));
            }
            if !r.path.starts_with('/') {
                problems.push(format!("{label}: path '{}' must start with '/'", r.path));
            } else if r.path.len() > MAX_API_PATH_BYTES {
                problems.push(format!(
                    "{label}: path is {} bytes; at most {MAX_API_PATH_BYTES}",
                    r.path.len()
                ));
            } else if r
                .path
                .chars()
                .any(|c| c.is_whitespace() || c == '?' || c == '#')
            {
                problems.push(format!(
                    "{label}: path '{}' may not contain whitespace, '?' or '#'",
                    r.path
                ));
            } else if let Some(pos) = r.path.find('*')
                && (pos + 1 != r.path.len() || !r.path.ends_with("/*"))
            {
                problems.push(format!(
                    "{label}: path '{}' may use '*' only as its whole last segment",
                    r.path
                ));
            }
            if !TIMEOUT_RANGE_MS.contains(&r.timeout_ms) {
                problems.push(format!(
                    "{label}: timeout_ms {} is outside {}..={}",
                    r.timeout_ms,
                    TIMEOUT_RANGE_MS.start(),
                    TIMEOUT_RANGE_MS.end()
                ));
            }
        }
    }

    fn validate_tasks(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        for (i, t) in self.tasks.iter().enumerate() {
            let label = if t.name.is_empty() {
                format!("task #{}", i + 1)
            } else {
                format!("task '{}'", t.name)
            };
            if let Err(e) = check_token_name("task name", &t.name) {
                problems.push(format!("{label}: {e}"));
            } else if !seen.insert(t.name.as_str()) {
                problems.push(format!("{label}: the name is used by another task"));
            }
            if t.offset > MAX_TASK_OFFSET {
                problems.push(format!(
                    "{label}: offset {} is larger than {MAX_TASK_OFFSET}",
                    t.offset
                ));
            }
        }
    }

    /// The API route answering `method path` (below the plugin prefix), if any.
    pub fn api_route(&self, method: &str, path: &str) -> Option<&ApiRouteSpec> {
        self.api.iter().find(|r| r.matches(method, path))
    }

    /// The task called `name`, if declared.
    pub fn task(&self, name: &str) -> Option<&TaskSpec> {
        self.tasks.iter().find(|t| t.name == name)
    }

    /// The registry key of this plugin: `plugins.<id>`.
    pub fn registry_key(&self) -> String {
        registry_key(&self.id)
    }
}

/// The registry key of a plugin: `plugins.<id>`.
pub fn registry_key(plugin_id: &str) -> String {
    format!("plugins.{plugin_id}")
}

/// `MAJOR.MINOR.PATCH` with optional `-pre` and `+build` parts (Semantic
/// Versioning 2.0.0, as the `semver` crate reads it).
fn is_semver(v: &str) -> bool {
    semver::Version::parse(v).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_manifest_parses_with_defaults() {
        let m = PluginManifest::from_json(
            br#"{"id":"hello-world","name":"Hello","version":"1.0.0",
                "handlers":[{"name":"greet","hook":"after_create_entry_v2","entities":["helloworld"]}]}"#,
        )
        .unwrap();
        let h = &m.handlers[0];
        assert_eq!(h.hook, Hook::EntryAfterCreate);
        assert_eq!(h.priority, 100);
        assert_eq!(h.timeout_ms, 5_000);
        assert_eq!(h.retry_backoff_ms, DEFAULT_RETRY_BACKOFF_MS);
        assert!(h.matches_entity("helloworld"));
        assert!(!h.matches_entity("HelloWorld"));
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"entry.after_create\""), "{json}");
    }

    #[test]
    fn pagoda_messages_for_missing_fields() {
        let err = PluginManifest::from_json(br#"{}"#).unwrap_err();
        assert_eq!(
            err.problems,
            [
                "Plugin ID is required",
                "Plugin name is required",
                "Plugin version is required"
            ]
        );
        let err =
            PluginManifest::from_json(br#"{"id":"bad id!","name":"x","version":"1"}"#).unwrap_err();
        assert!(
            err.problems.contains(
                &"Plugin ID must contain only alphanumeric characters, hyphens, and underscores"
                    .to_owned()
            )
        );
        assert!(err.problems.iter().any(|p| p.contains("semantic version")));
    }

    #[test]
    fn unknown_hooks_and_bad_handlers_are_named() {
        let err = PluginManifest::from_json(
            br#"{"id":"p","name":"P","version":"1.0.0","handlers":[{"name":"h","hook":"entry.after_creat"}]}"#,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("did you mean 'entry.after_create'"), "{msg}");

        let err = PluginManifest::from_json(
            br#"{"id":"p","name":"P","version":"1.0.0","handlers":[
                {"name":"h","hook":"entry.after_create","priority":5000000},
                {"name":"h","hook":"entry.after_create","entities":[]},
                {"name":"a.b","hook":"entry.after_create","timeout_ms":0,"entities":[""]}]}"#,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("invalid plugin manifest for 'p'"), "{msg}");
        for needle in [
            "priority 5000000 is outside",
            "name is used by another handler",
            "entities is an empty list",
            "handler name 'a.b' is invalid",
            "timeout_ms 0 is outside",
            "entity name is empty",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }

        let err = PluginManifest::from_json(
            br#"{"id":"p","name":"P","version":"1.0.0","handlers":[{"name":"h","hook":"entry.after_create","priority":"high"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        assert!(PluginManifest::from_json(b"not json").is_err());
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(
            PluginManifest::from_json(&big)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
    }

    #[test]
    fn on_unavailable_defaults_by_kind() {
        let m = PluginManifest::from_json(
            br#"{"id":"p","name":"P","version":"1.0.0","handlers":[
                {"name":"v","hook":"validate_entry"},
                {"name":"g","hook":"entry.get_attrs"},
                {"name":"b","hook":"entity.before_update","on_unavailable":"skip"}]}"#,
        )
        .unwrap();
        assert_eq!(m.handlers[0].on_unavailable(), OnUnavailable::Block);
        assert_eq!(m.handlers[1].on_unavailable(), OnUnavailable::Skip);
        assert_eq!(m.handlers[2].on_unavailable(), OnUnavailable::Skip);
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("\"on_unavailable\":\"block\""), "{json}");
        let err = PluginManifest::from_json(
            br#"{"id":"p","name":"P","version":"1.0.0","handlers":[
                {"name":"n","hook":"entry.after_create","on_unavailable":"block"}]}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("on_unavailable applies to synchronous hooks only"),
            "{err}"
        );
    }

    #[test]
    fn plugin_ids_are_limited_in_length() {
        let manifest = |id: &str| {
            PluginManifest::from_json(
                format!(r#"{{"id":"{id}","name":"P","version":"1.0.0"}}"#).as_bytes(),
            )
        };
        assert!(manifest(&"p".repeat(MAX_PLUGIN_ID_LEN)).is_ok());
        let err = manifest(&"p".repeat(300)).unwrap_err();
        assert_eq!(
            err.problems,
            ["Plugin ID is 300 characters long; at most 64 are allowed"]
        );
        // The schema shows the same limit.
        let schema = serde_json::to_value(schemars::schema_for!(PluginManifest)).unwrap();
        assert_eq!(
            schema["properties"]["id"]["maxLength"],
            serde_json::json!(MAX_PLUGIN_ID_LEN)
        );
    }

    #[test]
    fn semver_check() {
        for ok in ["1.0.0", "0.1.2-beta.1", "10.20.30+build.5"] {
            assert!(is_semver(ok), "{ok}");
        }
        for bad in ["1", "1.0", "1.0.x", "v1.0.0", "1..0", "1.0.0 "] {
            assert!(!is_semver(bad), "{bad}");
        }
    }
}
