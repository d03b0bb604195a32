//! Every call the console makes to the dead-letter stream, in one place, over the
//! library of `hookbus dlq` ([`hookbus::dlq`]): list, get, count, replay, purge,
//! each write recorded in the audit trail with the console user's name.
//!
//! The stream is selected by [`Filter`] (plugin, handler); the other criteria of
//! the page (hook, entity, event id, text of the error) are applied here to the
//! records read.

use core_events::Hook;
use hookbus::dlq::{Filter, Replayed, StoredDeadLetter};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{ConsoleError, ConsoleState};

/// Which dead letters the page asks for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selection {
    pub(crate) plugin: Option<String>,
    pub(crate) handler: Option<String>,
    pub(crate) hook: Option<Hook>,
    pub(crate) entity: Option<String>,
    pub(crate) event_id: Option<String>,
    /// Part of the error text, case-insensitive.
    pub(crate) error: Option<String>,
}

impl Selection {
    /// The stream filter (plugin, handler).
    pub(crate) fn filter(&self) -> Filter {
        let mut filter = Filter::default();
        filter.plugin.clone_from(&self.plugin);
        filter.handler.clone_from(&self.handler);
        filter
    }

    fn admits(&self, letter: &StoredDeadLetter) -> bool {
        let b = &letter.body;
        let text = |k: &str| b[k].as_str().unwrap_or_default();
        self.hook.is_none_or(|h| text("hook") == h.name())
            && self.entity.as_deref().is_none_or(|e| text("entity") == e)
            && self
                .event_id
                .as_deref()
                .is_none_or(|id| text("event_id") == id)
            && self
                .error
                .as_deref()
                .is_none_or(|e| text("error").to_lowercase().contains(&e.to_lowercase()))
    }
}

/// One dead letter as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Letter {
    pub(crate) seq: u64,
    pub(crate) subject: String,
    /// False for what is not a handler's dead letter (an unreadable event).
    pub(crate) replayable: bool,
    pub(crate) record: Value,
}

impl From<StoredDeadLetter> for Letter {
    fn from(l: StoredDeadLetter) -> Self {
        Letter {
            replayable: l.record().is_some(),
            seq: l.seq,
            subject: l.subject,
            record: l.body,
        }
    }
}

/// The dead letters `sel` selects, newest first, at most `limit`; and how many
/// it selects in all.
pub(crate) async fn list(
    state: &ConsoleState,
    sel: &Selection,
    limit: usize,
) -> Result<(Vec<Letter>, usize), ConsoleError> {
    let all =
        hookbus::dlq::list_filtered(&state.inner.js, state.subjects(), &sel.filter(), |_, _| {})
            .await
            .map_err(ConsoleError::nats("cannot read the dead-letter stream"))?;
    let selected: Vec<StoredDeadLetter> = all.into_iter().filter(|l| sel.admits(l)).collect();
    let total = selected.len();
    let letters = selected
        .into_iter()
        .rev()
        .take(limit)
        .map(Letter::from)
        .collect();
    Ok((letters, total))
}

/// One dead letter by its sequence.
pub(crate) async fn get(state: &ConsoleState, seq: u64) -> Result<Letter, ConsoleError> {
    hookbus::dlq::get(&state.inner.js, state.subjects(), seq)
        .await
        .map_err(ConsoleError::nats("cannot read the dead-letter stream"))?
        .map(Letter::from)
        .ok_or_else(|| ConsoleError::NotFound(format!("no dead letter #{seq}")))
}

/// Dead letters of plugin/handler (no other criterion: what a purge deletes).
pub(crate) async fn count(state: &ConsoleState, filter: &Filter) -> Result<u64, ConsoleError> {
    hookbus::dlq::count(&state.inner.js, state.subjects(), filter)
        .await
        .map_err(ConsoleError::nats("cannot read the dead-letter stream"))
}

/// Sends dead letter `seq` back to its handler (one attempt, the handler's
/// timeout), and records it in the audit trail.
pub(crate) async fn replay(
    state: &ConsoleState,
    seq: u64,
    actor: String,
) -> Result<Value, ConsoleError> {
    let stored = hookbus::dlq::get(&state.inner.js, state.subjects(), seq)
        .await
        .map_err(ConsoleError::nats("cannot read the dead-letter stream"))?
        .ok_or_else(|| ConsoleError::NotFound(format!("no dead letter #{seq}")))?;
    let outcome = hookbus::dlq::replay(&state.inner.client, state.subjects(), &stored, None)
        .await
        .map_err(|e| match e {
            e @ hookbus::dlq::ReplayError::NotReplayable { .. } => {
                ConsoleError::Invalid(e.to_string())
            }
            hookbus::dlq::ReplayError::Nats { seq, source } => ConsoleError::Unavailable {
                what: format!("replaying dead letter #{seq}"),
                source,
            },
        })?;
    let answer = match &outcome {
        Replayed::Succeeded => json!({"seq": seq, "result": "succeeded"}),
        Replayed::Failed { error, new_seq } => {
            json!({"seq": seq, "result": "failed", "error": error, "new_seq": new_seq})
        }
    };
    let target = stored.record().map_or_else(
        || stored.subject.clone(),
        |r| format!("{}/{}", r.plugin, r.handler),
    );
    audit(state, "dlq.replay", actor, target, answer.clone()).await;
    Ok(answer)
}

/// Deletes the dead letters of `filter`; returns how many.
pub(crate) async fn purge(
    state: &ConsoleState,
    filter: &Filter,
    actor: String,
) -> Result<u64, ConsoleError> {
    let purged = hookbus::dlq::purge(&state.inner.js, state.subjects(), filter)
        .await
        .map_err(ConsoleError::nats("cannot purge the dead-letter stream"))?;
    audit(
        state,
        "dlq.purge",
        actor,
        filter.describe(),
        json!({"plugin": filter.plugin, "handler": filter.handler, "purged": purged}),
    )
    .await;
    Ok(purged)
}

async fn audit(state: &ConsoleState, action: &str, actor: String, target: String, details: Value) {
    hookbus::audit::record_or_log(
        &state.inner.js,
        state.subjects(),
        &hookbus::audit::AuditEvent::new(action, actor, target, details),
        None,
    )
    .await;
}
