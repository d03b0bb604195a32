//! Sharing the partitions among buses by leases ([`dispatch_under_lease`]): each
//! bus announces itself, takes its fair share of the partition leases and runs a
//! dispatcher for each partition it holds.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::consumer::{DispatchError, Dispatcher};
use super::partition::Partition;
use crate::config::{BusConfig, DispatcherSettings};
use crate::lease::{Held, Lease};
use crate::registry::Registry;
use crate::stats::DispatchStats;

/// The dispatcher lease of `partition`: `dispatcher` for one partition,
/// `dispatcher.p<index>of<count>` otherwise.
fn partition_lease_key(partition: Partition) -> String {
    match partition.tag() {
        Some(tag) => format!("dispatcher.{tag}"),
        None => "dispatcher".to_owned(),
    }
}

/// A partition this bus dispatches: its dispatcher task (which releases the
/// partition's lease when it ends) and the token that stops it.
struct PartitionRun {
    stop: CancellationToken,
    task: JoinHandle<Result<(), DispatchError>>,
}

impl PartitionRun {
    /// Waits for the dispatcher to end (its lease is then released) and logs a
    /// failure; the partition is free to be taken again.
    async fn finish(self, partition: u32) {
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(partition, error = %e, "partition dispatcher failed"),
            Err(e) => tracing::error!(partition, error = %e, "partition dispatcher panicked"),
        }
    }
}

/// Keeps this bus announced in the leases bucket (`members.<holder>`): takes
/// the key again when it was lost.
async fn announce(member: &Lease, presence: &mut Option<Held>) {
    if presence.as_ref().is_some_and(|h| !h.lost().is_cancelled()) {
        return;
    }
    if let Some(old) = presence.take() {
        old.release().await;
    }
    match member.try_acquire().await {
        Ok(h) => *presence = h,
        Err(e) => tracing::warn!(error = %e, "cannot announce this bus in the leases bucket"),
    }
}

/// Everything a partition's dispatcher needs, shared by all of them.
#[derive(Clone)]
struct DispatchParts {
    client: async_nats::Client,
    config: BusConfig,
    settings: DispatcherSettings,
    registry: Registry,
    stats: Arc<DispatchStats>,
}

impl DispatchParts {
    /// Dispatches `partition` while `held` is held; releases it when done.
    fn spawn(&self, held: Held, partition: Partition, stop: CancellationToken) -> PartitionRun {
        let parts = self.clone();
        let run = stop.clone();
        let task = tokio::spawn(async move {
            let lost = held.lost();
            let stop = run.clone();
            let watcher = tokio::spawn(async move {
                tokio::select! {
                    () = lost.cancelled() => stop.cancel(),
                    () = stop.cancelled() => {}
                }
            });
            let result = Dispatcher::run_partition(
                parts.client,
                parts.config.subjects.clone(),
                parts.settings,
                parts.registry,
                parts.stats,
                partition,
                run.clone(),
            )
            .await;
            run.cancel();
            let _ = watcher.await;
            if held.lost().is_cancelled() {
                tracing::warn!(%partition, "dispatcher lease lost; partition given up");
            }
            held.release().await;
            result
        });
        PartitionRun { stop, task }
    }
}

