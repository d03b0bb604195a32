//! `flaky`: fails on purpose, to show that one failing plugin is isolated (the
//! bus retries it on its short schedule, then dead-letters; other plugins go on).
//!
//! Prints one line per attempt:
//! `[flaky] always_fails <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k> -> error`.
//! `FLAKY_MODE=permanent` fails permanently (dead-lettered without retries);
//! anything else fails transiently.
// The greppable stdout lines are this program's output, on purpose.
#![allow(clippy::print_stdout)]

use pagoda_plugin_sdk::{EntryContext, Handler, HandlerError, HandlerResult, Hook, Plugin};

/// Fails every delivery; the state says whether permanently.
async fn always_fails(ctx: EntryContext<bool>) -> HandlerResult {
    println!("[flaky] {} -> error", ctx.describe());
    let message = "flaky plugin fails on purpose";
    Err(if ctx.state {
        HandlerError::permanent(message)
    } else {
        HandlerError::transient(message)
    })
}

fn plugin(permanent: bool) -> Result<Plugin, pagoda_plugin_sdk::ManifestError> {
    Plugin::builder("flaky", "Flaky", "1.0.0")
        .description("Fails every delivery on purpose, to demonstrate failure isolation")
        .state(permanent)
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("always_fails")
                .priority(150)
                .retry_backoff_ms([50, 100]),
            always_fails,
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest the bus sees is the one flaky registered before its handler
    /// took its options with it (recorded from that version).
    #[test]
    fn the_manifest_is_unchanged() {
        let recorded = include_str!("../../tests/fixtures/flaky.manifest.json");
        for permanent in [false, true] {
            let plugin = plugin(permanent).expect("valid plugin");
            let now = serde_json::to_value(plugin.manifest()).expect("json");
            let before: serde_json::Value = serde_json::from_str(recorded).expect("json");
            assert_eq!(now, before);
        }
    }
}
