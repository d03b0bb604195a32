//! Replay throughput: a plugin's handler fed by the SDK's replay
//! ([`Plugin::replay`]) against a hand-written async-nats ordered consumer with
//! the same filter doing the same work, on a real nats-server.
//!
//! `cargo bench -p hookbus-tests --bench replay` (knobs: `BENCH_EVENTS`, default
//! 1 000 000; `BENCH_ROUNDS`, default 3 per side).
//!
//! Setup, once: a fresh `nats-server`, the bus's streams, and `N`
//! `entry.after_create` events about 256 entries across 8 entities, plus `N/10`
//! `entity.after_update` events the filter leaves out, published before any
//! clock starts. Both sides only read the stream (ephemeral ordered consumers),
//! so they share it. Each side runs `BENCH_ROUNDS` times, alternating (sdk, raw,
//! raw, sdk, sdk, raw, …) so neither always goes first; throughput = `N /
//! elapsed`, from starting the replay until the last event was handled; the
//! reported figures are the medians.
//!
//! - **sdk**: [`Plugin::replay`] from the start, one `entry.after_create` handler
//!   (filter `pagoda.events.entry.after_create.*.>`) that counts the event and adds
//!   the entry id to a checksum. Everything a replay does runs: subject parsing,
//!   the same decoding and `EventContext` as a live delivery, the handler call
//!   with its timeout and panic guard, progress.
//! - **raw**: an async-nats ordered consumer on the same filter, deserializing each
//!   payload into `Envelope<EntryEvent>` and doing the same counting, until the
//!   server reports nothing pending.
//!
//! Output: one line, `bench: scenario=replay events=N sdk_eps=… raw_eps=… ratio=…`
//! (per-round figures go to stderr). Without `--bench` (under `cargo test`) it
//! runs once, small, as a smoke test of both sides.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use core_events::{EntryEvent, Envelope, Hook, Subjects};
use futures::StreamExt;
use hookbus::config::StreamSettings;
use hookbus::{EncodedEvent, Publisher};
use hookbus_tests::NatsServer;
use hookbus_tests::bench::{env_usize, median};
use pagoda_plugin_sdk::replay::ReplayFrom;
use pagoda_plugin_sdk::{EntryContext, Plugin};

const ENTRIES: usize = 256;
const ENTITIES: usize = 8;
/// Publishes in flight while pre-publishing.
const PUBLISH_BATCH: usize = 4096;
/// A side that has not finished by then is reported as failed.
const SIDE_TIMEOUT: Duration = Duration::from_secs(600);

/// The work both sides do per event: count it and fold the entry id in.
#[derive(Default)]
struct Work {
    count: AtomicU64,
    checksum: AtomicU64,
}

impl Work {
    fn add(&self, event: &Envelope<EntryEvent>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.checksum
            .fetch_add(event.data.entry.id as u64, Ordering::Relaxed);
    }

    fn take(&self) -> (u64, u64) {
        (
            self.count.swap(0, Ordering::Relaxed),
            self.checksum.swap(0, Ordering::Relaxed),
        )
    }
}

