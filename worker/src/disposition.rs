//! Disposition: what an attempt's outcome means for its delivery, decided
//! in one place. Success acks. A failed attempt is handed to `NS.retry`
//! (where the scheduler applies backoff or dead-letters it); a permanent
//! failure or an unusable message goes to `NS.dead`. Either way the
//! delivery is settled (handed to [`Acks`] to be acked) only after the
//! broker confirmed the replacement.
//!
//! If the process dies after the replacement was confirmed and before the
//! ack, the delivery comes back; the retry it produces again carries the same
//! id and attempt, so the scheduler holds it once.
//!
//! A replacement the broker refuses (a nack: `NS.retry` or `NS.dead` at a
//! max-length with `reject-publish`) is [`DispositionError::Refused`]: the
//! consumer waits [`Disposition::refusal_pause`] (growing while refusals
//! go on) and hands the delivery back to its queue, never acking it.

use crate::acks::Acks;
use crate::capacity::OverCapacity;
use crate::handler::{TaskError, TaskOutput};
use crate::status::WorkerStatus;
use kairos_shared::amqp::{now_ms, Backoff};
use kairos_shared::client::check;
use kairos_shared::contract::{raw_dead_letter_properties, Names, Task, H_RETRY_AFTER_MS};
use kairos_shared::events::{EventKind, EventSink};
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;

/// Why a delivery could not be disposed of. Either way it is not acked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DispositionError {
    /// The channel failed: the session reconnects and the delivery comes
    /// back from the broker.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker nacked (or returned) the replacement: the channel is
    /// fine, the destination refuses messages.
    #[error("the broker refused the replacement: {0}")]
    Refused(String),
}

/// Disposes of a session's deliveries: publishes each replacement on a
/// channel in confirm mode of its own, and settles the delivery with
/// [`Acks`] once the broker confirmed it.
pub(crate) struct Disposition {
    channel: Channel,
    names: Names,
    events: EventSink,
    status: WorkerStatus,
    /// Paces the deliveries whose replacement was refused; reset by the next
    /// replacement the broker accepts.
    refusals: std::sync::Mutex<Backoff>,
}

impl Disposition {
    /// Opens the replacements' channel on `conn`, in confirm mode.
    pub(crate) async fn open(
        conn: &Connection,
        names: Names,
        events: EventSink,
        status: WorkerStatus,
    ) -> lapin::Result<Self> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Disposition {
            channel,
            names,
            events,
            status,
            refusals: std::sync::Mutex::new(Backoff::new()),
        })
    }

    /// How long to hold a delivery whose replacement was refused before it
    /// goes back to its queue: without a pause the worker would take it
    /// again at once, run it again and be refused again, in a tight loop.
    pub(crate) fn refusal_pause(&self) -> std::time::Duration {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_delay()
    }

    /// The channel replacements go out on, for the session to keep open
    /// until its connection closed.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// A successful attempt: nothing to replace, ack.
    pub(crate) async fn succeeded(
        &self,
        d: &Delivery,
        acks: &Acks,
        task: &Task,
        output: TaskOutput,
    ) -> Disposed {
        acks.settle(d.delivery_tag);
        finished(&task.queue, "succeeded");
        self.events.task(EventKind::Succeeded, task, None, None);
        self.status.succeeded(task, output);
        Ok(())
    }

    /// A failed attempt: a [`TaskError::Retry`] to `NS.retry` (where the
    /// scheduler applies backoff, or dead-letters it when no retry
    /// remains), a [`TaskError::Permanent`] to `NS.dead`; both with the
    /// reason in `x-error`, then ack.
    pub(crate) async fn failed(
        &self,
        d: &Delivery,
        acks: &Acks,
        task: &Task,
        failure: &TaskError,
    ) -> Disposed {
        let error = failure.message();
        let (props, exchange, outcome, event) = match failure {
            TaskError::Retry(_) | TaskError::RetryAfter { .. } => {
                let after = match failure {
                    TaskError::RetryAfter { after, .. } => Some(*after),
                    _ => None,
                };
                tracing::warn!(task_id = %task.id, kind = %task.name, attempt = task.attempt, error = %error, retry_after_ms = after.map(|a| a.as_millis() as u64), "attempt failed");
                (
                    retry_properties(task, error, after),
                    self.names.short_retry(),
                    "failed",
                    EventKind::Failed,
                )
            }
            TaskError::Permanent(_) => {
                tracing::error!(task_id = %task.id, kind = %task.name, attempt = task.attempt, error = %error, "dead-lettered");
                (
                    task.dead_letter_properties(error, now_ms()),
                    self.names.short_dead(),
                    "dead",
                    EventKind::Dead,
                )
            }
        };
        self.replace(exchange, &task.queue, props, &task.body)
            .await?;
        acks.settle(d.delivery_tag);
        finished(&task.queue, outcome);
        self.events.task(event, task, None, Some(error));
        match failure {
            TaskError::Retry(_) | TaskError::RetryAfter { .. } => self.status.failed(task, error),
            TaskError::Permanent(_) => self.status.dead(task, error),
        }
        Ok(())
    }

    /// A message that is not a usable task: to `NS.dead` as it came, with
    /// the reason, then ack.
    pub(crate) async fn unusable(
        &self,
        d: &Delivery,
        acks: &Acks,
        queue: &str,
        error: &str,
    ) -> Disposed {
        tracing::error!(queue = %queue, error = %error, "unusable message dead-lettered");
        let props = raw_dead_letter_properties(&d.properties, queue, error, now_ms());
        self.replace(self.names.short_dead(), queue, props, &d.data)
            .await?;
        acks.settle(d.delivery_tag);
        finished(queue, "unusable");
        self.events
            .message(EventKind::Dead, &d.properties, queue, error);
        Ok(())
    }
}

