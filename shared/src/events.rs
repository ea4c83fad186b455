//! Lifecycle events on `NS.events` (routing key `task.EVENT`).
//!
//! Emitting never waits on the broker: [`EventSink::emit`] hands the event
//! to a bounded channel and a background task publishes it on its own
//! connection. When the broker falls behind, events are dropped (and
//! counted in the log) rather than slowing tasks down: events are a view of
//! the pipeline, not part of its guarantees.

use crate::amqp::{close_connection, connect_with_retry, now_ms, Broker, CLOSE_WITHIN};
use crate::contract::{int_header, readable, Names, Task, H_ATTEMPT};
use crate::short::short;
use crate::supervise::{Restart, Supervised, Supervisor};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The lifecycle steps of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Taken into the delay queue.
    Scheduled,
    /// Published to its task queue.
    Published,
    /// A worker started an attempt.
    Started,
    /// The attempt succeeded.
    Succeeded,
    /// The attempt failed.
    Failed,
    /// A failed attempt was scheduled again.
    Retried,
    /// Dead-lettered.
    Dead,
    /// A second submission of an id already pending in the delay queue:
    /// ignored (the first wins), and reported.
    Duplicate,
    /// Cancelled: a running attempt aborted (`POST /v1/tasks/{id}/abort`),
    /// never retried.
    Cancelled,
}

impl EventKind {
    /// The name on the wire (routing key `task.NAME`, field `event`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Scheduled => "scheduled",
            EventKind::Published => "published",
            EventKind::Started => "started",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Retried => "retried",
            EventKind::Dead => "dead",
            EventKind::Duplicate => "duplicate",
            EventKind::Cancelled => "cancelled",
        }
    }
}

/// One event, serialized exactly as the contract shows. `id` and `name` are
/// null only on a `dead` event for a message that had none readable.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// The lifecycle step.
    pub event: EventKind,
    /// The task's id.
    pub id: Option<String>,
    /// The task's name (its handler).
    pub name: Option<String>,
    /// The logical queue.
    pub queue: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// When it happened, Unix ms.
    pub at: i64,
    /// When the task is or was due, Unix ms.
    pub due_at: Option<i64>,
    /// Why an attempt failed or a task died.
    pub error: Option<String>,
    /// The worker that emitted it (`KAIROS_WORKER_ID`): on every event a
    /// worker publishes, absent from the scheduler's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl Event {
    /// The event `kind` of `task`, now.
    pub fn for_task(
        kind: EventKind,
        task: &Task,
        due_at: Option<i64>,
        error: Option<String>,
    ) -> Self {
        Event {
            event: kind,
            id: Some(task.id.clone()),
            name: Some(task.name.clone()),
            queue: task.queue.clone(),
            attempt: task.attempt,
            at: now_ms(),
            due_at: due_at.or(task.run_at),
            error,
            worker: None,
        }
    }

    /// An event for a message that is not a task (it could not be
    /// decoded): named by what of it is readable, so that a client can
    /// still match the `dead` event to what it sent.
    pub fn for_message(
        kind: EventKind,
        properties: &BasicProperties,
        queue: &str,
        error: Option<String>,
    ) -> Self {
        let attempt = properties
            .headers()
            .as_ref()
            .and_then(|h| int_header(h, H_ATTEMPT).ok().flatten())
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .unwrap_or(1);
        Event {
            event: kind,
            id: readable(properties.message_id()),
            name: readable(properties.kind()),
            queue: queue.to_string(),
            attempt,
            at: now_ms(),
            due_at: None,
            error,
            worker: None,
        }
    }
}

/// Where events are emitted. Cheap to clone; a disabled sink drops
/// everything at no cost.
#[derive(Clone, Default)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
    /// Holds the publisher loop, for [`close`](Self::close). Apart from the
    /// process's other background work: the publisher drains until the
    /// loops that emit events have stopped, so it is waited for after them.
    publisher: TaskTracker,
    /// Stamped on every event as `worker` ([`with_worker`](Self::with_worker)).
    worker: Option<Arc<str>>,
}

/// Events the sink holds for the publisher before it drops new ones.
const QUEUE_DEPTH: usize = 16_384;

