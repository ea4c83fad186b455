//! Schedules in Redis. They are sharded like the delay queue, by schedule
//! id, and each shard's schedule keys share the delay-queue shard's hash
//! tag (`redis_io::keys`), so one script can compare-and-set a
//! schedule's next tick and hold its occurrence in the delay queue
//! atomically, even under Redis Cluster:
//!
//! * `NS:dq{S}:sdef`: hash, id -> definition JSON ([`ScheduleSpec`])
//! * `NS:dq{S}:snext`: sorted set, id -> next tick (Unix ms); absent when
//!   paused or exhausted
//! * `NS:dq{S}:sstate`: hash, `id\tlast` last tick fired, `id\toutcome` last
//!   outcome JSON, `id\tskipped` last tick skipped for overlap, `id\trun` /
//!   `id\trun_until` the occurrence that counts as running (overlap `skip`),
//!   `id\tpending` occurrences handed to the delay queue and not yet due.
//!
//! The occurrences themselves are the delay queue's: the fire and put
//! scripts get the delay queue's `OccurrenceHold` for the shard and hold or
//! withdraw them through the delay queue's Lua library (see
//! [`crate::delay::store`]); nothing here names a delay-queue key.
//!
//! An occurrence's task goes to the schedule's shard (not the shard of its
//! task id): the instance that serves a schedule shard serves the delay
//! queue's shard of the same number, and the claimed task remembers its
//! shard, so nothing else needs to know.
//!
//! The ticker reads only the shards the delay queue serves (its
//! [`ShardSet`], see [`crate::shards`]); the API reads and writes all.

use crate::delay::store::{shard_of, OccurrenceHold, QueueError, RedisDelayQueue};
use crate::redis_io::conn::RedisConn;
use crate::redis_io::keys::{state_field, Keys, ScheduleShardKeys};
use crate::redis_io::schedule_calls::{
    BeatArgs, DefsArgs, DueArgs, FireArgs, MetaArgs, OutcomeArgs, PutArgs,
};
use crate::redis_io::scripts;
use crate::schedules::model::ScheduleSpec;
use crate::shards::ShardSet;
use kairos_shared::redis::RedisPool;
use redis::Value;
use serde::Serialize;
use std::sync::Arc;

/// One shard: the schedule keys and the delay queue's hold in it.
#[derive(Clone, Debug)]
struct Shard {
    keys: ScheduleShardKeys,
    hold: OccurrenceHold,
}

/// The schedules of one namespace in Redis.
#[derive(Clone)]
pub struct ScheduleStore {
    redis: RedisConn,
    shards: Vec<Shard>,
    /// The shards [`due`](Self::due) reads: the delay queue's serve set.
    serve: Arc<ShardSet>,
    /// `NS:sbeat`: the schedulers' shared heartbeat (`sched_beat.lua`).
    beat: String,
    /// The heartbeat's own connection, so that a beat never waits behind
    /// the ticker's pipelines, which can be long on an overloaded machine:
    /// a late beat reads as an outage.
    beat_conn: RedisConn,
}

/// A schedule whose next tick is near.
#[derive(Clone, Debug)]
pub struct DueItem {
    /// Its shard.
    pub shard: usize,
    /// The schedule's id.
    pub id: String,
    /// Its stored next tick (Unix ms).
    pub next: i64,
    /// SHA-1 (hex) of the stored definition; empty when it vanished.
    pub digest: String,
    /// The definition's bytes, when the caller did not know this digest.
    pub def: Option<Vec<u8>>,
    /// The last tick fired, if any.
    pub last: Option<i64>,
}

/// What [`ScheduleStore::due`] found over the shards served.
#[derive(Clone, Debug, Default)]
pub struct DueBatch {
    /// Redis's clock (ms).
    pub now: i64,
    /// Earliest later tick in any shard.
    pub next_tick: Option<i64>,
    /// Some shard had more due than the batch: look again at once.
    pub more: bool,
    /// The schedules due, shard by shard.
    pub items: Vec<DueItem>,
}

/// One occurrence to hand to the delay queue.
#[derive(Clone, Debug)]
pub struct Occurrence {
    /// The delay-queue member (the occurrence's task id).
    pub member: String,
    /// Its tick: the time it falls due.
    pub tick: i64,
    /// Its stored record.
    pub record: Vec<u8>,
}

