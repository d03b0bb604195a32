//! The example binaries, run as processes against a real nats-server.
#![allow(clippy::unwrap_used)]

mod sdk_common;

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::kv;
use core_events::Subjects;
use hookbus_tests::NatsServer;
use pagoda_plugin_sdk::{Hook, PluginManifest};
use sdk_common::{
    cancel_job, create_jobs, create_registry, deliver, delivery_headers, entity_event, entry_event,
    eventually, job_state, queue_job, service_error, wait_job,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A running example binary; killed on drop if still running.
struct Example {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Example {
    /// Runs `bin` (whose name is its plugin id) as its own NATS user.
    fn spawn(bin: &std::path::Path, server: &NatsServer, env: &[(&str, &str)]) -> Example {
        let mut cmd = Command::new(bin);
        let plugin = bin.file_name().unwrap().to_str().unwrap();
        cmd.envs(server.env_for(plugin))
            .env("RUST_LOG", "warn")
            .env_remove("PAGODA_SUBJECT_PREFIX")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Example { child, stdout }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .expect("a stdout line within 10 s")
            .unwrap()
            .expect("stdout still open")
    }

    /// SIGKILL: the process dies at once, in the middle of whatever it does.
    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM, then waits for a clean exit.
    async fn terminate(mut self) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("exit within 15 s after SIGTERM")
            .unwrap();
        assert!(exit.success(), "exit status {exit}");
    }
}

async fn registered(registry: &kv::Store, plugin: &str) -> PluginManifest {
    eventually(
        "the plugin to register",
        Duration::from_secs(15),
        || async move {
            let bytes = registry.get(format!("plugins.{plugin}")).await.ok()??;
            Some(PluginManifest::from_json(&bytes).unwrap())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_prints_one_line_per_delivery() {
    let server = NatsServer::start_for(&["hello-world", "audit-log", "flaky"]).await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    create_jobs(&client).await;
    let mut hello = Example::spawn(
        &hookbus_tests::binary("hello-world"),
        &server,
        &[("HELLO_PRIORITY", "20")],
    );
    let manifest = registered(&registry, "hello-world").await;
    assert!(manifest.handlers.iter().all(|h| h.priority == 20));
    let greet = &manifest.handlers[0];
    assert_eq!(greet.name, "greet_helloworld");
    assert_eq!(greet.entities, Some(vec!["helloworld".to_owned()]));
    assert!(
        manifest
            .handlers
            .iter()
            .any(|h| h.hook == Hook::EntityAfterCreate && h.entities.is_none())
    );

    let subjects = Subjects::default();
    let env = entry_event(Hook::EntryAfterCreate, "helloworld");
    let h = delivery_headers(&env, "hello-world", "greet_helloworld", 3, 1);
    let reply = deliver(
        &client,
        subjects.handler("hello-world", "greet_helloworld"),
        &env,
        h,
    )
    .await;
    assert_eq!(service_error(&reply), None);
    assert_eq!(
        hello.line().await,
        "[hello-world] greet_helloworld entry.after_create entity=helloworld object=entry/42 seq=3 attempt=1"
    );
    let env = entity_event(Hook::EntityAfterCreate, "server");
    let h = delivery_headers(&env, "hello-world", "entity_created", 4, 2);
    deliver(
        &client,
        subjects.handler("hello-world", "entity_created"),
        &env,
        h,
    )
    .await;
    assert_eq!(
        hello.line().await,
        "[hello-world] entity_created entity.after_create entity=server object=entity/7 seq=4 attempt=2"
    );
    hello.terminate().await;
    // The manifest stays registered after a clean stop.
    assert!(registry.get("plugins.hello-world").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_answers_its_synchronous_hooks() {
    use core_events::request::NewEntry;
    use core_events::sync::{
        BeforeModifyReply, BeforeModifyRequest, FieldError, GetAttrsReply, GetAttrsRequest,
        ValidateReply, ValidateRequest,
    };
    let server = NatsServer::start_for(&["hello-world", "audit-log", "flaky"]).await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    create_jobs(&client).await;
    let hello = Example::spawn(&hookbus_tests::binary("hello-world"), &server, &[]);
    let manifest = registered(&registry, "hello-world").await;
    for (name, hook) in [
        ("reject_forbidden", Hook::EntryValidate),
        ("fill_note", Hook::EntryBeforeCreate),
        ("add_greeting", Hook::EntryGetAttrs),
    ] {
        assert!(
            manifest
                .handlers
                .iter()
                .any(|h| h.name == name && h.hook == hook),
            "{name} in {manifest:?}"
        );
    }
    let subjects = Subjects::default();
    let entity = core_events::sample::entity(1, "helloworld");
    let ask = |handler: &str, body: Vec<u8>| {
        let client = client.clone();
        let subject = subjects.handler("hello-world", handler);
        async move {
            let reply = client.request(subject, body.into()).await.unwrap();
            assert_eq!(service_error(&reply), None);
            reply.payload
        }
    };

    for (name, errors) in [
        ("fine", vec![]),
        (
            "a forbidden name",
            vec![FieldError::field(
                "name",
                "entry name 'a forbidden name' contains 'forbidden'",
            )],
        ),
    ] {
        let request = ValidateRequest {
            entity: entity.clone(),
            entry: NewEntry::named(name),
            existing: None,
            user: None,
        };
        let reply = ask("reject_forbidden", serde_json::to_vec(&request).unwrap()).await;
        let reply: ValidateReply = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply.errors, errors);
    }

    let request = BeforeModifyRequest {
        entity: Some(entity.clone()),
        entry: None,
        data: NewEntry::named("x"),
        user: None,
    };
    let reply = ask("fill_note", serde_json::to_vec(&request).unwrap()).await;
    let reply: BeforeModifyReply<NewEntry> = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply.data.unwrap().note, "created with hello-world");

    let entry = core_events::sample::entry(3, "ACME", &entity);
    let request: GetAttrsRequest<core_events::Attribute> = GetAttrsRequest {
        entity: None,
        entry: Some(entry),
        attrs: vec![],
        user: None,
    };
    let reply = ask("add_greeting", serde_json::to_vec(&request).unwrap()).await;
    let reply: GetAttrsReply<core_events::Attribute> = serde_json::from_slice(&reply).unwrap();
    let attrs = reply.attrs.unwrap();
    assert_eq!(attrs.len(), 1);
    assert_eq!(attrs[0].name, "greeting");
    assert_eq!(attrs[0].value, "Hello, ACME!");
    hello.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_appends_each_event_once_across_restarts() {
    let server = NatsServer::start_for(&["hello-world", "audit-log", "flaky"]).await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let path_str = path.to_str().unwrap();
    let subjects = Subjects::default();

    let entry = entry_event(Hook::EntryAfterDelete, "customer");
    let entity = entity_event(Hook::EntityAfterUpdate, "customer");
    let entry_subject = subjects.handler("audit-log", "entry_after_delete");
    let entity_subject = subjects.handler("audit-log", "entity_after_update");

    let mut audit = Example::spawn(
        &hookbus_tests::binary("audit-log"),
        &server,
        &[("AUDIT_LOG_PATH", path_str)],
    );
    let manifest = registered(&registry, "audit-log").await;
    assert_eq!(manifest.handlers.len(), 7);
    assert!(manifest.handlers.iter().all(|h| h.priority == 200));
    for attempt in 1..=2 {
        let h = delivery_headers(&entry, "audit-log", "entry_after_delete", 10, attempt);
        let reply = deliver(&client, entry_subject.clone(), &entry, h).await;
        assert_eq!(service_error(&reply), None);
    }
    let h = delivery_headers(&entity, "audit-log", "entity_after_update", 11, 1);
    deliver(&client, entity_subject.clone(), &entity, h).await;
    assert_eq!(
        audit.line().await,
        "[audit-log] entry_after_delete entry.after_delete entity=customer object=entry/42 seq=10 attempt=1"
    );
    assert!(
        audit
            .line()
            .await
            .starts_with("[audit-log] entity_after_update")
    );
    audit.terminate().await;

    // A restarted audit-log remembers what it wrote.
    let audit = Example::spawn(
        &hookbus_tests::binary("audit-log"),
        &server,
        &[("AUDIT_LOG_PATH", path_str)],
    );
    let c = &client;
    let ping = eventually(
        "audit-log to serve again",
        Duration::from_secs(15),
        || async move { c.request("$SRV.PING.audit-log", "".into()).await.ok() },
    );
    ping.await;
    let h = delivery_headers(&entry, "audit-log", "entry_after_delete", 10, 3);
    let reply = deliver(&client, entry_subject, &entry, h).await;
    assert_eq!(service_error(&reply), None);
    audit.terminate().await;

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["event_id"], entry.id.to_string());
    assert_eq!(lines[0]["hook"], "entry.after_delete");
    assert_eq!(lines[0]["entity"], "customer");
    assert_eq!(lines[0]["object"], "entry/42");
    assert_eq!(lines[0]["stream_seq"], 10);
    assert_eq!(lines[0]["event"]["pagodaseq"], 10);
    assert_eq!(lines[0]["event"]["data"]["entry"]["id"], 42);
    assert_eq!(lines[1]["event_id"], entity.id.to_string());
    assert_eq!(lines[1]["hook"], "entity.after_update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_fails_transiently_or_permanently() {
    let server = NatsServer::start_for(&["hello-world", "audit-log", "flaky"]).await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    let subject = Subjects::default().handler("flaky", "always_fails");
    let env = entry_event(Hook::EntryAfterCreate, "customer");

    for (mode, code) in [("transient", "500"), ("permanent", "400")] {
        let mut flaky = Example::spawn(
            &hookbus_tests::binary("flaky"),
            &server,
            &[("FLAKY_MODE", mode)],
        );
        let manifest = registered(&registry, "flaky").await;
        let h = &manifest.handlers[0];
        assert_eq!((h.name.as_str(), h.priority), ("always_fails", 150));
        assert_eq!(h.retry_backoff_ms, [50, 100]);
        let c = &client;
        let ping = eventually("flaky to serve", Duration::from_secs(15), || async move {
            c.request("$SRV.PING.flaky", "".into()).await.ok()
        });
        ping.await;
        let reply = deliver(
            &client,
            subject.clone(),
            &env,
            delivery_headers(&env, "flaky", "always_fails", 1, 2),
        )
        .await;
        assert_eq!(
            service_error(&reply),
            Some((code.to_owned(), "flaky plugin fails on purpose".to_owned()))
        );
        assert_eq!(
            flaky.line().await,
            "[flaky] always_fails entry.after_create entity=customer object=entry/42 seq=1 attempt=2 -> error"
        );
        flaky.terminate().await;
    }
}

fn greet_request(query: &[(&str, &str)]) -> Vec<u8> {
    let request = pagoda_plugin_sdk::ApiRequest {
        route: "greet".into(),
        method: "GET".into(),
        path: "/greet/".into(),
        query: query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        headers: Default::default(),
        body: serde_json::Value::Null,
        user: Some(core_events::User {
            id: 1,
            username: "admin".into(),
            email: String::new(),
            first_name: String::new(),
            last_name: String::new(),
            is_active: true,
            is_superuser: true,
            date_joined: chrono::Utc::now(),
        }),
    };
    serde_json::to_vec(&request).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_greets_over_its_api_route_and_counts_in_its_task() {
    use core_events::jobs::{JobState, JobStatus};
    use pagoda_plugin_sdk::ApiResponse;
    use serde_json::json;

    let server = NatsServer::start_for(&["hello-world", "audit-log", "flaky"]).await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    let jobs = create_jobs(&client).await;
    let mut hello = Example::spawn(&hookbus_tests::binary("hello-world"), &server, &[]);
    let manifest = registered(&registry, "hello-world").await;
    assert_eq!(manifest.api.len(), 1);
    assert_eq!(
        (
            manifest.api[0].name.as_str(),
            manifest.api[0].method.as_str(),
            manifest.api[0].path.as_str()
        ),
        ("greet", "GET", "/greet")
    );
    assert!(!manifest.api[0].public);
    assert_eq!(manifest.tasks.len(), 1);
    assert_eq!(
        (manifest.tasks[0].name.as_str(), manifest.tasks[0].offset),
        ("count", 0)
    );

    // The API route.
    let subject = Subjects::default().api("hello-world", "greet");
    let greet = |query: &[(&str, &str)]| {
        let (client, subject, body) = (client.clone(), subject.clone(), greet_request(query));
        async move { client.request(subject, body.into()).await.unwrap() }
    };
    let reply = greet(&[]).await;
    assert_eq!(
        ApiResponse::parse(&reply.payload).unwrap().body,
        json!({"message": "Hello, admin!", "plugin": "hello-world"})
    );
    let reply = greet(&[("name", "Ada")]).await;
    assert_eq!(
        ApiResponse::parse(&reply.payload).unwrap().body["message"],
        "Hello, Ada!"
    );
    let reply = greet(&[("fail", "true")]).await;
    assert_eq!(
        service_error(&reply),
        Some(("400".to_owned(), "greeting failed on purpose".to_owned()))
    );

    // The task: done, warning, error.
    let wait = Duration::from_secs(10);
    let final_state = |s: &JobState| s.status.is_final();
    let p = JobStatus::Preparing;
    queue_job(
        &client,
        &jobs,
        "hello-world",
        "count",
        1,
        json!({"to": 3, "delay_ms": 10}),
        p,
    )
    .await;
    let state = wait_job(&jobs, "hello-world", 1, wait, final_state).await;
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Done, "counted to 3")
    );
    assert_eq!(hello.line().await, "[hello-world] count job=1 counted to 3");
    queue_job(
        &client,
        &jobs,
        "hello-world",
        "count",
        2,
        json!({"to": 0}),
        p,
    )
    .await;
    let state = wait_job(&jobs, "hello-world", 2, wait, final_state).await;
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Warning, "nothing to count")
    );
    queue_job(
        &client,
        &jobs,
        "hello-world",
        "count",
        3,
        json!({"fail": true}),
        p,
    )
    .await;
    let state = wait_job(&jobs, "hello-world", 3, wait, final_state).await;
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Error, "asked to fail")
    );
    queue_job(
        &client,
        &jobs,
        "hello-world",
        "count",
        4,
        json!({"to": "ten"}),
        p,
    )
    .await;
    let state = wait_job(&jobs, "hello-world", 4, wait, final_state).await;
    assert_eq!(state.status, JobStatus::Error);
    assert!(
        state.message.contains("job parameters are not valid"),
        "{}",
        state.message
    );

    // Cancelled while counting: it stops promptly; the job stays CANCELED.
    queue_job(
        &client,
        &jobs,
        "hello-world",
        "count",
        5,
        json!({"to": 1000, "delay_ms": 20}),
        p,
    )
    .await;
    let running = wait_job(&jobs, "hello-world", 5, wait, |s| {
        s.message.starts_with("counted 2 ")
    })
    .await;
    assert_eq!(running.status, JobStatus::Processing);
    cancel_job(&jobs, "hello-world", 5, "cancelled").await;
    // Skip the lines of jobs 2-4, then the cancelled count's own line.
    let mut line = hello.line().await;
    while !line.starts_with("[hello-world] count job=5 ") {
        line = hello.line().await;
    }
    assert!(
        line.starts_with("[hello-world] count job=5 cancelled after "),
        "{line}"
    );
    let (_, state) = job_state(&jobs, "hello-world", 5).await.unwrap();
    assert_eq!(state.status, JobStatus::Canceled);
    hello.terminate().await;
}

