//! The partition layout on a real nats-server: the events stream's subject
//! transform appends the partition nats-server computes, which equals
//! `core_events::object_partition`; a publish of another shape is refused; each
//! partition's dispatcher consumer filters its partition on the server; an events
//! stream of the old layout, or with another partition count, is reported.
//!
//! Run on the oldest supported server too:
//! `NATS_SERVER_BIN=…/nats-2.10.26/bin/nats-server cargo test -p hookbus-tests --test partitions`.
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::*;
use core_events::{Hook, ObjectKey, ObjectKind, Subjects};
use futures::StreamExt;
use hookbus::Publisher;
use hookbus::config::StreamSettings;
use hookbus::provision::{ProvisionError, provision};
use hookbus_tests::{NatsServer, assert_eventually, init_tracing};

const WAIT: Duration = Duration::from_secs(30);

fn with_partitions(n: u32) -> StreamSettings {
    StreamSettings {
        partitions: Some(n),
        ..StreamSettings::default()
    }
}

/// Every stored subject of the events stream, with its message count.
async fn stored_subjects(js: &jetstream::Context, subjects: &Subjects) -> BTreeMap<String, usize> {
    let stream = js.get_stream(subjects.events_stream()).await.unwrap();
    let mut list = stream
        .info_with_subjects(subjects.all_events())
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    while let Some(item) = list.next().await {
        let (subject, count) = item.unwrap();
        out.insert(subject, count);
    }
    out
}

#[tokio::test]
async fn the_server_appends_the_partition_we_compute() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::new("acme.pagoda").unwrap();
    provision(&js, &subjects, &with_partitions(8))
        .await
        .unwrap();
    let mut stream = js.get_stream(subjects.events_stream()).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.subjects, ["acme.pagoda.events.*.*.*.*"]);
    let transform = config.subject_transform.unwrap();
    assert_eq!(transform.source, "acme.pagoda.events.*.*.*.*");
    assert_eq!(
        transform.destination,
        "acme.pagoda.events.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}.{{partition(8,1,4)}}"
    );

    // Entries and entities, small, large and negative ids, entity names that
    // need escaping: the server's partition is FNV-1a-32(object + id) mod 8.
    let mut published = Vec::new();
    for id in (0..120).chain([-7, 4_294_967_296, i64::MAX, i64::MIN]) {
        for (hook, entity) in [
            (Hook::EntryAfterCreate, "customer"),
            (Hook::EntityAfterUpdate, "my customer.v2"),
        ] {
            let subject = subjects.event(hook, entity, id).unwrap();
            js.publish(subject.clone(), "{}".into())
                .await
                .unwrap()
                .await
                .unwrap();
            published.push((
                subject,
                ObjectKey {
                    kind: hook.object(),
                    id,
                },
            ));
        }
    }
    let stored = stored_subjects(&js, &subjects).await;
    assert_eq!(stored.len(), published.len(), "{stored:?}");
    let mut per_partition = [0usize; 8];
    for (subject, object) in &published {
        let p = object.partition(8);
        let want = format!("{subject}.{p}");
        assert_eq!(stored.get(&want), Some(&1), "{want} not stored: {stored:?}");
        let parsed = subjects.parse_event_subject(&want).unwrap();
        assert_eq!(parsed.partition, Some(p));
        assert_eq!(parsed.object, *object);
        per_partition[p as usize] += 1;
    }
    assert!(
        per_partition.iter().all(|&n| n > 0),
        "every partition got objects: {per_partition:?}"
    );
    // The documented example.
    assert_eq!(
        core_events::object_partition("entry", "42", 4),
        ObjectKey {
            kind: ObjectKind::Entry,
            id: 42
        }
        .partition(4)
    );

    // One object's history, one entity, a prefix: the documented filters.
    let count = |filter: String| {
        let js = js.clone();
        let name = subjects.events_stream();
        async move {
            let s = js.get_stream(name).await.unwrap();
            let mut list = s.info_with_subjects(filter).await.unwrap();
            let mut n = 0;
            while let Some(item) = list.next().await {
                n += item.unwrap().1;
            }
            n
        }
    };
    let entry42 = ObjectKey {
        kind: ObjectKind::Entry,
        id: 42,
    };
    assert_eq!(count(subjects.object_filter(entry42)).await, 1);
    assert_eq!(
        count(subjects.event_filter(None, Some("my customer.v2")).unwrap()).await,
        124
    );
    assert_eq!(count("acme.pagoda.events.entry.>".to_owned()).await, 124);
}

