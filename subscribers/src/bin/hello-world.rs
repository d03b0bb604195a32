//! `hello-world`: mirrors Pagoda's hello-world plugin. Prints one line to stdout
//! per delivery: `[hello-world] <handler> <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k>`.
//!
//! Environment: see [`pagoda_plugin_sdk::RunConfig`]; `HELLO_PRIORITY` (default
//! 100) sets every handler's priority, to show dispatch ordering.
// The greppable stdout lines are this program's output, on purpose.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use pagoda_plugin_sdk::{EventContext, Hook, Plugin};

fn print_delivery<D>(ctx: &EventContext<D>) {
    println!("[hello-world] {}", ctx.describe());
}

fn plugin(priority: i32) -> Result<Plugin, pagoda_plugin_sdk::ManifestError> {
    Plugin::builder("hello-world", "Hello World", "1.0.0")
        .description("Mirrors Pagoda's hello-world plugin: prints each event it receives")
        .author("Pagoda hook bus")
        .on_entry(
            Hook::EntryAfterCreate,
            "greet_helloworld",
            |ctx| async move {
                print_delivery(&ctx);
                Ok(())
            },
        )
        .entities(["helloworld"])
        .priority(priority)
        .on_entry(Hook::EntryAfterCreate, "entry_created", |ctx| async move {
            print_delivery(&ctx);
            Ok(())
        })
        .priority(priority)
        .on_entry(Hook::EntryAfterUpdate, "entry_updated", |ctx| async move {
            print_delivery(&ctx);
            Ok(())
        })
        .priority(priority)
        .on_entity(
            Hook::EntityAfterCreate,
            "entity_created",
            |ctx| async move {
                print_delivery(&ctx);
                Ok(())
            },
        )
        .priority(priority)
        .build()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let priority = match std::env::var("HELLO_PRIORITY") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("HELLO_PRIORITY '{v}' is not an integer"))?,
        Err(_) => 100,
    };
    pagoda_plugin_sdk::run_main(plugin(priority)?).await?;
    Ok(())
}
