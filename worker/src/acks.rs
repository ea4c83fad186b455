//! Acknowledgements, coalesced. A settled delivery is not acked on its own:
//! the deliveries settled within about a millisecond go out as one
//! `basic.ack` with `multiple` set, up to the oldest delivery still running.
//!
//! Each lapin ack is a hand-off to its I/O thread and back, and each is a
//! frame RabbitMQ's channel and queue processes handle on their own, so an
//! ack per task costs CPU on both sides in step with the task rate. One
//! `multiple` ack per flush bounds that cost by the flush rate instead (at
//! most one flush per [`WINDOW`] while deliveries keep settling), whatever
//! the task rate.
//!
//! A slow task would hold back every later ack (a `multiple` ack only
//! covers a prefix), and unacked deliveries count against the prefetch, so
//! a delivery settled behind a running one is acked on its own once it has
//! waited [`HOLD`].
//!
//! If the process dies with settled deliveries not yet acked, RabbitMQ
//! redelivers them: the task runs again (at-least-once, as when it dies
//! between the handler's end and a single ack).
//!
//! A delivery whose replacement the broker refused (a nack: `NS.retry` or
//! `NS.dead` full with `reject-publish`) must never be acked, and a
//! `multiple` ack covers every unacked tag below it, settled or not. So a
//! refused delivery is [`requeue`](Acks::requeue)d: the next flush sends its
//! `basic.nack` (requeue) first, awaits it, and only then any ack, so no
//! `multiple` ack can reach the tag while it is still unacked. If the
//! process dies
//! * before that nack went out: the delivery is unacked and comes back;
//! * after the nack, before the acks: it is back in its queue, and the
//!   settled ones come back too (their replacements were confirmed, so a
//!   retry is held twice under one id and attempt, which collapses);
//! * after both: nothing is pending.

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long settled deliveries gather before a flush: a millisecond adds
/// little to the time a delivery stays unacked, and at a high task rate it
/// gathers many deliveries into one `multiple` ack.
const WINDOW: Duration = Duration::from_millis(1);

/// How long a delivery settled behind a running one waits for the prefix
/// to catch up before it is acked on its own. A few flush windows: a short
/// task ahead usually settles within it, so the held deliveries join the
/// next `multiple` ack; a long one keeps them (and their prefetch places)
/// unacked for at most this long.
pub(crate) const HOLD: Duration = Duration::from_millis(10);

/// The acks of one consumer channel. Delivery tags grow in the order the
/// consumer registers deliveries, which is what makes a prefix meaningful.
///
/// A delivery goes [`register`](Self::register)ed, then either
/// [`settle`](Self::settle)d (to be acked) or [`requeue`](Self::requeue)d
/// (to be handed back); [`close`](Self::close) acks what is left.
pub(crate) struct Acks {
    channel: Channel,
    state: Mutex<State>,
    wake: Notify,
    /// Serialises flushes: a `multiple` ack sent after a later one would
    /// name a tag already acked, which closes the channel.
    sending: tokio::sync::Mutex<()>,
    closed: CancellationToken,
    /// The flusher, awaited by [`close`](Self::close): nothing of it may
    /// touch the channel once the connection closes.
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    /// Registered and not yet settled (running or waiting to run).
    open: BTreeSet<u64>,
    /// Settled, ack not sent yet, with when they were settled.
    settled: BTreeMap<u64, Instant>,
    /// Never to be acked: handed back to the queue (nack, requeue) by the
    /// next flush, before that flush acks anything.
    refused: BTreeSet<u64>,
}

/// What one flush sends.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// Nacked (requeue) one by one, before any ack of this plan.
    requeue: Vec<u64>,
    /// Ack everything up to and including this tag.
    multiple: Option<u64>,
    /// Acked one by one: settled behind an open delivery for [`HOLD`].
    singles: Vec<u64>,
    /// When the oldest delivery still held back falls due for a single ack.
    next: Option<Instant>,
}

impl State {
    /// Takes what to ack now out of `settled`. With `all`, nothing is held.
    fn plan(&mut self, now: Instant, all: bool) -> Plan {
        let low = self.open.first().copied().unwrap_or(u64::MAX);
        let ahead = self.settled.split_off(&low);
        let multiple = self.settled.last_key_value().map(|(tag, _)| *tag);
        self.settled = ahead;
        let mut singles = Vec::new();
        let mut next: Option<Instant> = None;
        self.settled.retain(|tag, at| {
            let due = *at + HOLD;
            if all || due <= now {
                singles.push(*tag);
                false
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
                true
            }
        });
        Plan {
            requeue: std::mem::take(&mut self.refused).into_iter().collect(),
            multiple,
            singles,
            next,
        }
    }
}

impl Acks {
    /// Starts the flusher of `channel`'s acks. A failed ack fires `broken`:
    /// the channel is gone and its unacked deliveries come back.
    pub(crate) fn start(channel: Channel, broken: CancellationToken) -> Arc<Self> {
        let acks = Arc::new(Acks {
            channel,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            sending: tokio::sync::Mutex::new(()),
            closed: CancellationToken::new(),
            flusher: Mutex::new(None),
        });
        let flusher = tokio::spawn(acks.clone().flush_loop(broken));
        *acks.flusher.lock().unwrap_or_else(|p| p.into_inner()) = Some(flusher);
        acks
    }

    /// A delivery about to run. Called in delivery order.
    pub(crate) fn register(&self, tag: u64) {
        self.state().open.insert(tag);
    }

    /// The delivery is done with (its replacement, if any, confirmed): it
    /// may be acked.
    pub(crate) fn settle(&self, tag: u64) {
        {
            let mut state = self.state();
            state.open.remove(&tag);
            state.settled.insert(tag, Instant::now());
        }
        self.wake.notify_one();
    }

