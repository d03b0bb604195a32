//! Outbox relay throughput and commit-to-handler latency, on SQLite and PostgreSQL,
//! against raw async-nats JetStream publishing of the same events.
//!
//! `cargo bench -p hookbus-tests --bench relay` (knobs: `BENCH_EVENTS` (default
//! 50,000), `BENCH_ROUNDS` (3), `BENCH_LATENCY_EVENTS` (300), `BENCH_DB`
//! (`sqlite` or `postgres`; default both), `BENCH_NATS` (which NATS, comma-separated:
//! `r1` the shipped single server with `sync_interval: always`, `r1_default_sync`
//! the same with nats-server's default fsync every 2 minutes, `r3` a three-node
//! cluster on loopback with R3 streams; default all three)). Under `cargo test`
//! it runs as a quick smoke test with a few hundred events.
//!
//! Throughput, per database, NATS and round, alternating which side goes first
//! (and running every NATS in each round, so the three are measured side by side):
//! - relay: a fresh nats-server and a fresh database whose outbox holds `N` rows
//!   (the same events for both sides: 1 KB entry snapshots over 5,000 entries),
//!   written before the clock starts; the clock runs from starting the relay until
//!   it has published all `N` (stream acks), including reading and deleting rows.
//! - raw: a fresh nats-server; the same `N` messages (subject, headers, payload)
//!   published with `send_publish` keeping the relay's in-flight window
//!   (`RelaySettings::max_in_flight`) of unacknowledged publishes.
//!
//! Prints `bench: scenario=relay db=… nats=… relay_eps=… raw_eps=… ratio=…` with
//! medians, then what durability costs the relay:
//! `bench: scenario=relay_durability db=… r1_default_sync_eps=… r1_eps=… r3_eps=…
//! sync_always_ratio=… r3_ratio=…` (each against `r1_default_sync`).
//!
//! Latency (idle system): the bus, a plugin answering at once, the relay and the
//! store; one entry write at a time; time from the write's commit returning to
//! the plugin receiving the event. Prints
//! `bench: scenario=commit_to_handler db=… events=… p50_ms=… p99_ms=…`.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub
)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use core_events::{EntryEvent, Envelope, HandlerSpec, Hook, PluginManifest, Subjects, sample};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hookbus::config::BusConfig;
use hookbus::relay::{Relay, RelaySettings};
use hookbus::run::Bus;
use hookbus_tests::bench::{BenchNats, NatsKind, env_usize, median, percentile};
use hookbus_tests::{NatsServer, TestDb};
use store::{Backend, Store, outbox};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

fn events(n: usize) -> Vec<Envelope<EntryEvent>> {
    (0..n)
        .map(|i| {
            let id = i64::try_from(i % 5_000).unwrap() + 1;
            sample::entry_event(Hook::EntryAfterUpdate, &format!("entity{}", i % 8), id)
        })
        .collect()
}

async fn fill_outbox(store: &Store, events: &[Envelope<EntryEvent>]) {
    for chunk in events.chunks(500) {
        let mut tx = store.begin().await.unwrap();
        for e in chunk {
            outbox::insert_envelope(&mut tx, e).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
}

async fn provisioned(nats: &BenchNats, client: &async_nats::Client) -> jetstream::Context {
    let js = jetstream::new(client.clone());
    BenchNats::provision(&js, &Subjects::default(), &nats.stream_settings()).await;
    js
}

async fn run_relay(kind: NatsKind, backend: Backend, events: &[Envelope<EntryEvent>]) -> f64 {
    let nats = BenchNats::start(kind).await;
    let client = nats.connect().await;
    let js = provisioned(&nats, &client).await;
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    fill_outbox(&store, events).await;
    let relay = Relay::new(
        store.clone(),
        js,
        Subjects::default(),
        RelaySettings::for_backend(backend),
    );
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let start = Instant::now();
    let task = tokio::spawn(relay.run(token));
    let n = events.len() as u64;
    let deadline = start + Duration::from_secs(300);
    while stats.published.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "relay did not finish");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    stop.cancel();
    task.await.unwrap().unwrap();
    store.close().await;
    n as f64 / elapsed.as_secs_f64()
}

async fn run_raw(kind: NatsKind, backend: Backend, events: &[Envelope<EntryEvent>]) -> f64 {
    let nats = BenchNats::start(kind).await;
    let client = nats.connect().await;
    let js = provisioned(&nats, &client).await;
    let window = RelaySettings::for_backend(backend).max_in_flight;
    let subjects = Subjects::default();
    let encoded: Vec<_> = events
        .iter()
        .map(|e| hookbus::EncodedEvent::encode(&subjects, e).unwrap())
        .collect();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for e in encoded {
        if in_flight.len() >= window {
            let acked: Result<jetstream::publish::PublishAck, _> = in_flight.next().await.unwrap();
            acked.unwrap();
        }
        let ack = js
            .send_publish(
                e.subject,
                jetstream::message::PublishMessage::build()
                    .payload(e.payload)
                    .headers(e.headers),
            )
            .await
            .unwrap();
        in_flight.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(acked) = in_flight.next().await {
        acked.unwrap();
    }
    events.len() as f64 / start.elapsed().as_secs_f64()
}

async fn throughput(backend: Backend, kinds: &[NatsKind], n: usize, rounds: usize) {
    let events = events(n);
    let mut relay: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut raw: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for (k, &kind) in kinds.iter().enumerate() {
            if round % 2 == 0 {
                relay[k].push(run_relay(kind, backend, &events).await);
                raw[k].push(run_raw(kind, backend, &events).await);
            } else {
                raw[k].push(run_raw(kind, backend, &events).await);
                relay[k].push(run_relay(kind, backend, &events).await);
            }
        }
    }
    let mut medians = Vec::new();
    for (k, &kind) in kinds.iter().enumerate() {
        eprintln!(
            "relay bench {} {}: relay_eps per round {:.0?}, raw_eps per round {:.0?}",
            db_name(backend),
            kind.name(),
            relay[k],
            raw[k]
        );
        let (relay_eps, raw_eps) = (median(&relay[k]), median(&raw[k]));
        println!(
            "bench: scenario=relay db={} nats={} events={n} rounds={rounds} relay_eps={relay_eps:.0} raw_eps={raw_eps:.0} ratio={:.3}",
            db_name(backend),
            kind.name(),
            relay_eps / raw_eps
        );
        medians.push((kind, relay_eps));
    }
    let eps = |kind: NatsKind| medians.iter().find(|(k, _)| *k == kind).map(|(_, e)| *e);
    if let Some(base) = eps(NatsKind::R1DefaultSync) {
        let mut line = format!(
            "bench: scenario=relay_durability db={} events={n} rounds={rounds} r1_default_sync_eps={base:.0}",
            db_name(backend)
        );
        if let Some(r1) = eps(NatsKind::R1) {
            line += &format!(" r1_eps={r1:.0} sync_always_ratio={:.3}", r1 / base);
        }
        if let Some(r3) = eps(NatsKind::R3) {
            line += &format!(" r3_eps={r3:.0} r3_ratio={:.3}", r3 / base);
        }
        println!("{line}");
    }
}

/// The NATS configurations of `BENCH_NATS` (default: all three).
fn nats_kinds() -> Vec<NatsKind> {
    let all = [NatsKind::R1, NatsKind::R1DefaultSync, NatsKind::R3];
    let Ok(list) = std::env::var("BENCH_NATS") else {
        return all.to_vec();
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            *all.iter()
                .find(|k| k.name() == name)
                .unwrap_or_else(|| panic!("BENCH_NATS: unknown {name:?} (r1, r1_default_sync, r3)"))
        })
        .collect()
}

