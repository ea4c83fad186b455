//! Resource units: a worker has `KAIROS_CAPACITY` units and a task holds
//! its `x-cost` of them while it runs, so a task starts only when its cost
//! fits in what is free. The units are a second limit beside the task
//! slots (`crate::slots`), which count tasks.
//!
//! # The rule: first in, first out, with bounded overtaking
//! Tasks wait for units in the order they arrived. A task that does not
//! fit lets later, lighter tasks that do fit start ahead of it, but only
//! while it has waited less than `KAIROS_CAPACITY_RESERVE_MS`. From then
//! on it is *reserved*: nothing else starts until it has started, so the
//! units freed by the tasks still running gather for it. The task that
//! waited longest is reserved first (it is the head of the queue). So a
//! heavy task starts at the latest after the reserve bound plus the
//! longest run of the tasks that were running when the bound passed.
//!
//! With a reserve of 0 the order is strictly first in, first out.
//!
//! Units come back when their [`UnitsPermit`] drops, whatever ends the
//! task (its end, a panic, its session abandoning it), and a wait that is
//! dropped (the consumer stopped, the queue paused) leaves the queue, and
//! hands back units granted to it but never taken.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A task that needs more units than the worker has: it could never start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverCapacity {
    /// The task's `x-cost`.
    pub(crate) cost: u32,
    /// This worker's `KAIROS_CAPACITY`.
    pub(crate) capacity: u32,
}

/// The units of one worker, shared by every consumer and session.
pub(crate) struct Units {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: u32,
    /// How long a waiting task lets lighter ones overtake it.
    reserve_after: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    used: u32,
    /// Waiting tasks, oldest first.
    waiting: VecDeque<Waiter>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    cost: u32,
    since: Instant,
    /// Sent once the units are counted as the waiter's.
    grant: oneshot::Sender<()>,
}

impl Units {
    pub(crate) fn new(capacity: u32, reserve_after: Duration) -> Self {
        metrics::gauge!("kairos_worker_capacity_units").set(f64::from(capacity));
        metrics::gauge!("kairos_worker_capacity_used_units").set(0.0);
        Units {
            inner: Arc::new(Inner {
                capacity,
                reserve_after,
                state: Mutex::new(State::default()),
            }),
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    /// Units held by running (or granted, not yet running) tasks.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u32 {
        self.inner.lock().used
    }

    /// Tasks waiting for units.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.inner.lock().waiting.len()
    }

    /// Asks for `cost` units. The place in the queue is taken by this call,
    /// not when the returned wait is first polled, so the consumer keeps
    /// the delivery order although each delivery waits in a task of its
    /// own. Fails at once when `cost` exceeds the capacity.
    pub(crate) fn request(&self, cost: u32) -> Result<UnitsWait, OverCapacity> {
        self.request_since(cost, Instant::now())
    }

    /// [`request`](Self::request) for a task that has waited since
    /// `since` already (in `crate::bands`' gate): its place in the queue
    /// and its reserve bound count from then, as if it had asked then.
    pub(crate) fn request_since(
        &self,
        cost: u32,
        since: Instant,
    ) -> Result<UnitsWait, OverCapacity> {
        let capacity = self.inner.capacity;
        if cost > capacity {
            return Err(OverCapacity { cost, capacity });
        }
        let inner = self.inner.clone();
        let mut state = inner.lock();
        let now = Instant::now();
        let reserved_head = state
            .waiting
            .front()
            .is_some_and(|head| inner.is_reserved(head, now));
        if !reserved_head && state.used + cost <= capacity {
            state.used += cost;
            publish_used(state.used);
            drop(state);
            return Ok(UnitsWait {
                inner,
                cost,
                id: None,
                grant: None,
                taken: false,
            });
        }
        let id = state.next_id;
        state.next_id += 1;
        let (tx, rx) = oneshot::channel();
        // Oldest first: a task asking now goes to the back; one that has
        // waited since earlier goes before those that came after it.
        let at = state.waiting.partition_point(|w| w.since <= since);
        state.waiting.insert(
            at,
            Waiter {
                id,
                cost,
                since,
                grant: tx,
            },
        );
        drop(state);
        Ok(UnitsWait {
            inner,
            cost,
            id: Some(id),
            grant: Some(rx),
            taken: false,
        })
    }
}

