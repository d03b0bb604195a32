//! The dead-letter stream: selecting, listing, showing, replaying and purging
//! dead letters — the library behind `hookbus dlq`, the bus's request/reply
//! service `<prefix>.bus.dlq.list|replay|purge` ([`crate::dlq_service`]) and any console.
//!
//! **Selection.** A [`Filter`] (plugin, handler, hook, entity, since / until as a
//! time or a sequence of the dead-letter stream, error text, error code; every
//! field optional, the default selects everything) or a list of sequences
//! ([`Target`]). A bulk operation works on a **snapshot**: the stream's last
//! sequence is read when it starts, and only dead letters at or below it that
//! match are touched. Dead letters written during the run (new failures, and the
//! replacements of replays that failed again) are left for the next run.
//!
//! **Replay.** A replay sends the stored event to the one handler that failed it,
//! as the dispatcher would (same delivery headers, plus `Pagoda-Replay: true`),
//! in one attempt with the handler's timeout, at most [`ReplayOptions::rate`]
//! per second. On success the dead letter is deleted; on failure a new dead
//! letter with the attempt appended (and a [`ReplayRecord`] in `replays`)
//! replaces it, so nothing is lost. Each replayed dead letter is recorded in the
//! audit trail (`dlq.replay.letter`), each run too (`dlq.replay`, `dlq.purge`).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use core_events::protocol::{DeadLetter, FailedAttempt, ReplayRecord, headers};
use core_events::{Hook, Subjects};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, record_or_log};
use crate::dispatch::deliver::{Attempt, delivery_headers, request};
use crate::progress::Progress;

/// One message of the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct StoredDeadLetter {
    /// `<prefix>.dlq.<plugin>.<handler>` (`<prefix>.dlq._bus.malformed` for unreadable events).
    pub subject: String,
    /// Its sequence in the dead-letter stream.
    pub seq: u64,
    /// When the stream stored it (when it was dead-lettered).
    pub time: DateTime<Utc>,
    /// The record (a [`core_events::protocol::DeadLetter`]), or `Null` when the
    /// body is not JSON (a malformed event keeps its original bytes).
    #[serde(rename = "record")]
    pub body: serde_json::Value,
}

impl StoredDeadLetter {
    /// The record, when the body is one.
    pub fn record(&self) -> Option<DeadLetter> {
        serde_json::from_value(self.body.clone()).ok()
    }
}

/// A bound of a [`Filter`]'s `since` / `until`: a sequence of the dead-letter
/// stream (`#<seq>`) or the time the dead letter was stored.
///
/// As JSON: a number is a sequence; a string is an RFC 3339 time
/// (`2026-12-05T01:00:00Z`), a duration ago (`90m`, `2h`, `1d`: resolved when
/// read) or a sequence in digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// A sequence in the dead-letter stream.
    Seq(u64),
    /// A time.
    Time(DateTime<Utc>),
}

impl Bound {
    /// Parses a sequence, an RFC 3339 time or a duration ago (`90m`: now − 90 min).
    ///
    /// # Errors
    ///
    /// A message saying what the three forms are.
    pub fn parse(s: &str) -> Result<Bound, String> {
        let t = s.trim();
        if let Ok(seq) = t.parse::<u64>() {
            return Ok(Bound::Seq(seq));
        }
        if let Ok(time) = DateTime::parse_from_rfc3339(t) {
            return Ok(Bound::Time(time.with_timezone(&Utc)));
        }
        if let Ok(ago) = crate::config::parse_duration(t)
            && let Ok(ago) = chrono::Duration::from_std(ago)
            && let Some(time) = Utc::now().checked_sub_signed(ago)
        {
            return Ok(Bound::Time(time));
        }
        Err(format!(
            "'{s}' is not a dead-letter sequence (12), an RFC 3339 time \
             (2026-12-05T01:00:00Z) or a duration ago (90m, 2h, 1d)"
        ))
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Seq(s) => write!(f, "#{s}"),
            Bound::Time(t) => write!(
                f,
                "{}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        }
    }
}

impl std::str::FromStr for Bound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Bound::parse(s)
    }
}

impl Serialize for Bound {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bound::Seq(seq) => s.serialize_u64(*seq),
            Bound::Time(t) => {
                s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bound {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seq(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a dead-letter sequence (a number) or a string: an RFC 3339 time or a duration ago",
            )
        })? {
            Raw::Seq(seq) => Ok(Bound::Seq(seq)),
            Raw::Text(s) => Bound::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl schemars::JsonSchema for Bound {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Bound".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A sequence of the dead-letter stream (a number, or digits), an RFC 3339 time, or a duration ago (90m, 2h, 1d).",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string"}
            ]
        })
    }
}

/// Which dead letters. Every field is optional and narrows the selection; the
/// default selects every dead letter. Over JSON, unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Only this plugin's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// Only this handler's (of any plugin unless `plugin` is set too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Only deliveries of this hook (standard name or legacy alias).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    /// Only events about this entity (the plain name, exactly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// Only dead letters stored at or after this time, or at or after this sequence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Bound>,
    /// Only dead letters stored at or before this time, or at or before this sequence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Bound>,
    /// Only those whose last error contains this text (case-insensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Only those whose last error is a handler error with this
    /// `Nats-Service-Error-Code` (`handler error <code>: …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