/// A worker killed in the middle of a task: the job is redelivered after the
/// ack wait (30 s) to the next worker, which runs it again to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_was_killed_finishes_on_the_next_one() {
    use core_events::jobs::JobStatus;
    use serde_json::json;

    let server = NatsServer::start_for(&["hello-world", "audit-log", "flaky"]).await;
    let client = server.connect().await;
    let registry = create_registry(&client, "pagoda_registry").await;
    let jobs = create_jobs(&client).await;
    let hello = Example::spawn(&hookbus_tests::binary("hello-world"), &server, &[]);
    registered(&registry, "hello-world").await;
    let params = json!({"to": 30, "delay_ms": 100});
    queue_job(
        &client,
        &jobs,
        "hello-world",
        "count",
        7,
        params,
        JobStatus::Preparing,
    )
    .await;
    let wait = Duration::from_secs(10);
    wait_job(&jobs, "hello-world", 7, wait, |s| {
        s.message.starts_with("counted 2 ")
    })
    .await;
    hello.kill().await;

    let mut again = Example::spawn(&hookbus_tests::binary("hello-world"), &server, &[]);
    // Restarted from the beginning once the message comes back (ack wait 30 s).
    let restarted = wait_job(&jobs, "hello-world", 7, Duration::from_secs(45), |s| {
        s.message == "restarted" || s.message == "counted 1 of 30"
    })
    .await;
    assert_eq!(restarted.status, JobStatus::Processing);
    let state = wait_job(&jobs, "hello-world", 7, wait, |s| s.status.is_final()).await;
    assert_eq!(
        (state.status, state.message.as_str()),
        (JobStatus::Done, "counted to 30")
    );
    assert_eq!(
        again.line().await,
        "[hello-world] count job=7 counted to 30"
    );
    again.terminate().await;
}
