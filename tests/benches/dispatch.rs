//! Dispatch throughput and latency: the bus dispatcher against a hand-written
//! async-nats loop doing the same work, on a real nats-server.
//!
//! `cargo bench -p hookbus-tests --bench dispatch` (knobs: `BENCH_EVENTS`,
//! `BENCH_ROUNDS`).
//!
//! Each round runs both sides, bus then raw, each on a fresh `nats-server` (fresh
//! store, same provisioning, same responders, same pre-published events), so no
//! side sees the other's consumers, acks or leftover state. Per side and round:
//!
//! - three plugins `p1` (priority 10), `p2` (20), `p3` (30), each one handler for
//!   `entry.after_create`, all entities: plain queue subscriptions on their own
//!   connection answering an empty reply at once (the same code for both sides);
//! - `N` events about 256 entries across 8 entities, published into the events
//!   stream before the clock starts;
//! - the clock runs from starting the side (bus: `Bus::start`; raw: creating its
//!   consumer) until all `N` events are acked. Throughput = `N / elapsed`.
//! - latency per event = time from `p1` receiving the event to `p3` receiving it
//!   (the dispatch chain, keyed by `Nats-Msg-Id`), p99 in microseconds.
//!
//! The raw side: a durable pull consumer (explicit ack, `max_ack_pending` = the
//! bus's `max_in_flight`, same pull batch/expiry), per-entry ordering by giving
//! each entry its own lane (a task fed by an mpsc channel, at most
//! `max_parallel_objects` lanes), three sequential `send_request`s then the ack.
//!
//! Output: one `bench: scenario=dispatch_round …` line per side and round, then
//! `bench: scenario=dispatch …` with the medians. Then the bus alone with
//! per-handler metrics on and off (`DispatcherSettings::metrics`), alternating
//! order per round: `bench: scenario=metrics_overhead on_eps=… off_eps=… diff_pct=…`
//! (diff_pct = how much slower metrics on is, in percent of off). Then the bus
//! with OpenTelemetry span export on (to an OTLP/HTTP receiver in this process)
//! and off, alternating order per round:
//! `bench: scenario=tracing_overhead sampled=all|parent_1pct export=otlp on_eps=… off_eps=… diff_pct=… spans_per_event=…`
//! (`-- --tracing` runs only this comparison; `BENCH_TRACE_EXPORT=none` drops the
//! spans in a no-op exporter instead, `export=none`: the cost of making them
//! alone), and `bench: scenario=tracing_off_cost … cost_pct=…`: the checks export
//! off adds to an event's path, timed directly, against the bus's CPU per event.
//!
//! The bench runs with mimalloc, the `hookbus` binary's allocator (both sides).
//!
//! Scale-out: `cargo bench -p hookbus-tests --bench dispatch -- --partitions 4
//! --dispatchers 2` runs the bus side as that many buses in this process, each
//! with `DispatcherSettings::partitions` = 4, which share the partitions (two
//! each) and dispatch at once. Every side's events stream then has that many
//! partitions (its subject transform appends the partition token). The raw side
//! is the hand-written equivalent: as many connections, one durable consumer per
//! partition filtered on the server to it (`pagoda.events.*.*.*.*.<p>`), each
//! dispatching through per-entry lanes as above. A third side,
//! `raw_single`, is the single raw loop on the same machine, so the cost of the
//! layout itself shows: the summary adds `raw_single_eps` and `ratio_to_single`.
//! The lines say `partitions=4 dispatchers=2`. All sides are then clocked from
//! the first delivery to `p1` to the last ack (`clock=first_delivery`), so the
//! buses' start-up (announcing themselves and dividing the partitions, one lease
//! interval) is not counted as dispatch time; the metrics comparison is skipped.
//! The buses get the events published once they have divided the partitions (so
//! they dispatch while the events are being published); the raw sides get them
//! published before they start (`raw_publish=before`), or, with
//! `BENCH_PUBLISH_AFTER=1`, also once their consumers exist
//! (`raw_publish=after_start`: every side does the same work at the same time).
//! CPU per event (`cpu_us_per_event`: this process, i.e. the dispatchers and the
//! responders; `server_cpu_us_per_event`: nats-server) is read from
//! `/proc/<pid>/stat` around each side.
//!
//! Cluster: `cargo bench -p hookbus-tests --bench dispatch -- --cluster` runs
//! both sides (bus and raw, as above) on the single server (R1, the shipped
//! config) and on a three-node cluster on loopback with R3 streams (the shipped
//! node config), alternating per round: `bench: scenario=dispatch_nats nats=r1|r3
//! …` and `bench: scenario=dispatch_r3_cost … r3_over_r1=…`. The server CPU is
//! then the three nodes'.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub
)]

