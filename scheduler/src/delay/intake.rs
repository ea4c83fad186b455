//! Intake: consumes `NS.delay` (tasks to hold) and `NS.retry` (failed
//! attempts), writes them into the delay queue, and acks only after the Redis
//! write succeeded. Unusable messages and exhausted retries go to `NS.dead`,
//! acked only after the broker confirmed the dead letter.
//!
//! Deliveries are handled in batches (whatever is ready, up to `batch`):
//! one pipelined Redis round trip and one multiple-ack per batch.
//!
//! Batches are bounded by bytes as well as count (`batch_bytes`), and each
//! task is checked against the [`Limits`] (body, headers, horizon) before it
//! is held: one over a limit is dead-lettered with a reason naming it.
//!
//! If the process dies after the Redis write and before the ack, RabbitMQ
//! redelivers; the first-submission-wins rule turns the second write into a
//! no-op, reported as a `duplicate` event. A message without `message_id`
//! gets the same derived id on every delivery, so this holds for it too.
//!
//! A dead letter the broker refuses (a nack: `NS.dead` at a max-length with
//! `reject-publish`) leaves its delivery unacked: it is nacked back to its
//! queue on its own, the rest of the batch is acked around it, and the
//! intake pauses (growing while refusals go on) before the next batch, so
//! the message is not taken again at once and the session is not restarted.
//!
//! The intake is generic over its [`DelayStore`], its [`TaskPublisher`]
//! and its deliveries ([`IntakeDelivery`]), so its decisions are
//! unit-tested on fakes.

use crate::delay::ports::{DelayStore, IntakeDelivery, TaskPublisher};
use crate::delay::publisher::Publisher;
use crate::delay::retry::{take_retry_after, Decision, RetryPolicy};
use crate::delay::store::{member, Entry, Held, QueueError, RedisDelayQueue, Scheduled};
use futures_util::future::join_all;
use futures_util::StreamExt;
use kairos_shared::amqp::{now_ms, sleep_or_cancel, take_ready_bounded, Backoff};
use kairos_shared::client::check;
use kairos_shared::contract::{
    raw_dead_letter_properties, value_to_string, Names, ProtocolError, Task, H_ERROR,
};
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::limits::Limits;
use kairos_shared::record;
use kairos_shared::status::{StatusUpdate, StatusWriter};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, Consumer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often a hold whose reply did not come is repeated before the batch
/// goes back to RabbitMQ.
const UNKNOWN_OUTCOME_REPEATS: u32 = 3;
/// How long a batch may still take once the intake was told to stop.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Which queue an intake consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `NS.delay`: new tasks to hold until their due time.
    Delay,
    /// `NS.retry`: failed attempts, held again for their backoff or
    /// dead-lettered.
    Retry,
}

impl Source {
    /// The label of this source in metrics.
    fn label(self) -> &'static str {
        match self {
            Source::Delay => "delay",
            Source::Retry => "retry",
        }
    }
}

/// Why an intake's run ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IntakeError {
    /// The broker connection or channel failed: the supervisor reconnects.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The consumer stream ended: the supervisor consumes again.
    #[error("the broker cancelled the {0:?} consumer")]
    Cancelled(Source),
}

/// What became of a batch's dead letters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct DeadOutcome {
    confirmed: usize,
    refused: usize,
}

/// Consumes one of `NS.delay` and `NS.retry` into the delay store.
pub(crate) struct Intake<S = RedisDelayQueue, P = Publisher> {
    /// The queue consumed.
    pub(crate) source: Source,
    /// The namespace's names.
    pub(crate) names: Names,
    /// Where the tasks are held.
    pub(crate) queue: S,
    /// Where dead letters go.
    pub(crate) publisher: Arc<P>,
    /// Retry-or-dead for failed attempts.
    pub(crate) policy: RetryPolicy,
    /// Where `scheduled`, `retried`, `duplicate` and `dead` events go.
    pub(crate) events: EventSink,
    /// Where `scheduled`, `retrying` and `dead` statuses go.
    pub(crate) status: StatusWriter,
    /// Notified when a held task became its shard's earliest.
    pub(crate) wake: Arc<Notify>,
    /// The consumer's prefetch.
    pub(crate) prefetch: u16,
    /// Deliveries one batch takes at most.
    pub(crate) batch: usize,
    /// Body bytes one batch may take (it always takes its first delivery).
    pub(crate) batch_bytes: usize,
    /// Limits a new task must keep.
    pub(crate) limits: Limits,
}

/// What to do with one delivery.
enum Plan {
    Hold {
        task: Box<Task>,
        entry: Entry,
        kind: EventKind,
    },
    Dead {
        origin: String,
        props: Box<BasicProperties>,
        body: Vec<u8>,
        error: String,
        task: Option<Box<Task>>,
    },
}

