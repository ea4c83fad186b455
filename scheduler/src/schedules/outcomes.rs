//! Occurrence outcomes, from the workers' lifecycle events.
//!
//! Workers do not talk to Redis, so the scheduler learns what became of an
//! occurrence from `NS.events` (when workers run with `KAIROS_EVENTS=true`):
//! a durable queue `NS.schedules.outcomes`, shared by every scheduler of the
//! namespace (each event is handled once, by any of them), bound to
//! `task.started`, `task.succeeded`, `task.failed` and `task.dead`. Events
//! of tasks a schedule fired (id `schedule@tick`) set the schedule's
//! `last_outcome`; `succeeded` and `dead` end the occurrence's overlap hold.
//!
//! Without events the outcome stays unknown and an overlap hold ends after
//! the schedule's `max_run_ms`. The queue is capped (newest kept) so that a
//! namespace with many non-schedule tasks and no scheduler cannot grow it
//! without bound.

use crate::schedules::model::occurrence::parse_occurrence_id;
use crate::schedules::store::ScheduleStore;
use futures_util::StreamExt;
use kairos_shared::amqp::{
    close_connection, connect_with_retry, sleep_or_cancel, Backoff, Broker, CLOSE_WITHIN,
    REPLY_SUCCESS,
};
use kairos_shared::contract::Names;
use kairos_shared::supervise::{Restart, Supervised};
use kairos_shared::topology;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Deliveries handled per acknowledgement.
const BATCH: usize = 100;
/// Most events the outcomes queue holds.
const MAX_BACKLOG: i32 = 100_000;
/// Unacked deliveries the broker sends this consumer ahead.
const PREFETCH: u16 = 500;

/// The outcomes queue of a namespace: `NS.schedules.outcomes`.
pub fn queue_name(names: &Names) -> String {
    format!("{}.schedules.outcomes", names.namespace())
}

/// [`queue_name`] as the short string lapin takes: at most 48 + 19 bytes
/// (the namespace is bounded), so it never fails in practice.
fn queue_short(names: &Names) -> lapin::types::ShortString {
    kairos_shared::short::short("queue name", &queue_name(names)).unwrap_or_default()
}

/// What an event means for its schedule: (schedule id, task id, tick,
/// occurrence over, outcome JSON). `None` for other tasks' events.
pub(crate) fn interpret(event: &Value) -> Option<(String, String, i64, bool, Value)> {
    let id = event.get("id")?.as_str()?;
    let (schedule, tick) = parse_occurrence_id(id)?;
    let kind = event.get("event")?.as_str()?;
    let over = match kind {
        "succeeded" | "dead" => true,
        "started" | "failed" => false,
        _ => return None,
    };
    let outcome = json!({
        "outcome": kind,
        "id": id,
        "tick": tick,
        "attempt": event.get("attempt"),
        "at": event.get("at"),
        "error": event.get("error"),
    });
    Some((schedule.to_string(), id.to_string(), tick, over, outcome))
}

/// The outcomes consumer, as a supervised loop (`outcomes`) on a
/// connection of its own.
pub(crate) struct Outcomes {
    /// Where the events are.
    pub(crate) broker: Broker,
    /// The namespace's names.
    pub(crate) names: Names,
    /// Where outcomes are recorded.
    pub(crate) store: ScheduleStore,
}

impl Supervised for Outcomes {
    type Conn = lapin::Connection;
    type Error = lapin::Error;

    fn name(&self) -> &'static str {
        "outcomes"
    }

    fn restart(&self) -> Restart {
        Restart::Reconnect("schedule outcomes consumer")
    }

    async fn connect(&mut self, cancel: &CancellationToken) -> Option<lapin::Connection> {
        connect_with_retry(&self.broker, "kairos-scheduler-outcomes", cancel).await
    }

    /// Consumes until `cancel` (then `Ok`), or until the broker cancels
    /// the consumer (also `Ok`, before shutdown: the supervisor reports
    /// it and declares and consumes again).
    async fn session(
        &mut self,
        conn: &mut lapin::Connection,
        cancel: &CancellationToken,
    ) -> lapin::Result<()> {
        consume(conn, &self.names, &self.store, cancel).await
    }

    async fn close(&mut self, conn: lapin::Connection, _failed: bool) {
        close_connection(&conn, "outcomes", CLOSE_WITHIN).await;
    }
}