/// The compare-and-set of one schedule.
#[derive(Clone, Debug)]
pub struct Fire {
    /// The schedule's shard.
    pub shard: usize,
    /// The schedule's id.
    pub id: String,
    /// The next tick as read: the compare-and-set fails if it moved.
    pub expected_next: i64,
    /// The definition's digest as read: the compare-and-set also catches a
    /// replaced or paused schedule.
    pub digest: String,
    /// The last tick fired, as read. Not sent: the script reads its own;
    /// the caller remembers what the fire leaves.
    pub last: Option<i64>,
    /// The next tick to store; `None`: no more ticks.
    pub new_next: Option<i64>,
    /// Overlap policy `skip`: a tick while an occurrence runs is skipped.
    pub overlap_skip: bool,
    /// How long an occurrence counts as running at most.
    pub max_run_ms: u64,
    /// The occurrences to hold, one per tick fired.
    pub occurrences: Vec<Occurrence>,
}

/// What one [`Fire`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fired {
    /// This instance won the compare-and-set.
    pub won: bool,
    /// Occurrences held.
    pub enqueued: u64,
    /// Ticks skipped for overlap.
    pub skipped: u64,
}

/// A schedule as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Schedule)]
pub struct View {
    /// The schedule's id.
    pub id: String,
    /// The definition, without its id, with defaults filled in.
    #[serde(flatten)]
    #[schema(value_type = ScheduleSpec)]
    pub spec: serde_json::Value,
    /// The stored next tick; `None` when paused or exhausted.
    pub next_fire_at: Option<i64>,
    /// The last tick fired.
    pub last_fire_at: Option<i64>,
    /// From the workers' events; `null` until one arrived (or with events
    /// off).
    #[schema(value_type = Option<Object>)]
    pub last_outcome: Option<serde_json::Value>,
    /// Last tick skipped because the previous occurrence still ran.
    pub last_skipped_at: Option<i64>,
    /// Why the ticker could not fire this definition (it stored it, but it
    /// cannot become a task): the schedule stays stopped until replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl ScheduleStore {
    /// The schedules of `namespace`, sharded like `queue`, whose
    /// occurrences go to `queue`.
    pub fn new(pool: impl Into<RedisPool>, namespace: &str, queue: &RedisDelayQueue) -> Self {
        let keys = Keys::new(namespace);
        let shards = (0..queue.shard_count())
            .filter_map(|s| {
                Some(Shard {
                    keys: keys.schedule_shard(s),
                    hold: queue.occurrence_hold(s)?,
                })
            })
            .collect();
        let redis = RedisConn::new(pool);
        ScheduleStore {
            beat_conn: redis.separate(),
            redis,
            shards,
            serve: queue.serve_set().clone(),
            beat: keys.schedule_beat(),
        }
    }

    /// The shard of schedule `id`.
    pub(crate) fn shard_of(&self, id: &str) -> usize {
        shard_of(id, self.shards.len())
    }

    fn keys(&self, shard: usize) -> &ScheduleShardKeys {
        &self.shards[shard].keys
    }

    /// Redis's clock, in Unix ms: all tick arithmetic uses it.
    pub async fn now(&self) -> Result<i64, QueueError> {
        let mut con = self.redis.get().await?;
        let (s, us): (i64, i64) = self
            .redis
            .watch(redis::cmd("TIME").query_async(&mut con).await)?;
        Ok(s * MS_PER_S + us / US_PER_MS)
    }

    /// Records that a scheduler runs now. Returns the start of the current
    /// live period (Redis's clock, Unix ms): the time since which beats (of
    /// any scheduler of the namespace) came at most `gap_ms` apart. A tick
    /// due before it fell due while no scheduler ran.
    pub async fn beat(&self, gap_ms: i64) -> Result<i64, QueueError> {
        let mut pipe = redis::pipe();
        pipe.add_command(
            BeatArgs {
                key: &self.beat,
                gap_ms,
            }
            .command(),
        );
        let (since,): (Value,) = scripts::run(&self.beat_conn, &pipe, None).await?;
        Ok(BeatArgs::decode(since)?)
    }

    /// Schedules due before now + `lookahead`, up to `batch` per shard
    /// served, each with its definition.
    pub async fn due(&self, lookahead: i64, batch: usize) -> Result<DueBatch, QueueError> {
        self.due_known(lookahead, batch, |_, _| None, |_, _| false)
            .await
    }