impl Plan {
    /// A dead letter for a task that decoded.
    fn dead_task(origin: String, task: Task, error: String) -> Plan {
        Plan::Dead {
            props: Box::new(task.dead_letter_properties(&error, now_ms())),
            body: task.body.clone(),
            origin,
            error,
            task: Some(Box::new(task)),
        }
    }
}

/// What became of a batch's holds.
enum Stored {
    /// Held (durable, and replicated when asked): one result per hold.
    Held(Vec<Scheduled>),
    /// Redis refused the batch: it went back to RabbitMQ.
    Refused,
    /// Stopping while waiting for replicas: the unacked batch returns to
    /// RabbitMQ.
    Stopping,
}

impl<S: DelayStore, P: TaskPublisher> Intake<S, P> {
    /// Consumes until `cancel` or a broker failure, a batch at a time.
    pub(crate) async fn run(
        &self,
        conn: &Connection,
        cancel: CancellationToken,
    ) -> Result<(), IntakeError> {
        let mut consumer = self.consume(conn).await?;
        // Grows while Redis refuses batches (maxmemory, outage): each refused
        // batch comes back from RabbitMQ at once, and retrying it at a fixed
        // pace would keep Redis and the broker busy for nothing.
        let mut backoff = Backoff::new();
        // Paces batches after the broker refused dead letters.
        let mut refusals = Backoff::new();
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                d = consumer.next() => d,
            };
            let Some(first) = first else {
                return Err(IntakeError::Cancelled(self.source));
            };
            let mut batch = vec![first?];
            if !take_ready_bounded(&mut consumer, &mut batch, self.batch, self.batch_bytes)? {
                return Err(IntakeError::Cancelled(self.source));
            }
            // A batch stuck after a stop (a blocked broker takes no ack
            // until its alarm clears) is given up: whatever it had not
            // acked comes back, and its Redis writes are idempotent.
            let handled = tokio::select! {
                r = self.handle(&batch, &cancel) => r?,
                _ = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(STOP_WAIT).await;
                } => {
                    tracing::warn!("stopping: an intake batch did not finish in time; RabbitMQ redelivers what it had not acked");
                    return Ok(());
                }
            };
            if !pace(handled, &mut backoff, &mut refusals, &cancel).await {
                return Ok(());
            }
        }
    }

    /// Opens this intake's channel and consumes its queue.
    async fn consume(&self, conn: &Connection) -> Result<Consumer, IntakeError> {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let queue = match self.source {
            Source::Delay => self.names.short_delay(),
            Source::Retry => self.names.short_retry(),
        };
        Ok(channel
            .basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// Handles one batch: holds, then dead letters, then acks. Returns
    /// None when Redis refused the batch and it went back to RabbitMQ (the
    /// caller backs off), else what became of its dead letters.
    async fn handle<D: IntakeDelivery>(
        &self,
        batch: &[D],
        cancel: &CancellationToken,
    ) -> Result<Option<DeadOutcome>, IntakeError> {
        let plans: Vec<Plan> = {
            // ThreadRng is not Send: keep it out of the awaits below.
            let mut rng = rand::rng();
            batch.iter().map(|d| self.plan(d, &mut rng)).collect()
        };
        let scheduled = match self.store(&plans, batch, cancel).await? {
            Stored::Held(scheduled) => scheduled,
            Stored::Refused => return Ok(None),
            Stored::Stopping => return Ok(Some(DeadOutcome::default())),
        };
        // The tasks are durable now: a sleeping pump may need them at once.
        if scheduled.iter().any(|s| s.head) {
            self.wake.notify_one();
        }
        let (refused, outcome) = self.publish_dead_letters(&plans, batch).await?;
        settle_acks(batch, &refused).await?;
        metrics::counter!("kairos_scheduler_dead_refused_total").increment(outcome.refused as u64);
        self.report(&plans, &scheduled, &refused, outcome);
        Ok(Some(outcome))
    }

    /// Step 1, Redis: every hold in one round trip. On a failure the batch
    /// goes back to RabbitMQ untouched. A reply that did not come (timeout)
    /// leaves the write unknown: the batch comes back, and holding it again
    /// is a no-op for what the first write held.
    async fn store<D: IntakeDelivery>(
        &self,
        plans: &[Plan],
        batch: &[D],
        cancel: &CancellationToken,
    ) -> Result<Stored, IntakeError> {
        let entries: Vec<Entry> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Hold { entry, .. } => Some(entry.clone()),
                Plan::Dead { .. } => None,
            })
            .collect();
        match self.hold(&entries).await {
            Ok(held) => Ok(match self.until_replicated(held, &entries, cancel).await {
                Some(scheduled) => Stored::Held(scheduled),
                None => Stored::Stopping,
            }),
            Err(err) => {
                tracing::warn!(cause = %err, count = batch.len(), "cannot write to the delay queue; returning the batch to RabbitMQ");
                metrics::counter!("kairos_scheduler_intake_refused_total").increment(1);
                if let Some(last) = batch.last() {
                    last.requeue(true).await?;
                }
                Ok(Stored::Refused)
            }
        }
    }

    /// Step 2, dead letters, confirmed before anything is acked. A channel
    /// error ends the session (the batch comes back); a nack marks its
    /// delivery as refused. Returns, per delivery, whether its dead letter
    /// was refused.
    async fn publish_dead_letters<D: IntakeDelivery>(
        &self,
        plans: &[Plan],
        batch: &[D],
    ) -> Result<(Vec<bool>, DeadOutcome), IntakeError> {
        let mut confirms = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            if let Plan::Dead {
                origin,
                props,
                body,
                ..
            } = p
            {
                let confirm = self
                    .publisher
                    .publish_dead(origin, (**props).clone(), body)
                    .await?;
                confirms.push(async move { (i, confirm.await) });
            }
        }
        let mut refused = vec![false; batch.len()];
        let mut outcome = DeadOutcome::default();
        for (i, c) in join_all(confirms).await {
            if let Err(err) = check(c?) {
                tracing::warn!(cause = %err, queue = %batch[i].routing_key(), "dead letter refused; its message goes back to the queue");
                refused[i] = true;
                outcome.refused += 1;
            } else {
                outcome.confirmed += 1;
            }
        }
        Ok((refused, outcome))
    }

    /// Step 4: metrics, logs and events for what the batch did.
    fn report(&self, plans: &[Plan], scheduled: &[Scheduled], refused: &[bool], dead: DeadOutcome) {
        let source = self.source.label();
        let held = scheduled.iter().filter(|s| s.added).count();
        metrics::counter!("kairos_scheduler_held_total", "source" => source).increment(held as u64);
        metrics::counter!("kairos_scheduler_dead_total", "source" => source)
            .increment(dead.confirmed as u64);
        let duplicates = scheduled.iter().filter(|s| !s.added).count();
        if self.source == Source::Delay {
            metrics::counter!("kairos_scheduler_duplicates_total").increment(duplicates as u64);
        }
        let mut results = scheduled.iter();
        for (p, _) in plans.iter().zip(refused).filter(|(_, r)| !**r) {
            match p {
                Plan::Hold { task, kind, .. } => {
                    if let Some(s) = results.next() {
                        self.report_hold(task, *kind, s);
                    }
                }
                Plan::Dead {
                    error,
                    task,
                    origin,
                    props,
                    ..
                } => {
                    tracing::error!(queue = %origin, error = %error, "dead-lettered");
                    // Every dead letter has its event, decodable or not:
                    // task status is built on them.
                    if let Some(task) = task {
                        self.status.record_with(|| StatusUpdate::dead(task, error));
                    }
                    match task {
                        Some(task) => self.events.task(EventKind::Dead, task, None, Some(error)),
                        None => self.events.message(EventKind::Dead, props, origin, error),
                    }
                }
            }
        }
    }

    /// The event of one hold: its kind when added, `duplicate` for a new
    /// task whose id was already pending.
    fn report_hold(&self, task: &Task, kind: EventKind, s: &Scheduled) {
        if s.added {
            self.status.record_with(|| match self.source {
                Source::Delay => StatusUpdate::scheduled(task, s.due, true),
                Source::Retry => StatusUpdate::retrying(task, s.due, &failure_reason(task)),
            });
            kairos_shared::trace::step("kairos.hold", task);
            self.events.task(kind, task, Some(s.due), None);
        } else if self.source == Source::Delay {
            // A retry held twice is a redelivery of one failed attempt,
            // not a client's resubmission.
            tracing::info!(task_id = %task.id, "duplicate submission of a pending id ignored");
            self.events
                .task(EventKind::Duplicate, task, Some(s.due), None);
        }
    }

    /// Holds the entries; a call whose reply did not come (a stalled Redis)
    /// is repeated at once, a few times: the first may have run, and its
    /// tasks could be published and completed before a batch returned to
    /// RabbitMQ came back, when holding them again would run them twice.
    /// The repeat, queued behind the first in Redis, is a no-op for what
    /// the first held.
    async fn hold(&self, entries: &[Entry]) -> Result<Held, QueueError> {
        let mut tries = 0;
        loop {
            match self.queue.hold(entries).await {
                Err(err) if tries < UNKNOWN_OUTCOME_REPEATS && err.outcome_unknown() => {
                    tries += 1;
                    tracing::warn!(cause = %err, "no reply from Redis for a batch's write; repeating it");
                }
                other => return other,
            }
        }
    }

    /// With `KAIROS_REDIS_WAIT`, a batch is acked only once that many
    /// replicas confirmed it. Until they do, the batch stays unacked and its
    /// hold is confirmed again (`DelayStore::confirm`: its proofs refreshed,
    /// then the wait again), however long that takes. Neither nacking nor
    /// holding again would do: the batch's tasks, already in the master, may
    /// have been published and completed meanwhile, and putting them back
    /// would run them twice, on every round. Only a hold the confirmation
    /// finds lost (its master failed before a replica had it) is written
    /// again. Returns the first hold's result (which entries it added), or
    /// None when cancelled.
    async fn until_replicated(
        &self,
        mut held: Held,
        entries: &[Entry],
        cancel: &CancellationToken,
    ) -> Option<Vec<Scheduled>> {
        let first = std::mem::take(&mut held.scheduled);
        let mut backoff = Backoff::new();
        while !held.replicated {
            metrics::counter!("kairos_scheduler_redis_wait_short_total").increment(1);
            tracing::warn!(acked = ?held.acked, count = entries.len(), "Redis replicas have not confirmed the batch (KAIROS_REDIS_WAIT); holding its ack");
            if cancel.is_cancelled() {
                return None;
            }
            match self.queue.confirm(&held.proofs).await {
                Ok(c) if c.lost => {
                    tracing::warn!(count = entries.len(), "a batch's hold was lost with its Redis master before a replica had it; holding it again");
                    metrics::counter!("kairos_scheduler_redis_hold_lost_total").increment(1);
                    match self.queue.hold(entries).await {
                        Ok(again) => held = again,
                        Err(err) => {
                            tracing::warn!(cause = %err, "holding a lost batch again failed; trying again");
                            if !sleep_or_cancel(backoff.next_delay(), cancel).await {
                                return None;
                            }
                        }
                    }
                }
                Ok(c) => {
                    held.replicated = c.replicated;
                    held.acked = c.acked;
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "waiting for Redis replicas failed; trying again");
                    if !sleep_or_cancel(backoff.next_delay(), cancel).await {
                        return None;
                    }
                }
            }
        }
        Some(first)
    }
}

