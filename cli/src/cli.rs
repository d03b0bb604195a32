//! Command-line parsing and the commands. Each command is a few lines over the library.

use hookbus::config::defaults;
use hookbus_host::state::defaults as host_defaults;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use core_events::Subjects;
use hookbus::config::{BusConfig, parse_enabled_plugins};

use crate::out::println_out;
use tokio_util::sync::CancellationToken;

/// The Pagoda hook bus.
#[derive(Debug, Parser)]
#[command(name = "hookbus", version, about, long_about = None)]
struct Cli {
    /// NATS server URL, or several separated by commas (the servers of a
    /// cluster: the client fails over between them).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = defaults::NATS_URL,
        global = true
    )]
    nats_url: String,
    /// Subject prefix of this deployment.
    #[arg(
        long,
        env = "PAGODA_SUBJECT_PREFIX",
        default_value = defaults::PREFIX,
        global = true
    )]
    prefix: String,
    /// NATS user (from `hookbus nats-config`); also sets the inbox prefix to
    /// `_INBOX_<user>`, which the generated permissions require.
    #[arg(long, env = "NATS_USER", global = true)]
    nats_user: Option<String>,
    /// NATS password of `--nats-user`.
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    nats_password: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bus: provision streams, watch the registry, dispatch events.
    ///
    /// Example: ENABLED_PLUGINS=hello-world,audit-log hookbus run
    Run {
        /// Plugins to dispatch to, in tie-break order (Pagoda's ENABLED_PLUGINS).
        #[arg(long, env = "ENABLED_PLUGINS", default_value = "")]
        enabled_plugins: String,
        /// Seconds the server waits for an ack before redelivering after a crash.
        #[arg(long, env = "HOOKBUS_ACK_WAIT_SECS", default_value_t = defaults::ACK_WAIT_SECS)]
        ack_wait_secs: u64,
        /// Objects dispatched in parallel.
        #[arg(long, env = "HOOKBUS_MAX_PARALLEL_OBJECTS", default_value_t = defaults::MAX_PARALLEL_OBJECTS)]
        max_parallel_objects: usize,
        /// Lease time of the dispatcher lease: of several `hookbus run`, one
        /// dispatches and the others stand by; one takes over this long after the
        /// active one died (5s, 2s, …).
        #[arg(long, env = "HOOKBUS_LEASE_TTL", default_value = defaults::LEASE_TTL,
            value_parser = hookbus::config::parse_duration)]
        lease_ttl: Duration,
        /// Partitions of the events (by object), each dispatched by one bus at a
        /// time: several `hookbus run --partitions 4` share the partitions and take
        /// over a dead one's. It is the events stream's number, fixed when the
        /// stream is created (by the first bus, or `hookbus provision --partitions`);
        /// a bus with another number does not start. 1: one bus dispatches, the
        /// others stand by.
        #[arg(long, env = "HOOKBUS_PARTITIONS", default_value_t = defaults::PARTITIONS,
            value_parser = clap::value_parser!(u32).range(1..=1024))]
        partitions: u32,
        /// The host's database: when set, the bus relays its outbox, creating no
        /// table (it waits for hookbus_outbox; sqlite://pagoda.db or postgres://user@host/db).
        #[arg(long, env = "HOOKBUS_DATABASE_URL")]
        database_url: Option<String>,
        #[command(flatten)]
        retention: RetentionArgs,
        #[command(flatten)]
        observe: crate::ops_cmd::ObserveArgs,
    },
    /// Create or upgrade the reference host's tables (users, entities, entries, …) and the outbox table.
    ///
    /// Example: hookbus migrate --database-url sqlite://pagoda.db
    Migrate {
        /// The database (sqlite://file or postgres://user@host/db).
        #[arg(long, env = "HOOKBUS_DATABASE_URL")]
        database_url: String,
    },
    /// Rebuild the model store from the events stream into an empty database.
    ///
    /// Example: hookbus rebuild --database-url sqlite://rebuilt.db
    Rebuild {
        /// The database to fill (sqlite://file or postgres://user@host/db).
        #[arg(long, env = "HOOKBUS_DATABASE_URL")]
        database_url: String,
        /// Apply the stream even though the store is not empty.
        #[arg(long)]
        force: bool,
    },
    /// Run only the outbox relay (the bus's `run` includes it when given a database).
    ///
    /// It creates no table: it waits for hookbus_outbox (created by `migrate` or
    /// by the host with the DDL of docs/outbox.md) and checks its columns.
    /// Two relays on one database are safe: neither publishes an event twice or
    /// out of order. Example: hookbus relay --database-url postgres://pagoda@db/pagoda
    Relay {
        /// The database (sqlite://file or postgres://user@host/db).
        #[arg(long, env = "HOOKBUS_DATABASE_URL")]
        database_url: String,
    },
    /// Create the streams and the registry bucket if missing, and check them;
    /// apply the events stream's retention.
    ///
    /// Example: hookbus provision --events-max-age 90d --events-max-bytes 50GiB --partitions 4
    Provision {
        #[command(flatten)]
        retention: RetentionArgs,
        /// Partitions of a new events stream (fixed when it is created; the
        /// buses' --partitions must equal it). Given for an existing stream, it
        /// must be its number. Default: an existing stream's, 1 for a new one.
        #[arg(long, env = "HOOKBUS_PARTITIONS",
            value_parser = clap::value_parser!(u32).range(1..=1024))]
        partitions: Option<u32>,
    },
    /// Replay stored events to stdout (JSON lines) or to one plugin handler.
    Replay(crate::replay_cli::ReplayArgs),
    /// Publish a few demo events and show which handlers ran, in order.
    Demo {
        /// Plugins the demo waits for before publishing.
        #[arg(
            long,
            env = "ENABLED_PLUGINS",
            default_value = "hello-world,audit-log,flaky"
        )]
        enabled_plugins: String,
        /// Seconds to wait for plugins and deliveries.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// Write the changes through the model store in this database (the bus must
        /// relay its outbox: `hookbus run` with the same HOOKBUS_DATABASE_URL);
        /// without it, events are published directly.
        #[arg(long, env = "HOOKBUS_DATABASE_URL")]
        database_url: Option<String>,
        /// Write through the reference host at this URL instead (`hookbus host`;
        /// needs --token): the sync hooks, a plugin API route and a plugin task show too.
        #[arg(long, env = "HOOKBUS_HOST_URL", requires = "token")]
        host_url: Option<String>,
        /// An API token of a superuser of the host (`hookbus token create --superuser`).
        #[arg(long, env = "HOOKBUS_TOKEN")]
        token: Option<String>,
    },
    /// Show events live, filtered by hook and entity (readable lines or JSON lines).
    Tail(crate::ops_cmd::TailArgs),
    /// Show plugins, handlers in effective order, enabled or not, replicas alive.
    Registry(crate::ops_cmd::RegistryArgs),
    /// List, show, replay or purge dead letters.
    Dlq(crate::ops_cmd::DlqArgs),
    /// One screen with the bus and every plugin; exit status 1 when unhealthy.
    Health(crate::ops_cmd::HealthArgs),
    /// Print the nats-server `authorization` block with least-privilege users for
    /// the bus, the host and every enabled plugin (no NATS connection).
    ///
    /// Example: hookbus nats-config --enabled-plugins hello-world,audit-log > auth.conf
    NatsConfig(crate::nats_config_cmd::NatsConfigArgs),
    /// Run the reference host: the /api/v2 HTTP API over the model store, every
    /// write running the synchronous hooks first and committing its event in the
    /// outbox, which the host relays to the stream itself (unless --no-relay).
    ///
    /// Examples:
    ///   hookbus token create --user admin --superuser     # prints a key, once
    ///   ENABLED_PLUGINS=hello-world hookbus host --listen 0.0.0.0:8000
    ///   hookbus host --database-url postgres://pagoda@db/pagoda --no-relay
    ///   curl -H "Authorization: Token $KEY" http://127.0.0.1:8000/api/v2/entities/
    #[command(verbatim_doc_comment)]
    Host(HostArgs),
    /// API tokens of the reference host.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve the operator console (a web page): plugins, live tail, event journey, dead letters.
    Console(crate::console_cmd::ConsoleArgs),
}

