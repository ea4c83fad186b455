//! Band-first admission for the priority bands of a quorum-mode queue.
//!
//! Quorum queues before RabbitMQ 4 have no priorities, so in quorum mode a
//! logical queue whose order has priorities is three queues, one per band
//! (`kairos_shared::queue_mode::Band`), each consumed on a channel of its
//! own. RabbitMQ no longer orders them for us: the worker does, among the
//! deliveries it holds that wait to start.
//!
//! # The rule
//! The next start goes to the oldest waiting delivery of the highest band
//! that has one waiting, except that a lower band that has had a delivery
//! waiting while `KAIROS_BAND_STARVATION_LIMIT` (N) starts went to higher
//! bands gets the next start (when two lower bands are both due, the lower
//! one first: its start is not a higher band's for the other, so both stay
//! within the bound). A band's count starts again at 0 when one of its
//! deliveries starts or when it has nothing waiting. So a waiting delivery
//! sees at most N starts of higher bands before its band gets one. Under
//! a full backlog in all three bands, the middle band gets one start per
//! N of the high band, and the low band one per N of the two above it
//! (with N = 8: 8 high, 1 middle, 1.125 low, the high band about 79 % of
//! the starts); the low band has a start in every N + 1, the middle band
//! in every N + 3 (the low band's starts come between its own).
//!
//! # How it fits the units and slots
//! The deliveries of all bands wait here first ([`Gate::enter`], in
//! delivery order per band, from each band's consumer loop). One dispatcher
//! per logical queue takes the delivery the rule picks through the usual
//! admission (`crate::capacity` units, then a `crate::slots` slot, see
//! `consumer::start_admission`) and hands it the permits once both are
//! granted. Only then is the choice final (and counted for the rule): while
//! the candidate still waits for units or a slot, a delivery the rule now
//! prefers (a higher band that has just arrived) replaces it, and the
//! candidate's wait is dropped, which leaves the units and slots queues. So
//! the choice is made as late as possible, when something can start.
//!
//! The units' overtaking (`crate::capacity`) still holds within the
//! bands: a picked delivery costing more than 1 that does not fit in the
//! free units, while the units queue's head is not reserved, keeps its
//! place in the units queue (it is *parked*, counted as a start for the
//! rule, and becomes reserved in time) and the dispatcher picks the next
//! one, which may fit and start ahead of it (a later higher-band delivery
//! that fits too). A cost-1 delivery that does not fit (every unit busy)
//! cannot be overtaken by a lighter one, and with a reserved head nothing
//! may overtake: the candidate then waits for its units and a slot, and
//! stays replaceable as above.
//! So a banded queue has in the units and slots queues its parked
//! deliveries and one candidate. Each enters the units queue with its
//! arrival in the gate as its start of waiting (`Units::request_since`):
//! a heavy delivery that waited behind others in the gate is reserved as
//! soon as it would have been in the direct admission.

use crate::capacity::Units;
use crate::consumer::Admitted;
use crate::slots::Slots;
use futures_util::stream::{FuturesUnordered, StreamExt};
use kairos_shared::queue_mode::Band;
use metrics::{Counter, Gauge};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Default of `KAIROS_BAND_STARVATION_LIMIT`: under a full backlog the high
/// band gets about 8 starts in 10, the middle and low bands about one each.
pub(crate) const DEFAULT_STARVATION_LIMIT: u32 = 8;

/// Number of bands (low, middle, high), indexed by `Band::index`.
const BANDS: usize = 3;

/// The band rule of the module doc, over waiting items of any kind (pure
/// logic: the gate keeps its deliveries' senders in it).
pub(crate) struct Chooser<T> {
    /// Waiting items per band (by `Band::index`) by arrival number: the
    /// first is the oldest, and one handed back leaves in log time.
    waiting: [BTreeMap<u64, T>; BANDS],
    /// Per band: starts that went to higher bands while it had something
    /// waiting, since its last start.
    passed: [u32; BANDS],
    limit: u32,
    next_seq: u64,
}

/// Which waiting item the rule picks: its band and arrival number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pick {
    pub(crate) band: Band,
    pub(crate) seq: u64,
}

fn band_at(index: usize) -> Band {
    Band::HIGHEST_FIRST[BANDS - 1 - index.min(BANDS - 1)]
}

