//! Long-lived tasks of the bus under supervision: none is ever silently gone.
//!
//! A task started with [`spawn_supervised`] (or run with [`supervise`]) that
//! panics is logged (`ERROR task panicked; starting it again`), counted in
//! [`TaskPanics`] (`hookbus_task_panics_total{task}` on `/metrics`,
//! `task_panics` on `<prefix>.bus.stats` and `/healthz`) and started again
//! after a pause that doubles from [`FIRST_PAUSE`] up to [`MAX_PAUSE`]. It ends
//! when its future returns, or when `shutdown` is cancelled during a pause.
//!
//! The tasks that cannot simply start again (they hold state built at start: the
//! registry watch, the dispatcher, the outbox relay, the HTTP server, the audit
//! watch) are watched by [`crate::run::Bus::wait`] instead: a panic of one of them
//! is logged and counted the same way and stops the bus with
//! [`crate::run::RunError::Panicked`], so `hookbus run` exits with status 1 and
//! its own supervisor (Docker's restart policy, systemd, Kubernetes) starts it
//! again.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stats::TaskPanics;

/// The pause before the first restart of a task that panicked.
pub const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between restarts (a task that keeps panicking).
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// The text of a panic payload (`panic!("…")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Logs and counts the end of a watched task that panicked; `None` when it did not.
pub(crate) fn panicked(
    task: &'static str,
    result: Result<(), tokio::task::JoinError>,
    panics: &TaskPanics,
) -> Option<String> {
    let e = result.err()?;
    if !e.is_panic() {
        return None;
    }
    let message = panic_message(&*e.into_panic());
    panics.record(task);
    tracing::error!(task, panic = %message, "task panicked");
    Some(message)
}

/// Held by a short-lived task that cannot simply start again (a dispatcher lane:
/// restarting it would break the order of its object's events): when the task
/// unwinds from a panic, the panic is logged and counted under `task`, `failed`
/// is set and `stop` cancelled, so that its owner stops with an error.
pub struct StopOnPanic {
    /// The name the panic is counted under.
    pub task: &'static str,
    /// Where it is counted.
    pub panics: Arc<TaskPanics>,
    /// Set when the task panicked.
    pub failed: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the task panicked.
    pub stop: CancellationToken,
}

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.panics.record(self.task);
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
            tracing::error!(task = self.task, "task panicked; stopping its owner");
            self.stop.cancel();
        }
    }
}

/// Aborts the task when dropped (the supervisor was aborted or dropped).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the task `make` returns until it ends; starts a new one each time one
/// panics (logged, counted in `panics`, after a growing pause). Returns when a
/// task ends without panicking, or when `shutdown` is cancelled after a panic.
/// Dropping this future aborts the running task.
pub async fn supervise<F, Fut>(
    task: &'static str,
    panics: Arc<TaskPanics>,
    shutdown: CancellationToken,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut pause = FIRST_PAUSE;
    loop {
        let mut running = AbortOnDrop(tokio::spawn(make()));
        let result = (&mut running.0).await;
        let Some(message) = panicked(task, result, &panics) else {
            return;
        };
        tracing::error!(task, panic = %message, restart_in_ms = pause.as_millis() as u64,
            "task panicked; starting it again");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// [`supervise`] in a task of its own.
pub fn spawn_supervised<F, Fut>(
    task: &'static str,
    panics: Arc<TaskPanics>,
    shutdown: CancellationToken,
    make: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(supervise(task, panics, shutdown, make))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_counted_and_started_again() {
        let panics = Arc::new(TaskPanics::default());
        let starts = Arc::new(AtomicUsize::new(0));
        let counter = starts.clone();
        let task = spawn_supervised(
            "test",
            panics.clone(),
            CancellationToken::new(),
            move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert!(n >= 2, "start {n} fails on purpose");
                }
            },
        );
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the supervisor ends once a start succeeds")
            .expect("the supervisor does not panic");
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert_eq!(panics.get("test"), 2);
        assert_eq!(panics.all(), vec![("test", 2)]);
        assert_eq!(
            serde_json::to_value(&*panics).unwrap(),
            serde_json::json!({"test": 2})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_restarts() {
        let panics = Arc::new(TaskPanics::default());
        let shutdown = CancellationToken::new();
        let task = spawn_supervised("always", panics.clone(), shutdown.clone(), || async {
            panic!("always fails");
        });
        tokio::time::sleep(MAX_PAUSE * 3).await;
        assert!(panics.get("always") >= 3, "{:?}", panics.all());
        shutdown.cancel();
        tokio::time::timeout(MAX_PAUSE, task)
            .await
            .expect("ends at shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn stop_on_panic_stops_the_owner_and_counts() {
        let panics = Arc::new(TaskPanics::default());
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = CancellationToken::new();
        let guard = |task| StopOnPanic {
            task,
            panics: panics.clone(),
            failed: failed.clone(),
            stop: stop.clone(),
        };
        // Ending normally changes nothing.
        let fine = guard("lane");
        tokio::spawn(async move {
            let _guard = fine;
        })
        .await
        .unwrap();
        assert!(!stop.is_cancelled());
        let lane = guard("lane");
        let result = tokio::spawn(async move {
            let _guard = lane;
            panic!("on purpose");
        })
        .await;
        assert!(result.unwrap_err().is_panic());
        assert!(stop.is_cancelled());
        assert!(failed.load(std::sync::atomic::Ordering::Acquire));
        assert_eq!(panics.get("lane"), 1);
    }

    #[tokio::test]
    async fn aborting_the_supervisor_aborts_the_task() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let task = spawn_supervised(
            "forever",
            Arc::default(),
            CancellationToken::new(),
            move || {
                let tx = tx.clone();
                async move {
                    let _tx = tx;
                    std::future::pending::<()>().await;
                }
            },
        );
        tokio::task::yield_now().await;
        task.abort();
        // The task's sender is dropped with it: the channel closes.
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the task was aborted");
    }
}
