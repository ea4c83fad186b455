//! `GET /v1/events`: the lifecycle events of `NS.events` as Server-Sent
//! Events (docs/HTTP.md), for the dashboard and `kairosctl tail`.
//!
//! Each client gets a queue of its own: server-named, exclusive and
//! auto-delete, on a channel of its own over one connection the streams
//! share. Dropping the stream (the client went away, noticed at the next
//! write, a keep-alive at the latest) drops the consumer
//! and the channel, which cancels the consumer and closes the channel; the
//! broker then deletes the auto-delete queue. The stream only carries what
//! other processes publish: events must be on (`KAIROS_EVENTS=true`) in the
//! scheduler and workers that publish them.

use super::json_error;
use super::openapi::ErrorBody;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use kairos_shared::admin::listen_to_events_with;
use kairos_shared::amqp::{connect_to, Broker};
use kairos_shared::contract::Names;
use kairos_shared::events::EventKind;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, Consumer};
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Streams open at once; one more is answered 503, so clients cannot use
/// up the broker's channels.
pub(crate) const MAX_EVENT_STREAMS: usize = 64;

/// Deliveries the broker sends a stream ahead of its acks. A client that
/// reads slowly stops the acks, so what waits for it stays in its queue.
const EVENT_PREFETCH: u16 = 100;

/// Events a stream's queue keeps for a client that reads slower than they
/// come; past it the oldest are dropped (`x-overflow: drop-head`), so a
/// stalled client cannot grow the broker's memory without bound.
const EVENT_BACKLOG: i64 = 10_000;

/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The longest opening a stream waits for the broker before answering 503.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Every event kind a client can ask for, with its routing key
/// `task.NAME`.
const KINDS: [EventKind; 9] = [
    EventKind::Scheduled,
    EventKind::Published,
    EventKind::Started,
    EventKind::Succeeded,
    EventKind::Failed,
    EventKind::Retried,
    EventKind::Dead,
    EventKind::Duplicate,
    EventKind::Cancelled,
];

/// Shared by the streams: the broker, one connection (made on first use,
/// made again once it failed) and the slots for open streams.
#[derive(Clone)]
pub(crate) struct EventStreams {
    broker: Broker,
    names: Names,
    conn: Arc<Mutex<Option<Connection>>>,
    slots: Arc<Semaphore>,
    /// The scheduler's shutdown: it ends every stream, since the HTTP
    /// server's graceful shutdown waits for open responses to finish.
    shutdown: CancellationToken,
}

impl EventStreams {
    /// Streams of the events of namespace `names` on `broker`, ended
    /// by `shutdown`.
    pub(crate) fn new(broker: Broker, names: Names, shutdown: CancellationToken) -> Self {
        EventStreams {
            broker,
            names,
            conn: Arc::new(Mutex::new(None)),
            slots: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
            shutdown,
        }
    }

    /// A channel on the shared connection, connecting first when needed.
    async fn channel(&self) -> lapin::Result<lapin::Channel> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| c.status().connected()) {
            return c.create_channel().await;
        }
        let fresh = connect_to(&self.broker, "kairos-scheduler-events").await?;
        let channel = fresh.create_channel().await?;
        *conn = Some(fresh);
        Ok(channel)
    }

    /// A consumer on a new queue bound to `NS.events` for `kinds`.
    async fn open(&self, kinds: &[EventKind]) -> lapin::Result<Consumer> {
        let channel = self.channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(EVENT_BACKLOG));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("drop-head")),
        );
        let keys: Vec<String> = kinds
            .iter()
            .map(|kind| format!("task.{}", kind.as_str()))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let queue = listen_to_events_with(&channel, &self.names, &keys, args).await?;
        channel
            .basic_qos(EVENT_PREFETCH, BasicQosOptions::default())
            .await?;
        // Acked, not no-ack: with acks the prefetch bounds what the broker
        // pushes to a slow client, and the rest waits in the bounded queue.
        // The consumer holds its channel: dropping it closes both.
        channel
            .basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

/// The events route over `streams`.
pub(crate) fn router(streams: EventStreams) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(stream_events))
        .with_state(streams)
}

/// What a client asked for: exact matches on the event's fields, and the
/// event kinds (all when none).
#[derive(Debug, Default, PartialEq)]
struct Filter {
    id: Option<String>,
    name: Option<String>,
    queue: Option<String>,
    kinds: Vec<EventKind>,
}

impl Filter {
    /// The filter from the query parameters; an error names the parameter
    /// at fault.
    fn parse(params: HashMap<String, String>) -> Result<Self, (String, String)> {
        let mut filter = Filter::default();
        for (key, value) in params {
            match key.as_str() {
                "id" => filter.id = Some(value),
                "name" => filter.name = Some(value),
                "queue" => filter.queue = Some(value),
                "event" => {
                    for wanted in value.split(',').map(str::trim) {
                        let kind = KINDS
                            .into_iter()
                            .find(|k| k.as_str() == wanted)
                            .ok_or_else(|| (key.clone(), format!("unknown event {wanted:?}")))?;
                        if !filter.kinds.contains(&kind) {
                            filter.kinds.push(kind);
                        }
                    }
                }
                _ => {
                    return Err((
                        key.clone(),
                        format!("unknown parameter {key:?}: use id, name, queue or event"),
                    ))
                }
            }
        }
        if filter.kinds.is_empty() {
            filter.kinds = KINDS.to_vec();
        }
        Ok(filter)
    }