/// A filter or request that cannot be used; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FilterError {
    /// The field (`filter.since`, `plugin`, …).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FilterError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> FilterError {
        FilterError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads a JSON body into `T`, naming the bad field in the error (`filter.hook: unknown hook …`).
///
/// # Errors
///
/// [`FilterError`] with the field's path (`(body)` when the body itself is not JSON).
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FilterError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "(body)".to_owned()
        } else {
            path
        };
        FilterError::new(field, e.into_inner().to_string())
    })
}

impl Filter {
    /// Only this plugin's (a shorthand).
    pub fn plugin(plugin: impl Into<String>) -> Filter {
        Filter {
            plugin: Some(plugin.into()),
            ..Filter::default()
        }
    }

    /// True when it selects everything.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Checks the fields: plugin and handler are subject tokens, texts are not
    /// empty, `since` is not after `until`.
    ///
    /// # Errors
    ///
    /// [`FilterError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), FilterError> {
        for (field, value) in [("plugin", &self.plugin), ("handler", &self.handler)] {
            if let Some(v) = value
                && (v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
            {
                return Err(FilterError::new(
                    field,
                    format!("'{v}' is not a {field} name (letters, digits, '-', '_')"),
                ));
            }
        }
        for (field, value) in [("entity", &self.entity), ("error", &self.error)] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(FilterError::new(field, "is empty"));
            }
        }
        match (self.since, self.until) {
            (Some(Bound::Seq(a)), Some(Bound::Seq(b))) if a > b => Err(FilterError::new(
                "since",
                format!("since #{a} is after until #{b}"),
            )),
            (Some(Bound::Time(a)), Some(Bound::Time(b))) if a > b => Err(FilterError::new(
                "since",
                format!("since {} is after until {}", Bound::Time(a), Bound::Time(b)),
            )),
            _ => Ok(()),
        }
    }

    /// The subject filter on the dead-letter stream (plugin and handler; the
    /// other fields are checked on each dead letter).
    pub fn subject(&self, subjects: &Subjects) -> String {
        let p = subjects.prefix();
        match (&self.plugin, &self.handler) {
            (Some(pl), Some(h)) => subjects.dead_letter(pl, h),
            (Some(pl), None) => format!("{p}.dlq.{pl}.>"),
            (None, Some(h)) => format!("{p}.dlq.*.{h}"),
            (None, None) => subjects.all_dead_letters(),
        }
    }

    /// True when only the subject and an upper sequence bound select: the server
    /// can count and purge it alone.
    fn by_subject_only(&self) -> bool {
        self.hook.is_none()
            && self.entity.is_none()
            && self.error.is_none()
            && self.code.is_none()
            && self.since.is_none()
            && !matches!(self.until, Some(Bound::Time(_)))
    }

    /// Whether the dead letter stored at `seq`, `time` with body `letter`
    /// (`None`: not a handler's dead letter) passes the fields other than
    /// plugin and handler. A body that is no record passes only when none of
    /// hook, entity, error and code is set.
    pub fn matches(&self, seq: u64, time: DateTime<Utc>, letter: Option<&DeadLetter>) -> bool {
        let in_bounds = |b: Option<Bound>, after: bool| match b {
            None => true,
            Some(Bound::Seq(s)) => {
                if after {
                    seq >= s
                } else {
                    seq <= s
                }
            }
            Some(Bound::Time(t)) => {
                if after {
                    time >= t
                } else {
                    time <= t
                }
            }
        };
        if !in_bounds(self.since, true) || !in_bounds(self.until, false) {
            return false;
        }
        let Some(l) = letter else {
            return self.hook.is_none()
                && self.entity.is_none()
                && self.error.is_none()
                && self.code.is_none();
        };
        self.plugin.as_ref().is_none_or(|p| *p == l.plugin)
            && self.handler.as_ref().is_none_or(|h| *h == l.handler)
            && self.hook.is_none_or(|h| h == l.hook)
            && self.entity.as_ref().is_none_or(|e| *e == l.entity)
            && self
                .error
                .as_ref()
                .is_none_or(|e| l.error.to_lowercase().contains(&e.to_lowercase()))
            && self.code.is_none_or(|c| error_code(&l.error) == Some(c))
    }

    /// Says what the filter selects, for messages and the audit trail.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (&self.plugin, &self.handler) {
            (Some(p), Some(h)) => parts.push(format!("handler {p}/{h}")),
            (Some(p), None) => parts.push(format!("plugin {p}")),
            (None, Some(h)) => parts.push(format!("handler */{h}")),
            (None, None) => {}
        }
        if let Some(h) = self.hook {
            parts.push(format!("hook {}", h.name()));
        }
        if let Some(e) = &self.entity {
            parts.push(format!("entity '{e}'"));
        }
        if let Some(b) = self.since {
            parts.push(format!("since {b}"));
        }
        if let Some(b) = self.until {
            parts.push(format!("until {b}"));
        }
        if let Some(e) = &self.error {
            parts.push(format!("error ~ '{e}'"));
        }
        if let Some(c) = self.code {
            parts.push(format!("code {c}"));
        }
        if parts.is_empty() {
            "all plugins".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// The `Nats-Service-Error-Code` in a dead letter's error (`handler error 500: …`).
pub fn error_code(error: &str) -> Option<u16> {
    error
        .strip_prefix("handler error ")?
        .split(':')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Which dead letters an operation works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Those the filter selects (at the start of the run).
    Filter(Filter),
    /// These, by sequence (missing ones are skipped).
    Seqs(Vec<u64>),
}

impl Target {
    /// The target of sequences, or of a filter: sequences and a non-empty filter
    /// (or `all`) do not go together, and an empty filter needs `all` (so that
    /// nobody replays or purges everything by forgetting a flag).
    ///
    /// # Errors
    ///
    /// [`FilterError`] naming `seqs`, `filter` or a filter's field.
    pub fn new(seqs: &[u64], filter: &Filter, all: bool) -> Result<Target, FilterError> {
        filter.validate()?;
        if !seqs.is_empty() {
            if !filter.is_empty() || all {
                return Err(FilterError::new(
                    "seqs",
                    "give sequences or a filter (or all), not both",
                ));
            }
            return Ok(Target::Seqs(seqs.to_vec()));
        }
        if filter.is_empty() && !all {
            return Err(FilterError::new(
                "filter",
                "empty: say which dead letters (sequences, a filter), or all",
            ));
        }
        Ok(Target::Filter(filter.clone()))
    }

    /// Says what it selects, for messages and the audit trail.
    pub fn describe(&self) -> String {
        match self {
            Target::Filter(f) => f.describe(),
            Target::Seqs(s) => format!("dead letters {s:?}"),
        }
    }

    /// As JSON for the audit trail: `{"filter": …}` or `{"seqs": […]}`.
    fn to_json(&self) -> serde_json::Value {
        match self {
            Target::Filter(f) => serde_json::json!({ "filter": f }),
            Target::Seqs(s) => serde_json::json!({ "seqs": s }),
        }
    }
}

/// Something went wrong reading or changing the dead-letter stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// A bad filter or request.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// NATS failed.
    #[error("{what}: {source}")]
    Nats {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
}

fn nats<E: Into<async_nats::Error>>(what: &'static str) -> impl FnOnce(E) -> DlqError {
    move |e| DlqError::Nats {
        what,
        source: e.into(),
    }
}

fn chrono_time(t: time::OffsetDateTime) -> DateTime<Utc> {
    i64::try_from(t.unix_timestamp_nanos())
        .map(DateTime::from_timestamp_nanos)
        .unwrap_or_default()
}

/// A selection taken at the start of an operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Selection {
    /// The sequences selected, oldest first.
    pub seqs: Vec<u64>,
    /// The first of them, whole (at most the `sample` asked for).
    pub sample: Vec<StoredDeadLetter>,
    /// The stream's last sequence when the selection was taken: nothing above
    /// it is selected.
    pub last_seq: u64,
}

