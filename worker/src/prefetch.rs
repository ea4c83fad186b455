//! A consumer whose prefetch follows the pool of task slots.
//!
//! A worker that holds more unacked deliveries than it can run hides them
//! from the other workers on its queue (and from an autoscaler that counts
//! ready messages): with a fixed prefetch of the maximum concurrency, a
//! worker at 4 slots could sit on 64 deliveries while an idle worker next
//! to it gets none. So the prefetch is the pool's size plus a little
//! headroom ([`for_pool`]), and it moves as `crate::slots` scales the pool.
//!
//! How it moves: RabbitMQ applies a `basic.qos` with `global=false` only to
//! consumers started after it, and quorum queues refuse the per-channel
//! (`global=true`) limit that would change live (RabbitMQ 4 deprecates it;
//! both checked on RabbitMQ 3.10 by tests/tests/fleet.rs).
//! So a change cancels the consumer, and once the deliveries it already
//! holds have all been taken by the consumer loop, sets the new prefetch and
//! consumes again on the same channel. Those deliveries are not handed
//! back, and the new consumer starts only after them, so delivery tags
//! still grow in the order the consumer loop registers them (which
//! `crate::acks` relies on), and the new window is not stacked on an old
//! one still full of waiting deliveries: beside the new prefetch the worker
//! holds only tasks already running. A change costs three round trips; growth is
//! applied at most every [`GROW_EVERY`] and a shrink only once the pool has
//! been smaller for [`SHRINK_AFTER`], so a pool that breathes does not
//! churn consumers.
//!
//! An explicit `KAIROS_PREFETCH` keeps a fixed prefetch, as before.

use crate::slots::Slots;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The headroom is a quarter of the pool...
const HEADROOM_SHARE: usize = 4;
/// ...and at least two deliveries, so the next task is on its way while
/// the pool is busy (a prefetch equal to the pool would leave a slot idle
/// for a round trip after every task).
const MIN_HEADROOM: usize = 2;

/// The least prefetch on a quorum queue (`KAIROS_QUEUE_MODE=quorum`), up to
/// the maximum concurrency. A quorum queue settles each ack and hands out
/// each delivery through its replicas' consensus, so a delivery takes
/// milliseconds to replace: a prefetch of the pool plus a quarter (6 for a
/// pool of 4) then caps a worker of quick tasks below what falls due (the
/// W2b benchmark on the 3-node cluster: seconds late at 2,000 tasks/s with
/// it, 4 to 5 ms at p50 with 300), and the pool, never short of slots,
/// never grows to fix it. 32 in flight covers 2,000 tasks/s at up to 16 ms
/// per delivery round trip.
pub(crate) const QUORUM_MIN_PREFETCH: usize = 32;

/// The fastest the prefetch grows: one change per autoscaler tick.
pub(crate) const GROW_EVERY: Duration = Duration::from_millis(250);
/// How long the pool must have been smaller before the prefetch shrinks.
pub(crate) const SHRINK_AFTER: Duration = Duration::from_secs(2);

/// The prefetch for a pool of `size` slots that may grow to `max`: the
/// pool plus a quarter (at least [`MIN_HEADROOM`]), and at least `floor`
/// ([`QUORUM_MIN_PREFETCH`] on quorum queues, else 0), but never above
/// `max` (the fixed prefetch of a worker without this), so a full pool
/// prefetches what it always did.
pub(crate) fn for_pool(size: usize, max: usize, floor: usize) -> u16 {
    let headroom = (size / HEADROOM_SHARE).max(MIN_HEADROOM);
    let prefetch = (size + headroom).max(floor).min(max.max(size)).max(1);
    u16::try_from(prefetch).unwrap_or(u16::MAX)
}

/// How a session's consumers are opened: their prefetch, and where they
/// report that they consume (for `/readyz`).
#[derive(Clone)]
pub(crate) struct ConsumerSetup {
    /// `KAIROS_PREFETCH`, when set: a fixed prefetch.
    pub(crate) fixed: Option<u16>,
    /// The least prefetch that follows the pool
    /// ([`QUORUM_MIN_PREFETCH`] on quorum queues).
    pub(crate) floor: usize,
    /// The pool the prefetch follows otherwise.
    pub(crate) slots: Arc<Slots>,
    /// The queues consumed right now.
    pub(crate) consuming: Arc<Consuming>,
}

/// The number of live consumers per logical queue.
#[derive(Default)]
pub(crate) struct Consuming {
    queues: Mutex<BTreeMap<String, usize>>,
}

