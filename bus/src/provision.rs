//! Idempotent provisioning of the events stream, the dead-letter stream, the
//! deferred-delivery stream and the registry bucket.
//!
//! Safe at every start: what is missing is created; what exists is checked, and an
//! incompatible existing stream is reported, never silently changed. Retention
//! limits (`max_age`, `max_bytes`) that differ from the settings are updated in
//! place (logged as a warning): they are the bus's configuration.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use core_events::Subjects;

use crate::config::StreamSettings;

/// A problem provisioning streams or the bucket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// An existing stream's configuration conflicts with what the bus needs.
    #[error(
        "stream '{stream}' exists with an incompatible configuration: {differences}; fix or delete it (nats stream info {stream})"
    )]
    Incompatible {
        /// Stream name.
        stream: String,
        /// What differs, in words.
        differences: String,
    },
    /// The events stream has the layout of before issue 13: subjects
    /// `<prefix>.events.>` without the partition transform.
    #[error(
        "stream '{stream}' has the old subject layout (subjects {subjects:?}, no partition transform): events are now published on '<prefix>.events.<object>.<action>.<entity>.<id>' and the stream appends the partition; migrate it as docs/deploy.md#migrating-the-events-stream-to-the-partitioned-layout says"
    )]
    OldLayout {
        /// Stream name.
        stream: String,
        /// Its subjects.
        subjects: Vec<String>,
    },
    /// The events stream has another number of partitions than configured.
    #[error(
        "stream '{stream}' has {have} partition(s) but this bus is configured with {want} (--partitions): the number is fixed when the stream is created; start the bus with --partitions {have}, or change the stream's as docs/deploy.md#changing-the-number-of-partitions says"
    )]
    Partitions {
        /// Stream name.
        stream: String,
        /// The stream's partition count.
        have: u32,
        /// The configured count.
        want: u32,
    },
    /// JetStream answered with an error.
    #[error("jetstream request for '{what}' failed: {source}")]
    JetStream {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
}

impl ProvisionError {
    /// Whether the error can pass by itself: the cluster cannot place a stream's
    /// replicas yet ("no suitable peers for placement", JetStream error 10005, just
    /// after a node started or while one restarts), JetStream is temporarily
    /// unavailable (10008, no meta leader yet), or a request timed out. A refused
    /// permission, an incompatible stream or a wrong partition count is not.
    pub fn is_transient(&self) -> bool {
        match self {
            ProvisionError::JetStream { source, .. } => {
                let text = hookbus_kit::process::error_chain(source.as_ref());
                ["error code 10005)", "error code 10008)", "timed out"]
                    .iter()
                    .any(|mark| text.contains(mark))
            }
            _ => false,
        }
    }
}

/// How long the bus, the relay, the host and `hookbus provision` keep trying
/// while the errors are [transient](ProvisionError::is_transient): a cluster
/// started together with them takes a few seconds before it can place R3 streams.
pub const PROVISION_PATIENCE: Duration = Duration::from_secs(30);