/// Idle time after which a scan of the stream ends even though the server said
/// more messages were pending (they were deleted meanwhile by someone else).
const SCAN_IDLE: Duration = Duration::from_secs(3);

/// Scans the dead letters `filter` selects, up to the stream's last sequence at
/// the start, calling `each` with every match until it returns `false`.
async fn scan(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: &Filter,
    progress: &dyn Progress,
    mut each: impl FnMut(StoredDeadLetter) -> bool,
) -> Result<u64, DlqError> {
    filter.validate()?;
    let read = "cannot read the dead-letter stream";
    let mut stream = js
        .get_stream(subjects.dlq_stream())
        .await
        .map_err(nats(read))?;
    let state = stream.info().await.map_err(nats(read))?.state.clone();
    let last = state.last_sequence;
    let upper = match filter.until {
        Some(Bound::Seq(u)) => u.min(last),
        _ => last,
    };
    let deliver_policy = match filter.since {
        Some(Bound::Seq(s)) => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: s.max(1),
        },
        Some(Bound::Time(t)) => jetstream::consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                t.timestamp_nanos_opt().unwrap_or(0),
            ))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        },
        None => jetstream::consumer::DeliverPolicy::All,
    };
    if state.messages == 0 || upper == 0 || matches!(filter.since, Some(Bound::Seq(s)) if s > upper)
    {
        return Ok(last);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.subject(subjects),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(nats(read))?;
    let pending = consumer.cached_info().num_pending;
    if pending == 0 {
        return Ok(last);
    }
    let span = upper.saturating_sub(match filter.since {
        Some(Bound::Seq(s)) => s.saturating_sub(1),
        _ => state.first_sequence.saturating_sub(1),
    });
    progress.start("reading dead letters", Some(span.min(pending)));
    let mut messages = consumer.messages().await.map_err(nats(read))?;
    let mut read_n = 0u64;
    loop {
        let msg = match tokio::time::timeout(SCAN_IDLE, messages.next()).await {
            Ok(Some(m)) => m.map_err(nats(read))?,
            Ok(None) | Err(_) => break,
        };
        let Ok(info) = msg.info() else { continue };
        let (seq, left) = (info.stream_sequence, info.pending);
        let time = chrono_time(info.published);
        if seq > upper {
            break;
        }
        read_n += 1;
        progress.set(read_n);
        let body: serde_json::Value =
            serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null);
        let record: Option<DeadLetter> = serde_json::from_value(body.clone()).ok();
        if filter.matches(seq, time, record.as_ref())
            && !each(StoredDeadLetter {
                subject: msg.subject.to_string(),
                seq,
                time,
                body,
            })
        {
            break;
        }
        if left == 0 || seq == upper {
            break;
        }
    }
    progress.finish();
    Ok(last)
}