/// The allocator of the `hookbus` binary, whose bus this runs in-process (both
/// sides use it: the raw loop too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use core_events::protocol::headers;
use core_events::{EntryEvent, Envelope, HandlerSpec, Hook, PluginManifest, Subjects};
use futures::StreamExt;
use hookbus::config::{BusConfig, DispatcherSettings};
use hookbus::run::Bus;
use hookbus::{EncodedEvent, Publisher};
use hookbus_tests::bench::{BenchNats, NatsKind, env_usize, median, percentile};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The three plugins: id and priority (dispatch order p1, p2, p3).
const PLUGINS: [(&str, i32); 3] = [("p1", 10), ("p2", 20), ("p3", 30)];
const HANDLER: &str = "on_create";
const ENTRIES: usize = 256;
const ENTITIES: usize = 8;
/// Handler timeout on both sides.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes in flight while pre-publishing.
const PUBLISH_BATCH: usize = 1024;
/// A side that has not finished by then is reported as failed.
const SIDE_TIMEOUT: Duration = Duration::from_secs(60);

/// When `p1` and `p3` first received each event, as nanoseconds since `base` + 1
/// (0 = not yet).
struct Marks {
    base: Instant,
    first: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
}

impl Marks {
    fn new(n: usize) -> Self {
        Marks {
            base: Instant::now(),
            first: (0..n).map(|_| AtomicU64::new(0)).collect(),
            last: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, slot: &AtomicU64) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let _ = slot.compare_exchange(0, nanos, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// p1 → p3 times in microseconds (sorted), and how many events lack a mark.
    fn chain_us(&self) -> (Vec<f64>, usize) {
        let mut out = Vec::with_capacity(self.first.len());
        let mut missing = 0;
        for (f, l) in self.first.iter().zip(&self.last) {
            let (f, l) = (f.load(Ordering::Relaxed), l.load(Ordering::Relaxed));
            if f == 0 || l == 0 {
                missing += 1;
            } else {
                out.push(l.saturating_sub(f) as f64 / 1_000.0);
            }
        }
        out.sort_by(f64::total_cmp);
        (out, missing)
    }
}

/// CPU time (user + system) of a process so far, in milliseconds, from
/// `/proc/<pid>/stat` (10 ms resolution); 0 when unreadable.
fn cpu_ms(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces): state is field 3,
    // utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = tick() + tick();
    ticks * 10 // USER_HZ is 100 on Linux
}

/// CPU used by this process and by the server while a side ran.
struct Cpu {
    bench_ms: u64,
    server_ms: u64,
}

fn cpu_now(server: &BenchNats) -> Cpu {
    Cpu {
        bench_ms: cpu_ms("self"),
        server_ms: server.pids().iter().map(|p| cpu_ms(&p.to_string())).sum(),
    }
}

fn entry_event(entity_name: &str, entry_id: i64) -> Envelope<EntryEvent> {
    core_events::sample::entry_event(Hook::EntryAfterCreate, entity_name, entry_id)
}

/// The events of one round (the same for every round: each runs on a fresh
/// server), and their index by event id.
fn build_events(subjects: &Subjects, n: usize) -> (Vec<EncodedEvent>, Arc<HashMap<String, usize>>) {
    let mut events = Vec::with_capacity(n);
    let mut index = HashMap::with_capacity(n);
    for i in 0..n {
        let id = i % ENTRIES;
        let envelope = entry_event(&format!("entity-{}", id % ENTITIES), id as i64);
        let event = EncodedEvent::encode(subjects, &envelope).unwrap();
        index.insert(event.id.to_string(), i);
        events.push(event);
    }
    (events, Arc::new(index))
}

/// `events` with a W3C `traceparent` each (a trace per event), whose `sampled`
/// flag is set on `pct` events in 100: as a host sampling with
/// `parentbased_traceidratio` sends them.
fn with_traceparents(events: &[EncodedEvent], pct: usize) -> Vec<EncodedEvent> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            let flags = if i % 100 < pct { "01" } else { "00" };
            e.headers.insert(
                "traceparent",
                format!("00-{:032x}-{:016x}-{flags}", i + 1, i + 1).as_str(),
            );
            e
        })
        .collect()
}

fn manifest(id: &str, priority: i32) -> PluginManifest {
    let mut m = PluginManifest::new(id, format!("Bench plugin {id}"), "1.0.0");
    let mut h = HandlerSpec::new(HANDLER, Hook::EntryAfterCreate);
    h.priority = priority;
    h.timeout_ms = u64::try_from(HANDLER_TIMEOUT.as_millis()).unwrap();
    m.handlers.push(h);
    m
}

/// Which side a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Bus,
    Raw,
    /// The bus with per-handler metrics off (`DispatcherSettings::metrics`).
    BusNoMetrics,
    /// The single raw loop, when the bus side is partitioned: what one
    /// unpartitioned consumer does on the same machine.
    RawSingle,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Bus => "bus",
            Side::Raw => "raw",
            Side::BusNoMetrics => "bus_no_metrics",
            Side::RawSingle => "raw_single",
        }
    }
}

/// One side's world: a fresh server with streams, responders and (once
/// [`World::publish`]ed) the events.
struct World {
    server: BenchNats,
    js: jetstream::Context,
    subjects: Subjects,
    marks: Arc<Marks>,
    responders: Vec<JoinHandle<()>>,
    /// Requests answered by each responder.
    answered: Arc<[AtomicU64; 3]>,
}