    /// Whether `event` (a published event) passes.
    fn admits(&self, event: &Value) -> bool {
        let field_is = |field: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| event.get(field).and_then(Value::as_str) == Some(w))
        };
        let kind = event.get("event").and_then(Value::as_str);
        field_is("id", &self.id)
            && field_is("name", &self.name)
            && field_is("queue", &self.queue)
            && self.kinds.iter().any(|k| Some(k.as_str()) == kind)
    }
}

/// The SSE event for a published body, or `None` when it is not an event
/// (not a JSON object with an `event` name) or the filter leaves it out.
/// The JSON is written again compactly, so it holds no line breaks.
fn to_sse(body: &[u8], filter: &Filter) -> Option<SseEvent> {
    let event: Value = serde_json::from_slice(body).ok()?;
    if !filter.admits(&event) {
        return None;
    }
    // `admits` matched the name against the known kinds: no line breaks.
    let kind = event.get("event").and_then(Value::as_str)?.to_owned();
    let data = serde_json::to_string(&event).ok()?;
    Some(SseEvent::default().event(kind).data(data))
}

/// Follows the lifecycle events live as Server-Sent Events: one SSE event
/// per published event, its `event:` the event's name and its `data:` the
/// event's JSON. Parameters combine; matches are exact.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(
        ("id" = Option<String>, Query, description = "Events of this task id"),
        ("name" = Option<String>, Query, description = "Events of tasks of this name"),
        ("queue" = Option<String>, Query, description = "Events of this logical queue"),
        ("event" = Option<String>, Query, description = "These events, comma-separated (`started,succeeded`); all when absent"),
    ),
    responses(
        (status = 200, description = "The stream; a comment line every 15 s keeps it open", content_type = "text/event-stream", body = String),
        (status = 400, description = "An unknown parameter or event name; `field` names it", body = ErrorBody),
        (status = 503, description = "Too many streams open, or the broker cannot be reached", body = ErrorBody),
    )
)]
async fn stream_events(
    State(streams): State<EventStreams>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let filter = match Filter::parse(params) {
        Ok(f) => f,
        Err((field, message)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                message,
                Some(("field", field.into())),
            )
            .into_response()
        }
    };
    let Ok(permit) = streams.slots.clone().try_acquire_owned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many event streams open (at most {MAX_EVENT_STREAMS})"),
            None,
        )
        .into_response();
    };
    let consumer = match tokio::time::timeout(OPEN_TIMEOUT, streams.open(&filter.kinds)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot open an event stream");
            return broker_unavailable(e);
        }
        Err(_) => return broker_unavailable("the broker did not answer in time"),
    };
    let stream = events(consumer, filter, permit).take_until(streams.shutdown.cancelled_owned());
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn broker_unavailable(cause: impl std::fmt::Display) -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot listen to events: {cause}"),
        None,
    )
    .into_response()
}

/// The consumer's deliveries as SSE events; ends when the consumer does
/// (the broker went away: the client reconnects). Holds `permit` for as
/// long as it lives.
fn events(
    consumer: Consumer,
    filter: Filter,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let state = (consumer, filter, permit);
    futures_util::stream::unfold(state, |(mut consumer, filter, permit)| async move {
        loop {
            let delivery = consumer.next().await?.ok()?;
            // Acked when handed to the response: the event is the client's
            // now, and the ack lets the broker send the next one.
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                tracing::debug!(error = %e, "event stream: ack failed");
                return None;
            }
            if let Some(event) = to_sse(&delivery.data, &filter) {
                return Some((Ok(event), (consumer, filter, permit)));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parse_takes_known_parameters_and_rejects_others() {
        let f =
            Filter::parse(params(&[("id", "t1"), ("event", "started, succeeded")])).expect("valid");
        assert_eq!(f.id.as_deref(), Some("t1"));
        assert_eq!(f.kinds, vec![EventKind::Started, EventKind::Succeeded]);
        assert_eq!(
            Filter::parse(params(&[])).expect("valid").kinds.len(),
            KINDS.len()
        );
        let (field, _) = Filter::parse(params(&[("ids", "x")])).expect_err("unknown");
        assert_eq!(field, "ids");
        let (field, _) = Filter::parse(params(&[("event", "started,nope")])).expect_err("kind");
        assert_eq!(field, "event");
    }

    #[test]
    fn admits_matches_exactly() {
        let f = Filter::parse(params(&[("name", "a"), ("event", "failed")])).expect("valid");
        let ev = |event: &str, name: &str| serde_json::json!({"event": event, "id": "1", "name": name, "queue": "q"});
        assert!(f.admits(&ev("failed", "a")));
        assert!(!f.admits(&ev("failed", "ab")));
        assert!(!f.admits(&ev("started", "a")));
        assert!(to_sse(b"not json", &f).is_none());
        assert!(to_sse(br#"{"event":"failed","name":"a"}"#, &f).is_some());
    }
}
