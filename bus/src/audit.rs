//! The audit trail: admin actions as events on the stream `PAGODA_AUDIT`
//! (subjects `<prefix>.audit.<action>`), kept a year by default.
//!
//! | action | recorded by |
//! |---|---|
//! | `dlq.replay`, `dlq.purge` | `hookbus dlq replay` / `purge` (who: `NATS_USER`, else the OS user) |
//! | `registry.update`, `registry.delete` | the bus, watching the registry bucket (who: the plugin id, or `operator` for a delete) |
//! | `token.create`, `token.revoke` | the host's `/api/v2/tokens/` (not `hookbus token create`, which needs no NATS) |
//! | `user.update`, `user.deactivate` | the host's `PUT`/`PATCH`/`DELETE /api/v2/users/<id>/` (a change is recorded only when something changed) |
//!
//! Each event is a CloudEvents-style JSON record ([`AuditEvent`]) with a UUIDv7
//! id, published with `Nats-Msg-Id` = a key of the action, so that two processes
//! recording the same fact (two buses watching the registry) store it once.
//! Read it with `nats stream view PAGODA_AUDIT` or `hookbus tail --audit`-style
//! tools; it is not dispatched to plugins.

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use core_events::Subjects;
use core_events::protocol::headers;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One admin action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// UUIDv7.
    pub id: String,
    /// `pagoda.audit.<action>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// `dlq.replay`, `dlq.purge`, `registry.update`, `registry.delete`, `token.create`,
    /// `token.revoke`, `user.update`, `user.deactivate`.
    pub action: String,
    /// Who did it: a user name, a NATS user, a plugin id.
    pub actor: String,
    /// What it was done to: a plugin, a handler, a token id, a selection.
    pub target: String,
    /// The rest: counts, filters, revisions.
    #[serde(default)]
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// A record of `action` by `actor` on `target`, now.
    pub fn new(
        action: &str,
        actor: impl Into<String>,
        target: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        AuditEvent {
            id: uuid::Uuid::now_v7().to_string(),
            kind: format!("pagoda.audit.{action}"),
            time: Utc::now(),
            action: action.to_owned(),
            actor: actor.into(),
            target: target.into(),
            details,
        }
    }
}

/// The acting user of a command-line action: `NATS_USER`, else the OS user, else `unknown`.
pub fn cli_actor() -> String {
    ["NATS_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Publishes `event` to the audit stream and waits for the stream's
/// acknowledgement. `dedup_key` (default: the event id) becomes `Nats-Msg-Id`.
///
/// # Errors
///
/// When the stream does not take it (no stream: run `hookbus provision`).
pub async fn record(
    js: &jetstream::Context,
    subjects: &Subjects,
    event: &AuditEvent,
    dedup_key: Option<&str>,
) -> Result<(), async_nats::Error> {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, dedup_key.unwrap_or(&event.id));
    let body = serde_json::to_vec(event)?;
    js.publish_with_headers(subjects.audit(&event.action), h, body.into())
        .await?
        .await?;
    Ok(())
}

/// [`record`], logging a failure instead of returning it: an action that was
/// done must not be reported as failed because its audit record could not be
/// written (the log line keeps the record).
pub async fn record_or_log(
    js: &jetstream::Context,
    subjects: &Subjects,
    event: &AuditEvent,
    dedup_key: Option<&str>,
) {
    if let Err(e) = record(js, subjects, event, dedup_key).await {
        tracing::error!(error = %e, action = %event.action, actor = %event.actor,
            target = %event.target, details = %event.details,
            "audit record could not be written to the audit stream");
    }
}

/// Watches the registry bucket and records each change (`registry.update` with
/// the manifest's version and handler count, `registry.delete`) until
/// `shutdown`. Changes made while no bus runs are in the bucket's history, not
/// in the trail.
///
/// # Errors
///
/// When the bucket cannot be watched.
pub async fn watch_registry(
    js: jetstream::Context,
    subjects: Subjects,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, async_nats::Error> {
    let kv = js.get_key_value(subjects.registry_bucket()).await?;
    let mut watch = kv.watch(">").await?;
    Ok(tokio::spawn(async move {
        loop {
            let entry = tokio::select! {
                () = shutdown.cancelled() => break,
                e = watch.next() => match e {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "registry watch error (audit); continuing");
                        continue;
                    }
                    None => break,
                },
            };
            let plugin = entry
                .key
                .strip_prefix("plugins.")
                .unwrap_or(&entry.key)
                .to_owned();
            let event = match entry.operation {
                async_nats::jetstream::kv::Operation::Put => {
                    let manifest = serde_json::from_slice::<serde_json::Value>(&entry.value)
                        .unwrap_or_default();
                    AuditEvent::new(
                        "registry.update",
                        plugin.clone(),
                        plugin.clone(),
                        serde_json::json!({
                            "revision": entry.revision,
                            "version": manifest.get("version"),
                            "handlers": manifest.get("handlers").and_then(|h| h.as_array()).map(Vec::len),
                        }),
                    )
                }
                _ => AuditEvent::new(
                    "registry.delete",
                    "operator",
                    plugin.clone(),
                    serde_json::json!({"revision": entry.revision}),
                ),
            };
            let key = format!("registry.{}.{}", entry.key, entry.revision);
            record_or_log(&js, &subjects, &event, Some(&key)).await;
        }
    }))
}