impl<S, P> Intake<S, P> {
    /// What to do with one delivery: hold it (a new task, or a retry per
    /// the policy) or dead-letter it with the reason.
    fn plan<D: IntakeDelivery>(&self, d: &D, rng: &mut impl rand::Rng) -> Plan {
        // A task RabbitMQ dead-lettered from a quorum band queue keeps the
        // band's key (`QUEUE.p7`): its queue is the logical one.
        let origin = self.names.logical_of_key(d.routing_key()).to_string();
        let mut task = match self.decode_checked(d, &origin) {
            Ok(task) => task,
            Err(dead) => return dead,
        };
        let (entry, kind) = match self.source {
            Source::Delay => {
                // The contract: a held task is published with x-attempt 1.
                task.attempt = 1;
                let entry = Entry {
                    member: member(&task.id, 1),
                    run_at: task.run_at,
                    delay_ms: task.delay_ms.unwrap_or(0),
                    record: Vec::new(),
                };
                (entry, EventKind::Scheduled)
            }
            // A quorum queue gave the task up after `x-delivery-limit`
            // deliveries without an ack: whatever killed its consumer would
            // do so again, so it is not retried whatever its retries left.
            Source::Retry if delivery_limit_reached(&task) => {
                take_retry_after(&mut task, self.limits.max_delay_ms);
                return Plan::dead_task(origin, task, delivery_limit_error());
            }
            Source::Retry => match self.retry_entry(&mut task, rng) {
                Some(entry) => (entry, EventKind::Retried),
                None => {
                    let error = failure_reason(&task);
                    return Plan::dead_task(origin, task, error);
                }
            },
        };
        match record::encode(&task) {
            Ok(rec) => Plan::Hold {
                entry: Entry {
                    record: rec,
                    ..entry
                },
                task: Box::new(task),
                kind,
            },
            Err(err) => Plan::dead_task(origin, task, err.to_string()),
        }
    }

