//! The stream is a complete record: a random mix of thousands of writes, relayed
//! into the stream and replayed into an empty store, gives the same entities,
//! attribute definitions, entries, values and deleted/restored states.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use async_nats::jetstream;
use core_events::{AttrType, Subjects};
use hookbus::config::StreamSettings;
use hookbus::relay::{Relay, RelaySettings};
use hookbus_tests::{NatsServer, TestDb, wait_until};
use serde_json::{Value, json};
use store::{
    AttrChange, Backend, EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry, Store,
    StoreError, WriteContext, outbox,
};
use tokio_util::sync::CancellationToken;

/// A small deterministic generator (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
}

const TYPES: [AttrType; 5] = [
    AttrType::STRING,
    AttrType::NUMBER,
    AttrType::BOOLEAN,
    AttrType::ARRAY_STRING,
    AttrType::DATE,
];

fn value_for(t: AttrType, rng: &mut Rng) -> Value {
    match t {
        AttrType::NUMBER => json!(rng.below(1000)),
        AttrType::BOOLEAN => json!(rng.below(2) == 1),
        AttrType::ARRAY_STRING => json!([format!("t{}", rng.below(9)), "x"]),
        AttrType::DATE => json!(format!(
            "2026-{:02}-{:02}",
            rng.below(12) + 1,
            rng.below(28) + 1
        )),
        _ => json!(format!("s{}", rng.below(100))),
    }
}

fn no_entry() -> StoreError {
    StoreError::NotFound {
        what: "entry",
        id: "(none yet)".into(),
    }
}

