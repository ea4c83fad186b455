//! Reading task statuses, and the writes a caller must know are durable
//! (checkpoints, results, progress from the HTTP API).

use super::keys::{ShardCount, StatusKeys};
use super::script::{checkpoint_command, merge_command, run};
use super::update::{StatusUpdate, TaskState};
use crate::redis::RedisConn;
use base64::Engine;
use serde::Serialize;
use std::collections::HashMap;

/// Why a status call failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Redis returned an error, or no reply came.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be had from the pool.
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// A cursor that this API did not hand out.
    #[error("not a cursor of this list: {0:?}")]
    BadCursor(String),
}

/// A task's status as the API shows it: absent fields are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TaskStatus {
    /// The task id.
    pub id: String,
    /// Where it is.
    pub state: Option<TaskState>,
    /// The task name.
    pub name: Option<String>,
    /// The logical queue.
    pub queue: Option<String>,
    /// The AMQP priority.
    pub priority: Option<u8>,
    /// The current (or last) attempt, from 1.
    pub attempt: Option<u32>,
    /// When the current attempt is or was due, Unix ms.
    pub due_at: Option<i64>,
    /// When the scheduler took it in, Unix ms.
    pub enqueued_at: Option<i64>,
    /// When the last attempt started, Unix ms.
    pub started_at: Option<i64>,
    /// When it finished, Unix ms.
    pub finished_at: Option<i64>,
    /// The last error.
    pub error: Option<String>,
    /// The worker that ran the last attempt.
    pub worker: Option<String>,
    /// The schedule that fired it.
    pub schedule_id: Option<String>,
    /// Progress the handler reported, 0 to 100.
    pub progress: Option<u8>,
    /// The message that came with it.
    pub progress_message: Option<String>,
    /// The handler's result: the JSON value, or `{"base64": ...}` for
    /// bytes. Left out of lists.
    #[serde(skip_serializing_if = "is_omitted")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub result: ResultField,
    /// The last change, Unix ms (Redis's clock).
    pub updated_at: Option<i64>,
}

/// A result as shown, or left out (lists).
#[derive(Clone, Debug, PartialEq, Default)]
pub enum ResultField {
    /// Not asked for.
    #[default]
    Omitted,
    /// Asked for: the value or null.
    Shown(Option<serde_json::Value>),
}

fn is_omitted(r: &ResultField) -> bool {
    matches!(r, ResultField::Omitted)
}

impl Serialize for ResultField {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ResultField::Shown(Some(v)) => v.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

/// A handler's result, as stored.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskResultValue {
    /// A JSON value.
    Json(serde_json::Value),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl TaskResultValue {
    /// The fields it is stored in: `result`, `result_type`.
    pub fn fields(&self) -> [(&'static str, Vec<u8>); 2] {
        match self {
            TaskResultValue::Json(v) => [
                ("result", serde_json::to_vec(v).unwrap_or_default()),
                ("result_type", b"json".to_vec()),
            ],
            TaskResultValue::Bytes(b) => {
                [("result", b.clone()), ("result_type", b"bytes".to_vec())]
            }
        }
    }
}

impl TaskStatus {
    /// The status of `id` from its hash's fields; `with_result` decodes
    /// the result.
    fn from_fields(id: &str, mut f: HashMap<String, Vec<u8>>, with_result: bool) -> Self {
        let mut text = |name: &str| {
            f.remove(name)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let state = text("state").and_then(|s| TaskState::parse(&s));
        let name = text("name");
        let queue = text("queue");
        let priority = text("priority").and_then(|s| s.parse().ok());
        let attempt = text("attempt").and_then(|s| s.parse().ok());
        let due_at = text("due_at").and_then(|s| s.parse().ok());
        let enqueued_at = text("enqueued_at").and_then(|s| s.parse().ok());
        let started_at = text("started_at").and_then(|s| s.parse().ok());
        let finished_at = text("finished_at").and_then(|s| s.parse().ok());
        let error = text("error");
        let worker = text("worker");
        let schedule_id = text("schedule_id");
        let progress = text("progress").and_then(|s| s.parse().ok());
        let progress_message = text("progress_message").filter(|m| !m.is_empty());
        let updated_at = text("updated_at").and_then(|s| s.parse().ok());
        let kind = text("result_type");
        let result = if with_result {
            ResultField::Shown(
                f.remove("result")
                    .map(|r| decode_result(kind.as_deref(), r)),
            )
        } else {
            ResultField::Omitted
        };
        TaskStatus {
            id: id.to_string(),
            state,
            name,
            queue,
            priority,
            attempt,
            due_at,
            enqueued_at,
            started_at,
            finished_at,
            error,
            worker,
            schedule_id,
            progress,
            progress_message,
            result,
            updated_at,
        }
    }
}

/// A stored result as JSON: the value itself when it was JSON, else
/// `{"base64": ...}`.
fn decode_result(kind: Option<&str>, raw: Vec<u8>) -> serde_json::Value {
    if kind == Some("json") {
        if let Ok(v) = serde_json::from_slice(&raw) {
            return v;
        }
    }
    serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(raw) })
}

/// Which tasks a list shows.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only this logical queue.
    pub queue: Option<String>,
    /// Only this task name.
    pub name: Option<String>,
}

