//! `hookbus health`: one screen with the bus and every plugin, and a verdict usable
//! from cron or a probe (the binary exits 1 when unhealthy).
//!
//! Unhealthy: the bus does not answer, has lost NATS or its dispatcher is not
//! running; a plugin in `ENABLED_PLUGINS` is not registered; an enabled,
//! registered plugin has no replica answering `$SRV.PING` and no recent successful
//! delivery (the bus's [`MonitorSettings::alive_window`](crate::config::MonitorSettings::alive_window):
//! a plain queue-subscriber plugin is alive by its deliveries); a plugin is degraded.

use std::collections::BTreeMap;
use std::io::Write;

use futures::StreamExt;
use serde::Serialize;

use super::{Ops, OpsError, ago, cut};
use crate::monitor::BusHealth;

/// One plugin's line.
#[derive(Debug, Clone, Serialize)]
pub struct PluginLine {
    /// Plugin id.
    pub plugin: String,
    /// `ok`, `not enabled`, `NOT REGISTERED`, `NO REPLICA`, `DEGRADED`, `unknown`.
    pub status: String,
    /// Registered (valid manifest).
    pub registered: bool,
    /// Position in `ENABLED_PLUGINS`, 1-based.
    pub enabled: Option<usize>,
    /// Replicas answering `$SRV.PING` now.
    pub replicas: Option<usize>,
    /// Last success seen by the bus.
    pub last_success: Option<String>,
    /// Last failed attempt seen by the bus.
    pub last_error_at: Option<String>,
    /// Its text.
    pub last_error: Option<String>,
    /// Deliveries waiting in the deferred stream.
    pub deferred: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// True when nothing is unhealthy.
    pub healthy: bool,
    /// What is unhealthy, one sentence each.
    pub problems: Vec<String>,
    /// Worth a look, not unhealthy (rejected manifests).
    pub warnings: Vec<String>,
    /// For information (plugins alive by their deliveries, without `$SRV.PING`).
    pub notes: Vec<String>,
    /// The bus's own report (`None`: the bus did not answer).
    pub bus: Option<BusHealth>,
    /// Events not yet dispatched (pending + in hand).
    pub backlog: Option<u64>,
    /// Every plugin.
    pub plugins: Vec<PluginLine>,
}

async fn deferred_counts(ops: &Ops) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(stream) = ops.js.get_stream(ops.subjects.deferred_stream()).await else {
        return out;
    };
    let Ok(mut subjects) = stream.info_with_subjects(ops.subjects.all_deferred()).await else {
        return out;
    };
    while let Some(Ok((subject, n))) = subjects.next().await {
        if let Some(p) = ops.subjects.plugin_of_deferred(&subject) {
            *out.entry(p.to_owned()).or_default() += u64::try_from(n).unwrap_or(0);
        }
    }
    out
}

