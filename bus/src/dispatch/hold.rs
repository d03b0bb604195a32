//! Holding and redelivery: events held at start-up until those an earlier
//! dispatcher left unfinished are back ([`Hold`]), progress acks for the events
//! in hand ([`keep_alive`]), and giving events back at stop ([`give_back`]).

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures::StreamExt;

/// Events held until those left unfinished are redelivered, so that per-object
/// order holds: at start-up, those an earlier dispatcher left (a crash or a
/// take-over); after a reconnect, those the server had sent on the dead
/// connection (they come back only after the ack wait).
pub(super) struct Hold {
    /// Unfinished events of the earlier dispatcher not yet back.
    pub(super) remaining: u64,
    /// The last stream sequence delivered before this dispatcher started.
    upto: u64,
    deadline: Option<tokio::time::Instant>,
    held: std::collections::BTreeMap<u64, jetstream::Message>,
}

impl Hold {
    pub(super) fn new(pending: u64, upto: u64, wait: Duration) -> Hold {
        if pending > 0 {
            tracing::info!(
                pending,
                upto,
                "an earlier dispatcher left events unfinished; holding newer events until they are redelivered"
            );
        }
        Hold::holding(pending, upto, wait)
    }

    /// After a reconnect: the server had delivered up to `delivered`, this
    /// dispatcher received up to `received`; the events between were on the dead
    /// connection (at most `delivered - received` of them: fewer when a partition
    /// filter skips some sequences, and then holding ends at `wait`). `None`
    /// when nothing was lost.
    pub(super) fn after_reconnect(received: u64, delivered: u64, wait: Duration) -> Option<Hold> {
        (delivered > received).then(|| {
            tracing::warn!(
                received,
                delivered,
                "reconnected: events sent on the lost connection come back after the ack wait; holding newer events until then"
            );
            Hold::holding(delivered - received, delivered, wait)
        })
    }

    /// The last stream sequence delivered before holding began.
    pub(super) fn upto(&self) -> u64 {
        self.upto
    }

    /// True while events are held.
    pub(super) fn is_holding(&self) -> bool {
        self.deadline.is_some()
    }

    fn holding(pending: u64, upto: u64, wait: Duration) -> Hold {
        Hold {
            remaining: pending,
            upto,
            deadline: (pending > 0).then(|| tokio::time::Instant::now() + wait),
            held: std::collections::BTreeMap::new(),
        }
    }

    /// The message back when nothing is held, else `None` (kept).
    pub(super) fn offer(&mut self, msg: jetstream::Message) -> Option<jetstream::Message> {
        if self.deadline.is_none() {
            return Some(msg);
        }
        let Ok(info) = msg.info() else {
            return Some(msg);
        };
        let seq = info.stream_sequence;
        // A second copy of a held event replaces the first (its reply subject is newer).
        if self.held.insert(seq, msg).is_none() && seq <= self.upto {
            self.remaining = self.remaining.saturating_sub(1);
        }
        None
    }

    /// Everything held, in stream order, once every unfinished event is back
    /// (holding ends); nothing otherwise.
    pub(super) fn all_back(&mut self) -> Vec<jetstream::Message> {
        if self.deadline.is_none() || self.remaining > 0 {
            return Vec::new();
        }
        tracing::info!(
            "unfinished events of an earlier dispatcher are back; dispatching in stream order"
        );
        self.release()
    }

    /// Everything held, in stream order; holding ends.
    pub(super) fn release(&mut self) -> Vec<jetstream::Message> {
        self.deadline = None;
        self.remaining = 0;
        std::mem::take(&mut self.held).into_values().collect()
    }

    /// Resolves when holding should end although not everything came back.
    pub(super) async fn expired(&self) {
        match self.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }
}

/// After the dispatcher stopped taking events: gives back (a nak with a short
/// delay) every message still buffered in the consumer stream, those that arrive
/// within a short quiet period, and the held ones, so the next holder of the
/// partition gets them within the delay rather than after the ack wait. The delay
/// keeps them from coming straight back to this dispatcher's own pull.
pub(super) async fn give_back(messages: &mut jetstream::consumer::pull::Stream, hold: &mut Hold) {
    use jetstream::AckKind;
    let delay = Some(Duration::from_millis(300));
    for msg in hold.release() {
        let _ = msg.ack_with(AckKind::Nak(delay)).await;
    }
    let quiet = Duration::from_millis(50);
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + quiet),
        messages.next(),
    )
    .await
    {
        let _ = msg.ack_with(AckKind::Nak(delay)).await;
    }
}

/// Sends progress acks for every in-flight event so the server does not
/// redeliver events that wait behind others of the same object.
/// `in_flight` gives the ack subjects of the events in hand; `ack_wait` is the
/// consumer's (a progress ack every third of it).
pub(super) async fn keep_alive(
    client: Client,
    ack_wait: Duration,
    in_flight: impl Fn() -> Vec<Subject>,
) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let replies = in_flight();
        for reply in replies {
            let _ = client.publish(reply, Bytes::from_static(b"+WPI")).await;
        }
    }
}