/// The outcomes queue's arguments: capped at [`MAX_BACKLOG`] events, the
/// oldest dropped first (the default overflow, which quorum queues support
/// too). In quorum mode a quorum queue, like every durable queue of the
/// namespace, with the delivery limit and no dead-letter exchange: an event
/// that kills the scheduler every time is dropped after the limit (its
/// outcome stays unknown, as without events) instead of looping.
pub(crate) fn queue_arguments(names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(MAX_BACKLOG));
    if names.mode() == kairos_shared::queue_mode::QueueMode::Quorum {
        args.insert(
            "x-queue-type".into(),
            kairos_shared::contract::text("quorum"),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(kairos_shared::queue_mode::DELIVERY_LIMIT),
        );
    }
    args
}

async fn consume(
    conn: &lapin::Connection,
    names: &Names,
    store: &ScheduleStore,
    cancel: &CancellationToken,
) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    topology::declare_base(&ch, names).await?;
    let queue = queue_short(names);
    ch.queue_declare(
        queue.clone(),
        QueueDeclareOptions::durable(),
        queue_arguments(names),
    )
    .await?;
    for key in ["task.started", "task.succeeded", "task.failed", "task.dead"] {
        ch.queue_bind(
            queue.clone(),
            names.short_events(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Grows while Redis keeps failing (at maxmemory the outcome write is
    // refused on every try).
    let mut backoff = Backoff::new();
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => {
                // Close the channel before the connection goes, so its
                // consumer ends cleanly.
                let _ = ch.close(REPLY_SUCCESS, "shutdown".into()).await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let Some(first) = first else {
            return Ok(()); // cancelled by the broker: declare and consume again
        };
        // Take what is already there too: one ack (multiple) per batch keeps
        // this consumer cheap next to the task traffic it watches.
        let mut batch = vec![first?];
        // An ended consumer shows on the next `next()`.
        kairos_shared::amqp::take_ready(&mut consumer, &mut batch, BATCH)?;
        let mut failed = false;
        for delivery in &batch {
            let event: Option<Value> = serde_json::from_slice(&delivery.data).ok();
            let Some((schedule, task_id, tick, over, outcome)) = event.as_ref().and_then(interpret)
            else {
                continue;
            };
            if let Err(err) = store
                .record_outcome(&schedule, &task_id, tick, over, &outcome)
                .await
            {
                tracing::warn!(cause = %err, "schedule outcomes: Redis failed");
                failed = true;
                break;
            }
        }
        let Some(last) = batch.last() else { continue };
        if failed {
            // Leave the batch for another try (or another scheduler);
            // recording an outcome twice is harmless.
            last.acker
                .nack(BasicNackOptions {
                    multiple: true,
                    requeue: true,
                })
                .await?;
            sleep_or_cancel(backoff.next_delay(), cancel).await;
        } else {
            backoff.reset();
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_schedule_events_count() {
        let e = json!({"event":"succeeded","id":"rep@1000","name":"x","queue":"default","attempt":1,"at":1010,"due_at":1000,"error":null});
        let (s, id, tick, over, o) = interpret(&e).unwrap();
        assert_eq!(
            (s.as_str(), id.as_str(), tick, over),
            ("rep", "rep@1000", 1000, true)
        );
        assert_eq!(o["outcome"], "succeeded");
        let started = json!({"event":"started","id":"rep@1000"});
        assert!(!interpret(&started).unwrap().3);
        assert!(interpret(&json!({"event":"succeeded","id":"plain"})).is_none());
        assert!(interpret(&json!({"event":"published","id":"rep@1"})).is_none());
    }
}