#[tokio::test]
async fn a_publish_of_another_shape_is_refused() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    provision(&js, &subjects, &with_partitions(4))
        .await
        .unwrap();
    for subject in [
        // The old three-token shape, and one token too many.
        "pagoda.events.entry.after_create.customer",
        "pagoda.events.entry.after_create.customer.42.1",
    ] {
        let result = match js.publish(subject, "{}".into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let err = result.expect_err(subject);
        assert!(
            err.contains("no stream found for given subject"),
            "{subject}: {err}"
        );
    }
    assert_eq!(
        hookbus_tests::stream_len(&js, &subjects.events_stream()).await,
        0,
        "nothing stored"
    );
    // The right shape is taken.
    js.publish("pagoda.events.entry.after_create.customer.42", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_dispatcher_reads_only_its_partition() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let subjects = Subjects::default();
    let log = CallLog::default();
    let mut config = test_config(&["p"]);
    config.dispatcher.partitions = 4;
    let bus = hookbus::run::Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.start(&server).await;
    wait_registered(&bus, &["p"]).await;
    assert_eventually!(bus.stats.partitions().len() == 4, WAIT);
    let publisher = Publisher::new(js.clone(), subjects.clone());
    let ids: Vec<i64> = (0..200).map(|i| i % 37).collect();
    for id in &ids {
        publisher
            .publish(&entry_event(Hook::EntryAfterCreate, "customer", *id))
            .await
            .unwrap();
    }
    assert_eventually!(CallLog::distinct_events(&log.of("p")) == ids.len(), WAIT);
    let mut expected = [0u64; 4];
    for id in &ids {
        expected[ObjectKey {
            kind: ObjectKind::Entry,
            id: *id,
        }
        .partition(4) as usize] += 1;
    }
    let stream = js.get_stream(subjects.events_stream()).await.unwrap();
    for (index, want) in expected.iter().enumerate() {
        let name = format!("dispatcher-p{index}of4");
        let index = u32::try_from(index).unwrap();
        assert_eventually!(
            {
                let info = stream.consumer_info(&name).await.unwrap();
                info.num_ack_pending == 0 && info.num_pending == 0
            },
            WAIT
        );
        let info = stream.consumer_info(&name).await.unwrap();
        assert_eq!(
            info.config.filter_subject,
            subjects.partition_events(index),
            "{name} filters its partition on the server"
        );
        // It was sent exactly its partition's events (no redelivery here), not
        // the whole stream.
        assert_eq!(
            info.delivered.consumer_sequence,
            *want,
            "{name} read only its partition's events ({expected:?} of {})",
            ids.len()
        );
        assert_eq!(info.ack_floor.consumer_sequence, *want);
    }
    assert_in_order(&log, &ids);
    bus.stop().await.unwrap();
}

/// Per object, deliveries came in publish order.
fn assert_in_order(log: &CallLog, ids: &[i64]) {
    let mut per_object: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in log.of("p") {
        let seen = per_object.entry(c.object.clone()).or_default();
        if !seen.contains(&c.event_id) {
            seen.push(c.event_id);
        }
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids {
        *counts.entry(format!("entry/{id}")).or_default() += 1;
    }
    for (object, n) in counts {
        assert_eq!(per_object.get(&object).map(Vec::len), Some(n), "{object}");
    }
}

#[tokio::test]
async fn an_events_stream_of_the_old_layout_is_reported() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    js.create_stream(stream::Config {
        name: "PAGODA_EVENTS".into(),
        subjects: vec!["pagoda.events.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("pagoda.events.entry.after_create.customer", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let err = provision(&js, &Subjects::default(), &StreamSettings::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ProvisionError::OldLayout { .. }), "{err:?}");
    let msg = err.to_string();
    for part in [
        "stream 'PAGODA_EVENTS' has the old subject layout",
        "\"pagoda.events.>\"",
        "docs/deploy.md#migrating-the-events-stream-to-the-partitioned-layout",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    // The bus refuses to start on it, with the same message.
    let err = hookbus::run::Bus::start(server.connect().await, test_config(&[]))
        .await
        .err()
        .expect("the bus refuses an old-layout stream");
    assert!(err.to_string().contains("old subject layout"), "{err}");
    // Left alone: same subjects, the event still there.
    let mut s = js.get_stream("PAGODA_EVENTS").await.unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(info.config.subjects, ["pagoda.events.>"]);
    assert!(info.config.subject_transform.is_none());
    assert_eq!(info.state.messages, 1);
}

#[tokio::test]
async fn the_partition_count_is_fixed_at_creation() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    provision(&js, &subjects, &with_partitions(4))
        .await
        .unwrap();
    // Tools that do not care take it as it is; the same count is fine.
    provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    provision(&js, &subjects, &with_partitions(4))
        .await
        .unwrap();
    assert_eq!(
        hookbus::provision::events_partitions(&js, &subjects)
            .await
            .unwrap(),
        Some(4)
    );
    let err = provision(&js, &subjects, &with_partitions(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProvisionError::Partitions {
                have: 4,
                want: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("has 4 partition(s) but this bus is configured with 2"),
        "{msg}"
    );
    assert!(
        msg.contains("docs/deploy.md#changing-the-number-of-partitions"),
        "{msg}"
    );
    // The bus reports its stream's count in its health.
    let mut config = test_config(&[]);
    config.dispatcher.partitions = 4;
    let bus = hookbus::run::Bus::start(server.connect().await, config)
        .await
        .unwrap();
    let report = bus.health.report();
    assert_eq!(report.partitions, 4);
    bus.stop().await.unwrap();
}

/// nats-server's peak resident memory (`VmHWM`), in MiB.
fn rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM:")
}

/// A memory figure of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in MiB.
fn proc_status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Publishes `n` events about `objects(i)` into a fresh events stream of 8
/// partitions, as the relay does (subject with the object id, `Nats-Msg-Id`,
/// `Pagoda-Object`), with one sample entry envelope as every payload (encoded
/// once: the client's cost stays small next to the server's); returns (events per
/// second, nats-server peak RSS in MiB, store size in MiB, distinct stored
/// subjects, RSS in MiB after a restart of the server once the stream is loaded).
async fn fill(n: usize, objects: impl Fn(usize) -> i64) -> (f64, f64, f64, u64, f64) {
    let mut server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    provision(&js, &subjects, &with_partitions(8))
        .await
        .unwrap();
    let payload = bytes::Bytes::from(
        serde_json::to_vec(&entry_event(Hook::EntryAfterUpdate, "customer", 1)).unwrap(),
    );
    let pid = server.pid().unwrap();
    let t0 = std::time::Instant::now();
    let mut acks = std::collections::VecDeque::with_capacity(4096);
    for i in 0..n {
        let id = objects(i);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            core_events::protocol::headers::MSG_ID,
            format!("event-{i}").as_str(),
        );
        headers.insert(
            core_events::protocol::headers::OBJECT,
            format!("entry/{id}").as_str(),
        );
        let ack = js
            .send_publish(
                subjects
                    .event(Hook::EntryAfterUpdate, "customer", id)
                    .unwrap(),
                jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .headers(headers),
            )
            .await
            .unwrap();
        acks.push_back(ack);
        if acks.len() >= 4096 {
            acks.pop_front().unwrap().await.unwrap();
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let eps = n as f64 / t0.elapsed().as_secs_f64();
    let info = js
        .get_stream(subjects.events_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, n as u64);
    let rss = rss_mib(pid);
    // After a restart: the stream's index rebuilt from the store, nothing else.
    server.restart().await;
    let js = jetstream::new(server.connect().await);
    let again = js
        .get_stream(subjects.events_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(again.state.messages, n as u64);
    let restarted = proc_status_mib(server.pid().unwrap(), "VmRSS:");
    (
        eps,
        rss,
        info.state.bytes as f64 / 1024.0 / 1024.0,
        info.state.subjects_count,
        restarted,
    )
}

/// nats-server's memory and publish rate with 1,000,000 distinct objects in the
/// events stream (every stored subject distinct), next to the same number of
/// events about 256 objects. Prints `bench:` lines; docs/deploy.md quotes them.
///
/// `BENCH_EVENTS=1000000 cargo test -p hookbus-tests --test partitions -- --ignored --nocapture memory`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: publishes a million events"]
async fn memory_with_a_million_objects() {
    let n = hookbus_tests::bench::env_usize("BENCH_EVENTS", 1_000_000);
    let idle = {
        let server = NatsServer::start().await;
        let js = jetstream::new(server.connect().await);
        provision(&js, &Subjects::default(), &with_partitions(8))
            .await
            .unwrap();
        rss_mib(server.pid().unwrap())
    };
    let (few_eps, few_rss, few_mib, few_subjects, few_restarted) =
        fill(n, |i| (i % 256) as i64).await;
    let (many_eps, many_rss, many_mib, many_subjects, many_restarted) = fill(n, |i| i as i64).await;
    let per_subject = |a: f64, b: f64| {
        (a - b) * 1024.0 * 1024.0 / (many_subjects.saturating_sub(few_subjects)).max(1) as f64
    };
    println!(
        "bench: scenario=stream_memory events={n} partitions=8 idle_rss_mib={idle:.0} \
         objects_256_peak_rss_mib={few_rss:.0} objects_256_restarted_rss_mib={few_restarted:.0} objects_256_subjects={few_subjects} objects_256_eps={few_eps:.0} objects_256_store_mib={few_mib:.0} \
         objects_distinct_peak_rss_mib={many_rss:.0} objects_distinct_restarted_rss_mib={many_restarted:.0} objects_distinct_subjects={many_subjects} objects_distinct_eps={many_eps:.0} objects_distinct_store_mib={many_mib:.0} \
         peak_bytes_per_subject={:.0} restarted_bytes_per_subject={:.0}",
        per_subject(many_rss, few_rss),
        per_subject(many_restarted, few_restarted)
    );
}

/// The documented way to change N (docs/deploy.md, "Changing the number of
/// partitions"): drain, archive the stream by sourcing it, remove it, start the
/// buses with the new number. Nothing is dispatched twice or lost, and the
/// archive keeps the old events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_n_drain_and_switch() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let subjects = Subjects::default();
    let log = CallLog::default();
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    let publisher = Publisher::new(js.clone(), subjects.clone());
    let bus_with = |n: u32| {
        let mut config = test_config(&["p"]);
        config.dispatcher.partitions = n;
        config
    };

    // Two partitions; 20 events dispatched.
    let bus = hookbus::run::Bus::start(
        server.connect_as(hookbus_tests::BUS_USER).await,
        bus_with(2),
    )
    .await
    .unwrap();
    p.start(&server).await;
    wait_registered(&bus, &["p"]).await;
    for id in 0..20 {
        publisher
            .publish(&entry_event(Hook::EntryAfterCreate, "customer", id))
            .await
            .unwrap();
    }
    assert_eventually!(CallLog::distinct_events(&log.of("p")) == 20, WAIT);
    // Drained: nothing left to dispatch in any partition.
    let stream = js.get_stream(subjects.events_stream()).await.unwrap();
    for name in ["dispatcher-p0of2", "dispatcher-p1of2"] {
        assert_eventually!(
            {
                let info = stream.consumer_info(name).await.unwrap();
                info.num_pending == 0 && info.num_ack_pending == 0
            },
            WAIT
        );
    }
    bus.stop().await.unwrap();

    // Archive by sourcing, then remove the stream.
    js.create_stream(stream::Config {
        name: "PAGODA_EVENTS_ARCHIVE".into(),
        sources: Some(vec![stream::Source {
            name: subjects.events_stream(),
            ..Default::default()
        }]),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eventually!(
        hookbus_tests::stream_len(&js, "PAGODA_EVENTS_ARCHIVE").await == 20,
        WAIT
    );
    js.delete_stream(subjects.events_stream()).await.unwrap();

    // Four partitions: a new stream; 20 more events; only they are dispatched.
    let bus = hookbus::run::Bus::start(
        server.connect_as(hookbus_tests::BUS_USER).await,
        bus_with(4),
    )
    .await
    .unwrap();
    wait_registered(&bus, &["p"]).await;
    assert_eq!(
        hookbus::provision::events_partitions(&js, &subjects)
            .await
            .unwrap(),
        Some(4)
    );
    for id in 20..40 {
        publisher
            .publish(&entry_event(Hook::EntryAfterCreate, "customer", id))
            .await
            .unwrap();
    }
    assert_eventually!(CallLog::distinct_events(&log.of("p")) == 40, WAIT);
    assert_eq!(
        hookbus_tests::stream_len(&js, &subjects.events_stream()).await,
        20
    );
    bus.stop().await.unwrap();
    assert_eq!(
        CallLog::distinct_events(&log.of("p")),
        40,
        "nothing dispatched twice"
    );
    // The archive keeps the old events with their old subjects (partition of 2).
    let archive = stored_subjects_of(&js, "PAGODA_EVENTS_ARCHIVE").await;
    assert_eq!(archive.values().sum::<usize>(), 20);
    assert!(
        archive
            .keys()
            .all(|s| s.ends_with(".0") || s.ends_with(".1")),
        "{archive:?}"
    );
}

async fn stored_subjects_of(js: &jetstream::Context, name: &str) -> BTreeMap<String, usize> {
    let stream = js.get_stream(name).await.unwrap();
    let mut list = stream.info_with_subjects(">").await.unwrap();
    let mut out = BTreeMap::new();
    while let Some(item) = list.next().await {
        let (subject, count) = item.unwrap();
        out.insert(subject, count);
    }
    out
}
