//! `hookbus`: the bus daemon and the operator's commands.
#![forbid(unsafe_code)]

mod cli;
mod console_cmd;
mod demo;
mod nats_config_cmd;
mod ops_cmd;
mod out;
mod replay_cli;

use std::process::ExitCode;

/// mimalloc: less time in the allocator than glibc malloc under the host's load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match Box::pin(cli::main()).await {
        Ok(code) => code,
        Err(e) => {
            // Each cause once (many layers already print their cause).
            eprintln!(
                "hookbus: error: {}",
                hookbus_kit::process::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
