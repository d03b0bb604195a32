//! Entry creation over HTTP through the reference host.
//!
//! `cargo bench -p hookbus-tests --bench host` (knobs: `BENCH_HOST_REQUESTS`,
//! creations per database, default 20 000; `BENCH_HOST_CLIENTS`, concurrent
//! clients, default 32; `BENCH_HOST_DB`, `sqlite` or `postgres` for one only;
//! `BENCH_HOST_BASELINE=1` also runs `store_create`, the same creations straight
//! through `Store::create_entry` with as many tasks (no HTTP, no hooks, no relay),
//! each its own transaction, and `store_group_create`, the same through the host's
//! group commit (`EntryWriter`, `Store::create_entries`): the ceilings the database
//! sets; `BENCH_HOST_RELAY=0` runs the host without its
//! relay and relays the outbox after the run; `BENCH_HOST_VALIDATOR=0` leaves the
//! validator disabled, so no hook is called).
//!
//! Setup, per database: a fresh `nats-server`, a fresh database, the host
//! in-process ([`TestHost`]: `Host::start` on 127.0.0.1:0 with its outbox relay),
//! and one SDK plugin with one `entry.validate` handler (it decodes the request
//! and checks the name) on its own NATS connection. An entity `customer` with two
//! attributes is created over the API.
//!
//! Each of `BENCH_HOST_CLIENTS` tasks has its own keep-alive `reqwest` client and
//! sends `POST /api/v2/entities/<id>/entries/` (a name and two values) one after
//! another, as the normal user with a token, until `BENCH_HOST_REQUESTS` have been
//! sent; every answer must be 201. Each creation runs the whole write path: token
//! check, `entry.before_create` (no handler), `entry.validate` over NATS to the
//! plugin, a transaction with the entry and its event in the outbox (shared with
//! the creations queued with it: group commit). After the
//! last answer the bench waits until the relay has emptied the outbox into the
//! stream (`drain_ms`), and checks the stream holds every event.
//!
//! Output, per database: `bench: scenario=host_create db=… rps=… p99_ms=… p50_ms=…
//! requests=… clients=… drain_ms=…`. Without `--bench` (under `cargo test`) it
//! creates 200 entries per database as a smoke test.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub
)]

/// The allocator of the `hookbus` binary, whose host this runs in-process.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use core_events::AttrType;
use hookbus_host::writer::EntryWriter;
use hookbus_tests::bench::{env_usize, percentile};
use hookbus_tests::host::TestHost;
use hookbus_tests::{NatsServer, TestDb, stream_len};
use pagoda_plugin_sdk::{FieldError, Plugin, ServeOptions};
use serde_json::json;
use store::{Backend, NewAttr, NewEntity, NewEntry, NewUser, WriteContext, outbox};

const WARM_UP: usize = 200;