/// Publishes the events; returns the expected checksum of the matching ones.
async fn publish(server: &NatsServer, subjects: &Subjects, n: usize) -> u64 {
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, subjects, &StreamSettings::default())
        .await
        .unwrap();
    let publisher = Publisher::new(js.clone(), subjects.clone());
    let others = n / 10;
    let mut checksum = 0u64;
    let mut acks = Vec::with_capacity(PUBLISH_BATCH + 1);
    for i in 0..n {
        let id = i % ENTRIES;
        let e = core_events::sample::entry_event(
            Hook::EntryAfterCreate,
            &format!("entity-{}", id % ENTITIES),
            id as i64,
        );
        checksum += id as u64;
        acks.push(
            publisher
                .send(EncodedEvent::encode(subjects, &e).unwrap())
                .await
                .unwrap(),
        );
        if i % 10 == 9 {
            // One event in eleven is one the filter leaves out.
            let e = core_events::sample::entity_event(
                Hook::EntityAfterUpdate,
                (i % ENTITIES) as i64 + 1,
                &format!("entity-{}", i % ENTITIES),
            );
            acks.push(
                publisher
                    .send(EncodedEvent::encode(subjects, &e).unwrap())
                    .await
                    .unwrap(),
            );
        }
        if acks.len() >= PUBLISH_BATCH {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let stored = hookbus_tests::stream_len(&js, &subjects.events_stream()).await;
    assert_eq!(stored, (n + others) as u64, "the stream holds every event");
    client.drain().await.unwrap();
    checksum
}

fn plugin(work: &Arc<Work>) -> Plugin {
    let work = work.clone();
    Plugin::builder("bench", "Replay bench", "1.0.0")
        .on_entry(
            Hook::EntryAfterCreate,
            "created",
            move |ctx: EntryContext| {
                let work = work.clone();
                async move {
                    work.add(&ctx.event);
                    Ok(())
                }
            },
        )
        .build()
        .unwrap()
}

async fn run_sdk(server: &NatsServer, subjects: &Subjects, plugin: &Plugin) -> Duration {
    let client = server.connect().await;
    let t0 = Instant::now();
    let done = tokio::time::timeout(
        SIDE_TIMEOUT,
        plugin.replay(&client, subjects, ReplayFrom::Start),
    )
    .await
    .expect("sdk side finished in time")
    .unwrap();
    let elapsed = t0.elapsed();
    assert!(done.caught_up && done.dead_lettered == 0, "{done:?}");
    client.drain().await.unwrap();
    elapsed
}

async fn run_raw(server: &NatsServer, subjects: &Subjects, work: &Work, n: usize) -> Duration {
    let client = server.connect().await;
    let t0 = Instant::now();
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(subjects.events_stream()).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects
                .event_filter(Some(Hook::EntryAfterCreate), None)
                .unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let read = async {
        let mut seen = 0usize;
        while let Some(msg) = messages.next().await {
            let msg = msg.unwrap();
            let pending = msg.info().unwrap().pending;
            let event: Envelope<EntryEvent> = serde_json::from_slice(&msg.payload).unwrap();
            work.add(&event);
            seen += 1;
            if pending == 0 {
                break;
            }
        }
        seen
    };
    let seen = tokio::time::timeout(SIDE_TIMEOUT, read)
        .await
        .expect("raw side finished in time");
    let elapsed = t0.elapsed();
    assert_eq!(seen, n, "raw side read every matching event");
    client.drain().await.unwrap();
    elapsed
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sdk,
    Raw,
}

async fn bench(smoke: bool) {
    let n = env_usize("BENCH_EVENTS", if smoke { 2_000 } else { 1_000_000 });
    let rounds = env_usize("BENCH_ROUNDS", if smoke { 1 } else { 3 });
    let subjects = Subjects::default();
    // The shipped limits with nats-server's default fsync: this measures reads,
    // and its set-up publishes (fsync on every write under the shipped
    // `sync_interval: always` timed out under load).
    let server =
        NatsServer::start_for_with_limits(&[], &hookbus_tests::limits_with_default_sync(), "")
            .await;
    let t = Instant::now();
    let checksum = publish(&server, &subjects, n).await;
    eprintln!(
        "bench: replay: published {n} matching events (+{} others) in {:.1?}",
        n / 10,
        t.elapsed()
    );
    let work = Arc::new(Work::default());
    let plugin = plugin(&work);
    let mut sdk = Vec::with_capacity(rounds);
    let mut raw = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Sdk, Side::Raw]
        } else {
            [Side::Raw, Side::Sdk]
        };
        for side in order {
            let elapsed = match side {
                Side::Sdk => run_sdk(&server, &subjects, &plugin).await,
                Side::Raw => run_raw(&server, &subjects, &work, n).await,
            };
            let (count, sum) = work.take();
            assert_eq!(count, n as u64, "{side:?}: every event handled once");
            assert_eq!(sum, checksum, "{side:?}: checksum");
            let eps = n as f64 / elapsed.as_secs_f64();
            eprintln!(
                "bench: replay round={} side={side:?} eps={eps:.0} elapsed_ms={}",
                round + 1,
                elapsed.as_millis()
            );
            match side {
                Side::Sdk => sdk.push(eps),
                Side::Raw => raw.push(eps),
            }
        }
    }
    if smoke {
        println!("smoke: replay bench ran {n} events through both sides");
        return;
    }
    let (sdk_eps, raw_eps) = (median(&sdk), median(&raw));
    println!(
        "bench: scenario=replay events={n} sdk_eps={sdk_eps:.0} raw_eps={raw_eps:.0} ratio={:.3}",
        sdk_eps / raw_eps
    );
}

fn main() {
    hookbus_tests::bench::main(bench);
}
