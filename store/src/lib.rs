//! The model store: users, entities with attribute definitions, entries with
//! attribute values, in SQL (SQLite by default, PostgreSQL for production), and
//! the transactional outbox the relay publishes from.
//!
//! Every write runs in one transaction that changes the model **and** inserts
//! the event into `hookbus_outbox`: a rolled-back write leaves no event, a
//! committed one always has its event. Writes about one object lock that object's
//! row before inserting the outbox row, so the events of one object get outbox ids
//! in commit order; the relay publishes each object's events in id order.
//!
//! ```no_run
//! # async fn demo() -> Result<(), store::StoreError> {
//! use store::{NewEntity, NewEntry, Store, WriteContext};
//! let store = Store::connect("sqlite://pagoda.db").await?;
//! store.migrate().await?;
//! let ctx = WriteContext::default();
//! let entity = store.create_entity(&NewEntity::named("customer"), &ctx).await?;
//! let entry = store.create_entry(entity.id, &NewEntry::named("ACME"), &ctx).await?;
//! assert_eq!(entry.schema.name, "customer");
//! # Ok(()) }
//! ```

mod batch;
mod jobs;
mod load;
pub mod outbox;
mod rebuild;
mod tokens;
mod values;
mod write;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection, Executor};
use tokio::sync::Notify;

use core_events::model::User;

pub use batch::NewEntryInput;
// The bodies of writes belong to the protocol (the sync hooks carry them too).
pub use core_events::request::{
    AttrChange, EntityChanges, EntryChanges, NewAttr, NewEntity, NewEntry, NewUser,
};
pub use jobs::MAX_JOB_PAGE;
pub use outbox::{Backlog, OutboxRow};
pub use rebuild::{Applied, ModelSnapshot};
pub use tokens::{
    ApiToken, ListPage, TOKEN_PREFIX, TokenRefused, TokenUser, hash_key, new_key, token_key,
};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (a file, WAL mode): the embedded default.
    Sqlite,
    /// PostgreSQL: production.
    Postgres,
}

/// A problem reading or writing the model store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL names no supported database.
    #[error("database URL '{0}' is not supported: use sqlite://<file> or postgres://user@host/db")]
    UnsupportedUrl(String),
    /// An object does not exist (or not in the asked state).
    #[error("{what} {id} not found")]
    NotFound {
        /// `entity`, `entry`, `user`, …
        what: &'static str,
        /// Its id or name.
        id: String,
    },
    /// A name is taken, or the change conflicts with other objects.
    #[error("{0}")]
    Conflict(String),
    /// The input is invalid; every problem is listed.
    #[error("invalid input: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A stored value cannot be read back (a row written by hand, say).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The change's event is larger than the event bus takes
    /// ([`Store::with_max_event_bytes`]); nothing was written.
    #[error(
        "the {hook} event of this change would be {size} bytes; events travel by value and may be at most {limit} bytes (the NATS server's max_payload or the events stream's max message size, less room for headers): shorten the notes or values"
    )]
    EventTooLarge {
        /// The event's hook, e.g. `entry.after_update`.
        hook: String,
        /// The envelope's size in bytes.
        size: usize,
        /// The largest envelope allowed, bytes.
        limit: usize,
    },
}

/// Who makes a change and the trace it belongs to; carried into the event.
#[derive(Debug, Clone, Default)]
pub struct WriteContext {
    /// The acting user (`pagodaactor`, `data.user`).
    pub user: Option<User>,
    /// W3C `traceparent` of the request, carried to every handler.
    pub traceparent: Option<String>,
    /// W3C `tracestate` that goes with it (the outbox row's `tracestate`).
    pub tracestate: Option<String>,
}

/// The model store. Cheap to clone; clones share the pools.
#[derive(Debug, Clone)]
pub struct Store {
    /// Reads (and, on PostgreSQL, writes).
    pool: AnyPool,
    /// Writes. On SQLite one connection, so writers queue fairly in the pool
    /// instead of spinning on the database lock.
    writer: AnyPool,
    backend: Backend,
    outbox_written: Arc<Notify>,
    source: Arc<str>,
    url: Arc<str>,
    /// Largest event envelope a write may emit (`None`: no limit).
    max_event_bytes: Option<usize>,
}

/// Default CloudEvents `source` of events written by the store.
pub const DEFAULT_SOURCE: &str = "urn:pagoda:host";

/// Postgres channel the outbox trigger notifies (`LISTEN hookbus_outbox`).
pub const OUTBOX_CHANNEL: &str = "hookbus_outbox";

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Backend {
    /// The backend a URL names.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnsupportedUrl`] for anything but `sqlite:` and `postgres:`/`postgresql:`.
    pub fn from_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }
}