    /// The delivery as a task within its limits, or its dead letter.
    fn decode_checked<D: IntakeDelivery>(&self, d: &D, origin: &str) -> Result<Task, Plan> {
        let decoded = if origin.is_empty() {
            Err(ProtocolError::NoQueue)
        } else {
            Task::decode(origin, d.properties(), d.data())
        };
        match decoded {
            Ok(task) => match self.check_limits(d, &task) {
                Ok(()) => Ok(task),
                Err(err) => Err(Plan::dead_task(origin.to_string(), task, err.to_string())),
            },
            Err(err) => {
                let error = err.to_string();
                Err(Plan::Dead {
                    props: Box::new(raw_dead_letter_properties(
                        d.properties(),
                        origin,
                        &error,
                        now_ms(),
                    )),
                    origin: origin.to_string(),
                    body: d.data().to_vec(),
                    error,
                    task: None,
                })
            }
        }
    }

    /// The next attempt's entry for a failed one, its headers updated; None
    /// when its retries are used up.
    fn retry_entry(&self, task: &mut Task, rng: &mut impl rand::Rng) -> Option<Entry> {
        // Taken off in either case: a dead letter does not carry it either.
        let retry_after = take_retry_after(task, self.limits.max_delay_ms);
        match self.policy.decide(task.attempt, task.max_retries, rng) {
            Decision::Exhausted => None,
            Decision::Retry {
                next_attempt,
                delay_ms,
            } => {
                let delay_ms = retry_after.unwrap_or(delay_ms);
                let error = failure_reason(task);
                tracing::warn!(task_id = %task.id, kind = %task.name, attempt = task.attempt, retry_in_ms = delay_ms, retry_after = retry_after.is_some(), error = %error, "retrying");
                task.attempt = next_attempt;
                task.set_header(H_ERROR, kairos_shared::contract::text(&error));
                Some(Entry {
                    member: member(&task.id, next_attempt),
                    run_at: None,
                    delay_ms: i64::try_from(delay_ms).unwrap_or(i64::MAX),
                    record: Vec::new(),
                })
            }
        }
    }

