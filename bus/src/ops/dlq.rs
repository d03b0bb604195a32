//! `hookbus dlq ls|show|replay|purge`: the output of [`crate::dlq`]'s operations.

use std::io::Write;
use std::time::Duration;

use super::{Ops, OpsError, cut};
use crate::dlq::{
    Filter, FilterError, Outcome, PurgeOptions, ReplayOptions, ReplayReport, StoredDeadLetter,
    Target,
};

impl From<crate::dlq::DlqError> for OpsError {
    fn from(e: crate::dlq::DlqError) -> Self {
        match e {
            crate::dlq::DlqError::Filter(f) => OpsError::Usage(flag_error(&f)),
            crate::dlq::DlqError::Nats { what, source } => OpsError::Nats {
                what: what.to_owned(),
                source,
            },
        }
    }
}

/// A filter error as the command line says it: `--since: …`.
fn flag_error(f: &FilterError) -> String {
    match f.field.as_str() {
        "seqs" | "filter" => f.message.clone(),
        field => format!("--{field}: {}", f.message),
    }
}

/// One dead letter as a line.
fn line(l: &StoredDeadLetter) -> String {
    let b = &l.body;
    if l.record().is_none() {
        return format!(
            "#{}  {}  (not a handler's dead letter: {})",
            l.seq,
            l.subject,
            if b.is_null() {
                "an unreadable event".to_owned()
            } else {
                cut(
                    b["error"]
                        .as_str()
                        .or(b["kind"].as_str())
                        .unwrap_or("another record"),
                    200,
                )
            }
        );
    }
    let replays = b["replays"].as_array().map_or(0, Vec::len);
    format!(
        "#{}  {}  {}  {} {} '{}'  seq={} attempts={}{}  error={}",
        l.seq,
        l.subject,
        b["event_id"].as_str().unwrap_or("?"),
        b["hook"].as_str().unwrap_or("?"),
        b["object"].as_str().unwrap_or("?"),
        b["entity"].as_str().unwrap_or("?"),
        b["stream_seq"],
        b["attempts"].as_array().map_or(0, Vec::len),
        if replays > 0 {
            format!(" replays={replays}")
        } else {
            String::new()
        },
        cut(b["error"].as_str().unwrap_or("?"), 200),
    )
}

/// `hookbus dlq ls`: one line per dead letter (at most `limit`), then a count.
/// Returns the count.
///
/// # Errors
///
/// [`OpsError::Usage`] for a bad filter; when the stream cannot be read or the
/// output written.
pub async fn ls(
    ops: &Ops,
    filter: &Filter,
    limit: Option<usize>,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<usize, OpsError> {
    filter
        .validate()
        .map_err(|e| OpsError::Usage(flag_error(&e)))?;
    ops.progress.start("reading dead letters", None);
    let letters = crate::dlq::list(&ops.js, &ops.subjects, filter, limit).await;
    ops.progress.finish();
    let letters = letters?;
    for l in &letters {
        if json {
            let v = serde_json::json!({"seq": l.seq, "subject": l.subject, "time": l.time, "record": l.body});
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", line(l))?;
        }
    }
    if !json {
        let more = if limit.is_some_and(|n| letters.len() >= n) {
            format!(
                " (--limit reached; more with --since {})",
                letters.last().map_or(0, |l| l.seq + 1)
            )
        } else {
            String::new()
        };
        writeln!(out, "{} dead letter(s){more}", letters.len())?;
    }
    Ok(letters.len())
}

/// `hookbus dlq show <seq>`: the whole record, then its replays.
///
/// # Errors
///
/// [`OpsError::Usage`] when there is no such dead letter.
pub async fn show(ops: &Ops, seq: u64, out: &mut (dyn Write + Send)) -> Result<(), OpsError> {
    let Some(l) = crate::dlq::get(&ops.js, &ops.subjects, seq).await? else {
        // Gone: the audit trail says whether a replay took it.
        let history = crate::dlq::replay_history(&ops.js, &ops.subjects, seq).await?;
        let Some(last) = history.last() else {
            return Err(OpsError::Usage(format!(
                "no dead letter #{seq} (never written, or purged: see nats stream view {} \
                 --subject '{}')",
                ops.subjects.audit_stream(),
                ops.subjects.audit("dlq.purge"),
            )));
        };
        let d = &last.details;
        let when = last.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        match d["outcome"].as_str() {
            Some("succeeded") => writeln!(
                out,
                "dead letter #{seq} is gone: replayed successfully at {when} by {} (run {}), and removed",
                last.actor,
                d["run"].as_str().unwrap_or("?")
            )?,
            _ => writeln!(
                out,
                "dead letter #{seq} is gone: replayed at {when} by {} (run {}), failed again ({}); \
                 it is now #{}",
                last.actor,
                d["run"].as_str().unwrap_or("?"),
                cut(d["error"].as_str().unwrap_or("?"), 160),
                d["new_seq"]
            )?,
        }
        return Ok(());
    };
    writeln!(
        out,
        "dead letter #{}  subject {}  stored {}",
        l.seq,
        l.subject,
        l.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )?;
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&l.body).unwrap_or_default()
    )?;
    if let Some(record) = l.record() {
        if record.replays.is_empty() {
            writeln!(out, "replays: none")?;
        } else {
            writeln!(out, "replays ({}):", record.replays.len())?;
            for r in &record.replays {
                let error = record
                    .attempts
                    .iter()
                    .find(|a| a.attempt == r.attempt)
                    .map_or("?", |a| a.error.as_str());
                writeln!(
                    out,
                    "  {}  by {}  attempt {}  (was #{}, run {})  failed: {}",
                    r.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    r.actor,
                    r.attempt,
                    r.replaced_seq,
                    r.run,
                    cut(error, 160)
                )?;
            }
        }
    }
    Ok(())
}

