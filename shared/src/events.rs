//! Lifecycle events on `NS.events` (routing key `task.EVENT`).
//!
//! Emitting never waits on the broker: [`EventSink::emit`] hands the event
//! to a bounded channel and a background task publishes it on its own
//! connection. When the broker falls behind, events are dropped (and
//! counted in the log) rather than slowing tasks down: events are a view of
//! the pipeline, not part of its guarantees.

use crate::amqp::{connect_with_retry, now_ms, sleep_or_cancel, Backoff, Broker};
use crate::contract::{int_header, readable, Names, Task, H_ATTEMPT};
use crate::short::short;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::BasicProperties;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The lifecycle steps of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Scheduled,
    Published,
    Started,
    Succeeded,
    Failed,
    Retried,
    Dead,
    /// A second submission of an id already pending in the delay queue:
    /// ignored (the first wins), and reported.
    Duplicate,
}

impl EventKind {
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
        }
    }
}

/// One event, serialized exactly as the contract shows. `id` and `name` are
/// null only on a `dead` event for a message that had none readable.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    pub event: EventKind,
    pub id: Option<String>,
    pub name: Option<String>,
    pub queue: String,
    pub attempt: u32,
    pub at: i64,
    pub due_at: Option<i64>,
    pub error: Option<String>,
}

impl Event {
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
        }
    }
}

/// Cheap to clone; a disabled sink drops everything at no cost.
#[derive(Clone, Default)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
    /// The publisher task, for [`close`](Self::close).
    publisher: Option<Arc<std::sync::Mutex<Option<JoinHandle<()>>>>>,
}

const QUEUE_DEPTH: usize = 16_384;

impl EventSink {
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the publisher task when `enabled`; it stops once `cancel`
    /// fires and the queue is drained.
    pub fn start(enabled: bool, broker: &Broker, names: &Names, cancel: CancellationToken) -> Self {
        if !enabled {
            return Self::disabled();
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let publisher = tokio::spawn(publish_loop(
            broker.clone(),
            names.short_events(),
            rx,
            cancel,
        ));
        EventSink {
            tx: Some(tx),
            dropped: Arc::default(),
            publisher: Some(Arc::new(std::sync::Mutex::new(Some(publisher)))),
        }
    }

    /// Waits, at most `within`, until the events emitted so far are handed
    /// to the broker, so a process that exits after its last task does not
    /// take that task's `succeeded` with it. Call it once every other clone
    /// of the sink is gone: the publisher drains until then.
    pub async fn close(self, within: Duration) {
        let handle = self.publisher.as_ref().and_then(|p| p.lock().ok()?.take());
        drop(self);
        if let Some(handle) = handle {
            if tokio::time::timeout(within, handle).await.is_err() {
                tracing::warn!("events not all published before shutdown");
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn emit(&self, event: Event) {
        let Some(tx) = &self.tx else { return };
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
/// thread hand-off per event and, at a few thousand tasks a second, fell so
/// far behind that the queue overflowed and most events were dropped.
const PUBLISH_BATCH: usize = 256;

async fn publish_loop(
    broker: Broker,
    exchange: ShortString,
    mut rx: mpsc::Receiver<Event>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    // Events whose publish failed, sent again first after reconnecting.
    let mut pending: Vec<Event> = Vec::new();
    'connect: loop {
        let Some(conn) = connect_with_retry(&broker, "kairos-events", &cancel).await else {
            return;
        };
        let channel = match conn.create_channel().await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(cause = %err, "events: cannot open channel");
                if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        loop {
            let mut batch = std::mem::take(&mut pending);
            if batch.is_empty() && rx.recv_many(&mut batch, PUBLISH_BATCH).await == 0 {
                // Every sink is gone: close cleanly, so the broker takes
                // what was written before the process exits.
                let _ = conn.close(200, "done".into()).await;
                return;
            }
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
                    exchange.clone(),
                    key.clone(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
            });
            let results = futures_util::future::join_all(sends).await;
            let mut failure = None;
            for ((event, _, _), result) in encoded.into_iter().zip(results) {
                if let Err(err) = result {
                    failure = Some(err);
                    pending.push(event);
                }
            }
            if let Some(err) = failure {
                tracing::warn!(cause = %err, "events: publish failed; reconnecting");
                let _ = conn.close(200, "reconnect".into()).await;
                if !sleep_or_cancel(Duration::from_millis(200), &cancel).await {
                    return;
                }
                continue 'connect;
            }
        }
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
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"started","id":"0193","name":"email.send","queue":"default","attempt":1,"at":1764000000123,"due_at":1764000000100,"error":null}"#
        );
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
