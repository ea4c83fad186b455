//! The thread the pump's timed publishes run on: a current-thread tokio
//! runtime of its own, the one private runtime in Kairos.
//!
//! Why a runtime and not just a task: the rule is that a batch held until
//! its due time publishes as soon as the timer wakes it. On the shared
//! runtime a woken task waits until a runtime thread finishes whatever it
//! is polling (a schedule round's planning, a worker's deliveries), however
//! punctual the wake-up; on this thread the timed batches are the only
//! thing that runs, so a batch publishes as soon as the OS runs the thread.
//! Every other task of the process runs on the shared runtime (the
//! precise timer's thread is a plain OS thread, not a runtime).
//!
//! The schedulers' heartbeat runs here too (`ticker.rs`), for the same
//! reason: a beat must never come more than the grace late, or it reads as
//! an outage and the misfire policy drops ticks of a running system.
//!
//! This is the one exception to holding background work in the process's
//! `kairos_shared::supervise::Supervisor`: what runs here is bound by its
//! due time, not by a loop's lifetime, and its owners wait for it
//! themselves (the pump's in-flight batches, the ticker's beat, which stops
//! with its own token). A `TaskTracker` on the shared runtime would bring
//! back the very wait this thread avoids.
//!
//! Nothing but timing moves here: the futures are the same, and lapin and
//! redis drive their sockets from their own threads and tasks whichever
//! runtime polls them. If the thread cannot start, the work runs on the
//! caller's runtime instead. docs/BENCHMARKS.md ("Timed publishes on a
//! thread of their own") has the measurements behind this.

use std::future::Future;
use std::sync::OnceLock;
use tokio::runtime::Handle;

/// The runtime's handle, started on first use; `None` if it could not be.
fn handle() -> Option<&'static Handle> {
    static HANDLE: OnceLock<Option<Handle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot build the publish runtime; publishing from the shared one");
                    return None;
                }
            };
            let handle = rt.handle().clone();
            // The thread parks in the runtime for the life of the process:
            // the runtime must outlive every task spawned on it.
            let started = std::thread::Builder::new()
                .name("kairos-publish".into())
                .spawn(move || rt.block_on(std::future::pending::<()>()));
            match started {
                Ok(_) => Some(handle),
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot start the publish thread; publishing from the shared one");
                    None
                }
            }
        })
        .as_ref()
}

/// Spawns `fut` into `set` on the publish thread (or, failing that, on the
/// current runtime). The pump holds its timed batches this way, so it can
/// count and await them like any other task in its set.
pub(crate) fn spawn_into<T: Send + 'static>(
    set: &mut tokio::task::JoinSet<T>,
    fut: impl Future<Output = T> + Send + 'static,
) {
    match handle() {
        Some(h) => {
            set.spawn_on(fut, h);
        }
        None => {
            set.spawn(fut);
        }
    }
}

/// Spawns `fut` on the publish thread (or, failing that, on the current
/// runtime): for work whose lateness would be read as an outage, such as
/// the schedulers' heartbeat.
pub(crate) fn spawn<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    match handle() {
        Some(h) => h.spawn(fut),
        None => tokio::spawn(fut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_runs_on_the_publish_thread_and_reports_back() {
        let mut set = tokio::task::JoinSet::new();
        spawn_into(&mut set, async {
            // Timers work there too: the pump's batches sleep until due.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            std::thread::current().name().map(str::to_string)
        });
        let ran_on = set
            .join_next()
            .await
            .expect("one task")
            .expect("not panicked");
        assert_eq!(ran_on.as_deref(), Some("kairos-publish"));
    }
}
