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
async fn main() -> std::process::ExitCode {
    let args = pagoda_plugin_sdk::run::command_line(
        std::env::args().skip(1),
        "flaky",
        env!("CARGO_PKG_VERSION"),
        "flaky: a Pagoda hook bus plugin that fails every delivery on purpose, to show\n\
         that one failing plugin is isolated (retried, then dead-lettered).",
        &[(
            "FLAKY_MODE",
            "`permanent`: fail permanently (dead-lettered without retries); else transiently",
        )],
    );
    if let Some(code) = args.exit_code() {
        return code;
    }
    let permanent =
        std::env::var("FLAKY_MODE").is_ok_and(|mode| mode.trim().eq_ignore_ascii_case("permanent"));
    let result: anyhow::Result<()> = async {
        pagoda_plugin_sdk::run_main(plugin(permanent)?).await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "flaky: error: {}",
                pagoda_plugin_sdk::run::error_chain(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}
