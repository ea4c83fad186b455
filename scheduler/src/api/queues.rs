//! `GET /v1/queues`: the queue overview.
//!
//! The logical queues are those in `NS:queues` (every queue a scheduler or
//! worker saw), the paused ones (`NS:paused`) and the origin queues of dead
//! letters, sorted by name, at most [`MAX_QUEUES`]. For each:
//!
//! * `ready`, `consumers`: RabbitMQ's counts for `NS.q.QUEUE` (a passive
//!   declare); a queue not declared yet is 0 and 0; in quorum mode `ready`
//!   sums the queue's priority bands and `consumers` is the most on one band;
//! * `delayed`, `due`: tasks of the queue waiting in the delay queue
//!   (`scheduled` or `retrying`), and how many of them are already due
//!   (from the task status: `NS:st{S}:wait:QUEUE` over every shard);
//! * `dead`: dead letters whose origin is the queue;
//! * `paused`;
//! * `rates`: events of the last minute (the last six 10-second buckets of
//!   `NS:rate:QUEUE`): `enqueued` (made ready in the queue by the
//!   scheduler), `succeeded`, `failed`, `dead`, and every other counter
//!   under its own name.
//!
//! And `delay_queue`: `waiting` (every task held in the delay queue,
//! schedule occurrences included) and `due` (the queues' due tasks summed).
//!
//! The work per request is bounded: one Redis pipeline, one passive
//! declare per queue (per band in quorum mode), and a scan of at most [`DEAD_SCAN`] dead letters.

use super::control::{ControlApi, ControlError};
use super::openapi::ErrorBody;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kairos_shared::contract::validate_queue;
use kairos_shared::control;
use kairos_shared::dead::DeadCounts;
use kairos_shared::status::StatusKeys;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The most queues one answer lists (the first by name).
pub(crate) const MAX_QUEUES: usize = 500;

/// The most dead letters read to count them by origin queue.
pub(crate) const DEAD_SCAN: usize = 10_000;

/// The rate counters (`NS:rate:QUEUE` fields `EVENT:B`), as the status
/// writer names them.
const RATE_EVENTS: [&str; 8] = [
    "scheduled",
    "ready",
    "started",
    "succeeded",
    "failed",
    "retried",
    "dead",
    "cancelled",
];

/// Buckets summed for a rate: six of 10 s, the last minute.
const RATE_BUCKETS: i64 = 6;
/// A bucket's length, seconds.
const BUCKET_S: i64 = 10;

/// One queue of the overview.
#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub(crate) struct QueueView {
    name: String,
    ready: u32,
    consumers: u32,
    delayed: u64,
    due: u64,
    dead: u64,
    paused: bool,
    /// Events of the last minute, by name.
    #[schema(value_type = std::collections::BTreeMap<String, u64>)]
    rates: Map<String, Value>,
}

/// The queue routes.
pub(crate) fn router(api: ControlApi) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(list_queues))
        .with_state(api)
}

/// The answer of `GET /v1/queues`.
#[derive(utoipa::ToSchema)]
// Only describes the JSON that `list_queues` builds: never constructed.
#[allow(dead_code)]
struct Overview {
    /// Every logical queue seen, sorted, at most 500.
    queues: Vec<QueueView>,
    /// `waiting`: every task held in the delay queue; `due`: the queues'
    /// `due` summed.
    #[schema(value_type = Object)]
    delay_queue: Value,
    /// `total` in `NS.dead`, how many were `counted` by queue, and whether
    /// that is all of them (`complete`).
    #[schema(value_type = Object)]
    dead_letters: Value,
}

/// The overview of every logical queue: ready and waiting tasks,
/// consumers, dead letters, pause, and the last minute's event rates.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    responses(
        (status = 200, description = "The overview", body = Overview),
        (status = 503, description = "Redis or the broker cannot be reached", body = ErrorBody),
    )
)]
async fn list_queues(State(api): State<ControlApi>) -> Result<Response, ControlError> {
    let mut pipe = redis::pipe();
    pipe.cmd("SMEMBERS")
        .arg(StatusKeys::new(api.names.namespace()).queues());
    pipe.cmd("SMEMBERS").arg(control::paused_key(&api.names));
    pipe.cmd("TIME");
    let (known, paused, time): (BTreeSet<String>, BTreeSet<String>, (i64, i64)) =
        api.redis(&pipe).await?;
    let now_ms = time.0 * 1000 + time.1 / 1000;
    let dead = count_dead(&api).await?;
    let names: Vec<String> = known
        .iter()
        .chain(&paused)
        .chain(dead.queues.keys())
        .filter(|q| validate_queue(q).is_ok())
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .take(MAX_QUEUES)
        .collect();
    let broker = broker_counts(&api, &names).await?;
    let stored = stored_counts(&api, &names, now_ms).await?;
    let queues: Vec<QueueView> = names
        .into_iter()
        .zip(broker)
        .zip(stored.queues)
        .map(
            |((name, (ready, consumers)), (delayed, due, rates))| QueueView {
                dead: dead.queues.get(&name).copied().unwrap_or(0),
                paused: paused.contains(&name),
                name,
                ready,
                consumers,
                delayed,
                due,
                rates,
            },
        )
        .collect();
    let due: u64 = queues.iter().map(|q| q.due).sum();
    Ok(Json(json!({
        "queues": queues,
        "delay_queue": {"waiting": stored.waiting, "due": due},
        "dead_letters": {
            "total": dead.total,
            "counted": dead.queues.values().sum::<u64>(),
            "complete": dead.complete,
        },
    }))
    .into_response())
}

