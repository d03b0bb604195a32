//! Durable to the disk: nats-server in the shipped single-server configuration
//! (`docker/nats/nats-server.conf`, `sync_interval: always`) is killed with
//! SIGKILL at several points while the host takes writes over HTTP and the
//! outbox relay publishes them, and restarted on its store. No event the
//! stream acknowledged is lost: after each restart the stream holds at least
//! every event the relay had seen stored (and so deleted from the outbox), and
//! at the end every committed change is exactly one event (the ledger check).
//!
//! Power loss and OS crashes cannot be simulated here (docs/deploy.md says
//! what each configuration guarantees against them).
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_events::Hook;
use hookbus::relay::{Relay, RelaySettings};
use hookbus_tests::consistency::Ledger;
use hookbus_tests::host::TestHost;
use hookbus_tests::{HOST_USER, NatsServer, TestDb, assert_eventually, stream_len};
use serde_json::json;
use store::Backend;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const KILLS: usize = 5;
const WRITERS: usize = 2;

/// A number in `0..n` that differs from run to run (kill points at random).
fn random_below(n: u64) -> u64 {
    RandomState::new().hash_one(std::time::SystemTime::now()) % n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_nats_under_load_loses_no_acknowledged_event() {
    let limits = hookbus_tests::production_limits();
    assert!(
        limits.contains("sync_interval: always"),
        "the shipped single-server config fsyncs every write:\n{limits}"
    );
    let mut server = NatsServer::start().await;
    let db = TestDb::new(Backend::Postgres).await;
    let host = TestHost::start_with(&server, &db, |c| c.relay = false).await;
    // The relay on its own connection, so its counters can be read.
    let relay = Relay::new(
        host.store().clone(),
        async_nats::jetstream::new(server.connect_as(HOST_USER).await),
        core_events::Subjects::default(),
        RelaySettings::for_backend(Backend::Postgres),
    );
    let stats = relay.stats();
    let stop_relay = CancellationToken::new();
    let token = stop_relay.clone();
    let relay_task = tokio::spawn(async move { relay.run(token).await.unwrap() });

    let (status, entity) = hookbus_tests::host::call(
        host.as_admin(reqwest::Method::POST, "/api/v2/entities/")
            .json(&json!({"name": "durable"})),
    )
    .await;
    assert!(status.is_success(), "{entity}");
    let entity = entity["id"].as_i64().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    ledger
        .lock()
        .unwrap()
        .committed(Hook::EntityAfterCreate, format!("entity/{entity}"));

    // Writers: entry creations, one request at a time each; answers other than
    // 2xx (the host cannot reach NATS for a moment) commit nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (client, url) = (
            host.client.clone(),
            host.url(&format!("/api/v2/entities/{entity}/entries/")),
        );
        let auth = format!("Token {}", host.admin_token);
        let (stop, ledger) = (stop.clone(), ledger.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let answer = client
                    .post(&url)
                    .header("Authorization", &auth)
                    .json(&json!({"name": format!("w{w}-{i}")}))
                    .send()
                    .await;
                if let Ok(r) = answer
                    && r.status().is_success()
                    && let Ok(body) = r.json::<serde_json::Value>().await
                    && let Some(id) = body["id"].as_i64()
                {
                    ledger
                        .lock()
                        .unwrap()
                        .committed(Hook::EntryAfterCreate, format!("entry/{id}"));
                }
            }
        }));
    }

    let mut points = Vec::new();
    for kill in 0..KILLS {
        // A kill point: after a random number (20–400) of further stored events.
        let before = stats.published.load(Ordering::SeqCst);
        let at = before + 20 + random_below(380);
        assert_eventually!(
            stats.published.load(Ordering::SeqCst) >= at,
            WAIT,
            "kill {kill}: the relay stored {} of {at} events",
            stats.published.load(Ordering::SeqCst)
        );
        server.kill();
        // Every event counted here was acknowledged as stored, and its outbox
        // row deleted (or about to be): none may be missing after the restart.
        let acked = stats.published.load(Ordering::SeqCst);
        server.restart().await;
        let js = async_nats::jetstream::new(server.connect().await);
        let stored = stream_len(&js, "PAGODA_EVENTS").await;
        assert!(
            stored >= acked,
            "kill {kill}: the stream holds {stored} events after the restart, but {acked} were acknowledged"
        );
        points.push((acked, stored));
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let ledger = ledger.lock().unwrap().clone();
    ledger.check(&server, host.store()).await;
    println!(
        "durability: kills={KILLS} writes={} (acked_before_kill, stored_after_restart)={points:?} duplicates_resent={}",
        ledger.len(),
        stats.duplicates.load(Ordering::SeqCst)
    );
    stop_relay.cancel();
    relay_task.await.unwrap();
    host.stop().await;
}
