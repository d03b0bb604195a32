//! `hookbus console`: the operator console (a web page and its JSON API) of the
//! `hookbus-console` crate, until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, Result};
use core_events::Subjects;
use hookbus_host::state::defaults as host_defaults;

/// Serve the operator console: plugins, a live tail of events, one event's
/// journey, dead letters (replay, purge). Only superusers of the host may use
/// it (their API tokens, from the host's database); it connects to NATS as
/// the operator (the bus's user).
///
/// Example: hookbus console --listen 127.0.0.1:8090 --database-url postgres://pagoda@db/pagoda
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsoleArgs {
    /// Address to serve the console on (port 0: any free port, logged at start).
    #[arg(long, env = "HOOKBUS_CONSOLE_LISTEN", default_value = hookbus_console::defaults::LISTEN)]
    listen: SocketAddr,
    /// The host's database, where its API tokens are (sqlite://file or
    /// postgres://user@host/db); read only.
    #[arg(long, env = "HOOKBUS_DATABASE_URL", default_value = host_defaults::DATABASE_URL)]
    database_url: String,
    /// Live tails open at once (one ordered consumer each); more are refused.
    #[arg(long, env = "HOOKBUS_CONSOLE_MAX_TAILS", default_value_t = hookbus_console::defaults::MAX_TAILS)]
    max_tails: usize,
}

/// Runs the console until a shutdown signal.
pub(crate) async fn main(
    client: &async_nats::Client,
    subjects: Subjects,
    args: ConsoleArgs,
) -> Result<ExitCode> {
    // An SQLite file must exist already (no empty database made for a typo).
    let url = if args.database_url.starts_with("sqlite:") && !args.database_url.contains("mode=") {
        let sep = if args.database_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}mode=rw", args.database_url)
    } else {
        args.database_url.clone()
    };
    let store = store::Store::connect(&url).await.with_context(|| {
        format!(
            "cannot open the host's database {}",
            hookbus::outbox_cmd::redact(&args.database_url)
        )
    })?;
    let config = hookbus_console::ConsoleConfig {
        listen: args.listen,
        subjects,
        max_tails: args.max_tails.max(1),
        ..Default::default()
    };
    let console = hookbus_console::Console::start(client.clone(), store, config)
        .await
        .context("the console cannot start (is --database-url the host's, migrated database?)")?;
    hookbus_kit::process::shutdown_signal().await;
    tracing::info!("shutting down");
    console.stop().await;
    Ok(ExitCode::SUCCESS)
}
