//! `hookbus dlq ls|show|replay|purge`.

use std::io::Write;
use std::time::Duration;

use super::{Ops, OpsError, cut};
use crate::dlq::{Filter, Replayed, StoredDeadLetter};

/// One dead letter as a line.
fn line(l: &StoredDeadLetter) -> String {
    let b = &l.body;
    if b.is_null() {
        return format!(
            "#{}  {}  (not a dead-letter record: an unreadable event)",
            l.seq, l.subject
        );
    }
    format!(
        "#{}  {}  {}  {} {}  seq={} attempts={}  error={}",
        l.seq,
        l.subject,
        b["event_id"].as_str().unwrap_or("?"),
        b["hook"].as_str().unwrap_or("?"),
        b["object"].as_str().unwrap_or("?"),
        b["stream_seq"],
        b["attempts"].as_array().map_or(0, Vec::len),
        cut(b["error"].as_str().unwrap_or("?"), 200),
    )
}

async fn select(ops: &Ops, filter: &Filter) -> Result<Vec<StoredDeadLetter>, OpsError> {
    let total = crate::dlq::count(&ops.js, &ops.subjects, filter)
        .await
        .unwrap_or(0);
    ops.progress.start("reading dead letters", Some(total));
    let letters = crate::dlq::list_filtered(&ops.js, &ops.subjects, filter, |done, _| {
        ops.progress.set(done as u64);
    })
    .await
    .map_err(OpsError::nats("cannot read the dead-letter stream"));
    ops.progress.finish();
    let letters = letters?;
    Ok(letters)
}

/// `hookbus dlq ls`: one line per dead letter, then a count. Returns the count.
///
/// # Errors
///
/// When the stream cannot be read or the output written.
pub async fn ls(
    ops: &Ops,
    filter: &Filter,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<usize, OpsError> {
    let letters = select(ops, filter).await?;
    for l in &letters {
        if json {
            let v = serde_json::json!({"seq": l.seq, "subject": l.subject, "record": l.body});
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", line(l))?;
        }
    }
    if !json {
        writeln!(out, "{} dead letter(s)", letters.len())?;
    }
    Ok(letters.len())
}

/// `hookbus dlq show <seq>`: the whole record.
///
/// # Errors
///
/// [`OpsError::Usage`] when there is no such dead letter.
pub async fn show(ops: &Ops, seq: u64, out: &mut (dyn Write + Send)) -> Result<(), OpsError> {
    let l = crate::dlq::get(&ops.js, &ops.subjects, seq)
        .await
        .map_err(OpsError::nats("cannot read the dead-letter stream"))?
        .ok_or_else(|| OpsError::Usage(format!("no dead letter #{seq}")))?;
    writeln!(out, "dead letter #{}  subject {}", l.seq, l.subject)?;
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&l.body).unwrap_or_default()
    )?;
    Ok(())
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplaySelection {
    /// These, by sequence in the dead-letter stream.
    pub seqs: Vec<u64>,
    /// Or every one `filter` selects …
    pub filter: Filter,
    /// … which must be this to replay everything.
    pub all: bool,
    /// Per-attempt timeout (default: the handler's `timeout_ms`).
    pub timeout: Option<Duration>,
}

/// What a replay run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Replayed with success (and deleted).
    pub succeeded: usize,
    /// Failed again (kept, with the attempt appended).
    pub failed: usize,
    /// Not replayable (unreadable events), or gone meanwhile.
    pub skipped: usize,
}