impl Units {
    #[cfg(test)]
    fn head_is_reserved_for_tests(&self) -> bool {
        !self.overtaking_open()
    }

    /// Whether a lighter task may start ahead of the waiting ones: the
    /// oldest waiting task is not reserved. `crate::bands` lets a heavy
    /// delivery that does not fit wait in the units queue (and picks the
    /// next one) only then: with a reserved head nothing may overtake it.
    pub(crate) fn overtaking_open(&self) -> bool {
        let state = self.inner.lock();
        !state
            .waiting
            .front()
            .is_some_and(|head| self.inner.is_reserved(head, Instant::now()))
    }
}

impl Inner {
    /// A poisoned lock holds only counts, each changed in one step.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_reserved(&self, w: &Waiter, now: Instant) -> bool {
        now.saturating_duration_since(w.since) >= self.reserve_after
    }

    /// Starts what may start now: the oldest waiters while they fit; when
    /// the oldest does not fit and is reserved, nothing else; when it is
    /// not reserved, every later waiter that fits, in order (none of them
    /// is reserved: they have waited less than the oldest).
    fn dispatch(&self, state: &mut State) {
        let now = Instant::now();
        let mut i = 0;
        while i < state.waiting.len() {
            let w = &state.waiting[i];
            if state.used + w.cost <= self.capacity {
                if let Some(w) = state.waiting.remove(i) {
                    state.used += w.cost;
                    // The receiver lives as long as the waiter is queued
                    // (a dropped wait removes itself first), so this
                    // reaches it.
                    let _ = w.grant.send(());
                }
                continue;
            }
            if i == 0 && self.is_reserved(w, now) {
                break;
            }
            i += 1;
        }
        publish_used(state.used);
    }

    fn release(&self, cost: u32) {
        let mut state = self.lock();
        state.used = state.used.saturating_sub(cost);
        self.dispatch(&mut state);
    }
}

fn publish_used(used: u32) {
    metrics::gauge!("kairos_worker_capacity_used_units").set(f64::from(used));
}

/// A place in the units queue; [`granted`](Self::granted) waits for the
/// units. Dropped before that, it leaves the queue (or gives back units
/// granted but not taken).
pub(crate) struct UnitsWait {
    inner: Arc<Inner>,
    cost: u32,
    /// The queue entry; `None` when the units were free at once.
    id: Option<u64>,
    grant: Option<oneshot::Receiver<()>>,
    /// The units went into a [`UnitsPermit`].
    taken: bool,
}

impl UnitsWait {
    /// Whether the task waits in the queue (its units were not free at
    /// once).
    pub(crate) fn queued(&self) -> bool {
        self.id.is_some()
    }

    /// Waits until the units are this task's.
    pub(crate) async fn granted(mut self) -> UnitsPermit {
        if let Some(rx) = self.grant.take() {
            // The sender goes only with a grant or with this wait's own
            // drop, so an error cannot happen; either way the units are
            // counted as ours once the waiter left the queue.
            let _ = rx.await;
        }
        self.taken = true;
        UnitsPermit {
            inner: self.inner.clone(),
            cost: self.cost,
        }
    }
}

impl Drop for UnitsWait {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let mut state = self.inner.lock();
        let queued = self
            .id
            .and_then(|id| state.waiting.iter().position(|w| w.id == id));
        match queued {
            Some(pos) => {
                state.waiting.remove(pos);
            }
            // Granted (at once or by a dispatch) and never taken.
            None => state.used = state.used.saturating_sub(self.cost),
        }
        // A reserved head leaving, or units coming back, may let others
        // start.
        self.inner.dispatch(&mut state);
    }
}

/// Units held by a running task; given back when dropped.
pub(crate) struct UnitsPermit {
    inner: Arc<Inner>,
    cost: u32,
}

