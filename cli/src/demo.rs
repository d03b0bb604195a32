//! `hookbus demo`: makes a few model changes (through the store and its outbox
//! when given a database, else by publishing events directly) and shows how
//! their events were dispatched.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_nats::jetstream;
use core_events::{
    AttrType, Entity, EntityEvent, Entry, EntryEvent, Envelope, Hook, Subjects, User, sample,
};
use futures::future::BoxFuture;
use hookbus::{EncodedEvent, Publisher};
use store::{EntryChanges, NewAttr, NewEntity, NewEntry, Store, WriteContext};

use crate::out::println_out;

/// One demo step: an event published directly, a model change written
/// through the store or the host (its event goes through the outbox and the
/// relay), or a host call that makes no event (a rejected write, a read, a
/// plugin route, a job), whose answer is shown.
enum Step {
    Publish(EncodedEvent),
    Write(String, BoxFuture<'static, Result<()>>),
    Show(String, BoxFuture<'static, Result<String>>),
}

/// The reference host the demo writes through: its URL and an admin token.
#[derive(Debug, Clone)]
pub(crate) struct HostTarget {
    pub(crate) url: String,
    pub(crate) token: String,
}

impl HostTarget {
    async fn call(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut req = http
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')))
            .header("Authorization", format!("Token {}", self.token));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// Like `call`, failing unless the status is 2xx.
    async fn ok(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let (status, body) = self.call(http, method.clone(), path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} answered {status}: {body}");
        }
        Ok(body)
    }
}

fn id_of(v: &serde_json::Value) -> Result<i64> {
    v["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no id in the host's answer: {v}"))
}

/// The demo through the reference host's HTTP API: writes that fire the sync
/// hooks (a validator that rejects, a before_create that fills a default), a
/// read through get_attrs, a plugin API route and a plugin task run as a job.
fn host_steps(host: &HostTarget) -> Vec<Step> {
    use reqwest::Method;
    use serde_json::json;
    let http = reqwest::Client::new();
    let mut steps = Vec::new();
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Write(
        "POST /api/v2/entities/ helloworld".into(),
        Box::pin(async move {
            h.ok(
                &c,
                Method::POST,
                "/api/v2/entities/",
                Some(json!({"name": "helloworld"})),
            )
            .await?;
            Ok(())
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Write(
        "POST /api/v2/entities/ customer (email: string, rank: number)".into(),
        Box::pin(async move {
            h.ok(
                &c,
                Method::POST,
                "/api/v2/entities/",
                Some(json!({"name": "customer", "attrs": [
                    {"name": "email", "type": AttrType::STRING.0},
                    {"name": "rank", "type": AttrType::NUMBER.0},
                ]})),
            )
            .await?;
            Ok(())
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Write(
        "POST entry Hello in helloworld (hello-world's before_create fills the note)".into(),
        Box::pin(async move {
            let hw = entity_id(&h, &c, "helloworld").await?;
            let e = h
                .ok(
                    &c,
                    Method::POST,
                    &format!("/api/v2/entities/{hw}/entries/"),
                    Some(json!({"name": "Hello"})),
                )
                .await?;
            println_out(&format!("demo:   stored note: {}", e["note"]));
            Ok(())
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Show(
        "POST entry 'forbidden fruit' (hello-world's validator rejects it: not stored, no event)"
            .into(),
        Box::pin(async move {
            let hw = entity_id(&h, &c, "helloworld").await?;
            let (status, body) = h
                .call(
                    &c,
                    Method::POST,
                    &format!("/api/v2/entities/{hw}/entries/"),
                    Some(json!({"name": "forbidden fruit"})),
                )
                .await?;
            if status != 400 {
                bail!("the validator did not reject the entry: {status} {body}");
            }
            Ok(format!("{status} {}", body["errors"]))
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Write(
        "POST entry ACME in customer".into(),
        Box::pin(async move {
            let cu = entity_id(&h, &c, "customer").await?;
            h.ok(
                &c,
                Method::POST,
                &format!("/api/v2/entities/{cu}/entries/"),
                Some(json!({"name": "ACME", "attrs": {"email": "info@acme.example", "rank": 1}})),
            )
            .await?;
            Ok(())
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Write(
        "PATCH entry ACME (rank 1 -> 2)".into(),
        Box::pin(async move {
            let acme = acme_id(&h, &c).await?;
            h.ok(
                &c,
                Method::PATCH,
                &format!("/api/v2/entries/{acme}/"),
                Some(json!({"attrs": {"rank": 2}})),
            )
            .await?;
            Ok(())
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Show(
        "GET entry ACME (hello-world's get_attrs adds a computed attribute)".into(),
        Box::pin(async move {
            let acme = acme_id(&h, &c).await?;
            let e = h
                .ok(&c, Method::GET, &format!("/api/v2/entries/{acme}/"), None)
                .await?;
            Ok(format!("attrs {}", e["attrs"]))
        }),
    ));
    let (h, c) = (host.clone(), http.clone());
    steps.push(Step::Show(
        "GET /api/v2/plugins/hello-world/greet (a plugin API route over request/reply)".into(),
        Box::pin(async move {
            let v = h
                .ok(&c, Method::GET, "/api/v2/plugins/hello-world/greet", None)
                .await?;
            Ok(v.to_string())
        }),
    ));
    let (h, c) = (host.clone(), http);
    steps.push(Step::Show(
        "POST /api/v2/plugins/hello-world/tasks/count/ (a plugin task run as a job)".into(),
        Box::pin(async move {
            let job = h
                .ok(
                    &c,
                    Method::POST,
                    "/api/v2/plugins/hello-world/tasks/count/",
                    Some(json!({"to": 3, "delay_ms": 100})),
                )
                .await?;
            let id = id_of(&job)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut seen = Vec::new();
            loop {
                let j = h
                    .ok(&c, Method::GET, &format!("/api/v2/jobs/{id}/"), None)
                    .await?;
                let status = j["status_name"].as_str().unwrap_or("?").to_owned();
                if seen.last() != Some(&status) {
                    seen.push(status.clone());
                }
                if !matches!(status.as_str(), "PREPARING" | "PROCESSING") {
                    return Ok(format!(
                        "job {id}: {} — {}",
                        seen.join(" -> "),
                        j["message"]
                    ));
                }
                if Instant::now() > deadline {
                    bail!("job {id} did not finish within 30 s: {j}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }),
    ));
    steps
}

async fn entity_id(h: &HostTarget, c: &reqwest::Client, name: &str) -> Result<i64> {
    let list = h
        .ok(c, reqwest::Method::GET, "/api/v2/entities/", None)
        .await?;
    let items = list.get("results").unwrap_or(&list);
    items
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .map(id_of)
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("entity {name} is not in the host's list: {list}"))
}

async fn acme_id(h: &HostTarget, c: &reqwest::Client) -> Result<i64> {
    let cu = entity_id(h, c, "customer").await?;
    let list = h
        .ok(
            c,
            reqwest::Method::GET,
            &format!("/api/v2/entities/{cu}/entries/"),
            None,
        )
        .await?;
    let items = list.get("results").unwrap_or(&list);
    items
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == "ACME"))
        .map(id_of)
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("entry ACME is not in the host's list: {list}"))
}

/// The model changes of the demo, written with the store.
fn store_steps(store: &Store, user: &User) -> Vec<Step> {
    let ctx = WriteContext {
        user: Some(user.clone()),
        traceparent: None,
        tracestate: None,
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
    host: Option<HostTarget>,
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
    match (&host, &store) {
        (Some(host), _) => steps.extend(host_steps(host)),
        (None, Some(store)) => steps.extend(store_steps(store, &user)),
        (None, None) => {
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
    let mut n = 0;
    for step in steps {
        let (seq, what) = match step {
            Step::Show(what, call) => {
                let shown = call.await?;
                println_out(&format!("demo: {what}\ndemo:   -> {shown}"));
                continue;
            }
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
                            "the write was not relayed within {timeout:?}: is a relay running (`hookbus host`, or `hookbus run` with HOOKBUS_DATABASE_URL)?"
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
        n += 1;
        println_out(&format!("demo: event {n} {what}"));
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
        println_out(&format!("demo: event {n} dispatched to every handler"));
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
