//! Leases: at most one holder of a named role at a time, with automatic
//! take-over when the holder dies.
//!
//! A lease is a key in the KV bucket `<prefix>_leases` whose value names the
//! holder. The bucket's `max_age` is the lease time: the server itself removes
//! a key that was not renewed within it (no clocks are compared between
//! machines). The holder renews by compare-and-set on the key's revision every
//! quarter of the lease time; a standby tries to create the key as often, and
//! wins once the key is gone (released on shutdown, or expired after a crash).
//!
//! A holder that cannot renew (it lost its NATS connection, or someone else holds
//! the key now) gives the lease up ([`Held::lost`]) before the lease time is over,
//! so two holders never act at once as long as the process is not paused for
//! longer than a quarter of the lease time.
//!
//! The dispatcher takes the lease `dispatcher` before it consumes, so that of
//! several `hookbus run` processes exactly one dispatches and the others stand by
//! (`hookbus health` shows which).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use core_events::Subjects;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A named lease in the leases bucket.
#[derive(Debug, Clone)]
pub struct Lease {
    kv: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
}

/// A lease this process holds; renewed in the background until released or lost.
#[derive(Debug)]
pub struct Held {
    lost: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Lease {
    /// The lease `key` for `holder` (a name unique per process), with the lease
    /// time of the bucket (`ttl`, which `hookbus provision` sets as its `max_age`).
    ///
    /// # Errors
    ///
    /// When the bucket does not exist (run `hookbus provision`).
    pub async fn open(
        js: &jetstream::Context,
        subjects: &Subjects,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, async_nats::Error> {
        let kv = js.get_key_value(subjects.leases_bucket()).await?;
        Ok(Lease {
            kv,
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl,
        })
    }

    /// Who holds the lease now, if anyone.
    ///
    /// # Errors
    ///
    /// When the bucket cannot be read.
    pub async fn holder(&self) -> Result<Option<String>, async_nats::Error> {
        Ok(self
            .kv
            .get(&self.key)
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The same bucket and holder, another key.
    pub fn with_key(&self, key: &str) -> Lease {
        Lease {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    /// The name this process holds leases under.
    pub fn holder_name(&self) -> &str {
        &self.holder
    }

    /// The key of this lease.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How often the holder renews and a standby tries again (a quarter of the
    /// lease time).
    pub fn interval(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(50))
    }

    /// Live keys of the bucket (held leases) that start with `prefix`, sorted.
    ///
    /// # Errors
    ///
    /// When the bucket cannot be read.
    pub async fn live_keys(&self, prefix: &str) -> Result<Vec<String>, async_nats::Error> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = self
            .kv
            .keys()
            .await?
            .try_filter(|k| std::future::ready(k.starts_with(prefix)))
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// One attempt to take the lease: `Ok(None)` when another process holds it.
    ///
    /// # Errors
    ///
    /// When the bucket cannot be written.
    pub async fn try_acquire(&self) -> Result<Option<Held>, async_nats::Error> {
        match self
            .kv
            .create(&self.key, Bytes::from(self.holder.clone()))
            .await
        {
            Ok(revision) => {
                tracing::info!(lease = %self.key, holder = %self.holder, "lease acquired");
                Ok(Some(self.hold(revision)))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this process holds the lease, or `shutdown` (then `None`).
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<Held> {
        let mut said = false;
        loop {
            match self.try_acquire().await {
                Ok(Some(held)) => return Some(held),
                Ok(None) => {
                    if !said {
                        let other = self.holder().await.ok().flatten().unwrap_or_default();
                        tracing::info!(lease = %self.key, holder = %other,
                            "lease held by another process; standing by");
                        said = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %self.key, error = %e, "cannot take the lease; retrying")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(self.interval()) => {}
            }
        }
    }

    /// The key's revision when it holds this holder's id (a put, not a delete or
    /// an expiry), else `None` (another holder, or gone).
    async fn own_revision(&self) -> Result<Option<u64>, kv::EntryError> {
        Ok(self.kv.entry(&self.key).await?.and_then(|entry| {
            (entry.operation == kv::Operation::Put && entry.value == self.holder.as_bytes())
                .then_some(entry.revision)
        }))
    }

    fn hold(&self, revision: u64) -> Held {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let lease = self.clone();
        let (lost2, stop2) = (lost.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // A panic here must not leave the holder believing it holds the lease.
            let _lost_on_panic = LostOnPanic(lost2.clone(), lease.key.clone());
            let mut revision = revision;
            let mut renewed = Instant::now();
            // Give up well before the server could expire the key.
            let give_up = lease.ttl * 3 / 4;
            loop {
                tokio::select! {
                    () = stop2.cancelled() => {
                        // Release, only if still ours: a standby takes over at once.
                        let _ = lease.kv.delete_expect_revision(&lease.key, Some(revision)).await;
                        tracing::info!(lease = %lease.key, "lease released");
                        return;
                    }
                    () = tokio::time::sleep(lease.interval()) => {}
                }
                match tokio::time::timeout(
                    lease.interval(),
                    lease
                        .kv
                        .update(&lease.key, Bytes::from(lease.holder.clone()), revision),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        revision = r;
                        renewed = Instant::now();
                    }
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        // An earlier renewal may have been stored with its answer
                        // lost (it timed out while the bucket changed leader, in a
                        // cluster): then the key still names this holder, at a newer
                        // revision, and the lease is ours. `renewed` stays as it was
                        // (when that write happened is not known).
                        match lease.own_revision().await {
                            Ok(Some(current)) => {
                                tracing::info!(lease = %lease.key, revision = current, "an earlier renewal was stored after all; keeping the lease");
                                revision = current;
                            }
                            Ok(None) => {
                                tracing::error!(lease = %lease.key, "lease taken by another process; giving it up");
                                lost2.cancel();
                                return;
                            }
                            // Unknown for now: tried again at the next renewal, until
                            // `give_up` below.
                            Err(e) => {
                                tracing::warn!(lease = %lease.key, error = %e, "lease renewal refused and the key cannot be read")
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(lease = %lease.key, error = %e, "lease renewal failed");
                    }
                    Err(_) => tracing::warn!(lease = %lease.key, "lease renewal timed out"),
                }
                if renewed.elapsed() >= give_up {
                    tracing::error!(lease = %lease.key, "lease not renewed in time; giving it up");
                    lost2.cancel();
                    return;
                }
            }
        });
        Held { lost, stop, task }
    }
}

impl Held {
    /// Cancelled when the lease is lost (not renewed in time, or taken over).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and releases the lease (if still held), so a standby takes
    /// over at once.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Marks the lease lost when its keeper task unwinds from a panic (it would no
/// longer be renewed, and another bus could take it while this one dispatches).
struct LostOnPanic(CancellationToken, String);

impl Drop for LostOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(lease = %self.1, "lease keeper panicked; the lease is given up");
            self.0.cancel();
        }
    }
}
