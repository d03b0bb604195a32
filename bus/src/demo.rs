//! `hookbus demo`: publishes a few events and shows how they were dispatched.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_nats::jetstream;
use core_events::{Entity, EntityEvent, Entry, EntryEvent, Envelope, Hook, Subjects, sample};
use hookbus::{EncodedEvent, Publisher};

use crate::cli::println_out;

pub(crate) async fn run(
    client: &async_nats::Client,
    subjects: &Subjects,
    plugins: &[String],
    timeout: Duration,
) -> Result<ExitCode> {
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
    // One event at a time, so each event's handler chain reads in order.
    let mut last_seq = 0;
    for (n, encoded) in entry_events
        .iter()
        .map(|e| EncodedEvent::encode(subjects, e))
        .chain(std::iter::once(EncodedEvent::encode(
            subjects,
            &product_event,
        )))
        .enumerate()
    {
        let encoded = encoded?;
        let subject = encoded.subject.clone();
        let ack = publisher.send(encoded).await?.await?;
        last_seq = ack.sequence;
        println_out(&format!(
            "demo: event {} published: seq={} subject={subject}",
            n + 1,
            ack.sequence
        ));
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