/// `hookbus host`.
#[derive(Debug, clap::Args)]
struct HostArgs {
    /// Address to serve on.
    #[arg(long, env = "HOOKBUS_HOST_LISTEN", default_value = host_defaults::LISTEN)]
    listen: std::net::SocketAddr,
    /// The model store (sqlite://file or postgres://user@host/db); migrated at start.
    #[arg(
        long,
        env = "HOOKBUS_DATABASE_URL",
        default_value = host_defaults::DATABASE_URL
    )]
    database_url: String,
    /// Plugins whose hooks run, in tie-break order (Pagoda's ENABLED_PLUGINS).
    #[arg(long, env = "ENABLED_PLUGINS", default_value = "")]
    enabled_plugins: String,
    /// Operation id ranges of plugin tasks, e.g. '{"hello-world": [5000, 5099]}';
    /// checked at start (the host refuses to start with every problem listed).
    #[arg(long, env = "PLUGIN_OPERATION_ID_CONFIG", default_value = "")]
    operation_id_config: String,
    /// How long start-up waits for the plugins named in PLUGIN_OPERATION_ID_CONFIG
    /// to register: 10s, 1m, …
    #[arg(long, env = "HOOKBUS_PLUGIN_WAIT", default_value = host_defaults::PLUGIN_WAIT,
          value_parser = hookbus::config::parse_duration)]
    plugin_wait: Duration,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "HOOKBUS_MAX_BODY_BYTES", default_value_t = host_defaults::MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Longest wait for a request header, from when the connection waits for one
    /// (after it opens, and between kept-alive requests: also the idle timeout);
    /// the connection is closed beyond.
    #[arg(long, env = "HOOKBUS_HTTP_HEADER_TIMEOUT", default_value = host_defaults::HTTP_HEADER_TIMEOUT,
          value_parser = hookbus::config::parse_positive_duration)]
    http_header_timeout: Duration,
    /// Longest pause in a request body (408 request_timeout beyond).
    #[arg(long, env = "HOOKBUS_HTTP_BODY_TIMEOUT", default_value = host_defaults::HTTP_BODY_TIMEOUT,
          value_parser = hookbus::config::parse_positive_duration)]
    http_body_timeout: Duration,
    /// Most HTTP connections open at once (lowered to fit `ulimit -n`); more wait
    /// to be accepted.
    #[arg(long, env = "HOOKBUS_HTTP_MAX_CONNECTIONS", default_value_t = host_defaults::HTTP_MAX_CONNECTIONS)]
    http_max_connections: usize,
    /// Requests per second each token may make to plugin API routes (0: no limit).
    #[arg(long, env = "HOOKBUS_PLUGIN_RATE", default_value_t = host_defaults::PLUGIN_RATE)]
    plugin_rate: u32,
    /// Burst allowed above --plugin-rate.
    #[arg(long, env = "HOOKBUS_PLUGIN_BURST", default_value_t = host_defaults::PLUGIN_BURST)]
    plugin_burst: u32,
    /// Relay the outbox to the stream in this process (the default).
    #[arg(long, overrides_with = "no_relay")]
    relay: bool,
    /// Leave the outbox to `hookbus run --database-url` (or `hookbus relay`).
    #[arg(long, overrides_with = "relay")]
    no_relay: bool,
    /// The host provisions the streams and buckets it uses when they are
    /// missing: with the same retention and replicas as `hookbus run`, so that
    /// whichever starts first creates them alike (`--stream-replicas 3` in a
    /// cluster).
    #[command(flatten)]
    retention: RetentionArgs,
}