    /// A new task (`NS.delay`) must keep every limit. A failed attempt
    /// (`NS.retry`) only the body cap: its headers grew by what Kairos adds
    /// on a retry, and its due time is the backoff's.
    fn check_limits<D: IntakeDelivery>(&self, d: &D, task: &Task) -> Result<(), ProtocolError> {
        match self.source {
            Source::Delay => {
                self.limits.check_message(d.properties(), d.data().len())?;
                self.limits.check_due(task.run_at, task.delay_ms, now_ms())
            }
            Source::Retry => self.limits.check_body(d.data().len()),
        }
    }
}

/// Paces the next batch after `handled`: backs off while Redis refuses
/// batches (None), pauses while the broker refuses dead letters. False
/// when cancelled meanwhile.
async fn pace(
    handled: Option<DeadOutcome>,
    backoff: &mut Backoff,
    refusals: &mut Backoff,
    cancel: &CancellationToken,
) -> bool {
    let Some(dead) = handled else {
        // Redis refused the batch: it went back to RabbitMQ.
        return sleep_or_cancel(backoff.next_delay(), cancel).await;
    };
    backoff.reset();
    if dead.refused > 0 {
        let pause = refusals.next_delay();
        let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        tracing::warn!(refused = dead.refused, retry_in_ms = pause_ms, "the broker refused dead letters; their messages went back to the queue; pausing the intake");
        return sleep_or_cancel(pause, cancel).await;
    }
    if dead.confirmed > 0 {
        refusals.reset();
    }
    true
}

/// Step 3, acks. Without refusals: one multiple-ack of the last tag, which
/// is every unacked delivery of this channel up to it. With refusals, a
/// multiple-ack must not reach a refused delivery while it is unacked: each
/// is nacked back (requeue) first, awaited, then the others are acked with
/// one multiple-ack of the highest tag not refused (a tag already nacked is
/// not unacked any more, so the range skips it; acking a nacked tag itself
/// would close the channel). If the process dies before the nacks, the
/// whole batch comes back (the holds are idempotent); after them, the
/// acked part is lost to nobody and the rest comes back likewise.
async fn settle_acks<D: IntakeDelivery>(batch: &[D], refused: &[bool]) -> Result<(), IntakeError> {
    for (d, _) in batch.iter().zip(refused).filter(|(_, r)| **r) {
        d.requeue(false).await?;
    }
    if let Some((last, _)) = batch.iter().zip(refused).rev().find(|(_, r)| !**r) {
        last.ack_up_to().await?;
    }
    Ok(())
}

/// Whether RabbitMQ dead-lettered the task because its quorum queue's
/// `x-delivery-limit` was reached: the most recent `x-death` entry (RabbitMQ
/// puts it first) has reason `delivery_limit`. Only the most recent counts:
/// a task replayed from `NS.dead` has its `x-death` removed, and one failed
/// by a Kairos worker after an earlier death is a new attempt.
fn delivery_limit_reached(task: &Task) -> bool {
    latest_death_reason(task).as_deref() == Some(DELIVERY_LIMIT_REASON)
}

/// The `x-death` reason RabbitMQ (3.10 and 4.x) gives a message a quorum
/// queue dead-letters after `x-delivery-limit` returned deliveries.
const DELIVERY_LIMIT_REASON: &str = "delivery_limit";

/// The `x-error` of a task given up by its quorum queue.
fn delivery_limit_error() -> String {
    // RabbitMQ 3.10 gives up once the returns exceed the limit: the last
    // delivery carries `x-delivery-count` 20, so it was delivered 21 times.
    format!(
        "delivered more than {} times without an ack (x-delivery-limit): its worker died, \
         lost its connection or returned it each time",
        kairos_shared::queue_mode::DELIVERY_LIMIT
    )
}

/// The reason of the most recent `x-death` entry, if any.
fn latest_death_reason(task: &Task) -> Option<String> {
    task.header("x-death").and_then(|v| match v {
        AMQPValue::FieldArray(a) => a.as_slice().first().and_then(|d| match d {
            AMQPValue::FieldTable(t) => t.inner().get("reason").map(value_to_string),
            _ => None,
        }),
        _ => None,
    })
}

