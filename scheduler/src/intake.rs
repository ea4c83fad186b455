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

use crate::delay_queue::{member, Entry, RedisDelayQueue};
use crate::publisher::Publisher;
use crate::retry::{Decision, RetryPolicy};
use futures_util::future::join_all;
use futures_util::StreamExt;
use kairos_shared::amqp::{now_ms, take_ready_bounded};
use kairos_shared::client::check;
use kairos_shared::contract::{
    raw_dead_letter_properties, value_to_string, Names, ProtocolError, Task, H_ERROR,
};
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::limits::Limits;
use kairos_shared::record;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Which queue an intake consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Delay,
    Retry,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the {0:?} consumer")]
    Cancelled(Source),
    #[error("a dead letter was not confirmed: {0}")]
    DeadLetter(String),
}

pub struct Intake {
    pub source: Source,
    pub names: Names,
    pub queue: RedisDelayQueue,
    pub publisher: Arc<Publisher>,
    pub policy: RetryPolicy,
    pub events: EventSink,
    pub wake: Arc<Notify>,
    pub prefetch: u16,
    pub batch: usize,
    /// Body bytes one batch may take (it always takes its first delivery).
    pub batch_bytes: usize,
    pub limits: Limits,
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

impl Intake {
    pub async fn run(
        &self,
        conn: &Connection,
        cancel: CancellationToken,
    ) -> Result<(), IntakeError> {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let queue = match self.source {
            Source::Delay => self.names.delay(),
            Source::Retry => self.names.retry(),
        };
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
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
            self.handle(batch, &cancel).await?;
        }
    }

