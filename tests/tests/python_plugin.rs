//! The Python example plugin (`docs/examples/python_plugin.py`) against a real
//! nats-server and an in-process bus: it registers, receives an event and prints
//! its line. Runs under the production profile, as the plugin's own NATS user. Fails when
//! no Python with nats-py is found (`tests/setup/ensure-tools.sh` installs one).
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::{entry_event, start_bus};
use core_events::{Hook, Subjects};
use hookbus::Publisher;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing, workspace_root};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(15);

/// The Python to run the plugin with: `HOOKBUS_PYTHON` (set by
/// `tests/setup/ensure-tools.sh`, which installs nats-py into `.tools/pyvenv`),
/// else `.tools/pyvenv/bin/python`. The test fails, never skips, when it has no
/// nats-py: CI must run it.
fn python() -> std::path::PathBuf {
    let python = std::env::var_os("HOOKBUS_PYTHON")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/pyvenv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import nats"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} has no nats-py: run `source tests/setup/ensure-tools.sh` (./test.sh does), \
         which installs it into .tools/pyvenv, or set HOOKBUS_PYTHON",
        python.display()
    );
    python
}

/// Reads `pipe` line by line in a task; the lines so far are in the returned vector.
fn collect_lines<R>(pipe: R) -> Arc<Mutex<Vec<String>>>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    let sink: Arc<Mutex<Vec<String>>> = Arc::default();
    let lines_so_far = sink.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines_so_far
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_plugin_receives_events() {
    let python = python();
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let bus = start_bus(&server, &["py-hello"]).await;

    server.allow_plugins(&["py-hello"]).await;
    let script = workspace_root().join("docs/examples/python_plugin.py");
    let mut child = Command::new(&python)
        .arg("-u")
        .arg(&script)
        .envs(server.env_for("py-hello"))
        .env_remove("PAGODA_SUBJECT_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));

    let stdout = collect_lines(child.stdout.take().unwrap());
    let stderr = collect_lines(child.stderr.take().unwrap());
    let output = || {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            stdout.lock().unwrap().join("\n"),
            stderr.lock().unwrap().join("\n")
        )
    };

    if bus
        .registry
        .wait_for(WAIT, |t| t.is_enabled("py-hello"))
        .await
        .is_err()
    {
        panic!("py-hello did not register within {WAIT:?}; {}", output());
    }

    let mut event = entry_event(Hook::EntryAfterCreate, "customer", 42);
    // The plugin reads the trace from the delivery's traceparent header.
    event.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let publisher = Publisher::new(jetstream::new(client.clone()), Subjects::default());
    let ack = publisher.publish(&event).await.unwrap();
    let expected = format!(
        "[py-hello] greet entry.after_create object=entry/42 seq={} trace=4bf92f3577b34da6a3ce929d0e0e4736",
        ack.sequence
    );
    assert_eventually!(
        stdout.lock().unwrap().contains(&expected),
        WAIT,
        "expected {expected:?}; {}",
        output()
    );
    assert_eventually!(bus.stats.delivered.get() == 1, WAIT);
    assert_eq!(bus.stats.dead_lettered.get(), 0, "{}", output());

    child.kill().await.unwrap();
    bus.stop().await.unwrap();
}
