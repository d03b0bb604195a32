//! The live registry: plugin manifests in the registry KV bucket, watched by the
//! bus and turned into a routing table.
//!
//! A bad manifest is rejected with a clear error (logged, and shown by
//! [`RoutingTable::rejected`]) while every other plugin keeps working; a plugin
//! whose new manifest is bad keeps its last good one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use core_events::manifest::registry_key;
use core_events::{Hook, PluginManifest, Subjects};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One handler as the dispatcher calls it.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Plugin id (also the queue group).
    pub plugin: Arc<str>,
    /// Handler name.
    pub handler: Arc<str>,
    /// The handler's endpoint subject.
    pub subject: Arc<str>,
    /// The hook it handles.
    pub hook: Hook,
    /// Entity filter (`None` = all entities).
    pub entities: Option<Arc<[String]>>,
    /// Lower runs first.
    pub priority: i32,
    /// The plugin's position in `ENABLED_PLUGINS` (second sort key).
    pub plugin_rank: usize,
    /// Declaration order in its manifest (third sort key).
    pub declared: usize,
    /// Time the handler has for one attempt.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Waits before each retry; dead-lettered after the last.
    #[serde(skip)]
    pub retry: Arc<[Duration]>,
    /// Synchronous hooks: block or skip when the handler gives no answer (the
    /// manifest's `on_unavailable`, or the hook kind's default).
    pub on_unavailable: core_events::OnUnavailable,
    /// The handler's stats, looked up once per routing table (keeps the lookup off
    /// the delivery path).
    #[serde(skip)]
    pub(crate) stats: std::sync::OnceLock<Arc<crate::stats::HandlerStats>>,
}

mod millis {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl Route {
    /// True when the handler's entity filter admits `entity`.
    pub fn matches(&self, entity: &str) -> bool {
        self.entities
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == entity))
    }
}

/// A registered plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginEntry {
    /// Its manifest (the last valid one).
    pub manifest: PluginManifest,
    /// Its position in `ENABLED_PLUGINS`, or `None` when not enabled (not dispatched to).
    pub enabled_rank: Option<usize>,
    /// KV revision of the manifest.
    pub revision: u64,
}

/// A snapshot of the registry: who is registered and, per hook, the handlers in
/// dispatch order.
#[derive(Debug, Default, Serialize)]
pub struct RoutingTable {
    plugins: BTreeMap<String, PluginEntry>,
    rejected: BTreeMap<String, String>,
    #[serde(skip)]
    routes: HashMap<Hook, Vec<Arc<Route>>>,
    #[serde(skip)]
    by_name: HashMap<(Arc<str>, Arc<str>), Arc<Route>>,
}

impl RoutingTable {
    /// Builds the table. Handlers of enabled plugins only, sorted by priority, then
    /// the plugin's position in `enabled`, then declaration order.
    pub fn build(
        subjects: &Subjects,
        manifests: impl IntoIterator<Item = (PluginManifest, u64)>,
        rejected: BTreeMap<String, String>,
        enabled: &[String],
    ) -> Self {
        let mut plugins = BTreeMap::new();
        let mut routes: HashMap<Hook, Vec<Arc<Route>>> = HashMap::new();
        let mut by_name = HashMap::new();
        for (manifest, revision) in manifests {
            let rank = enabled.iter().position(|p| *p == manifest.id);
            if let Some(plugin_rank) = rank {
                let plugin: Arc<str> = manifest.id.as_str().into();
                for (declared, h) in manifest.handlers.iter().enumerate() {
                    let route = Arc::new(Route {
                        plugin: plugin.clone(),
                        handler: h.name.as_str().into(),
                        subject: subjects.handler(&manifest.id, &h.name).into(),
                        hook: h.hook,
                        entities: h.entities.as_ref().map(|e| e.clone().into()),
                        priority: h.priority,
                        plugin_rank,
                        declared,
                        timeout: h.timeout(),
                        retry: h.retry_schedule().into(),
                        on_unavailable: h.on_unavailable(),
                        stats: std::sync::OnceLock::new(),
                    });
                    by_name.insert((route.plugin.clone(), route.handler.clone()), route.clone());
                    routes.entry(h.hook).or_default().push(route);
                }
            }
            plugins.insert(
                manifest.id.clone(),
                PluginEntry {
                    manifest,
                    enabled_rank: rank,
                    revision,
                },
            );
        }
        for list in routes.values_mut() {
            list.sort_by_key(|r| (r.priority, r.plugin_rank, r.declared));
        }
        RoutingTable {
            plugins,
            rejected,
            routes,
            by_name,
        }
    }

