//! `flaky`: fails on purpose, to show that one failing plugin is isolated (the
//! bus retries it on its short schedule, then dead-letters; other plugins go on).
//!
//! Prints one line per attempt:
//! `[flaky] always_fails <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k> -> error`.
//! `FLAKY_MODE=permanent` fails permanently (dead-lettered without retries);
//! anything else fails transiently.
// The greppable stdout lines are this program's output, on purpose.
#![allow(clippy::print_stdout)]

use pagoda_plugin_sdk::{EntryContext, HandlerError, Hook, Plugin};

fn plugin(permanent: bool) -> Result<Plugin, pagoda_plugin_sdk::ManifestError> {
    Plugin::builder("flaky", "Flaky", "1.0.0")
        .description("Fails every delivery on purpose, to demonstrate failure isolation")
        .on_entry(
            Hook::EntryAfterCreate,
            "always_fails",
            move |ctx: EntryContext| async move {
                println!("[flaky] {} -> error", ctx.describe());
                let message = "flaky plugin fails on purpose";
                Err(if permanent {
                    HandlerError::permanent(message)
                } else {
                    HandlerError::transient(message)
                })
            },
        )
        .priority(150)
        .retry_backoff_ms([50, 100])
        .build()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let permanent =
        std::env::var("FLAKY_MODE").is_ok_and(|mode| mode.trim().eq_ignore_ascii_case("permanent"));
    pagoda_plugin_sdk::run_main(plugin(permanent)?).await?;
    Ok(())
}
