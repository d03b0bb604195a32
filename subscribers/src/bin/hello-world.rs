//! `hello-world`: mirrors Pagoda's hello-world plugin. Prints one line to stdout
//! per delivery: `[hello-world] <handler> <hook> entity=<name> object=<entry/42> seq=<n> attempt=<k>`.
//!
//! Synchronous hooks, as Pagoda's hello-world has them but really enforced:
//! `reject_forbidden` (`entry.validate`) rejects entry names containing
//! "forbidden"; `fill_note` (`entry.before_create`) fills an empty note with a
//! default; `add_greeting` (`entry.get_attrs`) appends a computed `greeting`
//! attribute.
//!
//! An API route, `greet` (`GET /api/v2/plugins/hello-world/greet`, authenticated
//! users): `{"message": "Hello, <username>!", "plugin": "hello-world"}`;
//! `?name=X` greets X; `?fail=true` answers a plugin error "greeting failed on
//! purpose".
//!
//! A task, `count` (operation-id offset 0), params `{"to": N (10), "delay_ms": M
//! (100), "fail": bool}`: counts 1..=N, one step every M ms, recording progress
//! and checking for a cancel at each step; ends DONE "counted to N", WARNING
//! "nothing to count" when N is 0, ERROR "asked to fail" when `fail` is true.
//! Prints `[hello-world] count job=<id> <message>` when it ends.
//!
//! Environment: see [`pagoda_plugin_sdk::RunConfig`]; `HELLO_PRIORITY` (default
//! 100) sets every handler's priority, to show dispatch ordering.
// The greppable stdout lines are this program's output, on purpose.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::Context as _;
use pagoda_plugin_sdk::{
    ApiContext, ApiResponse, ApiResult, AttrType, Attribute, BeforeContext, EventContext,
    FieldError, GetAttrsContext, Handler, HandlerError, HandlerResult, Hook, NewEntry, ObjectRef,
    Plugin, SyncResult, Task, TaskContext, TaskOutcome, TaskResult, ValidateContext,
};
use serde::Deserialize;

/// The note `fill_note` gives an entry created without one.
const DEFAULT_NOTE: &str = "created with hello-world";

/// The notification handlers: one line per delivery.
async fn print_delivery<D>(ctx: EventContext<D>) -> HandlerResult {
    println!("[hello-world] {}", ctx.describe());
    Ok(())
}

/// `entry.validate`: names containing "forbidden" are invalid.
async fn reject_forbidden(ctx: ValidateContext) -> SyncResult<Vec<FieldError>> {
    let name = &ctx.request.entry.name;
    if name.contains("forbidden") {
        let message = format!("entry name '{name}' contains 'forbidden'");
        return Ok(vec![FieldError::field("name", message)]);
    }
    Ok(Vec::new())
}

/// `entry.before_create`: an empty note becomes [`DEFAULT_NOTE`].
async fn fill_note(ctx: BeforeContext<NewEntry>) -> SyncResult<NewEntry> {
    let mut draft = ctx.request.data;
    if draft.note.is_empty() {
        draft.note = DEFAULT_NOTE.to_owned();
    }
    Ok(draft)
}

/// `entry.get_attrs`: appends a computed `greeting` attribute.
async fn add_greeting(ctx: GetAttrsContext<Attribute>) -> SyncResult<Vec<Attribute>> {
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
}

/// `GET /greet`: greets the user, or `?name=`.
async fn greet(ctx: ApiContext) -> ApiResult {
    if ctx.query("fail") == Some("true") {
        return Err(HandlerError::permanent("greeting failed on purpose"));
    }
    let name = ctx
        .query("name")
        .map(str::to_owned)
        .or_else(|| ctx.user().map(|u| u.username.clone()))
        .unwrap_or_else(|| "world".to_owned());
    Ok(ApiResponse::ok(serde_json::json!({
        "message": format!("Hello, {name}!"),
        "plugin": "hello-world",
    })))
}

/// Parameters of the `count` task.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CountParams {
    /// Count from 1 to this.
    to: u64,
    /// Milliseconds per step.
    delay_ms: u64,
    /// Fail instead of counting.
    fail: bool,
}

