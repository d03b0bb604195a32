//! The retry rule of a delivery, the same in the bus's dispatcher and in a
//! plugin's replay: after the n-th failed attempt, a transient failure waits the
//! n-th entry of the handler's schedule (`retry_backoff_ms`) and tries again; a
//! permanent failure, or one past the end of the schedule, is dead-lettered.

use std::time::Duration;

/// The wait before the next attempt, or `None` to give up (dead-letter).
/// `failures` counts the failed attempts so far (at least 1).
///
/// ```
/// use std::time::Duration;
/// use hookbus_kit::retry::next_wait;
///
/// let schedule = [Duration::from_millis(200), Duration::from_secs(1)];
/// assert_eq!(next_wait(&schedule, 1, false), Some(Duration::from_millis(200)));
/// assert_eq!(next_wait(&schedule, 2, false), Some(Duration::from_secs(1)));
/// assert_eq!(next_wait(&schedule, 3, false), None); // schedule used up
/// assert_eq!(next_wait(&schedule, 1, true), None); // permanent: no retry
/// ```
pub fn next_wait(schedule: &[Duration], failures: usize, permanent: bool) -> Option<Duration> {
    if permanent {
        return None;
    }
    failures
        .checked_sub(1)
        .and_then(|i| schedule.get(i))
        .copied()
}
