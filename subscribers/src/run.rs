//! The `main` of a plugin binary: configuration from the environment, tracing,
//! connection, serving until Ctrl-C or SIGTERM, graceful shutdown, drain.

use std::future::Future;

use core_events::{SubjectError, Subjects};
use tracing::info;

use crate::error::ServeError;
use crate::plugin::Plugin;
use crate::serve::ServeOptions;

/// Default NATS server URL.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default subject prefix.
pub const DEFAULT_SUBJECT_PREFIX: &str = "pagoda";

/// Where a plugin binary connects to, read from the environment.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `NATS_URL` | `nats://127.0.0.1:4222` | server(s), comma-separated |
/// | `NATS_CREDS` | none | credentials file (per-plugin least-privilege user) |
/// | `NATS_USER`, `NATS_PASSWORD` | none | user and password (`hookbus nats-config`); the inbox prefix becomes `_INBOX_<user>` |
/// | `PAGODA_SUBJECT_PREFIX` | `pagoda` | subject namespace of the deployment |
/// | `RUST_LOG` | `info` | log filter (logs go to stderr) |
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunConfig {
    /// The NATS server URL(s).
    pub nats_url: String,
    /// A NATS credentials file, when the server requires one.
    pub nats_creds: Option<String>,
    /// A NATS user (with `nats_password`): its inbox prefix is `_INBOX_<user>`,
    /// as the permissions of `hookbus nats-config` require.
    pub nats_user: Option<String>,
    /// The password of `nats_user`.
    pub nats_password: Option<String>,
    /// Serving options (subjects from `PAGODA_SUBJECT_PREFIX`, the rest default).
    pub serve: ServeOptions,
}

impl RunConfig {
    /// Reads the process environment.
    ///
    /// # Errors
    ///
    /// [`RunError::Config`] when `PAGODA_SUBJECT_PREFIX` is not a valid prefix.
    pub fn from_env() -> Result<Self, RunError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads configuration through `lookup` (for tests: no process-global state).
    ///
    /// # Errors
    ///
    /// [`RunError::Config`] when `PAGODA_SUBJECT_PREFIX` is not a valid prefix.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, RunError> {
        let non_empty = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let prefix =
            non_empty("PAGODA_SUBJECT_PREFIX").unwrap_or_else(|| DEFAULT_SUBJECT_PREFIX.to_owned());
        let subjects = Subjects::new(prefix.trim()).map_err(RunError::Config)?;
        Ok(RunConfig {
            nats_url: non_empty("NATS_URL").unwrap_or_else(|| DEFAULT_NATS_URL.to_owned()),
            nats_creds: non_empty("NATS_CREDS"),
            nats_user: non_empty("NATS_USER"),
            nats_password: lookup("NATS_PASSWORD"),
            serve: ServeOptions {
                subjects,
                ..ServeOptions::default()
            },
        })
    }
}

