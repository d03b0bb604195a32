//! The Python example plugin (`docs/examples/python_plugin.py`) against a real
//! nats-server and an in-process bus: it registers, receives an event and prints
//! its line. Skipped (with a notice) when `python3` or `nats-py` is missing.
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

/// True when `python3 -c 'import nats'` succeeds.
fn nats_py_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import nats"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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
    if !nats_py_available() {
        println!(
            "SKIPPED python_example_plugin_receives_events: `python3 -c 'import nats'` failed; \
             install nats-py (pip install 'nats-py>=2,<3') to run it"
        );
        return;
    }
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let bus = start_bus(&client, &["py-hello"]).await;

    let script = workspace_root().join("docs/examples/python_plugin.py");
    let mut child = Command::new("python3")
        .arg("-u")
        .arg(&script)
        .env("NATS_URL", server.url())
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

    let event = entry_event(Hook::EntryAfterCreate, "customer", 42);
    let publisher = Publisher::new(jetstream::new(client.clone()), Subjects::default());
    let ack = publisher.publish(&event).await.unwrap();
    let expected = format!(
        "[py-hello] greet entry.after_create object=entry/42 seq={}",
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
