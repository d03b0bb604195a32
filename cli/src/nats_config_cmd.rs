//! `hookbus nats-config`: the command over [`hookbus::nats_config`], printing the
//! `authorization` block (and generated passwords) for the operator.

use core_events::Subjects;
use hookbus::nats_config::{Passwords, generate_passwords, password_env_var, render, users};

/// Arguments of `hookbus nats-config`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct NatsConfigArgs {
    /// Plugins that get a user, comma-separated (the bus's ENABLED_PLUGINS).
    #[arg(long, env = "ENABLED_PLUGINS", default_value = "")]
    pub(crate) enabled_plugins: String,
    /// `env`: passwords are `$NATS_PASSWORD_<USER>` references that nats-server
    /// resolves from its environment (the file holds no secret); `generate`:
    /// random passwords written into the file and listed on stderr.
    #[arg(long, default_value = "env", value_parser = ["env", "generate"])]
    pub(crate) passwords: String,
    /// The buses' `--partitions`: each partition's dispatcher consumer is denied to
    /// plugins.
    #[arg(long, env = "HOOKBUS_PARTITIONS", default_value_t = hookbus::config::defaults::PARTITIONS)]
    pub(crate) partitions: u32,
}

/// `hookbus nats-config`: writes the block with `out` (one call).
///
/// # Errors
///
/// As [`render`](hookbus::nats_config::render) and
/// [`generate_passwords`](hookbus::nats_config::generate_passwords).
pub(crate) fn main(
    subjects: &Subjects,
    args: &NatsConfigArgs,
    out: impl Fn(&str),
) -> anyhow::Result<std::process::ExitCode> {
    let plugins = hookbus::config::parse_enabled_plugins(&args.enabled_plugins);
    if plugins.is_empty() {
        tracing::warn!("no plugins given (ENABLED_PLUGINS): only the bus and host users");
    }
    let passwords = if args.passwords == "generate" {
        let map = generate_passwords(&users(&plugins)?)?;
        for (user, password) in &map {
            // The generated passwords, for the operator (not part of the file).
            eprintln!("{}={password}  # user {user}", password_env_var(user));
        }
        Passwords::Literal(map)
    } else {
        Passwords::EnvRefs
    };
    out(render(subjects, &plugins, &passwords, args.partitions)?.trim_end());
    Ok(std::process::ExitCode::SUCCESS)
}
