//! Errors: what a handler returns ([`HandlerError`]) and what serving a plugin
//! can fail with ([`ServeError`]).

use std::fmt;
use std::time::Duration;

use core_events::protocol::codes;

/// Whether a failed delivery may succeed if the bus tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Something failed that may work later (a database was down, a timeout):
    /// the bus retries on the handler's schedule, then dead-letters.
    Transient,
    /// The event can never succeed for this handler (bad data): the bus
    /// dead-letters it at once, without retries.
    Permanent,
}

impl HandlerErrorKind {
    /// The Services API error code sent for this kind (`500` or `400`).
    pub fn code(self) -> u16 {
        match self {
            HandlerErrorKind::Transient => codes::TRANSIENT,
            HandlerErrorKind::Permanent => codes::PERMANENT,
        }
    }
}

impl fmt::Display for HandlerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandlerErrorKind::Transient => "transient",
            HandlerErrorKind::Permanent => "permanent",
        })
    }
}

/// A handler's failure, sent back to the bus as a Services API error
/// (`Nats-Service-Error` = the message, `Nats-Service-Error-Code` = 500 or 400).
///
/// `?` on an [`anyhow::Error`] gives a transient error; use
/// [`ResultExt::permanent`] to mark bad data as permanent.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    kind: HandlerErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A failure that may work later: the bus retries.
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Transient,
            message: message.into(),
            source: None,
        }
    }

    /// A failure that never will work for this event: the bus dead-letters it.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Permanent,
            message: message.into(),
            source: None,
        }
    }

    /// Keeps `source` as the cause (its text is appended to the reply message).
    #[must_use]
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Transient or permanent.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// The Services API error code the reply carries.
    pub fn code(&self) -> u16 {
        self.kind.code()
    }

    /// The message as given, without its sources.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The text sent in `Nats-Service-Error`: the message and its chain of
    /// causes, on one line (header values may not hold line breaks).
    pub fn reply_text(&self) -> String {
        let mut text = self.message.clone();
        let mut cause = self.source.as_deref().map(|s| s as &dyn std::error::Error);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        one_line(&text)
    }
}

impl From<anyhow::Error> for HandlerError {
    /// Any `anyhow` error is transient; its whole context chain becomes the message.
    fn from(err: anyhow::Error) -> Self {
        HandlerError::transient(format!("{err:#}"))
    }
}

/// Marks any `Result`'s error as a transient or permanent [`HandlerError`]:
/// `serde_json::from_value(v).permanent()?`.
pub trait ResultExt<T> {
    /// The error becomes a transient [`HandlerError`] (retried).
    ///
    /// # Errors
    ///
    /// The original error, as a transient [`HandlerError`].
    fn transient(self) -> Result<T, HandlerError>;

    /// The error becomes a permanent [`HandlerError`] (dead-lettered at once).
    ///
    /// # Errors
    ///
    /// The original error, as a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::transient(e.to_string()))
    }

    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::permanent(e.to_string()))
    }
}

/// Header values are one line of visible text; longer texts are cut.
pub(crate) fn one_line(text: &str) -> String {
    const MAX: usize = 1024;
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX {
        let mut end = MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// Why serving a plugin failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The NATS service could not be started (connection closed, bad name).
    #[error("could not start the NATS service for plugin '{plugin}': {source}")]
    StartService {
        /// The plugin id.
        plugin: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::Error,
    },
    /// A handler's endpoint could not be added.
    #[error("could not add the endpoint of handler '{handler}' on '{subject}': {source}")]
    AddEndpoint {
        /// The handler name.
        handler: String,
        /// The endpoint subject.
        subject: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::Error,
    },
    /// The registry bucket did not appear within the wait.
    #[error(
        "registry bucket '{bucket}' does not exist: is the bus running? (hookbus run provisions it); waited {waited:?}"
    )]
    RegistryMissing {
        /// The bucket name.
        bucket: String,
        /// How long the SDK waited for it.
        waited: Duration,
    },
    /// The registry bucket could not be opened for another reason than being absent.
    #[error("could not open registry bucket '{bucket}': {source}")]
    Registry {
        /// The bucket name.
        bucket: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::jetstream::context::KeyValueError,
    },
    /// Writing the manifest into the registry failed.
    #[error("could not register plugin '{plugin}' under '{key}' in bucket '{bucket}': {source}")]
    Register {
        /// The plugin id.
        plugin: String,
        /// The bucket name.
        bucket: String,
        /// The registry key (`plugins.<id>`).
        key: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::jetstream::kv::PutError,
    },
    /// The job worker of the plugin's tasks could not start: the jobs bucket or
    /// stream is missing (is the bus up to date?) or unreadable, or the plugin's
    /// consumer cannot be created (permissions).
    #[error("could not start the job worker of plugin '{plugin}': could not {what}: {source}")]
    Jobs {
        /// The plugin id.
        plugin: String,
        /// What failed.
        what: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::Error,
    },
    /// The replay asked for in [`ServeOptions::replay`](crate::ServeOptions::replay)
    /// could not start or go on.
    #[error("replay failed: {0}")]
    Replay(#[from] crate::replay::ReplayError),
    /// Shutdown gave up waiting for running handlers.
    #[error(
        "shutdown grace period of {grace:?} expired with {in_flight} handler call(s) still running"
    )]
    GraceExpired {
        /// The grace period.
        grace: Duration,
        /// Handler calls still running when it expired.
        in_flight: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_codes() {
        assert_eq!(HandlerError::transient("x").code(), 500);
        assert_eq!(HandlerError::permanent("x").code(), 400);
        let err: HandlerError = anyhow::anyhow!("db down").context("saving").into();
        assert_eq!(err.kind(), HandlerErrorKind::Transient);
        assert_eq!(err.reply_text(), "saving: db down");
        let err = "x".parse::<u32>().permanent().err();
        assert_eq!(err.map(|e| e.kind()), Some(HandlerErrorKind::Permanent));
    }

    #[test]
    fn reply_text_is_one_line_with_causes() {
        let io = std::io::Error::other("disk\nfull");
        let err = HandlerError::transient("could not write").with_source(io);
        assert_eq!(err.reply_text(), "could not write: disk full");
        let long = HandlerError::transient("é".repeat(2000)).reply_text();
        assert!(long.len() <= 1024 + '…'.len_utf8());
    }
}