    /// The delivery must not be acked (the broker refused its replacement,
    /// or the replacement's channel failed): the next flush returns it to
    /// its queue, before it sends any ack that could cover its tag.
    pub(crate) fn requeue(&self, tag: u64) {
        {
            let mut state = self.state();
            state.open.remove(&tag);
            state.refused.insert(tag);
        }
        self.wake.notify_one();
    }

    /// Acks everything settled, holding nothing back, and stops the
    /// flusher. Called once the running tasks are done.
    pub(crate) async fn close(&self) -> lapin::Result<()> {
        self.closed.cancel();
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(flusher) = flusher {
            let _ = flusher.await;
        }
        self.flush(true).await.map(|_| ())
    }

    async fn flush_loop(self: Arc<Self>, broken: CancellationToken) {
        // When the oldest delivery held behind a running one is due for an
        // ack of its own, even if nothing else settles meanwhile.
        let mut held: Option<Instant> = None;
        loop {
            let due = async {
                tokio::select! {
                    _ = self.wake.notified() => tokio::time::sleep(WINDOW).await,
                    _ = tokio::time::sleep_until(held.unwrap_or_else(Instant::now)), if held.is_some() => {}
                }
            };
            tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = due => {}
            }
            match self.flush(false).await {
                Ok(next) => held = next,
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot ack; reconnecting so the deliveries come back");
                    broken.cancel();
                    return;
                }
            }
        }
    }

    /// Sends one plan; returns when the next held delivery falls due.
    async fn flush(&self, all: bool) -> lapin::Result<Option<Instant>> {
        let _one_at_a_time = self.sending.lock().await;
        let plan = self.state().plan(Instant::now(), all);
        // The nacks first, each awaited: a `multiple` ack below would
        // otherwise cover a refused tag that is still unacked. If one fails
        // nothing is acked; the channel is gone and everything comes back.
        let nacks = plan.requeue.iter().map(|tag| {
            self.channel.basic_nack(
                *tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
        });
        futures_util::future::join_all(nacks)
            .await
            .into_iter()
            .collect::<lapin::Result<Vec<()>>>()?;
        let singles = plan.singles.iter().map(|tag| {
            self.channel
                .basic_ack(*tag, BasicAckOptions { multiple: false })
        });
        let results = futures_util::future::join_all(singles).await;
        if let Some(tag) = plan.multiple {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        results.into_iter().collect::<lapin::Result<Vec<()>>>()?;
        Ok(plan.next)
    }

    /// A poisoned lock holds nothing but tags.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(open: &[u64], settled: &[(u64, Instant)]) -> State {
        State {
            open: open.iter().copied().collect(),
            settled: settled.iter().copied().collect(),
            refused: BTreeSet::new(),
        }
    }

    #[test]
    fn a_settled_prefix_goes_out_as_one_multiple_ack() {
        let now = Instant::now();
        let mut s = state(&[], &[(1, now), (2, now), (3, now)]);
        let plan = s.plan(now, false);
        assert_eq!(plan.multiple, Some(3));
        assert!(plan.singles.is_empty());
        assert_eq!(plan.next, None);
        assert!(s.settled.is_empty());
    }

    #[test]
    fn a_running_delivery_bounds_the_prefix_and_holds_the_rest() {
        let now = Instant::now();
        let mut s = state(&[3], &[(1, now), (2, now), (4, now), (5, now)]);
        let plan = s.plan(now, false);
        assert_eq!(plan.multiple, Some(2));
        assert!(plan.singles.is_empty(), "4 and 5 wait for 3 a while");
        assert_eq!(plan.next, Some(now + HOLD));
        assert_eq!(s.settled.keys().copied().collect::<Vec<_>>(), vec![4, 5]);

        // 3 still runs when their hold is over: they go one by one.
        let plan = s.plan(now + HOLD, false);
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![4, 5]);
        assert_eq!(plan.next, None);
    }

    #[test]
    fn once_the_running_delivery_settles_the_held_ones_join_the_prefix() {
        let now = Instant::now();
        let mut s = state(&[3, 6], &[(4, now), (5, now)]);
        assert_eq!(s.plan(now, false).multiple, None);
        s.open.remove(&3);
        s.settled.insert(3, now);
        let plan = s.plan(now, false);
        assert_eq!(plan.multiple, Some(5));
        assert!(plan.singles.is_empty());
    }

    #[test]
    fn closing_holds_nothing_back() {
        let now = Instant::now();
        let mut s = state(&[2], &[(1, now), (3, now)]);
        let plan = s.plan(now, true);
        assert_eq!(plan.multiple, Some(1));
        assert_eq!(plan.singles, vec![3]);
        assert_eq!(plan.next, None);
    }

    #[test]
    fn a_refused_delivery_is_nacked_in_the_flush_that_acks_past_it() {
        // 1's replacement was refused, 2 succeeded: the prefix reaches 2,
        // so 1 goes out as a nack in the same plan (sent first).
        let now = Instant::now();
        let mut s = state(&[], &[(2, now)]);
        s.refused.insert(1);
        let plan = s.plan(now, false);
        assert_eq!(plan.requeue, vec![1]);
        assert_eq!(plan.multiple, Some(2));
        assert!(s.refused.is_empty());
        // Nacked once only.
        assert!(s.plan(now, false).requeue.is_empty());
    }

    #[test]
    fn a_refused_delivery_no_longer_holds_back_the_prefix() {
        let now = Instant::now();
        let mut s = state(&[1, 3], &[(2, now)]);
        s.open.remove(&1);
        s.refused.insert(1);
        let plan = s.plan(now, true);
        assert_eq!(plan.requeue, vec![1]);
        assert_eq!(plan.multiple, Some(2));
    }
}
