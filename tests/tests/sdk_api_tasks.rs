//! The SDK's API routes and job worker with least-privilege NATS users
//! (`hookbus nats-config`): a plugin serves its routes and runs its jobs with
//! only its own permissions, and cannot take or read another plugin's jobs.
//! (The SDK side itself is tested in tests/tests/sdk_plugin_api.rs.)
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use common::*;
use core_events::Subjects;
use core_events::jobs::{JobRequest, JobState, JobStatus};
use hookbus::nats_config;
use hookbus_tests::{assert_eventually, init_tracing};
use pagoda_plugin_sdk::{ApiRequest, ApiResponse, Plugin, ServeOptions, TaskOutcome};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_serves_routes_and_runs_jobs_with_its_own_permissions() {
    init_tracing();
    let server = start_server(&["alpha", "beta"]).await;
    let (bus_client, _) = connect(&server, nats_config::BUS_USER).await;
    let bus = start_bus_on(&bus_client, &["alpha", "beta"]).await;

    let (alpha, mut alpha_errors) = connect(&server, "alpha").await;
    let plugin = Plugin::builder("alpha", "Alpha", "1.0.0")
        .api_route("hello", "GET", "/hello", |ctx| async move {
            Ok(ApiResponse::ok(serde_json::json!({ "path": ctx.path() })))
        })
        .task("work", 0, |ctx| async move {
            ctx.progress("working").await?;
            Ok(TaskOutcome::done(format!("job {} done", ctx.job_id())))
        })
        .build()
        .unwrap();
    let running = plugin
        .serve(alpha.clone(), ServeOptions::default())
        .await
        .unwrap();
    wait_registered(&bus, &["alpha"]).await;

    // The host calls the route and queues a job with its own credentials (the
    // worker creates the job's state when the host has not).
    let (host, mut host_errors) = connect(&server, nats_config::HOST_USER).await;
    let request = ApiRequest {
        route: "hello".into(),
        method: "GET".into(),
        path: "/hello".into(),
        query: BTreeMap::new(),
        headers: BTreeMap::new(),
        body: serde_json::Value::Null,
        user: None,
    };
    let reply = host
        .request(
            Subjects::default().api("alpha", "hello"),
            serde_json::to_vec(&request).unwrap().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        ApiResponse::parse(&reply.payload).unwrap().body["path"],
        "/hello"
    );
    let job = JobRequest {
        job_id: 1,
        plugin: "alpha".into(),
        task: "work".into(),
        operation: 5000,
        params: serde_json::Value::Null,
        user: None,
        created_at: chrono::Utc::now(),
    };
    jetstream::new(host.clone())
        .publish(
            Subjects::default().job("alpha", "work"),
            serde_json::to_vec(&job).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // The plugin reads its own job's state.
    let jobs = jetstream::new(alpha.clone())
        .get_key_value(Subjects::default().jobs_bucket())
        .await
        .unwrap();
    let state = || {
        let jobs = jobs.clone();
        async move {
            let bytes = jobs.get(JobState::key("alpha", 1)).await.ok()??;
            serde_json::from_slice::<JobState>(&bytes).ok()
        }
    };
    assert_eventually!(
        state()
            .await
            .is_some_and(|s| s.status == JobStatus::Done && s.message == "job 1 done"),
        WAIT,
        "job 1 done: {:?}",
        state().await
    );
    assert!(alpha_errors.try_recv().is_err(), "no violation for alpha");
    assert!(host_errors.try_recv().is_err(), "no violation for the host");

    // It cannot take beta's jobs, nor read beta's job states.
    let js = jetstream::new(alpha.clone());
    let stolen = js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("jobs-beta".into()),
                filter_subject: Subjects::default().plugin_jobs("beta"),
                ..Default::default()
            },
            "PAGODA_JOBS",
        )
        .await;
    assert!(stolen.is_err(), "alpha created beta's jobs consumer");
    let peek =
        tokio::time::timeout(Duration::from_secs(3), jobs.get(JobState::key("beta", 1))).await;
    assert!(
        !matches!(peek, Ok(Ok(_))),
        "alpha read a key of beta in the jobs bucket: {peek:?}"
    );
    let violation = tokio::time::timeout(WAIT, async {
        while let Some(e) = alpha_errors.recv().await {
            if e.to_lowercase().contains("permissions violation") {
                return e;
            }
        }
        String::new()
    })
    .await
    .expect("a permissions violation for alpha");
    assert!(
        violation.contains("PAGODA_JOBS") || violation.contains("pagoda_jobs"),
        "{violation}"
    );

    running.shutdown().await.unwrap();
    bus.stop().await.unwrap();
}

