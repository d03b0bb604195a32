//! Synchronous hook latency: an `entry.validate` round trip through
//! [`SyncHooks::validate`] to SDK validators, against raw async-nats
//! request/reply to the same number of hand-written responders doing the same
//! work, on a real nats-server.
//!
//! `cargo bench -p hookbus-tests --bench sync_hooks` (knobs: `BENCH_CALLS`,
//! round trips per round, default 2 000; `BENCH_ROUNDS`, default 5 per side).
//!
//! Setup, once: a fresh `nats-server`, the bus (`Bus::start`: streams, registry,
//! an idle dispatcher), and three SDK plugins `v1`, `v2`, `v3`, each with one
//! validator that decodes the request and accepts it; `v1` is for every entity,
//! `v2` and `v3` only for entity `three`. So validating an entry of entity `one`
//! calls one validator, of entity `three` three (concurrently). The raw side has
//! one, or three, plain queue subscriptions that decode the same request body
//! into [`ValidateRequest`] and answer a serialized [`ValidateReply`]; the
//! requester sends the same body to each (concurrently for three) and waits for
//! every reply. Requests go out on one connection, responders answer on another,
//! for both sides.
//!
//! Each round is `BENCH_CALLS` sequential round trips (after a warm-up); rounds
//! alternate sides (bus, raw, raw, bus, …); a round's p50 and p99 are over its
//! calls; the reported figures are the medians over rounds.
//!
//! Output, per validator count: `bench: scenario=validate validators=N
//! bus_p50_us=… raw_p50_us=… bus_p99_us=… raw_p99_us=… ratio_p50=…` (for three,
//! also `bus_p50_vs_one=…`, the bus's p50 with three over its p50 with one).
//! Per-round figures go to stderr. Without `--bench` (under `cargo test`) it runs
//! one short round per side as a smoke test.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    missing_docs,
    unreachable_pub
)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use core_events::sync::{ValidateReply, ValidateRequest};
use core_events::{Entity, sample};
use futures::StreamExt;
use hookbus::config::BusConfig;
use hookbus::run::Bus;
use hookbus::sync_hooks::SyncHooks;
use hookbus_tests::NatsServer;
use hookbus_tests::bench::{env_usize, median, percentile};
use pagoda_plugin_sdk::{Plugin, RunningPlugin, ServeOptions, SyncHandler};
use store::{NewEntry, WriteContext};

const WARM_UP: usize = 200;

fn validator(id: &str, only_three: bool) -> Plugin {
    let check = SyncHandler::named("check");
    let check = if only_three {
        check.entities(["three"])
    } else {
        check
    };
    Plugin::builder(id, id, "1.0.0")
        .on_validate(check, |ctx| async move {
            // The same work as the raw responder: the request is decoded (by the
            // SDK), then an empty error list is answered.
            std::hint::black_box(&ctx.request.entry.name);
            Ok(vec![])
        })
        .build()
        .unwrap()
}

/// A raw responder: decodes the request, answers an empty `ValidateReply`.
async fn raw_responder(client: async_nats::Client, subject: String) {
    let mut sub = client.queue_subscribe(subject, "raw".into()).await.unwrap();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let request: ValidateRequest = serde_json::from_slice(&msg.payload).unwrap();
            std::hint::black_box(&request.entry.name);
            let body = serde_json::to_vec(&ValidateReply::default()).unwrap();
            if let Some(reply) = msg.reply {
                client.publish(reply, body.into()).await.unwrap();
            }
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Bus,
    Raw,
}

struct Scenario<'a> {
    hooks: &'a SyncHooks,
    host: &'a async_nats::Client,
    entity: Entity,
    draft: NewEntry,
    raw_subjects: Vec<String>,
    raw_body: Bytes,
}

impl Scenario<'_> {
    async fn once(&self, side: Side) {
        match side {
            Side::Bus => {
                let out = self
                    .hooks
                    .validate(&self.entity, &self.draft, None, &WriteContext::default())
                    .await
                    .unwrap();
                assert!(out.skipped.is_empty());
            }
            Side::Raw => {
                let replies = futures::future::join_all(
                    self.raw_subjects
                        .iter()
                        .map(|s| self.host.request(s.clone(), self.raw_body.clone())),
                )
                .await;
                for r in replies {
                    let reply: ValidateReply = serde_json::from_slice(&r.unwrap().payload).unwrap();
                    assert!(reply.errors.is_empty());
                }
            }
        }
    }

    /// One round: `calls` round trips; (p50, p99) in microseconds.
    async fn round(&self, side: Side, calls: usize) -> (f64, f64) {
        let mut lat = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            self.once(side).await;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        (percentile(&lat, 50.0), percentile(&lat, 99.0))
    }
}