/// Gathers the report.
///
/// # Errors
///
/// Only when NATS itself fails badly; a silent bus is a problem in the report.
pub async fn check(ops: &Ops) -> Result<HealthReport, OpsError> {
    ops.progress.start("checking the bus and the plugins", None);
    let bus: Result<BusHealth, OpsError> = ops.ask_bus("health").await;
    let registry = super::registry::fetch(ops).await.ok();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    let bus = match bus {
        Ok(b) => Some(b),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let Some(b) = &bus
        && !b.is_ok()
    {
        problems.push(format!(
            "the bus is unhealthy: NATS {}, dispatcher {}",
            b.nats,
            role(b)
        ));
    }
    let enabled: Vec<String> = bus
        .as_ref()
        .map(|b| b.enabled_plugins.clone())
        .unwrap_or_default();
    let mut ids: Vec<String> = registry
        .as_ref()
        .map(|r| r.plugins.keys().cloned().collect())
        .unwrap_or_default();
    for e in &enabled {
        if !ids.contains(e) {
            ids.push(e.clone());
        }
    }
    ids.sort();
    let replicas = ops.replicas(&ids).await;
    let deferred = deferred_counts(ops).await;
    let dlq = crate::dlq::counts(&ops.js, &ops.subjects)
        .await
        .unwrap_or_default();
    ops.progress.finish();
    if let Some(r) = &registry {
        for (key, reason) in &r.rejected {
            warnings.push(format!("manifest {key} rejected: {reason}"));
        }
    }
    let mut plugins = Vec::new();
    for (id, replicas) in ids.iter().zip(replicas) {
        let registered = registry
            .as_ref()
            .is_some_and(|r| r.plugins.contains_key(id));
        let rank = enabled.iter().position(|e| e == id).or_else(|| {
            registry
                .as_ref()
                .and_then(|r| r.plugins.get(id))
                .and_then(|p| p.enabled_rank)
        });
        let bp = bus.as_ref().and_then(|b| b.plugins.get(id));
        let degraded = bp.is_some_and(|p| p.degraded);
        let delivering = bp.is_some_and(|p| p.delivering);
        if registered && rank.is_some() && replicas == Some(0) && delivering {
            notes.push(format!(
                "plugin {id} answers no $SRV.PING (not a Services API service); alive by its last successful delivery, {}",
                super::ago(bp.and_then(|p| p.last_success.as_deref()))
            ));
        }
        let status = match (registered, rank, replicas) {
            (true, None, _) => "not enabled",
            (false, Some(_), _) => {
                problems.push(format!(
                    "plugin {id} is in ENABLED_PLUGINS but not registered"
                ));
                "NOT REGISTERED"
            }
            (false, None, _) => "unknown",
            (true, Some(_), Some(0)) if !delivering => {
                problems.push(format!(
                    "plugin {id} has no replica answering $SRV.PING.{id}; its deliveries are deferred"
                ));
                "NO REPLICA"
            }
            (true, Some(_), _) if degraded => {
                problems.push(format!(
                    "plugin {id} is degraded: failing since {}",
                    bp.and_then(|p| p.failing_since.clone())
                        .unwrap_or_else(|| "?".to_owned())
                ));
                "DEGRADED"
            }
            (true, Some(_), None) => "unknown",
            (true, Some(_), Some(_)) => "ok",
        };
        plugins.push(PluginLine {
            plugin: id.clone(),
            status: status.to_owned(),
            registered,
            enabled: rank.map(|r| r + 1),
            replicas,
            last_success: bp.and_then(|p| p.last_success.clone()),
            last_error_at: bp.and_then(|p| p.last_error_at.clone()),
            last_error: bp.and_then(|p| p.last_error.clone()),
            deferred: deferred.get(id).copied().unwrap_or(0),
            dead_letters: dlq
                .iter()
                .filter(|((p, _), _)| p == id)
                .map(|(_, n)| *n)
                .sum(),
        });
    }
    Ok(HealthReport {
        healthy: problems.is_empty(),
        problems,
        warnings,
        notes,
        backlog: bus.as_ref().map(|b| b.pending + b.ack_pending),
        bus,
        plugins,
    })
}

/// Writes the report as one screen (or JSON).
///
/// # Errors
///
/// When the output cannot be written.
pub fn render(
    report: &HealthReport,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), OpsError> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        )?;
        return Ok(());
    }
    match &report.bus {
        Some(b) => writeln!(
            out,
            "bus:    {}  NATS {}, dispatcher {}, events stream in {} partition(s), backlog {} event(s) ({} not taken, {} in hand), {} acked since start",
            if b.is_ok() { "ok" } else { "UNHEALTHY" },
            b.nats,
            role(b),
            b.partitions.max(1),
            b.pending + b.ack_pending,
            b.pending,
            b.ack_pending,
            b.events_acked
        )?,
        None => writeln!(out, "bus:    NOT ANSWERING")?,
    }
    match report.bus.as_ref().and_then(|b| b.relay.as_ref()) {
        Some(r) => writeln!(
            out,
            "relay:  {}  backlog {} rows, oldest {} ms; published {}, duplicates {}, invalid {}, errors {}",
            match (r["healthy"].as_bool(), r["database_ok"].as_bool()) {
                (Some(true), Some(true)) => "publishing",
                (_, Some(false)) => "DATABASE UNREACHABLE",
                _ => "PUBLISH FAILING",
            },
            r["backlog_rows"],
            r["backlog_oldest_ms"],
            r["published"],
            r["duplicates"],
            r["invalid"],
            r["errors"],
        )?,
        None if report.bus.is_none() => {
            writeln!(out, "relay:  unknown (the bus did not answer)")?;
        }
        None => writeln!(out, "relay:  not run by this bus (no HOOKBUS_DATABASE_URL)")?,
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<24} {:<14} {:<8} {:<9} {:<13} {:<40} {:<9} DLQ",
        "PLUGIN", "STATUS", "ENABLED", "REPLICAS", "LAST SUCCESS", "LAST ERROR", "DEFERRED"
    )?;
    for p in &report.plugins {
        let last_error = match (&p.last_error, &p.last_error_at) {
            (Some(e), at) => format!("{} {}", ago(at.as_deref()), cut(e, 30)),
            _ => "-".to_owned(),
        };
        writeln!(
            out,
            "{:<24} {:<14} {:<8} {:<9} {:<13} {:<40} {:<9} {}",
            p.plugin,
            p.status,
            p.enabled
                .map_or_else(|| "no".to_owned(), |r| format!("#{r}")),
            p.replicas.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            ago(p.last_success.as_deref()),
            last_error,
            p.deferred,
            p.dead_letters
        )?;
    }
    if report.plugins.is_empty() {
        writeln!(out, "(no plugin registered or enabled)")?;
    }
    if let Some(b) = &report.bus {
        for a in &b.alerts {
            writeln!(
                out,
                "alert:  {} {}: {}",
                a.plugin,
                a.kind.as_str(),
                a.message
            )?;
        }
    }
    if let Some(b) = &report.bus {
        for (task, n) in &b.task_panics {
            writeln!(
                out,
                "warning: the bus's task '{task}' panicked {n} time(s) since it started (started again each time; see its log)"
            )?;
        }
    }
    for w in &report.warnings {
        writeln!(out, "warning: {w}")?;
    }
    for n in &report.notes {
        writeln!(out, "note:   {n}")?;
    }
    writeln!(out)?;
    if report.healthy {
        writeln!(out, "healthy")?;
    } else {
        for p in &report.problems {
            writeln!(out, "UNHEALTHY: {p}")?;
        }
    }
    Ok(())
}