/// Why a plugin binary stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The environment holds a bad value.
    #[error("bad configuration: PAGODA_SUBJECT_PREFIX: {0}")]
    Config(#[source] SubjectError),
    /// `NATS_URL` is not a comma-separated list of NATS server URLs.
    #[error("bad configuration: NATS_URL: {0}")]
    NatsUrl(String),
    /// The credentials file could not be read.
    #[error("could not read NATS credentials file '{path}': {source}")]
    Credentials {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The NATS server could not be reached.
    #[error("could not connect to NATS at '{url}': {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Serving failed (see [`ServeError`]).
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Flushing the connection at exit failed.
    #[error("could not drain the NATS connection: {0}")]
    Drain(#[source] async_nats::client::DrainError),
}

/// What a plugin binary's command line asks ([`command_line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// No argument: run the plugin.
    Run,
    /// Print this on stdout and exit 0 (`--help`, `-h`, `--version`, `-V`).
    Print(String),
    /// Print this on stderr and exit 2 (an argument the binary does not take).
    Usage(String),
}

impl CommandLine {
    /// Prints the text, if any, and returns the exit code to exit with (`None`: run).
    #[allow(clippy::print_stdout)]
    pub fn exit_code(&self) -> Option<std::process::ExitCode> {
        match self {
            CommandLine::Run => None,
            CommandLine::Print(text) => {
                print!("{text}");
                Some(std::process::ExitCode::SUCCESS)
            }
            CommandLine::Usage(text) => {
                eprint!("{text}");
                Some(std::process::ExitCode::from(2))
            }
        }
    }
}

/// Reads the command line of a plugin binary, which takes no arguments (it is
/// configured by its environment, [`RunConfig`]): `--help` gives `about`, the
/// usage and the environment variables (the common ones, then `extra_env`:
/// `(name, meaning)`), `--version` gives `name` and `version`, anything else is
/// a usage error. Nothing is connected to before.
pub fn command_line(
    args: impl IntoIterator<Item = String>,
    name: &str,
    version: &str,
    about: &str,
    extra_env: &[(&str, &str)],
) -> CommandLine {
    let args: Vec<String> = args.into_iter().collect();
    let Some(first) = args.first() else {
        return CommandLine::Run;
    };
    match first.as_str() {
        "--help" | "-h" | "help" => {
            let mut env: Vec<(&str, &str)> = vec![
                (
                    "NATS_URL",
                    "NATS server(s), comma-separated (default nats://127.0.0.1:4222)",
                ),
                ("NATS_CREDS", "NATS credentials file"),
                (
                    "NATS_USER",
                    "NATS user (`hookbus nats-config`); inbox prefix _INBOX_<user>",
                ),
                ("NATS_PASSWORD", "password of NATS_USER"),
                (
                    "PAGODA_SUBJECT_PREFIX",
                    "subject namespace of the deployment (default pagoda)",
                ),
                ("RUST_LOG", "log filter, logs on stderr (default info)"),
            ];
            env.extend_from_slice(extra_env);
            let width = env.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            let mut text = format!(
                "{about}\n\nUsage: {name} [--help | --version]\n\n\
                 Serves the plugin until Ctrl-C or SIGTERM, then stops gracefully. It takes no\n\
                 arguments; the environment configures it:\n\n"
            );
            for (k, v) in env {
                text.push_str(&format!("  {k:<width$}  {v}\n"));
            }
            CommandLine::Print(text)
        }
        "--version" | "-V" => CommandLine::Print(format!("{name} {version}\n")),
        other => CommandLine::Usage(format!(
            "{name}: unexpected argument '{other}': it takes none (configure it with environment variables; see {name} --help)\n"
        )),
    }
}

pub use hookbus_kit::process::{error_chain, shutdown_signal};

pub use hookbus_kit::telemetry::Telemetry;

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info`), and the OTLP span export when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Does nothing if one is
/// installed already. Keep the returned guard until the end of `main`: dropping
/// it flushes the spans. [`run_main`] calls it.
pub fn init_tracing() -> Telemetry {
    hookbus_kit::telemetry::init("info", "pagoda-plugin")
}

/// The whole `main` of a plugin binary: reads [`RunConfig::from_env`], installs
/// tracing, then [`run`]s until Ctrl-C or SIGTERM.
///
/// # Errors
///
/// As [`RunConfig::from_env`] and [`run`].
pub async fn run_main(plugin: Plugin) -> Result<(), RunError> {
    // Logs, and the span export when OTEL_EXPORTER_OTLP_ENDPOINT asks for it;
    // flushed when `_telemetry` drops, after the drain.
    let _telemetry = hookbus_kit::telemetry::init("info", plugin.id());
    let config = RunConfig::from_env()?;
    run(plugin, config, shutdown_signal()).await
}

/// Connects, serves `plugin` until `shutdown` completes, shuts down gracefully and
/// drains the connection.
///
/// # Errors
///
/// [`RunError::Connect`] / [`RunError::Credentials`] when connecting fails,
/// [`RunError::Serve`] when serving or shutting down fails, [`RunError::Drain`]
/// when the final drain fails.
pub async fn run(
    plugin: Plugin,
    config: RunConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let mut options =
        async_nats::ConnectOptions::new().name(format!("pagoda-plugin {}", plugin.id()));
    if let Some(path) = &config.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| RunError::Credentials {
                path: path.clone(),
                source,
            })?;
    }
    if let Some(user) = &config.nats_user {
        options = options
            .user_and_password(
                user.clone(),
                config.nats_password.clone().unwrap_or_default(),
            )
            .custom_inbox_prefix(format!("_INBOX_{user}"));
    }
    let servers = server_addrs(&config.nats_url).map_err(RunError::NatsUrl)?;
    let client = options
        .connect(servers)
        .await
        .map_err(|source| RunError::Connect {
            url: config.nats_url.clone(),
            source,
        })?;
    info!(url = %config.nats_url, plugin = %plugin.id(), "connected to NATS");
    let served = plugin
        .serve_until(client.clone(), config.serve, shutdown)
        .await;
    let drained = client.drain().await;
    served?;
    drained.map_err(RunError::Drain)?;
    Ok(())
}

/// The servers of a comma-separated `NATS_URL`
/// (`nats://n1:4222,nats://n2:4222,nats://n3:4222`), in order: the client
/// connects to one and fails over to the others. async-nats reads a string as
/// one URL, so the list is split here. (`hookbus` has the same function,
/// `hookbus::nats_config::server_addrs`; the SDK does not depend on the bus.)
///
/// # Errors
///
/// A message naming the URL that is not a NATS server URL, or saying the list
/// is empty.
pub fn server_addrs(list: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let servers = list
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse()
                .map_err(|e: std::io::Error| format!("{url:?} is not a NATS server URL: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(
            "no server listed (expected nats://host:port, or several separated by commas)"
                .to_owned(),
        );
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nats_url_lists_split_on_commas() {
        let servers = super::server_addrs("nats://n1:4222, nats://n2:4223,n3").unwrap();
        let ports: Vec<u16> = servers.iter().map(async_nats::ServerAddr::port).collect();
        assert_eq!(ports, [4222, 4223, 4222]);
        let err = super::server_addrs("nats://n1:4222,http://x:80").unwrap_err();
        assert!(err.contains("http://x:80"), "{err}");
        assert!(super::server_addrs(",").is_err());
    }

    use super::*;

    #[test]
    fn command_line_help_version_and_usage() {
        let cl = |args: &[&str]| {
            command_line(
                args.iter().map(|a| (*a).to_owned()),
                "demo",
                "1.2.3",
                "demo: a plugin",
                &[("DEMO_X", "an extra setting")],
            )
        };
        assert_eq!(cl(&[]), CommandLine::Run);
        let CommandLine::Print(help) = cl(&["--help"]) else {
            panic!("help expected");
        };
        assert!(help.starts_with("demo: a plugin\n\nUsage: demo"), "{help}");
        assert!(help.contains("  NATS_URL "), "{help}");
        assert!(help.contains("  DEMO_X "), "{help}");
        assert_eq!(cl(&["-h"]), cl(&["--help"]));
        assert_eq!(
            cl(&["--version"]),
            CommandLine::Print("demo 1.2.3\n".into())
        );
        let CommandLine::Usage(usage) = cl(&["--nats-url", "x"]) else {
            panic!("usage error expected");
        };
        assert!(
            usage.contains("unexpected argument '--nats-url'"),
            "{usage}"
        );
    }

    #[test]
    fn config_defaults_and_overrides() {
        let config = RunConfig::from_lookup(|_| None).expect("defaults are valid");
        assert_eq!(config.nats_url, DEFAULT_NATS_URL);
        assert_eq!(config.serve.subjects.prefix(), "pagoda");
        assert_eq!(config.nats_creds, None);

        let env = |key: &str| match key {
            "NATS_URL" => Some("nats://nats:4222".to_owned()),
            "PAGODA_SUBJECT_PREFIX" => Some("acme.pagoda".to_owned()),
            "NATS_CREDS" => Some(" ".to_owned()),
            _ => None,
        };
        let config = RunConfig::from_lookup(env).expect("valid overrides");
        assert_eq!(config.nats_url, "nats://nats:4222");
        assert_eq!(
            config.serve.subjects.registry_bucket(),
            "acme_pagoda_registry"
        );
        assert_eq!(config.nats_creds, None);

        let err = RunConfig::from_lookup(|k| {
            (k == "PAGODA_SUBJECT_PREFIX").then(|| "bad prefix".to_owned())
        })
        .expect_err("invalid prefix");
        assert!(err.to_string().contains("PAGODA_SUBJECT_PREFIX"), "{err}");
    }
}