    /// Like [`due`](Self::due), for a caller that remembers what it fired
    /// and parsed. `fired(id, next)` gives the digest and last tick of a
    /// schedule whose next tick `next` this caller stored itself; the others
    /// are read. The definition is read only where `known(id, digest)` is
    /// false. A schedule that fires every second is otherwise read and sent
    /// over every second; a remembered digest that is out of date fails the
    /// compare-and-set, and the caller must then forget it.
    pub(crate) async fn due_known(
        &self,
        lookahead: i64,
        batch: usize,
        fired: impl Fn(&str, i64) -> Option<(String, Option<i64>)>,
        known: impl Fn(&str, &str) -> bool,
    ) -> Result<DueBatch, QueueError> {
        let served = self.serve.members();
        if served.is_empty() {
            return Ok(DueBatch {
                now: self.now().await?,
                ..DueBatch::default()
            });
        }
        let mut pipe = redis::pipe();
        for shard in served.iter().filter_map(|&s| self.shards.get(s)) {
            let call = DueArgs {
                keys: &shard.keys,
                lookahead_ms: lookahead,
                batch,
            };
            pipe.add_command(call.command());
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        let mut out = DueBatch::default();
        let mut unread = Vec::new();
        for (shard, reply) in served.into_iter().zip(replies) {
            let reply = DueArgs::decode(reply)?;
            out.now = out.now.max(reply.now);
            if let Some(later) = reply.later {
                out.next_tick = Some(out.next_tick.map_or(later, |n: i64| n.min(later)));
            }
            out.more |= reply.full;
            for (id, next) in reply.items {
                let (digest, last) = fired(&id, next).unwrap_or_else(|| {
                    unread.push(out.items.len());
                    (String::new(), None)
                });
                out.items.push(DueItem {
                    shard,
                    id,
                    next,
                    digest,
                    def: None,
                    last,
                });
            }
        }
        self.read_meta(&mut out.items, &unread).await?;
        let unknown: Vec<usize> = (0..out.items.len())
            .filter(|&i| {
                let item = &out.items[i];
                !item.digest.is_empty() && !known(&item.id, &item.digest)
            })
            .collect();
        self.read_definitions(&mut out.items, &unknown).await?;
        Ok(out)
    }

    /// Reads the digest and last tick of `items[i]` for each i in `which`.
    async fn read_meta(&self, items: &mut [DueItem], which: &[usize]) -> Result<(), QueueError> {
        let replies = self
            .per_shard(items, which, |keys, ids| MetaArgs { keys, ids }.command())
            .await?;
        for (group, reply) in replies {
            let values = MetaArgs::decode(reply)?;
            for (i, (digest, last)) in matched(&group, values)? {
                items[i].digest = digest;
                items[i].last = last;
            }
        }
        Ok(())
    }

    /// Runs one call per shard over the ids of `items[i]`, i in `which`, in
    /// one round trip; yields each shard's indices with its reply.
    async fn per_shard(
        &self,
        items: &[DueItem],
        which: &[usize],
        call: impl for<'a> Fn(&'a ScheduleShardKeys, Vec<&'a str>) -> redis::Cmd,
    ) -> Result<Vec<(Vec<usize>, Value)>, QueueError> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for &i in which {
            by_shard[items[i].shard].push(i);
        }
        by_shard.retain(|g| !g.is_empty());
        let mut pipe = redis::pipe();
        for group in &by_shard {
            let ids = group.iter().map(|&i| items[i].id.as_str()).collect();
            pipe.add_command(call(self.keys(items[group[0]].shard), ids));
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        Ok(by_shard.into_iter().zip(replies).collect())
    }

    /// Reads the definitions of `items[i]` for each i in `which`, with the
    /// digest they have now (which replaces the one read before: the pair
    /// must match, and a changed definition fails its compare-and-set
    /// anyway).
    async fn read_definitions(
        &self,
        items: &mut [DueItem],
        which: &[usize],
    ) -> Result<(), QueueError> {
        let replies = self
            .per_shard(items, which, |keys, ids| DefsArgs { keys, ids }.command())
            .await?;
        for (group, reply) in replies {
            let values = DefsArgs::decode(reply)?;
            for (i, (digest, def)) in matched(&group, values)? {
                items[i].def = (!digest.is_empty()).then_some(def);
                items[i].digest = digest;
            }
        }
        Ok(())
    }

    /// Compare-and-set of each schedule plus its occurrences; one script
    /// call per shard, one round trip.
    pub async fn fire(&self, fires: &[Fire]) -> Result<Vec<Fired>, QueueError> {
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for (i, f) in fires.iter().enumerate() {
            by_shard[f.shard].push(i);
        }
        by_shard.retain(|g| !g.is_empty());
        let mut out = vec![
            Fired {
                won: false,
                enqueued: 0,
                skipped: 0
            };
            fires.len()
        ];
        if by_shard.is_empty() {
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        for group in &by_shard {
            let shard = &self.shards[fires[group[0]].shard];
            let call = FireArgs {
                keys: &shard.keys,
                hold: &shard.hold,
                fires: group.iter().map(|&i| &fires[i]).collect(),
            };
            pipe.add_command(call.command());
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        for (group, reply) in by_shard.into_iter().zip(replies) {
            for (i, fired) in matched(&group, FireArgs::decode(reply)?)? {
                out[i] = fired;
            }
        }
        Ok(out)
    }

    /// Writes a definition and its next tick (`None`: paused or no more
    /// ticks). `withdraw` removes occurrences already handed to the delay
    /// queue ahead of their tick. Returns true when the id was new.
    pub async fn put(
        &self,
        spec: &ScheduleSpec,
        id: &str,
        next: Option<i64>,
        withdraw: bool,
    ) -> Result<bool, QueueError> {
        let json = serde_json::to_string(spec).map_err(|e| QueueError::Reply(e.to_string()))?;
        self.run_put(id, Some(&json), next, withdraw).await
    }

    /// Deletes a schedule and withdraws its waiting occurrences. Returns
    /// false when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, QueueError> {
        self.run_put(id, None, None, true).await
    }

    async fn run_put(
        &self,
        id: &str,
        definition: Option<&str>,
        next: Option<i64>,
        withdraw: bool,
    ) -> Result<bool, QueueError> {
        let shard = &self.shards[self.shard_of(id)];
        let mut pipe = redis::pipe();
        pipe.add_command(
            PutArgs {
                keys: &shard.keys,
                hold: &shard.hold,
                id,
                definition,
                next,
                withdraw,
            }
            .command(),
        );
        let (reply,): (Value,) = self.query(&pipe).await?;
        Ok(PutArgs::decode(reply)?)
    }

    /// The stored definition and last fired tick.
    pub(crate) async fn get_spec(
        &self,
        id: &str,
    ) -> Result<Option<(ScheduleSpec, Option<i64>)>, QueueError> {
        let keys = self.keys(self.shard_of(id));
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&keys.def).arg(id);
        pipe.cmd("HGET")
            .arg(&keys.state)
            .arg(state_field(id, "last"));
        let (json, last): (Option<Vec<u8>>, Option<i64>) = self.query(&pipe).await?;
        match json {
            None => Ok(None),
            Some(j) => {
                let spec = serde_json::from_slice(&j)
                    .map_err(|e| QueueError::Reply(format!("stored schedule {id}: {e}")))?;
                Ok(Some((spec, last)))
            }
        }
    }

    /// One schedule as the API shows it.
    pub async fn view(&self, id: &str) -> Result<Option<View>, QueueError> {
        let keys = self.keys(self.shard_of(id));
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&keys.def).arg(id);
        pipe.cmd("ZSCORE").arg(&keys.next).arg(id);
        pipe.cmd("HMGET")
            .arg(&keys.state)
            .arg(state_field(id, "last"))
            .arg(state_field(id, "outcome"))
            .arg(state_field(id, "skipped"))
            .arg(state_field(id, "failed"));
        let (json, next, st): (Option<Vec<u8>>, Option<f64>, StateFields) =
            self.query(&pipe).await?;
        Ok(json.map(|j| make_view(id, &j, next.map(|n| n as i64), st)))
    }

