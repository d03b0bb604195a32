//! Every call the console makes to the dead-letter stream, in one place, over the
//! library of `hookbus dlq` ([`hookbus::dlq`]): list, get, count, replay, purge.
//! The library records each replay and purge in the audit trail with the console
//! user's name (`console:<username>`).
//!
//! The selection is the library's [`Filter`] (plugin, handler, hook, entity,
//! since, until, error text, code), applied by the library; the page's one extra
//! criterion, an event id (the journey's dead letters), is applied here.

use core_events::Hook;
use hookbus::dlq::{DlqError, Filter, Outcome, StoredDeadLetter, Target};
use hookbus::progress::Silent;
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
    /// Stored at or after this time or sequence.
    pub(crate) since: Option<hookbus::dlq::Bound>,
    /// Stored at or before this time or sequence.
    pub(crate) until: Option<hookbus::dlq::Bound>,
    /// The handler's error code.
    pub(crate) code: Option<u16>,
}

impl Selection {
    /// The library's filter (everything but the event id).
    pub(crate) fn filter(&self) -> Filter {
        Filter {
            plugin: self.plugin.clone(),
            handler: self.handler.clone(),
            hook: self.hook,
            entity: self.entity.clone(),
            since: self.since,
            until: self.until,
            error: self.error.clone(),
            code: self.code,
        }
    }

    fn admits(&self, letter: &StoredDeadLetter) -> bool {
        self.event_id
            .as_deref()
            .is_none_or(|id| letter.body["event_id"].as_str() == Some(id))
    }
}

/// A library error as the console answers it: a bad filter is a 400 naming the
/// field, NATS failing a 503.
fn dlq_error(what: &'static str) -> impl FnOnce(DlqError) -> ConsoleError {
    move |e| match e {
        DlqError::Filter(f) => ConsoleError::Invalid(f.to_string()),
        other => ConsoleError::Unavailable {
            what: what.to_owned(),
            source: Box::new(other),
        },
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
    let all = hookbus::dlq::list(&state.inner.js, state.subjects(), &sel.filter(), None)
        .await
        .map_err(dlq_error("cannot read the dead-letter stream"))?;
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
        .map_err(dlq_error("cannot read the dead-letter stream"))?
        .map(Letter::from)
        .ok_or_else(|| ConsoleError::NotFound(format!("no dead letter #{seq}")))
}

/// Sends dead letter `seq` back to its handler (one attempt, the handler's
/// timeout), as a replay run of one; the library records it in the audit trail
/// and, when the handler fails again, in the new dead letter's `replays`.
pub(crate) async fn replay(
    state: &ConsoleState,
    seq: u64,
    actor: String,
) -> Result<Value, ConsoleError> {
    let stored = get(state, seq).await?;
    if !stored.replayable {
        return Err(ConsoleError::Invalid(format!(
            "dead letter #{seq} on {} is not a handler's dead letter; it cannot be replayed",
            stored.subject
        )));
    }
    let opts = hookbus::dlq::ReplayOptions {
        actor,
        sample: 0,
        ..Default::default()
    };
    let report = hookbus::dlq::replay(
        &state.inner.client,
        state.subjects(),
        &Target::Seqs(vec![seq]),
        &opts,
        &Silent,
    )
    .await
    .map_err(dlq_error("cannot replay the dead letter"))?;
    Ok(match report.outcomes.first() {
        Some(Outcome::Succeeded { .. }) => json!({"seq": seq, "result": "succeeded"}),
        Some(Outcome::Failed { error, new_seq, .. }) => {
            json!({"seq": seq, "result": "failed", "error": error, "new_seq": new_seq})
        }
        Some(Outcome::Skipped { reason, .. }) => {
            return Err(ConsoleError::NotFound(format!(
                "dead letter #{seq} was not replayed: {reason}"
            )));
        }
        None => return Err(ConsoleError::NotFound(format!("no dead letter #{seq}"))),
    })
}

/// Replays what `target` selects at the start, one at a time at most `rate` per
/// second (or, `dry_run`, only counts them and returns the first few).
pub(crate) async fn replay_bulk(
    state: &ConsoleState,
    target: &Target,
    dry_run: bool,
    rate: f64,
    actor: String,
) -> Result<hookbus::dlq::ReplayReport, ConsoleError> {
    let opts = hookbus::dlq::ReplayOptions {
        dry_run,
        rate,
        actor,
        ..Default::default()
    };
    hookbus::dlq::replay(
        &state.inner.client,
        state.subjects(),
        target,
        &opts,
        &Silent,
    )
    .await
    .map_err(dlq_error("cannot replay the dead letters"))
}

/// Deletes what `target` selects at the start (nothing written meanwhile), or,
/// `dry_run`, only counts them and returns the first few. The library records the
/// purge in the audit trail.
pub(crate) async fn purge(
    state: &ConsoleState,
    target: &Target,
    dry_run: bool,
    actor: String,
) -> Result<hookbus::dlq::PurgeReport, ConsoleError> {
    let opts = hookbus::dlq::PurgeOptions {
        dry_run,
        actor,
        ..Default::default()
    };
    hookbus::dlq::purge(&state.inner.js, state.subjects(), target, &opts, &Silent)
        .await
        .map_err(dlq_error("cannot purge the dead-letter stream"))
}
