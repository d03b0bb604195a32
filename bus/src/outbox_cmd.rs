//! The commands over the model store and its outbox: `migrate`, `relay` (also
//! started by `run` when a database is configured) and `rebuild`.

use async_nats::jetstream;
use core_events::Subjects;
use hookbus_kit::replay::ReplayError;
use store::Store;
use store::StoreError;
use tokio_util::sync::CancellationToken;

use crate::config::StreamSettings;
use crate::provision::ProvisionError;
use crate::relay::{Relay, RelayError, RelaySettings};

/// Why `migrate`, `relay` or `rebuild` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxCmdError {
    /// The database could not be opened (its URL without the password).
    #[error("cannot open the database {url}")]
    Open {
        /// The database, password redacted.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A migration failed.
    #[error("cannot migrate the database {url}")]
    Migrate {
        /// The database, password redacted.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The streams could not be provisioned.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The relay stopped.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A rebuild into a store that is not empty, without `force`.
    #[error(
        "the store at {0} is not empty; rebuild into an empty database (or pass --force to apply the stream over it)"
    )]
    NotEmpty(String),
    /// The events stream could not be read.
    #[error("cannot read the stream {stream}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
    /// The events stream's retention removed its first events.
    #[error(
        "the stream {stream} no longer holds events 1..{upto} (removed by its retention); a rebuild needs every event from the first"
    )]
    Truncated {
        /// The stream's name.
        stream: String,
        /// The last event removed.
        upto: u64,
    },
    /// The store failed during a rebuild.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The events could not be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

type Result<T> = std::result::Result<T, OutboxCmdError>;

fn open_error(url: &str) -> impl FnOnce(StoreError) -> OutboxCmdError {
    let url = redact(url);
    move |source| OutboxCmdError::Open { url, source }
}

/// Opens the store at `url` and applies the migrations (`hookbus migrate`): the
/// reference host's tables (`users`, `entities`, `entity_attrs`, `entries`,
/// `attribute_values`, `api_tokens`, `jobs`) and the outbox `hookbus_outbox`.
///
/// # Errors
///
/// When the database cannot be reached or a migration fails.
pub async fn open_migrated(url: &str) -> Result<Store> {
    let store = Store::connect(url).await.map_err(open_error(url))?;
    store
        .migrate()
        .await
        .map_err(|source| OutboxCmdError::Migrate {
            url: redact(url),
            source,
        })?;
    Ok(store)
}

/// Runs the outbox relay of the store at `url` until `shutdown` (provisioning
/// the streams first, so it can start before the bus).
///
/// It creates no table and runs no migration: it needs only `hookbus_outbox`,
/// whoever created it (`hookbus migrate`, or a host with the DDL of
/// `docs/outbox.md`), waits until it exists and checks its columns.
///
/// # Errors
///
/// When the database cannot be opened, the streams cannot be provisioned, or
/// the outbox table lacks columns of the contract.
pub async fn relay(
    client: async_nats::Client,
    subjects: Subjects,
    streams: &StreamSettings,
    url: &str,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = Store::connect(url).await.map_err(open_error(url))?;
    let js = jetstream::new(client);
    crate::provision::provision_patiently(
        &js,
        &subjects,
        streams,
        crate::provision::PROVISION_PATIENCE,
    )
    .await?;
    let settings = RelaySettings::for_deployment(store.backend(), streams);
    tracing::info!(database = %redact(url), "outbox relay started");
    Relay::new(store, js, subjects, settings)
        .run(shutdown)
        .await?;
    Ok(())
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("sqlite://a.db"), "sqlite://a.db");
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Events read from the stream.
    pub events: u64,
    /// Entity events applied.
    pub entity_events: u64,
    /// Entry events applied.
    pub entry_events: u64,
    /// Events that are not model changes.
    pub skipped: u64,
    /// Events that could not be read, each with its stream sequence and why;
    /// nothing of them was applied, and the rebuild went on past them.
    pub unreadable: Vec<(u64, String)>,
}

/// Rebuilds the model store at `url` from the events stream: every event from
/// the first, applied in stream order, into an empty store (see
/// `store` on why the result equals the original). `progress` is
/// called with (events done, events in the stream) every batch. An event that
/// cannot be read is logged with its sequence, listed in
/// [`Rebuilt::unreadable`], and the rebuild goes on.
///
/// # Errors
///
/// When the store is not empty (unless `force`), when the stream no longer holds
/// its first events (retention removed them: the rebuild would be incomplete),
/// or when the stream or the database fail.
pub async fn rebuild(
    js: &jetstream::Context,
    subjects: &Subjects,
    url: &str,
    force: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<Rebuilt> {
    use futures::StreamExt;
    use hookbus_kit::replay::{ReplayOptions, replay_events};

    let store = open_migrated(url).await?;
    if !force && !store.is_empty().await? {
        return Err(OutboxCmdError::NotEmpty(redact(url)));
    }
    let stream_error = |e: async_nats::Error| OutboxCmdError::Stream {
        stream: subjects.events_stream(),
        source: e,
    };
    let mut stream = js
        .get_stream(subjects.events_stream())
        .await
        .map_err(|e| stream_error(e.into()))?;
    let state = stream
        .info()
        .await
        .map_err(|e| stream_error(e.into()))?
        .state
        .clone();
    if state.first_sequence > 1 {
        return Err(OutboxCmdError::Truncated {
            stream: subjects.events_stream(),
            upto: state.first_sequence - 1,
        });
    }
    let mut events = replay_events(js, subjects, ReplayOptions::default()).await?;
    let total = events.total_at_start();
    store.begin_rebuild().await?;
    let mut report = Rebuilt::default();
    let mut batch: Vec<(u64, bytes::Bytes)> = Vec::with_capacity(500);
    loop {
        let next = events.next().await;
        let done = next.is_none();
        if let Some(event) = next {
            let event = event?;
            batch.push((event.stream_seq, event.payload));
        }
        if batch.len() == 500 || (done && !batch.is_empty()) {
            let slices: Vec<&[u8]> = batch.iter().map(|(_, b)| b.as_ref()).collect();
            let applied = store.apply_events(&slices).await?;
            for ((seq, _), applied) in batch.iter().zip(applied) {
                match applied {
                    store::Applied::Entity(_) => report.entity_events += 1,
                    store::Applied::Entry(_) => report.entry_events += 1,
                    store::Applied::Unreadable(why) => {
                        tracing::error!(seq, error = %why, "rebuild: event cannot be read; skipped");
                        report.unreadable.push((*seq, why));
                    }
                    store::Applied::Skipped(_) => report.skipped += 1,
                }
            }
            report.events += batch.len() as u64;
            batch.clear();
            progress(report.events, total.max(report.events));
        }
        if done {
            break;
        }
    }
    store.finish_rebuild().await?;
    Ok(report)
}