/// `hookbus dlq replay`: sends each selected dead letter back to its handler, one
/// at a time, with a progress bar.
///
/// # Errors
///
/// [`OpsError::Usage`] when nothing is selected; NATS errors.
pub async fn replay(
    ops: &Ops,
    sel: &ReplaySelection,
    out: &mut (dyn Write + Send),
) -> Result<ReplaySummary, OpsError> {
    let letters: Vec<StoredDeadLetter> = if !sel.seqs.is_empty() {
        let mut v = Vec::new();
        for seq in &sel.seqs {
            match crate::dlq::get(&ops.js, &ops.subjects, *seq)
                .await
                .map_err(OpsError::nats("cannot read the dead-letter stream"))?
            {
                Some(l) => v.push(l),
                None => writeln!(out, "#{seq}: no such dead letter")?,
            }
        }
        v
    } else if sel.filter.plugin.is_some() || sel.all {
        select(ops, &sel.filter).await?
    } else {
        return Err(OpsError::Usage(
            "say which dead letters to replay: sequence numbers, --plugin [--handler], or --all"
                .to_owned(),
        ));
    };
    let mut summary = ReplaySummary {
        skipped: sel.seqs.len().saturating_sub(letters.len()),
        ..Default::default()
    };
    ops.progress
        .start("replaying dead letters", Some(letters.len() as u64));
    for (done, l) in (1..).zip(&letters) {
        let record = l.record();
        let who = record.as_ref().map_or_else(
            || l.subject.clone(),
            |r| format!("{}/{}", r.plugin, r.handler),
        );
        match crate::dlq::replay(&ops.client, &ops.subjects, l, sel.timeout).await {
            Ok(Replayed::Succeeded) => {
                summary.succeeded += 1;
                writeln!(out, "#{}  {who}: ok, dead letter removed", l.seq)?;
            }
            Ok(Replayed::Failed { error, new_seq }) => {
                summary.failed += 1;
                writeln!(
                    out,
                    "#{}  {who}: failed again ({}); kept as #{new_seq} with the attempt appended",
                    l.seq,
                    cut(&error, 160)
                )?;
            }
            Err(e @ crate::dlq::ReplayError::NotReplayable { .. }) => {
                summary.skipped += 1;
                writeln!(out, "#{}  skipped: {e}", l.seq)?;
            }
            Err(e) => return Err(OpsError::Usage(e.to_string())),
        }
        ops.progress.set(done);
    }
    ops.progress.finish();
    let target = if sel.seqs.is_empty() {
        sel.filter.describe()
    } else {
        format!("dead letters {:?}", sel.seqs)
    };
    crate::audit::record_or_log(
        &ops.js,
        &ops.subjects,
        &crate::audit::AuditEvent::new(
            "dlq.replay",
            crate::audit::cli_actor(),
            target,
            serde_json::json!({
                "seqs": sel.seqs, "plugin": sel.filter.plugin, "handler": sel.filter.handler,
                "all": sel.all, "replayed": letters.len(), "succeeded": summary.succeeded,
                "failed": summary.failed, "skipped": summary.skipped,
            }),
        ),
        None,
    )
    .await;
    writeln!(
        out,
        "replayed {}: {} ok (removed), {} failed (kept), {} skipped",
        letters.len(),
        summary.succeeded,
        summary.failed,
        summary.skipped
    )?;
    Ok(summary)
}

/// `hookbus dlq purge`: without `yes`, says what would go and deletes nothing.
/// Returns how many were deleted (0 without `yes`).
///
/// # Errors
///
/// [`OpsError::Usage`] when neither a plugin nor `all` is given, or without `yes`.
pub async fn purge(
    ops: &Ops,
    filter: &Filter,
    all: bool,
    yes: bool,
    out: &mut (dyn Write + Send),
) -> Result<u64, OpsError> {
    if filter.plugin.is_none() && !all {
        return Err(OpsError::Usage(
            "say which dead letters to purge: --plugin <id> [--handler <name>], or --all"
                .to_owned(),
        ));
    }
    let n = crate::dlq::count(&ops.js, &ops.subjects, filter)
        .await
        .map_err(OpsError::nats("cannot read the dead-letter stream"))?;
    if !yes {
        return Err(OpsError::Usage(format!(
            "would delete {n} dead letter(s) of {}; add --yes to do it",
            filter.describe()
        )));
    }
    let purged = crate::dlq::purge(&ops.js, &ops.subjects, filter)
        .await
        .map_err(OpsError::nats("cannot purge the dead-letter stream"))?;
    crate::audit::record_or_log(
        &ops.js,
        &ops.subjects,
        &crate::audit::AuditEvent::new(
            "dlq.purge",
            crate::audit::cli_actor(),
            filter.describe(),
            serde_json::json!({
                "plugin": filter.plugin, "handler": filter.handler, "purged": purged,
            }),
        ),
        None,
    )
    .await;
    writeln!(
        out,
        "purged {purged} dead letter(s) of {}",
        filter.describe()
    )?;
    Ok(purged)
}
