//! Progress of a long operator command (reading or replaying dead letters,
//! replaying events, asking the bus and the plugins), reported to whoever shows
//! it: the `hookbus` binary draws it on stderr; a library caller gets nothing
//! unless it passes its own [`Progress`].

use std::fmt::Debug;

/// Receives the progress of a command. Every method has a default that does
/// nothing.
pub trait Progress: Send + Sync + Debug {
    /// Work named `message` starts: `len` steps, or an unknown number (`None`).
    fn start(&self, message: &str, len: Option<u64>) {
        let _ = (message, len);
    }

    /// `done` steps are done.
    fn set(&self, done: u64) {
        let _ = done;
    }

    /// A line for the operator (a failure the command goes on after).
    fn note(&self, line: &str) {
        let _ = line;
    }

    /// The work is over (successfully or not).
    fn finish(&self) {}
}

/// Shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}