/// `hookbus token …`.
#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an API token for a user (created if missing) and print its key, once.
    /// Only a hash of the key is stored.
    ///
    /// Example: hookbus token create --user admin --superuser
    Create {
        /// The user's name.
        #[arg(long)]
        user: String,
        /// Create the user as a superuser (when it does not exist yet).
        #[arg(long)]
        superuser: bool,
        /// A label for the token.
        #[arg(long, default_value = "cli")]
        name: String,
        /// The model store (sqlite://file or postgres://user@host/db).
        #[arg(
            long,
            env = "HOOKBUS_DATABASE_URL",
            default_value = host_defaults::DATABASE_URL
        )]
        database_url: String,
    },
}

pub(crate) async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    // Logs, and the span export when OTEL_EXPORTER_OTLP_ENDPOINT asks for it
    // (flushed when this returns).
    let service = match &cli.command {
        Command::Host(_) => "hookbus-host",
        Command::Relay { .. } => "hookbus-relay",
        _ => "hookbus",
    };
    let _telemetry =
        hookbus_kit::telemetry::init(hookbus_kit::telemetry::BINARY_DEFAULT_FILTER, service);
    let subjects = Subjects::new(&cli.prefix)?;
    if let Command::NatsConfig(args) = &cli.command {
        return crate::nats_config_cmd::main(&subjects, args, println_out);
    }
    if let Command::Token(command) = &cli.command {
        return token(command).await;
    }
    let options = hookbus::nats_config::with_credentials(
        async_nats::ConnectOptions::new(),
        cli.nats_user.as_deref(),
        cli.nats_password.as_deref(),
    );
    // The daemons wait for NATS to come up; the one-shot commands say at once
    // why they cannot connect (refused password, nothing listening, …).
    let daemon = matches!(
        cli.command,
        Command::Run { .. } | Command::Relay { .. } | Command::Host(_) | Command::Console(_)
    );
    let options = if daemon {
        options.retry_on_initial_connect()
    } else {
        options
    };
    let servers = hookbus::nats_config::server_addrs(&cli.nats_url)?;
    let client = options
        .name("hookbus")
        .connect(servers)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cli.nats_url))?;
    let code = match cli.command {
        Command::Run {
            enabled_plugins,
            ack_wait_secs,
            max_parallel_objects,
            lease_ttl,
            partitions,
            database_url,
            retention,
            observe,
        } => {
            let mut config = BusConfig {
                subjects,
                enabled_plugins: parse_enabled_plugins(&enabled_plugins),
                ..Default::default()
            };
            config.dispatcher.ack_wait = Duration::from_secs(ack_wait_secs.max(1));
            config.dispatcher.max_parallel_objects = max_parallel_objects.max(1);
            config.streams.lease_ttl = lease_ttl.max(Duration::from_millis(400));
            config.dispatcher.partitions = partitions;
            retention.apply(&mut config.streams);
            observe.apply(&mut config)?;
            if config.enabled_plugins.is_empty() {
                tracing::warn!("ENABLED_PLUGINS is empty: no plugin will receive events");
            }
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                hookbus_kit::process::shutdown_signal().await;
                tracing::info!("shutting down");
                token.cancel();
            });
            config.database_url = database_url;
            hookbus::run::run(client.clone(), config, shutdown).await?;
            ExitCode::SUCCESS
        }
        Command::Rebuild {
            database_url,
            force,
        } => {
            let js = jetstream::new(client.clone());
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "rebuild [{bar:30}] {pos}/{len} events ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let report = hookbus::outbox_cmd::rebuild(
                &js,
                &subjects,
                &database_url,
                force,
                |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
            )
            .await?;
            bar.finish_and_clear();
            for (seq, why) in &report.unreadable {
                eprintln!(
                    "hookbus: rebuild: event seq={seq} cannot be read and was not applied: {why}"
                );
            }
            let unreadable = report.unreadable.len();
            println_out(&format!(
                "{}: applied {} events ({} entity, {} entry, {} skipped{}) to {}",
                if unreadable == 0 { "ok" } else { "incomplete" },
                report.events - unreadable as u64,
                report.entity_events,
                report.entry_events,
                report.skipped,
                if unreadable == 0 {
                    String::new()
                } else {
                    format!("; {unreadable} unreadable, see above")
                },
                hookbus::outbox_cmd::redact(&database_url)
            ));
            // Every other event is applied; the status says some were not.
            if unreadable == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Migrate { database_url } => {
            hookbus::outbox_cmd::open_migrated(&database_url).await?;
            println_out(&format!(
                "ok: {} is migrated",
                hookbus::outbox_cmd::redact(&database_url)
            ));
            ExitCode::SUCCESS
        }
        Command::Relay { database_url } => {
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                hookbus_kit::process::shutdown_signal().await;
                tracing::info!("shutting down");
                token.cancel();
            });
            hookbus::outbox_cmd::relay(
                client.clone(),
                subjects,
                &Default::default(),
                &database_url,
                shutdown,
            )
            .await?;
            ExitCode::SUCCESS
        }
        Command::Provision {
            retention,
            partitions,
        } => {
            let js = jetstream::new(client.clone());
            let mut streams = hookbus::config::StreamSettings {
                partitions,
                ..Default::default()
            };
            retention.apply(&mut streams);
            hookbus::provision::provision_patiently(
                &js,
                &subjects,
                &streams,
                hookbus::provision::PROVISION_PATIENCE,
            )
            .await?;
            let partitions = hookbus::provision::events_partitions(&js, &subjects)
                .await?
                .unwrap_or(1);
            let stream_names: Vec<String> = hookbus::provision::stream_configs(&subjects, &streams)
                .into_iter()
                .map(|c| c.name)
                .collect();
            println_out(&format!(
                "ok: streams {} and buckets {} are ready; the events stream has {partitions} partition(s)",
                stream_names.join(", "),
                hookbus::provision::bucket_names(&subjects).join(", ")
            ));
            ExitCode::SUCCESS
        }
        Command::Replay(args) => crate::replay_cli::main(&client, &subjects, &args).await?,
        Command::Demo {
            enabled_plugins,
            timeout_secs,
            database_url,
            host_url,
            token,
        } => {
            let host = host_url.map(|url| crate::demo::HostTarget {
                url,
                token: token.unwrap_or_default(),
            });
            crate::demo::run(
                &client,
                &subjects,
                &parse_enabled_plugins(&enabled_plugins),
                Duration::from_secs(timeout_secs),
                database_url.as_deref(),
                host,
            )
            .await?
        }
        Command::Tail(args) => crate::ops_cmd::tail(&client, &subjects, args).await?,
        Command::Registry(args) => crate::ops_cmd::registry(&client, &subjects, args).await?,
        Command::Dlq(args) => crate::ops_cmd::dlq(&client, &subjects, args).await?,
        Command::Health(args) => crate::ops_cmd::health(&client, &subjects, args).await?,
        Command::Host(args) => {
            host(client.clone(), subjects, args).await?;
            ExitCode::SUCCESS
        }
        Command::Console(args) => crate::console_cmd::main(&client, subjects, args).await?,
        Command::NatsConfig(_) | Command::Token(_) => ExitCode::SUCCESS,
    };
    // Flush what is left, briefly: with NATS gone there is nothing to flush to.
    if client.connection_state() == async_nats::connection::State::Connected {
        match tokio::time::timeout(Duration::from_secs(2), client.drain()).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "drain failed"),
            Err(_) => tracing::debug!("drain did not finish in 2 s"),
            Ok(Ok(())) => {}
        }
    }
    Ok(code)
}

