//! The operator commands behind `hookbus tail|registry|dlq|health`. Each writes its
//! output to a writer (stdout in the binary) and reports its progress to
//! [`Ops::progress`] (a spinner or bar on stderr in the binary), so it can be
//! tested and reused.
//!
//! | command | module |
//! |---|---|
//! | `hookbus tail` | [`tail`] |
//! | `hookbus registry ls\|show` | [`registry`] |
//! | `hookbus dlq ls\|show\|replay\|purge` | [`dlq`] |
//! | `hookbus health` | [`health`] |

pub mod dlq;
pub mod health;
pub mod registry;
pub mod tail;

use std::sync::Arc;
use std::time::Duration;

use core_events::Subjects;

use crate::progress::{Progress, Silent};

/// A problem running an operator command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// NATS failed.
    #[error("{what}: {source}")]
    Nats {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
    /// The running bus did not answer.
    #[error("no answer from the bus on {subject}: is `hookbus run` up? ({source})")]
    NoBus {
        /// The status subject.
        subject: String,
        /// The error.
        #[source]
        source: async_nats::Error,
    },
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
}

impl OpsError {
    fn nats(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> OpsError {
        let what = what.into();
        move |source| OpsError::Nats { what, source }
    }
}

/// What every operator command needs: a connection and the subject namespace.
#[derive(Debug, Clone)]
pub struct Ops {
    /// The NATS client.
    pub client: async_nats::Client,
    /// JetStream over it.
    pub js: async_nats::jetstream::Context,
    /// Subject prefix and derived names.
    pub subjects: Subjects,
    /// How long to wait for the bus and for `$SRV.PING` answers.
    pub timeout: Duration,
    /// Where progress goes (nowhere by default: [`Silent`]).
    pub progress: Arc<dyn Progress>,
}

impl Ops {
    /// Commands over `client` for the deployment with `subjects`.
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Ops {
        Ops {
            js: async_nats::jetstream::new(client.clone()),
            client,
            subjects,
            timeout: Duration::from_millis(500),
            progress: Arc::new(Silent),
        }
    }

    /// Asks the running bus on `<prefix>.bus.<what>` and parses the JSON answer.
    async fn ask_bus<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, OpsError> {
        let subject = format!("{}.bus.{what}", self.subjects.prefix());
        let reply = tokio::time::timeout(
            self.timeout.max(Duration::from_secs(2)),
            self.client.request(subject.clone(), bytes::Bytes::new()),
        )
        .await
        .map_err(|e| OpsError::NoBus {
            subject: subject.clone(),
            source: e.into(),
        })?
        .map_err(|e| OpsError::NoBus {
            subject: subject.clone(),
            source: e.into(),
        })?;
        serde_json::from_slice(&reply.payload).map_err(|e| OpsError::NoBus {
            subject,
            source: e.into(),
        })
    }

    /// Replicas of each plugin (`$SRV.PING.<id>`), asked in parallel.
    async fn replicas(&self, plugins: &[String]) -> Vec<Option<usize>> {
        futures::future::join_all(plugins.iter().map(|id| async move {
            crate::monitor::services(&self.client, "PING", id, self.timeout)
                .await
                .ok()
                .map(|r| r.len())
        }))
        .await
    }
}

/// "3s ago", "2m ago", … for an RFC 3339 time.
pub(crate) fn ago(rfc3339: Option<&str>) -> String {
    let Some(t) = rfc3339.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return "-".to_owned();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Cuts `s` to `n` characters, with an ellipsis.
pub(crate) fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}
