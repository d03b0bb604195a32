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
use pagoda_plugin_sdk::{EventContext, HandlerError, Hook, ObjectKind, Plugin, ResultExt};
use serde::Serialize;

use crate::journal::{Appended, AuditRecord, Journal};

/// Records one delivery; replies only after the line is on disk.
async fn record<D: Serialize>(
    journal: Arc<Journal>,
    ctx: EventContext<D>,
) -> Result<(), HandlerError> {
    let record = AuditRecord {
        event_id: ctx.event_id(),
        hook: ctx.hook,
        entity: ctx.entity().to_owned(),
        object: ctx.object().to_owned(),
        stream_seq: ctx.stream_seq,
        received_at: Utc::now(),
        event: serde_json::to_value(&ctx.event).permanent()?,
    };
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

fn plugin(journal: &Arc<Journal>) -> Result<Plugin, pagoda_plugin_sdk::ManifestError> {
    let mut builder = Plugin::builder("audit-log", "Audit Log", "1.0.0")
        .description("Appends every event to a JSONL journal, once per event id");
    for hook in Hook::ALL.into_iter().filter(|h| h.kind().is_notification()) {
        let name = hook.name().replace('.', "_");
        let journal = journal.clone();
        builder = match hook.object() {
            ObjectKind::Entry => {
                builder.on_entry(hook, name, move |ctx| record(journal.clone(), ctx))
            }
            ObjectKind::Entity => {
                builder.on_entity(hook, name, move |ctx| record(journal.clone(), ctx))
            }
        }
        .priority(200);
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
    pagoda_plugin_sdk::run::init_tracing();
    let path = std::env::var("AUDIT_LOG_PATH").unwrap_or_else(|_| "audit.jsonl".to_owned());
    let journal = Arc::new(
        Journal::open(&path).with_context(|| format!("cannot open audit journal '{path}'"))?,
    );
    tracing::info!(path = %journal.path().display(), events = journal.len(), "audit journal open");
    pagoda_plugin_sdk::run_main(plugin(&journal)?).await?;
    Ok(())
}