/// The dead letters `target` selects now: their sequences, the first `sample`
/// whole, and the stream's last sequence (the snapshot's end).
///
/// # Errors
///
/// [`DlqError::Filter`] for a bad filter; NATS errors.
pub async fn select(
    js: &jetstream::Context,
    subjects: &Subjects,
    target: &Target,
    sample: usize,
    progress: &dyn Progress,
) -> Result<Selection, DlqError> {
    let mut out = Selection::default();
    match target {
        Target::Filter(filter) => {
            out.last_seq = scan(js, subjects, filter, progress, |l| {
                out.seqs.push(l.seq);
                if out.sample.len() < sample {
                    out.sample.push(l);
                }
                true
            })
            .await?;
        }
        Target::Seqs(seqs) => {
            for seq in seqs {
                if let Some(l) = get(js, subjects, *seq).await? {
                    out.seqs.push(l.seq);
                    if out.sample.len() < sample {
                        out.sample.push(l);
                    }
                }
            }
            let mut stream = js
                .get_stream(subjects.dlq_stream())
                .await
                .map_err(nats("cannot read the dead-letter stream"))?;
            out.last_seq = stream
                .info()
                .await
                .map_err(nats("cannot read the dead-letter stream"))?
                .state
                .last_sequence;
        }
    }
    Ok(out)
}

/// The first `limit` dead letters `filter` selects (all without a limit), oldest
/// first. Page on with `since` = the last one's sequence + 1.
///
/// # Errors
///
/// [`DlqError::Filter`] for a bad filter; NATS errors.
pub async fn list(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: &Filter,
    limit: Option<usize>,
) -> Result<Vec<StoredDeadLetter>, DlqError> {
    let mut out = Vec::new();
    if limit == Some(0) {
        return Ok(out);
    }
    scan(js, subjects, filter, &crate::progress::Silent, |l| {
        out.push(l);
        limit.is_none_or(|n| out.len() < n)
    })
    .await?;
    Ok(out)
}

/// One dead letter by its sequence in the dead-letter stream (`None` when there is none).
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn get(
    js: &jetstream::Context,
    subjects: &Subjects,
    seq: u64,
) -> Result<Option<StoredDeadLetter>, DlqError> {
    let read = "cannot read the dead-letter stream";
    let stream = js
        .get_stream(subjects.dlq_stream())
        .await
        .map_err(nats(read))?;
    match stream.get_raw_message(seq).await {
        Ok(msg) => Ok(Some(StoredDeadLetter {
            subject: msg.subject.to_string(),
            seq,
            time: chrono_time(msg.time),
            body: serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null),
        })),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(nats(read)(e)),
    }
}

/// The replays of dead letter `seq` in the audit trail (`dlq.replay.letter`
/// records whose `seq` is it), oldest first: where a dead letter went after a
/// replay (removed, or replaced by `new_seq`). Reads every such record.
///
/// # Errors
///
/// When the audit stream cannot be read.
pub async fn replay_history(
    js: &jetstream::Context,
    subjects: &Subjects,
    seq: u64,
) -> Result<Vec<AuditEvent>, DlqError> {
    let read = "cannot read the audit stream";
    let stream = js
        .get_stream(subjects.audit_stream())
        .await
        .map_err(nats(read))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects.audit("dlq.replay.letter"),
            ..Default::default()
        })
        .await
        .map_err(nats(read))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(nats(read))?;
    while let Ok(Some(msg)) = tokio::time::timeout(SCAN_IDLE, messages.next()).await {
        let msg = msg.map_err(nats(read))?;
        let left = msg.info().map(|i| i.pending).unwrap_or(0);
        if let Ok(event) = serde_json::from_slice::<AuditEvent>(&msg.payload)
            && event.details["seq"].as_u64() == Some(seq)
        {
            out.push(event);
        }
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// How many dead letters `filter` selects (the server counts when only plugin
/// and handler are set; otherwise each dead letter is read).
///
/// # Errors
///
/// [`DlqError::Filter`] for a bad filter; NATS errors.
pub async fn count(
    js: &jetstream::Context,
    subjects: &Subjects,
    filter: &Filter,
) -> Result<u64, DlqError> {
    if filter.by_subject_only() && filter.until.is_none() {
        filter.validate()?;
        let read = "cannot read the dead-letter stream";
        let stream = js
            .get_stream(subjects.dlq_stream())
            .await
            .map_err(nats(read))?;
        let mut per_subject = stream
            .info_with_subjects(filter.subject(subjects))
            .await
            .map_err(nats(read))?;
        let mut n = 0u64;
        while let Some(item) = per_subject.next().await {
            n += u64::try_from(item.map_err(nats(read))?.1).unwrap_or(0);
        }
        return Ok(n);
    }
    let mut n = 0u64;
    scan(js, subjects, filter, &crate::progress::Silent, |_| {
        n += 1;
        true
    })
    .await?;
    Ok(n)
}

/// Dead letters per `<plugin>.<handler>` (`_bus.malformed` included).
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn counts(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<std::collections::BTreeMap<(String, String), u64>, async_nats::Error> {
    let stream = js.get_stream(subjects.dlq_stream()).await?;
    let mut per_subject = stream
        .info_with_subjects(subjects.all_dead_letters())
        .await?;
    let prefix = format!("{}.dlq.", subjects.prefix());
    let mut out = std::collections::BTreeMap::new();
    while let Some(item) = per_subject.next().await {
        let (subject, n) = item?;
        if let Some((p, h)) = subject
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.split_once('.'))
        {
            out.insert((p.to_owned(), h.to_owned()), u64::try_from(n).unwrap_or(0));
        }
    }
    Ok(out)
}

/// Who does an operation, and whether only to see what it would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOptions {
    /// Only count and sample; change nothing, record nothing.
    pub dry_run: bool,
    /// Who, for the audit trail.
    pub actor: String,
    /// How many selected dead letters to return whole in the report.
    pub sample: usize,
}