impl Default for CountParams {
    fn default() -> Self {
        CountParams {
            to: 10,
            delay_ms: 100,
            fail: false,
        }
    }
}

/// The `count` task: counts to `to`, a step every `delay_ms`, and stops early
/// when the job is cancelled.
async fn count(ctx: TaskContext) -> TaskResult {
    let outcome = count_steps(&ctx).await;
    let message = match &outcome {
        Ok(TaskOutcome::Done(m) | TaskOutcome::Warning(m)) => m.clone(),
        Err(e) => e.to_string(),
    };
    println!("[hello-world] count job={} {message}", ctx.job_id());
    outcome
}

async fn count_steps(ctx: &TaskContext) -> TaskResult {
    let params: CountParams = if ctx.params().is_null() {
        CountParams::default()
    } else {
        ctx.params_as()?
    };
    if params.fail {
        return Err(HandlerError::permanent("asked to fail"));
    }
    if params.to == 0 {
        return Ok(TaskOutcome::warning("nothing to count"));
    }
    let step = Duration::from_millis(params.delay_ms);
    let cancel = ctx.cancellation();
    for n in 1..=params.to {
        tokio::select! {
            () = cancel.cancelled() => return Ok(TaskOutcome::done(format!("cancelled after {}", n - 1))),
            () = tokio::time::sleep(step) => {}
        }
        // A cancel can land between the wait and this write: `progress` then
        // writes nothing, sets the cancel signal and fails, and the job is
        // cancelled, not failed.
        if let Err(e) = ctx.progress(format!("counted {n} of {}", params.to)).await {
            if cancel.is_cancelled() {
                return Ok(TaskOutcome::done(format!("cancelled after {}", n - 1)));
            }
            return Err(e);
        }
    }
    Ok(TaskOutcome::done(format!("counted to {}", params.to)))
}

fn plugin(priority: i32) -> Result<Plugin, pagoda_plugin_sdk::ManifestError> {
    Plugin::builder("hello-world", "Hello World", "1.0.0")
        .description("Mirrors Pagoda's hello-world plugin: prints each event it receives")
        .author("Pagoda hook bus")
        .default_priority(priority)
        .on_entry(
            Hook::EntryAfterCreate,
            Handler::named("greet_helloworld").entities(["helloworld"]),
            print_delivery,
        )
        .on_entry(Hook::EntryAfterCreate, "entry_created", print_delivery)
        .on_entry(Hook::EntryAfterUpdate, "entry_updated", print_delivery)
        .on_entity(Hook::EntityAfterCreate, "entity_created", print_delivery)
        .on_validate("reject_forbidden", reject_forbidden)
        .on_before_create_entry("fill_note", fill_note)
        .on_get_entry_attrs("add_greeting", add_greeting)
        .api_route("greet", "GET", "/greet", greet)
        .task(
            Task::named("count")
                .description("Counts to `to` (10), one step every `delay_ms` (100)"),
            0,
            count,
        )
        .build()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = pagoda_plugin_sdk::run::command_line(
        std::env::args().skip(1),
        "hello-world",
        env!("CARGO_PKG_VERSION"),
        "hello-world: a Pagoda hook bus plugin mirroring Pagoda's hello-world: prints each\n\
         event it receives; validates, fills and extends entries; an API route and a task.",
        &[(
            "HELLO_PRIORITY",
            "priority of every handler (default 100), to show dispatch ordering",
        )],
    );
    if let Some(code) = args.exit_code() {
        return code;
    }
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "hello-world: error: {}",
                pagoda_plugin_sdk::run::error_chain(e.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest the bus sees is the one hello-world registered before its
    /// handlers took their options with them (recorded from that version).
    #[test]
    fn the_manifest_is_unchanged() {
        for (priority, recorded) in [
            (
                100,
                include_str!("../../tests/fixtures/hello-world.manifest.json"),
            ),
            (
                20,
                include_str!("../../tests/fixtures/hello-world-20.manifest.json"),
            ),
        ] {
            let plugin = plugin(priority).expect("valid plugin");
            let now = serde_json::to_value(plugin.manifest()).expect("json");
            let before: serde_json::Value = serde_json::from_str(recorded).expect("json");
            assert_eq!(now, before, "priority {priority}");
        }
    }
}