/// Which dead letters to replay or purge, and how.
#[derive(Debug, Clone)]
pub struct Selection {
    /// These, by sequence in the dead-letter stream.
    pub seqs: Vec<u64>,
    /// Or every one `filter` selects …
    pub filter: Filter,
    /// … which must be this when the filter is empty.
    pub all: bool,
    /// Only say how many and show the first few.
    pub dry_run: bool,
    /// How many to show in a dry run.
    pub sample: usize,
    /// Replay: per-attempt timeout (default: the handler's `timeout_ms`).
    pub timeout: Option<Duration>,
    /// Replay: replays per second.
    pub rate: f64,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            seqs: Vec::new(),
            filter: Filter::default(),
            all: false,
            dry_run: false,
            sample: crate::dlq::DEFAULT_SAMPLE,
            timeout: None,
            rate: crate::dlq::DEFAULT_RATE,
        }
    }
}

impl Selection {
    fn target(&self) -> Result<Target, OpsError> {
        Target::new(&self.seqs, &self.filter, self.all).map_err(|e| match e.field.as_str() {
            "filter" => OpsError::Usage(
                "say which dead letters: sequence numbers, filters (--plugin, --handler, --hook, \
                 --entity, --since, --until, --error, --code), or --all"
                    .to_owned(),
            ),
            _ => OpsError::Usage(flag_error(&e)),
        })
    }
}

fn print_sample(
    verb: &str,
    target: &Target,
    matched: u64,
    last_seq: u64,
    sample: &[StoredDeadLetter],
    out: &mut (dyn Write + Send),
) -> std::io::Result<()> {
    writeln!(
        out,
        "would {verb} {matched} dead letter(s) of {} (present up to #{last_seq}){}",
        target.describe(),
        if sample.is_empty() {
            String::new()
        } else {
            format!("; the first {}:", sample.len())
        }
    )?;
    for l in sample {
        writeln!(out, "{}", line(l))?;
    }
    Ok(())
}

/// `hookbus dlq replay`: sends each selected dead letter back to its handler, one
/// at a time at the selection's rate, with a progress bar; `dry_run`: says how
/// many and shows the first.
///
/// # Errors
///
/// [`OpsError::Usage`] when nothing is selected or a filter is bad; NATS errors.
pub async fn replay(
    ops: &Ops,
    sel: &Selection,
    out: &mut (dyn Write + Send),
) -> Result<ReplayReport, OpsError> {
    let target = sel.target()?;
    let opts = ReplayOptions {
        dry_run: sel.dry_run,
        rate: sel.rate,
        timeout: sel.timeout,
        sample: sel.sample,
        ..ReplayOptions::default()
    };
    let report = crate::dlq::replay(
        &ops.client,
        &ops.subjects,
        &target,
        &opts,
        ops.progress.as_ref(),
    )
    .await?;
    if report.dry_run {
        print_sample(
            "replay",
            &target,
            report.matched,
            report.last_seq,
            &report.sample,
            out,
        )?;
        return Ok(report);
    }
    if let Target::Seqs(seqs) = &target {
        for seq in seqs
            .iter()
            .filter(|s| !report.outcomes.iter().any(|o| o.seq() == **s))
        {
            writeln!(out, "#{seq}: no such dead letter")?;
        }
    }
    for o in &report.outcomes {
        match o {
            Outcome::Succeeded { seq, handler } => {
                writeln!(out, "#{seq}  {handler}: ok, dead letter removed")?;
            }
            Outcome::Failed {
                seq,
                handler,
                error,
                new_seq,
            } => writeln!(
                out,
                "#{seq}  {handler}: failed again ({}); kept as #{new_seq} with the attempt appended",
                cut(error, 160)
            )?,
            Outcome::Skipped { seq, reason } => writeln!(out, "#{seq}  skipped: {reason}")?,
        }
    }
    writeln!(
        out,
        "replayed {}: {} ok (removed), {} failed (kept), {} skipped",
        report.matched, report.succeeded, report.failed, report.skipped
    )?;
    Ok(report)
}

/// `hookbus dlq purge`: deletes the selected dead letters when `yes`; with
/// `dry_run`, says how many and shows the first. Returns how many were deleted.
///
/// # Errors
///
/// [`OpsError::Usage`] when nothing is selected, and without `yes` (after saying
/// how many would go).
pub async fn purge(
    ops: &Ops,
    sel: &Selection,
    yes: bool,
    out: &mut (dyn Write + Send),
) -> Result<u64, OpsError> {
    let target = sel.target()?;
    let opts = PurgeOptions {
        dry_run: sel.dry_run || !yes,
        sample: if sel.dry_run { sel.sample } else { 0 },
        ..PurgeOptions::default()
    };
    let report = crate::dlq::purge(
        &ops.js,
        &ops.subjects,
        &target,
        &opts,
        ops.progress.as_ref(),
    )
    .await?;
    if sel.dry_run {
        print_sample(
            "purge",
            &target,
            report.matched,
            report.last_seq,
            &report.sample,
            out,
        )?;
        return Ok(0);
    }
    if !yes {
        return Err(OpsError::Usage(format!(
            "would delete {} dead letter(s) of {}; add --yes to do it (--dry-run shows them)",
            report.matched,
            target.describe()
        )));
    }
    writeln!(
        out,
        "purged {} dead letter(s) of {}",
        report.purged,
        target.describe()
    )?;
    Ok(report.purged)
}