    /// Every schedule, sorted by id.
    pub(crate) async fn list(&self) -> Result<Vec<View>, QueueError> {
        let mut pipe = redis::pipe();
        for shard in &self.shards {
            let keys = &shard.keys;
            pipe.cmd("HGETALL").arg(&keys.def);
            pipe.cmd("ZRANGE")
                .arg(&keys.next)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
            pipe.cmd("HGETALL").arg(&keys.state);
        }
        type Shard = (
            Vec<(String, Vec<u8>)>,
            Vec<(String, f64)>,
            Vec<(String, Vec<u8>)>,
        );
        let shards: Vec<Shard> = self.query_flat(&pipe).await?;
        let mut out = Vec::new();
        for (defs, nexts, state) in shards {
            let nexts: std::collections::HashMap<String, i64> =
                nexts.into_iter().map(|(k, v)| (k, v as i64)).collect();
            let state: std::collections::HashMap<String, Vec<u8>> = state.into_iter().collect();
            let int = |k: String| {
                state
                    .get(&k)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            };
            for (id, json) in defs {
                let st = (
                    int(state_field(&id, "last")),
                    state.get(&state_field(&id, "outcome")).cloned(),
                    int(state_field(&id, "skipped")),
                    state
                        .get(&state_field(&id, "failed"))
                        .map(|v| String::from_utf8_lossy(v).into_owned()),
                );
                out.push(make_view(&id, &json, nexts.get(&id).copied(), st));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Notes that schedule `id`'s stored definition cannot fire, and why
    /// (shown by the API until the schedule is replaced or deleted).
    pub(crate) async fn mark_failed(&self, id: &str, reason: &str) -> Result<(), QueueError> {
        let keys = self.keys(self.shard_of(id));
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&keys.state)
            .arg(state_field(id, "failed"))
            .arg(reason)
            .ignore();
        let () = self.query(&pipe).await?;
        Ok(())
    }

    /// Records an occurrence's outcome; `over` ends its overlap hold.
    pub(crate) async fn record_outcome(
        &self,
        schedule_id: &str,
        task_id: &str,
        tick: i64,
        over: bool,
        outcome: &serde_json::Value,
    ) -> Result<(), QueueError> {
        let outcome = outcome.to_string();
        let mut pipe = redis::pipe();
        pipe.add_command(
            OutcomeArgs {
                keys: self.keys(self.shard_of(schedule_id)),
                schedule_id,
                task_id,
                tick,
                over,
                outcome: &outcome,
            }
            .command(),
        );
        let (reply,): (Value,) = self.query(&pipe).await?;
        OutcomeArgs::decode(reply)?;
        Ok(())
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, QueueError> {
        scripts::run(&self.redis, pipe, None).await
    }

    /// Like [`query`](Self::query), grouping replies three by three.
    async fn query_flat<A, B, C>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<(A, B, C)>, QueueError>
    where
        A: redis::FromRedisValue,
        B: redis::FromRedisValue,
        C: redis::FromRedisValue,
    {
        let values: Vec<Value> = self.query(pipe).await?;
        let mut out = Vec::with_capacity(values.len() / 3);
        let mut it = values.into_iter();
        while let (Some(a), Some(b), Some(c)) = (it.next(), it.next(), it.next()) {
            out.push((
                redis::from_redis_value(a).map_err(|e| QueueError::Reply(e.to_string()))?,
                redis::from_redis_value(b).map_err(|e| QueueError::Reply(e.to_string()))?,
                redis::from_redis_value(c).map_err(|e| QueueError::Reply(e.to_string()))?,
            ));
        }
        Ok(out)
    }
}

/// Milliseconds in a second, microseconds in a millisecond (Redis `TIME`).
const MS_PER_S: i64 = 1000;
const US_PER_MS: i64 = 1000;

/// Pairs each index of `group` with its part of a per-id reply; a reply
/// with another count of parts is an error.
fn matched<T>(group: &[usize], values: Vec<T>) -> Result<Vec<(usize, T)>, QueueError> {
    if values.len() != group.len() {
        return Err(QueueError::Reply(format!(
            "a script answered {} items for {}",
            values.len(),
            group.len()
        )));
    }
    Ok(group.iter().copied().zip(values).collect())
}

/// A schedule's state: last fired tick, last outcome JSON, last skipped
/// tick, why it cannot fire.
type StateFields = (Option<i64>, Option<Vec<u8>>, Option<i64>, Option<String>);

fn make_view(
    id: &str,
    json: &[u8],
    next: Option<i64>,
    (last, outcome, skipped, failed): StateFields,
) -> View {
    let mut spec: serde_json::Value =
        serde_json::from_slice(json).unwrap_or(serde_json::Value::Null);
    if let Some(o) = spec.as_object_mut() {
        o.remove("id");
        o.entry("enabled").or_insert(true.into());
        o.entry("timezone").or_insert("UTC".into());
    }
    View {
        id: id.to_string(),
        spec,
        next_fire_at: next,
        last_fire_at: last,
        last_outcome: outcome.and_then(|o| serde_json::from_slice(&o).ok()),
        last_skipped_at: skipped,
        failed,
    }
}