/// [`provision`], tried again while its error is
/// [transient](ProvisionError::is_transient), for up to `patience` (waits of
/// 200 ms doubling to 2 s, each logged as a warning).
///
/// # Errors
///
/// The first error that is not transient, or the last one when `patience` is over.
pub async fn provision_patiently(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
    patience: Duration,
) -> Result<(), ProvisionError> {
    let deadline = Instant::now() + patience;
    let mut wait = Duration::from_millis(200);
    loop {
        match provision(js, subjects, settings).await {
            Err(e) if e.is_transient() && Instant::now() + wait < deadline => {
                tracing::warn!(
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "provisioning failed for now; trying again"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            done => return done,
        }
    }
}

fn js_err(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError::JetStream { what, source }
}

/// The KV buckets [`provision`] creates: the registry, the job states and the
/// leases.
pub fn bucket_names(subjects: &Subjects) -> [String; 3] {
    [
        subjects.registry_bucket(),
        subjects.jobs_bucket(),
        subjects.leases_bucket(),
    ]
}

/// The stream configurations the bus wants. The events stream's partition
/// count is `settings.partitions` (1 when unset).
pub fn stream_configs(subjects: &Subjects, settings: &StreamSettings) -> [stream::Config; 5] {
    let (source, destination) = subjects.events_transform(settings.partitions.unwrap_or(1));
    [
        stream::Config {
            name: subjects.events_stream(),
            description: Some("Pagoda hook events (CloudEvents JSON)".into()),
            subjects: vec![subjects.events_stream_subjects()],
            subject_transform: Some(stream::SubjectTransform {
                source,
                destination,
            }),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.events_max_age,
            max_bytes: settings.events_max_bytes,
            max_message_size: settings.max_event_bytes,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: subjects.dlq_stream(),
            description: Some("Pagoda hook bus dead letters".into()),
            subjects: vec![subjects.all_dead_letters()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.dlq_max_age,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: subjects.deferred_stream(),
            description: Some(
                "Pagoda hook bus deliveries waiting for a plugin with no replica".into(),
            ),
            subjects: vec![subjects.all_deferred()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            ..Default::default()
        },
        stream::Config {
            name: subjects.jobs_stream(),
            description: Some("Pagoda plugin jobs waiting for a worker".into()),
            subjects: vec![subjects.all_jobs()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            ..Default::default()
        },
        stream::Config {
            name: subjects.audit_stream(),
            description: Some(
                "Pagoda audit trail: admin actions (DLQ replay and purge, registry changes, tokens)"
                    .into(),
            ),
            subjects: vec![subjects.all_audit()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.audit_max_age,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            allow_direct: true,
            ..Default::default()
        },
    ]
}

/// Creates what is missing and checks what exists.
///
/// # Errors
///
/// [`ProvisionError::Incompatible`] when an existing stream has other subjects,
/// retention or storage; [`ProvisionError::JetStream`] when JetStream fails.
/// Other `max_age` / `max_bytes` limits are not an error: they are updated.
pub async fn provision(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> Result<(), ProvisionError> {
    let mut settings = settings.clone();
    if let Some(have) = events_partitions(js, subjects).await? {
        match settings.partitions {
            Some(want) if want.max(1) != have => {
                return Err(ProvisionError::Partitions {
                    stream: subjects.events_stream(),
                    have,
                    want,
                });
            }
            _ => settings.partitions = Some(have),
        }
    }
    for wanted in stream_configs(subjects, &settings) {
        ensure_stream(js, wanted).await?;
    }
    ensure_buckets(js, subjects, &settings).await?;
    Ok(())
}

/// The partition count of the events stream (the `N` of its subject transform),
/// or `None` when there is no events stream yet, or its transform is not the
/// bus's ([`provision`] then says how it differs).
///
/// # Errors
///
/// [`ProvisionError::OldLayout`] for an events stream of the old layout
/// (subjects `<prefix>.events.>`, no partition transform),
/// [`ProvisionError::JetStream`] when JetStream fails.
pub async fn events_partitions(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<Option<u32>, ProvisionError> {
    let name = subjects.events_stream();
    let mut stream = match js.get_stream(&name).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(js_err(format!("get stream {name}"))(e.into())),
    };
    let info = stream
        .info()
        .await
        .map_err(|e| js_err(format!("stream info {name}"))(e.into()))?;
    stream_partitions(subjects, &info.config)
}

/// The partition count an events stream's configuration declares: `None` when
/// its transform is not the bus's (provisioning then reports how it differs).
///
/// # Errors
///
/// [`ProvisionError::OldLayout`] for the layout of before the partition transform.
fn stream_partitions(
    subjects: &Subjects,
    config: &stream::Config,
) -> Result<Option<u32>, ProvisionError> {
    if config.subject_transform.is_none() && config.subjects == [subjects.all_events()] {
        return Err(ProvisionError::OldLayout {
            stream: config.name.clone(),
            subjects: config.subjects.clone(),
        });
    }
    Ok(config
        .subject_transform
        .as_ref()
        .filter(|t| t.source == subjects.events_stream_subjects())
        .and_then(|t| subjects.partitions_of_transform(&t.destination)))
}

async fn ensure_stream(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<(), ProvisionError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| ProvisionError::JetStream {
                    what: format!("stream info {name}"),
                    source: e.into(),
                })?;
            let have = &info.config;
            let mut diffs = Vec::new();
            if have.subjects != wanted.subjects {
                diffs.push(format!(
                    "subjects are {:?}, need {:?}",
                    have.subjects, wanted.subjects
                ));
            }
            if have.subject_transform != wanted.subject_transform {
                diffs.push(format!(
                    "subject transform is {:?}, need {:?}",
                    have.subject_transform, wanted.subject_transform
                ));
            }
            if have.retention != wanted.retention {
                diffs.push(format!(
                    "retention is {:?}, need {:?}",
                    have.retention, wanted.retention
                ));
            }
            if have.storage != wanted.storage {
                diffs.push(format!(
                    "storage is {:?}, need {:?}",
                    have.storage, wanted.storage
                ));
            }
            if have.duplicate_window < wanted.duplicate_window {
                diffs.push(format!(
                    "duplicate window is {:?}, need at least {:?}",
                    have.duplicate_window, wanted.duplicate_window
                ));
            }
            if !diffs.is_empty() {
                return Err(ProvisionError::Incompatible {
                    stream: name,
                    differences: diffs.join("; "),
                });
            }
            // 0 and -1 both mean unlimited (the server reports -1).
            let unlimited = |b: i64| if b <= 0 { -1 } else { b };
            if have.max_age != wanted.max_age
                || unlimited(have.max_bytes) != unlimited(wanted.max_bytes)
            {
                // Retention is the bus's setting: apply it (both limits are
                // editable on a live stream). Lowering them removes older events now.
                let mut updated = have.clone();
                updated.max_age = wanted.max_age;
                updated.max_bytes = wanted.max_bytes;
                js.update_stream(&updated)
                    .await
                    .map_err(|e| ProvisionError::JetStream {
                        what: format!("update the retention of stream {name}"),
                        source: e.into(),
                    })?;
                tracing::warn!(
                    stream = %name,
                    old_max_age = ?have.max_age,
                    max_age = ?wanted.max_age,
                    old_max_bytes = have.max_bytes,
                    max_bytes = wanted.max_bytes,
                    "updated the stream's retention to the bus's settings (events beyond the new limits are removed)"
                );
            }
            Ok(())
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(wanted)
                .await
                .map_err(|e| ProvisionError::JetStream {
                    what: format!("create stream {name}"),
                    source: e.into(),
                })?;
            tracing::info!(stream = %name, "created stream");
            Ok(())
        }
        Err(e) => Err(js_err(format!("get stream {name}"))(e.into())),
    }
}

async fn ensure_buckets(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> Result<(), ProvisionError> {
    let bucket = |bucket: String, description: &str, history: i64| kv::Config {
        bucket,
        description: description.into(),
        history,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    ensure_bucket(
        js,
        bucket(
            subjects.registry_bucket(),
            "Pagoda hook bus plugin registry",
            5,
        ),
        false,
    )
    .await?;
    ensure_bucket(
        js,
        bucket(
            subjects.jobs_bucket(),
            "Pagoda plugin job states (key <plugin>.<job-id>)",
            5,
        ),
        false,
    )
    .await?;
    // The leases bucket's max_age is the lease time, kept equal to the setting.
    ensure_bucket(
        js,
        kv::Config {
            max_age: settings.lease_ttl,
            ..bucket(
                subjects.leases_bucket(),
                "Pagoda hook bus leases (one active dispatcher)",
                1,
            )
        },
        true,
    )
    .await
}

/// Creates the bucket `wanted` describes when it is missing; with
/// `keep_max_age`, an existing one gets its `max_age`.
async fn ensure_bucket(
    js: &jetstream::Context,
    wanted: kv::Config,
    keep_max_age: bool,
) -> Result<(), ProvisionError> {
    let bucket = wanted.bucket.clone();
    if js.get_key_value(&bucket).await.is_ok() {
        if keep_max_age {
            let name = format!("KV_{bucket}");
            let mut stream = js
                .get_stream(&name)
                .await
                .map_err(|e| js_err(format!("stream info {name}"))(e.into()))?;
            let info = stream
                .info()
                .await
                .map_err(|e| js_err(format!("stream info {name}"))(e.into()))?;
            if info.config.max_age != wanted.max_age {
                let mut updated = info.config.clone();
                updated.max_age = wanted.max_age;
                // The server refuses a duplicate window longer than max_age.
                if !wanted.max_age.is_zero() {
                    updated.duplicate_window = updated.duplicate_window.min(wanted.max_age);
                }
                js.update_stream(&updated)
                    .await
                    .map_err(|e| js_err(format!("update {name}"))(e.into()))?;
            }
        }
        return Ok(());
    }
    js.create_key_value(wanted)
        .await
        .map_err(|e| js_err(format!("create bucket {bucket}"))(e.into()))?;
    tracing::info!(bucket = %bucket, "created bucket");
    Ok(())
}
