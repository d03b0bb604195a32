//! Command-line parsing and the commands. Each command is a few lines over the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use core_events::Subjects;
use hookbus::config::{BusConfig, parse_enabled_plugins};
use tokio_util::sync::CancellationToken;

/// The Pagoda hook bus.
#[derive(Debug, Parser)]
#[command(name = "hookbus", version, about, long_about = None)]
struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// Subject prefix of this deployment.
    #[arg(
        long,
        env = "PAGODA_SUBJECT_PREFIX",
        default_value = "pagoda",
        global = true
    )]
    prefix: String,
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
        #[arg(long, env = "HOOKBUS_ACK_WAIT_SECS", default_value_t = 30)]
        ack_wait_secs: u64,
        /// Objects dispatched in parallel.
        #[arg(long, env = "HOOKBUS_MAX_PARALLEL_OBJECTS", default_value_t = 256)]
        max_parallel_objects: usize,
    },
    /// Create the streams and the registry bucket if missing, and check them.
    Provision,
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
    },
    /// Show the registry as the running bus sees it.
    Registry,
    /// List dead letters.
    Dlq {
        /// Only this plugin's.
        #[arg(long)]
        plugin: Option<String>,
    },
}

pub(crate) async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_tracing();
    let subjects = Subjects::new(&cli.prefix)?;
    let client = async_nats::ConnectOptions::new()
        .name("hookbus")
        .retry_on_initial_connect()
        .connect(&cli.nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cli.nats_url))?;
    let code = match cli.command {
        Command::Run {
            enabled_plugins,
            ack_wait_secs,
            max_parallel_objects,
        } => {
            let mut config = BusConfig {
                subjects,
                enabled_plugins: parse_enabled_plugins(&enabled_plugins),
                ..Default::default()
            };
            config.dispatcher.ack_wait = Duration::from_secs(ack_wait_secs.max(1));
            config.dispatcher.max_parallel_objects = max_parallel_objects.max(1);
            if config.enabled_plugins.is_empty() {
                tracing::warn!("ENABLED_PLUGINS is empty: no plugin will receive events");
            }
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                token.cancel();
            });
            hookbus::run::run(client.clone(), config, shutdown).await?;
            ExitCode::SUCCESS
        }
        Command::Provision => {
            let js = jetstream::new(client.clone());
            hookbus::provision::provision(&js, &subjects, &Default::default()).await?;
            println_out(&format!(
                "ok: streams {}, {}, {} and bucket {} are ready",
                subjects.events_stream(),
                subjects.dlq_stream(),
                subjects.deferred_stream(),
                subjects.registry_bucket()
            ));
            ExitCode::SUCCESS
        }
        Command::Demo {
            enabled_plugins,
            timeout_secs,
        } => {
            crate::demo::run(
                &client,
                &subjects,
                &parse_enabled_plugins(&enabled_plugins),
                Duration::from_secs(timeout_secs),
            )
            .await?
        }
        Command::Registry => {
            let reply = client
                .request(format!("{}.bus.registry", subjects.prefix()), "".into())
                .await
                .context("no answer from the bus on <prefix>.bus.registry: is `hookbus run` up?")?;
            let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            println_out(&serde_json::to_string_pretty(&value)?);
            ExitCode::SUCCESS
        }
        Command::Dlq { plugin } => {
            let js = jetstream::new(client.clone());
            let letters = hookbus::dlq::list(&js, &subjects, plugin.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the dead-letter stream: {e}"))?;
            for l in &letters {
                let b = &l.body;
                println_out(&format!(
                    "{}  {}  {} {}  seq={} attempts={}  error={}",
                    l.subject,
                    b["event_id"].as_str().unwrap_or("?"),
                    b["hook"].as_str().unwrap_or("?"),
                    b["object"].as_str().unwrap_or("?"),
                    b["stream_seq"],
                    b["attempts"].as_array().map_or(0, Vec::len),
                    b["error"].as_str().unwrap_or("?"),
                ));
            }
            let n = letters.len();
            println_out(&format!("{n} dead letter(s)"));
            ExitCode::SUCCESS
        }
    };
    if let Err(e) = client.drain().await {
        tracing::debug!(error = %e, "drain failed");
    }
    Ok(code)
}

/// Writes a line of command output to stdout.
#[allow(clippy::print_stdout)]
pub(crate) fn println_out(line: &str) {
    println!("{line}");
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