    /// The handlers for an event, in dispatch order.
    pub fn matching<'a>(
        &'a self,
        hook: Hook,
        entity: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Route>> + 'a {
        self.routes
            .get(&hook)
            .into_iter()
            .flatten()
            .filter(move |r| r.matches(entity))
    }

    /// Every handler of enabled plugins for `hook`, whatever their entity filter, in
    /// dispatch order.
    pub fn handlers(&self, hook: Hook) -> &[Arc<Route>] {
        self.routes.get(&hook).map_or(&[], Vec::as_slice)
    }

    /// A handler by plugin and name, if its plugin is enabled and declares it.
    pub fn route(&self, plugin: &str, handler: &str) -> Option<&Arc<Route>> {
        self.by_name.get(&(Arc::from(plugin), Arc::from(handler)))
    }

    /// Registered plugins (valid manifests), by id.
    pub fn plugins(&self) -> &BTreeMap<String, PluginEntry> {
        &self.plugins
    }

    /// Registry keys whose latest manifest was rejected, with the reason.
    pub fn rejected(&self) -> &BTreeMap<String, String> {
        &self.rejected
    }

    /// True when `plugin` is registered and enabled.
    pub fn is_enabled(&self, plugin: &str) -> bool {
        self.enabled_plugin(plugin).is_some()
    }

    /// The entry of `plugin` when it is registered and enabled.
    pub fn enabled_plugin(&self, plugin: &str) -> Option<&PluginEntry> {
        self.plugins
            .get(plugin)
            .filter(|p| p.enabled_rank.is_some())
    }
}

/// A problem starting the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The registry bucket is missing or cannot be read.
    #[error("registry bucket '{bucket}' cannot be read: {source}")]
    Bucket {
        /// Bucket name.
        bucket: String,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
}

/// A live view of the registry. Cheap to clone; [`Registry::table`] is a lock-free
/// snapshot read, so the dispatcher never asks KV per event.
#[derive(Debug, Clone)]
pub struct Registry {
    rx: watch::Receiver<Arc<RoutingTable>>,
}

impl Registry {
    /// Loads every manifest in the bucket, then keeps watching it until `shutdown`.
    /// Returns once the initial state is loaded, so no event is dispatched against
    /// an empty table.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Bucket`] when the bucket cannot be opened or watched.
    pub async fn start(
        js: &jetstream::Context,
        subjects: Subjects,
        enabled: Vec<String>,
        shutdown: CancellationToken,
    ) -> Result<(Registry, tokio::task::JoinHandle<()>), RegistryError> {
        let bucket = subjects.registry_bucket();
        let err = |e: async_nats::Error| RegistryError::Bucket {
            bucket: bucket.clone(),
            source: e,
        };
        let store = js.get_key_value(&bucket).await.map_err(|e| err(e.into()))?;
        let mut watch = store
            .watch_with_history(">")
            .await
            .map_err(|e| err(e.into()))?;
        let initially_empty = store.status().await.map_err(|e| err(e.into()))?.values() == 0;

        let mut state = State {
            subjects,
            enabled,
            manifests: BTreeMap::new(),
            rejected: BTreeMap::new(),
        };
        if !initially_empty {
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| err(e.into()))?;
                let done = entry.delta == 0;
                state.apply(&entry);
                if done {
                    break;
                }
            }
        }
        let (tx, rx) = watch::channel(Arc::new(state.table()));
        tracing::info!(
            plugins = state.manifests.len(),
            rejected = state.rejected.len(),
            "registry loaded"
        );
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => {
                            state.apply(&entry);
                            tx.send_replace(Arc::new(state.table()));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "registry watch error; continuing");
                        }
                        None => {
                            tracing::error!("registry watch ended; the routing table is frozen");
                            break;
                        }
                    }
                }
            }
        });
        Ok((Registry { rx }, task))
    }

    /// The current routing table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.rx.borrow().clone()
    }

    /// Waits until `pred` holds for the table, or `timeout` passes.
    ///
    /// # Errors
    ///
    /// `Err(())` on timeout or when the registry stopped.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&RoutingTable) -> bool,
    ) -> Result<(), ()> {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|t| pred(t)))
            .await
            .map_err(|_| ())?
            .map(|_| ())
            .map_err(|_| ())
    }
}