impl Consuming {
    /// Whether `queue` has a consumer now.
    pub(crate) fn is_consuming(&self, queue: &str) -> bool {
        self.lock().get(queue).is_some_and(|n| *n > 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        // A poisoned lock still holds plain counts.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn up(self: &Arc<Self>, queue: &str) -> ConsumingGuard {
        *self.lock().entry(queue.to_string()).or_default() += 1;
        ConsumingGuard {
            consuming: self.clone(),
            queue: queue.to_string(),
        }
    }
}

/// Counts one consumer of its queue while it lives.
pub(crate) struct ConsumingGuard {
    consuming: Arc<Consuming>,
    queue: String,
}

impl Drop for ConsumingGuard {
    fn drop(&mut self) {
        if let Some(n) = self.consuming.lock().get_mut(&self.queue) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The prefetch following the pool.
struct Follow {
    sizes: watch::Receiver<usize>,
    max: usize,
    floor: usize,
    /// When the prefetch last changed.
    changed_at: Instant,
    /// A change put off by the rate limits: when to look again.
    recheck: Option<Instant>,
}

/// What to do with the prefetch now.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Keep,
    Set(u16),
    LookAgainAt(Instant),
}

impl Follow {
    fn decide(&self, applied: u16, now: Instant) -> Decision {
        decide(
            for_pool(*self.sizes.borrow(), self.max, self.floor),
            applied,
            self.changed_at,
            now,
        )
    }
}

/// The rate limits of the module doc, for a prefetch `applied` since
/// `changed_at` when the pool wants `wanted`.
fn decide(wanted: u16, applied: u16, changed_at: Instant, now: Instant) -> Decision {
    let after = match wanted.cmp(&applied) {
        std::cmp::Ordering::Equal => return Decision::Keep,
        std::cmp::Ordering::Greater => GROW_EVERY,
        std::cmp::Ordering::Less => SHRINK_AFTER,
    };
    let at = changed_at + after;
    if now >= at {
        Decision::Set(wanted)
    } else {
        Decision::LookAgainAt(at)
    }
}

/// The consumer of one task queue, consumed again on the same channel
/// whenever its prefetch changes (see the module doc).
pub(crate) struct PooledConsumer {
    channel: Channel,
    queue: ShortString,
    /// The logical queue, for metrics and logs.
    logical: String,
    /// `None` between a prefetch change and the end of the old consumer's
    /// deliveries: opened with [`applied`](Self::applied) then.
    current: Option<Consumer>,
    /// The `basic.consume` under way in a task of its own: when the caller
    /// drops [`next`](Self::next) meanwhile (its stop fired), the consumer
    /// still lands here and [`cancel`](Self::cancel) cancels it, rather
    /// than one the broker feeds with nobody reading.
    opening: Option<tokio::task::JoinHandle<lapin::Result<Consumer>>>,
    /// A consumer replaced by a prefetch change, cancelled already, still
    /// yielding the deliveries it held.
    draining: Option<Consumer>,
    applied: u16,
    follow: Option<Follow>,
    _up: ConsumingGuard,
}

impl PooledConsumer {
    /// Sets the prefetch and starts consuming `queue` (logical name
    /// `logical`) on `channel`.
    pub(crate) async fn start(
        channel: &Channel,
        queue: ShortString,
        logical: &str,
        setup: &ConsumerSetup,
    ) -> lapin::Result<Self> {
        let limits = setup.slots.limits();
        let follow = setup.fixed.is_none().then(|| Follow {
            sizes: setup.slots.watch_size(),
            max: limits.max,
            floor: setup.floor,
            changed_at: Instant::now(),
            recheck: None,
        });
        let applied = setup
            .fixed
            .unwrap_or_else(|| for_pool(setup.slots.size(), limits.max, setup.floor));
        let current = open(channel.clone(), queue.clone(), applied).await?;
        record(logical, applied);
        Ok(PooledConsumer {
            channel: channel.clone(),
            queue,
            logical: logical.to_string(),
            current: Some(current),
            opening: None,
            draining: None,
            applied,
            follow,
            _up: setup.consuming.up(logical),
        })
    }

    /// The next delivery: first those a replaced consumer still holds,
    /// then the current consumer's (opened once they are all taken).
    /// Changes the prefetch meanwhile when the pool asks. `None` when the
    /// broker cancelled the consumer.
    pub(crate) async fn next(&mut self) -> Option<lapin::Result<Delivery>> {
        loop {
            if let Some(old) = &mut self.draining {
                match old.next().await {
                    Some(d) => return Some(d),
                    None => self.draining = None,
                }
                continue;
            }
            if self.current.is_none() {
                let (channel, queue, prefetch) =
                    (self.channel.clone(), self.queue.clone(), self.applied);
                let opening = self
                    .opening
                    .get_or_insert_with(|| tokio::spawn(open(channel, queue, prefetch)));
                let opened = opening.await;
                self.opening = None;
                match opened {
                    Ok(Ok(c)) => self.current = Some(c),
                    Ok(Err(err)) => return Some(Err(err)),
                    // Cannot happen (`open` does not panic); as if the
                    // broker had cancelled it: the session starts again.
                    Err(_) => return None,
                }
            }
            let Some(current) = self.current.as_mut() else {
                continue;
            };
            let recheck = self.follow.as_ref().and_then(|f| f.recheck);
            tokio::select! {
                biased;
                d = current.next() => return d,
                () = size_changed(&mut self.follow) => {}
                () = sleep_until(recheck) => {}
            }
            if let Err(err) = self.adjust().await {
                return Some(Err(err));
            }
        }
    }