/// The dispatcher's state in words: `running`, `running partitions 0, 2 of 4`
/// (with ` (pinned)` on pinned-client consumers),
/// `standing by (other buses hold the dispatcher leases)` or `NOT RUNNING`.
fn role(b: &crate::monitor::BusHealth) -> String {
    let pinned = if b.dispatcher_pinned { " (pinned)" } else { "" };
    match (b.dispatcher_running, b.dispatcher_role.as_str()) {
        (true, _) if b.partitions > 1 => {
            let held: Vec<String> = b.dispatcher_partitions.iter().map(u32::to_string).collect();
            format!(
                "running partitions {} of {}{pinned}",
                held.join(", "),
                b.partitions
            )
        }
        (true, _) => format!("running{pinned}"),
        (false, "standby") => "standing by (other buses hold the dispatcher leases)".to_owned(),
        _ => "NOT RUNNING".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_text(report: &HealthReport) -> String {
        let mut out = Vec::new();
        render(report, false, &mut out).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Without an answer from the bus, its relay is unknown, not "not run".
    #[test]
    fn silent_bus_leaves_the_relay_unknown() {
        let mut report = HealthReport {
            healthy: false,
            problems: vec!["no answer".to_owned()],
            warnings: Vec::new(),
            notes: Vec::new(),
            bus: None,
            backlog: None,
            plugins: Vec::new(),
        };
        let text = render_text(&report);
        assert!(text.contains("bus:    NOT ANSWERING"), "{text}");
        assert!(
            text.contains("relay:  unknown (the bus did not answer)"),
            "{text}"
        );
        report.bus = Some(BusHealth::default());
        let text = render_text(&report);
        assert!(
            text.contains("relay:  not run by this bus (no HOOKBUS_DATABASE_URL)"),
            "{text}"
        );
    }
}
