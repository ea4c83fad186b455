//! The pump: sleeps until the earliest due time of the shards (woken early
//! by a newer, earlier task), claims due tasks into a lease, publishes them
//! to `NS.tasks` with confirms, and deletes each after its confirm.
//!
//! If the process dies:
//! * after the claim, before publishing: the lease expires and the next
//!   claim (by any instance) returns the tasks to the due index;
//! * after publishing, before the delete: the same, so the task is
//!   published again: a duplicate, never a loss.
//!
//! Claims overlap with publishing and confirms: batches holding up to
//! [`MAX_INFLIGHT`] full claims' worth of tasks are published, wait for
//! their due time or their confirms, while the next batch is claimed.
//!
//! A claim also takes the tasks due within [`CLAIM_AHEAD_MS`], which a
//! local timer publishes at their due time, and the pump claims again only
//! when the next task is [`CLAIM_LEAD_MS`] away. Under a steady stream of
//! due tasks (thousands of schedule ticks a second, each at its own
//! millisecond) one claim thus takes about 40 ms of the stream: claiming
//! as soon as the next task entered the window ran a claim (a script per
//! shard) every millisecond or two. The lead also absorbs a claim held up
//! behind other scripts in a busy Redis (W5 at 10,000 ticks a second saw
//! claims take 30 ms at p90 and 50 ms at p99): the task is still on time.
//!
//! Misbehaving broker:
//! * A publish the broker nacks (`NS.q.QUEUE` at a max-length with
//!   `reject-publish`) goes back to the due index no sooner than a pause
//!   that grows per task queue while its refusals go on ([`Refusals`]), so
//!   a full queue is not claimed and published again in a tight loop, and
//!   the other queues keep flowing.
//! * While RabbitMQ blocks publishing (a memory or disk alarm) the pump
//!   claims nothing: a claim would only add publishes to lapin's buffer,
//!   which writes nothing until the alarm clears, and re-claim the same
//!   tasks as their leases expire. Confirm waits end at half the lease
//!   ([`Pump::confirm_timeout`]), and [`STOP_CONFIRM_WAIT`] after a stop,
//!   so a stopping scheduler exits while the broker blocks. A task whose
//!   confirm did not come in time is released: if lapin still delivers
//!   it once the alarm clears, it is published twice (a duplicate, never
//!   a loss).

use crate::delay::publisher::Publisher;
use crate::delay::store::{Claimed, QueueError, RedisDelayQueue};
use crate::timing::redis_clock::{ClockMap, RedisClock};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kairos_shared::amqp::now_ms;
use kairos_shared::amqp::{sleep_or_cancel, Backoff};
use kairos_shared::contract::Task;
use kairos_shared::contract::H_RUN_AT;
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::record;
use kairos_shared::topology::DeclareError;
use lapin::types::AMQPValue;
use lapin::{Confirmation, PublisherConfirm};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MAX_INFLIGHT: usize = 4;

/// How often a stopping pump tries a complete or release that Redis does
/// not answer before leaving the tasks to their lease.
const STOPPING_TRIES: u32 = 3;

/// How far ahead of their due time tasks are claimed. Short next to the
/// lease, so a task claimed early is never at risk of its lease expiring.
const CLAIM_AHEAD_MS: i64 = 100;

/// How long before the next task's due time the pump claims it (and what
/// else falls within [`CLAIM_AHEAD_MS`]).
const CLAIM_LEAD_MS: i64 = 60;

/// How long confirms are still awaited once the pump was told to stop.
/// Unblocked, they take milliseconds; blocked, none may come before the
/// alarm clears, and the process must exit within its stop grace.
const STOP_CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// Per task queue, how long to hold back tasks whose publish the broker
/// refused; the pause grows while the refusals go on and ends with the
/// first publish to that queue the broker accepts.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<HashMap<String, Backoff>>>);

