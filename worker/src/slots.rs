//! Concurrency that follows the backlog: between `min` and `max` tasks run
//! at once. The backlog signal is local: deliveries the broker already sent
//! (up to the prefetch) that wait for a slot. While some wait, the pool
//! doubles each tick up to `max`; when a tick sees no waiting and at most
//! half the slots busy, it shrinks by a quarter, down to `min`.

use kairos_shared::config::Concurrency;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The slots shrink only while at most 1/`IDLE_SHARE` of them are busy
/// and nothing waits...
const IDLE_SHARE: usize = 2;
/// ...and then by 1/`SHRINK_SHARE` of their number (at least one), so a
/// lull does not drop a pool sized for the backlog all at once.
const SHRINK_SHARE: usize = 4;

/// The task slots of one worker: a semaphore whose size the autoscaler
/// moves between the configured minimum and maximum.
pub(crate) struct Slots {
    semaphore: Arc<Semaphore>,
    limits: Concurrency,
    /// Current pool size (permits in circulation).
    size: AtomicUsize,
    waiting: AtomicUsize,
    /// Every size change, for the consumers' prefetch (`crate::prefetch`).
    sizes: watch::Sender<usize>,
}

impl Slots {
    pub(crate) fn new(limits: Concurrency) -> Arc<Self> {
        Arc::new(Slots {
            semaphore: Arc::new(Semaphore::new(limits.min)),
            limits,
            size: AtomicUsize::new(limits.min),
            waiting: AtomicUsize::new(0),
            sizes: watch::Sender::new(limits.min),
        })
    }

    /// The configured bounds of the pool.
    pub(crate) fn limits(&self) -> Concurrency {
        self.limits
    }

    /// The pool size now and at every change.
    pub(crate) fn watch_size(&self) -> watch::Receiver<usize> {
        self.sizes.subscribe()
    }

    /// Records a new pool size and tells the watchers.
    fn resized(&self, size: usize) -> usize {
        self.size.store(size, Ordering::Relaxed);
        self.sizes.send_replace(size);
        size
    }

    /// Waits for a free slot, counting as backlog while it waits.
    pub(crate) async fn acquire(&self) -> OwnedSemaphorePermit {
        // Uncounted however the wait ends: a wait dropped (its delivery
        // handed back on a stop or pause) must not count as backlog for
        // good, or the pool would never shrink again.
        let _waiting = Waiting::count(&self.waiting);
        let permit = self.semaphore.clone().acquire_owned().await;
        // The semaphore is never closed, so acquiring cannot fail.
        permit.unwrap_or_else(|_| unreachable!("slots semaphore closed"))
    }

    pub(crate) fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub(crate) fn busy(&self) -> usize {
        self.size()
            .saturating_sub(self.semaphore.available_permits())
    }

    /// One scaling decision; returns the new size.
    pub(crate) fn tick(&self) -> usize {
        let size = self.size();
        let waiting = self.waiting.load(Ordering::Relaxed);
        if waiting > 0 && size < self.limits.max {
            let grow = size.min(self.limits.max - size).max(1);
            self.semaphore.add_permits(grow);
            return self.resized(size + grow);
        }
        if waiting == 0 && size > self.limits.min && self.busy() * IDLE_SHARE <= size {
            let shrink = (size / SHRINK_SHARE).max(1).min(size - self.limits.min);
            // Only idle permits can be taken back; busy ones come back later.
            if let Ok(permits) = self.semaphore.try_acquire_many(shrink as u32) {
                permits.forget();
                return self.resized(size - shrink);
            }
        }
        size
    }

    /// Runs [`tick`](Self::tick) periodically until cancelled (a fixed
    /// concurrency only reports its gauges).
    pub(crate) async fn autoscale(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = interval.tick() => {
                    let before = self.size();
                    let after = if self.limits.min == self.limits.max { before } else { self.tick() };
                    if before != after {
                        tracing::debug!(from = before, to = after, "concurrency changed");
                    }
                    metrics::gauge!("kairos_worker_concurrency").set(after as f64);
                    metrics::gauge!("kairos_worker_busy").set(self.busy() as f64);
                    metrics::gauge!("kairos_worker_waiting").set(self.waiting.load(Ordering::Relaxed) as f64);
                }
            }
        }
    }
}

/// One waiter in [`Slots::waiting`], for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_wait_is_no_backlog() {
        let slots = Slots::new(Concurrency { min: 1, max: 4 });
        let _held = slots.acquire().await;
        let s2 = slots.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await });
        while slots.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(slots.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn grows_with_backlog_and_shrinks_when_idle() {
        let slots = Slots::new(Concurrency { min: 2, max: 16 });
        let held: Vec<_> = vec![slots.acquire().await, slots.acquire().await];
        // A third acquirer waits: that is backlog.
        let s2 = slots.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await });
        while slots.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let sizes = slots.watch_size();
        assert_eq!(slots.tick(), 4);
        assert_eq!(*sizes.borrow(), 4, "watchers see the new size");
        let third = waiter.await.unwrap();
        drop(held);
        drop(third);
        // Idle: shrink by a quarter per tick, never below min.
        let mut sizes = vec![];
        for _ in 0..6 {
            sizes.push(slots.tick());
        }
        assert_eq!(sizes, vec![3, 2, 2, 2, 2, 2]);
    }

    #[tokio::test]
    async fn never_exceeds_max() {
        let slots = Slots::new(Concurrency { min: 3, max: 5 });
        let _held: Vec<_> = vec![
            slots.acquire().await,
            slots.acquire().await,
            slots.acquire().await,
        ];
        let s2 = slots.clone();
        let _waiter = tokio::spawn(async move { s2.acquire().await });
        while slots.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.tick(), 5);
        assert_eq!(slots.tick(), 5);
    }
}
