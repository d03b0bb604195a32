//! The model store, the transactional outbox and the relay, on SQLite and on
//! PostgreSQL, against a real nats-server: nothing lost, nothing published twice,
//! per-object order, through relay crashes, NATS outages and a second relay.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use common::{CallLog, TestPlugin, start_bus, wait_registered};
use core_events::{AttrType, Envelope, Hook, Subjects, sample};
use futures::StreamExt;
use hookbus::config::StreamSettings;
use hookbus::relay::{Relay, RelaySettings, RelayStats};
use hookbus_tests::{NatsServer, TestDb, stream_events, wait_until};
use serde_json::{Value, json};
use store::{
    Backend, EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry, Store, StoreError,
    WriteContext, outbox,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

struct RunningRelay {
    stop: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<RelayStats>,
}

impl RunningRelay {
    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// A relay as the host runs it: provisioned by the operator, relaying as the
/// host's own user.
async fn start_relay(store: &Store, nats: &NatsServer) -> RunningRelay {
    let subjects = Subjects::default();
    hookbus::provision::provision(
        &jetstream::new(nats.connect().await),
        &subjects,
        &StreamSettings::default(),
    )
    .await
    .unwrap();
    let js = jetstream::new(nats.connect_as(hookbus_tests::HOST_USER).await);
    let mut settings = RelaySettings::for_backend(store.backend());
    settings.backoff_max = Duration::from_millis(500);
    let relay = Relay::new(store.clone(), js, subjects, settings);
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { relay.run(token).await.unwrap() });
    RunningRelay { stop, task, stats }
}

async fn outbox_rows(store: &Store) -> i64 {
    outbox::backlog(store.pool()).await.unwrap().rows
}

async fn wait_drained(store: &Store, client: &async_nats::Client, expected: u64) {
    let js = jetstream::new(client.clone());
    wait_until(WAIT, || async {
        outbox_rows(store).await == 0
            && hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await >= expected
    })
    .await;
}

fn backends() -> [Backend; 2] {
    [Backend::Sqlite, Backend::Postgres]
}

#[tokio::test]
async fn every_write_emits_its_event_once_in_order_on_both_databases() {
    for backend in backends() {
        let nats = NatsServer::start().await;
        let client = nats.connect().await;
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let relay = start_relay(&store, &nats).await;
        let ctx = WriteContext::default();

        let entity = store
            .create_entity(
                &NewEntity::named("customer")
                    .attr(NewAttr::new("age", AttrType::NUMBER))
                    .attr(NewAttr::new("tags", AttrType::ARRAY_STRING)),
                &ctx,
            )
            .await
            .unwrap();
        let entry = store
            .create_entry(
                entity.id,
                &NewEntry::named("ACME").value("age", json!(3)),
                &ctx,
            )
            .await
            .unwrap();
        let changes = EntryChanges {
            attrs: [("age".to_owned(), json!(4))].into(),
            ..Default::default()
        };
        store.update_entry(entry.id, &changes, &ctx).await.unwrap();
        store.delete_entry(entry.id, &ctx).await.unwrap();
        store.restore_entry(entry.id, &ctx).await.unwrap();
        store
            .update_entity(
                entity.id,
                &EntityChanges {
                    note: Some("VIP".into()),
                    ..Default::default()
                },
                &ctx,
            )
            .await
            .unwrap();

        wait_drained(&store, &client, 6).await;
        let events = stream_events(&client).await;
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        // Entity events and entry events are different objects; each keeps its order.
        let entry_types: Vec<&str> = types
            .iter()
            .copied()
            .filter(|t| t.starts_with("pagoda.entry."))
            .collect();
        assert_eq!(
            entry_types,
            [
                "pagoda.entry.after_create",
                "pagoda.entry.after_update",
                "pagoda.entry.after_delete",
                "pagoda.entry.after_restore"
            ],
            "{backend:?}"
        );
        assert_eq!(events.len(), 6, "{backend:?}: {types:?}");
        let update = events
            .iter()
            .find(|e| e.event_type == "pagoda.entry.after_update")
            .unwrap();
        assert_eq!(update.data["entry"]["attrs"][0]["value"], json!(4));
        assert_eq!(update.data["previous"]["attrs"][0]["value"], json!(3));
        assert_eq!(relay.stats.published.load(Ordering::Relaxed), 6);
        relay.shutdown().await;
    }
}

#[tokio::test]
async fn bad_writes_are_refused_with_every_reason_and_emit_nothing() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let ctx = WriteContext::default();
        let mut new = NewEntity::named("server").attr(NewAttr::new("cpu", AttrType::NUMBER));
        new.attrs[0].is_mandatory = true;
        let entity = store.create_entity(&new, &ctx).await.unwrap();
        let dup = store.create_entity(&NewEntity::named("server"), &ctx).await;
        assert!(
            matches!(&dup, Err(StoreError::Conflict(m)) if m.contains("'server' already exists")),
            "{dup:?}"
        );
        let bad = store
            .create_entry(entity.id, &NewEntry::named("").value("ram", json!(1)), &ctx)
            .await;
        let Err(StoreError::Invalid(problems)) = bad else {
            panic!("{bad:?}")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p == "entry name is required"));
        assert!(problems.iter().any(|p| p.contains("no attribute 'ram'")));
        assert!(problems.iter().any(|p| p == "attribute 'cpu' is mandatory"));
        let wrong = store
            .create_entry(
                entity.id,
                &NewEntry::named("a").value("cpu", json!("many")),
                &ctx,
            )
            .await;
        assert!(
            matches!(&wrong, Err(StoreError::Invalid(p)) if p[0].contains("takes a number")),
            "{wrong:?}"
        );
        let missing = store
            .update_entry(999, &EntryChanges::default(), &ctx)
            .await;
        assert!(matches!(missing, Err(StoreError::NotFound { .. })));
        // Only the entity's creation made an event.
        assert_eq!(outbox_rows(&store).await, 1, "{backend:?}");
    }
}