impl Refusals {
    fn refused(&self, queue: &str) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(queue.to_string()).or_default().next_delay()
    }

    fn accepted(&self, queue: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !map.is_empty() {
            map.remove(queue);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("delay queue: {0}")]
    Queue(#[from] QueueError),
}

#[derive(Clone)]
pub struct Pump {
    pub queue: RedisDelayQueue,
    pub events: EventSink,
    pub wake: Arc<Notify>,
    pub batch: usize,
    /// Record bytes one claim round may take over all shards; in-flight
    /// batches hold at most [`MAX_INFLIGHT`] rounds' worth (plus one record
    /// per shard per round, as a claim always takes its first).
    pub batch_bytes: usize,
    pub lease_ms: u64,
    /// Longest sleep with nothing due: also how often expired leases are
    /// looked for when nothing else wakes the pump.
    pub idle: Duration,
    pub refusals: Refusals,
}

impl Pump {
    /// Runs until `cancel`; then finishes the batches it claimed (publish,
    /// confirm, delete) before returning. An AMQP error ends the run so the
    /// supervisor can reconnect; Redis errors are retried here.
    pub async fn run(
        &self,
        publisher: Arc<Publisher>,
        cancel: CancellationToken,
    ) -> Result<(), PumpError> {
        // Each finished batch returns how many tasks and record bytes it held.
        let mut inflight: JoinSet<Result<Held, PumpError>> = JoinSet::new();
        let mut held = Held::default();
        // Batches waiting for their due time or their confirms may hold this
        // many tasks, or bytes, before the next claim waits for one to finish.
        let max_held = Held {
            tasks: MAX_INFLIGHT * self.batch * self.queue.shard_count(),
            bytes: MAX_INFLIGHT * self.batch_bytes,
        };
        let shard_bytes = (self.batch_bytes / self.queue.shard_count()).max(1);
        let mut clock = RedisClock::new();
        let mut backoff = Backoff::new();
        let blocked = publisher.blocked();
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if blocked.is_blocked() {
                tracing::warn!("RabbitMQ blocks publishing (resource alarm); the pump claims nothing until it unblocks");
                metrics::gauge!("kairos_scheduler_broker_blocked").set(1.0);
                let unblocked = blocked.wait_unblocked(&cancel).await;
                metrics::gauge!("kairos_scheduler_broker_blocked").set(0.0);
                if !unblocked {
                    break Ok(());
                }
                tracing::info!("RabbitMQ unblocked publishing; the pump resumes");
                continue;
            }
            let claim = match self
                .queue
                .claim_bounded(
                    self.batch,
                    shard_bytes,
                    self.lease_ms,
                    CLAIM_AHEAD_MS as u64,
                )
                .await
            {
                Ok(c) => {
                    backoff.reset();
                    c
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "claim failed; retrying");
                    if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                        break Ok(());
                    }
                    continue;
                }
            };
            // Due times become local deadlines without trusting this host's
            // wall clock.
            let map = clock.observe(claim.now_us, Instant::now());
            if !claim.tasks.is_empty() {
                held.add(Held::of(&claim.tasks));
                let (due, ahead): (Vec<Claimed>, Vec<Claimed>) =
                    claim.tasks.into_iter().partition(|c| c.due <= claim.now);
                if !ahead.is_empty() {
                    let (this, publisher) = (self.clone(), publisher.clone());
                    let stop = cancel.clone();
                    let size = Held::of(&ahead);
                    crate::timing::publish_thread::spawn_into(&mut inflight, async move {
                        this.publish_at_due(publisher, ahead, map, stop)
                            .await
                            .map(|_| size)
                    });
                }
                if !due.is_empty() {
                    // Published while the next claim runs: a backlog that
                    // fell due at once (a burst of retries, the end of an
                    // outage) flows at the slower of Redis and the broker,
                    // not at their sum.
                    let (this, publisher) = (self.clone(), publisher.clone());
                    let stop = cancel.clone();
                    let size = Held::of(&due);
                    inflight.spawn(async move {
                        let (sent, failure) = this.send(&publisher, due).await;
                        let settled = this.settle(&publisher, vec![sent], &stop).await;
                        match failure {
                            // What did go out is settled; the supervisor
                            // reconnects.
                            Some(err) => Err(err.into()),
                            None => settled.map(|_| size),
                        }
                    });
                }
                let mut failure = reap(&mut inflight, &mut held);
                while failure.is_none() && held.reaches(&max_held) {
                    match inflight.join_next().await {
                        Some(Ok(Ok(done))) => held.remove(done),
                        Some(Ok(Err(err))) => failure = Some(err),
                        // A panicked batch (its lease returns its tasks)
                        // leaves its count behind until the set is empty.
                        Some(Err(_)) => {}
                        None => held = Held::default(),
                    }
                }
                if let Some(err) = failure {
                    break Err(err);
                }
            }
            if claim.more {
                continue;
            }
            // Wake when the next task is CLAIM_LEAD_MS away.
            let wait = sleep_for(claim.now + CLAIM_LEAD_MS, claim.next_due, self.idle);
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(map.instant_of(claim.now) + wait) => {}
            }
        };
        // Finish what was claimed: confirms and deletes.
        while let Some(done) = inflight.join_next().await {
            if let Ok(Err(err)) = done {
                tracing::warn!(cause = %err, "a batch did not complete; its lease will return it");
            }
        }
        result
    }

    /// Publishes tasks claimed ahead of their due time, each at its due
    /// time (mapped onto this host's clock by `clock`, to the microsecond,
    /// and waited for on the precise timer), then settles them all at once.
    async fn publish_at_due(
        self,
        publisher: Arc<Publisher>,
        mut tasks: Vec<Claimed>,
        clock: ClockMap,
        stop: CancellationToken,
    ) -> Result<(), PumpError> {
        tasks.sort_by_key(|c| c.due);
        let mut batches = Vec::new();
        while let Some(first) = tasks.first() {
            let due = first.due;
            let group: Vec<Claimed> = tasks
                .drain(..tasks.partition_point(|c| c.due <= due))
                .collect();
            crate::timing::precise_timer::sleep_until(clock.instant_of(due)).await;
            let (sent, failure) = self.send(&publisher, group).await;
            batches.push(sent);
            if let Some(err) = failure {
                // The rest goes back to the due index now rather than when
                // its lease expires.
                let rest: Vec<&Claimed> = tasks.iter().collect();
                self.until_answered("release", &stop, |_| self.queue.release(&rest))
                    .await;
                let _ = self.settle(&publisher, batches, &stop).await;
                return Err(err.into());
            }
        }
        self.settle(&publisher, batches, &stop).await
    }

    /// How long a batch's confirms are awaited: well within the lease, so
    /// its tasks are settled here before another claim could take them.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.lease_ms / 2)
    }

    /// Hands a claimed batch to the broker. A publish that fails leaves its
    /// task unsettled (released by [`settle`](Self::settle)) and is
    /// returned, so the caller can reconnect. A task that can never be
    /// published (its record does not decode, its queue cannot be named)
    /// goes to `NS.dead` with the reason instead; the rest of the batch is
    /// published as usual.
    async fn send(
        &self,
        publisher: &Publisher,
        claimed: Vec<Claimed>,
    ) -> (Sent, Option<lapin::Error>) {
        // settled[i]: task i may be deleted (confirmed).
        let settled = vec![false; claimed.len()];
        let mut decoded = Vec::with_capacity(claimed.len());
        let mut unusable = Vec::new();
        for (i, c) in claimed.iter().enumerate() {
            match record::decode(c.id(), &c.record) {
                Ok(mut task) => {
                    // `x-run-at` tells the worker (and its `started` event)
                    // when this attempt fell due: for `x-delay-ms` tasks and
                    // retries that is the time computed here, not anything
                    // the client sent.
                    task.set_header(H_RUN_AT, AMQPValue::LongLongInt(c.due));
                    task.run_at = Some(c.due);
                    decoded.push((i, task));
                }
                Err(err) => {
                    // It can never be published: dead-letter it rather
                    // than retry it forever.
                    let (props, body) = record::salvage(c.id(), &c.record, &err.to_string(), c.due);
                    unusable.push((i, err.to_string(), props, body));
                }
            }
        }
        let tasks: Vec<&Task> = decoded.iter().map(|(_, t)| t).collect();
        let deadline = Instant::now() + self.confirm_timeout();
        // A publish resolves once lapin wrote it, which it does not while
        // the broker blocks the connection: bounded like the confirms. One
        // that timed out stays unsettled and is released.
        let results =
            match tokio::time::timeout_at(deadline, publisher.publish_ready_many(&tasks)).await {
                Ok(results) => results,
                Err(_) => {
                    tracing::warn!(
                        count = tasks.len(),
                        "publishes not written in time (is the broker blocking?); releasing them"
                    );
                    Vec::new()
                }
            };

        let mut sent = Vec::with_capacity(decoded.len());
        let mut failure = None;
        for ((i, task), result) in decoded.into_iter().zip(results) {
            match result {
                Ok(confirm) => sent.push((i, task, confirm)),
                Err(DeclareError::BadName(err)) => {
                    let props = task.dead_letter_properties(&err.to_string(), now_ms());
                    unusable.push((i, err.to_string(), props, task.body));
                }
                // Not sent: left unsettled, so it is released.
                Err(DeclareError::Amqp(err)) => failure = Some(err),
            }
        }
        let mut dead = Vec::with_capacity(unusable.len());
        for (i, error, props, body) in unusable {
            let origin = claimed[i].member.clone();
            tracing::error!(member = %origin, %error, "a delay-queue task cannot be published; dead-lettering it");
            match publisher.publish_dead("", props, &body).await {
                Ok(confirm) => dead.push((i, confirm)),
                Err(err) => failure = Some(err),
            }
        }
        (
            Sent {
                claimed,
                settled,
                sent,
                dead,
                refused: Vec::new(),
                deadline,
            },
            failure,
        )
    }

    /// Awaits the confirms of sent batches, then deletes the confirmed
    /// tasks and releases the rest: one delete and one release for all.
    async fn settle(
        &self,
        publisher: &Publisher,
        mut batches: Vec<Sent>,
        stop: &CancellationToken,
    ) -> Result<(), PumpError> {
        let mut published = Vec::new();
        let mut unconfirmed = 0;
        for b in &mut batches {
            let (tasks, confirms): (Vec<_>, Vec<_>) = std::mem::take(&mut b.sent)
                .into_iter()
                .map(|(i, task, confirm)| ((i, task), confirm))
                .unzip();
            let outcomes = confirmations(confirms, b.deadline, stop).await;
            for ((i, task), outcome) in tasks.into_iter().zip(outcomes) {
                match outcome {
                    Some(Ok(Confirmation::Ack(None))) | Some(Ok(Confirmation::NotRequested)) => {
                        b.settled[i] = true;
                        self.refusals.accepted(&task.queue);
                        published.push((task, b.claimed[i].due));
                    }
                    Some(Ok(Confirmation::Ack(Some(_)))) => {
                        tracing::warn!(queue = %task.queue, "task queue vanished; declaring it again");
                        publisher.forget_queue(&task.queue);
                    }
                    Some(Ok(Confirmation::Nack(_))) => b.refused.push((i, task.queue)),
                    Some(Err(_)) => {}
                    None => unconfirmed += 1,
                }
            }
            // Dead letters: deleted once `NS.dead` has them.
            let (dead, confirms): (Vec<usize>, Vec<_>) =
                std::mem::take(&mut b.dead).into_iter().unzip();
            let outcomes = confirmations(confirms, b.deadline, stop).await;
            for (i, outcome) in dead.into_iter().zip(outcomes) {
                match outcome {
                    Some(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => {
                        b.settled[i] = true;
                        metrics::counter!("kairos_scheduler_dead_total", "source" => "pump")
                            .increment(1);
                    }
                    None => unconfirmed += 1,
                    Some(_) => {}
                }
            }
        }
        if unconfirmed > 0 {
            tracing::warn!(
                count = unconfirmed,
                "confirms not received in time (is the broker blocking?); releasing those tasks"
            );
        }
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        let mut refused: HashMap<&str, Vec<&Claimed>> = HashMap::new();
        for b in &batches {
            for (i, queue) in &b.refused {
                refused.entry(queue).or_default().push(&b.claimed[*i]);
            }
            for (i, (c, ok)) in b.claimed.iter().zip(&b.settled).enumerate() {
                if *ok {
                    done.push(c);
                } else if !b.refused.iter().any(|(r, _)| *r == i) {
                    failed.push(c);
                }
            }
        }
        // Redis errors end neither the batch nor the session: a timed-out
        // delete may have run, and is repeated in its idempotent form.
        let done_ref = &done;
        self.until_answered("complete", stop, |again| async move {
            if again {
                self.queue.complete_again(done_ref).await
            } else {
                self.queue.complete(done_ref).await
            }
        })
        .await;
        self.until_answered("release", stop, |_| self.queue.release(&failed))
            .await;
        for (queue, tasks) in refused {
            let pause = self.refusals.refused(queue);
            tracing::warn!(%queue, count = tasks.len(), retry_in_ms = pause.as_millis() as u64, "the broker refused publishes (nack); holding those tasks back");
            metrics::counter!("kairos_scheduler_publish_refused_total", "queue" => queue.to_string())
                .increment(tasks.len() as u64);
            let (tasks, pause_ms) = (&tasks, pause.as_millis() as u64);
            self.until_answered("release", stop, |_| {
                self.queue.release_after(tasks, pause_ms)
            })
            .await;
        }
        let now = kairos_shared::amqp::now_ms();
        metrics::counter!("kairos_scheduler_published_total").increment(published.len() as u64);
        for (task, due) in &published {
            metrics::histogram!("kairos_scheduler_publish_lateness_seconds")
                .record(kairos_shared::metrics::seconds_between(*due, now));
            self.events
                .task(EventKind::Published, task, Some(*due), None);
        }
        Ok(())
    }

    /// Runs `call` until Redis answers it, backing off, for as long as the
    /// tasks' lease lasts (after that their lease has returned them, and
    /// giving up changes nothing: they are published again, a duplicate).
    /// `call` gets `true` when it repeats a call whose outcome is unknown.
    /// Ending the session instead tore down the AMQP connection on every
    /// Redis stall, and left the tasks to wait out their lease. A stopping
    /// scheduler tries [`STOPPING_TRIES`] times, not for a whole lease.
    async fn until_answered<F, Fut>(&self, what: &str, stop: &CancellationToken, mut call: F)
    where
        F: FnMut(bool) -> Fut,
        Fut: std::future::Future<Output = Result<(), QueueError>>,
    {
        let deadline = Instant::now() + Duration::from_millis(self.lease_ms);
        let mut backoff = Backoff::new();
        let mut again = false;
        let mut tries = 0;
        loop {
            tries += 1;
            match call(again).await {
                Ok(()) => return,
                Err(err)
                    if Instant::now() >= deadline
                        || (stop.is_cancelled() && tries >= STOPPING_TRIES) =>
                {
                    tracing::error!(cause = %err, what, "Redis did not answer (within the lease, or while stopping); the tasks return when their lease expires (published again)");
                    return;
                }
                Err(err) => {
                    metrics::counter!("kairos_scheduler_redis_retries_total", "call" => what.to_string())
                        .increment(1);
                    tracing::warn!(cause = %err, what, "Redis call failed; repeating it");
                    again = true;
                    tokio::time::sleep(backoff.next_delay().min(deadline - Instant::now())).await;
                }
            }
        }
    }
}

