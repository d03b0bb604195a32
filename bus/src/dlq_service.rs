//! The dead-letter service of the bus: request/reply on
//! `<prefix>.bus.dlq.list`, `<prefix>.bus.dlq.replay` and `<prefix>.bus.dlq.purge`
//! (queue group [`QUEUE_GROUP`], so with several buses one answers), for scripts
//! and consoles that hold no JetStream permissions of their own.
//!
//! The request is a JSON [`DlqRequest`] (an empty body is `{}`); the reply is a
//! [`ListReply`], a [`ReplayReport`] or a [`PurgeReport`], or an [`ErrorReply`]
//! naming the bad field. A reply larger than the server's `max_payload` loses
//! its `sample` and `outcomes` (emptied, `"truncated": true`; the counts stay), and a list
//! that large is refused (ask with a smaller `limit`). Replays and purges run one
//! at a time per bus; the reply
//! comes when the run is over (a replay of N dead letters at rate R takes about
//! N / R seconds: give the request that long).

use std::sync::Arc;
use std::time::Duration;

use core_events::Subjects;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dlq::{
    DlqError, Filter, FilterError, PurgeOptions, PurgeReport, ReplayOptions, ReplayReport,
    StoredDeadLetter, Target,
};
use crate::progress::Silent;

/// The queue group of the service.
pub const QUEUE_GROUP: &str = "hookbus-dlq";
/// Dead letters a list returns without a `limit`.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// The most dead letters one reply carries (list, or a sample).
pub const MAX_LETTERS: usize = 1000;
/// The most per-letter outcomes a replay reply carries (the counts are complete).
pub const MAX_OUTCOMES: usize = 1000;

/// A request to the dead-letter service. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DlqRequest {
    /// Which dead letters (all fields optional; see the operations guide).
    pub filter: Filter,
    /// Or these, by sequence (not together with a filter).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seqs: Vec<u64>,
    /// Replay or purge with an empty filter: must be `true` (so `{}` never
    /// touches every dead letter by accident).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Replay / purge: only count and sample.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// List: at most this many (default 100, at most 1000); replay / purge: the
    /// sample's size (default 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Replay: replays per second (default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Replay: per-attempt timeout in ms (default: the handler's `timeout_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Who asks, for the audit trail (default `nats:<prefix>.bus.dlq`). Said
    /// by the requester: the subject permissions are the access control.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl DlqRequest {
    /// The dead letters it selects for a replay or purge.
    ///
    /// # Errors
    ///
    /// [`FilterError`] for a bad filter, `seqs` with a filter, or an empty
    /// selection without `all`.
    pub fn target(&self) -> Result<Target, FilterError> {
        Target::new(&self.seqs, &self.filter, self.all).map_err(|e| FilterError {
            field: match e.field.as_str() {
                "seqs" | "filter" => e.field,
                f => format!("filter.{f}"),
            },
            message: e.message,
        })
    }
}

/// The reply of `<prefix>.bus.dlq.list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ListReply {
    /// The dead letters, oldest first.
    pub letters: Vec<StoredDeadLetter>,
    /// More match: ask again with `filter.since` = `next_since`.
    pub more: bool,
    /// The sequence to go on from when `more`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_since: Option<u64>,
}

/// The reply to a request that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorReply {
    /// What is wrong.
    pub error: String,
    /// The request's field that is wrong, when one is (`filter.since`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<DlqError> for ErrorReply {
    fn from(e: DlqError) -> Self {
        match e {
            DlqError::Filter(f) => f.into(),
            other => ErrorReply {
                error: other.to_string(),
                field: None,
            },
        }
    }
}

impl From<FilterError> for ErrorReply {
    fn from(f: FilterError) -> Self {
        ErrorReply {
            error: f.to_string(),
            field: Some(f.field),
        }
    }
}