    /// Changes the prefetch when the rate limits allow, else notes when to
    /// look again.
    async fn adjust(&mut self) -> lapin::Result<()> {
        let now = Instant::now();
        let Some(decision) = self.follow.as_ref().map(|f| f.decide(self.applied, now)) else {
            return Ok(());
        };
        let recheck = match decision {
            Decision::Keep => None,
            Decision::LookAgainAt(at) => Some(at),
            Decision::Set(prefetch) => {
                self.resize(prefetch).await?;
                None
            }
        };
        if let Some(f) = &mut self.follow {
            f.recheck = recheck;
            if matches!(decision, Decision::Set(_)) {
                f.changed_at = now;
            }
        }
        Ok(())
    }

    /// Cancels the consumer; [`next`](Self::next) consumes again with
    /// `prefetch` once the old consumer's deliveries are taken. Cancelling
    /// first means every delivery of the old consumer has a lower tag than
    /// the new one's (the broker sends `cancel-ok` after its last delivery,
    /// and lapin ends the old stream after it).
    async fn resize(&mut self, prefetch: u16) -> lapin::Result<()> {
        self.cancel().await?;
        tracing::debug!(queue = %self.logical, from = self.applied, to = prefetch, "prefetch changed");
        self.draining = self.current.take();
        self.applied = prefetch;
        record(&self.logical, prefetch);
        Ok(())
    }

    /// Cancels the consumer: the broker sends nothing more.
    pub(crate) async fn cancel(&mut self) -> lapin::Result<()> {
        if let Some(opening) = self.opening.take() {
            if let Ok(Ok(c)) = opening.await {
                self.current = Some(c);
            }
        }
        match &self.current {
            Some(c) => {
                self.channel
                    .basic_cancel(c.tag(), BasicCancelOptions::default())
                    .await
            }
            None => Ok(()),
        }
    }

    /// The deliveries received and not yet taken (after
    /// [`cancel`](Self::cancel)), to hand back.
    pub(crate) fn buffered(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        for consumer in self.draining.iter_mut().chain(self.current.as_mut()) {
            while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
                out.push(d);
            }
        }
        out
    }
}

/// `basic.qos` (per consumer), then `basic.consume`.
async fn open(channel: Channel, queue: ShortString, prefetch: u16) -> lapin::Result<Consumer> {
    // Prefetch before consume: the broker never sends more than this many
    // unacked deliveries, which bounds how far a low-priority backlog can
    // get ahead of a later high-priority task.
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

fn record(queue: &str, prefetch: u16) {
    metrics::gauge!("kairos_worker_prefetch", "queue" => queue.to_string())
        .set(f64::from(prefetch));
}

/// Returns when the pool size changed; never when the prefetch is fixed or
/// the pool is gone.
async fn size_changed(follow: &mut Option<Follow>) {
    match follow {
        Some(f) => {
            if f.sizes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefetch_is_the_pool_plus_headroom_up_to_the_maximum() {
        let cases = [
            (1, 64, 3),
            (4, 64, 6),
            (8, 64, 10),
            (16, 64, 20),
            (32, 64, 40),
            (60, 64, 64),
            (64, 64, 64),
        ];
        for (size, max, want) in cases {
            assert_eq!(for_pool(size, max, 0), want, "pool {size} of {max}");
        }
        assert_eq!(
            for_pool(8, 8, 0),
            8,
            "a fixed concurrency prefetches as before"
        );
        assert_eq!(for_pool(1, 1, 0), 1);
        // Quorum queues: at least the floor, still never above the maximum.
        let q = QUORUM_MIN_PREFETCH;
        assert_eq!(for_pool(4, 64, q), 32);
        assert_eq!(for_pool(32, 64, q), 40);
        assert_eq!(for_pool(4, 16, q), 16);
        assert_eq!(for_pool(64, 64, q), 64);
    }

    #[test]
    fn growth_is_prompt_and_shrinking_waits() {
        let t0 = Instant::now();
        assert_eq!(decide(10, 10, t0, t0), Decision::Keep);
        assert_eq!(decide(20, 10, t0, t0 + GROW_EVERY), Decision::Set(20));
        assert_eq!(
            decide(20, 10, t0, t0 + GROW_EVERY / 2),
            Decision::LookAgainAt(t0 + GROW_EVERY)
        );
        assert_eq!(
            decide(6, 10, t0, t0 + GROW_EVERY),
            Decision::LookAgainAt(t0 + SHRINK_AFTER)
        );
        assert_eq!(decide(6, 10, t0, t0 + SHRINK_AFTER), Decision::Set(6));
    }

    #[test]
    fn consuming_counts_live_consumers() {
        let c = Arc::new(Consuming::default());
        assert!(!c.is_consuming("q"));
        let a = c.up("q");
        let b = c.up("q");
        drop(a);
        assert!(c.is_consuming("q"));
        drop(b);
        assert!(!c.is_consuming("q"));
    }
}
