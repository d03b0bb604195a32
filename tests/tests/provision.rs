//! Provisioning is idempotent, and an incompatible existing stream is reported,
//! never silently changed.
#![allow(clippy::unwrap_used, missing_docs)]

use async_nats::jetstream::{self, stream};
use core_events::Subjects;
use hookbus::config::StreamSettings;
use hookbus::provision::{ProvisionError, provision};
use hookbus_tests::NatsServer;

#[tokio::test]
async fn provisioning_twice_is_a_no_op() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    let mut events = js.get_stream("PAGODA_EVENTS").await.unwrap();
    let info = events.info().await.unwrap();
    assert_eq!(info.config.subjects, ["pagoda.events.*.*.*.*"]);
    // One partition unless told otherwise: stored subjects end in `.0`.
    assert_eq!(
        info.config
            .subject_transform
            .as_ref()
            .map(|t| t.destination.as_str()),
        Some(
            "pagoda.events.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}.{{partition(1,1,4)}}"
        )
    );
    assert!(js.get_key_value("pagoda_registry").await.is_ok());
    assert!(js.get_stream("PAGODA_DLQ").await.is_ok());
    assert!(js.get_stream("PAGODA_DEFERRED").await.is_ok());
    assert!(js.get_key_value("pagoda_jobs").await.is_ok());
    let mut jobs = js.get_stream("PAGODA_JOBS").await.unwrap();
    let jobs = jobs.info().await.unwrap();
    assert_eq!(jobs.config.subjects, ["pagoda.jobs.>"]);
    assert_eq!(jobs.config.retention, stream::RetentionPolicy::WorkQueue);
    let mut audit = js.get_stream("PAGODA_AUDIT").await.unwrap();
    let audit = audit.info().await.unwrap();
    assert_eq!(audit.config.subjects, ["pagoda.audit.>"]);
    assert_eq!(audit.config.retention, stream::RetentionPolicy::Limits);
}

#[tokio::test]
async fn an_incompatible_stream_is_reported_and_left_alone() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    js.create_stream(stream::Config {
        name: "PAGODA_EVENTS".into(),
        subjects: vec!["something.else.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = provision(&js, &Subjects::default(), &StreamSettings::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProvisionError::Incompatible { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("stream 'PAGODA_EVENTS' exists with an incompatible configuration"),
        "{msg}"
    );
    assert!(msg.contains("subjects are [\"something.else.>\"]"), "{msg}");
    assert!(msg.contains("retention is WorkQueue"), "{msg}");
    // Not changed behind the operator's back.
    let mut s = js.get_stream("PAGODA_EVENTS").await.unwrap();
    assert_eq!(
        s.info().await.unwrap().config.subjects,
        ["something.else.>"]
    );
}

#[tokio::test]
async fn a_custom_prefix_gets_its_own_names() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::new("acme.pagoda").unwrap();
    provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    let mut events = js.get_stream("ACME_PAGODA_EVENTS").await.unwrap();
    assert_eq!(
        events.info().await.unwrap().config.subjects,
        ["acme.pagoda.events.*.*.*.*"]
    );
    assert!(js.get_key_value("acme_pagoda_registry").await.is_ok());
}

#[tokio::test]
async fn retention_changes_update_the_existing_events_stream() {
    use std::time::Duration;
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    js.publish("pagoda.events.entry.after_create.customer.42", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let settings = StreamSettings {
        events_max_age: Duration::from_secs(12 * 3600),
        events_max_bytes: 64 * 1024 * 1024,
        ..StreamSettings::default()
    };
    provision(&js, &subjects, &settings).await.unwrap();
    let mut events = js.get_stream("PAGODA_EVENTS").await.unwrap();
    let info = events.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(12 * 3600));
    assert_eq!(info.config.max_bytes, 64 * 1024 * 1024);
    assert_eq!(info.state.messages, 1, "events are kept");
    // The other settings are untouched; the other streams too.
    assert_eq!(info.config.subjects, ["pagoda.events.*.*.*.*"]);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    let mut dlq = js.get_stream("PAGODA_DLQ").await.unwrap();
    assert_eq!(
        dlq.info().await.unwrap().config.max_age,
        StreamSettings::default().dlq_max_age
    );
    // Back to "forever" and unlimited.
    let forever = StreamSettings {
        events_max_age: Duration::ZERO,
        events_max_bytes: -1,
        ..StreamSettings::default()
    };
    provision(&js, &subjects, &forever).await.unwrap();
    let info = events.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::ZERO);
    assert_eq!(info.config.max_bytes, -1);
}

#[tokio::test]
async fn a_shorter_lease_time_updates_the_leases_bucket() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);
    let subjects = Subjects::default();
    provision(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap();
    // From the default 5 s down to 1 s: the bucket's duplicate window (5 s) must
    // shrink with it, or the server refuses the update.
    let short = StreamSettings {
        lease_ttl: std::time::Duration::from_secs(1),
        ..StreamSettings::default()
    };
    provision(&js, &subjects, &short).await.unwrap();
    let mut stream = js
        .get_stream(format!("KV_{}", subjects.leases_bucket()))
        .await
        .unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_age, std::time::Duration::from_secs(1));
    assert!(config.duplicate_window <= config.max_age);
}
