//! The audit journal: a JSONL file with one line per event, idempotent on the
//! event id (a redelivered event is not appended twice).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use pagoda_plugin_sdk::{EventId, Hook};
use serde::{Deserialize, Serialize};

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AuditRecord {
    /// The event id: the idempotency key.
    pub(crate) event_id: EventId,
    /// The hook's standard name.
    pub(crate) hook: Hook,
    /// The entity name.
    pub(crate) entity: String,
    /// The object (`entry/42`).
    pub(crate) object: String,
    /// The event's sequence in the events stream.
    pub(crate) stream_seq: u64,
    /// When this plugin received it.
    pub(crate) received_at: DateTime<Utc>,
    /// The whole envelope, as delivered.
    pub(crate) event: serde_json::Value,
}

/// Only the id is needed to rebuild the seen set.
#[derive(Deserialize)]
struct SeenLine {
    event_id: EventId,
}

/// An append-only JSONL file and the ids already in it.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    seen: HashSet<EventId>,
}

/// What [`Journal::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// The record was written and flushed.
    New,
    /// A record with this event id was already in the journal.
    Duplicate,
}

impl Journal {
    /// Opens (creating) the journal and loads the ids already in it. Lines that
    /// do not parse (a line torn by a crash) are skipped with a warning; a torn
    /// last line is terminated so the next record starts on its own line.
    pub(crate) fn open(path: impl AsRef<Path>) -> io::Result<Journal> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut seen = HashSet::new();
        for (n, line) in BufReader::new(&file).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<SeenLine>(&line) {
                Ok(l) => {
                    seen.insert(l.event_id);
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    line = n + 1,
                    error = %e,
                    "skipping an unreadable journal line"
                ),
            }
        }
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(Journal {
            path,
            state: Mutex::new(State { file, seen }),
        })
    }

    /// The journal's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// How many distinct events the journal holds.
    pub(crate) fn len(&self) -> usize {
        self.lock().seen.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a
        // way that matters (the id is inserted only after the write succeeded).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `record` unless its event id is already in the journal; the line
    /// is flushed and synced to disk before this returns.
    pub(crate) fn append(&self, record: &AuditRecord) -> io::Result<Appended> {
        let mut state = self.lock();
        if state.seen.contains(&record.event_id) {
            return Ok(Appended::Duplicate);
        }
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        state.file.write_all(&line)?;
        state.file.flush()?;
        state.file.sync_data()?;
        state.seen.insert(record.event_id);
        Ok(Appended::New)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(id: EventId) -> AuditRecord {
        AuditRecord {
            event_id: id,
            hook: Hook::EntryAfterCreate,
            entity: "customer".into(),
            object: "entry/42".into(),
            stream_seq: 7,
            received_at: Utc::now(),
            event: serde_json::json!({"id": id.to_string()}),
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn same_event_twice_gives_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let journal = Journal::open(&path).unwrap();
        let id = EventId::new();
        assert_eq!(journal.append(&record(id)).unwrap(), Appended::New);
        assert_eq!(journal.append(&record(id)).unwrap(), Appended::Duplicate);
        assert_eq!(
            journal.append(&record(EventId::new())).unwrap(),
            Appended::New
        );
        let written = lines(&path);
        assert_eq!(written.len(), 2);
        assert_eq!(written[0]["event_id"], id.to_string());
        assert_eq!(written[0]["hook"], "entry.after_create");
        assert_eq!(written[0]["object"], "entry/42");
        assert_eq!(written[0]["stream_seq"], 7);
        assert!(written[0]["received_at"].is_string());
        assert_eq!(written[0]["event"]["id"], id.to_string());
    }

    #[test]
    fn seen_ids_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let id = EventId::new();
        {
            let journal = Journal::open(&path).unwrap();
            journal.append(&record(id)).unwrap();
        }
        // A crash mid-write leaves a partial last line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"event_id\":\"01")
            .unwrap();
        let journal = Journal::open(&path).unwrap();
        assert_eq!(journal.len(), 1);
        assert_eq!(journal.append(&record(id)).unwrap(), Appended::Duplicate);
        let other = EventId::new();
        assert_eq!(journal.append(&record(other)).unwrap(), Appended::New);
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["event_id"], other.to_string());
    }
}
