//! `hookbus registry ls|show`: plugins as the running bus sees them, handlers in
//! effective order per hook (and entity), enabled or not, replicas alive.

use std::collections::BTreeMap;
use std::io::Write;

use core_events::{Hook, PluginManifest};
use serde::Deserialize;

use super::{Ops, OpsError, ago, cut};
use crate::monitor::BusHealth;
use crate::registry::RoutingTable;

/// The bus's answer on `<prefix>.bus.registry`.
#[derive(Debug, Clone, Deserialize)]
pub struct RegistryView {
    /// Registered plugins.
    pub plugins: BTreeMap<String, PluginView>,
    /// Rejected manifests: registry key → reason.
    #[serde(default)]
    pub rejected: BTreeMap<String, String>,
}

/// One registered plugin.
#[derive(Debug, Clone, Deserialize)]
pub struct PluginView {
    /// Its manifest.
    pub manifest: PluginManifest,
    /// Position in `ENABLED_PLUGINS` (`None`: not enabled).
    pub enabled_rank: Option<usize>,
    /// KV revision.
    pub revision: u64,
}

impl RegistryView {
    /// The routing table the bus built from this view (same order rules).
    pub fn table(&self, ops: &Ops) -> RoutingTable {
        let len = self
            .plugins
            .values()
            .filter_map(|p| p.enabled_rank)
            .max()
            .map_or(0, |m| m + 1);
        // Placeholders for enabled plugins that are not registered.
        let mut enabled = vec![String::from("\u{0}"); len];
        for (id, p) in &self.plugins {
            if let Some(r) = p.enabled_rank {
                enabled[r] = id.clone();
            }
        }
        RoutingTable::build(
            &ops.subjects,
            self.plugins
                .values()
                .map(|p| (p.manifest.clone(), p.revision)),
            self.rejected.clone(),
            &enabled,
        )
    }
}

/// Fetches the registry from the running bus.
///
/// # Errors
///
/// [`OpsError::NoBus`] when no bus answers.
pub async fn fetch(ops: &Ops) -> Result<RegistryView, OpsError> {
    ops.ask_bus("registry").await
}

/// Options of `registry ls`.
#[derive(Debug, Clone, Default)]
pub struct LsOptions {
    /// Only this hook's handler order.
    pub hook: Option<Hook>,
    /// The order for events about this entity (default: every handler, with its filter).
    pub entity: Option<String>,
    /// The bus's JSON, plus replicas per plugin.
    pub json: bool,
}

fn status(view: &PluginView, replicas: Option<usize>, degraded: bool) -> &'static str {
    match (view.enabled_rank, replicas) {
        (None, _) => "not enabled",
        (Some(_), Some(0)) => "NO REPLICA",
        (Some(_), _) if degraded => "DEGRADED",
        (Some(_), None) => "unknown",
        (Some(_), Some(_)) => "ok",
    }
}

/// `hookbus registry ls`.
///
/// # Errors
///
/// When the bus does not answer or the output cannot be written.
pub async fn ls(ops: &Ops, opts: &LsOptions, out: &mut (dyn Write + Send)) -> Result<(), OpsError> {
    ops.progress.start("asking the bus and the plugins", None);
    let view = fetch(ops).await?;
    let ids: Vec<String> = view.plugins.keys().cloned().collect();
    let replicas = ops.replicas(&ids).await;
    let health: Option<BusHealth> = ops.ask_bus("health").await.ok();
    ops.progress.finish();
    let degraded = |id: &str| {
        health
            .as_ref()
            .and_then(|h| h.plugins.get(id))
            .is_some_and(|p| p.degraded)
    };
    if opts.json {
        let mut value: serde_json::Value = serde_json::json!({
            "plugins": {},
            "rejected": view.rejected,
        });
        for (id, r) in ids.iter().zip(&replicas) {
            let p = &view.plugins[id];
            value["plugins"][id] = serde_json::json!({
                "manifest": p.manifest,
                "enabled_rank": p.enabled_rank,
                "revision": p.revision,
                "replicas": r,
                "status": status(p, *r, degraded(id)).to_lowercase(),
            });
        }
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<10} {:<8} {:<9} {:<12} {:<9} REVISION",
        "PLUGIN", "VERSION", "ENABLED", "REPLICAS", "STATUS", "HANDLERS"
    )?;
    for (id, r) in ids.iter().zip(&replicas) {
        let p = &view.plugins[id];
        writeln!(
            out,
            "{:<24} {:<10} {:<8} {:<9} {:<12} {:<9} {}",
            id,
            p.manifest.version,
            p.enabled_rank
                .map_or_else(|| "no".to_owned(), |r| format!("#{}", r + 1)),
            r.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            status(p, *r, degraded(id)),
            p.manifest.handlers.len(),
            p.revision
        )?;
    }
    if ids.is_empty() {
        writeln!(out, "(no plugin registered)")?;
    }
    for (key, reason) in &view.rejected {
        writeln!(out, "REJECTED {key}: {reason}")?;
    }
    let table = view.table(ops);
    writeln!(out)?;
    match &opts.entity {
        Some(e) => writeln!(
            out,
            "Effective order for entity {e:?} (priority, ENABLED_PLUGINS position, declaration order):"
        )?,
        None => writeln!(
            out,
            "Effective order per hook (priority, ENABLED_PLUGINS position, declaration order):"
        )?,
    }
    let mut any = false;
    for hook in Hook::ALL {
        if opts.hook.is_some_and(|h| h != hook) {
            continue;
        }
        let routes: Vec<_> = match &opts.entity {
            Some(e) => table.matching(hook, e).cloned().collect(),
            None => table.handlers(hook).to_vec(),
        };
        if routes.is_empty() {
            continue;
        }
        any = true;
        writeln!(out, "{}", hook.name())?;
        for (i, r) in routes.iter().enumerate() {
            let entities = r
                .entities
                .as_ref()
                .map_or_else(|| "*".to_owned(), |e| e.join(","));
            writeln!(
                out,
                "  {:>2}. {}/{}  priority={}  entities={}",
                i + 1,
                r.plugin,
                r.handler,
                r.priority,
                entities
            )?;
        }
    }
    if !any {
        writeln!(out, "  (no handler of an enabled plugin)")?;
    }
    Ok(())
}