impl ListFilter {
    fn keeps(&self, s: &TaskStatus) -> bool {
        self.state.is_none_or(|want| s.state == Some(want))
            && self
                .queue
                .as_ref()
                .is_none_or(|q| s.queue.as_ref() == Some(q))
            && self
                .name
                .as_ref()
                .is_none_or(|n| s.name.as_ref() == Some(n))
    }
}

/// One page of a list, newest first.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[schema(as = TaskPage)]
pub struct Page {
    /// The tasks.
    pub tasks: Vec<TaskStatus>,
    /// Where the next page starts; `None` at the end.
    pub next_cursor: Option<String>,
}

/// Entries of a shard's recent set read per round of a list.
const LIST_CHUNK: usize = 200;
/// Recent entries one list call looks at, at most: a filter that matches
/// little answers a short page with a cursor rather than scan everything.
const LIST_SCAN_MAX: usize = 10_000;

/// A position in the list: (updated ms, id), newest first.
type Position = (i64, String);

/// Reads statuses and makes the durable writes.
#[derive(Clone)]
pub struct StatusStore {
    redis: RedisConn,
    keys: StatusKeys,
    shards: ShardCount,
    ttl_s: u64,
}

impl StatusStore {
    /// The store of `namespace` on `redis`, keeping statuses `ttl_s`.
    pub fn new(redis: RedisConn, namespace: &str, shards: ShardCount, ttl_s: u64) -> Self {
        StatusStore {
            redis,
            keys: StatusKeys::new(namespace),
            shards,
            ttl_s,
        }
    }

    /// The key names of its namespace.
    pub fn keys(&self) -> &StatusKeys {
        &self.keys
    }

    /// The shard of `id`.
    pub async fn shard(&self, id: &str) -> Result<usize, StatusError> {
        let n = self.shards.get(&self.redis, &self.keys).await?;
        Ok(ShardCount::shard(id, n))
    }

    /// How long a finished status is kept (s).
    pub fn ttl_s(&self) -> u64 {
        self.ttl_s
    }

