//! The end-of-test consistency check of the headline promise: every committed
//! change is exactly one event in the stream, no event exists without a commit,
//! and nothing is left behind in the outbox.
//!
//! A test records each write the host answered 2xx in a [`Ledger`] (the hook and
//! the object it changed), then calls [`Ledger::check`] once its faults and bad
//! input are over:
//!
//! ```no_run
//! # async fn demo(server: &hookbus_tests::NatsServer, store: &store::Store) {
//! use core_events::Hook;
//! use hookbus_tests::consistency::Ledger;
//!
//! let mut ledger = Ledger::default();
//! // … a POST answered 201 for entry 42:
//! ledger.committed(Hook::EntryAfterCreate, "entry/42");
//! ledger.check(server, store).await;
//! # }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use core_events::Hook;
use store::{Store, outbox};

use crate::{NatsServer, poll_until, stream_events};

/// How long [`Ledger::check`] waits for the outbox to drain and the stream to
/// hold every committed change.
pub const SETTLE: Duration = Duration::from_secs(30);

/// The changes a test saw committed (2xx answers), in the order it saw them.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    writes: Vec<(Hook, String)>,
}

impl Ledger {
    /// Records one committed change: its notification hook and its object
    /// (`entry/<id>` or `entity/<id>`).
    pub fn committed(&mut self, hook: Hook, object: impl Into<String>) {
        self.writes.push((hook, object.into()));
    }

    /// How many changes were recorded.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Waits (at most [`SETTLE`]) until the outbox of `store` is empty and the
    /// events stream holds as many events as changes were recorded, then checks
    /// that each recorded change is exactly one event (same hook, same object),
    /// that no event exists without a recorded change, and that the events of one
    /// object are in the order of its changes.
    ///
    /// # Panics
    ///
    /// On any difference, naming it.
    pub async fn check(&self, server: &NatsServer, store: &Store) {
        Box::pin(self.check_on(&server.connect().await, store)).await;
    }

    /// [`check`](Ledger::check) through `client` (the operator's, with every
    /// right): on a [`Cluster`](crate::cluster::Cluster), from
    /// [`Cluster::connect`](crate::cluster::Cluster::connect).
    ///
    /// # Panics
    ///
    /// As [`check`](Ledger::check).
    pub async fn check_on(&self, client: &async_nats::Client, store: &Store) {
        let client = client.clone();
        let expected = self.writes.len();
        let settled = poll_until(SETTLE, || async {
            let rows = outbox::backlog(store.pool())
                .await
                .map(|b| b.rows)
                .unwrap_or(-1);
            rows == 0 && stream_events(&client).await.len() >= expected
        })
        .await;
        let backlog = outbox::backlog(store.pool())
            .await
            .expect("the outbox can be read");
        assert_eq!(
            backlog.rows, 0,
            "the outbox still holds {} row(s) after {SETTLE:?}: committed changes not published",
            backlog.rows
        );
        let events = stream_events(&client).await;
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for event in &events {
            // `subject` is optional (a foreign host's event): then from `data`.
            let hook = event.hook().expect("an event of a known hook");
            let object = core_events::envelope::object_of_event(
                hook.object(),
                &serde_json::to_vec(event).expect("an event serializes"),
            )
            .unwrap_or_else(|e| panic!("event {}: {e}", event.id))
            .to_string();
            seen.entry(object)
                .or_default()
                .push(event.event_type.clone());
        }
        let mut recorded: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (hook, object) in &self.writes {
            recorded
                .entry(object.clone())
                .or_default()
                .push(hook.event_type());
        }
        for (object, hooks) in &recorded {
            let got = seen.get(object).cloned().unwrap_or_default();
            assert_eq!(
                &got, hooks,
                "object {object}: the committed changes (left, in order) are not exactly the stream's events"
            );
        }
        for (object, hooks) in &seen {
            assert!(
                recorded.contains_key(object),
                "object {object} has events {hooks:?} in the stream but no committed change"
            );
        }
        assert!(
            settled,
            "the stream holds {} events for {expected} committed changes",
            events.len()
        );
    }
}

/// What a plugin handler received, for the delivery half of the check: every
/// event in the stream delivered at least once (none lost, none dead-lettered
/// when the handler never fails), and the first deliveries of one object in
/// stream order. Clone it into the handler and [`record`](Deliveries::record)
/// each call.
#[derive(Debug, Default, Clone)]
pub struct Deliveries {
    calls: std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>,
}

