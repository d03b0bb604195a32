//! Plugin tasks as jobs through the reference host (real nats-server, real
//! databases, real HTTP): an SDK plugin's tasks run to DONE, end in ERROR, are
//! cancelled while running or while still queued; the job list shows them; on
//! SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use core_events::Subjects;
use core_events::jobs::{JobState, JobStatus};
use hookbus::config::StreamSettings;
use hookbus_tests::ServeOn;
use hookbus_tests::host::{TestHost, call};
use hookbus_tests::{NatsServer, TestDb, poll_for};
use pagoda_plugin_sdk::{HandlerError, Plugin, RunningPlugin, ServeOptions, Task, TaskOutcome};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use store::Backend;

const PLUGIN: &str = "worker";
const OPERATION_CONFIG: &str = r#"{"worker": [5000, 5099]}"#;

async fn provision(client: &async_nats::Client) {
    hookbus::provision::provision(
        &jetstream::new(client.clone()),
        &Subjects::default(),
        &StreamSettings::default(),
    )
    .await
    .unwrap();
}

/// Counts of task runs, to show that a job cancelled in the queue never runs.
#[derive(Default)]
struct Runs {
    count: AtomicUsize,
    long_started: AtomicUsize,
    long_stopped: AtomicUsize,
}

/// The plugin: `count` (DONE with a sum), `explode` (ERROR), `long` (runs until
/// cancelled), `stubborn` (not cancellable).
fn worker(runs: Arc<Runs>) -> Plugin {
    let (r1, r2) = (runs.clone(), runs);
    Plugin::builder(PLUGIN, "Worker", "1.0.0")
        .task(
            Task::named("count").description("Adds numbers"),
            0,
            move |ctx| {
                let runs = r1.clone();
                async move {
                    runs.count.fetch_add(1, Ordering::SeqCst);
                    let numbers: Vec<i64> = ctx.params_as()?;
                    ctx.progress("adding").await?;
                    let who = ctx.user().map(|u| u.username.clone()).unwrap_or_default();
                    Ok(TaskOutcome::done(format!(
                        "sum {} for {who} (operation {})",
                        numbers.iter().sum::<i64>(),
                        ctx.request().operation
                    )))
                }
            },
        )
        .task("explode", 1, |_ctx| async move {
            Err(HandlerError::permanent("the widget exploded"))
        })
        .task("long", 2, move |ctx| {
            let runs = r2.clone();
            async move {
                runs.long_started.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    () = ctx.cancellation().cancelled() => {
                        runs.long_stopped.fetch_add(1, Ordering::SeqCst);
                        Ok(TaskOutcome::done("stopped early"))
                    }
                    () = tokio::time::sleep(Duration::from_secs(60)) => {
                        Ok(TaskOutcome::done("ran to the end"))
                    }
                }
            }
        })
        .task(
            Task::named("stubborn").not_cancellable(),
            3,
            |_ctx| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(TaskOutcome::done("finally"))
            },
        )
        .build()
        .unwrap()
}

struct Setup {
    host: TestHost,
    _server: NatsServer,
    _db: TestDb,
    running: Option<RunningPlugin>,
    runs: Arc<Runs>,
}

/// A host with the worker plugin registered and its range configured; the plugin
/// serving (its worker taking jobs) only when `serve` is set.
async fn setup(backend: Backend, serve: bool) -> Setup {
    let server = NatsServer::start().await;
    let db = TestDb::new(backend).await;
    let client = server.connect().await;
    provision(&client).await;
    let runs = Arc::new(Runs::default());
    let plugin = worker(runs.clone());
    let running = plugin
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    let running = if serve {
        Some(running)
    } else {
        // Registered (the manifest stays in the registry) but no worker runs.
        running.shutdown().await.unwrap();
        None
    };
    let host = TestHost::start_with(&server, &db, |c| {
        c.enabled_plugins = vec![PLUGIN.into()];
        c.operation_id_config = OPERATION_CONFIG.into();
    })
    .await;
    host.wait_registered(&[PLUGIN]).await;
    Setup {
        host,
        _server: server,
        _db: db,
        running,
        runs,
    }
}

