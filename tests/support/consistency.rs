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
        let client = server.connect().await;
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