impl Default for PurgeOptions {
    fn default() -> Self {
        PurgeOptions {
            dry_run: false,
            actor: crate::audit::cli_actor(),
            sample: DEFAULT_SAMPLE,
        }
    }
}

/// How many selected dead letters a dry run shows by default.
pub const DEFAULT_SAMPLE: usize = 5;

/// What a purge did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, schemars::JsonSchema)]
pub struct PurgeReport {
    /// The run's id (in its audit record); empty for a dry run.
    pub run: String,
    /// Only counted.
    pub dry_run: bool,
    /// How many were selected.
    pub matched: u64,
    /// How many were deleted (0 for a dry run).
    pub purged: u64,
    /// The stream's last sequence at the start: nothing above it was touched.
    pub last_seq: u64,
    /// The first selected dead letters, whole.
    pub sample: Vec<StoredDeadLetter>,
    /// `sample` and `outcomes` were emptied: the reply of the bus's service was
    /// larger than the server's `max_payload` (the counts are complete).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Deletes the dead letters `target` selects at the start (nothing written
/// meanwhile), and records the run in the audit trail (`dlq.purge`).
///
/// # Errors
///
/// [`DlqError::Filter`] for a bad filter; NATS errors.
pub async fn purge(
    js: &jetstream::Context,
    subjects: &Subjects,
    target: &Target,
    opts: &PurgeOptions,
    progress: &dyn Progress,
) -> Result<PurgeReport, DlqError> {
    let sel = select(js, subjects, target, opts.sample, progress).await?;
    let mut report = PurgeReport {
        dry_run: opts.dry_run,
        matched: sel.seqs.len() as u64,
        last_seq: sel.last_seq,
        sample: sel.sample,
        ..Default::default()
    };
    if opts.dry_run || sel.seqs.is_empty() {
        return Ok(report);
    }
    report.run = uuid::Uuid::now_v7().to_string();
    let write = "cannot purge the dead-letter stream";
    let stream = js
        .get_stream(subjects.dlq_stream())
        .await
        .map_err(nats(write))?;
    match target {
        // The server purges a subject up to the snapshot's end in one request.
        Target::Filter(f) if f.by_subject_only() => {
            let upper = match f.until {
                Some(Bound::Seq(u)) => u.min(sel.last_seq),
                _ => sel.last_seq,
            };
            let r = stream
                .purge()
                .filter(f.subject(subjects))
                .sequence(upper.saturating_add(1))
                .await
                .map_err(nats(write))?;
            report.purged = r.purged;
        }
        _ => {
            progress.start("purging dead letters", Some(report.matched));
            for (done, seq) in (1..).zip(&sel.seqs) {
                match stream.delete_message(*seq).await {
                    Ok(true) => report.purged += 1,
                    Ok(false) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            jetstream::stream::DeleteMessageErrorKind::JetStream(_)
                        ) =>
                    {
                        tracing::debug!(seq, error = %e, "dead letter gone before the purge");
                    }
                    Err(e) => {
                        progress.finish();
                        return Err(nats(write)(e));
                    }
                }
                progress.set(done);
            }
            progress.finish();
        }
    }
    let mut details = target.to_json();
    if let Some(obj) = details.as_object_mut() {
        obj.insert("run".into(), report.run.clone().into());
        obj.insert("last_seq".into(), report.last_seq.into());
        obj.insert("matched".into(), report.matched.into());
        obj.insert("purged".into(), report.purged.into());
    }
    record_or_log(
        js,
        subjects,
        &AuditEvent::new("dlq.purge", opts.actor.clone(), target.describe(), details),
        None,
    )
    .await;
    tracing::info!(target = %target.describe(), purged = report.purged, actor = %opts.actor, "dead letters purged");
    Ok(report)
}

/// How a bulk replay runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Only count and sample; replay nothing, record nothing.
    pub dry_run: bool,
    /// At most this many replays per second (> 0; [`DEFAULT_RATE`] by default).
    pub rate: f64,
    /// Per-attempt timeout (default: the handler's `timeout_ms`).
    pub timeout: Option<Duration>,
    /// Who, for the audit trail and the dead letters' `replays`.
    pub actor: String,
    /// How many selected dead letters to return whole in the report.
    pub sample: usize,
}

/// The default rate of a bulk replay: replays per second.
pub const DEFAULT_RATE: f64 = 10.0;