async fn start(host: &TestHost, task: &str, params: Value) -> Value {
    let (status, job) = call(
        host.as_user(
            Method::POST,
            &format!("/api/v2/plugins/{PLUGIN}/tasks/{task}/"),
        )
        .json(&params),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], 1, "{job}");
    assert_eq!(job["status_name"], "PREPARING");
    job
}

async fn get_job(host: &TestHost, id: i64) -> Value {
    let (status, job) = call(host.as_user(Method::GET, &format!("/api/v2/jobs/{id}/"))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job
}

/// Waits (20 s at most) until job `id` has `status`; returns it.
async fn wait_status(host: &TestHost, id: i64, status: JobStatus) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    let found = poll_for(Duration::from_secs(20), || async {
        let job = get_job(host, id).await;
        let hit = job["status"] == status.code();
        *last.lock().unwrap() = job.clone();
        hit.then_some(job)
    })
    .await;
    let last = last.into_inner().unwrap();
    found.unwrap_or_else(|| panic!("job {id} did not become {status}; last seen {last}"))
}

/// Waits until the row in the table (the mirror of the jobs bucket) has `status`.
async fn wait_row(host: &TestHost, id: i64, status: JobStatus) {
    let store = host.store().clone();
    let ok = poll_for(Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            let job = store.job(id).await.unwrap();
            (job.job_status() == Some(status)).then_some(())
        }
    })
    .await;
    assert!(ok.is_some(), "row of job {id} never became {status}");
}