/// `ready` and `consumers` of each queue's `NS.q.QUEUE`, by passive
/// declare. In quorum mode a queue with priority bands is three queues
/// (`NS.q.QUEUE`, `.p4`, `.p7`): `ready` is their sum, and `consumers` the
/// most any band has, since a worker consumes every band (summing would
/// count it three times). A missing queue closes the channel: it counts 0,
/// and the next queue gets a new channel.
async fn broker_counts(
    api: &ControlApi,
    names: &[String],
) -> Result<Vec<(u32, u32)>, ControlError> {
    let mut out = Vec::with_capacity(names.len());
    let mut channel = None;
    for name in names {
        let (mut ready, mut consumers) = (0u32, 0u32);
        for band in api.names.bands(name) {
            let Ok(queue) = api.names.band_queue(name, *band) else {
                continue;
            };
            let ch = match channel.take() {
                Some(ch) => ch,
                None => api.channel().await?,
            };
            let declared = ch
                .queue_declare(
                    queue,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(q) = declared {
                ready = ready.saturating_add(q.message_count());
                consumers = consumers.max(q.consumer_count());
                channel = Some(ch);
            }
        }
        out.push((ready, consumers));
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "done".into()).await;
    }
    Ok(out)
}

/// What Redis holds, per queue (waiting, due, rates) and for the whole delay
/// queue.
struct Stored {
    queues: Vec<(u64, u64, Map<String, Value>)>,
    waiting: u64,
}

/// One pipeline: per queue and shard `ZCARD` and `ZCOUNT -inf now` of
/// `NS:st{S}:wait:QUEUE`, per queue the rate buckets, per shard the delay
/// queue's records (`HLEN NS:dq{S}:rec`).
async fn stored_counts(
    api: &ControlApi,
    names: &[String],
    now_ms: i64,
) -> Result<Stored, ControlError> {
    let ns = api.names.namespace();
    let keys = StatusKeys::new(ns);
    let bucket = now_ms / 1000 / BUCKET_S;
    let fields: Vec<String> = RATE_EVENTS
        .iter()
        .flat_map(|e| (0..RATE_BUCKETS).map(move |b| format!("{e}:{}", bucket - b)))
        .collect();
    let mut pipe = redis::pipe();
    for name in names {
        for s in 0..api.shards {
            let key = keys.wait(s, name);
            pipe.cmd("ZCARD").arg(&key);
            pipe.cmd("ZCOUNT").arg(&key).arg("-inf").arg(now_ms);
        }
        pipe.cmd("HMGET")
            .arg(format!("{ns}:rate:{name}"))
            .arg(&fields);
    }
    for s in 0..api.shards {
        pipe.cmd("HLEN").arg(format!("{ns}:dq{{{s}}}:rec"));
    }
    let replies: Vec<redis::Value> = api.redis(&pipe).await?;
    let mut replies = replies.into_iter();
    let next_int = |replies: &mut std::vec::IntoIter<redis::Value>| -> u64 {
        replies
            .next()
            .and_then(|v| redis::from_redis_value::<u64>(v).ok())
            .unwrap_or(0)
    };
    let mut queues = Vec::with_capacity(names.len());
    for _ in names {
        let (mut delayed, mut due) = (0, 0);
        for _ in 0..api.shards {
            delayed += next_int(&mut replies);
            due += next_int(&mut replies);
        }
        let counts: Vec<Option<u64>> = replies
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or_default();
        queues.push((delayed, due, rates(&counts)));
    }
    let waiting = (0..api.shards).map(|_| next_int(&mut replies)).sum();
    Ok(Stored { queues, waiting })
}

/// Per-minute rates from the `HMGET` of [`RATE_EVENTS`] x buckets (in
/// that order; a missing bucket is 0).
fn rates(counts: &[Option<u64>]) -> Map<String, Value> {
    let mut by_event = BTreeMap::new();
    for (i, event) in RATE_EVENTS.iter().enumerate() {
        let from = i * RATE_BUCKETS as usize;
        let sum: u64 = counts
            .iter()
            .skip(from)
            .take(RATE_BUCKETS as usize)
            .map(|c| c.unwrap_or(0))
            .sum();
        by_event.insert(*event, sum);
    }
    let mut out = Map::new();
    out.insert("enqueued".into(), json!(by_event["ready"]));
    for (event, n) in by_event {
        out.insert(event.into(), json!(n));
    }
    out
}

/// Counts the dead letters by origin queue, reading at most [`DEAD_SCAN`]
/// (they stay in place, in order).
async fn count_dead(api: &ControlApi) -> Result<DeadCounts, ControlError> {
    let conn = api.connection().await?;
    kairos_shared::dead::count_by_queue(&conn, &api.names, DEAD_SCAN)
        .await
        .map_err(|e| ControlError::Broker(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_sum_the_buckets_per_event() {
        let mut counts = vec![None; RATE_EVENTS.len() * RATE_BUCKETS as usize];
        // ready: 2 + 3; succeeded: 4; cancelled: 1.
        counts[6] = Some(2);
        counts[11] = Some(3);
        counts[3 * 6] = Some(4);
        counts[7 * 6 + 5] = Some(1);
        let r = rates(&counts);
        assert_eq!(r["enqueued"], json!(5));
        assert_eq!(r["ready"], json!(5));
        assert_eq!(r["succeeded"], json!(4));
        assert_eq!(r["cancelled"], json!(1));
        assert_eq!(r["failed"], json!(0));
        assert_eq!(r["dead"], json!(0));
    }
}