/// [`DEFAULT_RATE`] as the command line writes it ([`parse_rate`] reads it).
pub const DEFAULT_RATE_TEXT: &str = "10/s";

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            dry_run: false,
            rate: DEFAULT_RATE,
            timeout: None,
            actor: crate::audit::cli_actor(),
            sample: DEFAULT_SAMPLE,
        }
    }
}

/// Parses a replay rate: `20/s`, `600/m`, `3600/h` or a plain number per second.
///
/// # Errors
///
/// A message when it is not a positive number with one of those units.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, per) = match t.split_once('/') {
        Some((n, unit)) => (
            n,
            match unit.trim() {
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                other => {
                    return Err(format!(
                        "rate '{s}': unknown unit '/{other}'; use N/s, N/m or N/h"
                    ));
                }
            },
        ),
        None => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n / per),
        _ => Err(format!(
            "rate '{s}' is not a positive number of replays per time (20/s, 600/m)"
        )),
    }
}

/// What happened to one dead letter of a replay run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The handler succeeded; the dead letter was deleted.
    Succeeded {
        /// Its sequence.
        seq: u64,
        /// `<plugin>/<handler>`.
        handler: String,
    },
    /// The handler failed again; a dead letter with the attempt appended replaces it.
    Failed {
        /// Its sequence.
        seq: u64,
        /// `<plugin>/<handler>`.
        handler: String,
        /// What went wrong.
        error: String,
        /// The replacing dead letter's sequence.
        new_seq: u64,
    },
    /// Not replayed: not a handler's dead letter, or gone meanwhile.
    Skipped {
        /// Its sequence.
        seq: u64,
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// The dead letter's sequence (before the replay).
    pub fn seq(&self) -> u64 {
        match self {
            Outcome::Succeeded { seq, .. }
            | Outcome::Failed { seq, .. }
            | Outcome::Skipped { seq, .. } => *seq,
        }
    }
}

/// What a replay run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ReplayReport {
    /// The run's id (in its audit records and the dead letters' `replays`);
    /// empty for a dry run.
    pub run: String,
    /// Only counted.
    pub dry_run: bool,
    /// How many were selected.
    pub matched: u64,
    /// Replayed with success (and deleted).
    pub succeeded: u64,
    /// Failed again (kept, with the attempt appended).
    pub failed: u64,
    /// Not replayable, or gone meanwhile.
    pub skipped: u64,
    /// The stream's last sequence at the start: nothing above it was replayed.
    pub last_seq: u64,
    /// The first selected dead letters, whole.
    pub sample: Vec<StoredDeadLetter>,
    /// Each replayed dead letter, in order.
    pub outcomes: Vec<Outcome>,
    /// `sample` and `outcomes` were emptied: the reply of the bus's service was
    /// larger than the server's `max_payload` (the counts are complete).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Replays the dead letters `target` selects at the start, one at a time, at
/// most `opts.rate` per second, reporting progress; records each replay
/// (`dlq.replay.letter`) and the run (`dlq.replay`) in the audit trail.
///
/// # Errors
///
/// [`DlqError::Filter`] for a bad filter or rate; NATS errors (the run stops;
/// what was done is in the audit trail).
pub async fn replay(
    client: &async_nats::Client,
    subjects: &Subjects,
    target: &Target,
    opts: &ReplayOptions,
    progress: &dyn Progress,
) -> Result<ReplayReport, DlqError> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        return Err(
            FilterError::new("rate", format!("{} is not a positive rate", opts.rate)).into(),
        );
    }
    let js = jetstream::new(client.clone());
    let sel = select(&js, subjects, target, opts.sample, progress).await?;
    let mut report = ReplayReport {
        dry_run: opts.dry_run,
        matched: sel.seqs.len() as u64,
        last_seq: sel.last_seq,
        sample: sel.sample,
        ..Default::default()
    };
    if opts.dry_run || sel.seqs.is_empty() {
        return Ok(report);
    }
    report.run = uuid::Uuid::now_v7().to_string();
    let run = Run {
        id: &report.run,
        actor: &opts.actor,
    };
    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let start = tokio::time::Instant::now();
    progress.start("replaying dead letters", Some(report.matched));
    let mut result = Ok(());
    for (i, seq) in sel.seqs.iter().enumerate() {
        if i > 0 {
            let n = u32::try_from(i).unwrap_or(u32::MAX);
            tokio::time::sleep_until(start + period.saturating_mul(n)).await;
        }
        let outcome = match get(&js, subjects, *seq).await {
            Ok(Some(stored)) => {
                match replay_letter(client, subjects, &stored, opts.timeout, Some(run)).await {
                    Ok(o) => o,
                    Err(ReplayError::NotReplayable { .. }) => Outcome::Skipped {
                        seq: *seq,
                        reason: format!("not a handler's dead letter ({})", stored.subject),
                    },
                    Err(ReplayError::Nats { source, .. }) => {
                        result = Err(DlqError::Nats {
                            what: "replay stopped",
                            source,
                        });
                        break;
                    }
                }
            }
            Ok(None) => Outcome::Skipped {
                seq: *seq,
                reason: "gone (replayed or purged meanwhile)".to_owned(),
            },
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        match &outcome {
            Outcome::Succeeded { .. } => report.succeeded += 1,
            Outcome::Failed { .. } => report.failed += 1,
            Outcome::Skipped { seq, reason } => {
                report.skipped += 1;
                progress.note(&format!("#{seq}  skipped: {reason}"));
            }
        }
        report.outcomes.push(outcome);
        progress.set(i as u64 + 1);
    }
    progress.finish();
    let mut details = target.to_json();
    if let Some(obj) = details.as_object_mut() {
        obj.insert("run".into(), report.run.clone().into());
        obj.insert("rate".into(), opts.rate.into());
        obj.insert("last_seq".into(), report.last_seq.into());
        obj.insert("matched".into(), report.matched.into());
        obj.insert("succeeded".into(), report.succeeded.into());
        obj.insert("failed".into(), report.failed.into());
        obj.insert("skipped".into(), report.skipped.into());
        if let Err(e) = &result {
            obj.insert("stopped".into(), e.to_string().into());
        }
    }
    record_or_log(
        &js,
        subjects,
        &AuditEvent::new("dlq.replay", opts.actor.clone(), target.describe(), details),
        None,
    )
    .await;
    result.map(|()| report)
}