async fn tasks_run_to_done_and_error_and_are_listed(backend: Backend) {
    let s = setup(backend, true).await;
    let host = &s.host;

    let done = start(host, "count", json!([1, 2, 3])).await;
    let id = done["id"].as_i64().unwrap();
    assert_eq!(done["operation"], 5000);
    assert_eq!(done["plugin_id"], PLUGIN);
    assert_eq!(done["task"], "count");
    assert_eq!(done["params"], json!([1, 2, 3]));
    assert_eq!(done["user"]["name"], "user");
    let job = wait_status(host, id, JobStatus::Done).await;
    assert_eq!(job["status_name"], "DONE");
    assert_eq!(job["message"], "sum 6 for user (operation 5000)");
    wait_row(host, id, JobStatus::Done).await;

    let failed = start(host, "explode", Value::Null).await;
    let failed_id = failed["id"].as_i64().unwrap();
    assert_eq!(failed["operation"], 5001);
    let job = wait_status(host, failed_id, JobStatus::Error).await;
    assert!(
        job["message"]
            .as_str()
            .unwrap()
            .contains("the widget exploded"),
        "{job}"
    );
    wait_row(host, failed_id, JobStatus::Error).await;

    // Bad parameters reach the task, which fails with a message naming them.
    let bad = start(host, "count", json!({"not": "a list"})).await;
    let job = wait_status(host, bad["id"].as_i64().unwrap(), JobStatus::Error).await;
    assert!(
        job["message"].as_str().unwrap().contains("not valid"),
        "{job}"
    );

    // The list: the user's jobs, newest first; the superuser sees them too,
    // another user none of them.
    let (status, list) = call(host.as_user(Method::GET, "/api/v2/jobs/")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<i64> = list["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [bad["id"].as_i64().unwrap(), failed_id, id]);
    assert_eq!(list["results"][2]["status_name"], "DONE");
    let (_, list) = call(host.as_admin(Method::GET, "/api/v2/jobs/?limit=2&offset=1")).await;
    let ids: Vec<i64> = list["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [failed_id, id]);
    let (status, _) = call(host.as_user(Method::GET, "/api/v2/jobs/?limit=-1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (other, token) = hookbus_tests::host::user_with_token(host.store(), "other", false).await;
    let (status, list) = call(host.request(Method::GET, "/api/v2/jobs/", &token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list["results"],
        json!([]),
        "{} sees no jobs",
        other.username
    );
    let (status, body) =
        call(host.request(Method::GET, &format!("/api/v2/jobs/{id}/"), &token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = call(host.as_admin(Method::GET, &format!("/api/v2/jobs/{id}/"))).await;
    assert_eq!(status, StatusCode::OK);

    // Finished jobs cannot be cancelled.
    let (status, body) =
        call(host.as_user(Method::POST, &format!("/api/v2/jobs/{id}/cancel/"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["message"], format!("job {id} already finished (DONE)"));

    // Errors of the start endpoint.
    for (path, want) in [
        ("/api/v2/plugins/worker/tasks/nope/", StatusCode::NOT_FOUND),
        ("/api/v2/plugins/nobody/tasks/count/", StatusCode::NOT_FOUND),
    ] {
        let (status, body) = call(host.as_user(Method::POST, path).json(&json!(null))).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    let (status, _) = call(
        host.client
            .post(host.url("/api/v2/plugins/worker/tasks/count/")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(
        host.as_user(Method::POST, "/api/v2/plugins/worker/tasks/count/")
            .header("Content-Type", "application/json")
            .body("{nope"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = call(host.as_user(Method::GET, "/api/v2/jobs/999999/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(s.runs.count.load(Ordering::SeqCst), 2);
    if let Some(r) = s.running {
        r.shutdown().await.unwrap();
    }
    s.host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_to_done_and_error_and_are_listed_sqlite() {
    Box::pin(tasks_run_to_done_and_error_and_are_listed(Backend::Sqlite)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_to_done_and_error_and_are_listed_postgres() {
    Box::pin(tasks_run_to_done_and_error_and_are_listed(
        Backend::Postgres,
    ))
    .await;
}

async fn a_running_task_is_cancelled(backend: Backend) {
    let s = setup(backend, true).await;
    let host = &s.host;
    let job = start(host, "long", Value::Null).await;
    let id = job["id"].as_i64().unwrap();
    assert_eq!(job["operation"], 5002);
    wait_status(host, id, JobStatus::Processing).await;
    // PROCESSING is written just before the task function runs: wait for it.
    let started = poll_for(Duration::from_secs(10), || async {
        (s.runs.long_started.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert!(started.is_some(), "the task function never started");
    assert_eq!(s.runs.long_started.load(Ordering::SeqCst), 1);

    let (status, body) =
        call(host.as_user(Method::POST, &format!("/api/v2/jobs/{id}/cancel/"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status_name"], "CANCELED");
    assert_eq!(body["message"], "canceled by user");

    // The task sees the cancel and stops; its "done" does not overwrite CANCELED.
    let stopped = poll_for(Duration::from_secs(10), || async {
        (s.runs.long_stopped.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the running task never saw the cancel");
    // The worker has written its outcome (or left the state) by the time the
    // message is acked; the state stays CANCELED.
    let kv = jetstream::new(host.state().client.clone())
        .get_key_value(Subjects::default().jobs_bucket())
        .await
        .unwrap();
    let acked = poll_for(Duration::from_secs(10), || async {
        let info = jetstream::new(host.state().client.clone())
            .get_stream(Subjects::default().jobs_stream())
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        (info.state.messages == 0).then_some(())
    })
    .await;
    assert!(acked.is_some(), "the job message was never acknowledged");
    let state: JobState =
        serde_json::from_slice(&kv.get(JobState::key(PLUGIN, id)).await.unwrap().unwrap()).unwrap();
    assert_eq!(state.status, JobStatus::Canceled);
    let job = get_job(host, id).await;
    assert_eq!(job["status_name"], "CANCELED");
    wait_row(host, id, JobStatus::Canceled).await;

    // Cancelling again: already finished.
    let (status, body) =
        call(host.as_user(Method::POST, &format!("/api/v2/jobs/{id}/cancel/"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        body["message"],
        format!("job {id} already finished (CANCELED)")
    );

    // A running task that is not cancellable: 409, and it keeps running.
    let stubborn = start(host, "stubborn", Value::Null).await;
    let sid = stubborn["id"].as_i64().unwrap();
    wait_status(host, sid, JobStatus::Processing).await;
    let (status, body) =
        call(host.as_user(Method::POST, &format!("/api/v2/jobs/{sid}/cancel/"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cannot be cancelled"),
        "{body}"
    );
    assert_eq!(get_job(host, sid).await["status_name"], "PROCESSING");

    // Somebody else's job: 403.
    let (_, token) = hookbus_tests::host::user_with_token(host.store(), "other", false).await;
    let (status, _) =
        call(host.request(Method::POST, &format!("/api/v2/jobs/{sid}/cancel/"), &token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    if let Some(r) = s.running {
        r.shutdown().await.unwrap();
    }
    s.host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_cancelled_sqlite() {
    Box::pin(a_running_task_is_cancelled(Backend::Sqlite)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_cancelled_postgres() {
    Box::pin(a_running_task_is_cancelled(Backend::Postgres)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_queued_never_runs() {
    let s = setup(Backend::Sqlite, false).await;
    let host = &s.host;
    let job = start(host, "count", json!([5])).await;
    let id = job["id"].as_i64().unwrap();
    let (status, body) =
        call(host.as_user(Method::POST, &format!("/api/v2/jobs/{id}/cancel/"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status_name"], "CANCELED");

    // Now a worker comes: it takes the message, sees CANCELED, and skips it.
    let running = worker(s.runs.clone())
        .serve_on(&s._server, ServeOptions::default())
        .await
        .unwrap();
    // A second job, queued after the cancelled one, runs: once it is DONE the
    // worker has been through the first message.
    let second = start(host, "count", json!([1, 1])).await;
    let job = wait_status(host, second["id"].as_i64().unwrap(), JobStatus::Done).await;
    assert_eq!(job["message"], "sum 2 for user (operation 5000)");
    assert_eq!(
        s.runs.count.load(Ordering::SeqCst),
        1,
        "the cancelled job ran"
    );
    assert_eq!(get_job(host, id).await["status_name"], "CANCELED");
    running.shutdown().await.unwrap();
    s.host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_without_an_operation_id_range_cannot_start_tasks() {
    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    let running = worker(Arc::new(Runs::default()))
        .serve_on(&server, ServeOptions::default())
        .await
        .unwrap();
    let host = TestHost::start(&server, &db, &[PLUGIN]).await;
    host.wait_registered(&[PLUGIN]).await;
    let (status, body) = call(
        host.as_user(
            Method::POST,
            &format!("/api/v2/plugins/{PLUGIN}/tasks/count/"),
        )
        .json(&json!([1])),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("PLUGIN_OPERATION_ID_CONFIG"),
        "{body}"
    );
    // The path is the task route's: other methods are refused, not forwarded.
    let (status, _) = call(host.as_user(
        Method::GET,
        &format!("/api/v2/plugins/{PLUGIN}/tasks/count/"),
    ))
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    running.shutdown().await.unwrap();
    host.stop().await;
}

/// A worker written against the raw protocol (a pull consumer on the jobs stream
/// and compare-and-set on the jobs bucket, as a plugin in any language would):
/// it takes a job, marks it PROCESSING and then stops heart-beating; the host
/// marks it TIMEOUT after its task's `timeout_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_worker_takes_a_job_and_a_silent_one_times_out() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use core_events::jobs::JobRequest;
    use core_events::{PluginManifest, TaskSpec};
    use futures::StreamExt;

    let server = NatsServer::start().await;
    let db = TestDb::sqlite();
    let client = server.connect().await;
    provision(&client).await;
    let subjects = Subjects::default();
    let js = jetstream::new(client.clone());
    let mut manifest = PluginManifest::new("raw-worker", "Raw worker", "1.0.0");
    let mut task = TaskSpec::new("slowpoke", 3);
    task.timeout_secs = 1;
    manifest.tasks.push(task);
    js.get_key_value(subjects.registry_bucket())
        .await
        .unwrap()
        .put(
            manifest.registry_key(),
            serde_json::to_vec(&manifest).unwrap().into(),
        )
        .await
        .unwrap();
    let host = TestHost::start_with(&server, &db, |c| {
        c.enabled_plugins = vec!["raw-worker".into()];
        c.operation_id_config = r#"{"raw-worker": [6000, 6009]}"#.into();
    })
    .await;
    host.wait_registered(&["raw-worker"]).await;

    let (status, job) = call(
        host.as_user(Method::POST, "/api/v2/plugins/raw-worker/tasks/slowpoke/")
            .json(&json!({"size": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_i64().unwrap();

    let consumer = js
        .get_stream(subjects.jobs_stream())
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("jobs-raw-worker".into()),
            filter_subject: subjects.plugin_jobs("raw-worker"),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let message = batch.next().await.expect("the job is queued").unwrap();
    assert_eq!(message.subject.as_str(), "pagoda.jobs.raw-worker.slowpoke");
    assert_eq!(
        message
            .headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .as_str(),
        format!("job-{id}")
    );
    let request: JobRequest = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(request.job_id, id);
    assert_eq!(request.operation, 6003);
    assert_eq!(request.params, json!({"size": 3}));
    assert_eq!(request.user.unwrap().username, "user");

    let kv = js.get_key_value(subjects.jobs_bucket()).await.unwrap();
    let key = JobState::key("raw-worker", id);
    let entry = kv.entry(key.as_str()).await.unwrap().unwrap();
    let mut state: JobState = serde_json::from_slice(&entry.value).unwrap();
    assert_eq!(state.status, JobStatus::Preparing);
    state.status = JobStatus::Processing;
    state.message = "started".into();
    state.updated_at = chrono::Utc::now();
    kv.update(
        key.as_str(),
        serde_json::to_vec(&state).unwrap().into(),
        entry.revision,
    )
    .await
    .unwrap();
    let job = wait_status(&host, id, JobStatus::Processing).await;
    assert_eq!(job["message"], "started");

    // No heartbeat: TIMEOUT once the task's 1 s are over.
    let job = wait_status(&host, id, JobStatus::Timeout).await;
    assert_eq!(job["message"], "no heartbeat for 1 s");
    wait_row(&host, id, JobStatus::Timeout).await;
    let state: JobState =
        serde_json::from_slice(&kv.get(key.as_str()).await.unwrap().unwrap()).unwrap();
    assert_eq!(state.status, JobStatus::Timeout);
    message.ack().await.unwrap();
    host.stop().await;
}

/// The `jobs` table on its own: created PREPARING, listed newest first per user
/// (everyone's with no user), moved forward only.
async fn the_job_table_moves_forward_only(backend: Backend) {
    use core_events::jobs::NewJob;
    use store::NewUser;

    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let ada = store
        .create_user(&NewUser {
            username: "ada".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let new = |user: Option<i64>, task: &str| NewJob {
        user_id: user,
        operation: 5000,
        plugin_id: Some(PLUGIN.into()),
        task: task.into(),
        params: json!({"n": [1, 2]}),
    };
    let first = store.create_job(&new(Some(ada.id), "a")).await.unwrap();
    let second = store.create_job(&new(Some(ada.id), "b")).await.unwrap();
    let system = store.create_job(&new(None, "c")).await.unwrap();
    assert_eq!(first.job_status(), Some(JobStatus::Preparing));
    assert_eq!(first.status_name, "PREPARING");
    assert_eq!(first.params, json!({"n": [1, 2]}));
    assert_eq!(first.user.as_ref().unwrap().name, "ada");
    assert!(system.user.is_none());
    let err = store.create_job(&new(None, " ")).await.unwrap_err();
    assert!(err.to_string().contains("task name"), "{err}");

    let ids = |jobs: Vec<core_events::jobs::Job>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_jobs(Some(ada.id), 10, 0).await.unwrap()),
        [second.id, first.id]
    );
    assert_eq!(
        ids(store.list_jobs(None, 2, 1).await.unwrap()),
        [second.id, first.id]
    );

    let running = store
        .update_job_status(first.id, JobStatus::Processing, "started")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.status, 5);
    assert_eq!(running.message, "started");
    assert!(running.updated_time >= first.updated_time);
    // Back to PREPARING: refused, the row is unchanged.
    assert!(
        store
            .update_job_status(first.id, JobStatus::Preparing, "again")
            .await
            .unwrap()
            .is_none()
    );
    let done = store
        .update_job_status(first.id, JobStatus::Done, "all done")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status_name, "DONE");
    // Out of a final status: refused.
    for next in [JobStatus::Error, JobStatus::Canceled, JobStatus::Processing] {
        assert!(
            store
                .update_job_status(first.id, next, "late")
                .await
                .unwrap()
                .is_none()
        );
    }
    let row = store.job(first.id).await.unwrap();
    assert_eq!((row.status, row.message.as_str()), (2, "all done"));
    assert_eq!(
        store
            .plugin_jobs_in_status(JobStatus::Preparing, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(matches!(
        store.job(999_999).await,
        Err(store::StoreError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_table_moves_forward_only_sqlite() {
    the_job_table_moves_forward_only(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_table_moves_forward_only_postgres() {
    the_job_table_moves_forward_only(Backend::Postgres).await;
}

/// The table is reset but the jobs bucket kept (a new database on the same NATS):
/// job ids start again at 1, and the leftover state of the old job 1 must neither
/// stop the new job 1 from running nor be mirrored onto its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_database_with_an_old_jobs_bucket_still_runs_jobs() {
    let s = setup(Backend::Sqlite, true).await;
    let old = start(&s.host, "explode", Value::Null).await;
    let old_id = old["id"].as_i64().unwrap();
    wait_status(&s.host, old_id, JobStatus::Error).await;
    s.host.stop().await;

    let db = TestDb::sqlite();
    let host = TestHost::start_with(&s._server, &db, |c| {
        c.enabled_plugins = vec![PLUGIN.into()];
        c.operation_id_config = OPERATION_CONFIG.into();
    })
    .await;
    host.wait_registered(&[PLUGIN]).await;
    let job = start(&host, "count", json!([2, 3])).await;
    let id = job["id"].as_i64().unwrap();
    assert_eq!(id, old_id, "ids restart with the new table");
    let job = wait_status(&host, id, JobStatus::Done).await;
    assert_eq!(job["message"], "sum 5 for user (operation 5000)");
    wait_row(&host, id, JobStatus::Done).await;
    if let Some(r) = s.running {
        r.shutdown().await.unwrap();
    }
    host.stop().await;
}

/// `n` nested arrays around `1`, as JSON text.
fn nested_arrays(n: usize) -> String {
    format!("{}1{}", "[".repeat(n), "]".repeat(n))
}

/// Task parameters nesting deeper than `MAX_JSON_DEPTH` are refused with a 400;
/// a job request a worker cannot read (here: parameters 200 levels deep, past
/// serde_json's 128, published by hand) ends the job in ERROR with the reason
/// instead of leaving it PREPARING.
async fn unreadable_job_requests_end_in_error(backend: Backend) {
    use core_events::input::MAX_JSON_DEPTH;
    use core_events::jobs::{JobRequest, NewJob};

    let s = setup(backend, true).await;
    let host = &s.host;
    for depth in [MAX_JSON_DEPTH + 1, 127] {
        let (status, body) = call(
            host.as_user(
                Method::POST,
                &format!("/api/v2/plugins/{PLUGIN}/tasks/count/"),
            )
            .header("Content-Type", "application/json")
            .body(nested_arrays(depth)),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{backend:?} {depth}: {body}"
        );
        assert_eq!(body["error"], "invalid_input");
        let text = body["errors"][0].as_str().unwrap();
        assert!(
            text.starts_with("the task parameters: field '[0][0][0]' nests arrays and objects deeper than 32 levels"),
            "{text}"
        );
    }
    let (status, body) = call(
        host.as_user(
            Method::POST,
            &format!("/api/v2/plugins/{PLUGIN}/tasks/count/"),
        )
        .header("Content-Type", "application/json")
        .body(nested_arrays(MAX_JSON_DEPTH)),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{backend:?} at the limit: {body}"
    );

    // A request no worker can read, for a job that exists.
    let job = host
        .store()
        .create_job(&NewJob {
            user_id: Some(host.user.id),
            operation: 5000,
            plugin_id: Some(PLUGIN.into()),
            task: "count".into(),
            params: Value::Null,
        })
        .await
        .unwrap();
    let request = serde_json::to_string(&JobRequest {
        job_id: job.id,
        plugin: PLUGIN.into(),
        task: "count".into(),
        operation: 5000,
        params: json!("PARAMS"),
        user: None,
        created_at: job.created_time,
    })
    .unwrap()
    .replace("\"PARAMS\"", &nested_arrays(200));
    let js = jetstream::new(host.state().client.clone());
    js.publish(Subjects::default().job(PLUGIN, "count"), request.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let failed = wait_status(host, job.id, JobStatus::Error).await;
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.starts_with("the job request cannot be read: recursion limit exceeded"),
        "{backend:?}: {failed}"
    );
    wait_row(host, job.id, JobStatus::Error).await;
    if let Some(r) = s.running {
        r.shutdown().await.unwrap();
    }
    s.host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_job_requests_end_in_error_on_both_backends() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        Box::pin(unreadable_job_requests_end_in_error(backend)).await;
    }
}
