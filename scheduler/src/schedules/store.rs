//! Schedules in Redis. They are sharded like the delay queue, by schedule
//! id, and each shard's schedule keys share the delay-queue shard's hash
//! tag, so one script can compare-and-set a schedule's next tick and write
//! its occurrence into the delay queue atomically, even under Redis Cluster:
//!
//! * `NS:dq{S}:sdef`: hash, id -> definition JSON ([`ScheduleSpec`])
//! * `NS:dq{S}:snext`: sorted set, id -> next tick (Unix ms); absent when
//!   paused or exhausted
//! * `NS:dq{S}:sstate`: hash, `id\tlast` last tick fired, `id\toutcome` last
//!   outcome JSON, `id\tskipped` last tick skipped for overlap, `id\trun` /
//!   `id\trun_until` the occurrence that counts as running (overlap `skip`),
//!   `id\tpending` occurrences handed to the delay queue and not yet due.
//!
//! An occurrence's task goes to the schedule's shard (not the shard of its
//! task id): the pump serves every shard, and the claimed task remembers
//! its shard, so nothing else needs to know.

use crate::delay::store::{
    bytes, evalsha, indexed_script, int, query_scripts, shard_of, string, QueueError,
    RedisDelayQueue,
};
use crate::redis_io::conn::RedisConn;
use crate::schedules::model::ScheduleSpec;
use deadpool_redis::Pool;
use redis::Value;
use serde::Serialize;
use std::sync::LazyLock;

static DUE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../redis_io/scripts/sched_due.lua")));
static FIRE: LazyLock<redis::Script> = indexed_script!("../redis_io/scripts/sched_fire.lua");
static PUT: LazyLock<redis::Script> = indexed_script!("../redis_io/scripts/sched_put.lua");
static META: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../redis_io/scripts/sched_meta.lua")));
static DEFS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../redis_io/scripts/sched_defs.lua")));
static OUTCOME: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../redis_io/scripts/sched_outcome.lua")));
static BEAT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../redis_io/scripts/sched_beat.lua")));

#[derive(Clone, Debug)]
struct Keys {
    next: String,
    def: String,
    state: String,
    due: String,
    rec: String,
}

#[derive(Clone)]
pub struct ScheduleStore {
    redis: RedisConn,
    shards: Vec<Keys>,
    wake_channel: String,
    /// `NS:sbeat`: the schedulers' shared heartbeat (`sched_beat.lua`).
    beat: String,
    /// The heartbeat's own connection: on the shared one it waited behind
    /// the ticker's pipelines, which take over a second on an overloaded
    /// machine, and a late beat reads as an outage.
    beat_conn: RedisConn,
}

/// A schedule whose next tick is near.
#[derive(Clone, Debug)]
pub struct DueItem {
    pub shard: usize,
    pub id: String,
    pub next: i64,
    /// SHA-1 (hex) of the stored definition; empty when it vanished.
    pub digest: String,
    /// The definition's bytes, when the caller did not know this digest.
    pub def: Option<Vec<u8>>,
    pub last: Option<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct DueBatch {
    /// Redis's clock (ms).
    pub now: i64,
    /// Earliest later tick in any shard.
    pub next_tick: Option<i64>,
    /// Some shard had more due than the batch: look again at once.
    pub more: bool,
    pub items: Vec<DueItem>,
}

/// One occurrence to hand to the delay queue.
#[derive(Clone, Debug)]
pub struct Occurrence {
    pub member: String,
    pub tick: i64,
    pub record: Vec<u8>,
}

/// The compare-and-set of one schedule.
#[derive(Clone, Debug)]
pub struct Fire {
    pub shard: usize,
    pub id: String,
    pub expected_next: i64,
    /// The definition's digest as read: the compare-and-set also catches a
    /// replaced or paused schedule.
    pub digest: String,
    /// The last tick fired, as read. Not sent: the script reads its own;
    /// the caller remembers what the fire leaves.
    pub last: Option<i64>,
    pub new_next: Option<i64>,
    pub overlap_skip: bool,
    pub max_run_ms: u64,
    pub occurrences: Vec<Occurrence>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fired {
    /// This instance won the compare-and-set.
    pub won: bool,
    pub enqueued: u64,
    pub skipped: u64,
}

/// A schedule as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct View {
    pub id: String,
    #[serde(flatten)]
    pub spec: serde_json::Value,
    pub next_fire_at: Option<i64>,
    pub last_fire_at: Option<i64>,
    /// From the workers' events; `null` until one arrived (or with events
    /// off).
    pub last_outcome: Option<serde_json::Value>,
    /// Last tick skipped because the previous occurrence still ran.
    pub last_skipped_at: Option<i64>,
    /// Why the ticker could not fire this definition (it stored it, but it
    /// cannot become a task): the schedule stays stopped until replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl ScheduleStore {
    pub fn new(pool: Pool, namespace: &str, queue: &RedisDelayQueue) -> Self {
        let shards = (0..queue.shard_count())
            .map(|s| {
                let (due, rec) = queue.shard_data_keys(s).unwrap_or_default();
                Keys {
                    next: format!("{namespace}:dq{{{s}}}:snext"),
                    def: format!("{namespace}:dq{{{s}}}:sdef"),
                    state: format!("{namespace}:dq{{{s}}}:sstate"),
                    due: due.to_string(),
                    rec: rec.to_string(),
                }
            })
            .collect();
        let redis = RedisConn::new(pool);
        ScheduleStore {
            beat_conn: redis.separate(),
            redis,
            shards,
            wake_channel: queue.wake_channel().to_string(),
            beat: format!("{namespace}:sbeat"),
        }
    }

