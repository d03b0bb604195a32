//! `hookbus demo`: makes a few model changes (through the store and its outbox
//! when given a database, else by publishing events directly) and shows how
//! their events were dispatched.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_nats::jetstream;
use core_events::store::{EntryChanges, NewAttr, NewEntity, NewEntry, Store, WriteContext};
use core_events::{
    AttrType, Entity, EntityEvent, Entry, EntryEvent, Envelope, Hook, Subjects, User, sample,
};
use futures::future::BoxFuture;
use hookbus::{EncodedEvent, Publisher};

use crate::cli::println_out;

/// One demo step: an event published directly, or a model change written
/// through the store (its event goes through the outbox and the relay).
enum Step {
    Publish(EncodedEvent),
    Write(String, BoxFuture<'static, Result<()>>),
}

/// The model changes of the demo, written with the store.
fn store_steps(store: &Store, user: &User) -> Vec<Step> {
    let ctx = WriteContext {
        user: Some(user.clone()),
        traceparent: None,
    };
    let step = |what: &str, f: BoxFuture<'static, Result<()>>| Step::Write(what.to_owned(), f);
    let (s, c) = (store.clone(), ctx.clone());
    let mut steps = vec![step(
        "entity helloworld created",
        Box::pin(async move {
            s.create_entity(&NewEntity::named("helloworld"), &c).await?;
            Ok(())
        }),
    )];
    let (s, c) = (store.clone(), ctx.clone());
    steps.push(step(
        "entity customer created",
        Box::pin(async move {
            s.create_entity(
                &NewEntity::named("customer")
                    .attr(NewAttr::new("email", AttrType::STRING))
                    .attr(NewAttr::new("rank", AttrType::NUMBER)),
                &c,
            )
            .await?;
            Ok(())
        }),
    ));
    let (s, c) = (store.clone(), ctx.clone());
    steps.push(step(
        "entry Hello created in helloworld",
        Box::pin(async move {
            let e = s.entity_by_name("helloworld").await?;
            s.create_entry(e.id, &NewEntry::named("Hello"), &c).await?;
            Ok(())
        }),
    ));
    let (s, c) = (store.clone(), ctx.clone());
    steps.push(step(
        "entry ACME created in customer",
        Box::pin(async move {
            let e = s.entity_by_name("customer").await?;
            let new = NewEntry::named("ACME")
                .value("email", serde_json::json!("info@acme.example"))
                .value("rank", serde_json::json!(1));
            s.create_entry(e.id, &new, &c).await?;
            Ok(())
        }),
    ));
    let (s, c) = (store.clone(), ctx.clone());
    steps.push(step(
        "entry ACME updated (rank 1 -> 2)",
        Box::pin(async move {
            let e = s.entity_by_name("customer").await?;
            let acme = s
                .list_entries(e.id, false)
                .await?
                .into_iter()
                .find(|x| x.name == "ACME")
                .ok_or_else(|| anyhow::anyhow!("entry ACME is missing"))?;
            let changes = EntryChanges {
                attrs: [("rank".to_owned(), serde_json::json!(2))].into(),
                ..Default::default()
            };
            s.update_entry(acme.id, &changes, &c).await?;
            Ok(())
        }),
    ));
    let (s, c) = (store.clone(), ctx);
    steps.push(step(
        "entity product created",
        Box::pin(async move {
            s.create_entity(&NewEntity::named("product"), &c).await?;
            Ok(())
        }),
    ));
    steps
}

pub(crate) async fn run(
    client: &async_nats::Client,
    subjects: &Subjects,
    plugins: &[String],
    timeout: Duration,
    database_url: Option<&str>,
) -> Result<ExitCode> {
    let store = match database_url {
        Some(url) => Some(hookbus::outbox_cmd::open_migrated(url).await?),
        None => None,
    };
    let deadline = Instant::now() + timeout;
    println_out(&format!(
        "demo: waiting for the bus to see plugins {plugins:?}"
    ));
    loop {
        let seen = registered(client, subjects).await.unwrap_or_default();
        let missing: Vec<_> = plugins.iter().filter(|p| !seen.contains(p)).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("plugins {missing:?} did not register within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let js = jetstream::new(client.clone());
    let publisher = Publisher::new(js.clone(), subjects.clone());
    let user = sample::user(1, "admin");
    let entity = sample::entity;
    let entry = sample::entry;
    let helloworld = entity(1, "helloworld");
    let customer = entity(2, "customer");
    let product = entity(3, "product");
    let source = "/pagoda/hookbus-demo";
    let entry_event = |hook, e: &Entity, en: Entry, previous| {
        Envelope::entry(
            hook,
            source,
            EntryEvent {
                entity: e.clone(),
                entry: en,
                previous,
                user: Some(user.clone()),
            },
        )
    };
    let acme = entry(20, "ACME", &customer);
    let mut acme_v2 = acme.clone();
    acme_v2.note = "updated".into();

    let product_event = Envelope::entity(
        Hook::EntityAfterCreate,
        source,
        EntityEvent {
            entity: product,
            previous: None,
            user: Some(user.clone()),
        },
    );
    let entry_events = [
        entry_event(
            Hook::EntryAfterCreate,
            &helloworld,
            entry(10, "Hello", &helloworld),
            None,
        ),
        entry_event(Hook::EntryAfterCreate, &customer, acme.clone(), None),
        entry_event(Hook::EntryAfterUpdate, &customer, acme_v2, Some(acme)),
    ];
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(subjects.events_stream())
        .await?
        .get_consumer("dispatcher")
        .await
        .map_err(|e| {
            anyhow::anyhow!("the bus's dispatcher consumer is missing ({e}): is `hookbus run` up?")
        })?;
    let mut steps: Vec<Step> = Vec::new();
    match &store {
        Some(store) => steps.extend(store_steps(store, &user)),
        None => {
            for e in entry_events.iter() {
                steps.push(Step::Publish(EncodedEvent::encode(subjects, e)?));
            }
            steps.push(Step::Publish(EncodedEvent::encode(
                subjects,
                &product_event,
            )?));
        }
    }
    // One event at a time, so each event's handler chain reads in order.
    let mut last_seq = 0;
    for (n, step) in steps.into_iter().enumerate() {
        let (seq, what) = match step {
            Step::Publish(encoded) => {
                let subject = encoded.subject.clone();
                let ack = publisher.send(encoded).await?.await?;
                (
                    ack.sequence,
                    format!("published: seq={} subject={subject}", ack.sequence),
                )
            }
            Step::Write(what, write) => {
                write.await?;
                // The relay of `hookbus run` publishes the outbox row.
                let seq = loop {
                    let seq = js
                        .get_stream(subjects.events_stream())
                        .await?
                        .info()
                        .await?
                        .state
                        .last_sequence;
                    if seq > last_seq {
                        break seq;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "the write was not relayed within {timeout:?}: does `hookbus run` have HOOKBUS_DATABASE_URL?"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                (
                    seq,
                    format!("{what}: committed with its event; relayed as seq={seq}"),
                )
            }
        };
        last_seq = seq;
        println_out(&format!("demo: event {} {what}", n + 1));
        loop {
            let info = consumer.info().await?;
            if info.ack_floor.stream_sequence >= last_seq && info.num_ack_pending == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("event seq={last_seq} was not dispatched within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println_out(&format!(
            "demo: event {} dispatched to every handler",
            n + 1
        ));
    }
    let dlq = js
        .get_stream(subjects.dlq_stream())
        .await?
        .info()
        .await?
        .state
        .messages;
    println_out(&format!(
        "demo: all events up to seq={last_seq} dispatched; {dlq} delivery(ies) dead-lettered (see `hookbus dlq`); every other handler ran"
    ));
    Ok(ExitCode::SUCCESS)
}

async fn registered(client: &async_nats::Client, subjects: &Subjects) -> Result<Vec<String>> {
    let reply = client
        .request(format!("{}.bus.registry", subjects.prefix()), "".into())
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    Ok(v["plugins"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}
