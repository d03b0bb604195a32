//! The job-state compare-and-set on the jobs bucket: every change of a job's
//! state (`<plugin>.<job_id>` → [`JobState`]) is written on the revision it was
//! decided on, so a cancel written meanwhile is never overwritten. The reference
//! host (cancel, timeouts) and the SDK's job worker (progress, results) both
//! write through [`update`], which re-reads after a conflict a bounded number of
//! times.

use async_nats::jetstream::kv;
use bytes::Bytes;
use core_events::jobs::JobState;

/// Conflicts [`update`] re-reads after before giving up with
/// [`CasError::Contended`].
pub const CAS_ATTEMPTS: usize = 16;

/// Why a job's state could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum CasError<E> {
    /// The decision refused the change (the caller's own error).
    #[error("refused")]
    Refused(E),
    /// The entry could not be read.
    #[error("cannot read the job state '{key}': {source}")]
    Read {
        /// The key.
        key: String,
        /// Why.
        source: kv::EntryError,
    },
    /// The stored value is not a [`JobState`].
    #[error("job state '{key}' is unreadable: {source}")]
    Unreadable {
        /// The key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The missing entry could not be created.
    #[error("cannot create the job state '{key}': {source}")]
    Create {
        /// The key.
        key: String,
        /// Why.
        source: kv::CreateError,
    },
    /// The new state could not be written.
    #[error("cannot write the job state '{key}': {source}")]
    Write {
        /// The key.
        key: String,
        /// Why.
        source: kv::UpdateError,
    },
    /// Others kept writing the entry between each read and write.
    #[error("job state '{key}' kept changing; gave up after {attempts} attempts")]
    Contended {
        /// The key.
        key: String,
        /// Attempts made.
        attempts: usize,
    },
}

/// Writes `next(current)` to `key` by compare-and-set, re-reading after a
/// conflict (at most [`CAS_ATTEMPTS`] times).
///
/// - A missing (or deleted) entry is created as `seed` first, or, without a
///   seed, left alone: `Ok(None)`.
/// - `next` decides on the current state: `Ok(Some(new))` writes `new`,
///   `Ok(None)` keeps the current state, `Err(e)` refuses
///   ([`CasError::Refused`]).
///
/// Gives the state stored in the end.
///
/// # Errors
///
/// [`CasError`]: refused, NATS errors, an unreadable value, or too many
/// conflicts.
pub async fn update<E>(
    kv: &kv::Store,
    key: &str,
    seed: Option<&JobState>,
    mut next: impl FnMut(&JobState) -> Result<Option<JobState>, E>,
) -> Result<Option<JobState>, CasError<E>> {
    for _ in 0..CAS_ATTEMPTS {
        let entry = kv.entry(key).await.map_err(|source| CasError::Read {
            key: key.to_owned(),
            source,
        })?;
        let (revision, current) = match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let current: JobState = serde_json::from_slice(&entry.value).map_err(|source| {
                    CasError::Unreadable {
                        key: key.to_owned(),
                        source,
                    }
                })?;
                (entry.revision, current)
            }
            _ => {
                let Some(seed) = seed else {
                    return Ok(None);
                };
                match kv.create(key, encode(key, seed)?).await {
                    Ok(revision) => (revision, seed.clone()),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(source) => {
                        return Err(CasError::Create {
                            key: key.to_owned(),
                            source,
                        });
                    }
                }
            }
        };
        let Some(new) = next(&current).map_err(CasError::Refused)? else {
            return Ok(Some(current));
        };
        match kv.update(key, encode(key, &new)?, revision).await {
            Ok(_) => return Ok(Some(new)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(source) => {
                return Err(CasError::Write {
                    key: key.to_owned(),
                    source,
                });
            }
        }
    }
    Err(CasError::Contended {
        key: key.to_owned(),
        attempts: CAS_ATTEMPTS,
    })
}

fn encode<E>(key: &str, state: &JobState) -> Result<Bytes, CasError<E>> {
    serde_json::to_vec(state)
        .map(Bytes::from)
        .map_err(|source| CasError::Unreadable {
            key: key.to_owned(),
            source,
        })
}