impl<T> Chooser<T> {
    /// `limit` is N of the rule, at least 1 (0 would put the lowest band
    /// first always; the setting refuses it).
    pub(crate) fn new(limit: u32) -> Self {
        Chooser {
            waiting: Default::default(),
            passed: [0; BANDS],
            limit: limit.max(1),
            next_seq: 0,
        }
    }

    /// Adds an item at the back of its band.
    pub(crate) fn push(&mut self, band: Band, item: T) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting[usize::from(band.index())].insert(seq, item);
        seq
    }

    /// The item that should start next, if any waits.
    pub(crate) fn pick(&self) -> Option<Pick> {
        let head = |i: usize| {
            self.waiting[i].keys().next().map(|seq| Pick {
                band: band_at(i),
                seq: *seq,
            })
        };
        // A starved band first, the lowest of them (see the module doc);
        // the high band is never starved (nothing is above it).
        (0..BANDS)
            .find(|&i| !self.waiting[i].is_empty() && self.passed[i] >= self.limit)
            .or_else(|| (0..BANDS).rev().find(|&i| !self.waiting[i].is_empty()))
            .and_then(head)
    }

    /// The picked item starts: takes it out and counts the start for the
    /// rule. `None` when it is no longer there.
    pub(crate) fn start(&mut self, pick: Pick) -> Option<T> {
        let b = usize::from(pick.band.index());
        let item = self.waiting[b].remove(&pick.seq)?;
        self.passed[b] = 0;
        for lower in 0..b {
            if !self.waiting[lower].is_empty() {
                self.passed[lower] += 1;
            }
        }
        self.forget_empty();
        Some(item)
    }

    /// Takes out an item that no longer waits (its delivery was handed
    /// back); `None` when it had started.
    pub(crate) fn remove(&mut self, band: Band, seq: u64) -> Option<T> {
        let item = self.waiting[usize::from(band.index())].remove(&seq)?;
        self.forget_empty();
        Some(item)
    }

    /// The head of the picked band.
    fn head(&self, pick: Pick) -> Option<&T> {
        self.waiting[usize::from(pick.band.index())].get(&pick.seq)
    }

    /// Items waiting in `band`.
    pub(crate) fn waiting(&self, band: Band) -> usize {
        self.waiting[usize::from(band.index())].len()
    }

    /// Items waiting in every band.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.iter().map(BTreeMap::len).sum()
    }

    /// A band with nothing waiting starts its count again.
    fn forget_empty(&mut self) {
        for (band, passed) in self.waiting.iter().zip(self.passed.iter_mut()) {
            if band.is_empty() {
                *passed = 0;
            }
        }
    }
}

/// A waiting delivery: its cost, and where its permits go.
struct Entry {
    cost: u32,
    /// When it entered the gate: its wait for units counts from then.
    since: tokio::time::Instant,
    grant: oneshot::Sender<Admitted>,
}

/// The band admission of one logical queue for one consumer run (a
/// session, or until the queue is paused).
pub(crate) struct Gate {
    state: Mutex<Chooser<Entry>>,
    /// Something changed: a delivery arrived or was handed back.
    changed: Notify,
    /// `kairos_worker_band_waiting{queue,band}` and
    /// `kairos_worker_band_started_total{queue,band}`, by `Band::index`:
    /// handles taken once, so a delivery costs an atomic store, not a
    /// registry lookup.
    waiting: [Gauge; BANDS],
    started: [Counter; BANDS],
}

impl Gate {
    pub(crate) fn new(queue: &str, limit: u32) -> Arc<Self> {
        let labels = |i: usize| {
            [
                ("queue", queue.to_string()),
                ("band", band_at(i).label().to_string()),
            ]
        };
        Arc::new(Gate {
            state: Mutex::new(Chooser::new(limit)),
            changed: Notify::new(),
            waiting: std::array::from_fn(|i| {
                metrics::gauge!("kairos_worker_band_waiting", &labels(i))
            }),
            started: std::array::from_fn(|i| {
                metrics::counter!("kairos_worker_band_started_total", &labels(i))
            }),
        })
    }

    /// Sets the waiting gauges from `state`.
    fn publish_waiting(&self, state: &Chooser<Entry>) {
        for (i, gauge) in self.waiting.iter().enumerate() {
            gauge.set(state.waiting(band_at(i)) as f64);
        }
    }