    pub fn shard_of(&self, id: &str) -> usize {
        shard_of(id, self.shards.len())
    }

    fn keys(&self, shard: usize) -> [&str; 5] {
        let k = &self.shards[shard];
        [&k.next, &k.def, &k.state, &k.due, &k.rec]
    }

    /// Redis's clock, in Unix ms: all tick arithmetic uses it.
    pub async fn now(&self) -> Result<i64, QueueError> {
        let mut con = self.redis.get().await?;
        let (s, us): (i64, i64) = self
            .redis
            .watch(redis::cmd("TIME").query_async(&mut con).await)?;
        Ok(s * 1000 + us / 1000)
    }

    /// Records that a scheduler runs now. Returns the start of the current
    /// live period (Redis's clock, Unix ms): the time since which beats (of
    /// any scheduler of the namespace) came at most `gap_ms` apart. A tick
    /// due before it fell due while no scheduler ran.
    pub async fn beat(&self, gap_ms: i64) -> Result<i64, QueueError> {
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&BEAT, &[self.beat.as_str()]))
            .arg(gap_ms);
        let (since,): (i64,) = query_scripts(&self.beat_conn, &pipe, &[&BEAT]).await?;
        Ok(since)
    }

    /// Schedules due before now + `lookahead`, up to `batch` per shard, each
    /// with its definition.
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
    pub async fn due_known(
        &self,
        lookahead: i64,
        batch: usize,
        fired: impl Fn(&str, i64) -> Option<(String, Option<i64>)>,
        known: impl Fn(&str, &str) -> bool,
    ) -> Result<DueBatch, QueueError> {
        let mut pipe = redis::pipe();
        for s in 0..self.shards.len() {
            let [next, ..] = self.keys(s);
            pipe.add_command(evalsha(&DUE, &[next]))
                .arg(lookahead)
                .arg(batch);
        }
        let replies: Vec<Vec<Value>> = self.query(&pipe).await?;
        let mut out = DueBatch::default();
        let mut unread = Vec::new();
        for (shard, reply) in replies.into_iter().enumerate() {
            let mut it = reply.into_iter();
            out.now = out.now.max(int(it.next())?);
            let later = int(it.next())?;
            if later >= 0 {
                out.next_tick = Some(out.next_tick.map_or(later, |n: i64| n.min(later)));
            }
            out.more |= int(it.next())? == 1;
            while let Some(id) = it.next() {
                let id = string(Some(id))?;
                let next = int(it.next())?;
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
            .per_shard(&META, items, which, 2, |k| [k[1], k[2]])
            .await?;
        for (i, mut reply) in replies {
            items[i].digest = string(reply.next())?;
            let last = int(reply.next())?;
            items[i].last = (last >= 0).then_some(last);
        }
        Ok(())
    }

    /// Runs `script` once per shard over the ids of `items[i]`, i in
    /// `which`, in one round trip; yields each i with its part of the
    /// reply, the script's `per_id` values for that id.
    async fn per_shard<const K: usize>(
        &self,
        script: &redis::Script,
        items: &[DueItem],
        which: &[usize],
        per_id: usize,
        keys: impl Fn([&str; 5]) -> [&str; K],
    ) -> Result<Vec<(usize, std::vec::IntoIter<Value>)>, QueueError> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for &i in which {
            by_shard[items[i].shard].push(i);
        }
        let mut pipe = redis::pipe();
        let mut order = Vec::new();
        for (shard, group) in by_shard.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let mut cmd = evalsha(script, &keys(self.keys(shard)));
            for &i in group {
                cmd.arg(&items[i].id);
            }
            pipe.add_command(cmd);
            order.extend(group.iter().copied());
        }
        let replies: Vec<Vec<Value>> = self.query(&pipe).await?;
        let mut values = replies.into_iter().flatten();
        Ok(order
            .into_iter()
            .map(|i| {
                let part: Vec<Value> = values.by_ref().take(per_id).collect();
                (i, part.into_iter())
            })
            .collect())
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
        let replies = self.per_shard(&DEFS, items, which, 2, |k| [k[1]]).await?;
        for (i, mut reply) in replies {
            let digest = string(reply.next())?;
            let def = bytes(reply.next())?;
            items[i].def = (!digest.is_empty()).then_some(def);
            items[i].digest = digest;
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
        let mut pipe = redis::pipe();
        let mut order = Vec::new();
        for (shard, group) in by_shard.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let mut cmd = evalsha(&FIRE, &self.keys(shard));
            cmd.arg(&self.wake_channel).arg(group.len());
            for &i in group {
                let f = &fires[i];
                cmd.arg(&f.id)
                    .arg(f.expected_next)
                    .arg(&f.digest)
                    .arg(f.new_next.map(|n| n.to_string()).unwrap_or_default())
                    .arg(if f.overlap_skip { "1" } else { "0" })
                    .arg(f.max_run_ms)
                    .arg(f.occurrences.len());
                for o in &f.occurrences {
                    cmd.arg(&o.member).arg(o.tick).arg(&o.record[..]);
                }
            }
            pipe.add_command(cmd);
            order.extend(group.iter().copied());
        }
        let mut out = vec![
            Fired {
                won: false,
                enqueued: 0,
                skipped: 0
            };
            fires.len()
        ];
        if order.is_empty() {
            return Ok(out);
        }
        let replies: Vec<Vec<(i64, i64, i64)>> = self.query(&pipe).await?;
        for (i, (won, enqueued, skipped)) in order.into_iter().zip(replies.into_iter().flatten()) {
            out[i] = Fired {
                won: won == 1,
                enqueued: enqueued as u64,
                skipped: skipped as u64,
            };
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
        let shard = self.shard_of(id);
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&PUT, &self.keys(shard)))
            .arg(id)
            .arg(json)
            .arg(next.map(|n| n.to_string()).unwrap_or_default())
            .arg(if withdraw { "1" } else { "0" });
        let (created,): (i64,) = self.query(&pipe).await?;
        Ok(created == 1)
    }

    /// Deletes a schedule and withdraws its waiting occurrences. Returns
    /// false when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, QueueError> {
        let shard = self.shard_of(id);
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&PUT, &self.keys(shard)))
            .arg(id)
            .arg("")
            .arg("")
            .arg("1");
        let (deleted,): (i64,) = self.query(&pipe).await?;
        Ok(deleted == 1)
    }

    /// The stored definition and last fired tick.
    pub async fn get_spec(
        &self,
        id: &str,
    ) -> Result<Option<(ScheduleSpec, Option<i64>)>, QueueError> {
        let [_, def, state, ..] = self.keys(self.shard_of(id));
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(def).arg(id);
        pipe.cmd("HGET").arg(state).arg(format!("{id}\tlast"));
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
        let [next, def, state, ..] = self.keys(self.shard_of(id));
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(def).arg(id);
        pipe.cmd("ZSCORE").arg(next).arg(id);
        pipe.cmd("HMGET")
            .arg(state)
            .arg(format!("{id}\tlast"))
            .arg(format!("{id}\toutcome"))
            .arg(format!("{id}\tskipped"))
            .arg(format!("{id}\tfailed"));
        let (json, next, st): (Option<Vec<u8>>, Option<f64>, StateFields) =
            self.query(&pipe).await?;
        Ok(json.map(|j| make_view(id, &j, next.map(|n| n as i64), st)))
    }

    /// Every schedule, sorted by id.
    pub async fn list(&self) -> Result<Vec<View>, QueueError> {
        let mut pipe = redis::pipe();
        for s in 0..self.shards.len() {
            let [next, def, state, ..] = self.keys(s);
            pipe.cmd("HGETALL").arg(def);
            pipe.cmd("ZRANGE")
                .arg(next)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
            pipe.cmd("HGETALL").arg(state);
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
                    int(format!("{id}\tlast")),
                    state.get(&format!("{id}\toutcome")).cloned(),
                    int(format!("{id}\tskipped")),
                    state
                        .get(&format!("{id}\tfailed"))
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
    pub async fn mark_failed(&self, id: &str, reason: &str) -> Result<(), QueueError> {
        let [_, _, state, ..] = self.keys(self.shard_of(id));
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(state)
            .arg(format!("{id}\tfailed"))
            .arg(reason)
            .ignore();
        let () = self.query(&pipe).await?;
        Ok(())
    }

    /// Records an occurrence's outcome; `over` ends its overlap hold.
    pub async fn record_outcome(
        &self,
        schedule_id: &str,
        task_id: &str,
        tick: i64,
        over: bool,
        outcome: &serde_json::Value,
    ) -> Result<(), QueueError> {
        let [_, _, state, ..] = self.keys(self.shard_of(schedule_id));
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&OUTCOME, &[state]))
            .arg(schedule_id)
            .arg(task_id)
            .arg(tick)
            .arg(if over { "1" } else { "0" })
            .arg(outcome.to_string());
        let _: Vec<Value> = self.query(&pipe).await?;
        Ok(())
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, QueueError> {
        query_scripts(
            &self.redis,
            pipe,
            &[&DUE, &META, &DEFS, &FIRE, &PUT, &OUTCOME],
        )
        .await
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