/// Why an attempt failed: a Kairos worker says so in `x-error`; a consumer
/// in another language that rejected the delivery leaves an `x-death` entry.
fn failure_reason(task: &Task) -> String {
    if let Some(e) = task.header(H_ERROR) {
        return value_to_string(e);
    }
    match latest_death_reason(task).as_deref() {
        Some("rejected") | None => "rejected by consumer".to_string(),
        Some(other) => format!("dead-lettered by RabbitMQ ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delay::fakes::{new_task, Answer, Deliveries, FakePublisher, Settled, QUEUE};
    use crate::delay::memory::{Fault, MemoryDelayStore, Op};
    use crate::delay::retry::Jitter;
    use kairos_shared::contract::{H_ATTEMPT, H_MAX_RETRIES};

    /// The backoff after a first failed attempt (no jitter).
    const RETRY_BASE_MS: u64 = 1_000;
    /// Room for the clock read before and after a hold.
    const CLOCK_SLACK_MS: i64 = 1_000;

    fn intake(
        source: Source,
        store: &MemoryDelayStore,
        publisher: &Arc<FakePublisher>,
    ) -> Intake<MemoryDelayStore, FakePublisher> {
        Intake {
            source,
            names: Names::new("unit"),
            queue: store.clone(),
            publisher: publisher.clone(),
            policy: RetryPolicy {
                default_max_retries: 3,
                base_ms: RETRY_BASE_MS,
                max_ms: RETRY_BASE_MS * 60,
                jitter: Jitter::None,
            },
            events: EventSink::disabled(),
            status: StatusWriter::disabled(),
            wake: Arc::new(Notify::new()),
            prefetch: 10,
            batch: 10,
            batch_bytes: 1 << 20,
            limits: Limits::default(),
        }
    }

    /// A failed attempt as a worker sends it to `NS.retry`.
    fn failed(id: &str, attempt: i64, max_retries: i64) -> kairos_shared::client::NewTask {
        new_task(id)
            .header(H_ATTEMPT, AMQPValue::LongLongInt(attempt))
            .header(H_MAX_RETRIES, AMQPValue::LongLongInt(max_retries))
            .header(H_ERROR, kairos_shared::contract::text("boom"))
    }

    /// A store, a publisher answering `answers` then acks, and deliveries.
    fn fixture(
        shards: usize,
        answers: &[Answer],
    ) -> (MemoryDelayStore, Arc<FakePublisher>, Deliveries) {
        let store = MemoryDelayStore::new(shards);
        let publisher = FakePublisher::answering(Answer::Ack).then(answers);
        let make = Deliveries::new(&store);
        (store, publisher, make)
    }

    /// Handles `batch` with a fresh intake of `source`; its outcome.
    async fn handle(
        source: Source,
        store: &MemoryDelayStore,
        publisher: &Arc<FakePublisher>,
        batch: &[crate::delay::fakes::FakeDelivery],
    ) -> Result<Option<DeadOutcome>, IntakeError> {
        intake(source, store, publisher)
            .handle(batch, &CancellationToken::new())
            .await
    }

    /// A handled batch's outcome: its dead letters confirmed and refused.
    fn dead_letters(confirmed: usize, refused: usize) -> Option<DeadOutcome> {
        Some(DeadOutcome { confirmed, refused })
    }

    fn held_task(store: &MemoryDelayStore, member: &str) -> Task {
        let rec = store.record(member).expect("held");
        record::decode(crate::delay::store::id_of(member), &rec).expect("a readable record")
    }

    #[tokio::test]
    async fn a_delivery_is_held_then_acked() {
        let (store, publisher, mut make) = fixture(2, &[]);
        let batch = [make.task(&new_task("a")), make.task(&new_task("b"))];
        let outcome = handle(Source::Delay, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(outcome, Some(DeadOutcome::default()));
        // One multiple-ack of the last tag, once both tasks were in the store.
        assert_eq!(make.log(), [Settled::AckUpTo(2, 2)]);
        assert_eq!(held_task(&store, "a").attempt, 1);
        assert_eq!(held_task(&store, "b").queue, QUEUE);
        assert!(publisher.seen().is_empty());
    }

    #[tokio::test]
    async fn a_duplicate_id_is_acked_and_not_held_again() {
        let (store, publisher, mut make) = fixture(1, &[]);
        let intake = intake(Source::Delay, &store, &publisher);
        let first = [make.task(&new_task("a"))];
        intake
            .handle(&first, &CancellationToken::new())
            .await
            .expect("first");
        let again = [make.task(&new_task("a").body(b"another body".to_vec()))];
        intake
            .handle(&again, &CancellationToken::new())
            .await
            .expect("again");
        assert_eq!(make.log(), [Settled::AckUpTo(1, 1), Settled::AckUpTo(2, 1)]);
        assert_eq!(store.len(), 1);
        assert_eq!(
            held_task(&store, "a").body,
            b"body of a",
            "the first submission wins"
        );
    }

    #[tokio::test]
    async fn a_failed_attempt_is_held_for_its_next_attempt() {
        let (store, publisher, mut make) = fixture(1, &[]);
        let batch = [make.task(&failed("a", 1, 3))];
        let before = store.now_ms();
        handle(Source::Retry, &store, &publisher, &batch)
            .await
            .expect("handled");
        let next = member("a", 2);
        let task = held_task(&store, &next);
        assert_eq!(task.attempt, 2);
        assert_eq!(
            task.header(H_ERROR).map(value_to_string).as_deref(),
            Some("boom")
        );
        let due = store.due_of(&next).expect("waiting");
        let backoff = i64::try_from(RETRY_BASE_MS).expect("small");
        assert!(due >= before + backoff && due <= before + backoff + CLOCK_SLACK_MS);
        assert_eq!(make.log(), [Settled::AckUpTo(1, 1)]);
    }

    #[tokio::test]
    async fn a_retry_after_replaces_the_backoff_once() {
        use kairos_shared::contract::H_RETRY_AFTER_MS;
        let (store, publisher, mut make) = fixture(1, &[]);
        let wanted = 30_000;
        let batch =
            [make
                .task(&failed("a", 1, 3).header(H_RETRY_AFTER_MS, AMQPValue::LongLongInt(wanted)))];
        let before = store.now_ms();
        handle(Source::Retry, &store, &publisher, &batch)
            .await
            .expect("handled");
        let next = member("a", 2);
        let due = store.due_of(&next).expect("waiting");
        assert!(due >= before + wanted && due <= before + wanted + CLOCK_SLACK_MS);
        let task = held_task(&store, &next);
        assert!(
            task.header(H_RETRY_AFTER_MS).is_none(),
            "for this retry only"
        );
    }

    #[tokio::test]
    async fn an_exhausted_retry_is_dead_lettered_then_acked() {
        let (store, publisher, mut make) = fixture(1, &[]);
        let batch = [make.task(&failed("a", 4, 3))];
        let outcome = handle(Source::Retry, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(outcome, dead_letters(1, 0));
        assert_eq!(publisher.dead(), [(QUEUE.to_string(), "boom".to_string())]);
        assert!(store.is_empty());
        assert_eq!(make.log(), [Settled::AckUpTo(1, 0)]);
    }

    #[tokio::test]
    async fn bad_input_is_dead_lettered_with_its_reason() {
        let (store, publisher, mut make) = fixture(1, &[]);
        let (_, props) = new_task("a").to_message().expect("message");
        let batch = [
            make.raw("", props, b"x".to_vec()),
            make.raw(QUEUE, BasicProperties::default(), b"x".to_vec()),
        ];
        let outcome = handle(Source::Delay, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(outcome, dead_letters(2, 0));
        let reasons: Vec<String> = publisher.dead().into_iter().map(|(_, e)| e).collect();
        assert_eq!(
            reasons,
            [
                ProtocolError::NoQueue.to_string(),
                ProtocolError::MissingType.to_string()
            ]
        );
        assert!(store.is_empty());
        assert_eq!(make.log(), [Settled::AckUpTo(2, 0)]);
    }

    #[tokio::test]
    async fn a_task_over_a_limit_is_dead_lettered() {
        let (store, publisher, mut make) = fixture(1, &[]);
        let mut intake = intake(Source::Delay, &store, &publisher);
        intake.limits.max_body_bytes = 4;
        let batch = [make.task(&new_task("a"))];
        intake
            .handle(&batch, &CancellationToken::new())
            .await
            .expect("handled");
        let dead = publisher.dead();
        assert_eq!(dead.len(), 1);
        assert!(!dead[0].1.is_empty());
        assert!(store.is_empty());
        assert_eq!(make.log(), [Settled::AckUpTo(1, 0)]);
    }

    #[tokio::test]
    async fn a_refused_dead_letter_sends_its_message_back_alone() {
        let (store, publisher, mut make) = fixture(1, &[Answer::Nack]);
        let batch = [
            make.task(&new_task("a")),
            make.raw(QUEUE, BasicProperties::default(), b"x".to_vec()),
            make.task(&new_task("b")),
        ];
        let outcome = handle(Source::Delay, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(outcome, dead_letters(0, 1));
        // Nacked back first, then the rest acked around it.
        assert_eq!(
            make.log(),
            [Settled::Requeued(2, false), Settled::AckUpTo(3, 2)]
        );
    }

    #[tokio::test]
    async fn a_refused_write_returns_the_whole_batch() {
        let (store, publisher, mut make) = fixture(1, &[]);
        store.inject(Op::Hold, Fault::Refused);
        let batch = [
            make.task(&new_task("a")),
            make.raw(QUEUE, BasicProperties::default(), b"x".to_vec()),
        ];
        let outcome = handle(Source::Delay, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(outcome, None, "the caller backs off");
        assert_eq!(make.log(), [Settled::Requeued(2, true)]);
        assert!(
            publisher.seen().is_empty(),
            "no dead letter before the write"
        );
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn a_write_without_reply_is_repeated_then_acked() {
        let (store, publisher, mut make) = fixture(1, &[]);
        store.inject(Op::Hold, Fault::LostReply);
        let batch = [make.task(&new_task("a"))];
        handle(Source::Delay, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(make.log(), [Settled::AckUpTo(1, 1)]);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn a_broken_channel_ends_the_batch_unacked() {
        let (store, publisher, mut make) = fixture(1, &[Answer::Fail]);
        let batch = [make.raw(QUEUE, BasicProperties::default(), b"x".to_vec())];
        let result = handle(Source::Delay, &store, &publisher, &batch).await;
        assert!(matches!(result, Err(IntakeError::Amqp(_))), "{result:?}");
        assert!(make.log().is_empty(), "the broker redelivers it");
    }

    #[tokio::test]
    async fn pacing_waits_after_refusals_and_ends_on_a_stop() {
        let (mut backoff, mut refusals) = (Backoff::new(), Backoff::new());
        let running = CancellationToken::new();
        assert!(
            pace(dead_letters(1, 0), &mut backoff, &mut refusals, &running).await,
            "nothing refused: the next batch at once"
        );
        // Stopped: a pause ends at once, and says so.
        let stopped = CancellationToken::new();
        stopped.cancel();
        assert!(!pace(None, &mut backoff, &mut refusals, &stopped).await);
        assert!(!pace(dead_letters(0, 1), &mut backoff, &mut refusals, &stopped).await);
        assert!(pace(dead_letters(0, 0), &mut backoff, &mut refusals, &stopped).await);
    }

    #[test]
    fn the_failure_reason_comes_from_x_error_or_x_death() {
        let task = task_of_headers(&[(H_ERROR, kairos_shared::contract::text("boom"))]);
        assert_eq!(failure_reason(&task), "boom");
        assert_eq!(
            failure_reason(&task_of_headers(&[])),
            "rejected by consumer"
        );
    }

    #[test]
    fn a_delivery_limit_death_is_recognised_even_after_an_earlier_error() {
        let death = |reason: &str| {
            let mut entry = lapin::types::FieldTable::default();
            entry.insert("reason".into(), kairos_shared::contract::text(reason));
            AMQPValue::FieldTable(entry)
        };
        let limited = task_of_headers(&[
            (H_ERROR, kairos_shared::contract::text("boom")),
            (
                "x-death",
                AMQPValue::FieldArray(vec![death("delivery_limit"), death("rejected")].into()),
            ),
        ]);
        assert!(delivery_limit_reached(&limited));
        let rejected = task_of_headers(&[(
            "x-death",
            AMQPValue::FieldArray(vec![death("rejected"), death("delivery_limit")].into()),
        )]);
        assert!(!delivery_limit_reached(&rejected));
        assert!(!delivery_limit_reached(&task_of_headers(&[])));
        assert!(delivery_limit_error().contains("x-delivery-limit"));
    }

    #[tokio::test]
    async fn a_task_past_its_delivery_limit_is_dead_lettered_not_retried() {
        let mut entry = lapin::types::FieldTable::default();
        entry.insert(
            "reason".into(),
            kairos_shared::contract::text("delivery_limit"),
        );
        let task = failed("a", 1, 5).header(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(entry)].into()),
        );
        let (store, publisher, mut make) = fixture(1, &[]);
        let batch = [make.task(&task)];
        let outcome = handle(Source::Retry, &store, &publisher, &batch)
            .await
            .expect("handled");
        assert_eq!(outcome, dead_letters(1, 0));
        assert!(store.is_empty(), "not held for a retry");
        let reasons: Vec<String> = publisher.dead().into_iter().map(|(_, e)| e).collect();
        assert_eq!(reasons, vec![delivery_limit_error()]);
    }

    #[tokio::test]
    async fn a_band_key_leads_back_to_its_logical_queue_in_quorum_mode() {
        let (store, publisher, mut make) = fixture(1, &[]);
        let mut intake = intake(Source::Retry, &store, &publisher);
        intake.names = Names::new("unit").with_mode(kairos_shared::queue_mode::QueueMode::Quorum);
        let (props, body) = {
            let (_, props) = failed("a", 1, 3).to_message().expect("a message");
            (props, b"x".to_vec())
        };
        let batch = [make.raw(&format!("{QUEUE}.p7"), props, body)];
        intake
            .handle(&batch, &CancellationToken::new())
            .await
            .expect("handled");
        assert_eq!(held_task(&store, &member("a", 2)).queue, QUEUE);
    }

    fn task_of_headers(headers: &[(&str, AMQPValue)]) -> Task {
        let mut task = new_task("a");
        for (name, value) in headers {
            task = task.header(name, value.clone());
        }
        crate::delay::fakes::task_of(&task)
    }
}
