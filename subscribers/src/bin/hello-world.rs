//! `hello-world`: mirrors Pagoda's hello-world plugin. Prints one line to stdout
//! per delivery: `[hello-world] <handler> <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k>`.
//!
//! Synchronous hooks, as Pagoda's hello-world has them but really enforced:
//! `reject_forbidden` (`entry.validate`) rejects entry names containing
//! "forbidden"; `fill_note` (`entry.before_create`) fills an empty note with a
//! default; `add_greeting` (`entry.get_attrs`) appends a computed `greeting`
//! attribute.
//!
//! Environment: see [`pagoda_plugin_sdk::RunConfig`]; `HELLO_PRIORITY` (default
//! 100) sets every handler's priority, to show dispatch ordering.
// The greppable stdout lines are this program's output, on purpose.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use core_events::{AttrType, Attribute, ObjectRef};
use pagoda_plugin_sdk::{EventContext, FieldError, Hook, Plugin};

/// The note `fill_note` gives an entry created without one.
const DEFAULT_NOTE: &str = "created with hello-world";

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
        .on_validate("reject_forbidden", |ctx| async move {
            let mut errors = Vec::new();
            if ctx.request.entry.name.contains("forbidden") {
                errors.push(FieldError::field(
                    "name",
                    format!(
                        "entry name '{}' contains 'forbidden'",
                        ctx.request.entry.name
                    ),
                ));
            }
            Ok(errors)
        })
        .priority(priority)
        .on_before_create_entry("fill_note", |ctx| async move {
            let mut draft = ctx.request.data;
            if draft.note.is_empty() {
                draft.note = DEFAULT_NOTE.to_owned();
            }
            Ok(draft)
        })
        .priority(priority)
        .on_get_entry_attrs("add_greeting", |ctx| async move {
            let mut attrs = ctx.request.attrs;
            let name = ctx.request.entry.map(|e| e.name).unwrap_or_default();
            attrs.push(Attribute {
                id: 0,
                name: "greeting".to_owned(),
                attr_type: AttrType::STRING,
                schema: ObjectRef {
                    id: 0,
                    name: "greeting".to_owned(),
                },
                value: serde_json::Value::String(format!("Hello, {name}!")),
            });
            Ok(attrs)
        })
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