/// `hookbus host`: serves until SIGTERM or Ctrl-C.
async fn host(client: async_nats::Client, subjects: Subjects, args: HostArgs) -> Result<()> {
    let mut config = hookbus_host::HostConfig::new(args.database_url);
    config.listen = args.listen;
    config.subjects = subjects;
    config.enabled_plugins = parse_enabled_plugins(&args.enabled_plugins);
    config.operation_id_config = args.operation_id_config;
    config.plugin_wait = args.plugin_wait;
    config.max_body_bytes = args.max_body_bytes.max(1);
    config.http = hookbus_host::HttpSettings {
        header_timeout: args.http_header_timeout,
        body_timeout: args.http_body_timeout,
        max_connections: args.http_max_connections,
    };
    config.plugin_rate_per_sec = args.plugin_rate;
    config.plugin_rate_burst = args.plugin_burst;
    config.relay = args.relay || !args.no_relay;
    args.retention.apply(&mut config.streams);
    if config.enabled_plugins.is_empty() {
        tracing::warn!("ENABLED_PLUGINS is empty: no plugin hook will run");
    }
    let mut host = hookbus_host::Host::start(client, config).await?;
    tracing::info!(addr = %host.addr(), "host started");
    let panicked = tokio::select! {
        () = hookbus_kit::process::shutdown_signal() => None,
        message = host.panicked() => Some(message),
    };
    tracing::info!("shutting down");
    host.stop().await;
    match panicked {
        Some(message) => anyhow::bail!("a task of the host panicked: {message}"),
        None => Ok(()),
    }
}

