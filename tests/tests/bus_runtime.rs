//! The bus runtime under faults: plugins replying with malformed headers, plain
//! (non Services API) plugins, panicking tasks, the `hookbus` binary's health,
//! help, shutdown and error messages under the production NATS configuration.
#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use core_events::store::{NewEntry, WriteContext};
use core_events::{HandlerSpec, Hook, PluginManifest, Subjects, sample};
use hookbus::Publisher;
use hookbus::sync_hooks::SyncHooks;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// A plugin written against the raw NATS protocol (no client library): it
/// queue-subscribes to `subjects` in group `queue` and answers every request
/// with `reply_headers` (raw header lines, each ending in `\r\n`) and `body`.
/// Counts the requests it answered. Raw, because a client library refuses or
/// cleans a header value holding a line break, and a malicious plugin would not.
struct RawPlugin {
    answered: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawPlugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_plugin(
    server: &NatsServer,
    credentials: Option<(&str, &str)>,
    subjects: &[String],
    queue: &str,
    reply_headers: &'static [u8],
    body: &'static [u8],
) -> RawPlugin {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
        "protocol": 1, "name": "raw-plugin",
    });
    if let Some((user, password)) = credentials {
        connect["user"] = user.into();
        connect["pass"] = password.into();
    }
    let mut hello = format!("CONNECT {connect}\r\n");
    for (sid, subject) in subjects.iter().enumerate() {
        hello.push_str(&format!("SUB {subject} {queue} {}\r\n", sid + 1));
    }
    hello.push_str("PING\r\n");
    write.write_all(hello.as_bytes()).await.unwrap();
    // The PONG says the server has the subscriptions.
    loop {
        line.clear();
        read.read_line(&mut line).await.unwrap();
        assert!(!line.starts_with("-ERR"), "raw plugin refused: {line}");
        if line.starts_with("PONG") {
            break;
        }
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let task = tokio::spawn(async move {
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (reply, size) = match parts.first().copied() {
                Some("PING") => {
                    let _ = write.write_all(b"PONG\r\n").await;
                    continue;
                }
                // MSG <subject> <sid> [reply] <size>
                Some("MSG") => (
                    (parts.len() == 5).then(|| parts[3].to_owned()),
                    parts[parts.len() - 1].parse::<usize>().unwrap(),
                ),
                // HMSG <subject> <sid> [reply] <header size> <total size>
                Some("HMSG") => (
                    (parts.len() == 6).then(|| parts[3].to_owned()),
                    parts[parts.len() - 1].parse::<usize>().unwrap(),
                ),
                _ => continue,
            };
            let mut payload = vec![0; size + 2];
            read.read_exact(&mut payload).await.unwrap();
            let Some(reply) = reply else { continue };
            let mut headers = b"NATS/1.0\r\n".to_vec();
            headers.extend_from_slice(reply_headers);
            headers.extend_from_slice(b"\r\n");
            let mut out = format!(
                "HPUB {reply} {} {}\r\n",
                headers.len(),
                headers.len() + body.len()
            )
            .into_bytes();
            out.extend_from_slice(&headers);
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n");
            if write.write_all(&out).await.is_err() {
                return;
            }
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    RawPlugin { answered, task }
}

fn manifest(id: &str, handlers: &[(&str, Hook)]) -> PluginManifest {
    let mut m = PluginManifest::new(id, format!("Raw plugin {id}"), "1.0.0");
    for (name, hook) in handlers {
        let mut h = HandlerSpec::new(*name, *hook);
        h.timeout_ms = 2_000;
        h.retry_backoff_ms = vec![20, 40];
        m.handlers.push(h);
    }
    m
}

/// async-nats before 0.52 panicked its connection task on a `\r` inside a received
/// header value: one reply of a plugin stopped the bus's (or the host's) connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_reply_with_carriage_return_in_a_header_does_not_stop_the_bus() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let bus = start_bus(&client, &["crlf"]).await;
    let subjects = Subjects::default();
    let plugin = raw_plugin(
        &server,
        None,
        &[
            subjects.handler("crlf", "created"),
            subjects.handler("crlf", "check"),
        ],
        "crlf",
        b"Pagoda-Note: first\rsecond\r\n",
        b"{}",
    )
    .await;
    register(
        &client,
        &manifest(
            "crlf",
            &[
                ("created", Hook::EntryAfterCreate),
                ("check", Hook::EntryValidate),
            ],
        ),
    )
    .await;
    wait_registered(&bus, &["crlf"]).await;
    let publisher = Publisher::new(js.clone(), subjects.clone());

    // A dispatched delivery answered with the header: the bus takes the answer.
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    assert_eq!(bus.stats.delivered.get(), 1);
    assert_eq!(bus.stats.failed_attempts.get(), 0);

    // A synchronous hook answered the same way, on the host's own connection.
    let host = server.connect().await;
    let hooks = SyncHooks::new(host.clone(), bus.registry.clone());
    let ctx = WriteContext {
        user: Some(sample::user(1, "admin")),
        traceparent: None,
    };
    let outcome = tokio::time::timeout(
        WAIT,
        hooks.validate(
            &sample::entity(1, "customer"),
            &NewEntry::named("ACME"),
            None,
            &ctx,
        ),
    )
    .await
    .expect("validation answered")
    .unwrap();
    assert!(outcome.skipped.is_empty(), "{:?}", outcome.skipped);
    assert_eq!(plugin.answered.load(Ordering::SeqCst), 2);

    // Both connections still work: the bus dispatches on, the host validates on.
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 2))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 2, WAIT);
    assert_eq!(bus.stats.delivered.get(), 2);
    let again = tokio::time::timeout(
        WAIT,
        hooks.validate(
            &sample::entity(1, "customer"),
            &NewEntry::named("ACME 2"),
            None,
            &ctx,
        ),
    )
    .await
    .expect("validation answered")
    .unwrap();
    assert!(again.skipped.is_empty());
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert_eq!(
        host.connection_state(),
        async_nats::connection::State::Connected
    );
    bus.stop().await.unwrap();
}