    /// The status of task `id` with its result; `None` when unknown or
    /// expired.
    pub async fn get(&self, id: &str) -> Result<Option<TaskStatus>, StatusError> {
        let shard = self.shard(id).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.keys.task(shard, id));
        let (fields,): (HashMap<String, Vec<u8>>,) = run(&self.redis, &pipe).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(TaskStatus::from_fields(id, fields, true)))
    }

    /// Merges `update` now and returns once Redis has it.
    pub async fn merge(&self, update: &StatusUpdate) -> Result<(), StatusError> {
        let shard = self.shard(&update.id).await?;
        let mut pipe = redis::pipe();
        pipe.add_command(merge_command(&self.keys, shard, self.ttl_s, &[update]))
            .ignore();
        run::<()>(&self.redis, &pipe).await
    }

    /// Stores the result of task `id` (a task without a status gets none).
    pub async fn set_result(&self, id: &str, result: &TaskResultValue) -> Result<(), StatusError> {
        let mut u = StatusUpdate::progress(id, 0, None);
        u.fields.clear();
        for (name, value) in result.fields() {
            u.set_bytes(name, value);
        }
        self.merge(&u).await
    }

    /// Stores progress of task `id`: `percent` (capped at 100), message.
    pub async fn set_progress(
        &self,
        id: &str,
        percent: u8,
        message: Option<&str>,
    ) -> Result<(), StatusError> {
        self.merge(&StatusUpdate::progress(id, percent, message))
            .await
    }

    /// Saves the checkpoint of task `id`, durable (in Redis) when this
    /// returns; it expires with the status.
    pub async fn save_checkpoint(&self, id: &str, bytes: &[u8]) -> Result<(), StatusError> {
        let shard = self.shard(id).await?;
        let mut pipe = redis::pipe();
        pipe.add_command(checkpoint_command(&self.keys, shard, self.ttl_s, id, bytes))
            .ignore();
        run::<()>(&self.redis, &pipe).await
    }

    /// The last checkpoint of task `id`.
    pub async fn load_checkpoint(&self, id: &str) -> Result<Option<Vec<u8>>, StatusError> {
        let shard = self.shard(id).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.checkpoint(shard, id));
        let (cp,): (Option<Vec<u8>>,) = run(&self.redis, &pipe).await?;
        Ok(cp)
    }

    /// Up to `limit` statuses passing `filter`, newest first, from
    /// `cursor` (a page's `next_cursor`) on. Statuses change while a
    /// client pages: a task updated meanwhile moves to the front and may
    /// be missed or shown twice.
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page, StatusError> {
        let limit = limit.max(1);
        let mut after = cursor.map(parse_cursor).transpose()?;
        let shards = self.shards.get(&self.redis, &self.keys).await?;
        let mut tasks = Vec::new();
        let mut scanned = 0;
        loop {
            let (candidates, exhausted) = self.candidates(shards, after.as_ref()).await?;
            if candidates.is_empty() {
                return Ok(Page {
                    tasks,
                    next_cursor: None,
                });
            }
            let statuses = self.load(&candidates, shards).await?;
            for (pos, status) in candidates.into_iter().zip(statuses) {
                scanned += 1;
                if let Some(s) = status.filter(|s| filter.keeps(s)) {
                    tasks.push(s);
                }
                after = Some(pos);
                if tasks.len() >= limit || scanned >= LIST_SCAN_MAX {
                    return Ok(Page {
                        tasks,
                        next_cursor: after.map(|(ms, id)| format!("{ms}:{id}")),
                    });
                }
            }
            if exhausted {
                return Ok(Page {
                    tasks,
                    next_cursor: None,
                });
            }
        }
    }

    /// The next entries after `after` over all shards, in list order, as
    /// far as every shard's read reaches; `true` when no shard has more.
    async fn candidates(
        &self,
        shards: usize,
        after: Option<&Position>,
    ) -> Result<(Vec<Position>, bool), StatusError> {
        let mut reads = Vec::with_capacity(shards);
        for shard in 0..shards {
            reads.push(self.read_shard(shard, after).await?);
        }
        Ok(merge_reads(reads))
    }

    /// Up to [`LIST_CHUNK`] entries of one shard strictly after `after`;
    /// `true` when the shard may have more.
    async fn read_shard(
        &self,
        shard: usize,
        after: Option<&Position>,
    ) -> Result<(Vec<Position>, bool), StatusError> {
        let max = after.map_or("+inf".to_string(), |(ms, _)| ms.to_string());
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("ZRANGE")
                .arg(self.keys.recent(shard))
                .arg(&max)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(offset)
                .arg(LIST_CHUNK)
                .arg("WITHSCORES");
            let (page,): (Vec<(String, f64)>,) = run(&self.redis, &pipe).await?;
            let full = page.len() >= LIST_CHUNK;
            offset += page.len();
            out.extend(
                page.into_iter()
                    .map(|(id, ms)| (ms as i64, id))
                    .filter(|p| after.is_none_or(|a| newer(a, p))),
            );
            // Entries at the cursor's own time that it already passed
            // fill a whole read only in a burst: read on.
            if !out.is_empty() || !full {
                return Ok((out, full));
            }
        }
    }

    /// The statuses at `positions` (`None` for one expired meanwhile).
    async fn load(
        &self,
        positions: &[Position],
        shards: usize,
    ) -> Result<Vec<Option<TaskStatus>>, StatusError> {
        let mut pipe = redis::pipe();
        for (_, id) in positions {
            pipe.cmd("HGETALL")
                .arg(self.keys.task(ShardCount::shard(id, shards), id));
        }
        let all: Vec<HashMap<String, Vec<u8>>> = run(&self.redis, &pipe).await?;
        Ok(positions
            .iter()
            .zip(all)
            .map(|((_, id), f)| (!f.is_empty()).then(|| TaskStatus::from_fields(id, f, false)))
            .collect())
    }
}