/// Who replays, in which run (for the audit trail and `replays`).
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The run id.
    pub id: &'a str,
    /// Who.
    pub actor: &'a str,
}

/// A dead letter that cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Not a dead-letter record (for example `<prefix>.dlq._bus.malformed`).
    #[error("dead letter {seq} on {subject} is not a handler's dead letter; it cannot be replayed")]
    NotReplayable {
        /// Its sequence.
        seq: u64,
        /// Its subject.
        subject: String,
    },
    /// NATS failed.
    #[error("dead letter {seq}: {source}")]
    Nats {
        /// Its sequence.
        seq: u64,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
}

/// Default timeout of a replay when the handler's manifest cannot be read.
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The handler's `timeout_ms` from its manifest in the registry bucket.
async fn handler_timeout(
    js: &jetstream::Context,
    subjects: &Subjects,
    plugin: &str,
    handler: &str,
) -> Option<Duration> {
    let store = js.get_key_value(subjects.registry_bucket()).await.ok()?;
    let value = store
        .get(core_events::manifest::registry_key(plugin))
        .await
        .ok()??;
    let manifest = core_events::PluginManifest::from_json(&value).ok()?;
    manifest
        .handlers
        .iter()
        .find(|h| h.name == handler)
        .map(core_events::HandlerSpec::timeout)
}

/// The event a dead letter is about: the original message from the events stream
/// when it is still there (exact bytes and headers), else rebuilt from the record.
async fn original_event(
    js: &jetstream::Context,
    subjects: &Subjects,
    letter: &DeadLetter,
) -> (HeaderMap, bytes::Bytes) {
    let event_id = letter.event_id.to_string();
    if let Ok(stream) = js.get_stream(subjects.events_stream()).await
        && let Ok(msg) = stream.get_raw_message(letter.stream_seq).await
        && msg
            .headers
            .get(headers::MSG_ID)
            .is_some_and(|v| v.as_str() == event_id)
    {
        return (msg.headers, msg.payload);
    }
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, event_id.as_str());
    h.insert(headers::OBJECT, letter.object.as_str());
    h.insert(headers::HOOK, letter.hook.name());
    if let Ok(token) = core_events::subject::encode_entity(&letter.entity) {
        h.insert(headers::ENTITY, token.as_str());
    }
    let payload = match &letter.event {
        serde_json::Value::String(s) => bytes::Bytes::from(s.clone().into_bytes()),
        other => serde_json::to_vec(other).unwrap_or_default().into(),
    };
    (h, payload)
}