impl EventSink {
    /// A sink that drops everything (`KAIROS_EVENTS=false`).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the publisher loop when `enabled`, supervised as `events`
    /// under `work`'s health and shutdown; after shutdown it still drains
    /// what was emitted until every clone of the sink is gone.
    pub fn start(enabled: bool, broker: &Broker, names: &Names, work: &Supervisor) -> Self {
        if !enabled {
            return Self::disabled();
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let publisher = Publisher {
            broker: broker.clone(),
            exchange: names.short_events(),
            rx,
            pending: Vec::new(),
            done: false,
        };
        let (tracker, work) = (TaskTracker::new(), work.clone());
        tracker.spawn(async move { work.run(publisher).await });
        tracker.close();
        EventSink {
            tx: Some(tx),
            dropped: Arc::default(),
            publisher: tracker,
            worker: None,
        }
    }

    /// This sink, stamping `worker` on every event it emits: a worker's
    /// events say which process ran the attempt, so that events from a
    /// fleet of workers on one queue can be told apart.
    pub fn with_worker(mut self, worker: &str) -> Self {
        self.worker = Some(Arc::from(worker));
        self
    }

    /// Waits, at most `within`, until the events emitted so far are handed
    /// to the broker, so a process that exits after its last task does not
    /// take that task's `succeeded` with it. Call it once every other clone
    /// of the sink is gone: the publisher drains until then.
    pub async fn close(self, within: Duration) {
        let publisher = self.publisher.clone();
        drop(self);
        if tokio::time::timeout(within, publisher.wait())
            .await
            .is_err()
        {
            tracing::warn!("events not all published before shutdown");
        }
    }

    /// Whether events are published at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands `event` to the publisher, or drops it (counted in the log)
    /// when the publisher is behind.
    pub fn emit(&self, mut event: Event) {
        let Some(tx) = &self.tx else { return };
        if let Some(worker) = &self.worker {
            event.worker = Some(worker.to_string());
        }
        if tx.try_send(event).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "event queue full; dropping events");
            }
        }
    }

    /// Shorthand for [`Event::for_task`] + [`emit`](Self::emit); builds
    /// nothing when events are off.
    pub fn task(&self, kind: EventKind, task: &Task, due_at: Option<i64>, error: Option<&str>) {
        if self.enabled() {
            self.emit(Event::for_task(
                kind,
                task,
                due_at,
                error.map(str::to_string),
            ));
        }
    }
}

impl EventSink {
    /// Shorthand for [`Event::for_message`] + [`emit`](Self::emit): the
    /// `dead` event of a message that never became a task.
    pub fn message(&self, kind: EventKind, properties: &BasicProperties, queue: &str, error: &str) {
        if self.enabled() {
            self.emit(Event::for_message(
                kind,
                properties,
                queue,
                Some(error.to_string()),
            ));
        }
    }
}

/// Events handed to lapin together: each `basic_publish` resolves only once
/// lapin's I/O thread wrote it, so publishing one event at a time costs a
/// thread hand-off per event and cannot keep up with a few thousand tasks a
/// second.
const PUBLISH_BATCH: usize = 256;

/// AMQP delivery mode 2: the broker writes the event to disk.
const PERSISTENT: u8 = 2;

/// The publisher loop: takes events off the sink's channel and publishes
/// them on a connection of its own.
struct Publisher {
    broker: Broker,
    exchange: ShortString,
    rx: mpsc::Receiver<Event>,
    /// Events whose publish failed, sent again first after reconnecting.
    pending: Vec<Event>,
    /// Every sink is gone and everything was handed to the broker.
    done: bool,
}

impl Supervised for Publisher {
    type Conn = Connection;
    type Error = lapin::Error;