/// `hookbus token create`: no NATS needed.
async fn token(command: &TokenCommand) -> Result<ExitCode> {
    let TokenCommand::Create {
        user,
        superuser,
        name,
        database_url,
    } = command;
    let store = hookbus::outbox_cmd::open_migrated(database_url).await?;
    let found = store.user_by_name(user).await?;
    let found = match found {
        Some(u) => {
            if *superuser && !u.is_superuser {
                tracing::warn!(user = %u.username, "the user exists and is not a superuser; --superuser only applies when creating it");
            }
            u
        }
        None => {
            let created = store
                .create_user(&store::NewUser {
                    username: user.clone(),
                    is_superuser: *superuser,
                    ..Default::default()
                })
                .await?;
            tracing::info!(user = %created.username, superuser = created.is_superuser, "user created");
            created
        }
    };
    let (token, key) = store.create_token(found.id, name).await?;
    tracing::info!(user = %found.username, token_id = token.id, "token created; the key is shown once");
    println_out(&key);
    Ok(ExitCode::SUCCESS)
}

/// Retention of the events stream (`hookbus run` and `hookbus provision`). A
/// change is applied to an existing stream when the bus provisions it.
#[derive(Debug, Clone, clap::Args)]
struct RetentionArgs {
    /// How long events are kept: 30d, 12h, 90m, … (0 = forever). Replays can go back
    /// this far.
    #[arg(
        long,
        env = "HOOKBUS_EVENTS_MAX_AGE",
        default_value = defaults::EVENTS_MAX_AGE,
        value_parser = hookbus::config::parse_duration
    )]
    events_max_age: Duration,
    /// Largest size of the events stream, oldest events dropped first: bytes, or
    /// 500MB, 10GiB, … (unlimited = no limit).
    #[arg(
        long,
        env = "HOOKBUS_EVENTS_MAX_BYTES",
        default_value = defaults::EVENTS_MAX_BYTES,
        value_parser = hookbus::config::parse_byte_limit
    )]
    events_max_bytes: i64,
    /// Replicas of every stream and of the registry bucket (3 in a NATS cluster of
    /// three; at most the cluster's size). Set when a stream is created.
    #[arg(long, env = "HOOKBUS_STREAM_REPLICAS", default_value_t = defaults::STREAM_REPLICAS)]
    stream_replicas: usize,
}