/// Replays one dead letter to its handler (one attempt). `timeout`: the handler's
/// `timeout_ms` from the registry when `None`. With a `run`, the replay is
/// recorded in the audit trail (`dlq.replay.letter`) and, when it fails again,
/// in the replacing dead letter's `replays`.
///
/// # Errors
///
/// [`ReplayError`] when the letter is not replayable or NATS fails; a handler failure
/// is [`Outcome::Failed`], not an error.
pub async fn replay_letter(
    client: &async_nats::Client,
    subjects: &Subjects,
    stored: &StoredDeadLetter,
    timeout: Option<Duration>,
    run: Option<Run<'_>>,
) -> Result<Outcome, ReplayError> {
    let seq = stored.seq;
    let nats = |e: async_nats::Error| ReplayError::Nats { seq, source: e };
    let Some(mut letter) = stored.record() else {
        return Err(ReplayError::NotReplayable {
            seq,
            subject: stored.subject.clone(),
        });
    };
    let js = jetstream::new(client.clone());
    let timeout = match timeout {
        Some(t) => t,
        None => handler_timeout(&js, subjects, &letter.plugin, &letter.handler)
            .await
            .unwrap_or(DEFAULT_REPLAY_TIMEOUT),
    };
    let (event_headers, payload) = original_event(&js, subjects, &letter).await;
    let n = letter
        .attempts
        .iter()
        .map(|a| a.attempt)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let mut h = delivery_headers(
        &event_headers,
        letter.stream_seq,
        n,
        1,
        &letter.plugin,
        &letter.handler,
    );
    h.insert(headers::REPLAY, "true");
    let subject = subjects.handler(&letter.plugin, &letter.handler);
    let error = match request(client, subject, h, payload, timeout).await {
        Attempt::Ok => None,
        Attempt::NoResponders => Some(format!(
            "no responders: plugin '{}' has no replica running",
            letter.plugin
        )),
        Attempt::Failed { error, .. } => Some(error),
    };
    let stream = js
        .get_stream(subjects.dlq_stream())
        .await
        .map_err(|e| nats(e.into()))?;
    let handler = format!("{}/{}", letter.plugin, letter.handler);
    let audit = |outcome: &Outcome| {
        run.map(|run| {
            let mut details = serde_json::to_value(outcome).unwrap_or_default();
            if let Some(obj) = details.as_object_mut() {
                obj.insert("run".into(), run.id.into());
                obj.insert("attempt".into(), n.into());
                obj.insert("event_id".into(), letter.event_id.to_string().into());
                obj.insert("hook".into(), letter.hook.name().into());
                obj.insert("entity".into(), letter.entity.clone().into());
                obj.insert("object".into(), letter.object.clone().into());
            }
            (
                AuditEvent::new(
                    "dlq.replay.letter",
                    run.actor,
                    format!("dead letter #{seq} ({handler})"),
                    details,
                ),
                format!("dlq.replay.{}.{seq}", run.id),
            )
        })
    };
    let Some(error) = error else {
        stream
            .delete_message(seq)
            .await
            .map_err(|e| nats(e.into()))?;
        tracing::info!(plugin = %letter.plugin, handler = %letter.handler, seq, "dead letter replayed");
        let outcome = Outcome::Succeeded {
            seq,
            handler: handler.clone(),
        };
        if let Some((event, key)) = audit(&outcome) {
            record_or_log(&js, subjects, &event, Some(&key)).await;
        }
        return Ok(outcome);
    };
    let now = Utc::now();
    letter.attempts.push(FailedAttempt {
        attempt: n,
        at: now,
        error: error.clone(),
    });
    letter.error = error.clone();
    letter.dead_lettered_at = now;
    if let Some(run) = run {
        letter.replays.push(ReplayRecord {
            at: now,
            actor: run.actor.to_owned(),
            run: run.id.to_owned(),
            attempt: n,
            replaced_seq: seq,
        });
    }
    let msg_id = format!(
        "{}.{}.{}.dlq.replay.{seq}.{n}",
        letter.event_id, letter.plugin, letter.handler
    );
    let ack = js
        .publish_with_headers(
            stored.subject.clone(),
            hookbus_kit::dlq::headers(&letter, &msg_id, true),
            hookbus_kit::dlq::body(&letter).map_err(|e| nats(e.into()))?,
        )
        .await
        .map_err(|e| nats(e.into()))?
        .await
        .map_err(|e| nats(e.into()))?;
    stream
        .delete_message(seq)
        .await
        .map_err(|e| nats(e.into()))?;
    tracing::warn!(plugin = %letter.plugin, handler = %letter.handler, seq, new_seq = ack.sequence, %error, "dead letter replay failed; kept");
    let outcome = Outcome::Failed {
        seq,
        handler: handler.clone(),
        error,
        new_seq: ack.sequence,
    };
    if let Some((event, key)) = audit(&outcome) {
        record_or_log(&js, subjects, &event, Some(&key)).await;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rate_text_is_the_default_rate() {
        assert_eq!(parse_rate(DEFAULT_RATE_TEXT), Ok(DEFAULT_RATE));
    }

    #[test]
    fn bounds_rates_and_codes_parse() {
        assert_eq!(Bound::parse("12"), Ok(Bound::Seq(12)));
        let t = Bound::parse("2026-12-05T01:00:00+09:00").unwrap();
        assert_eq!(t.to_string(), "2026-12-04T16:00:00Z");
        let Bound::Time(ago) = Bound::parse("2h").unwrap() else {
            panic!("a duration ago is a time")
        };
        let secs = (Utc::now() - ago).num_seconds();
        assert!((7199..=7201).contains(&secs), "{secs}");
        assert!(Bound::parse("yesterday").is_err());
        assert_eq!(parse_rate("20/s"), Ok(20.0));
        assert_eq!(parse_rate("600/m"), Ok(10.0));
        assert_eq!(parse_rate("7"), Ok(7.0));
        assert!(parse_rate("0").is_err() && parse_rate("-1/s").is_err());
        assert!(parse_rate("NaN").is_err() && parse_rate("5/week").is_err());
        assert_eq!(error_code("handler error 503: busy"), Some(503));
        assert_eq!(error_code("no reply within 5000 ms"), None);
        // Round trip through JSON: sequences as numbers, times as strings.
        let f = Filter {
            since: Some(Bound::Seq(3)),
            until: Some(t),
            hook: Some(Hook::EntryAfterCreate),
            ..Filter::default()
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["since"], 3);
        assert_eq!(json["hook"], "entry.after_create");
        assert_eq!(from_json::<Filter>(json.to_string().as_bytes()), Ok(f));
        assert_eq!(from_json::<Filter>(b" "), Ok(Filter::default()));
        let e = from_json::<Filter>(b"[").unwrap_err();
        assert_eq!(e.field, "(body)", "{e}");
    }
}