/// Applies `n` random writes; refusals (name taken, entity with entries) are part of the mix.
async fn random_writes(store: &Store, n: usize, seed: u64) -> usize {
    let mut rng = Rng(seed);
    let ctx = WriteContext::default();
    let mut entities: Vec<i64> = Vec::new();
    let mut entries: Vec<i64> = Vec::new();
    let mut ok = 0;
    for i in 0..n {
        let roll = if entities.is_empty() {
            0
        } else {
            rng.below(100)
        };
        let result: Result<(), StoreError> = async {
            match roll {
                0..=4 => {
                    let mut new = NewEntity::named(&format!("entity {}", rng.below(40)));
                    for k in 0..rng.below(4) {
                        new = new.attr(NewAttr::new(
                            &format!("a{k}"),
                            TYPES[rng.below(TYPES.len())],
                        ));
                    }
                    entities.push(store.create_entity(&new, &ctx).await?.id);
                }
                5..=9 => {
                    let id = *rng.pick(&entities).unwrap();
                    let entity = store.entity(id).await?;
                    let mut changes = EntityChanges::default();
                    match rng.below(3) {
                        0 => changes.name = Some(format!("entity {}", rng.below(40))),
                        1 => changes.attrs.push(AttrChange {
                            name: Some(format!("b{i}")),
                            attr_type: Some(TYPES[rng.below(TYPES.len())]),
                            ..Default::default()
                        }),
                        _ => {
                            if let Some(a) = rng.pick(&entity.attrs) {
                                changes.attrs.push(AttrChange {
                                    id: Some(a.id),
                                    is_deleted: true,
                                    ..Default::default()
                                });
                            }
                            changes.note = Some(format!("note {i}"));
                        }
                    }
                    store.update_entity(id, &changes, &ctx).await?;
                }
                10..=11 => {
                    let id = *rng.pick(&entities).unwrap();
                    if rng.below(2) == 0 {
                        store.delete_entity(id, &ctx).await?;
                    } else {
                        store.restore_entity(id, &ctx).await?;
                    }
                }
                12..=49 => {
                    let id = *rng.pick(&entities).unwrap();
                    let entity = store.entity(id).await?;
                    let mut new = NewEntry::named(&format!("entry {}", rng.below(200)));
                    for a in &entity.attrs {
                        if rng.below(3) > 0 {
                            new = new.value(&a.name, value_for(a.attr_type, &mut rng));
                        }
                    }
                    entries.push(store.create_entry(id, &new, &ctx).await?.id);
                }
                50..=84 => {
                    let Some(&id) = rng.pick(&entries) else {
                        return Err(no_entry());
                    };
                    let entry = store.entry(id).await?;
                    let entity = store.entity(entry.schema.id).await?;
                    let mut changes = EntryChanges::default();
                    if rng.below(4) == 0 {
                        changes.name = Some(format!("entry {}", rng.below(200)));
                    }
                    for a in &entity.attrs {
                        if rng.below(2) == 0 {
                            changes
                                .attrs
                                .insert(a.name.clone(), value_for(a.attr_type, &mut rng));
                        }
                    }
                    store.update_entry(id, &changes, &ctx).await?;
                }
                _ => {
                    let Some(&id) = rng.pick(&entries) else {
                        return Err(no_entry());
                    };
                    if rng.below(2) == 0 {
                        store.delete_entry(id, &ctx).await?;
                    } else {
                        store.restore_entry(id, &ctx).await?;
                    }
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => ok += 1,
            Err(StoreError::Conflict(_) | StoreError::NotFound { .. } | StoreError::Invalid(_)) => {
            }
            Err(e) => panic!("write {i} (seed {seed}): {e}"),
        }
    }
    ok
}

#[tokio::test]
async fn rebuilt_store_equals_the_original_after_thousands_of_random_writes() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let nats = NatsServer::start().await;
        let client = nats.connect().await;
        let js = jetstream::new(client.clone());
        let subjects = Subjects::default();
        hookbus::provision::provision(&js, &subjects, &StreamSettings::default())
            .await
            .unwrap();
        let original_db = TestDb::new(backend).await;
        let original = original_db.store().await;
        let stop = CancellationToken::new();
        let relay = Relay::new(
            original.clone(),
            js.clone(),
            subjects.clone(),
            RelaySettings::for_backend(backend),
        );
        let task = tokio::spawn(relay.run(stop.clone()));

        let seed = 0x5eed_0000_u64 + u64::from(backend == Backend::Postgres);
        let applied = random_writes(&original, 2_000, seed).await;
        assert!(applied > 1_000, "only {applied} writes succeeded");
        wait_until(Duration::from_secs(60), || async {
            outbox::backlog(original.pool()).await.unwrap().rows == 0
        })
        .await;
        stop.cancel();
        task.await.unwrap().unwrap();

        let rebuilt_db = TestDb::new(backend).await;
        let report =
            hookbus::outbox_cmd::rebuild(&js, &subjects, rebuilt_db.url(), false, |_, _| {})
                .await
                .unwrap();
        assert_eq!(
            report.events,
            u64::try_from(applied).unwrap(),
            "{backend:?}"
        );
        let rebuilt = rebuilt_db.store().await;
        let (a, b) = (
            original.snapshot().await.unwrap(),
            rebuilt.snapshot().await.unwrap(),
        );
        assert!(!a.entities.is_empty() && !a.entries.is_empty());
        assert!(
            a.entries.iter().any(|e| !e.is_active),
            "no deleted entry in the mix"
        );
        assert_eq!(a.entities, b.entities, "{backend:?} seed {seed}");
        assert_eq!(a.entries, b.entries, "{backend:?} seed {seed}");
        assert_eq!(a.values, b.values, "{backend:?} seed {seed}");

        // The rebuilt store takes new writes (ids continue after the rebuilt ones).
        let e = rebuilt
            .create_entity(&NewEntity::named("after rebuild"), &WriteContext::default())
            .await
            .unwrap();
        assert!(a.entities.iter().all(|x| x.id < e.id));
        // A second rebuild into a non-empty store is refused.
        let again =
            hookbus::outbox_cmd::rebuild(&js, &subjects, rebuilt_db.url(), false, |_, _| {}).await;
        assert!(again.unwrap_err().to_string().contains("not empty"));
    }
}