impl RetentionArgs {
    fn apply(&self, streams: &mut hookbus::config::StreamSettings) {
        streams.events_max_age = self.events_max_age;
        streams.events_max_bytes = self.events_max_bytes;
        streams.replicas = self.stream_replicas.max(1);
    }
}

/// The defaults in the docs' tables are the command line's: every row of the flag
/// tables of docs/operations.md and docs/host-api.md names a flag and variable
/// the command line has, with the same default, and every flag of `hookbus run`,
/// `hookbus host` and the global ones that reads a variable has a row.
#[cfg(test)]
mod docs_table {
    use std::collections::BTreeSet;

    use clap::CommandFactory;

    use super::Cli;

    /// (command, long flag, env, default as the docs write it).
    fn flags() -> Vec<(String, String, String, String)> {
        fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String, String, String)>) {
            for arg in cmd.get_arguments() {
                let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                    continue;
                };
                let defaults: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                let default = match defaults.as_slice() {
                    [] => "none".to_owned(),
                    [v] if v.is_empty() => "empty".to_owned(),
                    [v] => format!("`{v}`"),
                    more => more.join(","),
                };
                out.push((
                    path.to_owned(),
                    format!("--{long}"),
                    env.to_string_lossy().into_owned(),
                    default,
                ));
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut out = Vec::new();
        walk(&Cli::command(), "hookbus", &mut out);
        out
    }

    /// (flag, env, default) of every row of a flag table: `| flag | env | default | … |`,
    /// a row listing several (`--a`, `--b` | `A`, `B` | `1`, `2`) split into each.
    fn rows(doc: &str) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for line in doc.lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (flags, envs, defaults) = (cells[1], cells[2], cells[3]);
            if envs.is_empty() || !envs.starts_with('`') {
                continue;
            }
            let split = |s: &str| -> Vec<String> { s.split(", ").map(str::to_owned).collect() };
            let (flags, envs, defaults) = (split(flags), split(envs), split(defaults));
            assert_eq!(flags.len(), envs.len(), "{line}");
            for (i, (flag, env)) in flags.iter().zip(&envs).enumerate() {
                let default = defaults.get(i).unwrap_or(&defaults[0]).clone();
                out.push((
                    flag.trim_matches('`').to_owned(),
                    env.trim_matches('`').to_owned(),
                    default,
                ));
            }
        }
        out
    }

    #[test]
    fn docs_tables_list_the_command_lines_defaults() {
        let flags = flags();
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/");
        let mut documented = BTreeSet::new();
        let mut wrong = Vec::new();
        for file in ["operations.md", "host-api.md"] {
            let doc = std::fs::read_to_string(format!("{root}{file}")).expect("read the docs");
            for (flag, env, default) in rows(&doc) {
                let same = flags
                    .iter()
                    .any(|(_, f, e, d)| *f == flag && *e == env && *d == default);
                if !same {
                    let actual: Vec<_> = flags
                        .iter()
                        .filter(|(_, f, e, _)| *f == flag && *e == env)
                        .map(|(c, _, _, d)| format!("{c}: {d}"))
                        .collect();
                    wrong.push(format!(
                        "docs/{file}: {flag} / {env} says {default}; the command line: {actual:?}"
                    ));
                }
                documented.insert((flag, env));
            }
        }
        for (cmd, flag, env, _) in &flags {
            let listed = ["hookbus", "hookbus run", "hookbus host"].contains(&cmd.as_str());
            if listed && !documented.contains(&(flag.clone(), env.clone())) {
                wrong.push(format!(
                    "{cmd} {flag} ({env}) is in no table of docs/operations.md or docs/host-api.md"
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