/// The reference host with the `pagoda-host` user and an SDK plugin with its own
/// user: an entity and an entry written through the host (sync hooks, the outbox
/// relayed by the host), a plugin API route, a task run to DONE as a job — and
/// no permission violation on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_runs_with_its_own_permissions() {
    init_tracing();
    let server = start_server(&["alpha"]).await;
    let (bus_client, mut bus_errors) = connect(&server, nats_config::BUS_USER).await;
    let bus = start_bus_on(&bus_client, &["alpha"]).await;
    let (alpha, mut alpha_errors) = connect(&server, "alpha").await;
    let plugin = Plugin::builder("alpha", "Alpha", "1.0.0")
        .on_validate("names", |ctx| async move {
            if ctx.request.entry.name.contains("bad") {
                return Ok(vec![pagoda_plugin_sdk::FieldError::field(
                    "name",
                    "no bad names",
                )]);
            }
            Ok(Vec::new())
        })
        .api_route("hello", "GET", "/hello", |ctx| async move {
            let who = ctx.user().map(|u| u.username.clone()).unwrap_or_default();
            Ok(ApiResponse::ok(serde_json::json!({ "user": who })))
        })
        .task("work", 0, |ctx| async move {
            ctx.progress("working").await?;
            Ok(TaskOutcome::done(format!("job {} done", ctx.job_id())))
        })
        .build()
        .unwrap();
    let running = plugin
        .serve(alpha.clone(), ServeOptions::default())
        .await
        .unwrap();
    wait_registered(&bus, &["alpha"]).await;

    let (host_client, mut host_errors) = connect(&server, nats_config::HOST_USER).await;
    let db = hookbus_tests::db::TestDb::sqlite();
    let mut config = hookbus_host::HostConfig::new(db.url());
    config.listen = ([127, 0, 0, 1], 0).into();
    config.enabled_plugins = vec!["alpha".into()];
    config.operation_id_config = r#"{"alpha": [5000, 5099]}"#.into();
    let host = hookbus_host::Host::start(host_client, config)
        .await
        .unwrap();
    let (_, token) = hookbus_tests::host::user_with_token(&host.state().store, "admin", true).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", host.addr());
    let call = |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .header("Authorization", format!("Token {token}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, entity) = call(
        reqwest::Method::POST,
        "/api/v2/entities/",
        Some(serde_json::json!({"name": "customer"})),
    )
    .await;
    assert_eq!(status, 201, "{entity}");
    // An entity change tells the other hosts (pagoda.host.forget) with its permissions.
    let (status, body) = call(
        reqwest::Method::PATCH,
        &format!("/api/v2/entities/{}/", entity["id"]),
        Some(serde_json::json!({"note": "people"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let entries = format!("/api/v2/entities/{}/entries/", entity["id"]);
    let (status, body) = call(
        reqwest::Method::POST,
        &entries,
        Some(serde_json::json!({"name": "bad name"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(
        reqwest::Method::POST,
        &entries,
        Some(serde_json::json!({"name": "ACME"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The host's relay publishes the three events.
    let js = jetstream::new(bus_client.clone());
    assert_eventually!(stream_len(&js, "PAGODA_EVENTS").await == 3, WAIT);

    let (status, body) = call(reqwest::Method::GET, "/api/v2/plugins/alpha/hello", None).await;
    assert_eq!((status, &body["user"]), (200, &serde_json::json!("admin")));
    let (status, job) = call(
        reqwest::Method::POST,
        "/api/v2/plugins/alpha/tasks/work/",
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let path = format!("/api/v2/jobs/{}/", job["id"]);
    assert_eventually!(
        call(reqwest::Method::GET, &path, None).await.1["status_name"] == "DONE",
        WAIT,
        "job: {}",
        call(reqwest::Method::GET, &path, None).await.1
    );
    assert!(host_errors.try_recv().is_err(), "no violation for the host");
    assert!(alpha_errors.try_recv().is_err(), "no violation for alpha");
    assert!(bus_errors.try_recv().is_err(), "no violation for the bus");
    host.stop().await;
    running.shutdown().await.unwrap();
    bus.stop().await.unwrap();
}
