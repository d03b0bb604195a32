//! Partitions: the share of the events one dispatcher takes ([`Partition`]), its
//! pinned-client consumer on NATS 2.11+, and where a new one starts. How the
//! buses share the partitions by leases is in `share`.

use std::time::Duration;

use async_nats::jetstream::consumer::PriorityPolicy;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

/// The share of the events one dispatcher takes: the objects whose
/// [`core_events::object_partition`] among `count` is `index`, which the events
/// stream writes as the last token of the stored subject, so the partition's
/// consumer filters them on the server. `count` 1 is everything
/// ([`Partition::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    /// This partition, `0..count`.
    pub index: u32,
    /// Number of partitions.
    pub count: u32,
}

impl Partition {
    /// One partition: every event.
    pub const ALL: Partition = Partition { index: 0, count: 1 };

    /// True for [`Partition::ALL`].
    pub fn is_all(self) -> bool {
        self.count <= 1
    }

    /// `p<index>of<count>`, or `None` for [`Partition::ALL`]: names this partition's
    /// consumer, lease and deferred queues.
    pub fn tag(self) -> Option<String> {
        (!self.is_all()).then(|| format!("p{}of{}", self.index, self.count))
    }

    /// The durable consumer of this partition on the events stream: `base`, or
    /// `<base>-p<index>of<count>`.
    pub fn consumer(self, base: &str) -> String {
        match self.tag() {
            Some(tag) => format!("{base}-{tag}"),
            None => base.to_owned(),
        }
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tag() {
            Some(tag) => f.write_str(&tag),
            None => f.write_str("all"),
        }
    }
}

/// The priority group of the dispatcher consumers on NATS 2.11 and newer
/// ([`pull::Config::priority_groups`], pinned client).
pub const PIN_GROUP: &str = "dispatch";

/// How long the server keeps a dispatcher pinned after its last pull; only
/// matters when a holder died without unpinning and the next one's unpin failed.
pub const PIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the connected server has pinned-client consumers (NATS 2.11 or newer).
pub fn supports_pinning(client: &async_nats::Client) -> bool {
    version_has_pinning(&client.server_info().version)
}

/// Whether a nats-server version (`2.11.0`, `2.12.1-RC.2`) is 2.11 or newer.
fn version_has_pinning(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 11)
}

/// Where a partition's new consumer starts. A fresh system starts at the
/// beginning of the stream. When the bus switches to partitions (or to another
/// number of them), a new partition consumer starts where the dispatcher
/// consumers that exist left off: after the lowest ack floor among them, so
/// nothing is skipped (a few events may be delivered again: delivery is
/// at-least-once).
pub(super) async fn first_delivery(
    stream: &jetstream::stream::Stream,
    base: &str,
    partition: Partition,
) -> jetstream::consumer::DeliverPolicy {
    use jetstream::consumer::DeliverPolicy;
    let name = partition.consumer(base);
    if stream.consumer_info(&name).await.is_ok() {
        return DeliverPolicy::All;
    }
    let mut names = stream.consumer_names();
    let mut floor: Option<u64> = None;
    while let Some(Ok(other)) = names.next().await {
        let ours = other == base || other.starts_with(&format!("{base}-p"));
        if !ours || other == name {
            continue;
        }
        if let Ok(info) = stream.consumer_info(&other).await {
            let f = info.ack_floor.stream_sequence;
            floor = Some(floor.map_or(f, |x| x.min(f)));
        }
    }
    match floor {
        Some(f) if f > 0 => {
            tracing::info!(consumer = %name, from = f + 1,
                "new partition consumer starts where the existing dispatcher consumers left off");
            DeliverPolicy::ByStartSequence {
                start_sequence: f + 1,
            }
        }
        _ => DeliverPolicy::All,
    }
}

/// Makes an existing dispatcher consumer filter `filter` (one made by an older
/// bus may filter every event); the rest of its configuration is kept.
///
/// # Errors
///
/// When the consumer cannot be updated: dispatching it unfiltered would deliver
/// other partitions' events twice.
pub(super) async fn filtered_consumer(
    stream: &jetstream::stream::Stream,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
    filter: &str,
) -> Result<(), async_nats::Error> {
    use jetstream::consumer::FromConsumer;

    let current = consumer.cached_info().config.clone();
    if current.filter_subject == filter && current.filter_subjects.is_empty() {
        return Ok(());
    }
    tracing::warn!(consumer = ?current.name, from = %current.filter_subject, to = %filter,
        "the dispatcher consumer filtered other events; filtering its partition now");
    let mut config = current;
    config.filter_subject = filter.to_owned();
    config.filter_subjects = Vec::new();
    let config = pull::Config::try_from_consumer_config(config)?;
    *consumer = stream.update_consumer(config).await?;
    Ok(())
}

/// Whether `consumer` is (now) a pinned-client consumer. One made before the
/// server had pinning (or by an older bus) gets `wanted`'s priority settings,
/// and keeps the rest of its configuration (where it starts, above all), when
/// the server has pinning; should that fail, it is used as it is (the lease
/// alone decides).
pub(super) async fn pinned_consumer(
    stream: &jetstream::stream::Stream,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
    wanted: pull::Config,
) -> bool {
    use jetstream::consumer::FromConsumer;

    let is_pinned = |c: &jetstream::consumer::Config| {
        c.priority_policy == PriorityPolicy::PinnedClient && !c.priority_groups.is_empty()
    };
    let current = consumer.cached_info().config.clone();
    if is_pinned(&current) || wanted.priority_policy != PriorityPolicy::PinnedClient {
        return is_pinned(&current);
    }
    let mut config = current;
    config.priority_groups = wanted.priority_groups;
    config.priority_policy = wanted.priority_policy;
    config.priority_timeout = wanted.priority_timeout;
    let updated = match pull::Config::try_from_consumer_config(config) {
        Ok(c) => stream
            .update_consumer(c)
            .await
            .map_err(async_nats::Error::from),
        Err(e) => Err(e),
    };
    match updated {
        Ok(updated) => {
            *consumer = updated;
            is_pinned(&consumer.cached_info().config)
        }
        Err(e) => {
            tracing::warn!(error = %e, consumer = ?consumer.cached_info().name,
                "cannot make the dispatcher consumer a pinned-client one; the lease alone keeps a second bus from dispatching");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::version_has_pinning;

    #[test]
    fn pinning_from_nats_server_2_11_on() {
        for (version, pinned) in [
            ("2.9.10", false),
            ("2.10.26", false),
            ("2.11.0", true),
            ("2.12.1-RC.2", true),
            ("2.15.1", true),
            ("3.0.0", true),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(version_has_pinning(version), pinned, "{version}");
        }
    }
}