#[tokio::test]
async fn rolled_back_transaction_publishes_nothing_committed_one_exactly_once() {
    for backend in backends() {
        let nats = NatsServer::start().await;
        let client = nats.connect().await;
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let relay = start_relay(&store, &nats).await;

        let rolled_back = sample::entry_event(Hook::EntryAfterCreate, "customer", 1);
        let mut tx = store.begin().await.unwrap();
        outbox::insert_envelope(&mut tx, &rolled_back)
            .await
            .unwrap();
        tx.rollback().await.unwrap();

        let committed = sample::entry_event(Hook::EntryAfterCreate, "customer", 2);
        let mut tx = store.begin().await.unwrap();
        outbox::insert_envelope(&mut tx, &committed).await.unwrap();
        tx.commit().await.unwrap();
        store.outbox_written().notify_one();

        wait_drained(&store, &client, 1).await;
        relay.shutdown().await;
        // A second relay over the same (now empty) outbox adds nothing.
        let again = start_relay(&store, &nats).await;
        again.shutdown().await;
        let ids: Vec<String> = stream_events(&client)
            .await
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, [committed.id.to_string()], "{backend:?}");
    }
}

#[tokio::test]
async fn row_inserted_with_plain_sql_is_published_and_dispatched() {
    for backend in backends() {
        let nats = NatsServer::start().await;
        let client = nats.connect().await;
        let bus = start_bus(&nats, &["listener"]).await;
        let log = CallLog::default();
        let mut plugin =
            TestPlugin::new("listener", &log).handler("h", Hook::EntryAfterCreate, None, 100);
        plugin.start(&nats).await;
        wait_registered(&bus, &["listener"]).await;
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let relay = start_relay(&store, &nats).await;

        // What a host in another language does (docs/outbox.md), with its own client.
        let event = sample::entry_event(Hook::EntryAfterCreate, "顧客 list", 77);
        let payload = serde_json::to_string(&event).unwrap();
        let sql = "INSERT INTO hookbus_outbox (event_id, hook, entity, object, payload) \
                   VALUES ($1, 'after_create_entry_v2', '顧客 list', 'entry/77', $2)";
        sqlx::query(sql)
            .bind(event.id.to_string())
            .bind(&payload)
            .execute(store.writer())
            .await
            .unwrap();

        wait_until(WAIT, || async { log.count("listener", "h") == 1 }).await;
        let call = &log.all()[0];
        assert_eq!(call.event_id, event.id.to_string());
        assert_eq!(call.object, "entry/77");
        let stored = stream_events(&client).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].pagodaentity, "顧客 list");
        relay.shutdown().await;
        plugin.stop();
        bus.stop().await.unwrap();
    }
}

