//! Group commit of entry creations.
//!
//! A creation whose synchronous hooks passed is queued here; a writer task takes
//! everything queued (up to [`MAX_BATCH`]) and writes it with
//! [`Store::create_entries`]: one transaction, one statement for all the
//! entries, one for all their values, one for all their events. Each request is
//! answered after that commit, with what a creation of its own would have
//! answered (the entry, or its error: a taken name fails that request only).
//!
//! While a batch is being written the next requests queue, so the batch size
//! follows the load: one request alone is written at once, as before; many
//! concurrent ones share a transaction (and its commit, the costly part).
//! One writer task on both databases (SQLite has one writer connection; on
//! PostgreSQL a second writer mostly wrote single creations while the first
//! wrote a batch, and measured no faster).

use std::sync::Arc;

use core_events::Entry;
use store::{NewEntry, NewEntryInput, Store, StoreError, WriteContext};
use tokio::sync::{mpsc, oneshot};

use hookbus::call_metrics::CallMetrics;

/// Most creations written in one transaction.
pub const MAX_BATCH: usize = 256;

/// Creations waiting for a writer; beyond, requests wait to be queued.
const QUEUE: usize = 4 * MAX_BATCH;

type Reply = oneshot::Sender<Result<Entry, StoreError>>;

/// The queue of entry creations and its writer task, which ends when the last
/// [`EntryWriter`] is dropped.
#[derive(Debug)]
pub struct EntryWriter {
    queue: mpsc::Sender<(NewEntryInput, Reply)>,
}

impl EntryWriter {
    /// Starts the writer task of `store` (on the current Tokio runtime).
    pub fn start(store: Store) -> EntryWriter {
        EntryWriter::with_metrics(store, Arc::new(CallMetrics::new()))
    }

    /// As [`EntryWriter::start`], recording each batch's size in `metrics`.
    pub fn with_metrics(store: Store, metrics: Arc<CallMetrics>) -> EntryWriter {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, rx, metrics));
        EntryWriter { queue }
    }

    /// Creates an entry, in a batch with the creations queued with it; answers
    /// after the batch committed, as [`Store::create_entry`] would.
    ///
    /// # Errors
    ///
    /// As [`Store::create_entry`]; [`StoreError::Db`] when the writer has stopped.
    pub async fn create_entry(
        &self,
        entity_id: i64,
        entry: NewEntry,
        ctx: WriteContext,
    ) -> Result<Entry, StoreError> {
        let (reply, answer) = oneshot::channel();
        let input = NewEntryInput {
            entity_id,
            entry,
            ctx,
        };
        if self.queue.send((input, reply)).await.is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> StoreError {
    StoreError::Db(sqlx::Error::PoolClosed)
}

/// The writer: takes what is queued (waiting for the first), writes it, answers.
/// Runs one batch; a panic in it is logged and the writer task goes on with
/// the next batch instead of being silently gone (as the bus's supervised
/// tasks, [`hookbus::supervise`]). `None` when it panicked.
async fn guarded<T>(batch: impl std::future::Future<Output = T>) -> Option<T> {
    use futures::FutureExt as _;
    match std::panic::AssertUnwindSafe(batch).catch_unwind().await {
        Ok(value) => Some(value),
        Err(payload) => {
            tracing::error!(
                panic = %hookbus::supervise::panic_message(&*payload),
                "the entry writer panicked on a batch; its creations are answered with an \
                 error and the writer goes on"
            );
            None
        }
    }
}

async fn write_batches(
    store: Store,
    mut rx: mpsc::Receiver<(NewEntryInput, Reply)>,
    metrics: Arc<CallMetrics>,
) {
    let mut taken = Vec::with_capacity(MAX_BATCH);
    let mut inputs = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut taken, MAX_BATCH).await == 0 {
            return;
        }
        for (input, reply) in taken.drain(..) {
            inputs.push(input);
            replies.push(reply);
        }
        metrics.entry_batch(inputs.len());
        let started = std::time::Instant::now();
        let Some(results) = guarded(store.create_entries(&inputs)).await else {
            // The batch's callers get "the writer has stopped" (their replies are
            // dropped); nothing of it was committed (its transaction or statement
            // was dropped with the panic); the writer goes on.
            replies.clear();
            inputs.clear();
            continue;
        };
        tracing::trace!(
            n = inputs.len(),
            us = started.elapsed().as_micros(),
            "entry creations written"
        );
        for (reply, result) in replies.drain(..).zip(results) {
            // The request may have gone (client disconnected): nothing to answer.
            let _ = reply.send(result);
        }
        inputs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_that_panics_is_answered_none_and_the_writer_goes_on() {
        assert_eq!(guarded(async { 7 }).await, Some(7));
        let panicked: Option<()> = guarded(async { panic!("boom") }).await;
        assert_eq!(panicked, None);
        assert_eq!(guarded(async { 8 }).await, Some(8));
    }
}