    async fn handle(
        &self,
        batch: Vec<Delivery>,
        cancel: &CancellationToken,
    ) -> Result<(), IntakeError> {
        let plans: Vec<Plan> = {
            // ThreadRng is not Send: keep it out of the awaits below.
            let mut rng = rand::rng();
            batch.iter().map(|d| self.plan(d, &mut rng)).collect()
        };

        // 1. Redis: every hold in one round trip. On failure the batch goes
        //    back to RabbitMQ untouched.
        let entries: Vec<Entry> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Hold { entry, .. } => Some(entry.clone()),
                Plan::Dead { .. } => None,
            })
            .collect();
        let scheduled = match self.queue.schedule(&entries).await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(cause = %err, count = batch.len(), "cannot write to the delay queue; returning the batch to RabbitMQ");
                if let Some(last) = batch.last() {
                    last.acker
                        .nack(BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        })
                        .await?;
                }
                kairos_shared::amqp::sleep_or_cancel(Duration::from_millis(500), cancel).await;
                return Ok(());
            }
        };

        // The tasks are durable now: a sleeping pump may need them at once.
        if scheduled.iter().any(|s| s.head) {
            self.wake.notify_one();
        }

        // 2. Dead letters, confirmed before anything is acked.
        let mut confirms = Vec::new();
        for p in &plans {
            if let Plan::Dead {
                origin,
                props,
                body,
                ..
            } = p
            {
                confirms.push(
                    self.publisher
                        .publish_dead(origin, (**props).clone(), body)
                        .await?,
                );
            }
        }
        for c in join_all(confirms).await {
            check(c?).map_err(|e| IntakeError::DeadLetter(e.to_string()))?;
        }

        // 3. Ack the whole batch at once: it is every unacked delivery on
        //    this channel up to the last tag.
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }

        // 4. Report.
        let source = match self.source {
            Source::Delay => "delay",
            Source::Retry => "retry",
        };
        let held = scheduled.iter().filter(|s| s.added).count();
        metrics::counter!("kairos_scheduler_held_total", "source" => source).increment(held as u64);
        let dead = plans.len() - entries.len();
        metrics::counter!("kairos_scheduler_dead_total", "source" => source).increment(dead as u64);
        let duplicates = scheduled.iter().filter(|s| !s.added).count();
        if self.source == Source::Delay {
            metrics::counter!("kairos_scheduler_duplicates_total").increment(duplicates as u64);
        }
        let mut results = scheduled.iter();
        for p in &plans {
            match p {
                Plan::Hold { task, kind, .. } => {
                    if let Some(s) = results.next() {
                        if s.added {
                            self.events.task(*kind, task, Some(s.due), None);
                        } else if self.source == Source::Delay {
                            // A retry held twice is a redelivery of one
                            // failed attempt, not a client's resubmission.
                            tracing::info!(task_id = %task.id, "duplicate submission of a pending id ignored");
                            self.events
                                .task(EventKind::Duplicate, task, Some(s.due), None);
                        }
                    }
                }
                Plan::Dead {
                    error,
                    task,
                    origin,
                    ..
                } => {
                    tracing::error!(queue = %origin, error = %error, "dead-lettered");
                    if let Some(task) = task {
                        self.events.task(EventKind::Dead, task, None, Some(error));
                    }
                }
            }
        }
        Ok(())
    }

    fn plan(&self, d: &Delivery, rng: &mut impl rand::Rng) -> Plan {
        let origin = d.routing_key.to_string();
        let decoded = if origin.is_empty() {
            Err(ProtocolError::NoQueue)
        } else {
            Task::decode(&origin, &d.properties, &d.data)
        }
        .map_err(|err| (err, None));
        let checked = decoded.and_then(|task| match self.check_limits(d, &task) {
            Ok(()) => Ok(task),
            Err(err) => Err((err, Some(Box::new(task)))),
        });
        let mut task = match checked {
            Ok(t) => t,
            Err((err, Some(task))) => {
                let error = err.to_string();
                return Plan::Dead {
                    props: Box::new(task.dead_letter_properties(&error, now_ms())),
                    origin,
                    body: task.body.clone(),
                    error,
                    task: Some(task),
                };
            }
            Err((err, None)) => {
                return Plan::Dead {
                    props: Box::new(raw_dead_letter_properties(
                        &d.properties,
                        &origin,
                        &err.to_string(),
                        now_ms(),
                    )),
                    origin,
                    body: d.data.clone(),
                    error: err.to_string(),
                    task: None,
                }
            }
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
            Source::Retry => {
                let error = failure_reason(&task);
                match self.policy.decide(task.attempt, task.max_retries, rng) {
                    Decision::Exhausted => {
                        return Plan::Dead {
                            props: Box::new(task.dead_letter_properties(&error, now_ms())),
                            origin,
                            body: task.body.clone(),
                            error,
                            task: Some(Box::new(task)),
                        }
                    }
                    Decision::Retry {
                        next_attempt,
                        delay_ms,
                    } => {
                        tracing::warn!(task_id = %task.id, kind = %task.name, attempt = task.attempt, retry_in_ms = delay_ms, error = %error, "retrying");
                        task.attempt = next_attempt;
                        task.set_header(H_ERROR, kairos_shared::contract::text(&error));
                        let entry = Entry {
                            member: member(&task.id, next_attempt),
                            run_at: None,
                            delay_ms: delay_ms as i64,
                            record: Vec::new(),
                        };
                        (entry, EventKind::Retried)
                    }
                }
            }
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
            Err(err) => Plan::Dead {
                props: Box::new(task.dead_letter_properties(&err.to_string(), now_ms())),
                origin,
                body: task.body.clone(),
                error: err.to_string(),
                task: Some(Box::new(task)),
            },
        }
    }
}

impl Intake {
    /// A new task (`NS.delay`) must keep every limit. A failed attempt
    /// (`NS.retry`) only the body cap: its headers grew by what Kairos adds
    /// on a retry, and its due time is the backoff's.
    fn check_limits(&self, d: &Delivery, task: &Task) -> Result<(), ProtocolError> {
        match self.source {
            Source::Delay => {
                self.limits.check_message(&d.properties, d.data.len())?;
                self.limits.check_due(task.run_at, task.delay_ms, now_ms())
            }
            Source::Retry => self.limits.check_body(d.data.len()),
        }
    }
}

/// Why an attempt failed: a Kairos worker says so in `x-error`; a consumer
/// in another language that rejected the delivery leaves an `x-death` entry.
fn failure_reason(task: &Task) -> String {
    if let Some(e) = task.header(H_ERROR) {
        return value_to_string(e);
    }
    let reason = task.header("x-death").and_then(|v| match v {
        AMQPValue::FieldArray(a) => a.as_slice().first().and_then(|d| match d {
            AMQPValue::FieldTable(t) => t.inner().get("reason").map(value_to_string),
            _ => None,
        }),
        _ => None,
    });
    match reason.as_deref() {
        Some("rejected") | None => "rejected by consumer".to_string(),
        Some(other) => format!("dead-lettered by RabbitMQ ({other})"),
    }
}
