//! The operator commands' arguments (`tail`, `registry`, `dlq`, `health`) and the
//! `hookbus run` flags for health, metrics and alerts. The work is done in
//! `hookbus::ops`.

use hookbus::config::defaults;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use core_events::{Hook, Subjects};
use hookbus::config::{BusConfig, parse_duration};
use hookbus::dlq::Filter;
use hookbus::ops::{self, Ops, OpsError};
use hookbus::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `hookbus run` flags: `/healthz` and `/metrics`, per-handler metrics, alerts.
#[derive(Debug, Clone, Args)]
pub(crate) struct ObserveArgs {
    /// Where to serve /healthz and /metrics (host:port), or `off`.
    #[arg(long, env = "HOOKBUS_HTTP_ADDR", default_value = defaults::HTTP_ADDR)]
    http_addr: String,
    /// Record per-handler metrics (deliveries, errors, latency, last success).
    #[arg(long, env = "HOOKBUS_METRICS", default_value_t = defaults::METRICS, action = clap::ArgAction::Set)]
    metrics: bool,
    /// A plugin failing without a success for this long is degraded (e.g. 1h, 30m).
    #[arg(long, env = "HOOKBUS_DEGRADED_AFTER", default_value = defaults::DEGRADED_AFTER, value_parser = parse_duration)]
    degraded_after: Duration,
    /// Time between health checks (replica pings, alert thresholds).
    #[arg(long, env = "HOOKBUS_ALERT_INTERVAL", default_value = defaults::ALERT_INTERVAL, value_parser = parse_duration)]
    alert_interval: Duration,
    /// Error-rate alert: failed attempts / attempts in one interval (0.0-1.0).
    #[arg(long, env = "HOOKBUS_ALERT_ERROR_RATE", default_value_t = defaults::ALERT_ERROR_RATE)]
    alert_error_rate: f64,
    /// Lag alert: events still to dispatch for a plugin (incl. its deferred deliveries).
    #[arg(long, env = "HOOKBUS_ALERT_LAG", default_value_t = defaults::ALERT_LAG)]
    alert_lag: u64,
    /// Relay alert: age of the oldest unpublished outbox row (`60s`, `5m`, …).
    #[arg(long, env = "HOOKBUS_ALERT_BACKLOG_AGE", default_value = defaults::ALERT_BACKLOG_AGE, value_parser = parse_duration)]
    alert_backlog_age: Duration,
    /// A plugin answering no $SRV.PING (a plain queue subscriber) counts as alive
    /// while its last successful delivery is at most this old (`1h`, `15m`, …).
    #[arg(long, env = "HOOKBUS_ALIVE_WINDOW", default_value = defaults::ALIVE_WINDOW, value_parser = parse_duration)]
    alive_window: Duration,
}

impl ObserveArgs {
    /// Applies the flags to the bus configuration.
    pub(crate) fn apply(&self, config: &mut BusConfig) -> Result<()> {
        config.http_addr = match self.http_addr.trim() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|e| {
                anyhow::anyhow!("--http-addr '{addr}' is not host:port or 'off': {e}")
            })?),
        };
        config.dispatcher.metrics = self.metrics;
        config.monitor.degraded_after = self.degraded_after;
        config.monitor.interval = self.alert_interval.max(Duration::from_millis(100));
        config.monitor.error_rate = self.alert_error_rate;
        config.monitor.lag_events = self.alert_lag;
        config.monitor.relay_backlog_age = self.alert_backlog_age;
        config.monitor.alive_window = self.alive_window;
        Ok(())
    }
}

fn parse_hook(s: &str) -> Result<Hook, core_events::UnknownHook> {
    Hook::parse(s)
}

/// Show events live as they are stored, filtered by hook and entity.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  hookbus tail                                     # every new event, one line each
  hookbus tail --hook entry.after_create --entity customer
  hookbus tail --entity '顧客 master' --json        # JSON lines (seq, subject, hook, entity, event)
  hookbus tail --from-seq 1 --count 10             # the first 10 stored events, then exit
  hookbus tail --from-seq 1 --object entry/42      # entry 42's history, then new events about it

