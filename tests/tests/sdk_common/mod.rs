//! Helpers of the SDK's tests (`sdk_*.rs`): sample events and delivery headers,
//! deliveries as the bus makes them, the registry and jobs buckets as the bus
//! creates them. The nats-server is the harness's (`hookbus_tests::NatsServer`).
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use chrono::Utc;
use core_events::protocol::headers;
use core_events::{Entity, EntityEvent, Entry, EntryEvent, Envelope, Hook, ObjectRef, User};

/// Creates the registry bucket, as the bus would.
pub async fn create_registry(client: &async_nats::Client, bucket: &str) -> kv::Store {
    jetstream::new(client.clone())
        .create_key_value(kv::Config {
            bucket: bucket.to_owned(),
            history: 5,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Polls `check` every 20 ms until it gives `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn entity(name: &str) -> Entity {
    Entity {
        id: 7,
        name: name.to_owned(),
        note: String::new(),
        is_active: true,
        created_time: Utc::now(),
        created_user: None,
        attrs: vec![],
    }
}

fn user() -> User {
    User {
        id: 1,
        username: "admin".into(),
        email: String::new(),
        first_name: String::new(),
        last_name: String::new(),
        is_active: true,
        is_superuser: true,
        date_joined: Utc::now(),
    }
}

/// An entry event for `hook` about entry 42 of `entity`.
pub fn entry_event(hook: Hook, entity_name: &str) -> Envelope<EntryEvent> {
    let now = Utc::now();
    Envelope::entry(
        hook,
        "/pagoda/test",
        EntryEvent {
            entity: entity(entity_name),
            entry: Entry {
                id: 42,
                name: "ACME".into(),
                note: String::new(),
                is_active: true,
                schema: ObjectRef {
                    id: 7,
                    name: entity_name.to_owned(),
                },
                created_time: now,
                created_user: None,
                updated_time: now,
                attrs: vec![],
            },
            previous: None,
            user: Some(user()),
        },
    )
}

/// An entity event for `hook` about entity 7 named `entity_name`.
pub fn entity_event(hook: Hook, entity_name: &str) -> Envelope<EntityEvent> {
    Envelope::entity(
        hook,
        "/pagoda/test",
        EntityEvent {
            entity: entity(entity_name),
            previous: None,
            user: Some(user()),
        },
    )
}

/// The headers the bus sets on a delivery.
pub fn delivery_headers<D>(
    env: &Envelope<D>,
    plugin: &str,
    handler: &str,
    seq: u64,
    attempt: u32,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, env.id.to_string().as_str());
    if let Some(object) = &env.subject {
        h.insert(headers::OBJECT, object.as_str());
    }
    if let Some(hook) = env.hook() {
        h.insert(headers::HOOK, hook.name());
    }
    h.insert(headers::ENTITY, env.pagodaentity.as_str());
    h.insert(headers::STREAM_SEQ, seq.to_string().as_str());
    h.insert(headers::ATTEMPT, attempt.to_string().as_str());
    h.insert(headers::PLUGIN, plugin);
    h.insert(headers::HANDLER, handler);
    h
}

/// Sends a delivery and returns the reply.
pub async fn deliver<D: serde::Serialize>(
    client: &async_nats::Client,
    subject: String,
    env: &Envelope<D>,
    headers: HeaderMap,
) -> async_nats::Message {
    let payload = serde_json::to_vec(env).unwrap();
    client
        .request_with_headers(subject, headers, payload.into())
        .await
        .unwrap()
}

/// The `Nats-Service-Error-Code` and `Nats-Service-Error` of a reply, if any.
pub fn service_error(reply: &async_nats::Message) -> Option<(String, String)> {
    let h = reply.headers.as_ref()?;
    let code = h.get(headers::SERVICE_ERROR_CODE)?.as_str().to_owned();
    let text = h
        .get(headers::SERVICE_ERROR)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some((code, text))
}

/// Polls until nobody answers on `subject` (no responders, or no reply within
/// 250 ms), or panics after 5 s.
pub async fn until_nobody_answers(client: &async_nats::Client, subject: &str) {
    eventually(
        &format!("nobody to answer on {subject}"),
        Duration::from_secs(5),
        || async move {
            let request = async_nats::Request::new()
                .payload(bytes::Bytes::new())
                .timeout(Some(Duration::from_millis(250)));
            client
                .send_request(subject.to_owned(), request)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
}

/// Creates the jobs work-queue stream and the jobs bucket, as the bus would;
/// gives the bucket.
pub async fn create_jobs(client: &async_nats::Client) -> kv::Store {
    let js = jetstream::new(client.clone());
    let subjects = core_events::Subjects::default();
    js.create_stream(jetstream::stream::Config {
        name: subjects.jobs_stream(),
        subjects: vec![subjects.all_jobs()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_key_value(kv::Config {
        bucket: subjects.jobs_bucket(),
        history: 5,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Queues a job as the host does: creates its state (`status`), then publishes
/// the request into the jobs stream (`Nats-Msg-Id: job-<id>`).
pub async fn queue_job(
    client: &async_nats::Client,
    jobs: &kv::Store,
    plugin: &str,
    task: &str,
    job_id: i64,
    params: serde_json::Value,
    status: core_events::jobs::JobStatus,
) {
    use core_events::jobs::{JobRequest, JobState};
    let state = JobState {
        job_id,
        plugin: plugin.to_owned(),
        task: task.to_owned(),
        status,
        message: String::new(),
        updated_at: Utc::now(),
    };
    jobs.create(
        JobState::key(plugin, job_id),
        serde_json::to_vec(&state).unwrap().into(),
    )
    .await
    .unwrap();
    let request = JobRequest {
        job_id,
        plugin: plugin.to_owned(),
        task: task.to_owned(),
        operation: 5000,
        params,
        user: Some(user()),
        created_at: Utc::now(),
    };
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("job-{job_id}").as_str());
    jetstream::new(client.clone())
        .publish_with_headers(
            core_events::Subjects::default().job(plugin, task),
            h,
            serde_json::to_vec(&request).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A job's state and its revision.
pub async fn job_state(
    jobs: &kv::Store,
    plugin: &str,
    job_id: i64,
) -> Option<(u64, core_events::jobs::JobState)> {
    let entry = jobs
        .entry(core_events::jobs::JobState::key(plugin, job_id))
        .await
        .unwrap()?;
    Some((
        entry.revision,
        serde_json::from_slice(&entry.value).unwrap(),
    ))
}

/// Cancels a job as the host does: a compare-and-set to CANCELED with
/// `message`, tried again while a progress note or a heartbeat of the worker
/// lands in between (for up to 10 s).
pub async fn cancel_job(jobs: &kv::Store, plugin: &str, job_id: i64, message: &str) {
    use core_events::jobs::{JobState, JobStatus};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (revision, state) = job_state(jobs, plugin, job_id)
            .await
            .unwrap_or_else(|| panic!("job {job_id} of {plugin} has no state"));
        let canceled = JobState {
            status: JobStatus::Canceled,
            message: message.to_owned(),
            ..state
        };
        let value = serde_json::to_vec(&canceled).unwrap().into();
        match jobs
            .update(JobState::key(plugin, job_id), value, revision)
            .await
        {
            Ok(_) => return,
            Err(e)
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision
                    && tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("cannot cancel job {job_id} of {plugin}: {e}"),
        }
    }
}

/// Waits (up to `timeout`) for a job's state to satisfy `done`.
pub async fn wait_job(
    jobs: &kv::Store,
    plugin: &str,
    job_id: i64,
    timeout: Duration,
    done: impl Fn(&core_events::jobs::JobState) -> bool,
) -> core_events::jobs::JobState {
    let done = &done;
    eventually(
        &format!("job {job_id} of {plugin} to reach the expected state"),
        timeout,
        || async move {
            job_state(jobs, plugin, job_id)
                .await
                .map(|(_, s)| s)
                .filter(done)
        },
    )
    .await
}