#[tokio::test]
async fn unpublishable_row_is_dead_lettered_and_the_rest_flows() {
    let nats = NatsServer::start().await;
    let client = nats.connect().await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let relay = start_relay(&store, &nats).await;
    sqlx::query(
        "INSERT INTO hookbus_outbox (event_id, hook, entity, object, payload) \
         VALUES ('not-a-uuid', 'entry.after_craete', 'x', 'entry/1', '{')",
    )
    .execute(store.writer())
    .await
    .unwrap();
    // A payload larger than the stream takes (1 MiB): dead-lettered, not retried forever.
    let mut huge = sample::entry_event(Hook::EntryAfterCreate, "customer", 6);
    huge.data.entry.note = "x".repeat(1_100_000);
    let mut tx = store.begin().await.unwrap();
    outbox::insert_envelope(&mut tx, &huge).await.unwrap();
    tx.commit().await.unwrap();
    let good = sample::entry_event(Hook::EntryAfterCreate, "customer", 5);
    let mut tx = store.begin().await.unwrap();
    outbox::insert_envelope(&mut tx, &good).await.unwrap();
    tx.commit().await.unwrap();
    wait_drained(&store, &client, 1).await;
    let js = jetstream::new(client.clone());
    let letters = hookbus::dlq::list(
        &js,
        &Subjects::default(),
        &hookbus::dlq::Filter::plugin("_relay"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 2);
    let huge_letter = letters
        .iter()
        .find(|l| l.body["event_id"] == huge.id.to_string())
        .expect("the oversized row is dead-lettered");
    assert!(
        huge_letter.body["error"]
            .as_str()
            .unwrap()
            .contains("larger than the events stream takes"),
        "{}",
        huge_letter.body
    );
    let letter = letters
        .iter()
        .find(|l| l.body["event_id"] == "not-a-uuid")
        .unwrap();
    let error = letter.body["error"].as_str().unwrap();
    assert!(error.contains("entry.after_craete"), "{error}");
    assert!(
        error.contains("did you mean 'entry.after_create'"),
        "{error}"
    );
    assert_eq!(relay.stats.invalid.load(Ordering::Relaxed), 2);
    relay.shutdown().await;
}

/// Writes `n` changes over `objects` entries: each an outbox row whose payload
/// carries the change's number for its object, a few rows per transaction.
async fn burst(store: Store, objects: i64, n: i64) {
    let mut per_object = vec![0_i64; usize::try_from(objects).unwrap()];
    let mut i = 0;
    while i < n {
        let mut tx = store.begin().await.unwrap();
        for _ in 0..5.min(n - i) {
            let object = (i * 7919) % objects;
            let k = &mut per_object[usize::try_from(object).unwrap()];
            let mut env = sample::entry_event(Hook::EntryAfterUpdate, "burst", object + 1);
            env.data.entry.note = k.to_string();
            *k += 1;
            outbox::insert_envelope(&mut tx, &env).await.unwrap();
            i += 1;
        }
        tx.commit().await.unwrap();
        store.outbox_written().notify_one();
    }
}

/// Exactly `n` events, no id twice, each object's changes numbered 0, 1, 2, … in stream order.
fn assert_complete_and_ordered(events: &[Envelope<Value>], n: usize) {
    let ids: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids.len(), events.len(), "an event was published twice");
    assert_eq!(events.len(), n, "events lost or added");
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        let k: u64 = e.data["entry"]["note"].as_str().unwrap().parse().unwrap();
        let object = e
            .subject
            .clone()
            .expect("every relayed event has a subject");
        let expected = next.entry(object.clone()).or_insert(0);
        assert_eq!(k, *expected, "object {object} out of order");
        *expected += 1;
    }
}