/// `hookbus registry show <plugin>`.
///
/// # Errors
///
/// [`OpsError::Usage`] when the plugin is not registered; as [`ls`] otherwise.
pub async fn show(
    ops: &Ops,
    plugin: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), OpsError> {
    ops.progress
        .start(&format!("asking the bus and {plugin}"), None);
    let view = fetch(ops).await?;
    let pings = crate::monitor::services(&ops.client, "PING", plugin, ops.timeout)
        .await
        .unwrap_or_default();
    let service_stats = crate::monitor::services(&ops.client, "STATS", plugin, ops.timeout)
        .await
        .unwrap_or_default();
    let stats: serde_json::Value = ops.ask_bus("stats").await.unwrap_or_default();
    let health: Option<BusHealth> = ops.ask_bus("health").await.ok();
    ops.progress.finish();
    let Some(p) = view.plugins.get(plugin) else {
        let rejected = view
            .rejected
            .get(&core_events::manifest::registry_key(plugin));
        return Err(OpsError::Usage(match rejected {
            Some(reason) => {
                format!("plugin '{plugin}' is not registered: its manifest was rejected: {reason}")
            }
            None => format!(
                "plugin '{plugin}' is not registered (registered: {})",
                view.plugins.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }));
    };
    let degraded = health
        .as_ref()
        .and_then(|h| h.plugins.get(plugin))
        .is_some_and(|h| h.degraded);
    let bus_handlers = &stats["handlers"][plugin];
    // Services API stats summed over replicas, per endpoint name.
    let mut endpoint: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for s in &service_stats {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let entry = endpoint.entry(name).or_default();
            entry.0 += e["num_requests"].as_u64().unwrap_or(0);
            entry.1 += e["num_errors"].as_u64().unwrap_or(0);
            entry.2 += e["processing_time"].as_u64().unwrap_or(0);
        }
    }
    if json {
        let value = serde_json::json!({
            "manifest": p.manifest,
            "enabled_rank": p.enabled_rank,
            "revision": p.revision,
            "status": status(p, Some(pings.len()), degraded).to_lowercase(),
            "replicas": pings,
            "service_stats": service_stats,
            "bus_stats": bus_handlers,
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )?;
        return Ok(());
    }
    let m = &p.manifest;
    writeln!(out, "plugin:      {} ({})", m.id, m.name)?;
    writeln!(out, "version:     {}   revision {}", m.version, p.revision)?;
    if !m.description.is_empty() {
        writeln!(out, "description: {}", m.description)?;
    }
    writeln!(
        out,
        "enabled:     {}",
        p.enabled_rank.map_or_else(
            || "no (not in ENABLED_PLUGINS: never called)".to_owned(),
            |r| format!("yes, position {} in ENABLED_PLUGINS", r + 1)
        )
    )?;
    writeln!(
        out,
        "status:      {}",
        status(p, Some(pings.len()), degraded)
    )?;
    writeln!(out, "replicas:    {}", pings.len())?;
    for r in &pings {
        writeln!(
            out,
            "  {}  version {}",
            r["id"].as_str().unwrap_or("?"),
            r["version"].as_str().unwrap_or("?")
        )?;
    }
    writeln!(out, "handlers (declaration order):")?;
    for h in &m.handlers {
        writeln!(
            out,
            "  {}  {}  priority={}  entities={}  timeout={}ms  retry_backoff_ms={:?}",
            h.name,
            h.hook.name(),
            h.priority,
            h.entities
                .as_ref()
                .map_or_else(|| "*".to_owned(), |e| e.join(",")),
            h.timeout().as_millis(),
            h.retry_backoff_ms
        )?;
        let b = &bus_handlers[&h.name];
        if b.is_object() {
            writeln!(
                out,
                "    bus:     deliveries={} successes={} errors={} retries={} dead_letters={} deferred={} last_success={} last_error={}",
                b["deliveries"],
                b["successes"],
                b["errors"],
                b["retries"],
                b["dead_letters"],
                b["deferred"],
                ago(b["last_success"].as_str()),
                b["last_error"].as_str().map_or_else(
                    || "-".to_owned(),
                    |e| format!("{} ({})", cut(e, 80), ago(b["last_error_at"].as_str()))
                ),
            )?;
        } else {
            writeln!(out, "    bus:     no delivery since the bus started")?;
        }
        if let Some((req, err, time)) = endpoint.get(&h.name) {
            let avg = if *req > 0 { time / req / 1000 } else { 0 };
            writeln!(
                out,
                "    service: requests={req} errors={err} average={avg}µs (all replicas, $SRV.STATS)"
            )?;
        }
    }
    Ok(())
}