/// One handler call ([`Deliveries`]).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event id.
    pub event_id: String,
    /// `entry/<id>` or `entity/<id>`.
    pub object: String,
    /// When the handler was called.
    pub at: std::time::Instant,
}

impl Deliveries {
    /// Records one call of the handler.
    pub fn record(&self, event_id: impl Into<String>, object: impl Into<String>) {
        self.lock().push(Delivery {
            event_id: event_id.into(),
            object: object.into(),
            at: std::time::Instant::now(),
        });
    }

    /// Every call so far, in the order they happened.
    pub fn all(&self) -> Vec<Delivery> {
        self.lock().clone()
    }

    /// How many calls so far (redeliveries included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True before the first call.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Distinct events delivered so far.
    pub fn distinct(&self) -> usize {
        self.lock()
            .iter()
            .map(|d| d.event_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    /// Waits (at most [`SETTLE`]) until every event of the stream that `wanted`
    /// selects (by its type, `pagoda.entry.after_create`, …) was delivered, then
    /// checks that each was and that nothing outside the stream was, and reports
    /// the redeliveries and the objects whose first deliveries did not come in
    /// stream order ([`DeliveryReport::assert_in_order`]).
    ///
    /// # Panics
    ///
    /// When an event was never delivered or one outside the stream was.
    pub async fn check_on(
        &self,
        client: &async_nats::Client,
        wanted: impl Fn(&str) -> bool,
    ) -> DeliveryReport {
        let expected: Vec<(String, String)> = stream_events(client)
            .await
            .iter()
            .filter(|e| wanted(&e.event_type))
            .map(|e| {
                let hook = e.hook().expect("an event of a known hook");
                let object = core_events::envelope::object_of_event(
                    hook.object(),
                    &serde_json::to_vec(e).expect("an event serializes"),
                )
                .unwrap_or_else(|err| panic!("event {}: {err}", e.id))
                .to_string();
                (e.id.to_string(), object)
            })
            .collect();
        let all_in = poll_until(SETTLE, || async {
            let got: std::collections::BTreeSet<String> =
                self.all().into_iter().map(|d| d.event_id).collect();
            expected.iter().all(|(id, _)| got.contains(id))
        })
        .await;
        let calls = self.all();
        let got: std::collections::BTreeSet<&str> =
            calls.iter().map(|d| d.event_id.as_str()).collect();
        let missing: Vec<&(String, String)> = expected
            .iter()
            .filter(|(id, _)| !got.contains(id.as_str()))
            .collect();
        assert!(
            all_in && missing.is_empty(),
            "{} of {} events never reached the handler within {SETTLE:?}: {missing:?}",
            missing.len(),
            expected.len()
        );
        let known: std::collections::BTreeSet<&str> =
            expected.iter().map(|(id, _)| id.as_str()).collect();
        let foreign: Vec<&Delivery> = calls
            .iter()
            .filter(|d| !known.contains(d.event_id.as_str()))
            .collect();
        assert!(
            foreign.is_empty(),
            "deliveries of events not in the stream: {foreign:?}"
        );
        // Per object: the first delivery of each event, in stream order.
        let mut first_seen: Vec<&Delivery> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for d in &calls {
            if seen.insert(d.event_id.as_str()) {
                first_seen.push(d);
            }
        }
        let mut delivered: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for d in first_seen {
            delivered
                .entry(d.object.as_str())
                .or_default()
                .push(d.event_id.as_str());
        }
        let mut in_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, object) in &expected {
            in_stream
                .entry(object.as_str())
                .or_default()
                .push(id.as_str());
        }
        let mut out_of_order = Vec::new();
        for (object, ids) in &in_stream {
            if delivered.get(object) != Some(ids) {
                out_of_order.push(format!(
                    "object {object}: first deliveries {:?}, stream order {ids:?}",
                    delivered.get(object)
                ));
            }
        }
        DeliveryReport {
            redeliveries: calls.len() - expected.len(),
            out_of_order,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Delivery>> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What [`Deliveries::check_on`] found beyond completeness.
#[derive(Debug, Clone, Default)]
pub struct DeliveryReport {
    /// Calls that were redeliveries of an event delivered before.
    pub redeliveries: usize,
    /// Objects whose events were first delivered out of stream order.
    pub out_of_order: Vec<String>,
}

impl DeliveryReport {
    /// Asserts that every object's events were first delivered in stream order.
    ///
    /// # Panics
    ///
    /// When one was not, naming the objects.
    pub fn assert_in_order(&self) {
        assert!(
            self.out_of_order.is_empty(),
            "per-object order broken:\n{}",
            self.out_of_order.join("\n")
        );
    }
}
