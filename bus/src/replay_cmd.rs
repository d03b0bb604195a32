//! `hookbus replay`: stored events, from the start, a stream sequence or a time,
//! filtered by hook and entity, written to stdout as JSON lines or re-delivered
//! to one plugin handler; up to the head of the stream, or following new events.
//!
//! Built on [`hookbus_kit::replay::replay_events`]; with
//! [`ReplayCommand::latest_per_object`], on
//! [`hookbus_kit::backfill::latest_events`] (the latest event of every object). A position the stream
//! no longer holds is refused with the oldest retained sequence, its time and
//! the stream's retention ([`ReplayError::BeforeOldest`]).
//!
//! - **stdout**: one JSON object per event and line,
//!   `{"seq":…,"time":"…","subject":"…","event":{…the envelope…}}`, where `time`
//!   is when the stream stored the event.
//! - **re-delivery** to `<prefix>.hooks.<plugin>.<handler>`: one request per event,
//!   in stream order, with the headers the dispatcher sends (`Pagoda-Stream-Seq`,
//!   `Pagoda-Attempt: 1`, `Pagoda-Redelivered: 1`, `Pagoda-Plugin`,
//!   `Pagoda-Handler`, the event's own headers) plus `Pagoda-Replay: true`. A
//!   failure is reported (stderr) and the replay goes on; no retries. "No
//!   responders" (no replica running) stops the replay.
//!
//! Progress and failed re-deliveries go to a [`Progress`] ([`run_with_progress`]):
//! the `hookbus` binary draws a bar (events done / total, rate) on stderr when it
//! is a terminal, and progress lines when [`ReplayCommand::progress`] forces them.

use std::io::Write;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, HeaderValue};
use core_events::protocol::{HandlerReply, codes, headers};
use core_events::{Hook, ObjectKey, PluginManifest, Subjects};
use futures::StreamExt;
use hookbus_kit::backfill::{BackfillOptions, latest_events};
use hookbus_kit::replay::{ReplayError, ReplayFrom, ReplayOptions, ReplayedEvent};
use serde_json::value::RawValue;

use crate::progress::{Progress, Silent};

/// Default wait for a handler's reply when its manifest is not in the registry.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where replayed events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// JSON lines on the output writer.
    Stdout,
    /// Re-delivered to one handler of one plugin.
    Plugin {
        /// The plugin id.
        plugin: String,
        /// The handler name.
        handler: String,
        /// How long to wait for each reply (default: the handler's `timeout_ms`
        /// from its manifest, else [`DEFAULT_HANDLER_TIMEOUT`]).
        timeout: Option<Duration>,
    },
}

/// What `hookbus replay` does.
#[derive(Debug, Clone)]
pub struct ReplayCommand {
    /// Where to start.
    pub from: ReplayFrom,
    /// Only these hooks (empty: every hook; with a plugin target: the handler's hook).
    pub hooks: Vec<Hook>,
    /// Only these entities (empty: every entity; with a plugin target: the
    /// handler's entity filter).
    pub entities: Vec<String>,
    /// Only these objects (`entry/42`; empty: every object): their history.
    pub objects: Vec<ObjectKey>,
    /// Only the latest event of every object (as of the stream's last sequence
    /// when the replay starts), in stream order; `from` must be the start. With
    /// `follow`, then every later event. See [`hookbus_kit::backfill`].
    pub latest_per_object: bool,
    /// Keep going with new events after the head (until interrupted).
    pub follow: bool,
    /// Where the events go.
    pub target: Target,
    /// Progress on stderr even when it is not a terminal (plain lines, every second).
    pub progress: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Events read.
    pub events: u64,
    /// Re-deliveries that failed (always 0 for stdout).
    pub failed: u64,
    /// First and last sequence read.
    pub seqs: Option<(u64, u64)>,
}

/// Why `hookbus replay` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayCmdError {
    /// The replay could not start or go on.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The plugin does not declare the handler.
    #[error("plugin '{plugin}' declares no handler '{handler}'; its handlers: {known}")]
    UnknownHandler {
        /// The plugin id.
        plugin: String,
        /// The handler asked for.
        handler: String,
        /// The handlers it has.
        known: String,
    },
    /// The filters do not fit the handler.
    #[error("{0}")]
    Usage(String),
    /// No replica of the plugin answers.
    #[error(
        "no replica of plugin '{plugin}' is running (no responders on {subject}); {done} event(s) were re-delivered before it; start the plugin and replay from sequence {next}"
    )]
    NoResponders {
        /// The plugin id.
        plugin: String,
        /// The endpoint subject.
        subject: String,
        /// Events re-delivered before.
        done: u64,
        /// Where to replay from.
        next: u64,
    },
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the replay; JSON lines go to `out`; progress and failed re-deliveries
/// are not shown ([`run_with_progress`] shows them).
///
/// # Errors
///
/// [`ReplayCmdError`]: a replay that cannot start (position no longer held, bad
/// filters, no stream), an unknown handler, no replica running, or a write error.
/// Failed re-deliveries are not errors: they are counted in
/// [`ReplaySummary::failed`].
pub async fn run(
    client: &async_nats::Client,
    subjects: &Subjects,
    cmd: &ReplayCommand,
    out: &mut (dyn Write + Send),
) -> Result<ReplaySummary, ReplayCmdError> {
    run_with_progress(client, subjects, cmd, out, &Silent).await
}

