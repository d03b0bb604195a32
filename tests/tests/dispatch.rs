//! End-to-end dispatch tests on a real nats-server: ordering, isolation, dead
//! letters, deferral, replicas, crashes and bad input.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use core_events::{Hook, Subjects};
use hookbus::Publisher;
use hookbus::run::Bus;
use hookbus_tests::KillOnDrop;
use hookbus_tests::{NatsServer, assert_eventually, init_tracing};

const WAIT: Duration = Duration::from_secs(30);

/// Publishes one `hook` event about each entry id of `ids` (entity `customer`), in order.
async fn publish_entries(publisher: &Publisher, hook: Hook, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        publisher
            .publish(&entry_event(hook, "customer", id))
            .await
            .unwrap();
    }
}

fn publisher(client: &async_nats::Client) -> Publisher {
    Publisher::new(jetstream::new(client.clone()), Subjects::default())
}

/// Handler names per event id, in the order they ran.
fn chains(log: &CallLog) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in log.all() {
        out.entry(c.event_id).or_default().push(c.plugin);
    }
    out
}

/// Asserts that, per object, first deliveries to `plugin` come in stream order and
/// every published event arrived.
fn assert_in_order_per_object(log: &CallLog, plugin: &str, expected_events: usize) {
    let mut seen = HashSet::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for c in log.of(plugin) {
        if !seen.insert(c.event_id.clone()) {
            continue; // a redelivery (at-least-once)
        }
        let prev = last.insert(c.object.clone(), c.seq).unwrap_or(0);
        assert!(
            prev < c.seq,
            "{plugin}: {} got seq {} after {prev}",
            c.object,
            c.seq
        );
    }
    assert_eq!(seen.len(), expected_events, "{plugin} got every event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_runs_handlers_in_priority_order() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let bus = start_bus(&server, &["a", "d", "b", "c"]).await;
    let mut plugins = vec![
        TestPlugin::new("a", &log).handler("h", Hook::EntryAfterCreate, Some(&["customer"]), 50),
        TestPlugin::new("b", &log).handler("h", Hook::EntryAfterCreate, None, 100),
        TestPlugin::new("c", &log).handler("h", Hook::EntryAfterCreate, Some(&["customer"]), 150),
        TestPlugin::new("d", &log).handler("h", Hook::EntryAfterCreate, None, 100),
    ];
    for p in &mut plugins {
        p.start(&server).await;
    }
    wait_registered(&bus, &["a", "b", "c", "d"]).await;

    let publisher = publisher(&client);
    let customer = entry_event(Hook::EntryAfterCreate, "customer", 1);
    let product = entry_event(Hook::EntryAfterCreate, "product", 2);
    publisher.publish(&customer).await.unwrap();
    publisher.publish(&product).await.unwrap();
    assert_eventually!(log.len() == 6, WAIT, "6 deliveries, got {:?}", log.all());
    let chains = chains(&log);
    // Tie at 100: d before b, as in ENABLED_PLUGINS.
    assert_eq!(chains[&customer.id.to_string()], ["a", "d", "b", "c"]);
    assert_eq!(chains[&product.id.to_string()], ["d", "b"]);
    bus.stop().await.unwrap();

    // The same plugins with the tie order reversed in ENABLED_PLUGINS.
    let mut config = test_config(&["a", "b", "d", "c"]);
    config.dispatcher.consumer = "dispatcher-2".into();
    let log_before = log.len();
    let bus = hookbus::run::Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    // The new consumer starts from the stream's beginning: both events again.
    assert_eventually!(log.len() == log_before + 6, WAIT);
    let again: Vec<String> = log.all()[log_before..]
        .iter()
        .filter(|c| c.event_id == customer.id.to_string())
        .map(|c| c.plugin.clone())
        .collect();
    assert_eq!(again, ["a", "b", "d", "c"]);
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_hooks_honour_entity_filters() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let bus = start_bus(&server, &["e"]).await;
    let mut p = TestPlugin::new("e", &log)
        .handler(
            "only_customer",
            Hook::EntityAfterCreate,
            Some(&["customer"]),
            100,
        )
        .handler("all", Hook::EntityAfterDelete, None, 100);
    p.start(&server).await;
    wait_registered(&bus, &["e"]).await;
    let publisher = publisher(&client);
    publisher
        .publish(&entity_event(Hook::EntityAfterCreate, 1, "product"))
        .await
        .unwrap();
    publisher
        .publish(&entity_event(Hook::EntityAfterCreate, 2, "customer"))
        .await
        .unwrap();
    publisher
        .publish(&entity_event(Hook::EntityAfterDelete, 1, "product"))
        .await
        .unwrap();
    assert_eventually!(log.len() == 2, WAIT);
    // Different objects run in parallel, so compare the deliveries as a set.
    let mut calls: Vec<(String, String)> = log
        .all()
        .into_iter()
        .map(|c| (c.handler, c.object))
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        [
            ("all".to_owned(), "entity/1".to_owned()),
            ("only_customer".to_owned(), "entity/2".to_owned())
        ]
    );
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_isolated_and_dead_lettered() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let log = CallLog::default();
    let bus = start_bus(&server, &["good1", "bad", "good2"]).await;
    let mut good1 = TestPlugin::new("good1", &log).handler("h", Hook::EntryAfterCreate, None, 10);
    let mut bad = TestPlugin::new("bad", &log)
        .handler("transient", Hook::EntryAfterCreate, None, 20)
        .handler("permanent", Hook::EntryAfterCreate, None, 21)
        .handler("garbage", Hook::EntryAfterCreate, None, 22);
    let mut good2 = TestPlugin::new("good2", &log).handler("h", Hook::EntryAfterCreate, None, 30);
    bad.set("transient", Behaviour::Fail(500));
    bad.set("permanent", Behaviour::Fail(422));
    bad.set("garbage", Behaviour::Garbage);
    for p in [&mut good1, &mut bad, &mut good2] {
        p.start(&server).await;
    }
    wait_registered(&bus, &["good1", "bad", "good2"]).await;
    let event = entry_event(Hook::EntryAfterCreate, "customer", 7);
    publisher(&client).publish(&event).await.unwrap();

    assert_eventually!(log.count("good2", "h") == 1, WAIT);
    let order: Vec<String> = log
        .all()
        .iter()
        .map(|c| format!("{}:{}#{}", c.plugin, c.handler, c.attempt))
        .collect();
    assert_eq!(
        order,
        [
            "good1:h#1",
            "bad:transient#1",
            "bad:transient#2",
            "bad:transient#3",
            "bad:permanent#1",
            "bad:garbage#1",
            "bad:garbage#2",
            "bad:garbage#3",
            "good2:h#1"
        ]
    );
    assert_eventually!(dead_letters(&js).await.len() == 3, WAIT);
    let letters: BTreeMap<String, serde_json::Value> =
        dead_letters(&js).await.into_iter().collect();
    let t = &letters["pagoda.dlq.bad.transient"];
    assert_eq!(t["event_id"], event.id.to_string());
    assert_eq!(t["attempts"].as_array().unwrap().len(), 3);
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("handler error 500: test failure 500")
    );
    assert_eq!(
        t["event"]["id"],
        event.id.to_string(),
        "the whole event is kept"
    );
    let p = &letters["pagoda.dlq.bad.permanent"];
    assert_eq!(
        p["attempts"].as_array().unwrap().len(),
        1,
        "4xx is not retried"
    );
    let g = &letters["pagoda.dlq.bad.garbage"];
    assert!(g["error"].as_str().unwrap().contains("bad reply"), "{g}");
    // The event itself is done: acked.
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_plugin_gets_everything_later_in_order_and_blocks_no_one() {
    Box::pin(stopped_plugin_case(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_plugin_gets_everything_later_with_partitions_too() {
    Box::pin(stopped_plugin_case(4)).await;
}

/// A plugin stops and comes back; the bus dispatches in `partitions` partitions
/// (all held by this one bus, each with its own deferred queue).
async fn stopped_plugin_case(partitions: u32) {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let mut config = test_config(&["steady", "flappy"]);
    config.dispatcher.partitions = partitions;
    let bus = hookbus::run::Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    let mut steady =
        TestPlugin::new("steady", &log).handler("h", Hook::EntryAfterUpdate, None, 200);
    let mut flappy =
        TestPlugin::new("flappy", &log).handler("h", Hook::EntryAfterUpdate, None, 100);
    steady.start(&server).await;
    flappy.start(&server).await;
    wait_registered(&bus, &["steady", "flappy"]).await;
    let publisher = publisher(&client);
    publish_entries(&publisher, Hook::EntryAfterUpdate, (0..40).map(|i| i % 5)).await;
    assert_eventually!(log.of("steady").len() == 40, WAIT);
    flappy.stop();
    publish_entries(&publisher, Hook::EntryAfterUpdate, (40..100).map(|i| i % 5)).await;
    // The other plugin is never held up by the absent one.
    assert_eventually!(
        log.of("steady").len() == 100,
        WAIT,
        "steady got {}",
        log.of("steady").len()
    );
    assert!(log.of("flappy").len() < 100);
    assert_eventually!(bus.stats.deferred.get() > 0, WAIT);
    if partitions > 1 {
        // Deferred deliveries wait in per-partition queues.
        let js = jetstream::new(client.clone());
        let stream = js
            .get_stream(Subjects::default().deferred_stream())
            .await
            .unwrap();
        let mut subjects = stream
            .info_with_subjects("pagoda.deferred.flappy.>")
            .await
            .unwrap();
        let mut tagged = 0;
        while let Some(Ok((subject, _))) = futures::StreamExt::next(&mut subjects).await {
            assert!(subject.ends_with(&format!("of{partitions}")), "{subject}");
            tagged += 1;
        }
        assert!(tagged > 0, "deferred deliveries are kept per partition");
    }
    flappy.start(&server).await;
    assert_eventually!(CallLog::distinct_events(&log.of("flappy")) == 100, WAIT);
    assert_in_order_per_object(&log, "flappy", 100);
    assert_in_order_per_object(&log, "steady", 100);
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_exactly_once() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let bus = start_bus(&server, &["r"]).await;
    let mut r = TestPlugin::new("r", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    // Two replicas, each on its own connection.
    r.start(&server).await;
    r.start(&server).await;
    wait_registered(&bus, &["r"]).await;
    let publisher = publisher(&client);
    publish_entries(&publisher, Hook::EntryAfterCreate, 0..200).await;
    assert_eventually!(log.len() >= 200, WAIT);
    assert_eventually!(bus.stats.events_acked.get() == 200, WAIT);
    let calls = log.all();
    assert_eq!(calls.len(), 200, "no delivery handled twice");
    assert_eq!(CallLog::distinct_events(&calls), 200);
    let by_replica = |n| calls.iter().filter(|c| c.replica == n).count();
    assert!(
        by_replica(0) > 0 && by_replica(1) > 0,
        "both replicas worked"
    );
    bus.stop().await.unwrap();
}

fn spawn_bus_process(server: &NatsServer, enabled: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(hookbus_tests::hookbus_binary())
            .arg("run")
            .envs(server.env_for(hookbus_tests::BUS_USER))
            .env("ENABLED_PLUGINS", enabled)
            .env("HOOKBUS_ACK_WAIT_SECS", "2")
            .env("RUST_LOG", "warn")
            .env("HOOKBUS_HTTP_ADDR", "off")
            .spawn()
            .unwrap(),
    )
}

/// A `hookbus run` process for plugin `p` with a 1 s lease time, a 2 s ack wait
/// and `partitions` partitions.
fn spawn_leased_bus(server: &NatsServer, partitions: u32) -> KillOnDrop {
    KillOnDrop(
        Command::new(hookbus_tests::hookbus_binary())
            .arg("run")
            .envs(server.env_for(hookbus_tests::BUS_USER))
            .env("ENABLED_PLUGINS", "p")
            .env("HOOKBUS_ACK_WAIT_SECS", "2")
            .env("HOOKBUS_LEASE_TTL", "1s")
            .env("HOOKBUS_PARTITIONS", partitions.to_string())
            .env("RUST_LOG", "warn")
            .env("HOOKBUS_HTTP_ADDR", "off")
            .spawn()
            .unwrap(),
    )
}

/// The process id holding lease `key` (its value is `host/pid/random`), if held.
async fn lease_holder(js: &jetstream::Context, key: &str) -> Option<u32> {
    let kv = js
        .get_key_value(Subjects::default().leases_bucket())
        .await
        .ok()?;
    let v = kv.get(key).await.ok()??;
    String::from_utf8_lossy(&v).split('/').nth(1)?.parse().ok()
}

/// The process id in the dispatcher lease, if held.
async fn lease_holder_pid(js: &jetstream::Context) -> Option<u32> {
    lease_holder(js, "dispatcher").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_bus_takes_over_when_the_active_one_is_killed() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let log = CallLog::default();
    let spawn = || spawn_leased_bus(&server, 1);
    let mut a = spawn();
    assert_eventually!(lease_holder_pid(&js).await == Some(a.id()), WAIT);
    let mut b = spawn();
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.set("h", Behaviour::Slow(Duration::from_millis(2)));
    p.start(&server).await;
    assert_eventually!(bus_process_routes_to(&client, "p").await, WAIT);
    let publisher = publisher(&client);
    publish_entries(&publisher, Hook::EntryAfterCreate, (0..400).map(|i| i % 10)).await;
    assert_eventually!(log.len() > 60, WAIT);
    // Only the lease holder dispatches: kill it mid-stream.
    assert_eq!(
        lease_holder_pid(&js).await,
        Some(a.id()),
        "a still holds the lease"
    );
    a.kill().unwrap();
    a.wait().unwrap();
    let at_kill = log.len();
    assert!(at_kill < 400, "killed mid-stream ({at_kill} delivered)");
    assert_eventually!(lease_holder_pid(&js).await == Some(b.id()), WAIT);
    assert_eventually!(CallLog::distinct_events(&log.all()) == 400, WAIT);
    assert_in_order_per_object(&log, "p", 400);
    b.kill().unwrap();
    b.wait().unwrap();
}

/// The process ids holding the leases of partitions `0..count`, in order (`None`
/// where free).
async fn partition_holders(js: &jetstream::Context, count: u32) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    for i in 0..count {
        out.push(lease_holder(js, &format!("dispatcher.p{i}of{count}")).await);
    }
    out
}

/// True when every partition is held and each of `pids` holds `each` of them.
fn split_evenly(holders: &[Option<u32>], pids: &[u32], each: usize) -> bool {
    holders.iter().all(Option::is_some)
        && pids
            .iter()
            .all(|pid| holders.iter().filter(|h| **h == Some(*pid)).count() == each)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_buses_and_move_when_one_dies_or_joins() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let log = CallLog::default();
    let spawn = || spawn_leased_bus(&server, 4);
    let mut a = spawn();
    let b = spawn();
    // Two buses, four partitions: two each, both dispatching.
    assert_eventually!(
        split_evenly(&partition_holders(&js, 4).await, &[a.id(), b.id()], 2),
        WAIT
    );
    let holders = partition_holders(&js, 4).await;
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.set("h", Behaviour::Slow(Duration::from_millis(2)));
    p.start(&server).await;
    assert_eventually!(bus_process_routes_to(&client, "p").await, WAIT);
    let publisher = publisher(&client);
    publish_entries(&publisher, Hook::EntryAfterCreate, (0..400).map(|i| i % 20)).await;
    // Both buses deliver: events of partitions held by each have arrived.
    let delivered_by = |pid: u32| {
        log.of("p").iter().any(|c| {
            let part = c
                .object
                .parse::<core_events::ObjectKey>()
                .unwrap()
                .partition(4) as usize;
            holders[part] == Some(pid)
        })
    };
    assert_eventually!(delivered_by(a.id()) && delivered_by(b.id()), WAIT);
    a.kill().unwrap();
    a.wait().unwrap();
    let at_kill = log.len();
    assert!(at_kill < 400, "killed mid-stream ({at_kill} delivered)");
    // b takes a's partitions after the lease time and finishes everything, in order.
    assert_eventually!(
        split_evenly(&partition_holders(&js, 4).await, &[b.id()], 4),
        WAIT
    );
    assert_eventually!(CallLog::distinct_events(&log.all()) == 400, WAIT);
    // A bus that joins gets its share, handed over by b while events flow.
    let c = spawn();
    publish_entries(
        &publisher,
        Hook::EntryAfterCreate,
        (400..600).map(|i| i % 20),
    )
    .await;
    assert_eventually!(
        split_evenly(&partition_holders(&js, 4).await, &[b.id(), c.id()], 2),
        WAIT
    );
    assert_eventually!(CallLog::distinct_events(&log.all()) == 600, WAIT);
    assert_in_order_per_object(&log, "p", 600);
    for mut bus in [b, c] {
        bus.kill().unwrap();
        bus.wait().unwrap();
    }
}

/// Whether a bus running in another process has `plugin` enabled in its routing table.
async fn bus_process_routes_to(client: &async_nats::Client, plugin: &str) -> bool {
    let Ok(Ok(reply)) = tokio::time::timeout(
        Duration::from_secs(2),
        client.request("pagoda.bus.registry", "".into()),
    )
    .await
    else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .is_ok_and(|t| t["plugins"][plugin]["enabled_rank"].is_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_killed_mid_stream_loses_nothing() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let mut bus = spawn_bus_process(&server, "p");
    // The bus provisions the bucket; wait for it before registering.
    let js = jetstream::new(client.clone());
    assert_eventually!(
        js.get_key_value(Subjects::default().registry_bucket())
            .await
            .is_ok(),
        WAIT
    );
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.set("h", Behaviour::Slow(Duration::from_millis(2)));
    p.start(&server).await;
    let publisher = publisher(&client);
    // Registration reaches the bus process asynchronously: ask its routing table
    // until it routes to `p`, so that the probe below cannot be routed to no one.
    assert_eventually!(bus_process_routes_to(&client, "p").await, WAIT);
    let probe = entry_event(Hook::EntryAfterCreate, "customer", 999);
    publisher.publish(&probe).await.unwrap();
    assert_eventually!(log.len() >= 1, WAIT);
    publish_entries(&publisher, Hook::EntryAfterCreate, (0..300).map(|i| i % 10)).await;
    assert_eventually!(log.len() > 60, WAIT);
    bus.kill().unwrap();
    bus.wait().unwrap();
    let at_kill = log.len();
    assert!(at_kill < 301, "killed mid-stream");
    let mut bus = spawn_bus_process(&server, "p");
    assert_eventually!(CallLog::distinct_events(&log.all()) == 301, WAIT);
    assert_in_order_per_object(&log, "p", 301);
    bus.kill().unwrap();
    bus.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_mid_stream_loses_nothing() {
    init_tracing();
    let mut server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let bus = start_bus(&server, &["p"]).await;
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.set("h", Behaviour::Slow(Duration::from_millis(2)));
    p.start(&server).await;
    wait_registered(&bus, &["p"]).await;
    let publisher = publisher(&client);
    publish_entries(&publisher, Hook::EntryAfterCreate, (0..150).map(|i| i % 10)).await;
    assert_eventually!(log.len() > 20, WAIT);
    server.kill();
    server.restart().await;
    for i in 150..300 {
        // Publishing retries until the client has reconnected.
        loop {
            match publisher
                .publish(&entry_event(Hook::EntryAfterCreate, "customer", i % 10))
                .await
            {
                Ok(_) => break,
                Err(e) => tracing::info!(error = %e, "publish while reconnecting; retrying"),
            }
        }
    }
    assert_eventually!(
        CallLog::distinct_events(&log.all()) >= 300,
        Duration::from_secs(60),
        "got {} distinct events",
        CallLog::distinct_events(&log.all())
    );
    let js = jetstream::new(client.clone());
    assert_eq!(
        stream_len(&js, "PAGODA_EVENTS").await,
        300,
        "nothing lost in the stream"
    );
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_rest_keeps_working() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let log = CallLog::default();
    let bus = start_bus(&server, &["good", "typo", "broken"]).await;
    let kv = registry(&js).await;
    kv.put("plugins.broken", "{not json".into()).await.unwrap();
    kv.put(
        "plugins.typo",
        r#"{"id":"typo","name":"T","version":"1.0.0","handlers":[{"name":"h","hook":"entry.after_creat"}]}"#.into(),
    )
    .await
    .unwrap();
    kv.put(
        "plugins.liar",
        r#"{"id":"other","name":"T","version":"1.0.0"}"#.into(),
    )
    .await
    .unwrap();
    let hostile = ["a.b c", "*", ">", "顧客", "tab\there", "100%", "$SYS"];
    let mut good = TestPlugin::new("good", &log)
        .handler("any", Hook::EntryAfterCreate, None, 100)
        .handler("hostile", Hook::EntryAfterCreate, Some(&hostile), 50);
    good.start(&server).await;
    wait_registered(&bus, &["good"]).await;
    bus.registry
        .wait_for(WAIT, |t| t.rejected().len() == 3)
        .await
        .expect("three manifests rejected");
    let table = bus.registry.table();
    let rejected = table.rejected();
    assert!(
        rejected["plugins.broken"].contains("manifest is not valid"),
        "{rejected:?}"
    );
    assert!(
        rejected["plugins.typo"].contains("did you mean 'entry.after_create'"),
        "{rejected:?}"
    );
    assert!(
        rejected["plugins.liar"].contains("belongs under 'plugins.other'"),
        "{rejected:?}"
    );

    // Garbage straight onto the events stream (the right shape, so the stream
    // takes it, but an id that is not a number and a hook that does not exist):
    // kept as a dead letter, dispatch goes on.
    client
        .publish("pagoda.events.entry.after_create.x.abc", "garbage".into())
        .await
        .unwrap();
    client
        .publish("pagoda.events.entry.nope.x.1", "{}".into())
        .await
        .unwrap();
    let publisher = publisher(&client);
    for (i, name) in hostile.iter().enumerate() {
        publisher
            .publish(&entry_event(Hook::EntryAfterCreate, name, i as i64))
            .await
            .unwrap();
    }
    assert_eventually!(log.count("good", "hostile") == hostile.len(), WAIT);
    assert_eventually!(log.count("good", "any") == hostile.len(), WAIT);
    let tokens: Vec<String> = log
        .all()
        .iter()
        .filter(|c| c.handler == "hostile")
        .map(|c| c.entity_token.clone())
        .collect();
    let mut decoded: Vec<String> = tokens
        .iter()
        .map(|t| core_events::subject::decode_entity(t).unwrap())
        .collect();
    decoded.sort();
    let mut expected: Vec<String> = hostile.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(
        decoded, expected,
        "every hostile name routed, and its token decodes back"
    );
    let letters = dead_letters(&js).await;
    let malformed = letters
        .iter()
        .filter(|(s, _)| s == "pagoda.dlq._bus.malformed")
        .count();
    assert_eq!(malformed, 2, "{letters:?}");

    // An oversized event is refused at publish with a clear error.
    let mut big = entry_event(Hook::EntryAfterCreate, "customer", 1);
    big.data.entry.note = "x".repeat(2 * 1024 * 1024);
    let err = publisher.publish(&big).await.unwrap_err();
    assert!(
        err.to_string().contains("jetstream publish failed"),
        "{err}"
    );
    // An empty entity name is refused before anything is sent.
    let err = publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "", 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("entity name is empty"), "{err}");
    // And the bus is still up and dispatching.
    publisher
        .publish(&entry_event(Hook::EntryAfterCreate, "after", 1))
        .await
        .unwrap();
    assert_eventually!(log.count("good", "any") == hostile.len() + 1, WAIT);
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_answers_status_requests() {
    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let bus = start_bus(&server, &["s"]).await;
    let mut p = TestPlugin::new("s", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.start(&server).await;
    wait_registered(&bus, &["s"]).await;
    publisher(&client)
        .publish(&entry_event(Hook::EntryAfterCreate, "customer", 1))
        .await
        .unwrap();
    assert_eventually!(bus.stats.events_acked.get() == 1, WAIT);
    let ask = |subject: &'static str| {
        let client = client.clone();
        async move {
            let reply = client.request(subject, "".into()).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    let stats = ask("pagoda.bus.stats").await;
    assert_eq!(stats["events_acked"], 1);
    assert_eq!(stats["delivered"], 1);
    let registry = ask("pagoda.bus.registry").await;
    assert_eq!(registry["plugins"]["s"]["enabled_rank"], 0);
    let unknown = ask("pagoda.bus.nope").await;
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("unknown status subject 'pagoda.bus.nope'")
    );
    bus.stop().await.unwrap();
}

/// Two buses that both dispatch the same consumer, as when one lost its lease
/// and has not noticed yet (here: leases off). On NATS 2.11 and newer the
/// consumer is pinned to one of them, so only it dispatches (order per object
/// holds); when it stops it unpins and the other takes over at once, long before
/// the pin would time out. A consumer made without pinning (by an older bus) is
/// made pinned. On 2.10 the consumer has no priority group (and two lease-less
/// buses are not run: the lease alone keeps the second out there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dispatcher_on_a_pinned_consumer_stands_by() {
    use async_nats::jetstream::consumer::PriorityPolicy;
    use hookbus::dispatch::{PIN_GROUP, PIN_TIMEOUT, supports_pinning};

    init_tracing();
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let log = CallLog::default();
    let mut config = test_config(&["p"]);
    config.dispatcher.lease = false;
    // The consumer as a bus without pinning made it: the first bus makes it pinned.
    let js = jetstream::new(client.clone());
    hookbus::provision::provision(&js, &config.subjects, &config.streams)
        .await
        .unwrap();
    js.get_stream(Subjects::default().events_stream())
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("dispatcher".into()),
            filter_subject: Subjects::default().all_events(),
            // Not what a bus would choose today: the update keeps it (a start
            // cannot be changed on an existing consumer).
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: 1,
            },
            ack_wait: config.dispatcher.ack_wait,
            max_ack_pending: 2048,
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .unwrap();
    let a = Bus::start(
        server.connect_as(hookbus_tests::BUS_USER).await,
        config.clone(),
    )
    .await
    .unwrap();
    let dispatcher_consumer = || async {
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_stream(Subjects::default().events_stream())
            .await
            .unwrap()
            .get_consumer("dispatcher")
            .await
            .unwrap();
        consumer.info().await.unwrap().config.clone()
    };
    if !supports_pinning(&client) {
        // 2.10: no priority groups; the lease alone keeps a second bus out (two
        // lease-less buses on one consumer are not supported there).
        assert_eventually!(a.stats.is_running(), WAIT);
        let config = dispatcher_consumer().await;
        assert_eq!(config.priority_policy, PriorityPolicy::None);
        assert!(config.priority_groups.is_empty());
        a.stop().await.unwrap();
        return;
    }
    let b = Bus::start(server.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    let mut p = TestPlugin::new("p", &log).handler("h", Hook::EntryAfterCreate, None, 100);
    p.set("h", Behaviour::Slow(Duration::from_millis(1)));
    p.start(&server).await;
    wait_registered(&a, &["p"]).await;
    wait_registered(&b, &["p"]).await;
    // Both pull (each unpinned once at its start) before any event flows.
    assert_eventually!(a.stats.is_running() && b.stats.is_running(), WAIT);
    let publisher = publisher(&client);
    publish_entries(&publisher, Hook::EntryAfterCreate, (0..200).map(|i| i % 10)).await;
    let acked = |bus: &Bus| bus.stats.events_acked.get();
    assert_eventually!(acked(&a) + acked(&b) == 200, WAIT);

    let info = dispatcher_consumer().await;
    assert_eq!(info.priority_policy, PriorityPolicy::PinnedClient);
    assert_eq!(info.priority_groups, vec![PIN_GROUP.to_owned()]);
    let (na, nb) = (acked(&a), acked(&b));
    assert!(
        na == 0 || nb == 0,
        "one dispatcher is pinned and dispatches everything: a {na}, b {nb}"
    );
    assert_in_order_per_object(&log, "p", 200);

    let (active, standby) = if na > 0 { (a, b) } else { (b, a) };
    active.stop().await.unwrap();
    publish_entries(&publisher, Hook::EntryAfterCreate, (0..50).map(|i| i % 10)).await;
    assert_eventually!(
        acked(&standby) == 50,
        PIN_TIMEOUT / 3,
        "the standby took over at once (unpinned when the active one stopped)"
    );
    standby.stop().await.unwrap();
}
