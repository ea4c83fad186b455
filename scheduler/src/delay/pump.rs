//! The pump: sleeps until the earliest due time of the shards it serves
//! (its share, see [`crate::shards`]; woken early by a newer, earlier task
//! or a shard gained), claims due tasks into a lease, publishes them
//! to `NS.tasks` with confirms, and deletes each after its confirm.
//!
//! If the process dies:
//! * after the claim, before publishing: the lease expires and the next
//!   claim in that shard (by its owner, which takes the dead instance's
//!   shards over) returns the tasks to the due index;
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
//! due tasks (every schedule tick at its own millisecond) one claim thus
//! takes a whole window of the stream rather than one task at a time, and
//! a claim held up behind other scripts in a busy Redis still leaves the
//! task on time. docs/ARCHITECTURE.md gives the measurements behind both
//! windows.
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
//!
//! The pump is generic over its [`DelayStore`] and its [`TaskPublisher`]
//! (static dispatch), so its decisions are unit-tested on fakes.

use crate::delay::ports::{DelayStore, TaskPublisher};
use crate::delay::store::{Claim, Claimed, QueueError, RedisDelayQueue};
use crate::timing::redis_clock::{ClockMap, RedisClock};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kairos_shared::amqp::{now_ms, sleep_or_cancel, Backoff, Blocked};
use kairos_shared::contract::{Task, H_RUN_AT};
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::record;
use kairos_shared::status::{StatusUpdate, StatusWriter};
use kairos_shared::topology::DeclareError;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Confirmation};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Full claim rounds in-flight batches may hold before the next claim
/// waits for one of them to finish.
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

/// Confirms are awaited for the lease divided by this: well within the
/// lease, so a batch is settled before another claim could take its tasks.
const CONFIRM_LEASE_DIVISOR: u64 = 2;

/// How long confirms are still awaited once the pump was told to stop.
/// Unblocked, they take milliseconds; blocked, none may come before the
/// alarm clears, and the process must exit within its stop grace.
const STOP_CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// Per task queue, how long to hold back tasks whose publish the broker
/// refused; the pause grows while the refusals go on and ends with the
/// first publish to that queue the broker accepts.
#[derive(Clone, Default)]
pub(crate) struct Refusals(Arc<Mutex<HashMap<String, Backoff>>>);

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

/// Why a pump's run ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PumpError {
    /// The broker connection or channel failed: the supervisor reconnects.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The delay store failed in a way the pump does not retry.
    #[error("delay queue: {0}")]
    Queue(#[from] QueueError),
}

/// Promotes due tasks from the delay store to the broker.
#[derive(Clone)]
pub(crate) struct Pump<S = RedisDelayQueue> {
    /// Where the tasks wait.
    pub(crate) queue: S,
    /// Where `published` events go.
    pub(crate) events: EventSink,
    /// Where `ready` statuses go.
    pub(crate) status: StatusWriter,
    /// Notified when an earlier task arrived: the pump claims again.
    pub(crate) wake: Arc<Notify>,
    /// Tasks one claim takes per shard.
    pub(crate) batch: usize,
    /// Record bytes one claim round may take over all shards; in-flight
    /// batches hold at most [`MAX_INFLIGHT`] rounds' worth (plus one record
    /// per shard per round, as a claim always takes its first).
    pub(crate) batch_bytes: usize,
    /// How long a claim leases its tasks.
    pub(crate) lease_ms: u64,
    /// Longest sleep with nothing due: also how often expired leases are
    /// looked for when nothing else wakes the pump.
    pub(crate) idle: Duration,
    /// Per-queue pauses after the broker refused publishes.
    pub(crate) refusals: Refusals,
}

/// What one claim attempt gave.
enum ClaimStep {
    Claimed(Claim),
    /// The claim failed and the backoff passed: claim again.
    Again,
    /// Cancelled.
    Stop,
}

