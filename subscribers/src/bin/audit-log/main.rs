//! `audit-log`: appends every event it receives (all 7 notification hooks, all
//! entities) to a JSONL file, one line per event, idempotent on the event id.
//!
//! Runs at priority 200 (after the others). Prints one line per new event:
//! `[audit-log] <handler> <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k>`.
//!
//! Environment: see [`pagoda_plugin_sdk::RunConfig`]; `AUDIT_LOG_PATH` (default
//! `audit.jsonl`) is the journal file.
// The greppable stdout lines are this program's output, on purpose.
#![allow(clippy::print_stdout)]

mod journal;

use std::sync::Arc;

use anyhow::Context as _;
use chrono::Utc;
use pagoda_plugin_sdk::{
    EventContext, HandlerError, HandlerResult, Hook, ObjectKind, Plugin, ResultExt,
};
use serde::Serialize;

use crate::journal::{Appended, AuditRecord, Journal};

/// Records one delivery; replies only after the line is on disk.
async fn record<D: Serialize>(ctx: EventContext<D, Arc<Journal>>) -> HandlerResult {
    let record = AuditRecord {
        event_id: ctx.event_id(),
        hook: ctx.hook,
        entity: ctx.entity().to_owned(),
        object: ctx.object().to_owned(),
        stream_seq: ctx.stream_seq,
        received_at: Utc::now(),
        event: serde_json::to_value(&ctx.event).permanent()?,
    };
    let journal = ctx.state.clone();
    let appended = tokio::task::spawn_blocking(move || journal.append(&record))
        .await
        .map_err(|e| HandlerError::transient(format!("journal writer failed: {e}")))?
        .map_err(|e| {
            HandlerError::transient("could not append to the audit journal").with_source(e)
        })?;
    if appended == Appended::New {
        println!("[audit-log] {}", ctx.describe());
    }
    Ok(())
}

/// One handler per notification hook, all entities, after the other plugins.
fn plugin(journal: Arc<Journal>) -> Result<Plugin, pagoda_plugin_sdk::ManifestError> {
    let mut builder = Plugin::builder("audit-log", "Audit Log", "1.0.0")
        .description("Appends every event to a JSONL journal, once per event id")
        .state(journal)
        .default_priority(200);
    for hook in Hook::ALL.into_iter().filter(|h| h.kind().is_notification()) {
        let name = hook.name().replace('.', "_");
        builder = match hook.object() {
            ObjectKind::Entry => builder.on_entry(hook, name, record),
            ObjectKind::Entity => builder.on_entity(hook, name, record),
        };
    }
    builder.build()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = pagoda_plugin_sdk::run::command_line(
        std::env::args().skip(1),
        "audit-log",
        env!("CARGO_PKG_VERSION"),
        "audit-log: a Pagoda hook bus plugin appending every event it receives to a JSONL\n\
         journal, once per event id.",
        &[("AUDIT_LOG_PATH", "the journal file (default audit.jsonl)")],
    );
    if let Some(code) = args.exit_code() {
        return code;
    }
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "audit-log: error: {}",
                pagoda_plugin_sdk::run::error_chain(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let _telemetry = pagoda_plugin_sdk::run::init_tracing();
    let path = std::env::var("AUDIT_LOG_PATH").unwrap_or_else(|_| "audit.jsonl".to_owned());
    let journal = Arc::new(
        Journal::open(&path).with_context(|| format!("cannot open audit journal '{path}'"))?,
    );
    tracing::info!(path = %journal.path().display(), events = journal.len(), "audit journal open");
    pagoda_plugin_sdk::run_main(plugin(journal)?).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest the bus sees is the one audit-log registered before its
    /// handlers shared the journal as state (recorded from that version).
    #[test]
    fn the_manifest_is_unchanged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let journal = Journal::open(dir.path().join("audit.jsonl")).expect("journal");
        let plugin = plugin(Arc::new(journal)).expect("valid plugin");
        let now = serde_json::to_value(plugin.manifest()).expect("json");
        let recorded = include_str!("../../../tests/fixtures/audit-log.manifest.json");
        let before: serde_json::Value = serde_json::from_str(recorded).expect("json");
        assert_eq!(now, before);
    }
}