impl Store {
    /// Connects to `url` (`sqlite://<file>`, created if missing, in WAL mode; or
    /// `postgres://…`). Call [`Store::migrate`] before first use.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnsupportedUrl`] or [`StoreError::Db`] when it cannot connect.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let (pool, writer) = match backend {
            Backend::Sqlite => {
                let writer = sqlite_pool(1).connect_with(options.clone()).await?;
                let pool = sqlite_pool(4).connect_with(options).await?;
                (pool, writer)
            }
            Backend::Postgres => {
                let pool = pool_options(16).connect_with(options).await?;
                (pool.clone(), pool)
            }
        };
        Ok(Store {
            pool,
            writer,
            backend,
            outbox_written: Arc::new(Notify::new()),
            source: DEFAULT_SOURCE.into(),
            url: url.as_str().into(),
            max_event_bytes: None,
        })
    }

    /// Sets the CloudEvents `source` of the events this store writes.
    #[must_use]
    pub fn with_source(mut self, source: &str) -> Store {
        self.source = source.into();
        self
    }

    /// Refuses, before commit, every write whose event envelope (the JSON the
    /// relay publishes) would be larger than `limit` bytes, with
    /// [`StoreError::EventTooLarge`]: an event the event bus cannot take must
    /// not be committed, or the change would reach no plugin. The host sets it
    /// from the NATS server's `max_payload` and the events stream's largest
    /// message, less room for headers (`hookbus::publish::event_limit`).
    #[must_use]
    pub fn with_max_event_bytes(mut self, limit: usize) -> Store {
        self.max_event_bytes = Some(limit);
        self
    }

    /// The limit set with [`Store::with_max_event_bytes`].
    pub fn max_event_bytes(&self) -> Option<usize> {
        self.max_event_bytes
    }

    /// Creates or upgrades the tables (the checked-in migrations of this backend).
    ///
    /// # Errors
    ///
    /// [`StoreError::Migrate`] when a migration fails or the database has
    /// migrations this build does not know.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATOR.run(&self.writer).await?,
            Backend::Postgres => POSTGRES_MIGRATOR.run(&self.writer).await?,
        }
        Ok(())
    }

    /// The database this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL it was opened with (the relay opens its `LISTEN` connection with it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The pool for reads (the relay reads the outbox through it).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The pool for writes (one connection on SQLite).
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// Notified after every committed write of this process that added outbox
    /// rows, so an in-process relay wakes at once (other writers are found by polling
    /// or, on PostgreSQL, by `LISTEN`).
    pub fn outbox_written(&self) -> Arc<Notify> {
        Arc::clone(&self.outbox_written)
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE` on SQLite, so the write lock
    /// is taken up front and a transaction never fails on upgrading it). A host
    /// that writes its own tables adds the event with [`outbox::insert_envelope`]
    /// in the same transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::Db`] when no connection can be had or `BEGIN` fails.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.writer.begin().await?,
        })
    }

    /// Closes the pools.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// How long a pooled connection may sit idle before it is pinged when taken
/// (a connection in steady use is not: a ping per acquire is a round trip per
/// transaction, and a broken busy connection fails its statement and is dropped).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

fn pool_options(max: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_WHEN_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

fn sqlite_pool(max: u32) -> AnyPoolOptions {
    pool_options(max).after_connect(|conn, _meta| {
        Box::pin(async move {
            conn.execute(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
            )
            .await?;
            Ok(())
        })
    })
}

/// Rows per multi-row statement, so no statement nears the databases' limits on
/// bound parameters (32 766 on SQLite, 65 535 on PostgreSQL).
pub(crate) const ROWS_PER_STATEMENT: usize = 1000;

/// The rows of a multi-row `VALUES`: `rows` rows of `width` parameters each,
/// numbered on from `$first`, each row ending in `tail` (constants or shared
/// parameters, e.g. `", TRUE, $1"`): `($1, $2), ($3, $4)`.
pub(crate) fn values_rows(rows: usize, width: usize, first: usize, tail: &str) -> String {
    use std::fmt::Write as _;

    let mut out = String::new();
    for r in 0..rows {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            let _ = write!(
                out,
                "{}${}",
                if c == 0 { "" } else { ", " },
                first + r * width + c
            );
        }
        out.push_str(tail);
        out.push(')');
    }
    out
}

/// [`StoreError::NotFound`] for `what` (`entity`, `entry`, `job`, …) with this id.
pub(crate) fn not_found(what: &'static str, id: i64) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// Now, to the microsecond (what the store keeps), so a snapshot equals its row.
pub(crate) fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("time '{s}': {e}")))
}

/// True when a database error is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation() || d.message().contains("UNIQUE constraint failed")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::values_rows;

    #[test]
    fn values_rows_number_the_parameters_row_by_row() {
        assert_eq!(values_rows(2, 3, 1, ""), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(
            values_rows(2, 2, 2, ", TRUE, $1"),
            "($2, $3, TRUE, $1), ($4, $5, TRUE, $1)"
        );
        assert_eq!(values_rows(0, 3, 1, ""), "");
    }
}
