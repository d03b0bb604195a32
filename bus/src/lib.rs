//! The Pagoda hook bus runtime.
//!
//! | part | module |
//! |---|---|
//! | configuration and defaults | [`config`] |
//! | the audit trail of admin actions (`PAGODA_AUDIT`) | [`audit`] |
//! | stream and bucket provisioning | [`provision`] |
//! | publishing events (`Nats-Msg-Id` = event id) | [`publish`] |
//! | the live plugin registry and routing table | [`registry`] |
//! | the dispatcher (ordering, retries, dead letters, deferral) | [`dispatch`] |
//! | leases: one active dispatcher among several buses | [`lease`] |
//! | the synchronous hooks (validate, before_*, get_attrs) over request/reply | [`sync_hooks`] |
//! | metrics of sync-hook calls and plugin API routes (served by the host) | [`call_metrics`] |
//! | reading, replaying and purging dead letters | [`dlq`] |
//! | the same over request/reply: `<prefix>.bus.dlq.list\|replay\|purge` | [`dlq_service`] |
//! | the counters: dispatcher, handlers, plugins, relay, task panics | [`stats`] |
//! | the Prometheus export and values sampled from NATS | [`metrics`] |
//! | health report, degraded plugins and alerts | [`monitor`] |
//! | `/healthz` and `/metrics` | [`http`] |
//! | the operator commands (`tail`, `registry`, `dlq`, `health`) | [`ops`] |
//! | progress of long commands, shown by the caller | [`progress`] |
//! | per-user NATS permissions (`hookbus nats-config`) | [`nats_config`] |
//! | `hookbus replay`: stored events to stdout or re-delivered to a handler | [`replay_cmd`] |
//! | long-lived tasks restarted after a panic, and counted | [`supervise`] |
//! | the daemon: everything above under one shutdown | [`run`] |
//!
//! The reference host is the `hookbus-host` crate (`host/`); the `hookbus` binary is
//! the `hookbus-cli` crate (`cli/`), a thin command line over both.
#![forbid(unsafe_code)]

pub mod audit;
pub mod call_metrics;
pub mod config;
pub mod dispatch;
pub mod dlq;
pub mod dlq_service;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod monitor;
pub mod nats_config;
pub mod ops;
pub mod outbox_cmd;
pub mod progress;
pub mod provision;
pub mod publish;
pub mod registry;
pub mod relay;
pub mod replay_cmd;
pub mod run;
pub mod stats;
pub mod supervise;
pub mod sync_hooks;

pub use config::BusConfig;
pub use dispatch::Dispatcher;
pub use publish::{EncodedEvent, Publisher};
pub use registry::{Registry, RoutingTable};
pub use stats::DispatchStats;