/// One creation; panics unless it is 201.
async fn create(client: &reqwest::Client, target: &(String, String), i: usize) {
    let (url, auth) = target;
    let r = client
        .post(url)
        .header("Authorization", auth)
        .json(&json!({
            "name": format!("entry-{i}"),
            "attrs": {"phone": "+81 3 0000 0000", "age": 42},
        }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    if status != reqwest::StatusCode::CREATED {
        panic!(
            "entry {i}: {status}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    // Read the body, as a client would.
    let _ = r.bytes().await.unwrap();
}

async fn run(backend: Backend, requests: usize, clients: usize) {
    let nats = NatsServer::start().await;
    let db = TestDb::new(backend).await;
    // BENCH_HOST_RELAY=0: no relay in the host (to see what relaying costs); the
    // outbox is then relayed after the run, before `drain_ms` is measured.
    let relay = std::env::var("BENCH_HOST_RELAY").map_or(true, |v| v != "0");
    // BENCH_HOST_VALIDATOR=0: the validator is not enabled (no NATS round trip).
    let validate = std::env::var("BENCH_HOST_VALIDATOR").map_or(true, |v| v != "0");
    let host = TestHost::start_with(&nats, &db, |c| {
        if validate {
            c.enabled_plugins = vec!["bench-validator".into()];
        }
        c.relay = relay;
    })
    .await;
    let plugin_client = nats.connect().await;
    let validator = Plugin::builder("bench-validator", "Bench validator", "1.0.0")
        .on_validate("name", |ctx| async move {
            Ok(if ctx.request.entry.name.is_empty() {
                vec![FieldError::field("name", "a name is required")]
            } else {
                vec![]
            })
        })
        .build()
        .unwrap();
    let running = validator
        .serve(plugin_client.clone(), ServeOptions::default())
        .await
        .unwrap();
    if validate {
        host.wait_registered(&["bench-validator"]).await;
    }

    let entity: serde_json::Value = host
        .as_admin(reqwest::Method::POST, "/api/v2/entities/")
        .json(&json!({
            "name": "customer",
            "attrs": [{"name": "phone", "type": "string"}, {"name": "age", "type": "number"}],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = host.url(&format!("/api/v2/entities/{}/entries/", entity["id"]));
    let auth = format!("Token {}", host.user_token);

    let target: Arc<(String, String)> = Arc::new((url, auth));
    let warm = reqwest::Client::new();
    for i in 0..WARM_UP {
        create(&warm, &target, 1_000_000_000 + i).await;
    }

    let started = Instant::now();
    let lat = drive(clients, requests, || {
        // Each client its own keep-alive connection.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let target = target.clone();
        move |i| {
            let (client, target) = (client.clone(), target.clone());
            async move { create(&client, &target, i).await }
        }
    })
    .await;
    let elapsed = started.elapsed();
    let answered = Instant::now();
    let js = async_nats::jetstream::new(plugin_client.clone());
    let expected = u64::try_from(1 + WARM_UP + requests).unwrap();
    let stop_relay = tokio_util::sync::CancellationToken::new();
    if !relay {
        let r = hookbus::relay::Relay::new(
            host.store().clone(),
            js.clone(),
            core_events::Subjects::default(),
            hookbus::relay::RelaySettings::for_backend(backend),
        );
        tokio::spawn(r.run(stop_relay.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = outbox::backlog(host.store().pool()).await.unwrap().rows;
        if rows == 0 && stream_len(&js, "PAGODA_EVENTS").await >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not publish every event within 120 s ({rows} rows left)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = answered.elapsed();
    stop_relay.cancel();
    assert_eq!(stream_len(&js, "PAGODA_EVENTS").await, expected);

    report(
        "host_create",
        backend,
        requests,
        clients,
        elapsed,
        lat,
        &format!(" drain_ms={}", drain.as_millis()),
    );
    running.shutdown().await.unwrap();
    host.stop().await;
}

/// The same creations straight through the store (no HTTP, no hooks, no relay):
/// the ceiling the database sets; one at a time (`store_create`, each its own
/// transaction) and group-committed (`store_group_create`, through the host's
/// [`EntryWriter`]).
async fn store_baseline(backend: Backend, requests: usize, clients: usize) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let user = store
        .create_user(&NewUser {
            username: "user".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ctx = Arc::new(WriteContext {
        user: Some(user),
        traceparent: None,
        tracestate: None,
    });
    let entity = store
        .create_entity(
            &NewEntity::named("customer")
                .attr(NewAttr::new("phone", AttrType::STRING))
                .attr(NewAttr::new("age", AttrType::NUMBER)),
            &ctx,
        )
        .await
        .unwrap();
    for scenario in ["store_create", "store_group_create"] {
        let writer = Arc::new(EntryWriter::start(store.clone()));
        let started = Instant::now();
        let lat = drive(clients, requests, || {
            let (store, ctx, writer) = (store.clone(), ctx.clone(), writer.clone());
            let entity = entity.id;
            move |i| {
                let (store, ctx, writer) = (store.clone(), ctx.clone(), writer.clone());
                async move {
                    let new = NewEntry::named(&format!("{scenario}-{i}"))
                        .value("phone", json!("+81 3 0000 0000"))
                        .value("age", json!(42));
                    if scenario == "store_create" {
                        store.create_entry(entity, &new, &ctx).await.unwrap();
                    } else {
                        writer
                            .create_entry(entity, new, (*ctx).clone())
                            .await
                            .unwrap();
                    }
                }
            }
        })
        .await;
        report(
            scenario,
            backend,
            requests,
            clients,
            started.elapsed(),
            lat,
            "",
        );
    }
}

/// Sends `requests` operations from `clients` concurrent tasks, each task doing
/// its next one when the last is answered; returns every latency in ms.
/// `new_client` makes a task's operation (`op(i)` does operation `i`).
async fn drive<C, F, Fut>(clients: usize, requests: usize, new_client: C) -> Vec<f64>
where
    C: Fn() -> F,
    F: FnMut(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let next = next.clone();
            let mut op = new_client();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let t = Instant::now();
                    op(i).await;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(requests);
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat
}

#[allow(clippy::cast_precision_loss)]
fn report(
    scenario: &str,
    backend: Backend,
    requests: usize,
    clients: usize,
    elapsed: Duration,
    mut lat: Vec<f64>,
    extra: &str,
) {
    lat.sort_by(f64::total_cmp);
    let rps = requests as f64 / elapsed.as_secs_f64();
    let db_name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    println!(
        "bench: scenario={scenario} db={db_name} rps={rps:.0} p99_ms={:.2} p50_ms={:.2} \
         requests={requests} clients={clients}{extra}",
        percentile(&lat, 99.0),
        percentile(&lat, 50.0),
    );
}

async fn bench(smoke: bool) {
    // Logs to stderr, warnings only (RUST_LOG overrides): stdout has the figures.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let requests = env_usize("BENCH_HOST_REQUESTS", if smoke { 200 } else { 20_000 });
    let clients = env_usize("BENCH_HOST_CLIENTS", 32);
    let only = std::env::var("BENCH_HOST_DB").unwrap_or_default();
    for (backend, name) in [(Backend::Sqlite, "sqlite"), (Backend::Postgres, "postgres")] {
        if only.is_empty() || only == name {
            run(backend, requests, clients).await;
            if std::env::var_os("BENCH_HOST_BASELINE").is_some() {
                store_baseline(backend, requests, clients).await;
            }
        }
    }
}

fn main() {
    hookbus_tests::bench::main(bench);
}
