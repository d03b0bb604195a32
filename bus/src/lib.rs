//! The Pagoda hook bus runtime.
//!
//! | part | module |
//! |---|---|
//! | configuration and defaults | [`config`] |
//! | stream and bucket provisioning | [`provision`] |
//! | publishing events (`Nats-Msg-Id` = event id) | [`publish`] |
//! | the live plugin registry and routing table | [`registry`] |
//! | the dispatcher (ordering, retries, dead letters, deferral) | [`dispatch`] |
//! | reading dead letters | [`dlq`] |
//! | the daemon: everything above under one shutdown | [`run`] |
//!
//! The `hookbus` binary is a thin `main` over [`run::run`] and the inspection
//! commands.
#![forbid(unsafe_code)]

pub mod config;
pub mod dispatch;
pub mod dlq;
pub mod provision;
pub mod publish;
pub mod registry;
pub mod run;

pub use config::BusConfig;
pub use dispatch::{DispatchStats, Dispatcher};
pub use publish::{EncodedEvent, Publisher};
pub use registry::{Registry, RoutingTable};