/// A batch handed to the broker, waiting to be settled.
struct Sent {
    claimed: Vec<Claimed>,
    /// Per claimed task: it may be deleted (confirmed, or unreadable).
    settled: Vec<bool>,
    /// (index in `claimed`, task, its confirm).
    sent: Vec<(usize, Task, PublisherConfirm)>,
    /// (index in `claimed`, the confirm of its dead letter).
    dead: Vec<(usize, PublisherConfirm)>,
    /// (index in `claimed`, its queue): the broker nacked the publish.
    refused: Vec<(usize, String)>,
    /// Confirms not in by then are given up on.
    deadline: Instant,
}

/// Awaits `confirms` until `deadline`, or [`STOP_CONFIRM_WAIT`] after
/// `stop` fires if that is sooner. One result per confirm, in order; `None`
/// for one that did not come in time.
async fn confirmations(
    confirms: Vec<PublisherConfirm>,
    deadline: Instant,
    stop: &CancellationToken,
) -> Vec<Option<lapin::Result<Confirmation>>> {
    let mut out: Vec<Option<lapin::Result<Confirmation>>> = confirms.iter().map(|_| None).collect();
    let mut pending: FuturesUnordered<_> = confirms
        .into_iter()
        .enumerate()
        .map(|(i, c)| async move { (i, c.await) })
        .collect();
    let give_up = async {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = async {
                stop.cancelled().await;
                tokio::time::sleep(STOP_CONFIRM_WAIT).await;
            } => {}
        }
    };
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            next = pending.next() => match next {
                Some((i, outcome)) => out[i] = Some(outcome),
                None => break,
            },
            _ = &mut give_up => break,
        }
    }
    out
}