/// Answers one request on `subject` (`…list`, `…replay`, `…purge`) with its JSON reply.
///
/// `lock` serializes replays and purges.
pub async fn answer(
    client: &async_nats::Client,
    subjects: &Subjects,
    verb: &str,
    body: &[u8],
    lock: &tokio::sync::Mutex<()>,
) -> Vec<u8> {
    let reply = match handle(client, subjects, verb, body, lock).await {
        Ok(v) => v,
        Err(e) => serde_json::to_value(e).unwrap_or_default(),
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

async fn handle(
    client: &async_nats::Client,
    subjects: &Subjects,
    verb: &str,
    body: &[u8],
    lock: &tokio::sync::Mutex<()>,
) -> Result<serde_json::Value, ErrorReply> {
    let prefix = subjects.prefix();
    let req: DlqRequest = crate::dlq::from_json(body)?;
    let js = async_nats::jetstream::new(client.clone());
    let actor = req
        .actor
        .clone()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| format!("nats:{prefix}.bus.dlq"));
    let sample = req
        .limit
        .unwrap_or(crate::dlq::DEFAULT_SAMPLE)
        .min(MAX_LETTERS);
    let value = match verb {
        "list" => {
            if !req.seqs.is_empty() || req.dry_run || req.rate.is_some() || req.all {
                return Err(FilterError {
                    field: "(body)".into(),
                    message: "list takes filter and limit only".into(),
                }
                .into());
            }
            req.filter.validate().map_err(|e| FilterError {
                field: format!("filter.{}", e.field),
                message: e.message,
            })?;
            let limit = req.limit.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LETTERS);
            let mut letters =
                crate::dlq::list(&js, subjects, &req.filter, Some(limit.saturating_add(1)))
                    .await
                    .map_err(ErrorReply::from)?;
            let more = letters.len() > limit;
            letters.truncate(limit);
            let next_since = more
                .then(|| letters.last().map(|l| l.seq.saturating_add(1)))
                .flatten();
            serde_json::to_value(ListReply {
                letters,
                more,
                next_since,
            })
        }
        "replay" => {
            let target = req.target()?;
            let opts = ReplayOptions {
                dry_run: req.dry_run,
                rate: req.rate.unwrap_or(crate::dlq::DEFAULT_RATE),
                timeout: req.timeout_ms.map(Duration::from_millis),
                actor,
                sample,
            };
            let _one_at_a_time = lock.lock().await;
            let mut report: ReplayReport =
                crate::dlq::replay(client, subjects, &target, &opts, &Silent)
                    .await
                    .map_err(ErrorReply::from)?;
            report.outcomes.truncate(MAX_OUTCOMES);
            serde_json::to_value(report)
        }
        "purge" => {
            let target = req.target()?;
            if req.rate.is_some() || req.timeout_ms.is_some() {
                return Err(FilterError {
                    field: "(body)".into(),
                    message: "purge takes no rate or timeout_ms".into(),
                }
                .into());
            }
            let opts = PurgeOptions {
                dry_run: req.dry_run,
                actor,
                sample,
            };
            let _one_at_a_time = lock.lock().await;
            let report: PurgeReport = crate::dlq::purge(&js, subjects, &target, &opts, &Silent)
                .await
                .map_err(ErrorReply::from)?;
            serde_json::to_value(report)
        }
        other => {
            return Err(ErrorReply {
                error: format!(
                    "unknown dead-letter request '{other}'; use {prefix}.bus.dlq.list, \
                     {prefix}.bus.dlq.replay or {prefix}.bus.dlq.purge"
                ),
                field: None,
            });
        }
    };
    value.map_err(|e| ErrorReply {
        error: format!("cannot encode the reply: {e}"),
        field: None,
    })
}

/// Subscribes `<prefix>.bus.dlq.*` in the queue group [`QUEUE_GROUP`] and
/// answers each request in a task of its own until `shutdown`.
///
/// # Errors
///
/// When the subscription fails.
pub async fn subscribe(
    client: &async_nats::Client,
    subjects: &Subjects,
) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
    client
        .queue_subscribe(
            format!("{}.bus.dlq.*", subjects.prefix()),
            QUEUE_GROUP.to_owned(),
        )
        .await
}

/// The service's loop over `sub` (see [`subscribe`]) until `shutdown`.
pub fn spawn(
    mut sub: async_nats::Subscriber,
    client: async_nats::Client,
    subjects: Subjects,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let verb = msg
                .subject
                .as_str()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            let (client, subjects, lock) = (client.clone(), subjects.clone(), lock.clone());
            // Not waited for at shutdown: the bus's stop is bounded, a replay run
            // may not be (it stops between two dead letters when the process ends).
            tokio::spawn(async move {
                let mut body = answer(&client, &subjects, &verb, &msg.payload, &lock).await;
                let max = client.server_info().max_payload;
                if body.len() > max && verb != "list" {
                    // The run is done: keep its counts, drop what made it large.
                    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body)
                        && let Some(obj) = v.as_object_mut()
                    {
                        for list in ["sample", "outcomes"] {
                            if let Some(v) = obj.get_mut(list) {
                                *v = serde_json::Value::Array(Vec::new());
                            }
                        }
                        obj.insert("truncated".into(), true.into());
                        body = serde_json::to_vec(&v).unwrap_or_default();
                    }
                }
                if body.len() > max {
                    body = serde_json::to_vec(&ErrorReply {
                        error: format!(
                            "the reply ({} bytes) is larger than the server's max_payload ({max}); \
                             ask for fewer dead letters (a smaller limit, or page with filter.since)",
                            body.len()
                        ),
                        field: Some("limit".to_owned()),
                    })
                    .unwrap_or_default();
                }
                if let Err(e) = client.publish(reply, body.into()).await {
                    tracing::warn!(error = %e, %verb, "dead-letter service reply not sent");
                }
            });
        }
    })
}