    /// A poisoned lock holds plain queues: still usable.
    fn lock(&self) -> MutexGuard<'_, Chooser<Entry>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery of `band` costing `cost` (which fits the capacity) waits
    /// for its turn. Called in delivery order by the band's consumer loop.
    /// The returned wait resolves with its permits; dropped before that,
    /// the delivery leaves the gate.
    pub(crate) fn enter(self: &Arc<Self>, band: Band, cost: u32) -> GateWait {
        let (grant, granted) = oneshot::channel();
        let seq = {
            let mut state = self.lock();
            let since = tokio::time::Instant::now();
            let seq = state.push(band, Entry { cost, since, grant });
            self.publish_waiting(&state);
            seq
        };
        self.changed.notify_one();
        GateWait {
            gate: self.clone(),
            band,
            seq,
            granted,
            done: false,
        }
    }

    /// Hands the permits to the deliveries as the rule picks them, until
    /// `stop`. The deliveries still waiting then see the same `stop` and
    /// go back to their queues.
    pub(crate) async fn dispatch(
        self: Arc<Self>,
        units: Arc<Units>,
        slots: Arc<Slots>,
        stop: CancellationToken,
    ) {
        // Deliveries that did not fit in the free units and keep their
        // place in the units queue, each until granted (then it waits for a
        // slot like any task) or handed back.
        let mut parked = FuturesUnordered::new();
        loop {
            let candidate = self.pick();
            let Some((pick, cost, since)) = candidate else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.changed.notified() => continue,
                    Some(()) = parked.next(), if !parked.is_empty() => continue,
                }
            };
            // The cost was checked against the capacity on entry.
            let Ok(wait) = units.request_since(cost, since) else {
                self.lock().start(pick);
                continue;
            };
            if wait.queued() && cost > 1 && units.overtaking_open() {
                // Too heavy for the free units, while a lighter task may
                // start ahead of it: it keeps its place in the units queue
                // (where it becomes reserved in time) and the next pick
                // goes on, as in the direct admission. A cost-1 delivery
                // that does not fit (every unit busy, the usual case under
                // a full pool) stays the candidate instead: nothing lighter
                // could overtake it, and the band order holds.
                if let Some(entry) = self.start(pick) {
                    let admitting = crate::consumer::start_admission(wait, slots.clone());
                    parked.push(park(entry.grant, admitting));
                }
                continue;
            }
            let mut admitting = crate::consumer::start_admission(wait, slots.clone());
            let admitted = loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    Some(()) = parked.next(), if !parked.is_empty() => {}
                    // Before the grant: a change that came with it may
                    // make another delivery the one to start.
                    _ = self.changed.notified() => {
                        // A delivery the rule now prefers, or the
                        // candidate handed back: choose again (dropping
                        // the wait leaves the units and slots queues, and
                        // gives back what it was granted).
                        if self.pick().map(|(p, ..)| p) != Some(pick) {
                            break None;
                        }
                    }
                    admitted = &mut admitting => break Some(admitted),
                }
            };
            let Some(admitted) = admitted else { continue };
            let entry = self.start(pick);
            // A delivery handed back meanwhile no longer takes them: the
            // permits drop here and go back.
            if let Some(entry) = entry {
                let _ = entry.grant.send(admitted);
            }
        }
    }

    /// The picked delivery starts, for the rule: out of the gate.
    fn start(&self, pick: Pick) -> Option<Entry> {
        let entry = {
            let mut state = self.lock();
            let entry = state.start(pick);
            self.publish_waiting(&state);
            entry
        };
        self.started[usize::from(pick.band.index())].increment(1);
        entry
    }

    /// The rule's pick among the deliveries still waiting, with its cost
    /// and arrival.
    fn pick(&self) -> Option<(Pick, u32, tokio::time::Instant)> {
        let state = self.lock();
        let pick = state.pick()?;
        let head = state.head(pick)?;
        Some((pick, head.cost, head.since))
    }

    /// Deliveries waiting in the gate (all bands).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A parked delivery's wait: hands it the permits once granted, or gives