/// One event no reader can take (an attribute default 200 levels deep, past
/// serde_json's 128; the host refuses such input now, but a stream may hold
/// one) between two good ones: `hookbus rebuild` applies the good ones and
/// names the bad one by its sequence; `hookbus replay` and the SDK's
/// `replay_events` give all three; a plugin's `replay` runs its handler on the
/// good ones and dead-letters the bad one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_event_does_not_stop_a_rebuild_or_a_replay() {
    use core_events::{EntityAttr, Hook, sample};
    use futures::StreamExt;

    let nats = NatsServer::start().await;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    let subjects = Subjects::default();
    hookbus::provision::provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    let mut bad = sample::entity_event(Hook::EntityAfterCreate, 2, "bad");
    bad.data.entity.attrs = vec![EntityAttr {
        id: 1,
        name: "o".into(),
        attr_type: AttrType::OBJECT,
        is_mandatory: false,
        referral: vec![],
        index: 0,
        is_summarized: false,
        is_delete_in_chain: false,
        note: String::new(),
        default_value: Some(json!("DEEP")),
        is_active: true,
    }];
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let events = [
        (
            "good",
            serde_json::to_string(&sample::entity_event(Hook::EntityAfterCreate, 1, "good"))
                .unwrap(),
        ),
        (
            "bad",
            serde_json::to_string(&bad)
                .unwrap()
                .replace("\"DEEP\"", &deep),
        ),
        (
            "later",
            serde_json::to_string(&sample::entity_event(Hook::EntityAfterCreate, 3, "later"))
                .unwrap(),
        ),
    ];
    for (id, (name, payload)) in (1..).zip(events) {
        let subject = subjects.event(Hook::EntityAfterCreate, name, id).unwrap();
        js.publish(subject, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::new(backend).await;
        let report = hookbus::outbox_cmd::rebuild(&js, &subjects, db.url(), false, |_, _| {})
            .await
            .unwrap();
        assert_eq!((report.events, report.entity_events), (3, 2), "{backend:?}");
        assert_eq!(report.unreadable.len(), 1, "{backend:?}: {report:?}");
        let (seq, why) = &report.unreadable[0];
        assert_eq!(*seq, 2);
        assert!(why.contains("recursion limit exceeded"), "{why}");
        let names: Vec<String> = db
            .store()
            .await
            .list_entities(true)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["good", "later"], "{backend:?}");
    }

    let mut out = Vec::new();
    let summary = hookbus::replay_cmd::run(
        &client,
        &subjects,
        &hookbus::replay_cmd::ReplayCommand {
            from: pagoda_plugin_sdk::replay::ReplayFrom::Start,
            hooks: vec![],
            entities: vec![],
            objects: vec![],
            latest_per_object: false,
            follow: false,
            target: hookbus::replay_cmd::Target::Stdout,
            progress: false,
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(summary.events, 3);
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 3);
    let replayed: Vec<u64> = pagoda_plugin_sdk::replay::replay_events(
        &js,
        &subjects,
        pagoda_plugin_sdk::replay::ReplayOptions::default(),
    )
    .await
    .unwrap()
    .map(|e| e.unwrap().stream_seq)
    .collect()
    .await;
    assert_eq!(replayed, [1, 2, 3]);

    // A plugin's replay: its handler gets the two good events; the bad one,
    // which it cannot decode, is dead-lettered and the replay goes on.
    let seen: std::sync::Arc<std::sync::Mutex<Vec<u64>>> = std::sync::Arc::default();
    let record = seen.clone();
    let plugin = pagoda_plugin_sdk::Plugin::builder("rebuilder", "Rebuilder", "1.0.0")
        .on_entity(Hook::EntityAfterCreate, "created", move |ctx| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(ctx.stream_seq);
                Ok(())
            }
        })
        .build()
        .unwrap();
    let done = plugin
        .replay(
            &client,
            &subjects,
            pagoda_plugin_sdk::replay::ReplayFrom::Start,
        )
        .await
        .unwrap();
    assert_eq!(
        (done.events, done.dead_lettered, done.replayed_through),
        (3, 1, 3),
        "{done:?}"
    );
    assert_eq!(*seen.lock().unwrap(), [1, 3]);
}