/// Merges the shards' reads (each newest first, and whether the shard may
/// have more) into list order, as far as every read reaches: past the
/// newest last entry of a shard with more, that shard's next entries are
/// unknown. `true` when no shard has more.
fn merge_reads(reads: Vec<(Vec<Position>, bool)>) -> (Vec<Position>, bool) {
    let mut merged = Vec::new();
    let mut frontier: Option<Position> = None;
    for (entries, more) in reads {
        if more {
            if let Some(last) = entries.last() {
                if frontier.as_ref().is_none_or(|f| newer(last, f)) {
                    frontier = Some(last.clone());
                }
            }
        }
        merged.extend(entries);
    }
    merged.sort_by(|a, b| b.cmp(a));
    let exhausted = frontier.is_none();
    if let Some(f) = frontier {
        merged.retain(|p| !newer(&f, p));
    }
    (merged, exhausted)
}

/// `p` comes after `a` in the list (older, or as old with a lower id).
fn newer(a: &Position, p: &Position) -> bool {
    p < a
}

fn parse_cursor(c: &str) -> Result<Position, StatusError> {
    let bad = || StatusError::BadCursor(c.to_string());
    let (ms, id) = c.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn a_status_reads_its_fields_and_shows_absent_ones_as_null() {
        let s = TaskStatus::from_fields(
            "a",
            fields(&[
                ("state", b"succeeded"),
                ("attempt", b"2"),
                ("rank", b"1099511627776"),
                ("result", br#"{"n":1}"#),
                ("result_type", b"json"),
            ]),
            true,
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "succeeded");
        assert_eq!(json["attempt"], 2);
        assert_eq!(json["result"]["n"], 1);
        assert!(json["worker"].is_null() && json.get("rank").is_none());
        let listed = TaskStatus::from_fields("a", fields(&[("result", b"\x00")]), false);
        assert!(serde_json::to_value(&listed)
            .unwrap()
            .get("result")
            .is_none());
        let bytes = TaskStatus::from_fields(
            "a",
            fields(&[("result", b"\x00\x01"), ("result_type", b"bytes")]),
            true,
        );
        assert_eq!(
            serde_json::to_value(&bytes).unwrap()["result"]["base64"],
            "AAE="
        );
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_cursor("12:a:b").unwrap(), (12, "a:b".to_string()));
        assert!(parse_cursor("x").is_err());
        assert!(parse_cursor("x:a").is_err());
        let (a, b) = ((5, "b".to_string()), (5, "a".to_string()));
        assert!(newer(&a, &b) && !newer(&b, &a));
        assert!(newer(&a, &(4, "z".to_string())));
    }

    #[test]
    fn merged_reads_stop_where_a_shard_with_more_was_read_to() {
        let p = |ms: i64, id: &str| (ms, id.to_string());
        // Shard 0 read to 8 and has more; shard 1 read to 5 and has more;
        // shard 2 is done.
        let (merged, done) = merge_reads(vec![
            (vec![p(10, "a"), p(8, "b")], true),
            (vec![p(9, "c"), p(5, "d")], true),
            (vec![p(7, "e"), p(1, "f")], false),
        ]);
        // Below 8 shard 0 may hold entries not read yet.
        assert_eq!(merged, vec![p(10, "a"), p(9, "c"), p(8, "b")]);
        assert!(!done);
        let (merged, done) = merge_reads(vec![(vec![p(3, "x")], false), (vec![], false)]);
        assert_eq!((merged, done), (vec![p(3, "x")], true));
    }

    #[test]
    fn filters_match_every_given_field() {
        let s = TaskStatus::from_fields(
            "a",
            fields(&[("state", b"ready"), ("queue", b"q"), ("name", b"n")]),
            false,
        );
        assert!(ListFilter::default().keeps(&s));
        let f = ListFilter {
            state: Some(TaskState::Ready),
            queue: Some("q".into()),
            name: None,
        };
        assert!(f.keeps(&s));
        let f = ListFilter {
            name: Some("other".into()),
            ..f
        };
        assert!(!f.keeps(&s));
    }
}
