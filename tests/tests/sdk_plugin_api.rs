//! Plugin API routes and plugin tasks (the job worker) against a real
//! nats-server, driven as the host drives them: `ApiRequest`s over
//! request/reply, jobs queued (state PREPARING in the jobs bucket, request in
//! the jobs work queue) and cancelled by compare-and-set.
#![allow(clippy::unwrap_used)]

mod sdk_common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::service::Info;
use core_events::Subjects;
use core_events::jobs::{JobState, JobStatus};
use hookbus_tests::NatsServer;
use pagoda_plugin_sdk::{
    ApiContext, ApiRequest, ApiResponse, ApiRoute, HandlerError, Plugin, ServeOptions, Task,
    TaskContext, TaskOutcome,
};
use sdk_common::{
    cancel_job, create_jobs, create_registry, eventually, job_state, queue_job, service_error,
    wait_job,
};
use serde_json::json;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn options() -> ServeOptions {
    ServeOptions {
        registry_wait: Duration::from_secs(5),
        ..ServeOptions::default()
    }
}

// ---------------------------------------------------------------- API routes

fn api_plugin() -> Plugin {
    Plugin::builder("apiprobe", "API probe", "1.0.0")
        .api_route(
            "echo",
            "GET",
            "/echo/{name}",
            |ctx: ApiContext| async move {
                Ok(ApiResponse::ok(json!({
                    "name": ctx.param("name"),
                    "q": ctx.query("q"),
                    "method": ctx.method(),
                    "path": ctx.path(),
                    "user": ctx.user().map(|u| u.username.clone()),
                })))
            },
        )
        .api_route("create", "POST", "/items", |ctx: ApiContext| async move {
            #[derive(serde::Deserialize)]
            struct Item {
                title: String,
            }
            let item: Item = ctx.json()?;
            let mut resp = ApiResponse::with_status(201, json!({ "created": item.title }));
            resp.headers.insert("location".into(), "/items/1".into());
            Ok(resp)
        })
        .api_route("refuse", "GET", "/refuse", |_ctx| async {
            Err(HandlerError::transient("no greetings today"))
        })
        .api_route("explode", "GET", "/explode", |_ctx| async {
            panic!("boom")
        })
        .api_route("bad_status", "GET", "/bad", |_ctx| async {
            Ok(ApiResponse::with_status(700, json!(null)))
        })
        .api_route(
            ApiRoute::named("slow")
                .timeout(Duration::from_millis(200))
                .public(),
            "GET",
            "/slow",
            |_ctx| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(ApiResponse::ok(json!(null)))
            },
        )
        .build()
        .unwrap()
}

fn api_request(route: &str, method: &str, path: &str, body: serde_json::Value) -> ApiRequest {
    ApiRequest {
        route: route.into(),
        method: method.into(),
        path: path.into(),
        query: BTreeMap::from([("q".to_owned(), "x".to_owned())]),
        headers: BTreeMap::new(),
        body,
        user: Some(sample_user()),
    }
}

fn sample_user() -> core_events::User {
    core_events::User {
        id: 1,
        username: "admin".into(),
        email: String::new(),
        first_name: String::new(),
        last_name: String::new(),
        is_active: true,
        is_superuser: true,
        date_joined: chrono::Utc::now(),
    }
}

