//! Deadlines finer than tokio's timer. tokio's timer wheel ticks in whole
//! milliseconds and rounds every deadline up to the next tick, so a publish
//! timed with it would leave up to a millisecond after its due time before
//! any wake-up latency. Here one thread sleeps until the earliest deadline
//! on the OS's own timer (a futex wait, whose slack is microseconds, not
//! milliseconds) and wakes the task waiting for it. The rule: a wait never
//! ends before its deadline, and ends as soon after it as the OS allows.
//!
//! The pump waits here only for batches it holds until their due time:
//! at most one wake-up per distinct due millisecond. Anything else that
//! sleeps (claim pacing, backoff) keeps tokio's timer.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long after a deadline tokio's timer ends a wait the timer thread
/// did not end: should that thread ever stop, a publish goes out this much
/// late rather than never.
const BACKSTOP: Duration = Duration::from_millis(5);

/// Waits until `deadline`, ending as soon after it as the timer thread
/// wakes (never before it). Dropping the future forgets the wait; its
/// entry is discarded when the deadline passes.
pub(crate) async fn sleep_until(deadline: Instant) {
    wait_on(timer().map(Arc::as_ref), deadline).await
}

async fn wait_on(timer: Option<&Timer>, deadline: Instant) {
    if deadline <= Instant::now() {
        return;
    }
    let Some(timer) = timer else {
        // No thread could be started: millisecond precision still works.
        return tokio::time::sleep_until(deadline).await;
    };
    let (tx, rx) = oneshot::channel();
    timer.add(deadline, tx);
    let _ = tokio::time::timeout_at(deadline + BACKSTOP, rx).await;
    // The thread sends only once the deadline passed; anything else that
    // ended the wait must not end it early.
    if Instant::now() < deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// The process's timer thread, started on first use; `None` if the thread
/// could not be started.
fn timer() -> Option<&'static Arc<Timer>> {
    static TIMER: OnceLock<Option<Arc<Timer>>> = OnceLock::new();
    TIMER
        .get_or_init(|| {
            let timer = Arc::new(Timer::default());
            let run = timer.clone();
            let started = std::thread::Builder::new()
                .name("kairos-timer".into())
                .spawn(move || run.run());
            match started {
                Ok(_) => Some(timer),
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot start the timer thread; publishes are timed to the millisecond");
                    None
                }
            }
        })
        .as_ref()
}

#[derive(Default)]
struct Timer {
    waiting: Mutex<BinaryHeap<Reverse<Entry>>>,
    /// Signalled when a deadline earlier than every other one arrives.
    earlier: Condvar,
}

struct Entry {
    at: Instant,
    wake: oneshot::Sender<()>,
}

impl Timer {
    fn add(&self, at: Instant, wake: oneshot::Sender<()>) {
        let mut waiting = self.lock();
        let first = waiting.peek().is_none_or(|Reverse(e)| at < e.at);
        waiting.push(Reverse(Entry { at, wake }));
        drop(waiting);
        if first {
            self.earlier.notify_one();
        }
    }

    fn run(&self) {
        let mut due = Vec::new();
        let mut waiting = self.lock();
        loop {
            let now = Instant::now();
            while waiting.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = waiting.pop() {
                    due.push(e.wake);
                }
            }
            if !due.is_empty() {
                // Woken outside the lock, so a waker that runs its task
                // right here never waits for this thread.
                drop(waiting);
                for wake in due.drain(..) {
                    let _ = wake.send(());
                }
                waiting = self.lock();
                continue;
            }
            let next = waiting.peek().map(|Reverse(e)| e.at);
            waiting = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(now);
                    self.earlier
                        .wait_timeout(waiting, wait)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0)
                }
                None => self
                    .earlier
                    .wait(waiting)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }

    /// A poisoned lock still holds only deadlines and senders.
    fn lock(&self) -> MutexGuard<'_, BinaryHeap<Reverse<Entry>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_at_the_deadline_not_before() {
        for ahead_us in [300, 1_700, 5_250] {
            let deadline = Instant::now() + Duration::from_micros(ahead_us);
            sleep_until(deadline).await;
            assert!(Instant::now() >= deadline, "woke before the deadline");
        }
    }

    #[tokio::test]
    async fn an_earlier_deadline_added_later_is_not_held_up_by_a_later_one() {
        let start = Instant::now();
        let timer = timer().expect("the timer thread starts");
        // A far deadline first, so the thread waits for it.
        let (far, _far_rx) = oneshot::channel();
        timer.add(start + Duration::from_secs(5), far);
        let near = start + Duration::from_millis(20);
        sleep_until(near).await;
        let woke = Instant::now();
        assert!(woke >= near);
        assert!(
            woke < start + Duration::from_secs(4),
            "the near deadline waited for the far one"
        );
    }

    #[tokio::test]
    async fn a_timer_thread_that_stopped_delays_a_wait_instead_of_holding_it() {
        // A timer nobody runs: only the backstop ends the wait.
        let stopped = Timer::default();
        let deadline = Instant::now() + Duration::from_millis(10);
        tokio::time::timeout(Duration::from_secs(1), wait_on(Some(&stopped), deadline))
            .await
            .expect("the backstop ends the wait");
        assert!(Instant::now() >= deadline, "woke before the deadline");
    }

    #[tokio::test]
    async fn a_past_deadline_returns_at_once() {
        let past = Instant::now() - Duration::from_millis(5);
        tokio::time::timeout(Duration::from_secs(1), sleep_until(past))
            .await
            .expect("a past deadline must not wait");
    }
}