impl Disposition {
    /// A task whose `x-cost` exceeds this worker's capacity: it could
    /// never start here, and retrying would bring it back to the same
    /// workers, so it is dead-lettered at once with the reason.
    pub(crate) async fn over_capacity(
        &self,
        d: &Delivery,
        acks: &Acks,
        task: &Task,
        over: OverCapacity,
    ) -> Disposed {
        metrics::counter!("kairos_worker_over_capacity_total", "queue" => task.queue.clone())
            .increment(1);
        let error = TaskError::Permanent(over_capacity_reason(over));
        self.failed(d, acks, task, &error).await
    }

    /// An aborted attempt (`crate::control`): ack, no retry; the task
    /// ends `cancelled`.
    pub(crate) async fn cancelled(&self, d: &Delivery, acks: &Acks, task: &Task) -> Disposed {
        tracing::info!(task_id = %task.id, kind = %task.name, attempt = task.attempt, "task aborted: cancelled, not retried");
        acks.settle(d.delivery_tag);
        finished(&task.queue, "cancelled");
        self.events.task(EventKind::Cancelled, task, None, None);
        self.status
            .writer
            .record_with(|| kairos_shared::status::StatusUpdate::cancelled(task));
        Ok(())
    }
}

/// A failed attempt's properties for `NS.retry`: the failure headers, and
/// `x-retry-after-ms` when the handler chose the delay (the scheduler's
/// retry intake takes it off again). Without one, a stale header from an
/// earlier hop is left out, so it can never apply to the wrong retry.
fn retry_properties(task: &Task, error: &str, after: Option<Duration>) -> BasicProperties {
    let props = task.with_failure_headers(error, now_ms());
    let mut headers = props.headers().clone().unwrap_or_default().inner().clone();
    headers.remove(H_RETRY_AFTER_MS);
    if let Some(after) = after {
        let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        headers.insert(H_RETRY_AFTER_MS.into(), AMQPValue::LongLongInt(ms));
    }
    props.with_headers(FieldTable::from(headers))
}

/// The dead-letter reason of a task too heavy for this worker: names the
/// header and the setting, and what to do about it.
pub(crate) fn over_capacity_reason(over: OverCapacity) -> String {
    format!(
        "x-cost {} exceeds this worker's KAIROS_CAPACITY {}; route heavy tasks to a queue served by workers with more capacity",
        over.cost, over.capacity
    )
}

/// What disposing of a delivery comes to: `Ok` once it is settled.
type Disposed = Result<(), DispositionError>;

/// Counts a settled delivery by outcome.
fn finished(queue: &str, outcome: &'static str) {
    metrics::counter!("kairos_worker_finished_total", "queue" => queue.to_string(), "outcome" => outcome)
        .increment(1);
}

impl Disposition {
    async fn replace(
        &self,
        exchange: ShortString,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> Disposed {
        // `NS.retry` and `NS.dead` are fanout exchanges: the key only
        // informs, and one too long for AMQP is left out rather than panic
        // (`x-origin-queue` carries the queue in full).
        let key = kairos_shared::short::short("routing key", routing_key).unwrap_or_default();
        let confirm = self
            .channel
            .basic_publish(exchange, key, BasicPublishOptions::default(), body, props)
            .await?
            .await?;
        check(confirm).map_err(|e| DispositionError::Refused(e.to_string()))?;
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_shared::client::NewTask;

    fn task_with(headers: &[(&str, AMQPValue)]) -> Task {
        let t = headers
            .iter()
            .fold(NewTask::new("x").id("t-1"), |t, (k, v)| {
                t.header(k, v.clone())
            });
        let (_, props) = t.to_message().expect("message");
        Task::decode("q", &props, b"").expect("task")
    }

    fn retry_after_of(props: &BasicProperties) -> Option<AMQPValue> {
        props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(H_RETRY_AFTER_MS).cloned())
    }

    #[test]
    fn the_over_capacity_reason_names_the_header_and_the_setting() {
        let reason = over_capacity_reason(OverCapacity {
            cost: 8,
            capacity: 4,
        });
        assert_eq!(
            reason,
            "x-cost 8 exceeds this worker's KAIROS_CAPACITY 4; route heavy tasks to a queue served by workers with more capacity"
        );
    }

    #[test]
    fn a_retry_carries_the_handler_s_delay_and_never_a_stale_one() {
        let plain = task_with(&[]);
        let props = retry_properties(&plain, "429", Some(Duration::from_millis(1_500)));
        assert_eq!(retry_after_of(&props), Some(AMQPValue::LongLongInt(1_500)));
        // A header left from an earlier hop does not apply to this retry.
        let stale = task_with(&[(H_RETRY_AFTER_MS, AMQPValue::LongLongInt(9))]);
        assert_eq!(
            retry_after_of(&retry_properties(&stale, "boom", None)),
            None
        );
        let props = retry_properties(&stale, "boom", Some(Duration::from_secs(2)));
        assert_eq!(retry_after_of(&props), Some(AMQPValue::LongLongInt(2_000)));
    }
}
