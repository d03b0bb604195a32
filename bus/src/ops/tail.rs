//! `hookbus tail`: events as they are stored, filtered by hook and entity, as
//! readable lines or JSON lines.

use std::io::Write;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use core_events::{Hook, ObjectKey};
use futures::StreamExt;

use super::{Ops, OpsError};

/// What to show.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// Only these hooks (empty: all).
    pub hooks: Vec<Hook>,
    /// Only these entity names, exact (empty: all).
    pub entities: Vec<String>,
    /// Only these objects (empty: all).
    pub objects: Vec<ObjectKey>,
    /// One JSON object per line instead of readable lines.
    pub json: bool,
    /// Start at this stream sequence instead of with the next new event.
    pub from_seq: Option<u64>,
    /// Stop after this many events.
    pub count: Option<u64>,
}

/// The subject filters for the options (hooks × entities × objects).
///
/// # Errors
///
/// [`OpsError::Usage`] for an entity name that cannot be encoded, or objects
/// that none of the hooks has events about.
pub fn filters(ops: &Ops, opts: &TailOptions) -> Result<Vec<String>, OpsError> {
    let hooks: Vec<Option<Hook>> = if opts.hooks.is_empty() {
        vec![None]
    } else {
        opts.hooks.iter().copied().map(Some).collect()
    };
    let entities: Vec<Option<&str>> = if opts.entities.is_empty() {
        vec![None]
    } else {
        opts.entities.iter().map(|e| Some(e.as_str())).collect()
    };
    let objects: Vec<Option<ObjectKey>> = if opts.objects.is_empty() {
        vec![None]
    } else {
        opts.objects.iter().copied().map(Some).collect()
    };
    let mut out = Vec::new();
    let mut mismatch = None;
    for h in &hooks {
        for e in &entities {
            for o in &objects {
                let f = match ops.subjects.stored_event_filter(*h, *e, *o) {
                    Ok(f) => f,
                    // A hook about the other kind of object: nothing to show for it.
                    Err(err @ core_events::SubjectError::ObjectNotOfHook { .. }) => {
                        mismatch = Some(err);
                        continue;
                    }
                    Err(err) => return Err(OpsError::Usage(err.to_string())),
                };
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
    }
    match mismatch {
        Some(err) if out.is_empty() => Err(OpsError::Usage(err.to_string())),
        _ => Ok(out),
    }
}

/// Prints events until `opts.count` events were shown (or forever). Returns how
/// many were shown.
///
/// # Errors
///
/// When the events stream cannot be read or the output written.
pub async fn tail(
    ops: &Ops,
    opts: &TailOptions,
    out: &mut (dyn Write + Send),
) -> Result<u64, OpsError> {
    let mut filters = filters(ops, opts)?;
    let (filter_subject, filter_subjects) = if filters.len() == 1 {
        (filters.remove(0), Vec::new())
    } else {
        (String::new(), filters)
    };
    let stream = ops
        .js
        .get_stream(ops.subjects.events_stream())
        .await
        .map_err(|e| OpsError::nats("cannot open the events stream")(e.into()))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject,
            filter_subjects,
            deliver_policy: match opts.from_seq {
                Some(seq) => DeliverPolicy::ByStartSequence {
                    start_sequence: seq.max(1),
                },
                None => DeliverPolicy::New,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| OpsError::nats("cannot read the events stream")(e.into()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| OpsError::nats("cannot read the events stream")(e.into()))?;
    let mut shown = 0u64;
    if opts.count == Some(0) {
        return Ok(0);
    }
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| OpsError::nats("reading events")(e.into()))?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
        let line = render(ops, seq, &msg.subject, &msg.payload, opts.json);
        writeln!(out, "{line}")?;
        out.flush()?;
        shown += 1;
        if opts.count.is_some_and(|c| shown >= c) {
            break;
        }
    }
    Ok(shown)
}

/// One event as a line.
fn render(ops: &Ops, seq: u64, subject: &str, payload: &[u8], json: bool) -> String {
    let (hook, entity) = match ops.subjects.parse_event(subject) {
        Ok((h, e)) => (h.name().to_owned(), e),
        Err(_) => ("?".to_owned(), "?".to_owned()),
    };
    let event: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
    });
    if json {
        return serde_json::json!({
            "seq": seq,
            "subject": subject,
            "hook": hook,
            "entity": entity,
            "object": event.get("subject"),
            "event": event,
        })
        .to_string();
    }
    let s = |k: &str| event.get(k).and_then(|v| v.as_str()).unwrap_or("-");
    let mut line = format!(
        "{}  seq={seq}  {hook}  entity={entity}  object={}  id={}",
        s("time"),
        s("subject"),
        s("id"),
    );
    if let Some(actor) = event.get("pagodaactor").and_then(|v| v.as_str()) {
        line.push_str(&format!("  actor={actor}"));
    }
    if let Some(name) = event
        .pointer("/data/entry/name")
        .or_else(|| event.pointer("/data/entity/name"))
        .and_then(|v| v.as_str())
    {
        line.push_str(&format!("  name={name:?}"));
    }
    line
}
