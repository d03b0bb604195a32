//! The Python example plugin (`docs/examples/python_plugin.py`) against a real
//! nats-server and an in-process bus: it registers, receives an event and prints
//! its line. Runs under the production profile, as the plugin's own NATS user. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, the plugin exports its handler's SERVER span
//! to an OTLP receiver in the test, a child of the delivery's `traceparent`. Fails
//! when no Python with nats-py and the OpenTelemetry SDK is found
//! (`tests/setup/ensure-tools.sh` installs one).
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use common::{as_next_version, entry_event, publish_raw, start_bus};
use core_events::{Hook, Subjects};
use hookbus::Publisher;
use hookbus_tests::python::{collect_lines, python};
use hookbus_tests::{NatsServer, assert_eventually, init_tracing, workspace_root};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_plugin_receives_events() {
    let python = python();
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let bus = start_bus(&server, &["py-hello"]).await;
    let receiver = hookbus_tests::otlp::Receiver::start().await;

    server.allow_plugins(&["py-hello"]).await;
    let script = workspace_root().join("docs/examples/python_plugin.py");
    let mut child = Command::new(&python)
        .arg("-u")
        .arg(&script)
        .envs(server.env_for("py-hello"))
        .env_remove("PAGODA_SUBJECT_PREFIX")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url)
        .env("OTEL_SERVICE_NAME", "py-hello")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
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
    // Its SERVER span continues the delivery's trace (the in-process bus exports
    // no spans, so the delivery carries the event's `traceparent` as it is).
    assert_eventually!(
        receiver
            .spans()
            .iter()
            .any(|g| g.span.name == "handle py-hello.greet"),
        WAIT,
        "no span from the plugin; {}",
        output()
    );
    let spans = receiver.spans();
    let span = &spans
        .iter()
        .find(|g| g.span.name == "handle py-hello.greet")
        .unwrap();
    assert_eq!(span.service, "py-hello");
    assert_eq!(span.span.kind, hookbus_tests::otlp::SpanKind::Server as i32);
    assert_eq!(
        hookbus_tests::otlp::hex(&span.span.trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        hookbus_tests::otlp::hex(&span.span.parent_span_id),
        "00f067aa0ba902b7"
    );
    assert_eq!(
        hookbus_tests::otlp::attr(&span.span.attributes, "messaging.system").as_deref(),
        Some("nats")
    );

    // A later, compatible version of the event (docs/protocol.md, "Versions": a
    // `v2` dataschema, an envelope attribute and data fields the plugin does not
    // know): the plugin, written for version 1, handles it the same way.
    let v1 = entry_event(Hook::EntryAfterCreate, "customer", 43);
    let seq = publish_raw(
        &client,
        Hook::EntryAfterCreate,
        "customer",
        v1.object_key(),
        &as_next_version(&v1),
    )
    .await;
    // (Published raw, without a traceparent: the plugin prints `trace=-`.)
    let expected = format!("[py-hello] greet entry.after_create object=entry/43 seq={seq} trace=-");
    assert_eventually!(
        stdout.lock().unwrap().contains(&expected),
        WAIT,
        "expected {expected:?}; {}",
        output()
    );
    assert_eventually!(bus.stats.delivered.get() == 2, WAIT);
    assert_eq!(bus.stats.dead_lettered.get(), 0, "{}", output());

    child.kill().await.unwrap();
    bus.stop().await.unwrap();
}