/// A `hookbus relay` process, killed on drop (also when the test fails).
struct RelayProcess(Child);

impl RelayProcess {
    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_relay_process(nats: &NatsServer, db: &TestDb) -> RelayProcess {
    RelayProcess(
        Command::new(hookbus_tests::hookbus_binary())
            .args(["relay", "--database-url", db.url()])
            .envs(nats.env_for(hookbus_tests::HOST_USER))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn relay_killed_at_random_points_loses_and_duplicates_nothing() {
    const N: i64 = 10_000;
    for backend in backends() {
        let nats = NatsServer::start().await;
        let client = nats.connect().await;
        let js = jetstream::new(client.clone());
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let writer = tokio::spawn(burst(store.clone(), 300, N));
        let mut relay = spawn_relay_process(&nats, &db);
        wait_until(WAIT, || async {
            js.get_stream("PAGODA_EVENTS").await.is_ok()
        })
        .await;
        let mut kills = 0;
        let mut seed = 0x9e37_79b9_u64;
        while kills < 4 {
            // Kill once the stream has grown by a pseudo-random amount since the last kill.
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let step = 300 + (seed >> 33) % 1500;
            let start = hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await;
            let grew = hookbus_tests::poll_until(Duration::from_secs(30), || async {
                hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await >= start + step
                    || (writer.is_finished() && outbox_rows(&store).await == 0)
            })
            .await;
            assert!(grew, "{backend:?}: the relay made no progress");
            relay.kill();
            kills += 1;
            relay = spawn_relay_process(&nats, &db);
        }
        writer.await.unwrap();
        wait_drained(&store, &client, u64::try_from(N).unwrap()).await;
        relay.kill();
        let events = stream_events(&client).await;
        assert_complete_and_ordered(&events, usize::try_from(N).unwrap());
    }
}

#[tokio::test]
async fn nats_down_during_a_burst_loses_and_duplicates_nothing() {
    const N: i64 = 3_000;
    for backend in backends() {
        let mut nats = NatsServer::start().await;
        let client = nats.connect().await;
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let relay = start_relay(&store, &nats).await;
        let writer = tokio::spawn(burst(store.clone(), 50, N));
        let js = jetstream::new(client.clone());
        wait_until(WAIT, || async {
            hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await >= 500
        })
        .await;
        nats.stop().await;
        // Writes keep committing while NATS is down; the relay reports its backlog.
        let stats = Arc::clone(&relay.stats);
        wait_until(WAIT, || async {
            !stats.healthy.load(Ordering::Relaxed) && outbox_rows(&store).await > 0
        })
        .await;
        writer.await.unwrap();
        let waiting = outbox_rows(&store).await;
        assert!(
            waiting > 0,
            "{backend:?}: nothing waited while NATS was down"
        );
        // The relay reports the backlog it cannot publish.
        wait_until(WAIT, || async {
            stats.backlog_rows.load(Ordering::Relaxed) > 0
        })
        .await;
        // The outage itself: NATS stays down a few seconds (not a synchronisation).
        tokio::time::sleep(Duration::from_secs(3)).await;
        nats.restart().await;
        wait_drained(&store, &client, u64::try_from(N).unwrap()).await;
        let events = stream_events(&client).await;
        assert_complete_and_ordered(&events, usize::try_from(N).unwrap());
        assert!(relay.stats.errors.load(Ordering::Relaxed) > 0);
        relay.shutdown().await;
    }
}

#[tokio::test]
async fn two_relays_on_one_database_never_duplicate_or_reorder() {
    const N: i64 = 4_000;
    for backend in backends() {
        let nats = NatsServer::start().await;
        let client = nats.connect().await;
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        // The second relay has its own pool, like a second process.
        let other_store = Store::connect(db.url()).await.unwrap();
        let a = start_relay(&store, &nats).await;
        let b = start_relay(&other_store, &nats).await;
        burst(store.clone(), 40, N).await;
        other_store.outbox_written().notify_one();
        wait_drained(&store, &client, u64::try_from(N).unwrap()).await;
        let events = stream_events(&client).await;
        assert_complete_and_ordered(&events, usize::try_from(N).unwrap());
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test]
async fn bus_with_a_database_relays_its_outbox_and_reports_the_relay() {
    let nats = NatsServer::start().await;
    let client = nats.connect().await;
    let db = TestDb::sqlite();
    let mut config = common::test_config(&["listener"]);
    config.database_url = Some(db.url().to_owned());
    let bus = hookbus::run::Bus::start(nats.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    let log = CallLog::default();
    let mut plugin =
        TestPlugin::new("listener", &log).handler("h", Hook::EntityAfterCreate, None, 100);
    plugin.start(&nats).await;
    wait_registered(&bus, &["listener"]).await;

    // The host is another process: its own store on the same file (the relay
    // finds its rows by polling).
    let host = db.store().await;
    host.create_entity(&NewEntity::named("customer"), &WriteContext::default())
        .await
        .unwrap();
    wait_until(WAIT, || async { log.count("listener", "h") == 1 }).await;

    let stats = wait_for_relay_stats(&client).await;
    assert_eq!(stats["published"], 1, "{stats}");
    assert_eq!(stats["healthy"], true);
    let report = bus.health.report();
    assert!(report.is_ok());
    assert_eq!(report.relay.unwrap()["published"], 1);
    wait_until(WAIT, || async {
        bus.metrics.relay().backlog_rows.get() == 0 && outbox_rows(&host).await == 0
    })
    .await;
    plugin.stop();
    bus.stop().await.unwrap();
}

async fn wait_for_relay_stats(client: &async_nats::Client) -> Value {
    hookbus_tests::wait_for(WAIT, || async {
        let reply = client.request("pagoda.bus.stats", "".into()).await.ok()?;
        let v: Value = serde_json::from_slice(&reply.payload).ok()?;
        (v["relay"]["published"] == 1).then(|| v["relay"].clone())
    })
    .await
}

#[tokio::test]
async fn relay_that_cannot_read_its_database_makes_the_bus_unhealthy_and_alerts_once() {
    let nats = NatsServer::start().await;
    let client = nats.connect().await;
    let db = TestDb::postgres().await;
    db.store().await;
    let mut config = common::test_config(&[]);
    config.database_url = Some(db.url().to_owned());
    config.monitor.interval = Duration::from_millis(100);
    let mut alerts = client
        .subscribe("pagoda.alerts._relay.backlog")
        .await
        .unwrap();
    let bus = hookbus::run::Bus::start(nats.connect_as(hookbus_tests::BUS_USER).await, config)
        .await
        .unwrap();
    wait_until(WAIT, || async { bus.health.report().is_ok() }).await;

    // The database goes away under the relay.
    let name = db.url().rsplit('/').next().unwrap().to_owned();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&hookbus_tests::db::postgres_admin_url())
            .await
            .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();

    let alert = tokio::time::timeout(WAIT, alerts.next())
        .await
        .expect("no relay alert")
        .unwrap();
    let alert: Value = serde_json::from_slice(&alert.payload).unwrap();
    assert_eq!(alert["kind"], "backlog", "{alert}");
    assert_eq!(alert["state"], "firing", "{alert}");
    assert!(!bus.health.report().is_ok());
    assert_eq!(bus.health.report().relay.unwrap()["database_ok"], false);
    // Once per state change: no second alert while it stays down.
    let again = tokio::time::timeout(Duration::from_millis(500), alerts.next()).await;
    assert!(again.is_err(), "alert repeated: {again:?}");
    bus.stop().await.unwrap();
}

/// A row the relay can neither publish nor dead-letter (here: its user may not
/// publish dead letters) is kept in the outbox and tried again later with a
/// back-off, counted and logged, while the rows behind it are published.
#[tokio::test]
async fn row_that_cannot_even_be_dead_lettered_is_kept_and_the_rest_flows() {
    for backend in backends() {
        let nats = NatsServer::start_with_config(
            r#"authorization { users = [
                { user: "relay", password: "pw", permissions: {
                    publish: { allow: ["pagoda.events.>", "$JS.API.>"] },
                    subscribe: { allow: ["_INBOX.>"] } } },
                { user: "admin", password: "pw" }
            ] }"#,
        )
        .await;
        let connect = |user: &str| {
            async_nats::ConnectOptions::with_user_and_password(user.into(), "pw".into())
                .connect(nats.url())
        };
        let relay_client = connect("relay").await.unwrap();
        let admin = jetstream::new(connect("admin").await.unwrap());
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let subjects = Subjects::default();
        hookbus::provision::provision(
            &jetstream::new(relay_client.clone()),
            &subjects,
            &StreamSettings::default(),
        )
        .await
        .unwrap();
        // A failed dead letter is known once its ack times out.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(500))
            .ack_timeout(Duration::from_millis(500))
            .build(relay_client);
        let mut settings = RelaySettings::for_backend(backend);
        settings.backoff_min = Duration::from_millis(100);
        settings.backoff_max = Duration::from_millis(300);
        let metrics = hookbus::metrics::Metrics::new(Arc::default());
        let relay =
            Relay::new(store.clone(), js, subjects, settings).with_gauges(metrics.relay().clone());
        let stats = relay.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.run(stop.clone()));

        sqlx::query(
            "INSERT INTO hookbus_outbox (event_id, hook, entity, object, payload) \
             VALUES ('0193a5f0-8c1e-7d2a-9b4f-5e6d7c8b9a01', 'entry.after_craete', 'x', 'entry/1', '{}')",
        )
        .execute(store.writer())
        .await
        .unwrap();
        for id in 1..=3 {
            let mut tx = store.begin().await.unwrap();
            let event = sample::entry_event(Hook::EntryAfterCreate, "customer", id);
            outbox::insert_envelope(&mut tx, &event).await.unwrap();
            tx.commit().await.unwrap();
        }
        store.outbox_written().notify_one();

        wait_until(WAIT, || async {
            hookbus_tests::stream_len(&admin, "PAGODA_EVENTS").await == 3
                && stats.parked.load(Ordering::Relaxed) == 1
        })
        .await;
        // Tried again, still kept: never lost, never in the way.
        wait_until(WAIT, || async {
            stats.dead_letter_failures.load(Ordering::Relaxed) >= 2
        })
        .await;
        let kept: Vec<String> = sqlx::query_scalar("SELECT hook FROM hookbus_outbox")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(kept, ["entry.after_craete"], "{backend:?}");
        assert_eq!(stats.invalid.load(Ordering::Relaxed), 0);
        assert_eq!(stats.published.load(Ordering::Relaxed), 3);
        assert_eq!(stats.to_json()["parked"], 1);
        wait_until(WAIT, || async {
            metrics.encode().contains("hookbus_relay_parked_rows 1")
        })
        .await;
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

/// The DDL blocks of docs/outbox.md: (PostgreSQL, SQLite).
fn documented_ddl() -> (String, String) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/outbox.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let block_after = |marker: &str| {
        let at = doc
            .find(marker)
            .unwrap_or_else(|| panic!("docs/outbox.md has no '{marker}'"));
        let rest = &doc[at..];
        let open = rest.find("```sql\n").unwrap() + "```sql\n".len();
        let len = rest[open..].find("```").unwrap();
        rest[open..open + len].to_owned()
    };
    (block_after("\nPostgreSQL:\n"), block_after("\nSQLite ("))
}

/// The tables of a database, but SQLite's own.
async fn tables(store: &Store) -> Vec<String> {
    let sql = match store.backend() {
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' ORDER BY name"
        }
        Backend::Postgres => {
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1"
        }
    };
    sqlx::query_scalar(sql)
        .fetch_all(store.pool())
        .await
        .unwrap()
}

/// A host in another language owns its schema: it creates the outbox table with
/// the DDL of docs/outbox.md (taken from the page itself), and the real
/// `hookbus relay`, as the host user of the generated permissions, publishes
/// the rows it inserts by hand, creating no table of its own.
#[tokio::test]
async fn relay_binary_needs_only_the_documented_outbox_table_and_creates_nothing() {
    let (postgres_ddl, sqlite_ddl) = documented_ddl();
    for backend in backends() {
        let server = common::start_server(&[]).await;
        let (bus, _) = common::connect(&server, hookbus::nats_config::BUS_USER).await;
        let db = TestDb::new(backend).await;
        let store = Store::connect(db.url()).await.unwrap();
        let ddl = match backend {
            Backend::Sqlite => &sqlite_ddl,
            Backend::Postgres => &postgres_ddl,
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl.as_str()))
            .execute(store.writer())
            .await
            .unwrap_or_else(|e| panic!("{backend:?}: the documented DDL fails: {e}"));
        assert_eq!(tables(&store).await, ["hookbus_outbox"]);

        let user = hookbus::nats_config::HOST_USER;
        let mut relay = RelayProcess(
            Command::new(hookbus_tests::hookbus_binary())
                .args(["relay", "--database-url", db.url()])
                .env("NATS_URL", server.url())
                .env("NATS_USER", user)
                .env("NATS_PASSWORD", common::password(user))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let event = sample::entry_event(Hook::EntryAfterCreate, "customer", 7);
        sqlx::query(
            "INSERT INTO hookbus_outbox (event_id, hook, entity, object, payload) \
             VALUES ($1, 'entry.after_create', 'customer', 'entry/7', $2)",
        )
        .bind(event.id.to_string())
        .bind(serde_json::to_string(&event).unwrap())
        .execute(store.writer())
        .await
        .unwrap();
        let js = jetstream::new(bus.clone());
        // The relay provisions the streams too; done here so they can be read at once.
        hookbus::provision::provision(&js, &Subjects::default(), &StreamSettings::default())
            .await
            .unwrap();
        wait_until(WAIT, || async {
            hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await == 1
                && outbox_rows(&store).await == 0
        })
        .await;
        assert!(
            relay.0.try_wait().unwrap().is_none(),
            "{backend:?}: the relay exited"
        );
        assert_eq!(tables(&store).await, ["hookbus_outbox"], "{backend:?}");
        let stored = stream_events(&bus).await;
        assert_eq!(stored[0].id, event.id);
        relay.kill();
    }
}

/// An outbox table without the contract's columns stops `hookbus relay` with
/// the missing columns named.
#[tokio::test]
async fn relay_binary_names_the_missing_columns_of_a_wrong_outbox_table() {
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let store = Store::connect(db.url()).await.unwrap();
    sqlx::query("CREATE TABLE hookbus_outbox (id INTEGER PRIMARY KEY, payload TEXT)")
        .execute(store.writer())
        .await
        .unwrap();
    let mut relay = Command::new(hookbus_tests::hookbus_binary())
        .args(["relay", "--database-url", db.url()])
        .envs(server.env_for(hookbus_tests::HOST_USER))
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = relay.stderr.take().unwrap();
    let mut guard = RelayProcess(relay);
    wait_until(WAIT, || {
        let exited = guard.0.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    let status = guard.0.wait().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    assert!(!status.success());
    assert!(
        text.contains("no column event_id, hook, entity, object, traceparent, created_at"),
        "{text}"
    );
}

/// A batch of creations (the host's group commit) with one event larger than
/// the store's limit: that creation alone is refused and leaves nothing; the
/// others are written with their events.
#[tokio::test]
async fn batch_with_an_event_too_large_refuses_only_that_creation() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let store = db.store().await.with_max_event_bytes(4096);
        let ctx = WriteContext::default();
        let entity = store
            .create_entity(&NewEntity::named("customer"), &ctx)
            .await
            .unwrap();
        let input = |name: &str, note: usize| store::NewEntryInput {
            entity_id: entity.id,
            entry: NewEntry {
                note: "x".repeat(note),
                ..NewEntry::named(name)
            },
            ctx: ctx.clone(),
        };
        let results = store
            .create_entries(&[input("a", 10), input("b", 5000), input("c", 10)])
            .await;
        assert!(results[0].is_ok(), "{backend:?}: {:?}", results[0]);
        assert!(
            matches!(&results[1], Err(StoreError::EventTooLarge { size, limit: 4096, hook })
                if *size > 4096 && hook == "entry.after_create"),
            "{backend:?}: {:?}",
            results[1].as_ref().map(|e| &e.name)
        );
        assert!(results[2].is_ok(), "{backend:?}: {:?}", results[2]);
        let names: Vec<String> = store
            .list_entries(entity.id, true)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a", "c"], "{backend:?}");
        // The entity's event and those of a and c.
        assert_eq!(outbox_rows(&store).await, 3, "{backend:?}");
    }
}

/// A row the stream refuses for good (its largest message was lowered after the
/// relay started) is dead-lettered when the publish fails, not retried forever,
/// and the rows behind it are published.
#[tokio::test]
async fn row_the_stream_refuses_for_good_is_dead_lettered_and_the_rest_flows() {
    let nats = NatsServer::start().await;
    let client = nats.connect().await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let relay = start_relay(&store, &nats).await;
    // The relay runs (it has read the stream's limits) once it published a first row.
    let first = sample::entry_event(Hook::EntryAfterCreate, "customer", 3);
    let mut tx = store.begin().await.unwrap();
    outbox::insert_envelope(&mut tx, &first).await.unwrap();
    tx.commit().await.unwrap();
    store.outbox_written().notify_one();
    wait_drained(&store, &client, 1).await;
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream("PAGODA_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 8 * 1024;
    js.update_stream(config).await.unwrap();

    let mut big = sample::entry_event(Hook::EntryAfterCreate, "customer", 1);
    big.data.entry.note = "x".repeat(20_000);
    for event in [
        big.clone(),
        sample::entry_event(Hook::EntryAfterCreate, "customer", 2),
    ] {
        let mut tx = store.begin().await.unwrap();
        outbox::insert_envelope(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
    }
    store.outbox_written().notify_one();
    wait_drained(&store, &client, 2).await;
    let letters = hookbus::dlq::list(
        &js,
        &Subjects::default(),
        &hookbus::dlq::Filter::plugin("_relay"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body["event_id"], big.id.to_string());
    let error = letters[0].body["error"].as_str().unwrap();
    assert!(error.contains("maximum"), "{error}");
    assert_eq!(hookbus_tests::stream_len(&js, "PAGODA_EVENTS").await, 2);
    relay.shutdown().await;
}