impl<S: DelayStore> Pump<S> {
    /// Runs until `cancel`; then finishes the batches it claimed (publish,
    /// confirm, delete) before returning. An AMQP error ends the run so the
    /// supervisor can reconnect; Redis errors are retried here.
    pub(crate) async fn run<P: TaskPublisher>(
        &self,
        publisher: Arc<P>,
        cancel: CancellationToken,
    ) -> Result<(), PumpError> {
        let mut inflight = Inflight::new(self.max_held());
        let shard_bytes = (self.batch_bytes / self.queue.shard_count()).max(1);
        let mut clock = RedisClock::new();
        let mut backoff = Backoff::new();
        let blocked = publisher.blocked();
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if blocked.is_blocked() {
                if !wait_unblocked(&blocked, &cancel).await {
                    break Ok(());
                }
                continue;
            }
            let claim = match self.claim(shard_bytes, &mut backoff, &cancel).await {
                ClaimStep::Claimed(claim) => claim,
                ClaimStep::Again => continue,
                ClaimStep::Stop => break Ok(()),
            };
            // Due times become local deadlines without trusting this host's
            // wall clock.
            let map = clock.observe(claim.now_us, Instant::now());
            if !claim.tasks.is_empty() {
                self.dispatch(
                    claim.tasks,
                    claim.now,
                    map,
                    &publisher,
                    &cancel,
                    &mut inflight,
                );
                if let Err(err) = inflight.make_room().await {
                    break Err(err);
                }
            }
            if claim.more {
                continue;
            }
            if !self
                .sleep_until_next(claim.now, claim.next_due, map, &cancel)
                .await
            {
                break Ok(());
            }
        };
        // Finish what was claimed: confirms and deletes.
        inflight.finish().await;
        result
    }

    /// Batches waiting for their due time or their confirms may hold this
    /// many tasks, or bytes, before the next claim waits for one to finish.
    fn max_held(&self) -> Held {
        Held {
            tasks: MAX_INFLIGHT * self.batch * self.queue.shard_count(),
            bytes: MAX_INFLIGHT * self.batch_bytes,
        }
    }

    /// One claim round; a failure backs off before the next.
    async fn claim(
        &self,
        shard_bytes: usize,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> ClaimStep {
        let claimed = self
            .queue
            .claim_bounded(
                self.batch,
                shard_bytes,
                self.lease_ms,
                CLAIM_AHEAD_MS as u64,
            )
            .await;
        match claimed {
            Ok(claim) => {
                backoff.reset();
                ClaimStep::Claimed(claim)
            }
            Err(err) => {
                tracing::warn!(cause = %err, "claim failed; retrying");
                if sleep_or_cancel(backoff.next_delay(), cancel).await {
                    ClaimStep::Again
                } else {
                    ClaimStep::Stop
                }
            }
        }
    }

    /// Hands claimed tasks to batches of their own: those due now are
    /// published at once, those claimed ahead at their due time.
    fn dispatch<P: TaskPublisher>(
        &self,
        tasks: Vec<Claimed>,
        now: i64,
        map: ClockMap,
        publisher: &Arc<P>,
        cancel: &CancellationToken,
        inflight: &mut Inflight,
    ) {
        inflight.held.add(Held::of(&tasks));
        let (due, ahead): (Vec<Claimed>, Vec<Claimed>) =
            tasks.into_iter().partition(|c| c.due <= now);
        if !ahead.is_empty() {
            let (this, publisher, stop) = (self.clone(), publisher.clone(), cancel.clone());
            let size = Held::of(&ahead);
            crate::timing::publish_thread::spawn_into(&mut inflight.set, async move {
                this.publish_at_due(&*publisher, ahead, map, stop)
                    .await
                    .map(|()| size)
            });
        }
        if !due.is_empty() {
            // Published while the next claim runs: a backlog that fell due
            // at once (a burst of retries, the end of an outage) flows at
            // the slower of Redis and the broker, not at their sum.
            let (this, publisher, stop) = (self.clone(), publisher.clone(), cancel.clone());
            let size = Held::of(&due);
            inflight.set.spawn(async move {
                let (sent, failure) = this.send(&*publisher, due).await;
                // What did go out is settled; on a failure the supervisor
                // reconnects.
                this.settle(&*publisher, vec![sent], &stop).await;
                match failure {
                    Some(err) => Err(err.into()),
                    None => Ok(size),
                }
            });
        }
    }

    /// Sleeps until the next task is [`CLAIM_LEAD_MS`] away (at most
    /// `idle`), or a wake-up; false when cancelled.
    async fn sleep_until_next(
        &self,
        now: i64,
        next_due: Option<i64>,
        map: ClockMap,
        cancel: &CancellationToken,
    ) -> bool {
        let wait = sleep_for(now + CLAIM_LEAD_MS, next_due, self.idle);
        if wait.is_zero() {
            return true;
        }
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = self.wake.notified() => true,
            _ = tokio::time::sleep_until(map.instant_of(now) + wait) => true,
        }
    }

    /// Publishes tasks claimed ahead of their due time, each at its due
    /// time (mapped onto this host's clock by `clock`, to the microsecond,
    /// and waited for on the precise timer), then settles them all at once.
    async fn publish_at_due<P: TaskPublisher>(
        self,
        publisher: &P,
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
            let (sent, failure) = self.send(publisher, group).await;
            batches.push(sent);
            if let Some(err) = failure {
                // The rest goes back to the due index now rather than when
                // its lease expires.
                let rest: Vec<&Claimed> = tasks.iter().collect();
                self.until_answered("release", &stop, |_| self.queue.release(&rest))
                    .await;
                self.settle(publisher, batches, &stop).await;
                return Err(err.into());
            }
        }
        self.settle(publisher, batches, &stop).await;
        Ok(())
    }

    /// How long a batch's confirms are awaited: well within the lease, so
    /// its tasks are settled here before another claim could take them.
    fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.lease_ms / CONFIRM_LEASE_DIVISOR)
    }

    /// Hands a claimed batch to the broker. A publish that fails leaves its
    /// task unsettled (released by [`settle`](Self::settle)) and is
    /// returned, so the caller can reconnect. A task that can never be
    /// published (its record does not decode, its queue cannot be named)
    /// goes to `NS.dead` with the reason instead; the rest of the batch is
    /// published as usual.
    async fn send<P: TaskPublisher>(
        &self,
        publisher: &P,
        claimed: Vec<Claimed>,
    ) -> (Sent<P::Confirm>, Option<lapin::Error>) {
        let (decoded, mut unusable) = decode_batch(&claimed);
        let deadline = Instant::now() + self.confirm_timeout();
        let (sent, mut failure) =
            publish_decoded(publisher, decoded, deadline, &mut unusable).await;
        let mut dead = Vec::with_capacity(unusable.len());
        for u in unusable {
            let origin = &claimed[u.index].member;
            tracing::error!(member = %origin, error = %u.error, "a delay-queue task cannot be published; dead-lettering it");
            match publisher.publish_dead("", u.props, &u.body).await {
                Ok(confirm) => dead.push((u.index, confirm)),
                Err(err) => failure = Some(err),
            }
        }
        let sent = Sent {
            settled: vec![false; claimed.len()],
            claimed,
            sent,
            dead,
            refused: Vec::new(),
            deadline,
        };
        (sent, failure)
    }

    /// Awaits the confirms of sent batches, then deletes the confirmed
    /// tasks and releases the rest: one delete and one release for all.
    async fn settle<P: TaskPublisher>(
        &self,
        publisher: &P,
        mut batches: Vec<Sent<P::Confirm>>,
        stop: &CancellationToken,
    ) {
        let mut published = Vec::new();
        let mut unconfirmed = 0;
        for b in &mut batches {
            unconfirmed += self
                .await_published(publisher, b, &mut published, stop)
                .await;
            unconfirmed += await_dead_letters(b, stop).await;
        }
        if unconfirmed > 0 {
            tracing::warn!(
                count = unconfirmed,
                "confirms not received in time (is the broker blocking?); releasing those tasks"
            );
        }
        self.write_back(&batches, stop).await;
        self.report_published(&published);
    }

    /// Awaits the confirms of a batch's task publishes: an ack settles the
    /// task, a nack marks it refused, anything else leaves it to be
    /// released. Returns how many confirms did not come in time.
    async fn await_published<C>(
        &self,
        publisher: &impl TaskPublisher,
        b: &mut Sent<C>,
        published: &mut Vec<(Task, i64)>,
        stop: &CancellationToken,
    ) -> usize
    where
        C: Future<Output = lapin::Result<Confirmation>>,
    {
        let (tasks, confirms): (Vec<_>, Vec<_>) = std::mem::take(&mut b.sent)
            .into_iter()
            .map(|(i, task, confirm)| ((i, task), confirm))
            .unzip();
        let outcomes = confirmations(confirms, b.deadline, stop).await;
        let mut unconfirmed = 0;
        for ((i, task), outcome) in tasks.into_iter().zip(outcomes) {
            match outcome {
                Some(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => {
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
        unconfirmed
    }

    /// Deletes what was settled, releases what failed at once, and what
    /// the broker refused after its queue's pause. Redis errors end neither
    /// the batch nor the session: a timed-out delete may have run, and is
    /// repeated in its idempotent form.
    async fn write_back<C>(&self, batches: &[Sent<C>], stop: &CancellationToken) {
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        let mut refused: HashMap<&str, Vec<&Claimed>> = HashMap::new();
        for b in batches {
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
            let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
            tracing::warn!(%queue, count = tasks.len(), retry_in_ms = pause_ms, "the broker refused publishes (nack); holding those tasks back");
            metrics::counter!("kairos_scheduler_publish_refused_total", "queue" => queue.to_string())
                .increment(tasks.len() as u64);
            let tasks = &tasks;
            self.until_answered("release", stop, |_| {
                self.queue.release_after(tasks, pause_ms)
            })
            .await;
        }
    }

    /// Metrics and `published` events for the tasks the broker confirmed.
    fn report_published(&self, published: &[(Task, i64)]) {
        let now = now_ms();
        metrics::counter!("kairos_scheduler_published_total").increment(published.len() as u64);
        // One registry lookup per batch, not per task.
        let lateness = metrics::histogram!("kairos_scheduler_publish_lateness_seconds");
        for (task, due) in published {
            kairos_shared::trace::step("kairos.publish", task);
            lateness.record(kairos_shared::metrics::seconds_between(*due, now));
            self.events
                .task(EventKind::Published, task, Some(*due), None);
            self.status.record_with(|| StatusUpdate::ready(task, *due));
        }
    }

    /// Runs `call` until Redis answers it, backing off, for as long as the
    /// tasks' lease lasts (after that their lease has returned them, and
    /// giving up changes nothing: they are published again, a duplicate).
    /// `call` gets `true` when it repeats a call whose outcome is unknown.
    /// The session stays up meanwhile: a Redis stall must neither tear down
    /// the AMQP connection nor leave the tasks to wait out their lease. A
    /// stopping scheduler tries [`STOPPING_TRIES`] times, not for a whole
    /// lease.
    async fn until_answered<F, Fut>(&self, what: &str, stop: &CancellationToken, mut call: F)
    where
        F: FnMut(bool) -> Fut,
        Fut: Future<Output = Result<(), QueueError>>,
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

/// Waits while the broker blocks publishing; false when cancelled first.
async fn wait_unblocked(blocked: &Blocked, cancel: &CancellationToken) -> bool {
    tracing::warn!(
        "RabbitMQ blocks publishing (resource alarm); the pump claims nothing until it unblocks"
    );
    metrics::gauge!("kairos_scheduler_broker_blocked").set(1.0);
    let unblocked = blocked.wait_unblocked(cancel).await;
    metrics::gauge!("kairos_scheduler_broker_blocked").set(0.0);
    if unblocked {
        tracing::info!("RabbitMQ unblocked publishing; the pump resumes");
    }
    unblocked
}

/// A claimed task that can never be published, and its dead letter.
struct Unusable {
    /// Its index in the claimed batch.
    index: usize,
    error: String,
    props: BasicProperties,
    body: Vec<u8>,
}

/// Decodes a claimed batch: (index, task) for each record that decodes,
/// stamped with its due time; a dead letter for each that does not.
fn decode_batch(claimed: &[Claimed]) -> (Vec<(usize, Task)>, Vec<Unusable>) {
    let mut decoded = Vec::with_capacity(claimed.len());
    let mut unusable = Vec::new();
    for (index, c) in claimed.iter().enumerate() {
        match record::decode(c.id(), &c.record) {
            Ok(mut task) => {
                // `x-run-at` tells the worker (and its `started` event)
                // when this attempt fell due: for `x-delay-ms` tasks and
                // retries that is the time computed here, not anything the
                // client sent.
                task.set_header(H_RUN_AT, AMQPValue::LongLongInt(c.due));
                task.run_at = Some(c.due);
                decoded.push((index, task));
            }
            Err(err) => {
                // It can never be published: dead-letter it rather than
                // retry it forever.
                let error = err.to_string();
                let (props, body) = record::salvage(c.id(), &c.record, &error, c.due);
                unusable.push(Unusable {
                    index,
                    error,
                    props,
                    body,
                });
            }
        }
    }
    (decoded, unusable)
}

/// Publishes the decoded tasks together. A publish resolves once lapin
/// wrote it, which it does not while the broker blocks the connection: the
/// wait ends at `deadline` like the confirms, and a publish not written by
/// then stays unsettled and is released. A task whose queue cannot be
/// named joins `unusable`; a broker error is returned.
async fn publish_decoded<P: TaskPublisher>(
    publisher: &P,
    decoded: Vec<(usize, Task)>,
    deadline: Instant,
    unusable: &mut Vec<Unusable>,
) -> (Vec<(usize, Task, P::Confirm)>, Option<lapin::Error>) {
    let tasks: Vec<&Task> = decoded.iter().map(|(_, t)| t).collect();
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
    drop(tasks);
    let mut sent = Vec::with_capacity(decoded.len());
    let mut failure = None;
    for ((index, task), result) in decoded.into_iter().zip(results) {
        match result {
            Ok(confirm) => sent.push((index, task, confirm)),
            Err(DeclareError::BadName(err)) => {
                let error = err.to_string();
                let props = task.dead_letter_properties(&error, now_ms());
                unusable.push(Unusable {
                    index,
                    error,
                    props,
                    body: task.body,
                });
            }
            // Not sent: left unsettled, so it is released.
            Err(DeclareError::Amqp(err)) => failure = Some(err),
            Err(DeclareError::Inequivalent(m)) => failure = Some(m.source),
        }
    }
    (sent, failure)
}

/// Awaits the confirms of a batch's dead letters: a task is deleted once
/// `NS.dead` has it. Returns how many confirms did not come in time.
async fn await_dead_letters<C>(b: &mut Sent<C>, stop: &CancellationToken) -> usize
where
    C: Future<Output = lapin::Result<Confirmation>>,
{
    let (dead, confirms): (Vec<usize>, Vec<_>) = std::mem::take(&mut b.dead).into_iter().unzip();
    let outcomes = confirmations(confirms, b.deadline, stop).await;
    let mut unconfirmed = 0;
    for (i, outcome) in dead.into_iter().zip(outcomes) {
        match outcome {
            Some(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => {
                b.settled[i] = true;
                metrics::counter!("kairos_scheduler_dead_total", "source" => "pump").increment(1);
            }
            None => unconfirmed += 1,
            Some(_) => {}
        }
    }
    unconfirmed
}

/// A batch handed to the broker, waiting to be settled; `C` is the
/// publisher's confirm.
struct Sent<C> {
    claimed: Vec<Claimed>,
    /// Per claimed task: it may be deleted (confirmed, or dead-lettered).
    settled: Vec<bool>,
    /// (index in `claimed`, task, its confirm).
    sent: Vec<(usize, Task, C)>,
    /// (index in `claimed`, the confirm of its dead letter).
    dead: Vec<(usize, C)>,
    /// (index in `claimed`, its queue): the broker nacked the publish.
    refused: Vec<(usize, String)>,
    /// Confirms not in by then are given up on.
    deadline: Instant,
}

/// Awaits `confirms` until `deadline`, or [`STOP_CONFIRM_WAIT`] after
/// `stop` fires if that is sooner. One result per confirm, in order; `None`
/// for one that did not come in time.
async fn confirmations<C>(
    confirms: Vec<C>,
    deadline: Instant,
    stop: &CancellationToken,
) -> Vec<Option<lapin::Result<Confirmation>>>
where
    C: Future<Output = lapin::Result<Confirmation>>,
{
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

/// The batches in flight; each returns what it held when it finishes.
struct Inflight {
    set: JoinSet<Result<Held, PumpError>>,
    held: Held,
    max: Held,
}

impl Inflight {
    fn new(max: Held) -> Self {
        Inflight {
            set: JoinSet::new(),
            held: Held::default(),
            max,
        }
    }

    /// Collects finished batches, then waits while the held bound is
    /// reached; returns the first error a batch ended with.
    async fn make_room(&mut self) -> Result<(), PumpError> {
        while let Some(done) = self.set.try_join_next() {
            match done {
                Ok(Ok(done)) => self.held.remove(done),
                Ok(Err(err)) => return Err(err),
                Err(_) => {}
            }
        }
        while self.held.reaches(&self.max) {
            match self.set.join_next().await {
                Some(Ok(Ok(done))) => self.held.remove(done),
                Some(Ok(Err(err))) => return Err(err),
                // A panicked batch (its lease returns its tasks) leaves its
                // count behind until the set is empty.
                Some(Err(_)) => {}
                None => self.held = Held::default(),
            }
        }
        Ok(())
    }

    /// Waits for every batch: their confirms and deletes.
    async fn finish(mut self) {
        while let Some(done) = self.set.join_next().await {
            if let Ok(Err(err)) = done {
                tracing::warn!(cause = %err, "a batch did not complete; its lease will return it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delay::fakes::{new_task, record_of, within, Answer, FakePublisher, QUEUE};
    use crate::delay::memory::{Fault, MemoryDelayStore, Op};
    use crate::delay::store::{member, Entry};
    use tokio::task::JoinHandle;

    /// Long enough that no lease expires during a test unless it says so.
    const LEASE_MS: u64 = 10_000;
    /// A lease whose confirm wait (half of it) a test lets run out.
    const SHORT_LEASE_MS: u64 = 200;
    /// The pump looks again this often when nothing wakes it.
    const IDLE: Duration = Duration::from_millis(20);

    fn pump(store: &MemoryDelayStore, lease_ms: u64) -> Pump<MemoryDelayStore> {
        Pump {
            queue: store.clone(),
            events: EventSink::disabled(),
            status: StatusWriter::disabled(),
            wake: Arc::new(Notify::new()),
            batch: 10,
            batch_bytes: 1 << 20,
            lease_ms,
            idle: IDLE,
            refusals: Refusals::default(),
        }
    }

    async fn hold_due(store: &MemoryDelayStore, id: &str, record: Vec<u8>) -> i64 {
        let due = store.now_ms() - 1;
        let entry = Entry {
            member: member(id, 1),
            run_at: Some(due),
            delay_ms: 0,
            record,
        };
        store.hold(&[entry]).await.expect("hold");
        due
    }

    struct Running {
        cancel: CancellationToken,
        handle: JoinHandle<Result<(), PumpError>>,
    }

    fn start(pump: &Pump<MemoryDelayStore>, publisher: &Arc<FakePublisher>) -> Running {
        let cancel = CancellationToken::new();
        let (pump, publisher, stop) = (pump.clone(), publisher.clone(), cancel.clone());
        let handle = tokio::spawn(async move { pump.run(publisher, stop).await });
        Running { cancel, handle }
    }

    impl Running {
        async fn stop(self) -> Result<(), PumpError> {
            self.cancel.cancel();
            within("the pump to stop", self.handle)
                .await
                .expect("the pump does not panic")
        }
    }

    /// A one-shard store holding `record` as task `a`, due now.
    async fn one_task(record: Vec<u8>) -> MemoryDelayStore {
        let store = MemoryDelayStore::new(1);
        hold_due(&store, "a", record).await;
        store
    }

    /// Runs a pump over `store` until the store is empty, then stops it.
    async fn drain(store: &MemoryDelayStore, publisher: &Arc<FakePublisher>, lease_ms: u64) {
        let running = start(&pump(store, lease_ms), publisher);
        within("the store to empty", store.wait_for(|s| s.is_empty())).await;
        running.stop().await.expect("a clean stop");
    }

    #[tokio::test]
    async fn confirmed_tasks_are_published_then_completed() {
        let store = MemoryDelayStore::new(2);
        let mut dues = Vec::new();
        for id in ["a", "b", "c"] {
            dues.push((id, hold_due(&store, id, record_of(&new_task(id))).await));
        }
        let publisher = FakePublisher::answering(Answer::Ack);
        drain(&store, &publisher, LEASE_MS).await;
        let mut ids = publisher.ready_ids();
        ids.sort();
        assert_eq!(ids, ["a", "b", "c"]);
        for seen in publisher.seen() {
            let crate::delay::fakes::Seen::Ready(task) = seen else {
                panic!("no dead letters expected");
            };
            let due = dues.iter().find(|(id, _)| *id == task.id).map(|(_, d)| *d);
            assert_eq!(task.run_at, due, "published with its due time");
            assert_eq!(
                task.header(H_RUN_AT),
                due.map(AMQPValue::LongLongInt).as_ref()
            );
            assert_eq!(task.queue, QUEUE);
        }
    }

    #[tokio::test]
    async fn a_nacked_publish_is_released_not_completed() {
        let store = one_task(record_of(&new_task("a"))).await;
        let publisher = FakePublisher::answering(Answer::Ack).then(&[Answer::Nack]);
        let running = start(&pump(&store, LEASE_MS), &publisher);
        // Back in the due index, held back by the refusal pause.
        let now = store.now_ms();
        within("the publish", publisher.wait_publishes(1)).await;
        within(
            "the refused task to be released",
            store.wait_for(|s| s.due_of("a").is_some()),
        )
        .await;
        assert!(store.due_of("a").is_some_and(|due| due > now), "paused");
        assert_eq!(publisher.ready_ids(), ["a"]);
        within("the store to empty", store.wait_for(|s| s.is_empty())).await;
        running.stop().await.expect("a clean stop");
        assert_eq!(
            publisher.ready_ids(),
            ["a", "a"],
            "published again after the pause"
        );
    }

    #[tokio::test]
    async fn a_failed_publish_is_released_and_ends_the_run() {
        let store = one_task(record_of(&new_task("a"))).await;
        let publisher = FakePublisher::answering(Answer::Ack).then(&[Answer::Fail]);
        let running = start(&pump(&store, LEASE_MS), &publisher);
        let result = within("the run to end", running.handle)
            .await
            .expect("the pump does not panic");
        assert!(matches!(result, Err(PumpError::Amqp(_))), "{result:?}");
        // Released at once (not left to its lease), published again, and
        // settled before the run returned.
        assert!(store.is_empty());
        assert_eq!(publisher.ready_ids(), ["a", "a"]);
    }

    #[tokio::test]
    async fn an_unconfirmed_publish_is_released_after_the_confirm_wait() {
        let store = one_task(record_of(&new_task("a"))).await;
        let publisher = FakePublisher::answering(Answer::Ack).then(&[Answer::Hang]);
        drain(&store, &publisher, SHORT_LEASE_MS).await;
        assert_eq!(publisher.ready_ids(), ["a", "a"]);
    }

    #[tokio::test]
    async fn an_unreadable_record_is_dead_lettered_not_dropped() {
        let store = one_task(b"not a record".to_vec()).await;
        // The first dead letter is refused: the task stays until one is
        // confirmed.
        let publisher = FakePublisher::answering(Answer::Ack).then(&[Answer::Nack]);
        drain(&store, &publisher, LEASE_MS).await;
        let dead = publisher.dead();
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert!(dead.iter().all(|(_, error)| !error.is_empty()), "{dead:?}");
        assert!(publisher.ready_ids().is_empty());
    }

    #[tokio::test]
    async fn a_task_whose_queue_cannot_be_named_is_dead_lettered() {
        let store = one_task(record_of(&new_task("a"))).await;
        let publisher = FakePublisher::answering(Answer::Ack).then(&[Answer::BadName]);
        drain(&store, &publisher, LEASE_MS).await;
        let dead = publisher.dead();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].1.contains("fake refuses the name"), "{dead:?}");
    }

    #[tokio::test]
    async fn a_failed_claim_is_retried() {
        let store = one_task(record_of(&new_task("a"))).await;
        store.inject(Op::Claim, Fault::Refused);
        let publisher = FakePublisher::answering(Answer::Ack);
        drain(&store, &publisher, LEASE_MS).await;
        assert_eq!(publisher.ready_ids(), ["a"]);
    }

    #[tokio::test]
    async fn a_complete_without_reply_is_repeated_without_a_duplicate() {
        let store = one_task(record_of(&new_task("a"))).await;
        store.inject(Op::Complete, Fault::LostReply);
        store.inject(Op::Complete, Fault::Refused);
        let publisher = FakePublisher::answering(Answer::Ack);
        drain(&store, &publisher, LEASE_MS).await;
        assert_eq!(publisher.ready_ids(), ["a"]);
    }

    #[tokio::test]
    async fn a_stopping_pump_settles_what_it_claimed() {
        let store = one_task(record_of(&new_task("a"))).await;
        let publisher = FakePublisher::answering(Answer::Hang);
        let running = start(&pump(&store, LEASE_MS), &publisher);
        within("the publish", publisher.wait_publishes(1)).await;
        // Its confirm never comes: the stop wait ends it, and the task is
        // released rather than left to its lease.
        running.stop().await.expect("a clean stop");
        assert_eq!(store.leased(), 0);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn refusals_pause_per_queue_until_accepted() {
        let refusals = Refusals::default();
        let first = refusals.refused("full");
        let second = refusals.refused("full");
        assert!(second >= first, "{first:?} then {second:?}");
        assert!(
            refusals.refused("other") <= first * 2,
            "queues are paced apart"
        );
        refusals.accepted("full");
        assert!(
            refusals.refused("full") <= first * 2,
            "an accepted publish resets"
        );
    }

    #[test]
    fn held_bounds_stop_the_next_claim() {
        let max = Held {
            tasks: 10,
            bytes: 100,
        };
        let mut held = Held::default();
        held.add(Held {
            tasks: 9,
            bytes: 50,
        });
        assert!(!held.reaches(&max));
        held.add(Held {
            tasks: 0,
            bytes: 50,
        });
        assert!(held.reaches(&max), "bytes alone");
        held.remove(Held {
            tasks: 9,
            bytes: 100,
        });
        assert_eq!(held, Held::default());
        held.remove(Held { tasks: 1, bytes: 1 });
        assert_eq!(held, Held::default(), "saturates");
    }

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