async fn call(client: &async_nats::Client, route: &str, payload: Vec<u8>) -> async_nats::Message {
    client
        .request(Subjects::default().api("apiprobe", route), payload.into())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_routes_answer_requests_and_report_errors() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    let running = api_plugin().serve(client.clone(), options()).await.unwrap();

    // The manifest lists the routes, with their options.
    let bytes = registry.get("plugins.apiprobe").await.unwrap().unwrap();
    let manifest = pagoda_plugin_sdk::PluginManifest::from_json(&bytes).unwrap();
    assert_eq!(manifest.api.len(), 6);
    let slow = manifest.api.iter().find(|r| r.name == "slow").unwrap();
    assert!(slow.public);
    assert_eq!(slow.timeout_ms, 200);

    // A request is answered with the handler's response.
    let req = api_request("echo", "GET", "/echo/Ada/", json!(null));
    let reply = call(&client, "echo", serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(service_error(&reply), None);
    let resp = ApiResponse::parse(&reply.payload).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.body,
        json!({"name": "Ada", "q": "x", "method": "GET", "path": "/echo/Ada/", "user": "admin"})
    );

    // Status, headers and a typed body.
    let req = api_request("create", "POST", "/items", json!({"title": "pen"}));
    let reply = call(&client, "create", serde_json::to_vec(&req).unwrap()).await;
    let resp = ApiResponse::parse(&reply.payload).unwrap();
    assert_eq!(resp.status, 201);
    assert_eq!(
        resp.headers.get("location").map(String::as_str),
        Some("/items/1")
    );
    assert_eq!(resp.body, json!({"created": "pen"}));
    // A body that does not fit is a plugin error naming the problem.
    let req = api_request("create", "POST", "/items", json!({"name": "pen"}));
    let reply = call(&client, "create", serde_json::to_vec(&req).unwrap()).await;
    let (code, text) = service_error(&reply).unwrap();
    assert_eq!(code, "400");
    assert!(
        text.contains("request body is not valid") && text.contains("title"),
        "{text}"
    );

    // A handler error is a 400 with its text; a panic and a timeout are 500s.
    let req = api_request("refuse", "GET", "/refuse", json!(null));
    let reply = call(&client, "refuse", serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(
        service_error(&reply),
        Some(("400".to_owned(), "no greetings today".to_owned()))
    );
    let req = api_request("explode", "GET", "/explode", json!(null));
    let reply = call(&client, "explode", serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(
        service_error(&reply),
        Some(("500".to_owned(), "handler panicked: boom".to_owned()))
    );
    let req = api_request("slow", "GET", "/slow", json!(null));
    let reply = call(&client, "slow", serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(
        service_error(&reply),
        Some((
            "500".to_owned(),
            "handler timed out after 200 ms".to_owned()
        ))
    );
    // A response the host could not send is refused here, naming the problem.
    let req = api_request("bad_status", "GET", "/bad", json!(null));
    let reply = call(&client, "bad_status", serde_json::to_vec(&req).unwrap()).await;
    let (code, text) = service_error(&reply).unwrap();
    assert_eq!(code, "500");
    assert!(
        text.contains("route 'bad_status' gave a response the host cannot send")
            && text.contains("700"),
        "{text}"
    );

    // An unreadable request gets a 400 naming the problem; the plugin goes on.
    let reply = call(&client, "echo", b"not json".to_vec()).await;
    let (code, text) = service_error(&reply).unwrap();
    assert_eq!(code, "400");
    assert!(
        text.contains("request is not a valid plugin API request"),
        "{text}"
    );
    let req = api_request("echo", "GET", "/echo/Bob", json!(null));
    let reply = call(&client, "echo", serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(
        ApiResponse::parse(&reply.payload).unwrap().body["name"],
        "Bob"
    );

    // The routes are endpoints of the plugin's service, with their metadata.
    let reply = client
        .request("$SRV.INFO.apiprobe", "".into())
        .await
        .unwrap();
    let info: Info = serde_json::from_slice(&reply.payload).unwrap();
    let echo = info.endpoints.iter().find(|e| e.name == "echo").unwrap();
    assert_eq!(echo.subject, "pagoda.api.apiprobe.echo");
    assert_eq!(echo.queue_group, "apiprobe");
    let meta = &echo.metadata;
    assert_eq!(meta.get("kind").map(String::as_str), Some("api"));
    assert_eq!(meta.get("method").map(String::as_str), Some("GET"));
    assert_eq!(meta.get("path").map(String::as_str), Some("/echo/{name}"));
    assert_eq!(meta.get("public").map(String::as_str), Some("false"));

    running.shutdown().await.unwrap();
}

// --------------------------------------------------------------------- tasks

const WORKER: &str = "worker";

/// What the tasks report to the test.
#[derive(Debug, PartialEq)]
enum Seen {
    Started(i64),
    SawCancel(i64),
}

fn task_plugin(tx: mpsc::UnboundedSender<Seen>) -> Plugin {
    let (tx1, tx2, tx3) = (tx.clone(), tx.clone(), tx.clone());
    Plugin::builder(WORKER, "Worker", "1.0.0")
        .task("ok", 0, |ctx: TaskContext| async move {
            ctx.progress("halfway").await?;
            Ok(TaskOutcome::done(format!(
                "did it for {}",
                ctx.user().map(|u| u.username.as_str()).unwrap_or("nobody")
            )))
        })
        .task("warn", 1, |_ctx| async {
            Ok(TaskOutcome::warning("careful"))
        })
        .task("fail", 2, |ctx: TaskContext| async move {
            #[derive(serde::Deserialize)]
            struct Params {
                reason: String,
            }
            let p: Params = ctx.params_as()?;
            Err(HandlerError::transient(p.reason))
        })
        .task("boom", 3, |_ctx| async { panic!("kaboom") })
        .task("long", 4, move |ctx: TaskContext| {
            let tx = tx1.clone();
            async move {
                tx.send(Seen::Started(ctx.job_id())).unwrap();
                ctx.progress("waiting").await?;
                ctx.cancellation().cancelled().await;
                assert!(ctx.cancellation().is_cancelled());
                tx.send(Seen::SawCancel(ctx.job_id())).unwrap();
                Ok(TaskOutcome::done("finished anyway"))
            }
        })
        .task("record", 5, move |ctx: TaskContext| {
            let tx = tx2.clone();
            async move {
                tx.send(Seen::Started(ctx.job_id())).unwrap();
                Ok(TaskOutcome::done("recorded"))
            }
        })
        .task(
            Task::named("slow")
                .not_cancellable()
                .timeout(Duration::from_secs(60)),
            6,
            move |ctx: TaskContext| {
                let tx = tx3.clone();
                async move {
                    tx.send(Seen::Started(ctx.job_id())).unwrap();
                    ctx.progress("sleeping").await?;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(TaskOutcome::done("slept"))
                }
            },
        )
        .build()
        .unwrap()
}

async fn setup() -> (NatsServer, async_nats::Client, jetstream::kv::Store) {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let jobs = create_jobs(&client).await;
    (server, client, jobs)
}

/// The worker's consumer, once it has nothing pending or unacknowledged.
async fn queue_settled(client: &async_nats::Client) {
    let js = jetstream::new(client.clone());
    eventually("the job queue to be settled", WAIT, || {
        let js = js.clone();
        async move {
            let mut consumer: jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream("jobs-worker", "PAGODA_JOBS")
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await;
}

/// The messages a job's state went through (the bucket keeps the last 5).
async fn messages(jobs: &jetstream::kv::Store, job_id: i64) -> Vec<String> {
    use futures::StreamExt as _;
    let mut history = jobs.history(JobState::key(WORKER, job_id)).await.unwrap();
    let mut out = Vec::new();
    while let Some(entry) = history.next().await {
        let state: JobState = serde_json::from_slice(&entry.unwrap().value).unwrap();
        out.push(state.message);
    }
    out
}

fn is_final(s: &JobState) -> bool {
    s.status.is_final()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_end_with_their_status_and_message() {
    let (_server, client, jobs) = setup().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let running = task_plugin(tx)
        .serve(client.clone(), options())
        .await
        .unwrap();

    // The consumer is the contract's.
    let mut consumer: jetstream::consumer::PullConsumer = jetstream::new(client.clone())
        .get_consumer_from_stream("jobs-worker", "PAGODA_JOBS")
        .await
        .unwrap();
    let config = &consumer.info().await.unwrap().config;
    assert_eq!(config.filter_subject, "pagoda.jobs.worker.>");
    assert_eq!(config.ack_wait, Duration::from_secs(30));
    assert_eq!(config.max_ack_pending, 4);

    let p = JobStatus::Preparing;
    queue_job(&client, &jobs, WORKER, "ok", 1, json!(null), p).await;
    queue_job(&client, &jobs, WORKER, "warn", 2, json!(null), p).await;
    queue_job(
        &client,
        &jobs,
        WORKER,
        "fail",
        3,
        json!({"reason": "disk full"}),
        p,
    )
    .await;
    queue_job(&client, &jobs, WORKER, "fail", 4, json!({"why": 1}), p).await;
    queue_job(&client, &jobs, WORKER, "boom", 5, json!(null), p).await;
    queue_job(&client, &jobs, WORKER, "nope", 6, json!(null), p).await;

    let expect = [
        (1, JobStatus::Done, "did it for admin"),
        (2, JobStatus::Warning, "careful"),
        (3, JobStatus::Error, "disk full"),
        (5, JobStatus::Error, "task panicked: kaboom"),
        (6, JobStatus::Error, "plugin 'worker' has no task 'nope'"),
    ];
    for (id, status, message) in expect {
        let state = wait_job(&jobs, WORKER, id, WAIT, is_final).await;
        assert_eq!(
            (state.status, state.message.as_str()),
            (status, message),
            "job {id}"
        );
        assert_eq!((state.job_id, state.task.is_empty()), (id, false));
    }
    let bad_params = wait_job(&jobs, WORKER, 4, WAIT, is_final).await;
    assert_eq!(bad_params.status, JobStatus::Error);
    assert!(
        bad_params.message.contains("job parameters are not valid"),
        "{}",
        bad_params.message
    );

    // An unreadable request is terminated; the worker goes on with the next job.
    jetstream::new(client.clone())
        .publish("pagoda.jobs.worker.ok", "not a job".into())
        .await
        .unwrap()
        .await
        .unwrap();
    queue_job(&client, &jobs, WORKER, "ok", 7, json!(null), p).await;
    let state = wait_job(&jobs, WORKER, 7, WAIT, is_final).await;
    assert_eq!(state.status, JobStatus::Done);
    queue_settled(&client).await;
    assert_eq!(running.jobs_in_flight(), 0);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_running_task_and_wins() {
    let (_server, client, jobs) = setup().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let running = task_plugin(tx)
        .serve(client.clone(), options())
        .await
        .unwrap();

    queue_job(
        &client,
        &jobs,
        WORKER,
        "long",
        10,
        json!(null),
        JobStatus::Preparing,
    )
    .await;
    assert_eq!(rx.recv().await, Some(Seen::Started(10)));
    let state = wait_job(&jobs, WORKER, 10, WAIT, |s| s.message == "waiting").await;
    assert_eq!(state.status, JobStatus::Processing);
    // The host cancels by compare-and-set.
    cancel_job(&jobs, WORKER, 10, "cancelled by admin").await;
    let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the task sees the cancel within 5 s");
    assert_eq!(seen, Some(Seen::SawCancel(10)));
    // The task returned DONE, but the job stays CANCELED.
    queue_settled(&client).await;
    let (_, state) = job_state(&jobs, WORKER, 10).await.unwrap();
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Canceled, "cancelled by admin")
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_before_the_worker_run_unless_cancelled() {
    let (_server, client, jobs) = setup().await;
    queue_job(
        &client,
        &jobs,
        WORKER,
        "record",
        20,
        json!(null),
        JobStatus::Canceled,
    )
    .await;
    queue_job(
        &client,
        &jobs,
        WORKER,
        "record",
        21,
        json!(null),
        JobStatus::Preparing,
    )
    .await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let running = task_plugin(tx)
        .serve(client.clone(), options())
        .await
        .unwrap();
    let state = wait_job(&jobs, WORKER, 21, WAIT, is_final).await;
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Done, "recorded")
    );
    queue_settled(&client).await;
    // Only job 21 ran; job 20 was acknowledged without running and stays CANCELED.
    assert_eq!(rx.recv().await, Some(Seen::Started(21)));
    assert!(rx.try_recv().is_err(), "the cancelled job did not run");
    let (_, state) = job_state(&jobs, WORKER, 20).await.unwrap();
    assert_eq!(state.status, JobStatus::Canceled);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_at_shutdown_runs_again_on_another_worker() {
    let (_server, client, jobs) = setup().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let first = task_plugin(tx.clone())
        .serve(
            client.clone(),
            ServeOptions {
                shutdown_grace: Duration::from_millis(100),
                ..options()
            },
        )
        .await
        .unwrap();
    queue_job(
        &client,
        &jobs,
        WORKER,
        "slow",
        30,
        json!(null),
        JobStatus::Preparing,
    )
    .await;
    assert_eq!(rx.recv().await, Some(Seen::Started(30)));
    wait_job(&jobs, WORKER, 30, WAIT, |s| s.message == "sleeping").await;
    // The grace period is shorter than the task: it is stopped and handed back.
    first.shutdown().await.unwrap();
    let (_, state) = job_state(&jobs, WORKER, 30).await.unwrap();
    assert_eq!(state.status, JobStatus::Processing);

    let second = task_plugin(tx)
        .serve(client.clone(), options())
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
        Some(Seen::Started(30))
    );
    let state = wait_job(&jobs, WORKER, 30, WAIT, is_final).await;
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Done, "slept")
    );
    assert!(
        messages(&jobs, 30).await.iter().any(|m| m == "restarted"),
        "the second worker notes the restart: {:?}",
        messages(&jobs, 30).await
    );
    queue_settled(&client).await;
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_jobs_stream_is_a_clear_error_after_the_wait() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    create_registry(&client, "pagoda_registry").await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = task_plugin(tx)
        .serve(
            client.clone(),
            ServeOptions {
                registry_wait: Duration::from_millis(600),
                ..options()
            },
        )
        .await
        .expect_err("no jobs stream");
    let text = err.to_string();
    assert!(
        text.contains("could not start the job worker of plugin 'worker'")
            && text.contains("PAGODA_JOBS")
            && text.contains("pagoda_jobs"),
        "{text}"
    );
}