/// Dispatches the partitions this bus holds a lease for; stands by for the others.
///
/// Every bus announces itself with a lease `members.<holder>` and, once per lease
/// interval, counts the live members: each takes up to its fair share,
/// `ceil(partitions / members)`, of the partition leases (`dispatcher` when not
/// partitioned), preferring the partitions `p` with `p % members == its rank`, and
/// gives back what it holds beyond its share, so partitions spread over the buses
/// and move to the others when one dies (after the lease time) or joins. A lost
/// lease stops that partition's dispatcher (its unfinished events go to the next
/// holder, which holds newer events of the partition until they are back).
///
/// A bus configured with another number of partitions than the dispatcher leases
/// held now does not take any (it logs why and stands by), so that two schemes
/// never dispatch at once during a change.
pub(crate) async fn dispatch_under_lease(
    lease: Lease,
    client: async_nats::Client,
    config: BusConfig,
    registry: Registry,
    stats: Arc<DispatchStats>,
    shutdown: CancellationToken,
) -> Result<(), DispatchError> {
    let count = config.dispatcher.partitions.max(1);
    let mut settings = config.dispatcher.clone();
    // Unfinished events must be given up before the next holder sees them again.
    settings.shutdown_grace = settings.shutdown_grace.min(settings.ack_wait / 3);
    let parts = DispatchParts {
        client,
        config,
        settings,
        registry,
        stats: stats.clone(),
    };
    let member_key = format!("members.{}", kv_key_safe(lease.holder_name()));
    let member = lease.with_key(&member_key);
    let mut presence: Option<Held> = None;
    let mut running: std::collections::BTreeMap<u32, PartitionRun> = Default::default();
    let mut conflict_said = false;
    let mut tick = tokio::time::interval(lease.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if count > 1 {
        // Announce this bus, then let buses started together see each other before
        // taking partitions (the first tick of an interval is immediate).
        announce(&member, &mut presence).await;
        tick.tick().await;
        tokio::select! {
            () = shutdown.cancelled() => {}
            _ = tick.tick() => {}
        }
    }
    stats.set_standby(true);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Partitions whose dispatcher ended (lease lost, or an error).
        let ended: Vec<u32> = running
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            if let Some(r) = running.remove(&p) {
                r.finish(p).await;
            }
        }
        announce(&member, &mut presence).await;
        let keys = match lease.live_keys("").await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the leases bucket; keeping what this bus holds");
                continue;
            }
        };
        let ours =
            |k: &str| (0..count).any(|i| k == partition_lease_key(Partition { index: i, count }));
        let others: Vec<&String> = keys
            .iter()
            .filter(|k| (k.as_str() == "dispatcher" || k.starts_with("dispatcher.")) && !ours(k))
            .collect();
        if !others.is_empty() {
            if !conflict_said {
                tracing::error!(partitions = count, held = ?others,
                    "other buses dispatch with another number of partitions; standing by until they stop (every bus needs the same --partitions)");
                conflict_said = true;
            }
            continue;
        }
        conflict_said = false;
        let members: Vec<&String> = keys.iter().filter(|k| k.starts_with("members.")).collect();
        let n = u32::try_from(members.len().max(1)).unwrap_or(1);
        let rank = members
            .iter()
            .position(|k| **k == member_key)
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0);
        let share = count.div_ceil(n) as usize;
        let preferred = |p: u32| p % n == rank % n;
        // Give back what is beyond the share, the least preferred first.
        while running.len() > share {
            let Some(p) = running.keys().copied().max_by_key(|&p| (!preferred(p), p)) else {
                break;
            };
            if let Some(r) = running.remove(&p) {
                tracing::info!(
                    partition = p,
                    share,
                    members = n,
                    "giving a partition back to balance the buses"
                );
                r.stop.cancel();
                r.finish(p).await;
            }
        }
        // Take free partitions up to the share, the preferred first.
        let mut order: Vec<u32> = (0..count).filter(|p| !running.contains_key(p)).collect();
        order.sort_by_key(|&p| (!preferred(p), p));
        for p in order {
            if running.len() >= share {
                break;
            }
            let partition = Partition { index: p, count };
            let key = partition_lease_key(partition);
            if keys.contains(&key) {
                continue;
            }
            match lease.with_key(&key).try_acquire().await {
                Ok(Some(held)) => {
                    let run = parts.spawn(held, partition, shutdown.child_token());
                    running.insert(p, run);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(lease = %key, error = %e, "cannot take the lease; retrying")
                }
            }
        }
        stats.set_standby(running.is_empty());
    }
    for (p, r) in std::mem::take(&mut running) {
        r.stop.cancel();
        r.finish(p).await;
    }
    if let Some(h) = presence {
        h.release().await;
    }
    stats.set_standby(false);
    Ok(())
}

/// `s` with every character a KV key cannot hold replaced by `_`.
fn kv_key_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
