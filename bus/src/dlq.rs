//! Reading the dead-letter stream.

use async_nats::jetstream;
use core_events::Subjects;
use futures::StreamExt;

/// One message of the dead-letter stream.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// `<prefix>.dlq.<plugin>.<handler>` (`<prefix>.dlq._bus.malformed` for unreadable events).
    pub subject: String,
    /// Its sequence in the dead-letter stream.
    pub seq: u64,
    /// The record (a [`core_events::protocol::DeadLetter`]), or `Null` when the
    /// body is not JSON (a malformed event keeps its original bytes).
    pub body: serde_json::Value,
}

/// Every dead letter, oldest first, optionally only one plugin's.
///
/// # Errors
///
/// When the stream cannot be read.
pub async fn list(
    js: &jetstream::Context,
    subjects: &Subjects,
    plugin: Option<&str>,
) -> Result<Vec<StoredDeadLetter>, async_nats::Error> {
    let filter_subject = match plugin {
        Some(p) => format!("{}.dlq.{p}.>", subjects.prefix()),
        None => subjects.all_dead_letters(),
    };
    let consumer = js
        .get_stream(subjects.dlq_stream())
        .await?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject,
            ..Default::default()
        })
        .await?;
    let pending = usize::try_from(consumer.cached_info().num_pending)?;
    let mut out = Vec::with_capacity(pending);
    let mut messages = consumer.messages().await?.take(pending);
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
        out.push(StoredDeadLetter {
            subject: msg.subject.to_string(),
            seq,
            body: serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null),
        });
    }
    Ok(out)
}
