//! The JSON API of the page (the live tail is in [`crate::tail`]).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use axum::Json;
use axum::extract::{Path, Query, State};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use core_events::Hook;
use core_events::protocol::headers;
use futures::StreamExt;
use hookbus::ops::OpsError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Admin;
use crate::dlq::{self, Selection};
use crate::tail::{number, parse_filter, summary};
use crate::{ConsoleError, ConsoleState};

/// Most stored events a look-up by event id reads.
const ID_SCAN_MAX: u64 = 10_000;
/// The look-up by event id starts this long before the time in the UUIDv7.
const ID_SCAN_SLACK: Duration = Duration::from_secs(5);
/// Most deferred deliveries the journey reads.
const DEFERRED_SCAN_MAX: u64 = 1_000;

fn ops_error(e: OpsError) -> ConsoleError {
    match e {
        OpsError::Usage(m) => ConsoleError::Invalid(m),
        other => ConsoleError::Unavailable {
            what: "asking the bus".into(),
            source: other.into(),
        },
    }
}

/// `GET /api/console/me`: who the token is (the page's sign-in).
pub(crate) async fn me(admin: Admin) -> Json<Value> {
    Json(json!({"username": admin.username, "superuser": true}))
}

/// Asks the running bus on `<prefix>.bus.<what>`; `None` when it does not answer.
async fn ask_bus(state: &ConsoleState, what: &str) -> Option<Value> {
    let subject = format!("{}.bus.{what}", state.subjects().prefix());
    let reply = tokio::time::timeout(
        state.inner.ping_timeout.max(Duration::from_secs(2)),
        state.inner.client.request(subject, Bytes::new()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

/// Failed attempts / attempts, since the bus started.
fn error_rate(stats: &Value) -> Option<f64> {
    let ok = stats["successes"].as_u64()?;
    let failed = stats["errors"].as_u64()?;
    let attempts = ok + failed;
    (attempts > 0).then(|| failed as f64 / attempts as f64)
}

/// `GET /api/console/plugins`: the bus, every plugin with its handlers and their
/// counters, and the dispatch order per hook.
pub(crate) async fn plugins(
    State(state): State<ConsoleState>,
    _admin: Admin,
) -> Result<Json<Value>, ConsoleError> {
    let ops = state.ops();
    let (report, registry, stats) = tokio::join!(
        hookbus::ops::health::check(&ops),
        hookbus::ops::registry::fetch(&ops),
        ask_bus(&state, "stats"),
    );
    let report = report.map_err(ops_error)?;
    let registry = registry.ok();
    let stats = stats.unwrap_or(Value::Null);
    let bus_plugins = report.bus.as_ref().map(|b| &b.plugins);
    let mut plugins = Vec::new();
    for line in &report.plugins {
        let entry = registry.as_ref().and_then(|r| r.plugins.get(&line.plugin));
        let health = bus_plugins.and_then(|p| p.get(&line.plugin));
        let handlers: Vec<Value> = entry
            .map(|e| {
                e.manifest
                    .handlers
                    .iter()
                    .map(|h| {
                        let s = &stats["handlers"][&line.plugin][&h.name];
                        json!({
                            "name": h.name,
                            "hook": h.hook.name(),
                            "priority": h.priority,
                            "entities": h.entities,
                            "timeout_ms": u64::try_from(h.timeout().as_millis()).unwrap_or(u64::MAX),
                            "retry_backoff_ms": h.retry_backoff_ms,
                            "deliveries": s["deliveries"],
                            "successes": s["successes"],
                            "errors": s["errors"],
                            "retries": s["retries"],
                            "dead_letters": s["dead_letters"],
                            "deferred": s["deferred"],
                            "error_rate": error_rate(s),
                            "last_success": s["last_success"],
                            "last_error": s["last_error"],
                            "last_error_at": s["last_error_at"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        plugins.push(json!({
            "id": line.plugin,
            "name": entry.map(|e| e.manifest.name.clone()),
            "version": entry.map(|e| e.manifest.version.clone()),
            "status": line.status,
            "registered": line.registered,
            "enabled": line.enabled,
            "replicas": line.replicas,
            "deferred": line.deferred,
            "dead_letters": line.dead_letters,
            "lag": health.map(|h| h.lag),
            "degraded": health.is_some_and(|h| h.degraded),
            "last_success": line.last_success,
            "last_error": line.last_error,
            "last_error_at": line.last_error_at,
            "handlers": handlers,
        }));
    }
    let mut order = Vec::new();
    if let Some(view) = &registry {
        let table = view.table(&ops);
        for hook in Hook::ALL {
            let routes = table.handlers(hook);
            if routes.is_empty() {
                continue;
            }
            let handlers: Vec<Value> = routes
                .iter()
                .map(|r| {
                    json!({
                        "plugin": r.plugin, "handler": r.handler, "priority": r.priority,
                        "entities": r.entities,
                    })
                })
                .collect();
            order.push(json!({"hook": hook.name(), "handlers": handlers}));
        }
    }
    let bus = report.bus.as_ref().map(|b| {
        json!({
            "status": b.status, "nats": b.nats, "dispatcher_role": b.dispatcher_role,
            "partitions": b.partitions, "enabled_plugins": b.enabled_plugins,
            "pending": b.pending, "ack_pending": b.ack_pending, "events_acked": b.events_acked,
            "alerts": b.alerts,
        })
    });
    Ok(Json(json!({
        "healthy": report.healthy,
        "problems": report.problems,
        "warnings": report.warnings,
        "notes": report.notes,
        "backlog": report.backlog,
        "bus": bus,
        "plugins": plugins,
        "order": order,
        "rejected": registry.as_ref().map(|r| r.rejected.clone()),
    })))
}

/// A stored event, found by sequence or id.
struct Found {
    seq: u64,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    stored: DateTime<Utc>,
}

async fn event_by_seq(state: &ConsoleState, seq: u64) -> Result<Found, ConsoleError> {
    let stream = state
        .inner
        .js
        .get_stream(state.subjects().events_stream())
        .await
        .map_err(|e| ConsoleError::nats("cannot open the events stream")(e.into()))?;
    match stream.get_raw_message(seq).await {
        Ok(m) => Ok(Found {
            seq,
            subject: m.subject.to_string(),
            headers: m.headers,
            payload: m.payload,
            stored: hookbus_kit::replay::to_chrono(m.time),
        }),
        Err(e)
            if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
        {
            Err(ConsoleError::NotFound(format!(
                "no event #{seq} in the events stream (never stored, or removed by its retention)"
            )))
        }
        Err(e) => Err(ConsoleError::nats("cannot read the events stream")(
            e.into(),
        )),
    }
}

/// Reads the events stored from a little before the time in the UUIDv7 `id` on,
/// at most [`ID_SCAN_MAX`], for the one whose `Nats-Msg-Id` is `id`.
async fn event_by_id(state: &ConsoleState, id: &str) -> Result<Found, ConsoleError> {
    let uuid = uuid::Uuid::parse_str(id.trim())
        .map_err(|e| ConsoleError::Invalid(format!("'{id}' is not an event id (a UUID): {e}")))?;
    let (secs, nanos) = uuid
        .get_timestamp()
        .ok_or_else(|| {
            ConsoleError::Invalid(format!("'{id}' is not an event id: events have UUIDv7 ids"))
        })?
        .to_unix();
    let start = i128::from(secs) * 1_000_000_000 + i128::from(nanos)
        - i128::from(u64::try_from(ID_SCAN_SLACK.as_nanos()).unwrap_or(0));
    let start_time = async_nats::datetime::from_nanos(start.max(0))
        .map_err(ConsoleError::nats("the event id's time"))?;
    let id = uuid.to_string();
    let consumer = state
        .inner
        .js
        .get_stream(state.subjects().events_stream())
        .await
        .map_err(|e| ConsoleError::nats("cannot open the events stream")(e.into()))?
        .create_consumer(OrderedConfig {
            filter_subject: state.subjects().all_events(),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .map_err(|e| ConsoleError::nats("cannot read the events stream")(e.into()))?;
    let pending = consumer.cached_info().num_pending.min(ID_SCAN_MAX);
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ConsoleError::nats("cannot read the events stream")(e.into()))?
        .take(usize::try_from(pending).unwrap_or(usize::MAX));
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| ConsoleError::nats("reading events")(e.into()))?;
        let headers = msg.headers.clone().unwrap_or_default();
        if headers
            .get(headers::MSG_ID)
            .is_some_and(|v| v.as_str() == id)
        {
            let info = msg
                .info()
                .map_err(|e| ConsoleError::nats("reading events")(e))?;
            return Ok(Found {
                seq: info.stream_sequence,
                subject: msg.subject.to_string(),
                headers,
                stored: hookbus_kit::replay::to_chrono(info.published),
                payload: msg.payload.clone(),
            });
        }
    }
    Err(ConsoleError::NotFound(format!(
        "no event {id} among the {pending} events stored from 5 s before its time on"
    )))
}

/// Where the dispatcher is with event `seq`: `done` (at or below the ack floor of
/// its partition's consumer: every handler succeeded, was dead-lettered or
/// deferred), `in_progress` (delivered to the bus, not yet below the floor),
/// `waiting`, or `unknown`.
async fn dispatch_state(state: &ConsoleState, seq: u64, partition: Option<u32>) -> Value {
    let js = &state.inner.js;
    let subjects = state.subjects();
    let count = hookbus::provision::events_partitions(js, subjects)
        .await
        .ok()
        .flatten()
        .unwrap_or(1);
    let name = hookbus::dispatch::Partition {
        index: partition.unwrap_or(0),
        count,
    }
    .consumer(&hookbus::config::DispatcherSettings::default().consumer);
    let info = match js.get_stream(subjects.events_stream()).await {
        Ok(stream) => stream.consumer_info(&name).await.ok(),
        Err(_) => None,
    };
    let Some(info) = info else {
        return json!({"state": "unknown", "consumer": name,
            "message": "the dispatcher's consumer cannot be read (no bus has run yet?)"});
    };
    let floor = info.ack_floor.stream_sequence;
    let delivered = info.delivered.stream_sequence;
    let state = if seq <= floor {
        "done"
    } else if seq <= delivered {
        "in_progress"
    } else {
        "waiting"
    };
    json!({"state": state, "consumer": name, "ack_floor": floor, "delivered": delivered})
}

/// Deferred deliveries of event `id`: (plugin, handler) of each.
async fn deferred_of(state: &ConsoleState, id: &str) -> (Vec<(String, String)>, bool) {
    let mut out = Vec::new();
    let Ok(mut stream) = state
        .inner
        .js
        .get_stream(state.subjects().deferred_stream())
        .await
    else {
        return (out, false);
    };
    let Ok(info) = stream.info().await else {
        return (out, false);
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if info.state.messages == 0 {
        return (out, false);
    }
    let end = last.min(first.saturating_add(DEFERRED_SCAN_MAX - 1));
    let prefix = format!("{id}.");
    for seq in first..=end {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        if m.headers
            .get(headers::MSG_ID)
            .is_some_and(|v| v.as_str().starts_with(&prefix))
        {
            let get = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned());
            if let (Some(p), Some(h)) = (get(headers::PLUGIN), get(headers::HANDLER)) {
                out.push((p, h));
            }
        }
    }
    (out, end < last)
}

/// `GET /api/console/journey?seq=<n>` or `?id=<event id>`: one event, where the
/// dispatcher is with it, and per handler that matches it now what became of
/// its delivery.
pub(crate) async fn journey(
    State(state): State<ConsoleState>,
    _admin: Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ConsoleError> {
    let found = match (
        q.get("seq").filter(|s| !s.is_empty()),
        q.get("id").filter(|s| !s.is_empty()),
    ) {
        (Some(_), _) => event_by_seq(&state, number(&q, "seq", 0)?).await?,
        (None, Some(id)) => event_by_id(&state, id).await?,
        (None, None) => {
            return Err(ConsoleError::Invalid(
                "say which event: ?seq=<stream sequence> or ?id=<event id>".into(),
            ));
        }
    };
    let stored = found
        .stored
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let event = summary(
        state.subjects(),
        found.seq,
        &found.subject,
        Some(&found.headers),
        &found.payload,
        Some(stored),
    );
    let event_id = found
        .headers
        .get(headers::MSG_ID)
        .map(|v| v.as_str().to_owned())
        .or_else(|| event["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut header_list: Vec<(String, String)> = found
        .headers
        .iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| (k.to_string(), v.as_str().to_owned()))
        })
        .collect();
    header_list.sort();
    let envelope: Value = serde_json::from_slice(&found.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&found.payload).into_owned()));
    let ops = state.ops();
    let partition = event["partition"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok());
    let of_event = Selection {
        event_id: Some(event_id.clone()),
        ..Default::default()
    };
    let (dispatch, registry, stats, letters, (deferred, deferred_truncated)) = tokio::join!(
        dispatch_state(&state, found.seq, partition),
        hookbus::ops::registry::fetch(&ops),
        ask_bus(&state, "stats"),
        dlq::list(&state, &of_event, 100),
        deferred_of(&state, &event_id),
    );
    let (letters, _) = letters?;
    let stats = stats.unwrap_or(Value::Null);
    let done = dispatch["state"] == "done";
    let mut handlers = Vec::new();
    if let (Ok(view), Some(hook), Some(entity)) = (
        &registry,
        event["hook"].as_str().and_then(|h| Hook::parse(h).ok()),
        event["entity"].as_str(),
    ) {
        let table = view.table(&ops);
        for (i, r) in table.matching(hook, entity).enumerate() {
            let letter = letters
                .iter()
                .find(|l| l.record["plugin"] == *r.plugin && l.record["handler"] == *r.handler);
            let is_deferred = deferred
                .iter()
                .any(|(p, h)| **p == *r.plugin && **h == *r.handler);
            let status = match (letter, is_deferred, dispatch["state"].as_str()) {
                (Some(_), _, _) => "dead_lettered",
                (None, true, _) => "deferred",
                (None, false, Some("done")) => "succeeded",
                (None, false, Some("in_progress")) => "in_progress",
                (None, false, Some("waiting")) => "waiting",
                _ => "unknown",
            };
            handlers.push(json!({
                "position": i + 1,
                "plugin": r.plugin,
                "handler": r.handler,
                "priority": r.priority,
                "status": status,
                "dead_letter": letter.map(|l| json!({
                    "seq": l.seq,
                    "error": l.record["error"],
                    "attempts": l.record["attempts"],
                    "dead_lettered_at": l.record["dead_lettered_at"],
                })),
                "stats": stats["handlers"][&*r.plugin][&*r.handler],
            }));
        }
    }
    Ok(Json(json!({
        "event": event,
        "event_id": event_id,
        "headers": header_list,
        "envelope": envelope,
        "dispatch": dispatch,
        "finished": done,
        "registry_answered": registry.is_ok(),
        "handlers": handlers,
        "dead_letters": letters,
        "deferred_scan_truncated": deferred_truncated,
    })))
}

/// A `since` / `until` bound of the query: a sequence, an RFC 3339 time or a
/// duration ago (`2h`).
fn bound(
    q: &HashMap<String, String>,
    key: &str,
) -> Result<Option<hookbus::dlq::Bound>, ConsoleError> {
    q.get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(|v| {
            hookbus::dlq::Bound::parse(v).map_err(|e| ConsoleError::Invalid(format!("{key}: {e}")))
        })
        .transpose()
}

/// `GET /api/console/dlq?plugin=&handler=&hook=&entity=&event_id=&error=&code=&since=&until=&limit=`.
pub(crate) async fn dlq_list(
    State(state): State<ConsoleState>,
    _admin: Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ConsoleError> {
    let text = |k: &str| {
        q.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let (hook, entity) = parse_filter(&q)?;
    let sel = Selection {
        plugin: text("plugin"),
        handler: text("handler"),
        hook,
        entity,
        event_id: text("event_id"),
        error: text("error"),
        since: bound(&q, "since")?,
        until: bound(&q, "until")?,
        code: text("code")
            .map(|c| {
                c.parse::<u16>().map_err(|_| {
                    ConsoleError::Invalid(format!("code: '{c}' is not an error code (100–599)"))
                })
            })
            .transpose()?,
    };
    if sel.handler.is_some() && sel.plugin.is_none() {
        return Err(ConsoleError::Invalid("'handler' needs 'plugin'".into()));
    }
    let limit = usize::try_from(number(&q, "limit", 200)?.clamp(1, 1000)).unwrap_or(200);
    let (letters, total) = dlq::list(&state, &sel, limit).await?;
    Ok(Json(
        json!({"letters": letters, "total": total, "shown": letters.len()}),
    ))
}

fn parse_seq(seq: &str) -> Result<u64, ConsoleError> {
    seq.parse().map_err(|_| {
        ConsoleError::Invalid(format!(
            "'{seq}' is not a dead letter's sequence (a whole number)"
        ))
    })
}

/// `GET /api/console/dlq/{seq}`.
pub(crate) async fn dlq_get(
    State(state): State<ConsoleState>,
    _admin: Admin,
    Path(seq): Path<String>,
) -> Result<Json<dlq::Letter>, ConsoleError> {
    Ok(Json(dlq::get(&state, parse_seq(&seq)?).await?))
}

/// `POST /api/console/dlq/{seq}/replay`: one attempt to its handler.
pub(crate) async fn dlq_replay(
    State(state): State<ConsoleState>,
    admin: Admin,
    Path(seq): Path<String>,
) -> Result<Json<Value>, ConsoleError> {
    let seq = parse_seq(&seq)?;
    Ok(Json(dlq::replay(&state, seq, admin.actor()).await?))
}

/// The body of `POST /api/console/dlq/replay` and `POST /api/console/dlq/purge`:
/// the dead letters `filter` selects (the filters of `hookbus dlq`; an empty one
/// needs `"all": true`). Without `"confirm": true` only a dry run: how many, and
/// the first few.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    #[serde(default)]
    filter: hookbus::dlq::Filter,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    confirm: bool,
    /// Replays only: at most this many per second (`20/s`, `600/m`; default 10/s).
    rate: Option<String>,
}

impl BulkBody {
    fn parse(body: &Bytes, what: &str) -> Result<(BulkBody, hookbus::dlq::Target), ConsoleError> {
        let body: BulkBody = hookbus::dlq::from_json(body).map_err(|e| {
            ConsoleError::Invalid(format!(
                "{what}: {e} (the body is JSON {{\"filter\": {{plugin, handler, hook, entity, since, until, error, code}}, \"all\", \"confirm\"}})"
            ))
        })?;
        let target = hookbus::dlq::Target::new(&[], &body.filter, body.all)
            .map_err(|e| ConsoleError::Invalid(format!("{what}: {e}")))?;
        Ok((body, target))
    }
}

/// `POST /api/console/dlq/replay` `{"filter", "all", "confirm", "rate"}`: replays
/// what the filter selects when the run starts, one at a time at the rate (the
/// answer comes when the run is over); without `confirm` a dry run.
pub(crate) async fn dlq_replay_bulk(
    State(state): State<ConsoleState>,
    admin: Admin,
    body: Bytes,
) -> Result<Json<Value>, ConsoleError> {
    let (body, target) = BulkBody::parse(&body, "replay")?;
    let rate = match body.rate.as_deref() {
        Some(r) => hookbus::dlq::parse_rate(r)
            .map_err(|e| ConsoleError::Invalid(format!("replay: rate: {e}")))?,
        None => hookbus::dlq::DEFAULT_RATE,
    };
    let report = dlq::replay_bulk(&state, &target, !body.confirm, rate, admin.actor()).await?;
    let mut answer = serde_json::to_value(&report).unwrap_or(Value::Null);
    answer["selection"] = target.describe().into();
    Ok(Json(answer))
}

/// `POST /api/console/dlq/purge` `{"filter", "all", "confirm"}`: deletes what the
/// filter selects when it starts; without `confirm` a dry run.
pub(crate) async fn dlq_purge(
    State(state): State<ConsoleState>,
    admin: Admin,
    body: Bytes,
) -> Result<Json<Value>, ConsoleError> {
    let (body, target) = BulkBody::parse(&body, "purge")?;
    let report = dlq::purge(&state, &target, !body.confirm, admin.actor()).await?;
    let mut answer = serde_json::to_value(&report).unwrap_or(Value::Null);
    answer["selection"] = target.describe().into();
    Ok(Json(answer))
}

/// Any other path.
pub(crate) async fn not_found(uri: axum::http::Uri) -> ConsoleError {
    ConsoleError::NotFound(format!("no such page or API route: {}", uri.path()))
}

/// A path that exists with another method.
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ConsoleError {
    ConsoleError::MethodNotAllowed(format!("{method} is not allowed here"))
}