    fn name(&self) -> &'static str {
        "events"
    }

    fn restart(&self) -> Restart {
        Restart::Reconnect("events publisher")
    }

    async fn connect(&mut self, cancel: &CancellationToken) -> Option<Connection> {
        connect_with_retry(&self.broker, "kairos-events", cancel).await
    }

    /// Publishes until every sink is gone (then `Ok`, [`finished`]) or a
    /// publish fails. It does not stop on shutdown: what was emitted
    /// before is still published.
    ///
    /// [`finished`]: Supervised::finished
    async fn session(&mut self, conn: &mut Connection, _: &CancellationToken) -> lapin::Result<()> {
        let channel = conn.create_channel().await?;
        loop {
            let mut batch = std::mem::take(&mut self.pending);
            if batch.is_empty() && self.rx.recv_many(&mut batch, PUBLISH_BATCH).await == 0 {
                self.done = true;
                return Ok(());
            }
            self.publish(&channel, batch).await?;
        }
    }

    /// Closes cleanly, so the broker takes what was written before the
    /// process exits.
    async fn close(&mut self, conn: Connection, failed: bool) {
        let reason = if failed { "reconnect" } else { "done" };
        close_connection(&conn, reason, CLOSE_WITHIN).await;
    }

    fn finished(&self) -> bool {
        self.done
    }
}

impl Publisher {
    /// Publishes `batch` together; the events whose publish failed stay
    /// pending for the next connection.
    async fn publish(&mut self, channel: &lapin::Channel, batch: Vec<Event>) -> lapin::Result<()> {
        let encoded: Vec<(Event, ShortString, Vec<u8>)> = batch
            .into_iter()
            .filter_map(|e| {
                let body = serde_json::to_vec(&e).ok()?;
                let key = short("routing key", &format!("task.{}", e.event.as_str())).ok()?;
                Some((e, key, body))
            })
            .collect();
        let sends = encoded.iter().map(|(_, key, body)| {
            channel.basic_publish(
                self.exchange.clone(),
                key.clone(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/json".into()),
            )
        });
        let results = futures_util::future::join_all(sends).await;
        let mut failure = None;
        for ((event, _, _), result) in encoded.into_iter().zip(results) {
            if let Err(err) = result {
                failure = Some(err);
                self.pending.push(event);
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_matches_the_contract() {
        let e = Event {
            event: EventKind::Started,
            id: Some("0193".into()),
            name: Some("email.send".into()),
            queue: "default".into(),
            attempt: 1,
            at: 1_764_000_000_123,
            due_at: Some(1_764_000_000_100),
            error: None,
            worker: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"started","id":"0193","name":"email.send","queue":"default","attempt":1,"at":1764000000123,"due_at":1764000000100,"error":null}"#
        );
        let from_worker = Event {
            worker: Some("host-a:41".into()),
            ..e
        };
        assert!(serde_json::to_string(&from_worker)
            .unwrap()
            .ends_with(r#""error":null,"worker":"host-a:41"}"#));
    }

    #[tokio::test]
    async fn a_worker_sink_stamps_every_event() {
        let (tx, mut rx) = mpsc::channel(4);
        let sink = EventSink {
            tx: Some(tx),
            ..EventSink::default()
        }
        .with_worker("w-1");
        let task = Task::decode(
            "default",
            &BasicProperties::default()
                .with_message_id("t-1".into())
                .with_type("kairos.noop".into()),
            b"{}",
        )
        .unwrap();
        sink.task(EventKind::Started, &task, None, None);
        sink.message(EventKind::Dead, &BasicProperties::default(), "q", "bad");
        for _ in 0..2 {
            assert_eq!(rx.recv().await.unwrap().worker.as_deref(), Some("w-1"));
        }
    }

    #[test]
    fn an_undecodable_message_is_named_by_what_is_readable() {
        let mut h = lapin::types::FieldTable::default();
        h.insert(H_ATTEMPT.into(), lapin::types::AMQPValue::LongLongInt(3));
        let p = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("a\u{FFFD}".into())
            .with_headers(h);
        let e = Event::for_message(EventKind::Dead, &p, "default", Some("bad".into()));
        assert_eq!(e.id.as_deref(), Some("m-1"));
        assert_eq!(e.name, None, "a name that was not UTF-8 is not shown");
        assert_eq!((e.queue.as_str(), e.attempt), ("default", 3));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["name"], serde_json::Value::Null);
        assert_eq!(json["error"], "bad");
        let bare = Event::for_message(EventKind::Dead, &BasicProperties::default(), "q", None);
        assert_eq!((bare.id, bare.attempt), (None, 1));
    }
}