impl World {
    async fn new(
        subjects: &Subjects,
        events: &[EncodedEvent],
        index: &Arc<HashMap<String, usize>>,
        partitions: u32,
        kind: NatsKind,
    ) -> World {
        let server = BenchNats::start(kind).await;
        let admin = server.connect().await;
        let js = jetstream::new(admin.clone());
        let settings = hookbus::config::StreamSettings {
            partitions: Some(partitions),
            ..server.stream_settings()
        };
        BenchNats::provision(&js, subjects, &settings).await;
        let marks = Arc::new(Marks::new(events.len()));
        let answered: Arc<[AtomicU64; 3]> = Arc::new(Default::default());

        // Responders: one connection for the three plugins, as a plugin process
        // would have its own. Identical for both sides.
        let responder_client = server.connect().await;
        let mut responders = Vec::new();
        for (k, (plugin, _)) in PLUGINS.iter().enumerate() {
            let mut sub = responder_client
                .queue_subscribe(subjects.handler(plugin, HANDLER), (*plugin).to_owned())
                .await
                .unwrap();
            let client = responder_client.clone();
            let marks = marks.clone();
            let index = index.clone();
            let answered = answered.clone();
            responders.push(tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let slot = match k {
                        0 => Some(&marks.first),
                        2 => Some(&marks.last),
                        _ => None,
                    };
                    if let Some(slots) = slot {
                        let i = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(headers::MSG_ID))
                            .and_then(|id| index.get(id.as_str()));
                        if let Some(&i) = i {
                            marks.mark(&slots[i]);
                        }
                    }
                    if let Some(reply) = msg.reply {
                        let _ = client.publish(reply, Bytes::new()).await;
                        answered[k].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        responder_client.flush().await.unwrap();

        // Manifests (the raw side does not read them; the setup stays identical).
        let store = js.get_key_value(subjects.registry_bucket()).await.unwrap();
        for (plugin, priority) in PLUGINS {
            let m = manifest(plugin, priority);
            store
                .put(m.registry_key(), serde_json::to_vec(&m).unwrap().into())
                .await
                .unwrap();
        }

        World {
            server,
            js,
            subjects: subjects.clone(),
            marks,
            responders,
            answered,
        }
    }

    /// Publishes the events, many acks in flight, and checks the stream holds them.
    async fn publish(&self, events: &[EncodedEvent]) {
        let (js, subjects) = (&self.js, &self.subjects);
        let publisher = Publisher::new(js.clone(), subjects.clone());
        for chunk in events.chunks(PUBLISH_BATCH) {
            let mut acks = Vec::with_capacity(chunk.len());
            for e in chunk {
                acks.push(publisher.send(e.clone()).await.unwrap());
            }
            for ack in acks {
                ack.await.unwrap();
            }
        }
        let stored = hookbus_tests::stream_len(js, &subjects.events_stream()).await;
        assert_eq!(
            stored,
            events.len() as u64,
            "events stream holds every event"
        );
    }

    fn finish(mut self) {
        for r in self.responders.drain(..) {
            r.abort();
        }
        drop(self.server);
    }
}

/// How the bus side is laid out: `--partitions N --dispatchers D`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    partitions: u32,
    dispatchers: usize,
}

impl Layout {
    const SINGLE: Layout = Layout {
        partitions: 1,
        dispatchers: 1,
    };

    fn from_args() -> Layout {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .map(|v| {
                    v.parse::<u32>()
                        .unwrap_or_else(|_| panic!("{name} wants a number, got '{v}'"))
                })
        };
        Layout {
            partitions: value("--partitions").unwrap_or(1).max(1),
            dispatchers: value("--dispatchers").unwrap_or(1).max(1) as usize,
        }
    }

    fn is_single(self) -> bool {
        self.partitions == 1 && self.dispatchers == 1
    }
}

/// What one side measured in one round.
struct Measured {
    eps: f64,
    p99_us: f64,
    p50_us: f64,
    elapsed: Duration,
    /// CPU of the bench process (side + responders) per event, in microseconds.
    cpu_us_per_event: f64,
    /// CPU of nats-server per event, in microseconds.
    server_cpu_us_per_event: f64,
}

