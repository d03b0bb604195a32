//! `hookbus replay`: stored events, from the start, a stream sequence or a time,
//! filtered by hook and entity, written to stdout as JSON lines or re-delivered
//! to one plugin handler; up to the head of the stream, or following new events.
//!
//! Built on [`pagoda_plugin_sdk::replay::replay_events`]. A position the stream
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
//! A progress bar (events done / total, rate) is drawn on stderr when it is a
//! terminal; [`ReplayCommand::progress`] forces progress lines when it is not.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, HeaderValue};
use core_events::protocol::{HandlerReply, codes, headers};
use core_events::{Hook, PluginManifest, Subjects};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagoda_plugin_sdk::replay::{ReplayError, ReplayFrom, ReplayOptions, ReplayedEvent};
use serde_json::value::RawValue;

/// Default wait for a handler's reply when its manifest is not in the registry.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

/// Replay stored events: print them as JSON lines, or re-deliver them to one
/// plugin handler.
///
/// Reads the events stream from the oldest retained event (default), a stream
/// sequence or a time, filtered by hook and entity, up to the head of the stream
/// (or, with --follow, on with new events). A start the stream no longer holds
/// (removed by its retention) is an error naming the oldest retained sequence.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  hookbus replay                                          every retained event, as JSON lines
  hookbus replay --from-seq 1200 --hook entry.after_update --entity customer
  hookbus replay --from-time 2026-11-24T00:00:00Z --follow | jq .event.id
  hookbus replay --hook after_create_entry_v2 > creates.jsonl        (legacy names work)
  hookbus replay --to-plugin audit-log --handler entry_after_create   re-deliver to a handler
  hookbus replay --from-seq 500 --to-plugin crm --handler sync --progress

Each stdout line: {\"seq\":N,\"time\":\"<stored at>\",\"subject\":\"...\",\"event\":{<envelope>}}.
Re-deliveries carry Pagoda-Replay: true; failures are reported on stderr, the replay
goes on, and the exit status is 1 if any failed.")]
pub struct ReplayArgs {
    /// Start at this stream sequence (0: the oldest retained event).
    #[arg(long, value_name = "N", conflicts_with = "from_time")]
    pub from_seq: Option<u64>,
    /// Start at the first event stored at or after this time (RFC 3339, e.g.
    /// 2026-11-24T16:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub from_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events of this hook (repeatable; standard names or legacy aliases).
    #[arg(long = "hook", value_name = "HOOK", value_parser = parse_hook)]
    pub hooks: Vec<Hook>,
    /// Only events about this entity (repeatable; the exact entity name).
    #[arg(long = "entity", value_name = "NAME")]
    pub entities: Vec<String>,
    /// Stop at the head of the stream (default true; false is --follow).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub until_caught_up: bool,
    /// Keep going with new events after the head, until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Where events go (stdout: JSON lines).
    #[arg(long, value_enum, default_value_t = To::Stdout, conflicts_with = "to_plugin")]
    pub to: To,
    /// Re-deliver to this plugin instead (with --handler).
    #[arg(long, value_name = "PLUGIN", requires = "handler")]
    pub to_plugin: Option<String>,
    /// The handler of --to-plugin; its hook and entity filter are the default filters.
    #[arg(long, value_name = "HANDLER", requires = "to_plugin")]
    pub handler: Option<String>,
    /// Reply timeout per re-delivery, in ms (default: the handler's timeout_ms).
    #[arg(long, value_name = "MS", requires = "to_plugin")]
    pub timeout_ms: Option<u64>,
    /// Show progress on stderr even when it is not a terminal (a line per second).
    #[arg(long)]
    pub progress: bool,
}

/// Output of `hookbus replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum To {
    /// JSON lines on standard output.
    Stdout,
}

fn parse_time(value: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!("'{value}' is not an RFC 3339 time ({e}); use e.g. 2026-11-24T16:00:00Z")
        })
}

fn parse_hook(value: &str) -> Result<Hook, String> {
    Hook::parse(value.trim()).map_err(|e| e.to_string())
}