async fn bench(smoke: bool) {
    let calls = env_usize("BENCH_CALLS", if smoke { 50 } else { 2_000 });
    let rounds = env_usize("BENCH_ROUNDS", if smoke { 1 } else { 5 });
    let server = NatsServer::start().await;
    let host = server.connect().await;
    let plugins_client = server.connect().await;
    let mut config = BusConfig {
        enabled_plugins: vec!["v1".into(), "v2".into(), "v3".into()],
        ..Default::default()
    };
    config.http_addr = None;
    let bus = Bus::start(host.clone(), config).await.unwrap();
    let mut running: Vec<RunningPlugin> = Vec::new();
    for (id, only_three) in [("v1", false), ("v2", true), ("v3", true)] {
        running.push(
            validator(id, only_three)
                .serve(plugins_client.clone(), ServeOptions::default())
                .await
                .unwrap(),
        );
    }
    bus.registry
        .wait_for(Duration::from_secs(10), |t| {
            ["v1", "v2", "v3"].iter().all(|p| t.is_enabled(p))
        })
        .await
        .unwrap();
    for i in 1..=3 {
        raw_responder(plugins_client.clone(), format!("bench.raw.v{i}")).await;
    }
    plugins_client.flush().await.unwrap();
    let hooks = SyncHooks::new(host.clone(), bus.registry.clone());

    let mut one_p50 = None;
    for validators in [1_usize, 3] {
        let entity = sample::entity(1, if validators == 1 { "one" } else { "three" });
        let draft = NewEntry::named("ACME").value("phone", serde_json::json!("+81 3 0000 0000"));
        let raw_body = Bytes::from(
            serde_json::to_vec(&ValidateRequest {
                entity: entity.clone(),
                entry: draft.clone(),
                existing: None,
                user: None,
            })
            .unwrap(),
        );
        let scenario = Scenario {
            hooks: &hooks,
            host: &host,
            entity,
            draft,
            raw_subjects: (1..=validators)
                .map(|i| format!("bench.raw.v{i}"))
                .collect(),
            raw_body,
        };
        for side in [Side::Bus, Side::Raw] {
            for _ in 0..WARM_UP.min(calls) {
                scenario.once(side).await;
            }
        }
        let (mut bus50, mut bus99, mut raw50, mut raw99) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [Side::Bus, Side::Raw]
            } else {
                [Side::Raw, Side::Bus]
            };
            for side in order {
                let (p50, p99) = scenario.round(side, calls).await;
                eprintln!(
                    "bench: validate validators={validators} round={} side={side:?} p50_us={p50:.1} p99_us={p99:.1}",
                    round + 1
                );
                match side {
                    Side::Bus => {
                        bus50.push(p50);
                        bus99.push(p99);
                    }
                    Side::Raw => {
                        raw50.push(p50);
                        raw99.push(p99);
                    }
                }
            }
        }
        if smoke {
            println!(
                "smoke: sync_hooks bench ran {calls} validations with {validators} validator(s) on both sides"
            );
            continue;
        }
        let (b50, r50, b99, r99) = (
            median(&bus50),
            median(&raw50),
            median(&bus99),
            median(&raw99),
        );
        let extra = match one_p50 {
            Some(one) if validators == 3 => format!(" bus_p50_vs_one={:.3}", b50 / one),
            _ => String::new(),
        };
        if validators == 1 {
            one_p50 = Some(b50);
        }
        println!(
            "bench: scenario=validate validators={validators} bus_p50_us={b50:.1} raw_p50_us={r50:.1} bus_p99_us={b99:.1} raw_p99_us={r99:.1} ratio_p50={:.3}{extra}",
            b50 / r50
        );
    }
    for r in running {
        r.shutdown().await.unwrap();
    }
    bus.stop().await.unwrap();
}

fn main() {
    hookbus_tests::bench::main(bench);
}