/// [`run`], reporting to `progress`: started with the events in the stream
/// (`replay`), each event read, and a line per failed re-delivery.
///
/// # Errors
///
/// As [`run`].
pub async fn run_with_progress(
    client: &async_nats::Client,
    subjects: &Subjects,
    cmd: &ReplayCommand,
    out: &mut (dyn Write + Send),
    progress: &dyn Progress,
) -> Result<ReplaySummary, ReplayCmdError> {
    let js = async_nats::jetstream::new(client.clone());
    let mut hooks = cmd.hooks.clone();
    let mut entities = cmd.entities.clone();
    let delivery = match &cmd.target {
        Target::Stdout => None,
        Target::Plugin {
            plugin,
            handler,
            timeout,
        } => {
            let manifest = registered_manifest(&js, subjects, plugin).await;
            let mut wait = timeout.unwrap_or(DEFAULT_HANDLER_TIMEOUT);
            match &manifest {
                Some(m) => {
                    let Some(spec) = m.handlers.iter().find(|h| h.name == *handler) else {
                        return Err(ReplayCmdError::UnknownHandler {
                            plugin: plugin.clone(),
                            handler: handler.clone(),
                            known: m
                                .handlers
                                .iter()
                                .map(|h| format!("{} ({})", h.name, h.hook))
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    };
                    if let Some(other) = hooks.iter().find(|h| **h != spec.hook) {
                        return Err(ReplayCmdError::Usage(format!(
                            "handler '{handler}' of plugin '{plugin}' takes '{}' events only; --hook {other} does not fit it (leave --hook out to replay its hook)",
                            spec.hook
                        )));
                    }
                    hooks = vec![spec.hook];
                    if entities.is_empty()
                        && let Some(filter) = &spec.entities
                    {
                        entities = filter.clone();
                    }
                    if timeout.is_none() {
                        wait = spec.timeout();
                    }
                }
                None => tracing::warn!(
                    plugin = %plugin,
                    "plugin is not in the registry; re-delivering every matching event to {} anyway",
                    subjects.handler(plugin, handler)
                ),
            }
            Some(Redeliver {
                client: client.clone(),
                plugin: plugin.clone(),
                handler: handler.clone(),
                subject: subjects.handler(plugin, handler),
                timeout: wait,
            })
        }
    };
    let options = ReplayOptions {
        from: cmd.from,
        hooks,
        entities,
        objects: cmd.objects.clone(),
        until_caught_up: !cmd.follow,
    };
    type Events =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ReplayedEvent, ReplayError>> + Send>>;
    let (mut events, total): (Events, u64) = if cmd.latest_per_object {
        if cmd.from != ReplayFrom::Start {
            return Err(ReplayCmdError::Usage(format!(
                "--latest-per-object reads the latest event of every object; it does not start at {} (leave --from-seq/--from-time out)",
                cmd.from
            )));
        }
        let backfill = BackfillOptions {
            hooks: options.hooks,
            entities: options.entities,
            objects: options.objects,
            follow: cmd.follow,
        };
        let latest = latest_events(&js, subjects, backfill).await?;
        let count = latest.latest_count() as u64;
        (Box::pin(latest), count)
    } else {
        let events = hookbus_kit::replay::replay_events(&js, subjects, options).await?;
        let total = events.total_at_start();
        (Box::pin(events), total)
    };
    progress.start("replay", Some(total));
    let mut summary = ReplaySummary::default();
    let mut buffered = std::io::BufWriter::new(out);
    while let Some(event) = events.next().await {
        let event = event?;
        let seq = event.stream_seq;
        summary.seqs = Some(summary.seqs.map_or((seq, seq), |(first, _)| (first, seq)));
        summary.events += 1;
        match &delivery {
            None => {
                write_line(&mut buffered, &event)?;
                if cmd.follow {
                    buffered.flush()?;
                }
            }
            Some(d) => match d.send(&event).await {
                Sent::Ok => {}
                Sent::Failed(error) => {
                    summary.failed += 1;
                    let event_id = event.header(headers::MSG_ID).unwrap_or("?");
                    progress.note(&format!(
                        "hookbus: replay: seq={seq} event={event_id} to {}/{} failed: {error}",
                        d.plugin, d.handler
                    ));
                }
                Sent::NoResponders => {
                    progress.finish();
                    return Err(ReplayCmdError::NoResponders {
                        plugin: d.plugin.clone(),
                        subject: d.subject.clone(),
                        done: summary.events - 1,
                        next: seq,
                    });
                }
            },
        }
        progress.set(summary.events);
    }
    buffered.flush()?;
    progress.finish();
    Ok(summary)
}

/// `{"seq":…,"time":"…","subject":"…","event":…}`.
fn write_line(out: &mut dyn Write, event: &ReplayedEvent) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        seq: u64,
        time: String,
        subject: &'a str,
        event: EventJson<'a>,
    }
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum EventJson<'a> {
        Raw(&'a RawValue),
        Text(String),
    }
    let text = std::str::from_utf8(&event.payload).ok();
    let raw = text.and_then(|t| serde_json::from_str::<&RawValue>(t).ok());
    let line = Line {
        seq: event.stream_seq,
        time: event
            .time
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        subject: &event.subject,
        event: match raw {
            Some(raw) => EventJson::Raw(raw),
            None => EventJson::Text(String::from_utf8_lossy(&event.payload).into_owned()),
        },
    };
    serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

/// The plugin's manifest from the registry bucket, when it is there.
async fn registered_manifest(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    plugin: &str,
) -> Option<PluginManifest> {
    let store = js.get_key_value(subjects.registry_bucket()).await.ok()?;
    let bytes = store
        .get(core_events::manifest::registry_key(plugin))
        .await
        .ok()??;
    PluginManifest::from_json(&bytes).ok()
}

/// Re-delivers events to one handler endpoint.
struct Redeliver {
    client: async_nats::Client,
    plugin: String,
    handler: String,
    subject: String,
    timeout: Duration,
}

enum Sent {
    Ok,
    Failed(String),
    NoResponders,
}

impl Redeliver {
    async fn send(&self, event: &ReplayedEvent) -> Sent {
        let mut h: HeaderMap = event.headers.clone();
        h.insert(headers::STREAM_SEQ, HeaderValue::from(event.stream_seq));
        h.insert(headers::ATTEMPT, HeaderValue::from(1u32));
        h.insert(headers::REDELIVERED, HeaderValue::from(1u64));
        h.insert(headers::PLUGIN, self.plugin.as_str());
        h.insert(headers::HANDLER, self.handler.as_str());
        h.insert(headers::REPLAY, "true");
        let request = async_nats::Request::new()
            .payload(event.payload.clone())
            .headers(h)
            .timeout(Some(self.timeout));
        match self
            .client
            .send_request(self.subject.clone(), request)
            .await
        {
            Ok(reply) => {
                let header = |name: &str| {
                    reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name).map(|v| v.to_string()))
                };
                if let Some(text) = header(headers::SERVICE_ERROR) {
                    let code = header(headers::SERVICE_ERROR_CODE)
                        .and_then(|c| c.trim().parse::<u16>().ok())
                        .unwrap_or(codes::TRANSIENT);
                    return Sent::Failed(format!("handler error {code}: {text}"));
                }
                match HandlerReply::parse(&reply.payload) {
                    Ok(_) => Sent::Ok,
                    Err(e) => Sent::Failed(format!("bad reply: {e}")),
                }
            }
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => Sent::NoResponders,
                RequestErrorKind::TimedOut => {
                    Sent::Failed(format!("no reply within {} ms", self.timeout.as_millis()))
                }
                _ => Sent::Failed(format!("request failed: {e}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_the_envelope_verbatim() {
        let mut out = Vec::new();
        let event = ReplayedEvent::new(
            "pagoda.events.entry.after_create.customer.20.0",
            HeaderMap::new(),
            bytes::Bytes::from_static(br#"{"id":"x","data":{"a":1}}"#),
            7,
            chrono::Utc::now(),
            0,
        );
        write_line(&mut out, &event).unwrap();
        let line = String::from_utf8(out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(
            v["subject"],
            "pagoda.events.entry.after_create.customer.20.0"
        );
        assert_eq!(v["event"]["data"]["a"], 1);
        assert!(line.ends_with('\n'));
        let mut out = Vec::new();
        let event = ReplayedEvent::new(
            "s",
            HeaderMap::new(),
            bytes::Bytes::from_static(b"\x00not json"),
            8,
            chrono::Utc::now(),
            0,
        );
        write_line(&mut out, &event).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["event"].as_str().unwrap().contains("not json"));
    }
}
