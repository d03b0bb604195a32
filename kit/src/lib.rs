//! The NATS pieces the hook bus runtime (`hookbus`) and the plugin SDK
//! (`pagoda-plugin-sdk`) share, written once:
//!
//! | piece | module |
//! |---|---|
//! | the retry rule: which failed attempt waits how long, and when to give up | [`retry`] |
//! | the dead-letter record, its headers and its write | [`dlq`] |
//! | the job-state compare-and-set on the jobs bucket, bounded | [`jobs`] |
//! | reading the events stream back: replay from a position, the latest event of every object | [`replay`], [`backfill`] |
//! | waiting for Ctrl-C or SIGTERM, and printing an error with its causes | [`process`] |
//! | W3C trace context over NATS headers, the spans' helpers | [`trace`] |
//! | a binary's tracing set-up: logs, and OTLP span export when configured (feature `otlp`) | `telemetry` |
//!
//! It depends on the protocol (`core-events`) and async-nats only: no database,
//! no HTTP.
#![forbid(unsafe_code)]

pub mod backfill;
pub mod dlq;
pub mod jobs;
pub mod process;
pub mod replay;
pub mod retry;
#[cfg(feature = "otlp")]
pub mod telemetry;
pub mod trace;