impl Drop for UnitsPermit {
    fn drop(&mut self) {
        self.inner.release(self.cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::task::JoinHandle;

    const RESERVE: Duration = Duration::from_millis(1000);

    fn units(capacity: u32) -> Arc<Units> {
        Arc::new(Units::new(capacity, RESERVE))
    }

    /// Whether the wait is granted without waiting.
    fn now_or_never(w: UnitsWait) -> Option<UnitsPermit> {
        futures_util::FutureExt::now_or_never(w.granted())
    }

    /// A task that runs `ms` once it holds its units, recording when it
    /// started (ms since `t0`) and how many units were in use then.
    fn task(
        u: &Arc<Units>,
        cost: u32,
        ms: u64,
        t0: Instant,
        log: Arc<Mutex<Vec<(u32, u64, u32)>>>,
        peak: Arc<AtomicU32>,
    ) -> JoinHandle<()> {
        let wait = u.request(cost).expect("fits the capacity");
        let u = u.clone();
        tokio::spawn(async move {
            let _p = wait.granted().await;
            let used = u.used();
            peak.fetch_max(used, Ordering::Relaxed);
            let at = t0.elapsed().as_millis() as u64;
            log.lock().unwrap().push((cost, at, used));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_cost_that_fits_starts_and_one_that_does_not_waits() {
        let u = units(4);
        let three = now_or_never(u.request(3).unwrap()).expect("3 of 4 fit");
        assert_eq!(u.used(), 3);
        let wait = u.request(2).unwrap();
        assert_eq!(u.waiting(), 1, "2 more do not fit");
        let one = now_or_never(u.request(1).unwrap()).expect("1 fits beside 3");
        drop(three);
        assert_eq!(u.used(), 3, "the 2 took its units as the 3 left");
        let two = now_or_never(wait).expect("granted");
        drop((one, two));
        assert_eq!(u.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn more_than_the_capacity_is_refused_at_once() {
        let u = units(4);
        assert_eq!(
            u.request(5).err(),
            Some(OverCapacity {
                cost: 5,
                capacity: 4
            })
        );
        assert_eq!((u.used(), u.waiting()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn four_cost_one_tasks_run_together() {
        let u = units(4);
        let (t0, log, peak) = (Instant::now(), Arc::default(), Arc::default());
        let tasks: Vec<_> = (0..4)
            .map(|_| task(&u, 1, 100, t0, Arc::clone(&log), Arc::clone(&peak)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let log = log.lock().unwrap();
        assert!(log.iter().all(|(_, at, _)| *at == 0), "{log:?}");
        assert_eq!(peak.load(Ordering::Relaxed), 4);
        assert_eq!(u.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cost_four_task_runs_alone() {
        let u = units(4);
        let (t0, log, peak) = (Instant::now(), Arc::default(), Arc::default());
        let mut tasks = vec![task(&u, 1, 100, t0, Arc::clone(&log), Arc::clone(&peak))];
        tasks.push(task(&u, 4, 100, t0, Arc::clone(&log), Arc::clone(&peak)));
        tasks.push(task(&u, 1, 100, t0, Arc::clone(&log), Arc::clone(&peak)));
        for t in tasks {
            t.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let heavy = log.iter().find(|(c, _, _)| *c == 4).unwrap();
        // It started when both light ones (which overtook it, within the
        // reserve bound) had ended, and nothing ran beside it.
        assert_eq!(heavy.1, 100, "{log:?}");
        assert_eq!(heavy.2, 4);
        assert!(log
            .iter()
            .filter(|(c, _, _)| *c == 1)
            .all(|(_, at, _)| *at + 100 <= heavy.1 || *at >= heavy.1 + 100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_heavy_task_is_not_starved_by_a_stream_of_light_ones() {
        let u = units(4);
        let (t0, log, peak) = (Instant::now(), Arc::default(), Arc::default());
        // Three light tasks of 300 ms keep 3 units busy...
        let mut tasks: Vec<_> = (0..3)
            .map(|_| task(&u, 1, 300, t0, Arc::clone(&log), Arc::clone(&peak)))
            .collect();
        // ...when a heavy one arrives...
        tasks.push(task(&u, 4, 50, t0, Arc::clone(&log), Arc::clone(&peak)));
        // ...and a new light task every 100 ms for 3 s would always leave
        // at least one unit busy.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tasks.push(task(&u, 1, 300, t0, Arc::clone(&log), Arc::clone(&peak)));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let heavy = log.iter().find(|(c, _, _)| *c == 4).unwrap();
        println!("heavy task started after {} ms", heavy.1);
        assert!(
            heavy.1 <= RESERVE.as_millis() as u64 + 300,
            "started after {} ms: {log:?}",
            heavy.1
        );
        // Lighter ones did overtake it while it waited less than the bound.
        assert!(log
            .iter()
            .any(|(c, at, _)| *c == 1 && *at > 0 && *at < heavy.1));
        assert!(peak.load(Ordering::Relaxed) <= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_waiting_is_reserved_first() {
        let u = units(4);
        let all = now_or_never(u.request(4).unwrap()).unwrap();
        let heavy3 = u.request(3).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let heavy2 = u.request(2).unwrap();
        tokio::time::advance(RESERVE).await;
        // Both are past the bound: the older (3) goes first; the 2 does
        // not fit beside it and is now the reserved head.
        drop(all);
        assert_eq!(u.used(), 3);
        assert_eq!(u.waiting(), 1);
        let p3 = now_or_never(heavy3).expect("the oldest first");
        // A light one arriving now does not overtake the reserved 2,
        // though 3 + 1 would fit.
        let light = u.request(1).unwrap();
        assert_eq!(u.waiting(), 2);
        drop(p3);
        let p2 = now_or_never(heavy2).expect("then the 2");
        let p1 = now_or_never(light).expect("and the light one beside it");
        drop((p2, p1));
        assert_eq!(u.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_waited_elsewhere_counts_its_wait_from_then() {
        let u = units(4);
        let all = now_or_never(u.request(4).unwrap()).unwrap();
        let since = Instant::now();
        tokio::time::advance(RESERVE).await;
        let light = u.request(1).unwrap();
        // Waited the whole bound already (in the bands' gate): it goes
        // before the younger light one and is reserved at once.
        let heavy = u.request_since(3, since).unwrap();
        assert!(u.head_is_reserved_for_tests());
        drop(all);
        let h = now_or_never(heavy).expect("the older one first");
        let l = now_or_never(light).expect("and the light one beside it");
        drop((h, l));
        assert_eq!(u.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reserve_of_zero_is_first_in_first_out() {
        let u = Arc::new(Units::new(4, Duration::ZERO));
        let held = now_or_never(u.request(2).unwrap()).unwrap();
        let heavy = u.request(4).unwrap();
        let light = u.request(1).unwrap();
        assert_eq!(u.waiting(), 2, "the light one does not overtake");
        drop(held);
        let h = now_or_never(heavy).expect("the heavy one first");
        drop(h);
        assert!(now_or_never(light).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_that_panics_gives_its_units_back() {
        let u = units(4);
        let wait = u.request(4).unwrap();
        let r = tokio::spawn(async move {
            let _p = wait.granted().await;
            panic!("handler bug");
        })
        .await;
        assert!(r.is_err());
        assert_eq!(u.used(), 0);
        assert!(now_or_never(u.request(4).unwrap()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_task_gives_its_units_back() {
        let u = units(4);
        let wait = u.request(3).unwrap();
        let abandon = tokio_util::sync::CancellationToken::new();
        let a = abandon.clone();
        let running = tokio::spawn(async move {
            let _p = wait.granted().await;
            tokio::select! {
                _ = std::future::pending::<()>() => {}
                _ = a.cancelled() => {}
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(u.used(), 3);
        abandon.cancel();
        running.await.unwrap();
        assert_eq!(u.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_leaves_the_queue_and_unblocks_the_rest() {
        let u = units(4);
        let held = now_or_never(u.request(2).unwrap()).unwrap();
        let heavy = u.request(4).unwrap();
        tokio::time::advance(RESERVE).await;
        // The heavy one is reserved: a light one waits behind it...
        let light = u.request(1).unwrap();
        assert_eq!(u.waiting(), 2);
        // ...until the heavy one's wait is dropped (its queue paused).
        let waiting = tokio::spawn(heavy.granted());
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(u.waiting(), 0);
        assert_eq!(u.used(), 3);
        let p = now_or_never(light).expect("granted once the heavy wait left");
        drop((p, held));
        assert_eq!(u.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn units_granted_but_never_taken_come_back() {
        let u = units(4);
        let held = now_or_never(u.request(4).unwrap()).unwrap();
        let wait = u.request(2).unwrap();
        drop(held);
        assert_eq!(u.used(), 2, "granted to the waiter");
        drop(wait);
        assert_eq!(u.used(), 0);
        // Granted at once, dropped before being awaited.
        drop(u.request(4).unwrap());
        assert_eq!(u.used(), 0);
    }
}
