//! Tests of the test harness itself: the real `nats-server` it starts is new
//! enough, dies when killed, keeps its JetStream data across restarts, and leaves
//! nothing behind when dropped.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use hookbus_tests::{
    NatsServer, assert_eventually, free_port, init_tracing, nats_server_binary, wait_for,
    wait_until,
};

const SECS5: Duration = Duration::from_secs(5);

#[test]
fn finds_a_new_enough_binary() {
    let bin = nats_server_binary();
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("nats-server: v2."),
        "{}: {text}",
        bin.display()
    );
    assert!(
        !text.contains("v2.9."),
        "{} is too old: {text}",
        bin.display()
    );
}

#[tokio::test]
async fn starts_with_jetstream_that_can_create_kv_buckets() {
    init_tracing();
    let server = NatsServer::start().await;
    assert!(server.url().starts_with("nats://127.0.0.1:"));
    assert_ne!(server.port(), 4222, "must never use the machine's own NATS");
    assert!(server.is_running());

    let client = server.connect().await;
    assert!(
        client.server_info().jetstream,
        "JetStream is not enabled on {}",
        server.url()
    );
    let js = jetstream::new(client);
    js.query_account().await.unwrap();
    // async-nats 0.52 cannot create KV buckets on nats-server 2.9: this proves >= 2.10.
    let kv = js
        .create_key_value(kv::Config {
            bucket: "harness".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("answer", "42".into()).await.unwrap();
    assert_eq!(kv.get("answer").await.unwrap().unwrap(), "42");
    assert!(server.store_dir().join("jetstream").is_dir());
}

#[tokio::test]
async fn killed_server_is_gone() {
    init_tracing();
    let mut server = NatsServer::start().await;
    let url = server.url();
    let pid = server.pid().unwrap();
    server.kill();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(&url)
        .await;
    assert!(connect.is_err(), "connected to a killed server at {url}");
    // Killing twice is harmless.
    server.kill();
}

#[tokio::test]
async fn restart_keeps_port_and_jetstream_data() {
    init_tracing();
    let mut server = NatsServer::start().await;
    let port = server.port();
    {
        let js = jetstream::new(server.connect().await);
        js.create_stream(stream::Config {
            name: "HARNESS".into(),
            subjects: vec!["harness.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 0..3 {
            js.publish(format!("harness.{i}"), "x".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    server.kill();
    assert!(!server.is_running());
    server.restart().await;
    assert!(server.is_running());
    assert_eq!(server.port(), port);

    let js = jetstream::new(server.connect().await);
    let stream = js.get_stream("HARNESS").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 3);

    // A restart of a running server works too (it is killed first).
    server.restart().await;
    let js = jetstream::new(server.connect().await);
    let stream = js.get_stream("HARNESS").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 3);
}

#[tokio::test]
async fn clients_reconnect_after_a_restart() {
    init_tracing();
    let mut server = NatsServer::start().await;
    let client = server.connect().await;
    server.kill();
    server.restart().await;
    // The client's own reconnect logic finds the server on the same port.
    assert_eventually!(
        client.connection_state() == async_nats::connection::State::Connected,
        Duration::from_secs(10)
    );
    client.publish("after.restart", "ok".into()).await.unwrap();
    client.flush().await.unwrap();
}

#[tokio::test]
async fn graceful_stop() {
    init_tracing();
    let mut server = NatsServer::start().await;
    server.stop().await;
    assert!(!server.is_running());
    assert!(
        server.log_tail(50).contains("Server Exiting"),
        "{}",
        server.log_tail(50)
    );
    server.restart().await;
    assert!(server.is_running());
}

#[tokio::test]
async fn drop_removes_process_and_temp_dir() {
    init_tracing();
    let server = NatsServer::start().await;
    let pid = server.pid().unwrap();
    let dir = server.dir().to_path_buf();
    assert!(dir.exists());
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nats-server pid {pid} still exists"
    );
}

#[tokio::test]
async fn starts_with_a_config_file() {
    init_tracing();
    let server = NatsServer::start_with_config("max_payload: 4096\n").await;
    assert!(server.dir().join("nats.conf").is_file());
    let client = server.connect().await;
    assert_eq!(client.server_info().max_payload, 4096);
    // Command-line flags still win: JetStream is on, in the temp store.
    jetstream::new(client).query_account().await.unwrap();
}

#[tokio::test]
async fn servers_are_independent() {
    init_tracing();
    let (a, b) = tokio::join!(NatsServer::start(), NatsServer::start());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
}

#[tokio::test]
async fn polling_helpers() {
    let counter = std::sync::atomic::AtomicU32::new(0);
    let bump = || async { counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 };
    wait_until(SECS5, || async { bump().await >= 3 }).await;
    let value = wait_for(SECS5, || async {
        let n = bump().await;
        (n >= 6).then_some(n)
    })
    .await;
    assert_eq!(value, 6);
    assert_eventually!(bump().await >= 8);
    assert_ne!(free_port(), 0);
}

#[tokio::test]
#[should_panic(expected = "assertion not true within")]
async fn assert_eventually_times_out() {
    assert_eventually!(false, Duration::from_millis(100), "never {}", "true");
}

#[tokio::test]
#[should_panic(expected = "no value within")]
async fn wait_for_times_out() {
    wait_for(Duration::from_millis(100), || async { None::<()> }).await;
}