The same with the nats CLI: nats sub 'pagoda.events.entry.after_create.customer.>'")]
pub(crate) struct TailArgs {
    /// Only this hook (standard name or legacy alias); repeatable.
    #[arg(long = "hook", value_parser = parse_hook)]
    hooks: Vec<Hook>,
    /// Only this entity (exact name, not encoded); repeatable.
    #[arg(long = "entity")]
    entities: Vec<String>,
    /// Only events about this object (entry/42 or entity/7); repeatable.
    #[arg(long = "object", value_name = "KIND/ID")]
    objects: Vec<core_events::ObjectKey>,
    /// JSON lines instead of readable lines.
    #[arg(long)]
    json: bool,
    /// Start at this stream sequence instead of with the next new event.
    #[arg(long)]
    from_seq: Option<u64>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

/// Plugins, their handlers in effective order, enabled or not, replicas alive.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  hookbus registry                       # = registry ls
  hookbus registry ls --entity customer  # the order for events about 'customer'
  hookbus registry ls --json             # the bus's JSON, with replicas and status
  hookbus registry show hello-world      # manifest, replicas, per-handler counters

The same with the nats CLI: nats req pagoda.bus.registry '', nats micro ls, nats micro ping <id>,
nats kv get pagoda_registry plugins.<id>")]
pub(crate) struct RegistryArgs {
    #[command(subcommand)]
    cmd: Option<RegistryCmd>,
}

#[derive(Debug, Clone, Subcommand)]
enum RegistryCmd {
    /// Every plugin, then the handlers of enabled plugins in dispatch order per hook.
    Ls {
        /// Only this hook.
        #[arg(long, value_parser = parse_hook)]
        hook: Option<Hook>,
        /// The order for events about this entity.
        #[arg(long)]
        entity: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One plugin: manifest, replicas, per-handler counters of the bus and the service.
    Show {
        /// Plugin id.
        plugin: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// Dead letters: list, show, replay to their handler, purge.
#[derive(Debug, Clone, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  hookbus dlq                                  # = dlq ls
  hookbus dlq ls --plugin flaky --handler always_fails
  hookbus dlq ls --hook entry.after_create --entity customer --since 2h --code 500
  hookbus dlq show 12                          # the whole record of dead letter #12, and its replays
  hookbus dlq replay 12 13                     # back to their handler; removed on success
  hookbus dlq replay --plugin flaky --dry-run  # how many, and the first 5
  hookbus dlq replay --plugin flaky --since 2026-12-05T01:00:00Z --until 200 --rate 50/s
  hookbus dlq replay --error 'no reply within' # every dead letter that timed out
  hookbus dlq replay --all
  hookbus dlq purge --plugin flaky --yes       # delete them (without --yes: says how many)
  hookbus dlq purge --error 'unknown entry' --dry-run

Filters combine (all must match); --since/--until take a dead-letter sequence (#12),
an RFC 3339 time or a duration ago (90m, 2h, 1d). A replay or purge works on the dead
letters present when it starts.

The same over request/reply (the running bus): nats req pagoda.bus.dlq.list '{\"filter\":{\"plugin\":\"flaky\"}}'
The same with the nats CLI: nats stream view PAGODA_DLQ, nats stream subjects PAGODA_DLQ,
nats stream purge PAGODA_DLQ --subject 'pagoda.dlq.flaky.>'"
)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    cmd: Option<DlqCmd>,
    /// Only this plugin's (for the default `ls`).
    #[arg(long)]
    plugin: Option<String>,
}

fn parse_bound(s: &str) -> Result<hookbus::dlq::Bound, String> {
    hookbus::dlq::Bound::parse(s)
}

#[derive(Debug, Clone, Args)]
struct FilterArgs {
    /// Only this plugin's.
    #[arg(long)]
    plugin: Option<String>,
    /// Only this handler's (of any plugin unless --plugin is given).
    #[arg(long)]
    handler: Option<String>,
    /// Only deliveries of this hook (standard name or legacy alias).
    #[arg(long, value_parser = parse_hook)]
    hook: Option<Hook>,
    /// Only events about this entity (the plain name).
    #[arg(long)]
    entity: Option<String>,
    /// Only dead letters from this one on: a sequence (12), an RFC 3339 time or a duration ago (2h).
    #[arg(long, value_parser = parse_bound, value_name = "SEQ|TIME|AGO")]
    since: Option<hookbus::dlq::Bound>,
    /// Only dead letters up to this one: a sequence, an RFC 3339 time or a duration ago.
    #[arg(long, value_parser = parse_bound, value_name = "SEQ|TIME|AGO")]
    until: Option<hookbus::dlq::Bound>,
    /// Only those whose last error contains this text (case-insensitive).
    #[arg(long)]
    error: Option<String>,
    /// Only those whose last error is a handler error with this code (500, 404, …).
    #[arg(long)]
    code: Option<u16>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
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
}

#[derive(Debug, Clone, Subcommand)]
enum DlqCmd {
    /// One line per dead letter (#<seq> first), then a count.
    Ls {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many (go on with --since <last seq + 1>).
        #[arg(long)]
        limit: Option<usize>,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// The whole record of one dead letter, and its replays.
    Show {
        /// Its sequence (the #<seq> of `dlq ls`).
        seq: u64,
    },
    /// Send dead letters back to their handler (only that one); a success removes
    /// the dead letter, a failure keeps it with the attempt appended.
    Replay {
        /// These dead letters, by sequence.
        seqs: Vec<u64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Every dead letter.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        /// Only say how many would be replayed, and show the first few.
        #[arg(long)]
        dry_run: bool,
        /// How many a dry run shows.
        #[arg(long, default_value_t = hookbus::dlq::DEFAULT_SAMPLE)]
        sample: usize,
        /// At most this many replays per second (20/s, 600/m, 3600/h).
        #[arg(long, default_value = hookbus::dlq::DEFAULT_RATE_TEXT, value_parser = hookbus::dlq::parse_rate)]
        rate: f64,
        /// Per-delivery timeout in ms (default: the handler's timeout_ms).
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Delete dead letters: by sequence, by filter, or all.
    Purge {
        /// These dead letters, by sequence.
        seqs: Vec<u64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Every dead letter.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        /// Only say how many would go, and show the first few.
        #[arg(long)]
        dry_run: bool,
        /// How many a dry run shows.
        #[arg(long, default_value_t = hookbus::dlq::DEFAULT_SAMPLE)]
        sample: usize,
        /// Really delete (without it: only says how many would go).
        #[arg(long)]
        yes: bool,
    },
}

/// One screen with the bus and every plugin; exits 1 when something is unhealthy.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Unhealthy (exit 1): the bus does not answer, has lost NATS or is not dispatching;
a plugin in ENABLED_PLUGINS is not registered; an enabled plugin has no replica
answering $SRV.PING; a plugin is degraded.

Examples:
  hookbus health                      # the screen; exit 0 when healthy
  hookbus health --json               # for scripts
  */5 * * * * hookbus health >/dev/null || alert-someone   # cron

The same with the nats CLI: nats req pagoda.bus.health '', nats micro ping <id>,
nats consumer info PAGODA_EVENTS dispatcher, nats stream subjects PAGODA_DEFERRED"
)]
pub(crate) struct HealthArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// How long to wait for plugin replicas to answer $SRV.PING, in ms.
    #[arg(long, default_value_t = 500)]
    ping_timeout_ms: u64,
}

fn ops(client: &async_nats::Client, subjects: &Subjects) -> Ops {
    let mut ops = Ops::new(client.clone(), subjects.clone());
    ops.progress = std::sync::Arc::new(StderrBars::default());
    ops
}

/// The operator commands' progress on stderr: a spinner (unknown length) or a
/// bar, drawn only when stderr is a terminal.
#[derive(Debug, Default)]
struct StderrBars(std::sync::Mutex<Option<ProgressBar>>);

impl StderrBars {
    fn bar(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Progress for StderrBars {
    fn start(&self, message: &str, len: Option<u64>) {
        let pb = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
        match len {
            None => {
                pb.set_style(
                    ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                pb.enable_steady_tick(Duration::from_millis(100));
            }
            Some(_) => pb.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
        }
        pb.set_message(message.to_owned());
        if let Some(old) = self.bar().replace(pb) {
            old.finish_and_clear();
        }
    }

    fn set(&self, done: u64) {
        if let Some(pb) = &*self.bar() {
            pb.set_position(done);
        }
    }

    fn note(&self, line: &str) {
        match &*self.bar() {
            Some(pb) => pb.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.bar().take() {
            pb.finish_and_clear();
        }
    }
}

/// Prints a usage problem and gives exit code 2; other errors go up.
fn usage_or(e: OpsError) -> Result<ExitCode> {
    match e {
        OpsError::Usage(m) => {
            eprintln!("hookbus: {m}");
            Ok(ExitCode::from(2))
        }
        other => Err(other.into()),
    }
}

/// `hookbus tail`.
pub(crate) async fn tail(
    client: &async_nats::Client,
    subjects: &Subjects,
    args: TailArgs,
) -> Result<ExitCode> {
    let opts = ops::tail::TailOptions {
        hooks: args.hooks,
        entities: args.entities,
        objects: args.objects,
        json: args.json,
        from_seq: args.from_seq,
        count: args.count,
    };
    match ops::tail::tail(&ops(client, subjects), &opts, &mut std::io::stdout()).await {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => usage_or(e),
    }
}

/// `hookbus registry`.
pub(crate) async fn registry(
    client: &async_nats::Client,
    subjects: &Subjects,
    args: RegistryArgs,
) -> Result<ExitCode> {
    let o = ops(client, subjects);
    let out = &mut std::io::stdout();
    let done = match args.cmd.unwrap_or(RegistryCmd::Ls {
        hook: None,
        entity: None,
        json: false,
    }) {
        RegistryCmd::Ls { hook, entity, json } => {
            ops::registry::ls(&o, &ops::registry::LsOptions { hook, entity, json }, out).await
        }
        RegistryCmd::Show { plugin, json } => ops::registry::show(&o, &plugin, json, out).await,
    };
    match done {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => usage_or(e),
    }
}

/// `hookbus dlq`.
pub(crate) async fn dlq(
    client: &async_nats::Client,
    subjects: &Subjects,
    args: DlqArgs,
) -> Result<ExitCode> {
    let o = ops(client, subjects);
    let out = &mut std::io::stdout();
    let cmd = args.cmd.unwrap_or(DlqCmd::Ls {
        filter: FilterArgs {
            plugin: args.plugin,
            handler: None,
            hook: None,
            entity: None,
            since: None,
            until: None,
            error: None,
            code: None,
        },
        limit: None,
        json: false,
    });
    let done = match cmd {
        DlqCmd::Ls {
            filter,
            limit,
            json,
        } => ops::dlq::ls(&o, &filter.filter(), limit, json, out)
            .await
            .map(|_| ExitCode::SUCCESS),
        DlqCmd::Show { seq } => ops::dlq::show(&o, seq, out)
            .await
            .map(|()| ExitCode::SUCCESS),
        DlqCmd::Replay {
            seqs,
            filter,
            all,
            dry_run,
            sample,
            rate,
            timeout_ms,
        } => {
            let sel = ops::dlq::Selection {
                seqs,
                filter: filter.filter(),
                all,
                dry_run,
                sample,
                rate,
                timeout: timeout_ms.map(Duration::from_millis),
            };
            ops::dlq::replay(&o, &sel, out).await.map(|r| {
                if r.failed > 0 {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            })
        }
        DlqCmd::Purge {
            seqs,
            filter,
            all,
            dry_run,
            sample,
            yes,
        } => {
            let sel = ops::dlq::Selection {
                seqs,
                filter: filter.filter(),
                all,
                dry_run,
                sample,
                ..Default::default()
            };
            ops::dlq::purge(&o, &sel, yes, out)
                .await
                .map(|_| ExitCode::SUCCESS)
        }
    };
    done.or_else(usage_or)
}

/// `hookbus health`.
pub(crate) async fn health(
    client: &async_nats::Client,
    subjects: &Subjects,
    args: HealthArgs,
) -> Result<ExitCode> {
    let mut o = ops(client, subjects);
    o.timeout = Duration::from_millis(args.ping_timeout_ms.max(1));
    let report = ops::health::check(&o).await?;
    ops::health::render(&report, args.json, &mut std::io::stdout())?;
    Ok(if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