async fn wait_acked(n: u64, acked: impl Fn() -> u64) -> Result<(), u64> {
    let deadline = Instant::now() + SIDE_TIMEOUT;
    loop {
        let a = acked();
        if a >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(a);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs the bus side over `events`. With several buses the events are published
/// only once the buses have divided the partitions (the clock then starts at the
/// first delivery, see [`measure`]): published before, they may all be
/// dispatched by the first bus before the second takes its share.
async fn run_bus(
    world: &World,
    events: &[EncodedEvent],
    metrics: bool,
    layout: Layout,
) -> (Duration, Cpu) {
    let n = events.len() as u64;
    let mut config = BusConfig {
        enabled_plugins: PLUGINS.iter().map(|(p, _)| (*p).to_owned()).collect(),
        ..Default::default()
    };
    config.dispatcher.metrics = metrics;
    config.streams.replicas = world.server.stream_settings().replicas;
    config.dispatcher.partitions = layout.partitions;
    if !layout.is_single() {
        // The buses divide the partitions after one lease interval (a quarter of this).
        config.streams.lease_ttl = Duration::from_secs(1);
    }
    let mut clients = Vec::new();
    for _ in 0..layout.dispatchers {
        clients.push(world.server.connect().await);
    }
    let mut cpu0 = cpu_now(&world.server);
    let t0 = Instant::now();
    let buses = futures::future::join_all(
        clients
            .into_iter()
            .map(|client| Bus::start(client, config.clone())),
    )
    .await;
    let buses: Vec<Bus> = buses.into_iter().map(Result::unwrap).collect();
    for bus in &buses {
        bus.registry
            .wait_for(Duration::from_secs(10), |t| {
                PLUGINS.iter().all(|(p, _)| t.is_enabled(p))
            })
            .await
            .unwrap_or_else(|()| panic!("plugins not registered in time"));
    }
    let stats: Vec<_> = buses.iter().map(|b| b.stats.clone()).collect();
    if layout.dispatchers > 1 {
        let share = layout.partitions as usize / layout.dispatchers;
        let deadline = Instant::now() + SIDE_TIMEOUT;
        while !stats.iter().all(|s| s.partitions().len() >= share) {
            assert!(
                Instant::now() < deadline,
                "the buses did not divide the partitions in {SIDE_TIMEOUT:?}: {:?}",
                stats.iter().map(|s| s.partitions()).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        world.publish(events).await;
        cpu0 = cpu_now(&world.server);
    }
    let sum =
        |f: fn(&hookbus::stats::DispatchStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    if let Err(a) = wait_acked(n, || sum(|s| s.events_acked.get())).await {
        panic!("bus side acked only {a} of {n} events in {SIDE_TIMEOUT:?}");
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_since(&world.server, &cpu0);
    assert_eq!(
        sum(|s| s.failed_attempts.get()),
        0,
        "no handler attempt failed"
    );
    assert_eq!(
        sum(|s| s.delivered.get()),
        3 * n,
        "every handler got every event once"
    );
    if layout.dispatchers > 1 {
        for s in &stats {
            assert!(
                s.events_acked.get() > 0,
                "every bus dispatched a share ({:?})",
                stats
                    .iter()
                    .map(|s| s.events_acked.get())
                    .collect::<Vec<_>>()
            );
        }
    }
    for bus in buses {
        bus.stop().await.unwrap();
    }
    (elapsed, cpu)
}

fn cpu_since(server: &BenchNats, before: &Cpu) -> Cpu {
    let now = cpu_now(server);
    Cpu {
        bench_ms: now.bench_ms.saturating_sub(before.bench_ms),
        server_ms: now.server_ms.saturating_sub(before.server_ms),
    }
}

/// Runs a raw side. With `publish_after`, the events are published once its
/// consumers exist (as the partitioned bus side does), else they were published
/// before.
async fn run_raw(
    world: &World,
    subjects: &Subjects,
    n: u64,
    layout: Layout,
    publish_after: Option<&[EncodedEvent]>,
) -> (Duration, Cpu) {
    let settings = DispatcherSettings::default();
    let mut clients = Vec::with_capacity(layout.dispatchers);
    for _ in 0..layout.dispatchers {
        clients.push(world.server.connect().await);
    }
    let routes: Arc<[(String, String, String)]> = PLUGINS
        .iter()
        .map(|(p, _)| {
            (
                (*p).to_owned(),
                HANDLER.to_owned(),
                subjects.handler(p, HANDLER),
            )
        })
        .collect();
    let counts = RawCounts::default();

    let mut cpu0 = cpu_now(&world.server);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for partition in 0..layout.partitions {
        let client = clients[partition as usize % clients.len()].clone();
        tasks.extend(
            raw_partition(
                client,
                subjects,
                &settings,
                &routes,
                &counts,
                (partition, layout.partitions),
            )
            .await,
        );
    }
    if let Some(events) = publish_after {
        world.publish(events).await;
        cpu0 = cpu_now(&world.server);
    }
    if let Err(a) = wait_acked(n, || counts.acked.load(Ordering::Relaxed)).await {
        panic!("raw side acked only {a} of {n} events in {SIDE_TIMEOUT:?}");
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_since(&world.server, &cpu0);
    for t in tasks {
        t.abort();
    }
    assert_eq!(
        counts.failed.load(Ordering::Relaxed),
        0,
        "no raw request failed"
    );
    (elapsed, cpu)
}

/// What the raw side's tasks count: events acked after dispatch, failed requests.
#[derive(Default, Clone)]
struct RawCounts {
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

/// One raw consumer: for partition `i` of `count` (> 1), a durable consumer of
/// its own filtered on the server to that partition (the last token of the
/// stored subject), and dispatches its events through per-entry lanes. Returns
/// its tasks.
async fn raw_partition(
    client: async_nats::Client,
    subjects: &Subjects,
    settings: &DispatcherSettings,
    routes: &Arc<[(String, String, String)]>,
    counts: &RawCounts,
    (index, count): (u32, u32),
) -> Vec<JoinHandle<()>> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(subjects.events_stream()).await.unwrap();
    let name = if count > 1 {
        format!("raw-p{index}of{count}")
    } else {
        "raw".to_owned()
    };
    let consumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: if count > 1 {
                    subjects.partition_events(index)
                } else {
                    subjects.all_events()
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: settings.ack_wait,
                max_ack_pending: i64::try_from(settings.max_in_flight).unwrap(),
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(settings.max_in_flight.clamp(1, 512))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .unwrap();

    // One lane per entry (first seen, first assigned), at most max_parallel_objects.
    let lanes_n = settings.max_parallel_objects.max(1);
    let mut lanes: Vec<mpsc::UnboundedSender<jetstream::Message>> = Vec::with_capacity(lanes_n);
    let mut tasks = Vec::with_capacity(lanes_n + 1);
    for _ in 0..lanes_n {
        let (tx, mut rx) = mpsc::unbounded_channel::<jetstream::Message>();
        lanes.push(tx);
        let client = client.clone();
        let routes = routes.clone();
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let (seq, delivered) = msg
                    .info()
                    .map(|i| (i.stream_sequence, i.delivered))
                    .unwrap_or((0, 1));
                let mut h: HeaderMap = msg.headers.clone().unwrap_or_default();
                h.insert(headers::STREAM_SEQ, HeaderValue::from(seq));
                h.insert(headers::ATTEMPT, HeaderValue::from(1u32));
                h.insert(headers::REDELIVERED, HeaderValue::from(delivered));
                for (plugin, handler, subject) in routes.iter() {
                    h.insert(headers::PLUGIN, plugin.as_str());
                    h.insert(headers::HANDLER, handler.as_str());
                    let request = async_nats::Request::new()
                        .payload(msg.payload.clone())
                        .headers(h.clone())
                        .timeout(Some(HANDLER_TIMEOUT));
                    let ok = match client.send_request(subject.clone(), request).await {
                        Ok(reply) => reply
                            .headers
                            .as_ref()
                            .is_none_or(|h| h.get(headers::SERVICE_ERROR).is_none()),
                        Err(_) => false,
                    };
                    if !ok {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if msg.ack().await.is_ok() {
                    counts.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tasks.push(tokio::spawn(async move {
        let mut assigned: HashMap<String, usize> = HashMap::new();
        while let Some(next) = messages.next().await {
            let Ok(msg) = next else { continue };
            let key = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::OBJECT))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let next_lane = assigned.len() % lanes_n;
            let lane = *assigned.entry(key).or_insert(next_lane);
            if lanes[lane].send(msg).is_err() {
                break;
            }
        }
    }));
    tasks
}

async fn measure(
    side: Side,
    subjects: &Subjects,
    events: &[EncodedEvent],
    index: &Arc<HashMap<String, usize>>,
    layout: Layout,
) -> Measured {
    // Dispatch does not wait for the disk: measured on nats-server's default
    // fsync, so publishing the events (during the run, for several buses) is not
    // bound by the shipped config's `sync_interval: always`.
    measure_on(
        NatsKind::R1DefaultSync,
        side,
        subjects,
        events,
        index,
        layout,
    )
    .await
}

/// [`measure`] on the NATS of `kind`.
async fn measure_on(
    kind: NatsKind,
    side: Side,
    subjects: &Subjects,
    events: &[EncodedEvent],
    index: &Arc<HashMap<String, usize>>,
    layout: Layout,
) -> Measured {
    let n = events.len() as u64;
    let world = World::new(subjects, events, index, layout.partitions, kind).await;
    let bus = matches!(side, Side::Bus | Side::BusNoMetrics);
    // Several buses publish once they divided the partitions (see `run_bus`);
    // with `BENCH_PUBLISH_AFTER=1` the raw sides of a partitioned run publish
    // once their consumers exist too, so every side dispatches while the events
    // are being published.
    let publish_after = !layout.is_single() && std::env::var_os("BENCH_PUBLISH_AFTER").is_some();
    let raw_after = (publish_after && !bus).then_some(events);
    if !(bus && layout.dispatchers > 1) && raw_after.is_none() {
        // Pre-published; several buses publish once they divided the partitions.
        world.publish(events).await;
    }
    let started = Instant::now();
    let (mut elapsed, cpu) = match side {
        Side::Bus => run_bus(&world, events, true, layout).await,
        Side::BusNoMetrics => run_bus(&world, events, false, layout).await,
        Side::Raw => run_raw(&world, subjects, n, layout, raw_after).await,
        Side::RawSingle => run_raw(&world, subjects, n, Layout::SINGLE, raw_after).await,
    };
    if !layout.is_single() {
        // Clock from the first delivery to p1 (see the module docs).
        let first_ns = world
            .marks
            .first
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .filter(|&m| m > 0)
            .min()
            .unwrap_or(1)
            - 1;
        let first = world.marks.base + Duration::from_nanos(first_ns);
        let done = started + elapsed;
        elapsed = done.saturating_duration_since(first.max(started));
    }
    let (chain, missing) = world.marks.chain_us();
    assert_eq!(
        missing,
        0,
        "{} side: every event reached p1 and p3",
        side.name()
    );
    for (k, a) in world.answered.iter().enumerate() {
        let a = a.load(Ordering::Relaxed);
        assert!(
            a >= n,
            "{} side: responder {k} answered {a} of {n}",
            side.name()
        );
    }
    world.finish();
    Measured {
        eps: n as f64 / elapsed.as_secs_f64(),
        p99_us: percentile(&chain, 99.0),
        p50_us: percentile(&chain, 50.0),
        elapsed,
        cpu_us_per_event: cpu.bench_ms as f64 * 1_000.0 / n as f64,
        server_cpu_us_per_event: cpu.server_ms as f64 * 1_000.0 / n as f64,
    }
}

async fn bench(smoke: bool) {
    // Under `cargo test --all-targets` the bench runs once, small, as a smoke test
    // of both sides; `cargo bench` (which passes `--bench`) measures for real.
    let (default_events, default_rounds) = if smoke { (300, 1) } else { (30_000, 5) };
    let n = env_usize("BENCH_EVENTS", default_events);
    let rounds = env_usize("BENCH_ROUNDS", default_rounds);
    let subjects = Subjects::default();
    let (events, index) = build_events(&subjects, n);
    let layout = Layout::from_args();
    if !smoke && std::env::args().any(|a| a == "--tracing") {
        // Then the trace decided where it starts (the host, with
        // `parentbased_traceidratio`): 1 event in 100 carries a sampled
        // traceparent, the others an unsampled one.
        let sampled = with_traceparents(&events, 1);
        tracing_overhead(smoke, n, rounds, &subjects, &[&events, &sampled], &index).await;
        return;
    }
    if !smoke && std::env::args().any(|a| a == "--cluster") {
        cluster_cost(smoke, n, rounds, &subjects, &events, &index).await;
        return;
    }
    if smoke {
        // The smoke run also runs two partitioned buses once.
        let split = Layout {
            partitions: 4,
            dispatchers: 2,
        };
        measure(Side::Bus, &subjects, &events, &index, split).await;
        println!("smoke: dispatch bench with 4 partitions over 2 buses ran {n} events");
    }
    let shape = if layout.is_single() {
        String::new()
    } else {
        format!(
            " partitions={} dispatchers={} clock=first_delivery raw_publish={}",
            layout.partitions,
            layout.dispatchers,
            if std::env::var_os("BENCH_PUBLISH_AFTER").is_some() {
                "after_start"
            } else {
                "before"
            }
        )
    };

    let mut bus = Vec::with_capacity(rounds);
    let mut raw = Vec::with_capacity(rounds);
    let mut raw_single = Vec::with_capacity(rounds);
    let sides: &[Side] = if layout.is_single() {
        &[Side::Bus, Side::Raw]
    } else {
        &[Side::Bus, Side::Raw, Side::RawSingle]
    };
    for round in 1..=rounds {
        for &side in sides {
            let m = measure(side, &subjects, &events, &index, layout).await;
            if smoke {
                println!("smoke: dispatch bench side={} ran {n} events", side.name());
            } else {
                println!(
                    "bench: scenario=dispatch_round{shape} side={} round={round} eps={:.0} p99_us={:.0} p50_us={:.0} elapsed_ms={} cpu_us_per_event={:.1} server_cpu_us_per_event={:.1}",
                    side.name(),
                    m.eps,
                    m.p99_us,
                    m.p50_us,
                    m.elapsed.as_millis(),
                    m.cpu_us_per_event,
                    m.server_cpu_us_per_event
                );
            }
            match side {
                Side::Bus => bus.push(m),
                Side::Raw | Side::BusNoMetrics => raw.push(m),
                Side::RawSingle => raw_single.push(m),
            }
        }
    }
    let med =
        |v: &[Measured], f: fn(&Measured) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let bus_eps = med(&bus, |m| m.eps);
    let raw_eps = med(&raw, |m| m.eps);
    let bus_p99 = med(&bus, |m| m.p99_us);
    let raw_p99 = med(&raw, |m| m.p99_us);
    let bus_cpu = med(&bus, |m| m.cpu_us_per_event);
    let raw_cpu = med(&raw, |m| m.cpu_us_per_event);
    // Partitioned: also the single raw loop, so the cost of the layout itself shows.
    let single = if raw_single.is_empty() {
        String::new()
    } else {
        let single_eps = med(&raw_single, |m| m.eps);
        format!(
            " raw_single_eps={single_eps:.0} ratio_to_single={:.3}",
            bus_eps / single_eps
        )
    };
    if !smoke {
        println!(
            "bench: scenario=dispatch{shape} events={n} rounds={rounds} bus_eps={bus_eps:.0} raw_eps={raw_eps:.0} ratio={:.3} bus_p99_us={bus_p99:.0} raw_p99_us={raw_p99:.0} p99_ratio={:.3} bus_cpu_us_per_event={bus_cpu:.1} raw_cpu_us_per_event={raw_cpu:.1}{single}",
            bus_eps / raw_eps,
            bus_p99 / raw_p99
        );
    }
    if layout.is_single() {
        metrics_overhead(smoke, n, rounds, &subjects, &events, &index).await;
        tracing_overhead(smoke, n, rounds, &subjects, &[&events], &index).await;
    }
    if smoke {
        cluster_cost(smoke, n, rounds, &subjects, &events, &index).await;
    }
}

/// The bus with per-handler metrics on and off, alternating which goes first per
/// round, each on a fresh server: `bench: scenario=metrics_overhead …` (goal: the
/// metrics cost at most 5% of throughput).
async fn metrics_overhead(
    smoke: bool,
    n: usize,
    rounds: usize,
    subjects: &Subjects,
    events: &[EncodedEvent],
    index: &Arc<HashMap<String, usize>>,
) {
    let mut on = Vec::with_capacity(rounds);
    let mut off = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [Side::Bus, Side::BusNoMetrics]
        } else {
            [Side::BusNoMetrics, Side::Bus]
        };
        for side in order {
            let m = measure(side, subjects, events, index, Layout::from_args()).await;
            if smoke {
                println!("smoke: metrics bench side={} ran {n} events", side.name());
            } else {
                println!(
                    "bench: scenario=metrics_overhead_round side={} round={round} eps={:.0} p99_us={:.0} cpu_us_per_event={:.1}",
                    side.name(),
                    m.eps,
                    m.p99_us,
                    m.cpu_us_per_event
                );
            }
            if side == Side::Bus {
                on.push(m.eps);
            } else {
                off.push(m.eps);
            }
        }
    }
    if smoke {
        return;
    }
    let (on_eps, off_eps) = (median(&on), median(&off));
    println!(
        "bench: scenario=metrics_overhead events={n} rounds={rounds} on_eps={on_eps:.0} off_eps={off_eps:.0} diff_pct={:.1}",
        (off_eps - on_eps) / off_eps * 100.0
    );
}

/// The bus with span export on and off (OpenTelemetry: a CONSUMER span per event,
/// a CLIENT span per delivery, exported over OTLP/HTTP to a receiver in this
/// process, every span kept: `TraceSwitch`'s queue is large enough), alternating
/// which goes first per round, each on a fresh server:
/// `bench: scenario=tracing_overhead on_eps=… off_eps=… diff_pct=… spans_per_event=…`
/// (goal: export on costs at most 5 % of throughput). Off is the production
/// default: no OpenTelemetry layer, no span created.
async fn tracing_overhead(
    smoke: bool,
    n: usize,
    rounds: usize,
    subjects: &Subjects,
    variants: &[&[EncodedEvent]],
    index: &Arc<HashMap<String, usize>>,
) {
    // One subscriber per process: installed once for every variant.
    let receiver = hookbus_tests::otlp::Receiver::start_counting().await;
    let switch = hookbus_tests::otlp::TraceSwitch::install(&receiver.url);
    if !smoke {
        // A warm-up round with export on, not counted: a long-running process has
        // touched its span queue and its allocator's pages already; a fresh one
        // pays for that in its first round (page faults).
        switch.on();
        measure(Side::Bus, subjects, variants[0], index, Layout::from_args()).await;
        switch.off();
        switch.flush();
        receiver.clear();
    }
    let mut off_cpu = Vec::new();
    for events in variants {
        off_cpu.push(
            tracing_variant(
                smoke, n, rounds, subjects, events, index, &receiver, &switch,
            )
            .await,
        );
    }
    tracing_off_cost(smoke, variants[0], off_cpu[0]);
}

/// What export off adds to one event's path, measured directly: the checks the
/// relay, the dispatcher and each of the three deliveries make
/// (`trace::traced_parent`, `trace::enabled`), timed over the bench's own
/// events, against the bus's CPU per event with export off in this run:
/// `bench: scenario=tracing_off_cost checks_per_event=5 ns_per_event=… off_cpu_us_per_event=… cost_pct=…`
/// (goal: at most 1 %). With export off no span is created and no header read
/// beyond these checks, so this is the whole difference to a bus without tracing.
fn tracing_off_cost(smoke: bool, events: &[EncodedEvent], off_cpu_us_per_event: f64) {
    assert!(!hookbus_kit::trace::enabled(), "export is off here");
    let iters = if smoke { 10_000 } else { 5_000_000 };
    let mut traced = 0usize;
    let start = Instant::now();
    for i in 0..iters {
        let headers = std::hint::black_box(&events[i % events.len()].headers);
        // The relay's send and the dispatcher's process.
        for _ in 0..2 {
            traced += usize::from(hookbus_kit::trace::traced_parent(headers).is_some());
        }
        // Each delivery attempt (three handlers).
        for _ in 0..3 {
            traced += usize::from(std::hint::black_box(hookbus_kit::trace::enabled()));
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(traced, 0, "nothing is traced with export off");
    if smoke {
        return;
    }
    #[allow(clippy::cast_precision_loss)]
    let ns = elapsed.as_nanos() as f64 / iters as f64;
    println!(
        "bench: scenario=tracing_off_cost checks_per_event=5 ns_per_event={ns:.2} off_cpu_us_per_event={off_cpu_us_per_event:.1} cost_pct={:.4}",
        ns / (off_cpu_us_per_event * 1_000.0) * 100.0
    );
}

/// One variant of [`tracing_overhead`]: these events, export on against off.
#[allow(clippy::too_many_arguments)]
async fn tracing_variant(
    smoke: bool,
    n: usize,
    rounds: usize,
    subjects: &Subjects,
    events: &[EncodedEvent],
    index: &Arc<HashMap<String, usize>>,
    receiver: &hookbus_tests::otlp::Receiver,
    switch: &hookbus_tests::otlp::TraceSwitch,
) -> f64 {
    let mut on = Vec::with_capacity(rounds);
    let mut off = Vec::with_capacity(rounds);
    let mut off_cpu = Vec::with_capacity(rounds);
    let mut spans = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for traced in order {
            receiver.clear();
            if traced {
                switch.on();
            }
            let m = measure(Side::Bus, subjects, events, index, Layout::from_args()).await;
            if traced {
                switch.off();
                switch.flush();
            }
            #[allow(clippy::cast_precision_loss)]
            let per_event = receiver.count() as f64 / n as f64;
            let name = if traced { "traced" } else { "untraced" };
            if smoke {
                println!(
                    "smoke: tracing bench side={name} ran {n} events, {per_event:.1} spans per event"
                );
                assert!(
                    !traced || per_event >= 1.0,
                    "traced side exported {per_event} spans per event"
                );
            } else {
                println!(
                    "bench: scenario=tracing_overhead_round side={name} round={round} eps={:.0} p99_us={:.0} cpu_us_per_event={:.1} spans_per_event={per_event:.2}",
                    m.eps, m.p99_us, m.cpu_us_per_event
                );
            }
            if traced {
                on.push(m.eps);
                spans.push(per_event);
            } else {
                off.push(m.eps);
                off_cpu.push(m.cpu_us_per_event);
            }
        }
    }
    if smoke {
        return median(&off_cpu);
    }
    let (on_eps, off_eps) = (median(&on), median(&off));
    let sampled = if events
        .first()
        .is_some_and(|e| e.headers.get("traceparent").is_some())
    {
        "parent_1pct"
    } else {
        "all"
    };
    println!(
        "bench: scenario=tracing_overhead sampled={sampled} export={} events={n} rounds={rounds} on_eps={on_eps:.0} off_eps={off_eps:.0} diff_pct={:.1} spans_per_event={:.2}",
        hookbus_tests::otlp::TraceSwitch::export_kind(),
        (off_eps - on_eps) / off_eps * 100.0,
        median(&spans)
    );
    median(&off_cpu)
}

/// `--cluster`: the bus and the raw loop on a three-node cluster with R3 streams
/// next to the single server (R1), alternating which goes first per round:
/// `bench: scenario=dispatch_nats nats=r1|r3 …` per NATS, then
/// `bench: scenario=dispatch_r3_cost r1_bus_eps=… r3_bus_eps=… r3_over_r1=…`.
async fn cluster_cost(
    smoke: bool,
    n: usize,
    rounds: usize,
    subjects: &Subjects,
    events: &[EncodedEvent],
    index: &Arc<HashMap<String, usize>>,
) {
    let kinds = [NatsKind::R1DefaultSync, NatsKind::R3];
    let mut got: HashMap<(&str, &str), Vec<Measured>> = HashMap::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [Side::Bus, Side::Raw]
        } else {
            [Side::Raw, Side::Bus]
        };
        for kind in kinds {
            for side in order {
                let m = measure_on(kind, side, subjects, events, index, Layout::SINGLE).await;
                if smoke {
                    println!(
                        "smoke: dispatch bench nats={} side={} ran {n} events",
                        kind.name(),
                        side.name()
                    );
                } else {
                    println!(
                        "bench: scenario=dispatch_nats_round nats={} side={} round={round} eps={:.0} p99_us={:.0} server_cpu_us_per_event={:.1}",
                        kind.name(),
                        side.name(),
                        m.eps,
                        m.p99_us,
                        m.server_cpu_us_per_event
                    );
                }
                got.entry((kind.name(), side.name())).or_default().push(m);
            }
        }
    }
    if smoke {
        return;
    }
    let med = |kind: NatsKind, side: Side, f: fn(&Measured) -> f64| {
        median(
            &got[&(kind.name(), side.name())]
                .iter()
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    for kind in kinds {
        let (bus, raw) = (
            med(kind, Side::Bus, |m| m.eps),
            med(kind, Side::Raw, |m| m.eps),
        );
        println!(
            "bench: scenario=dispatch_nats nats={} events={n} rounds={rounds} bus_eps={bus:.0} raw_eps={raw:.0} ratio={:.3} bus_p99_us={:.0} raw_p99_us={:.0} server_cpu_us_per_event={:.1}",
            kind.name(),
            bus / raw,
            med(kind, Side::Bus, |m| m.p99_us),
            med(kind, Side::Raw, |m| m.p99_us),
            med(kind, Side::Bus, |m| m.server_cpu_us_per_event)
        );
    }
    let (r1, r3) = (
        med(NatsKind::R1DefaultSync, Side::Bus, |m| m.eps),
        med(NatsKind::R3, Side::Bus, |m| m.eps),
    );
    let (raw1, raw3) = (
        med(NatsKind::R1DefaultSync, Side::Raw, |m| m.eps),
        med(NatsKind::R3, Side::Raw, |m| m.eps),
    );
    println!(
        "bench: scenario=dispatch_r3_cost events={n} rounds={rounds} r1_bus_eps={r1:.0} r3_bus_eps={r3:.0} r3_over_r1={:.3} r1_raw_eps={raw1:.0} r3_raw_eps={raw3:.0} raw_r3_over_r1={:.3}",
        r3 / r1,
        raw3 / raw1
    );
}

fn main() {
    hookbus_tests::bench::main(bench);
}