fn db_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;

async fn latency(backend: Backend, n: usize) {
    let nats = NatsServer::start().await;
    let client = nats.connect().await;
    let subjects = Subjects::default();
    let config = BusConfig {
        enabled_plugins: vec!["lat".into()],
        ..Default::default()
    };
    let bus = Bus::start(client.clone(), config).await.unwrap();
    // The plugin: answers at once and reports when each event arrived.
    let waiters: Waiters = Arc::default();
    let plugin_client = nats.connect().await;
    let mut sub = plugin_client
        .queue_subscribe(subjects.handler("lat", "h"), "lat".into())
        .await
        .unwrap();
    let w = Arc::clone(&waiters);
    let pc = plugin_client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let at = Instant::now();
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(core_events::protocol::headers::MSG_ID))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            if let Some(tx) = w.lock().unwrap().remove(&id) {
                let _ = tx.send(at);
            }
            if let Some(reply) = msg.reply {
                let _ = pc.publish(reply, "".into()).await;
            }
        }
    });
    let manifest = PluginManifest {
        id: "lat".into(),
        name: "lat".into(),
        version: "1.0.0".into(),
        description: String::new(),
        author: String::new(),
        handlers: vec![HandlerSpec::new("h", Hook::EntryAfterUpdate)],
        api: Vec::new(),
        tasks: Vec::new(),
    };
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects.registry_bucket()).await.unwrap();
    kv.put(
        manifest.registry_key(),
        serde_json::to_vec(&manifest).unwrap().into(),
    )
    .await
    .unwrap();
    bus.registry
        .wait_for(Duration::from_secs(30), |t| t.route("lat", "h").is_some())
        .await
        .unwrap_or_else(|()| {
            panic!(
                "plugin not registered: rejected {:?}",
                bus.registry.table().rejected()
            )
        });
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let relay = Relay::new(
        store.clone(),
        js,
        subjects.clone(),
        RelaySettings::for_backend(backend),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let env = sample::entry_event(Hook::EntryAfterUpdate, "e", i64::try_from(i).unwrap() + 1);
        let (tx_done, rx_done) = oneshot::channel();
        waiters.lock().unwrap().insert(env.id.to_string(), tx_done);
        let mut tx = store.begin().await.unwrap();
        outbox::insert_envelope(&mut tx, &env).await.unwrap();
        tx.commit().await.unwrap();
        let committed = Instant::now();
        store.outbox_written().notify_one();
        let at = tokio::time::timeout(Duration::from_secs(10), rx_done)
            .await
            .expect("event not delivered within 10 s")
            .unwrap();
        samples.push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "bench: scenario=commit_to_handler db={} events={n} p50_ms={:.3} p99_ms={:.3}",
        db_name(backend),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0)
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    bus.stop().await.unwrap();
}

async fn bench(smoke: bool) {
    let (n, rounds, lat) = if smoke {
        (300, 1, 10)
    } else {
        (
            env_usize("BENCH_EVENTS", 50_000),
            env_usize("BENCH_ROUNDS", 3),
            env_usize("BENCH_LATENCY_EVENTS", 300),
        )
    };
    let only = std::env::var("BENCH_DB").unwrap_or_default();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if !only.is_empty() && only != db_name(backend) {
            continue;
        }
        throughput(backend, &nats_kinds(), n, rounds).await;
        Box::pin(latency(backend, lat)).await;
    }
}

fn main() {
    hookbus_tests::bench::main(bench);
}
