//! `hookbus replay`'s arguments and its report on stderr, over
//! [`hookbus::replay_cmd`].

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use core_events::{Hook, Subjects};
use hookbus::progress::Progress;
use hookbus::replay_cmd::{ReplayCmdError, ReplayCommand, Target, run_with_progress};
use hookbus_kit::replay::ReplayFrom;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
  hookbus replay --latest-per-object --entity customer      the latest event of every customer
  hookbus replay --latest-per-object --follow              ...then every new event
  hookbus replay --to-plugin audit-log --handler entry_after_create   re-deliver to a handler
  hookbus replay --from-seq 500 --to-plugin crm --handler sync --progress

Each stdout line: {\"seq\":N,\"time\":\"<stored at>\",\"subject\":\"...\",\"event\":{<envelope>}}.
Re-deliveries carry Pagoda-Replay: true; failures are reported on stderr, the replay
goes on, and the exit status is 1 if any failed.")]
pub(crate) struct ReplayArgs {
    /// Start at this stream sequence (0: the oldest retained event).
    #[arg(long, value_name = "N", conflicts_with = "from_time")]
    pub(crate) from_seq: Option<u64>,
    /// Start at the first event stored at or after this time (RFC 3339, e.g.
    /// 2026-11-24T16:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = hookbus::config::parse_time)]
    pub(crate) from_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events of this hook (repeatable; standard names or legacy aliases).
    #[arg(long = "hook", value_name = "HOOK", value_parser = parse_hook)]
    pub(crate) hooks: Vec<Hook>,
    /// Only events about this entity (repeatable; the exact entity name).
    #[arg(long = "entity", value_name = "NAME")]
    pub(crate) entities: Vec<String>,
    /// Only events about this object: its history (repeatable; entry/42 or entity/7).
    #[arg(long = "object", value_name = "KIND/ID")]
    pub(crate) objects: Vec<core_events::ObjectKey>,
    /// Only the latest event of every object (as of the last stored event when
    /// the replay starts), in stream order: a new consumer's bootstrap. An
    /// object whose latest event is an after_delete gets it. With --follow, then
    /// every later event, without gap or duplicate.
    #[arg(long, conflicts_with_all = ["from_seq", "from_time"])]
    pub(crate) latest_per_object: bool,
    /// Stop at the head of the stream (default true; false is --follow).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) until_caught_up: bool,
    /// Keep going with new events after the head, until interrupted.
    #[arg(long)]
    pub(crate) follow: bool,
    /// Where events go (stdout: JSON lines).
    #[arg(long, value_enum, default_value_t = To::Stdout, conflicts_with = "to_plugin")]
    pub(crate) to: To,
    /// Re-deliver to this plugin instead (with --handler).
    #[arg(long, value_name = "PLUGIN", requires = "handler")]
    pub(crate) to_plugin: Option<String>,
    /// The handler of --to-plugin; its hook and entity filter are the default filters.
    #[arg(long, value_name = "HANDLER", requires = "to_plugin")]
    pub(crate) handler: Option<String>,
    /// Reply timeout per re-delivery, in ms (default: the handler's timeout_ms).
    #[arg(long, value_name = "MS", requires = "to_plugin")]
    pub(crate) timeout_ms: Option<u64>,
    /// Show progress on stderr even when it is not a terminal (a line per second).
    #[arg(long)]
    pub(crate) progress: bool,
}

/// Output of `hookbus replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum To {
    /// JSON lines on standard output.
    Stdout,
}

fn parse_hook(value: &str) -> Result<Hook, core_events::UnknownHook> {
    Hook::parse(value.trim())
}

impl ReplayArgs {
    /// The command these arguments ask for.
    pub(crate) fn command(&self) -> ReplayCommand {
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
            objects: self.objects.clone(),
            latest_per_object: self.latest_per_object,
            follow: self.follow || !self.until_caught_up,
            target,
            progress: self.progress,
        }
    }
}

/// `hookbus replay`: runs [`run_with_progress`] to stdout, reports on stderr; exit status 1
/// when a re-delivery failed.
///
/// # Errors
///
/// As [`run_with_progress`] (a closed stdout, e.g. `| head`, is not an error).
pub(crate) async fn main(
    client: &async_nats::Client,
    subjects: &Subjects,
    args: &ReplayArgs,
) -> Result<ExitCode, ReplayCmdError> {
    let cmd = args.command();
    let started = Instant::now();
    let progress = StderrProgress::new(cmd.progress, cmd.follow);
    let summary =
        match run_with_progress(client, subjects, &cmd, &mut std::io::stdout(), &progress).await {
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

/// Progress on stderr: a bar on a terminal, plain lines when forced otherwise.
#[derive(Debug)]
pub(crate) struct StderrProgress {
    /// stderr is a terminal: draw a bar.
    tty: bool,
    follow: bool,
    bar: OnceLock<ProgressBar>,
    lines: Option<Mutex<(Instant, Instant)>>,
    total: Mutex<u64>,
}

impl StderrProgress {
    fn new(forced: bool, follow: bool) -> StderrProgress {
        let tty = std::io::stderr().is_terminal();
        let now = Instant::now();
        StderrProgress {
            tty,
            follow,
            bar: OnceLock::new(),
            lines: (!tty && forced).then(|| Mutex::new((now, now))),
            total: Mutex::new(0),
        }
    }
}

impl Progress for StderrProgress {
    fn start(&self, _message: &str, len: Option<u64>) {
        let total = len.unwrap_or(0);
        *self
            .total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = total;
        if !self.tty {
            return;
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let template = if self.follow {
            "replay {spinner} {pos}/{len} events ({per_sec}, {elapsed}) then following"
        } else {
            "replay [{bar:30}] {pos}/{len} events ({per_sec}, {elapsed}, eta {eta})"
        };
        pb.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let _ = self.bar.set(pb);
    }

    fn set(&self, done: u64) {
        if let Some(pb) = self.bar.get() {
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
                let total = *self
                    .total
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                eprintln!(
                    "hookbus: replay: {done}/{} events, {rate:.0}/s",
                    total.max(done)
                );
            }
        }
    }

    /// A line on stderr that does not garble the bar.
    fn note(&self, line: &str) {
        match self.bar.get() {
            Some(pb) => pb.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.bar.get() {
            pb.finish_and_clear();
        }
    }
}