impl ReplayArgs {
    /// The command these arguments ask for.
    pub fn command(&self) -> ReplayCommand {
        let from = match (self.from_seq, self.from_time) {
            (Some(n), _) => ReplayFrom::Sequence(n),
            (None, Some(t)) => ReplayFrom::Time(t),
            (None, None) => ReplayFrom::Start,
        };
        let target = match (&self.to_plugin, &self.handler) {
            (Some(plugin), Some(handler)) => Target::Plugin {
                plugin: plugin.clone(),
                handler: handler.clone(),
                timeout: self.timeout_ms.map(Duration::from_millis),
            },
            _ => Target::Stdout,
        };
        ReplayCommand {
            from,
            hooks: self.hooks.clone(),
            entities: self.entities.clone(),
            follow: self.follow || !self.until_caught_up,
            target,
            progress: self.progress,
        }
    }
}

/// `hookbus replay`: runs [`run`] to stdout, reports on stderr; exit status 1
/// when a re-delivery failed.
///
/// # Errors
///
/// As [`run`] (a closed stdout, e.g. `| head`, is not an error).
pub async fn main(
    client: &async_nats::Client,
    subjects: &Subjects,
    args: &ReplayArgs,
) -> Result<ExitCode, ReplayCmdError> {
    let cmd = args.command();
    let started = Instant::now();
    let summary = match run(client, subjects, &cmd, &mut std::io::stdout()).await {
        Ok(summary) => summary,
        Err(ReplayCmdError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    };
    let range = summary
        .seqs
        .map_or_else(String::new, |(a, b)| format!(", sequences {a}..={b}"));
    let to = match &cmd.target {
        Target::Stdout => String::new(),
        Target::Plugin {
            plugin, handler, ..
        } => format!(" re-delivered to {plugin}/{handler}"),
    };
    eprintln!(
        "hookbus: replay: {} event(s){to}{range} in {:.1?}{}",
        summary.events,
        started.elapsed(),
        if summary.failed > 0 {
            format!("; {} failed (see above)", summary.failed)
        } else {
            String::new()
        }
    );
    Ok(if summary.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

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

/// Runs the replay; JSON lines go to `out`, progress and failures to stderr.
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
        until_caught_up: !cmd.follow,
    };
    let mut events = pagoda_plugin_sdk::replay::replay_events(&js, subjects, options).await?;
    let progress = Progress::new(events.total_at_start(), cmd.progress, cmd.follow);
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
        progress.tick(summary.events);
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

/// Progress on stderr: a bar on a terminal, plain lines when forced otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    lines: Option<std::sync::Mutex<(Instant, Instant)>>,
    total: u64,
}

impl Progress {
    fn new(total: u64, forced: bool, follow: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = if follow {
                "replay {spinner} {pos}/{len} events ({per_sec}, {elapsed}) then following"
            } else {
                "replay [{bar:30}] {pos}/{len} events ({per_sec}, {elapsed}, eta {eta})"
            };
            pb.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            pb
        });
        let now = Instant::now();
        Progress {
            bar,
            lines: (!tty && forced).then(|| std::sync::Mutex::new((now, now))),
            total,
        }
    }

    fn tick(&self, done: u64) {
        if let Some(pb) = &self.bar {
            if done > pb.length().unwrap_or(0) {
                pb.set_length(done);
            }
            pb.set_position(done);
        }
        if let Some(lines) = &self.lines
            && let Ok(mut times) = lines.lock()
        {
            let (started, last) = &mut *times;
            if last.elapsed() >= Duration::from_secs(1) {
                *last = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "hookbus: replay: {done}/{} events, {rate:.0}/s",
                    self.total.max(done)
                );
            }
        }
    }

    /// A line on stderr that does not garble the bar.
    fn note(&self, line: &str) {
        match &self.bar {
            Some(pb) => pb.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
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
            "pagoda.events.entry.after_create.customer",
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
        assert_eq!(v["subject"], "pagoda.events.entry.after_create.customer");
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