struct State {
    subjects: Subjects,
    enabled: Vec<String>,
    manifests: BTreeMap<String, (PluginManifest, u64)>,
    rejected: BTreeMap<String, String>,
}

impl State {
    fn apply(&mut self, entry: &kv::Entry) {
        let key = entry.key.as_str();
        let Some(id) = key.strip_prefix("plugins.") else {
            return;
        };
        match entry.operation {
            kv::Operation::Put => match PluginManifest::from_json(&entry.value) {
                Ok(m) if registry_key(&m.id) == key => {
                    tracing::info!(plugin = %m.id, version = %m.version, handlers = m.handlers.len(), revision = entry.revision, "plugin registered");
                    self.rejected.remove(key);
                    self.manifests.insert(id.to_owned(), (m, entry.revision));
                }
                Ok(m) => self.reject(
                    key,
                    format!(
                        "manifest for plugin '{}' is stored under '{key}'; it belongs under '{}'",
                        m.id,
                        registry_key(&m.id)
                    ),
                ),
                Err(e) => self.reject(key, e.to_string()),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                tracing::info!(plugin = %id, "plugin unregistered");
                self.manifests.remove(id);
                self.rejected.remove(key);
            }
        }
    }

    fn reject(&mut self, key: &str, reason: String) {
        let kept = self
            .manifests
            .contains_key(key.trim_start_matches("plugins."));
        tracing::error!(key, %reason, kept_previous = kept, "rejected plugin manifest");
        self.rejected.insert(key.to_owned(), reason);
    }

    fn table(&self) -> RoutingTable {
        RoutingTable::build(
            &self.subjects,
            self.manifests.values().cloned(),
            self.rejected.clone(),
            &self.enabled,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_events::HandlerSpec;

    fn plugin(id: &str, handlers: &[(&str, Hook, Option<&str>, i32)]) -> (PluginManifest, u64) {
        let mut m = PluginManifest::new(id, id, "1.0.0");
        for (name, hook, entity, priority) in handlers {
            let mut h = HandlerSpec::new(*name, *hook);
            h.entities = entity.map(|e| vec![e.to_owned()]);
            h.priority = *priority;
            m.handlers.push(h);
        }
        (m, 1)
    }

    fn order(table: &RoutingTable, entity: &str) -> Vec<String> {
        table
            .matching(Hook::EntryAfterCreate, entity)
            .map(|r| format!("{}:{}", r.plugin, r.handler))
            .collect()
    }

    #[test]
    fn seed_scenario_order() {
        let subjects = Subjects::default();
        let table = RoutingTable::build(
            &subjects,
            [
                plugin("c", &[("h", Hook::EntryAfterCreate, Some("customer"), 150)]),
                plugin("a", &[("h", Hook::EntryAfterCreate, Some("customer"), 50)]),
                plugin("b", &[("h", Hook::EntryAfterCreate, None, 100)]),
                plugin("d", &[("h", Hook::EntryAfterCreate, None, 100)]),
                plugin("off", &[("h", Hook::EntryAfterCreate, None, 1)]),
            ],
            BTreeMap::new(),
            &["d".into(), "c".into(), "b".into(), "a".into()],
        );
        assert_eq!(order(&table, "customer"), ["a:h", "d:h", "b:h", "c:h"]);
        assert_eq!(order(&table, "product"), ["d:h", "b:h"]);
        assert!(!table.is_enabled("off"));
        assert!(table.plugins().contains_key("off"));
        assert!(table.route("b", "h").is_some());
        assert!(table.route("off", "h").is_none());
    }

    #[test]
    fn declaration_order_breaks_last_ties() {
        let table = RoutingTable::build(
            &Subjects::default(),
            [plugin(
                "p",
                &[
                    ("second", Hook::EntryAfterCreate, None, 100),
                    ("first", Hook::EntryAfterCreate, None, 100),
                    ("early", Hook::EntryAfterCreate, None, 10),
                ],
            )],
            BTreeMap::new(),
            &["p".into()],
        );
        assert_eq!(order(&table, "x"), ["p:early", "p:second", "p:first"]);
    }
}