/// How long to sleep after a claim that ran at `now` (Redis clock) and saw
/// `next_due` as the earliest waiting task: until it falls due, but never
/// longer than `idle`, so expired leases are noticed even when nothing wakes
/// the pump.
fn sleep_for(now: i64, next_due: Option<i64>, idle: Duration) -> Duration {
    match next_due {
        Some(due) => Duration::from_millis(due.saturating_sub(now).max(0) as u64).min(idle),
        None => idle,
    }
}

/// Tasks and record bytes held by in-flight batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    tasks: usize,
    bytes: usize,
}

impl Held {
    fn of(claimed: &[Claimed]) -> Self {
        Held {
            tasks: claimed.len(),
            bytes: claimed.iter().map(|c| c.record.len()).sum(),
        }
    }

    fn add(&mut self, other: Held) {
        self.tasks += other.tasks;
        self.bytes += other.bytes;
    }

    fn remove(&mut self, other: Held) {
        self.tasks = self.tasks.saturating_sub(other.tasks);
        self.bytes = self.bytes.saturating_sub(other.bytes);
    }

    /// Either bound reached: the next claim waits.
    fn reaches(&self, max: &Held) -> bool {
        self.tasks >= max.tasks || self.bytes >= max.bytes
    }
}

/// Collects finished batches without waiting, counting off what they held;
/// returns the first error.
fn reap(inflight: &mut JoinSet<Result<Held, PumpError>>, held: &mut Held) -> Option<PumpError> {
    while let Some(done) = inflight.try_join_next() {
        match done {
            Ok(Ok(done)) => held.remove(done),
            Ok(Err(err)) => return Some(err),
            Err(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_next_due_time_within_the_idle_bound() {
        let idle = Duration::from_millis(1000);
        assert_eq!(
            sleep_for(10_000, Some(10_250), idle),
            Duration::from_millis(250)
        );
        assert_eq!(sleep_for(10_000, Some(99_999), idle), idle);
        assert_eq!(sleep_for(10_000, None, idle), idle);
        // Already due (claimed by another instance meanwhile, or a full
        // batch): look again at once.
        assert_eq!(sleep_for(10_000, Some(9_000), idle), Duration::ZERO);
    }
}