/// up its places in the units and slots queues when it is handed back.
async fn park(mut grant: oneshot::Sender<Admitted>, admitting: crate::consumer::Admitting) {
    tokio::select! {
        admitted = admitting => {
            let _ = grant.send(admitted);
        }
        () = grant.closed() => {}
    }
}

/// A delivery's wait in the [`Gate`].
pub(crate) struct GateWait {
    gate: Arc<Gate>,
    band: Band,
    seq: u64,
    granted: oneshot::Receiver<Admitted>,
    /// The permits were taken.
    done: bool,
}

impl Future for GateWait {
    type Output = Admitted;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Admitted> {
        match Pin::new(&mut self.granted).poll(cx) {
            Poll::Ready(Ok(admitted)) => {
                self.done = true;
                Poll::Ready(admitted)
            }
            // The gate keeps the sender while the entry waits, and drops it
            // only after sending or once this wait is dropped: not reached.
            // Pending rather than a panic: the delivery's stop still ends
            // the wait.
            Poll::Ready(Err(_)) => Poll::Pending,
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for GateWait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Handed back (a stop, a pause) before it started: it leaves the
        // gate, and the dispatcher chooses again if it was the candidate.
        // Permits sent but never taken drop with the receiver.
        let removed = {
            let mut state = self.gate.lock();
            let removed = state.remove(self.band, self.seq).is_some();
            if removed {
                self.gate.publish_waiting(&state);
            }
            removed
        };
        if removed {
            self.gate.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_shared::config::Concurrency;
    use std::time::Duration;

    const L: Band = Band::LOW;
    const M: Band = Band::MIDDLE;
    const H: Band = Band::HIGH;

    /// A gate (starvation limit `limit`) dispatching over `capacity` units
    /// (reserve after `reserve`) and a fixed pool of `size` slots, until
    /// `stop` is cancelled.
    struct Dispatching {
        units: Arc<Units>,
        slots: Arc<Slots>,
        gate: Arc<Gate>,
        stop: CancellationToken,
        dispatcher: tokio::task::JoinHandle<()>,
    }

    fn dispatching(capacity: u32, reserve: Duration, size: usize, limit: u32) -> Dispatching {
        let units = Arc::new(Units::new(capacity, reserve));
        let slots = Slots::new(Concurrency {
            min: size,
            max: size,
        });
        let gate = Gate::new("q", limit);
        let stop = CancellationToken::new();
        let dispatcher = tokio::spawn(gate.clone().dispatch(
            units.clone(),
            slots.clone(),
            stop.clone(),
        ));
        Dispatching {
            units,
            slots,
            gate,
            stop,
            dispatcher,
        }
    }

    /// Starts everything, returning the items in start order.
    fn drain<T: Copy>(c: &mut Chooser<T>) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(p) = c.pick() {
            out.push(c.start(p).expect("the pick is waiting"));
        }
        out
    }

    #[test]
    fn strictly_highest_band_first_within_the_limit() {
        let mut c = Chooser::new(100);
        for (band, name) in [(L, "l1"), (M, "m1"), (H, "h1"), (L, "l2"), (H, "h2")] {
            c.push(band, name);
        }
        assert_eq!(drain(&mut c), vec!["h1", "h2", "m1", "l1", "l2"]);
    }

    #[test]
    fn within_a_band_arrival_order() {
        let mut c = Chooser::new(8);
        for i in 0..20 {
            c.push(M, i);
        }
        assert_eq!(drain(&mut c), (0..20).collect::<Vec<_>>());
    }

    /// Per band, the most starts of higher bands seen between two of its
    /// own while it waited.
    fn longest_pass(order: &[(Band, u32)], band: Band, limit_check: u32) -> u32 {
        let mut worst = 0;
        let mut passed = 0;
        let left = order.iter().filter(|(b, _)| *b == band).count();
        let mut seen = 0;
        for (b, _) in order {
            if seen == left {
                break;
            }
            if *b == band {
                seen += 1;
                passed = 0;
            } else if *b > band {
                passed += 1;
                worst = worst.max(passed);
            }
        }
        assert!(
            worst <= limit_check,
            "{band:?}: {worst} higher starts in a row"
        );
        worst
    }

    #[test]
    fn a_full_backlog_gives_every_lower_band_a_start_within_the_bound() {
        let limit = 8;
        let mut c = Chooser::new(limit);
        for i in 0..30 {
            c.push(L, (L, i));
            c.push(M, (M, i));
            c.push(H, (H, i));
        }
        let order = drain(&mut c);
        assert_eq!(order.len(), 90);
        // The first ten: 8 high, then the middle and low bands' turns.
        let first: Vec<Band> = order.iter().take(10).map(|(b, _)| *b).collect();
        assert_eq!(first, [[H; 8].as_slice(), &[L, M]].concat());
        // The lower bands never see more than N higher starts in a row...
        assert_eq!(longest_pass(&order, L, limit), limit);
        assert_eq!(longest_pass(&order, M, limit), limit);
        // ...and the low band has one start in every N + 1 while it waits.
        let last_low = order.iter().rposition(|(b, _)| *b == L).unwrap();
        for window in order[..=last_low].windows(limit as usize + 1) {
            assert!(window.iter().any(|(b, _)| *b == L), "{window:?}");
        }
        // High gets most: 30 high starts within the first 38.
        let high_done = order.iter().rposition(|(b, _)| *b == H).unwrap();
        assert!(high_done < 38, "last high start at {high_done}");
        // Every band in its arrival order.
        for band in [L, M, H] {
            let seqs: Vec<u32> = order
                .iter()
                .filter(|(b, _)| *b == band)
                .map(|(_, i)| *i)
                .collect();
            assert_eq!(seqs, (0..30).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_band_appearing_midway_counts_from_its_arrival() {
        let mut c = Chooser::new(3);
        for i in 0..10 {
            c.push(H, ("h", i));
        }
        // Five high starts before any low delivery waits: not counted.
        let mut order = Vec::new();
        for _ in 0..5 {
            let p = c.pick().unwrap();
            order.push(c.start(p).unwrap());
        }
        c.push(L, ("l", 0));
        c.push(L, ("l", 1));
        order.extend(drain(&mut c));
        let names: Vec<String> = order.iter().map(|(b, i)| format!("{b}{i}")).collect();
        assert_eq!(
            names,
            ["h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7", "l0", "h8", "h9", "l1"]
        );
    }

    #[test]
    fn an_emptied_band_starts_its_count_again() {
        let mut c = Chooser::new(2);
        c.push(H, "h0");
        c.push(L, "l0");
        c.push(H, "h1");
        // One high start passes the low band...
        let p = c.pick().unwrap();
        assert_eq!(c.start(p), Some("h0"));
        // ...which is then handed back (emptied) and comes again.
        assert_eq!(c.remove(L, 1), Some("l0"));
        c.push(L, "l1");
        c.push(H, "h2");
        c.push(H, "h3");
        assert_eq!(drain(&mut c), vec!["h1", "h2", "l1", "h3"]);
    }

    #[test]
    fn two_due_bands_go_lowest_first() {
        let mut c = Chooser::new(1);
        c.push(L, "l0");
        c.push(M, "m0");
        c.push(H, "h0");
        c.push(H, "h1");
        c.push(M, "m1");
        // h0 passes both; the low band goes first, which does not pass the
        // middle one, and the middle one goes next.
        assert_eq!(drain(&mut c), vec!["h0", "l0", "m0", "h1", "m1"]);
    }

    #[test]
    fn a_limit_of_zero_is_taken_as_one() {
        let mut c = Chooser::new(0);
        c.push(L, "l0");
        c.push(H, "h0");
        assert_eq!(c.pick().map(|p| p.band), Some(H));
    }

    /// The gate with real units and slots: one slot, a backlog in all
    /// bands, starts in the rule's order; a higher band arriving while the
    /// candidate waits for the slot replaces it.
    #[tokio::test]
    async fn the_gate_starts_by_band_and_prefers_a_late_high_delivery() {
        let Dispatching {
            units,
            slots,
            gate,
            stop,
            dispatcher,
        } = dispatching(1, Duration::from_secs(1), 1, 2);
        // The only slot is taken: everything waits.
        let held = slots.acquire().await;
        let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let spawn = |band: Band, name: &'static str| {
            let wait = gate.enter(band, 1);
            let tx = tx.clone();
            tokio::spawn(async move {
                let permits = wait.await;
                let _ = tx.send(name);
                // Runs a moment, then frees the slot and units.
                tokio::task::yield_now().await;
                drop(permits);
            })
        };
        let mut tasks = vec![spawn(L, "l0"), spawn(L, "l1"), spawn(M, "m0")];
        tokio::task::yield_now().await;
        tasks.push(spawn(H, "h0"));
        tasks.push(spawn(H, "h1"));
        tasks.push(spawn(H, "h2"));
        while gate.len() < 6 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..6 {
            order.push(started.recv().await.expect("a start"));
        }
        // Limit 2: two high starts pass the low and middle bands.
        assert_eq!(order, vec!["h0", "h1", "l0", "m0", "h2", "l1"]);
        for t in tasks {
            t.await.unwrap();
        }
        stop.cancel();
        dispatcher.await.unwrap();
        assert_eq!(units.used(), 0);
        assert_eq!(slots.busy(), 0);
    }

    /// Within the bands the units' overtaking holds: a heavy delivery
    /// that does not fit keeps its place, a lighter one behind it starts,
    /// and once the heavy one is reserved nothing overtakes it.
    #[tokio::test(start_paused = true)]
    async fn a_heavy_delivery_lets_lighter_ones_overtake_until_it_is_reserved() {
        let reserve = Duration::from_millis(1000);
        let Dispatching {
            units,
            slots,
            gate,
            stop,
            dispatcher,
        } = dispatching(2, reserve, 4, 8);
        let running = futures_util::FutureExt::now_or_never(units.request(1).unwrap().granted())
            .expect("one unit busy");
        let mut heavy = tokio::spawn(gate.enter(H, 2));
        let light = gate.enter(H, 1).await;
        assert!(
            futures_util::FutureExt::now_or_never(&mut heavy).is_none(),
            "the heavy one waits for its units"
        );
        drop(light);
        // Past the reserve bound: the heavy one is reserved, a light one
        // arriving now waits behind it although a unit is free.
        tokio::time::advance(reserve).await;
        let mut late = tokio::spawn(gate.enter(H, 1));
        tokio::task::yield_now().await;
        assert!(futures_util::FutureExt::now_or_never(&mut late).is_none());
        drop(running);
        let heavy = heavy.await.unwrap();
        assert!(futures_util::FutureExt::now_or_never(&mut late).is_none());
        drop(heavy);
        drop(late.await.unwrap());
        stop.cancel();
        dispatcher.await.unwrap();
        assert_eq!((units.used(), slots.busy()), (0, 0));
    }

    /// A measurement, not a check (`--ignored`): deliveries per second
    /// through the gate and through the direct admission, with real units
    /// and slots (64 of each) and tasks that end at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn admission_throughput_gate_and_direct() {
        const N: usize = 50_000;
        for gated in [false, true] {
            let Dispatching {
                units,
                slots,
                gate,
                stop,
                dispatcher,
            } = dispatching(64, Duration::from_secs(1), 64, 8);
            let began = std::time::Instant::now();
            let mut tasks = Vec::with_capacity(N);
            for i in 0..N {
                let wait: crate::consumer::Admitting = if gated {
                    Box::pin(gate.enter(Band::HIGHEST_FIRST[i % 3], 1))
                } else {
                    crate::consumer::start_admission(units.request(1).unwrap(), slots.clone())
                };
                tasks.push(tokio::spawn(async move {
                    drop(wait.await);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let took = began.elapsed();
            println!(
                "{}: {N} admissions in {took:?} ({:.0}/s)",
                if gated { "gate" } else { "direct" },
                N as f64 / took.as_secs_f64()
            );
            stop.cancel();
            dispatcher.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_delivery_handed_back_leaves_the_gate_and_its_turn_passes() {
        let Dispatching {
            units,
            slots,
            gate,
            stop,
            dispatcher,
        } = dispatching(4, Duration::from_secs(1), 1, 8);
        let held = slots.acquire().await;
        let high = gate.enter(H, 1);
        let low = gate.enter(L, 1);
        // The high one is the candidate, waiting for the slot; handed back.
        drop(high);
        drop(held);
        let permits = low.await;
        assert_eq!(gate.len(), 0);
        drop(permits);
        stop.cancel();
        dispatcher.await.unwrap();
        assert_eq!((units.used(), slots.busy()), (0, 0));
    }
}
