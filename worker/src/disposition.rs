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
use crate::handler::TaskError;
use crate::status::WorkerStatus;
use kairos_shared::amqp::{now_ms, Backoff};
use kairos_shared::client::check;
use kairos_shared::contract::{raw_dead_letter_properties, Names, Task};
use kairos_shared::events::{EventKind, EventSink};
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};

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
    pub(crate) async fn succeeded(&self, d: &Delivery, acks: &Acks, task: &Task) -> Disposed {
        acks.settle(d.delivery_tag);
        finished(&task.queue, "succeeded");
        self.events.task(EventKind::Succeeded, task, None, None);
        self.status.succeeded(task);
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
        let (error, props) = match failure {
            TaskError::Retry(error) => {
                tracing::warn!(task_id = %task.id, kind = %task.name, attempt = task.attempt, error = %error, "attempt failed");
                (error, task.with_failure_headers(error, now_ms()))
            }
            TaskError::Permanent(error) => {
                tracing::error!(task_id = %task.id, kind = %task.name, attempt = task.attempt, error = %error, "dead-lettered");
                (error, task.dead_letter_properties(error, now_ms()))
            }
        };
        let (exchange, outcome, event) = match failure {
            TaskError::Retry(_) => (self.names.short_retry(), "failed", EventKind::Failed),
            TaskError::Permanent(_) => (self.names.short_dead(), "dead", EventKind::Dead),
        };
        self.replace(exchange, &task.queue, props, &task.body)
            .await?;
        acks.settle(d.delivery_tag);
        finished(&task.queue, outcome);
        self.events.task(event, task, None, Some(error));
        match failure {
            TaskError::Retry(_) => self.status.failed(task, error),
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
