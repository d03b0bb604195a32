//! `hookbus`: the bus daemon and the operator's commands.
#![forbid(unsafe_code)]

mod cli;
mod demo;
mod ops_cmd;

use std::process::ExitCode;

/// mimalloc: less time in the allocator than glibc malloc under the host's load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match cli::main().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookbus: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
