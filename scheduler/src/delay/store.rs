//! The sharded Redis delay queue.
//!
//! Each shard's keys share one Redis Cluster hash tag, so every script
//! touches a single slot:
//!
//! * `NS:dq{S}:idx:B` (B in 0..2039): small sorted sets, member -> due time
//!   (Unix ms, Redis clock), the bucket chosen by a hash of the member
//! * `NS:dq{S}:idx`: sorted set, bucket -> its earliest due time
//! * `NS:dq{S}:idx:near`: sorted set, member -> due time, for tasks due
//!   within 10 s of being added (a claim takes a batch of them at once)
//! * `NS:dq{S}:rec`: hash, member -> stored record ([`kairos_shared::record`])
//! * `NS:dq{S}:lease`: sorted set, member -> lease expiry, for claimed tasks
//!   on their way to RabbitMQ
//!
//! The due times are split into buckets for memory: a sorted set of at most
//! 128 members is stored as one compact listpack (about 50 bytes a member
//! here, against 145 in one big sorted set), and a million pending tasks
//! leave about 60 in each of a shard's buckets. `scripts/due_index.lua`
//! holds the index logic and is prepended to every script that uses it.
//!
//! A member is the task id for a first attempt and `id\tN` for attempt N, so
//! a retry never collides with the id of the attempt being published, while a
//! repeated retry of the same attempt collapses into one. Every instance may
//! serve every shard: the claim is one atomic script, so two instances never
//! claim the same task.

use crate::redis_io::conn::RedisConn;
use deadpool_redis::Pool;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, ServerErrorKind, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use thiserror::Error;

/// A script that uses the due index: `scripts/due_index.lua` + its own file,
/// after a flags line when one is given.
macro_rules! indexed_script {
    ($file:literal) => {
        indexed_script!("", $file)
    };
    ($flags:literal, $file:literal) => {
        LazyLock::new(|| {
            redis::Script::new(concat!(
                $flags,
                include_str!("../redis_io/scripts/due_index.lua"),
                include_str!($file)
            ))
        })
    };
}
pub(crate) use indexed_script;

// Redis 7 script flags, `allow-oom`: the script runs even when Redis is at maxmemory
// (with `noeviction`, every other write is refused then). Claim, complete
// and release are what frees memory: they must never be refused. A
// script without flags that adds memory (schedule) is refused at its first
// write, before it changed anything, and intake returns the batch.
// (`concat!` takes only literals: hence the line repeated below.)
static SCHEDULE: LazyLock<redis::Script> = indexed_script!("../redis_io/scripts/schedule.lua");
static CLAIM: LazyLock<redis::Script> =
    indexed_script!("#!lua flags=allow-oom\n", "../redis_io/scripts/claim.lua");
static COMPLETE: LazyLock<redis::Script> = indexed_script!(
    "#!lua flags=allow-oom\n",
    "../redis_io/scripts/complete.lua"
);
static RELEASE: LazyLock<redis::Script> =
    indexed_script!("#!lua flags=allow-oom\n", "../redis_io/scripts/release.lua");

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("unexpected reply from a delay-queue script: {0}")]
    Reply(String),
    #[error("{0}")]
    Config(String),
    #[error("only {acked} of the {wanted} Redis replicas asked for (KAIROS_REDIS_WAIT) confirmed the write")]
    NotReplicated { acked: i64, wanted: u16 },
}

impl QueueError {
    /// The call may or may not have run: no reply came (timeout, broken
    /// connection). An error Redis replied with means it did not run.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            QueueError::Redis(e) => crate::redis_io::conn::no_reply(e),
            _ => false,
        }
    }
}

/// What [`RedisDelayQueue::hold`] did.
#[derive(Clone, Debug)]
pub struct Held {
    pub scheduled: Vec<Scheduled>,
    /// The replicas asked for confirmed the write (always true without a
    /// replica wait).
    pub replicated: bool,
    /// Replicas that confirmed (None without a replica wait).
    pub acked: Option<i64>,
}

/// One task to hold.
#[derive(Clone, Debug)]
pub struct Entry {
    pub member: String,
    /// Absolute due time; `None` means `delay_ms` after Redis's now.
    pub run_at: Option<i64>,
    pub delay_ms: i64,
    pub record: Vec<u8>,
}

/// What happened to one [`Entry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// False when the member was already waiting (first submission wins).
    pub added: bool,
    pub due: i64,
    /// It became its shard's earliest task: a sleeping pump must wake.
    pub head: bool,
}

/// A task claimed for publishing.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub shard: usize,
    pub member: String,
    pub due: i64,
    pub record: Vec<u8>,
}

impl Claimed {
    /// The task id (the member without its attempt suffix).
    pub fn id(&self) -> &str {
        id_of(&self.member)
    }
}

/// The task id in a member (`id` or `id\tN`).
pub fn id_of(member: &str) -> &str {
    member.split('\t').next().unwrap_or(member)
}

/// The result of one claim round over every shard.
#[derive(Clone, Debug, Default)]
pub struct Claim {
    /// Redis's clock when the claim ran (ms).
    pub now: i64,
    /// The same reading in microseconds: due times are mapped onto this
    /// host's clock from it (whole milliseconds made every timer up to a
    /// millisecond late).
    pub now_us: i64,
    /// Earliest due time still waiting in any shard.
    pub next_due: Option<i64>,
    pub tasks: Vec<Claimed>,
    /// Some shard returned a full batch: more may be due already.
    pub more: bool,
}

/// The member under which a task's attempt is held.
pub fn member(id: &str, attempt: u32) -> String {
    if attempt <= 1 {
        id.to_string()
    } else {
        format!("{id}\t{attempt}")
    }
}

/// FNV-1a: a stable hash, so every instance maps an id to the same shard.
pub fn shard_of(id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

#[derive(Clone, Debug)]
struct ShardKeys {
    due: String,
    rec: String,
    lease: String,
    /// The single due sorted set of versions before the index; claims
    /// drain it into the index.
    legacy_due: String,
    /// This queue's last claim in the shard (`claim.lua`).
    claim: String,
}

#[derive(Clone)]
pub struct RedisDelayQueue {
    redis: RedisConn,
    shards: Vec<ShardKeys>,
    wake_channel: String,
    meta_key: String,
    /// Claims answered so far: a claim sent again with the same round after
    /// a lost reply gets the tasks the first one leased.
    claim_round: Arc<AtomicU64>,
    /// `KAIROS_REDIS_WAIT`: replicas that must confirm a hold, and how long
    /// one `WAIT` blocks.
    replica_wait: Option<(u16, Duration)>,
    /// The reply timeout of a hold: the connection's, plus the `WAIT`.
    hold_timeout: Option<Duration>,
}

impl RedisDelayQueue {
    pub fn new(pool: Pool, namespace: &str, shards: usize) -> Self {
        // Names this queue's claims: every process (and every queue a test
        // makes) claims under its own.
        let claimer = format!("{:016x}", rand::random::<u64>());
        let keys = (0..shards)
            .map(|s| ShardKeys {
                due: format!("{namespace}:dq{{{s}}}:idx"),
                rec: format!("{namespace}:dq{{{s}}}:rec"),
                lease: format!("{namespace}:dq{{{s}}}:lease"),
                legacy_due: format!("{namespace}:dq{{{s}}}:due"),
                claim: format!("{namespace}:dq{{{s}}}:claim:{claimer}"),
            })
            .collect();
        RedisDelayQueue {
            redis: RedisConn::new(pool),
            shards: keys,
            wake_channel: format!("{namespace}:dq:wake"),
            meta_key: format!("{namespace}:dq:shards"),
            claim_round: Arc::default(),
            replica_wait: None,
            hold_timeout: None,
        }
    }

    /// Holds are confirmed by `replicas` Redis replicas (`WAIT`, blocking
    /// up to `wait` each time) before [`hold`](Self::hold) says so; 0
    /// replicas: no wait. `reply_timeout` is the pool's reply timeout: a
    /// hold's reply may come that much after the `WAIT` ends.
    pub fn with_replica_wait(
        mut self,
        replicas: u16,
        wait: Duration,
        reply_timeout: Duration,
    ) -> Self {
        self.replica_wait = (replicas > 0).then_some((replicas, wait));
        self.hold_timeout = self.replica_wait.map(|_| reply_timeout + wait);
        self
    }

    /// The queue's Redis connection.
    pub fn redis(&self) -> &RedisConn {
        &self.redis
    }

    /// The same queue over a connection of its own (see
    /// [`RedisConn::separate`]).
    pub fn with_own_connection(&self) -> Self {
        RedisDelayQueue {
            redis: self.redis.separate(),
            ..self.clone()
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn wake_channel(&self) -> &str {
        &self.wake_channel
    }

    /// The due index and record hash of a shard: schedules keep their own keys
    /// under the same hash tag, so one script can write an occurrence.
    pub fn shard_data_keys(&self, shard: usize) -> Option<(&str, &str)> {
        self.shards
            .get(shard)
            .map(|k| (k.due.as_str(), k.rec.as_str()))
    }

    /// Records the shard count on first start and refuses a different one
    /// later: instances that disagree would map ids to different shards and
    /// leave some shards unserved.
    pub async fn check_shard_count(&self) -> Result<(), QueueError> {
        let mut con = self.redis.get().await?;
        let n = self.shards.len();
        // Read first: a SETNX is refused when Redis is at maxmemory, even
        // when the key is there, and a scheduler (re)started then must still
        // run: its claims are what frees memory.
        let found: Option<usize> = self.redis.watch(
            redis::cmd("GET")
                .arg(&self.meta_key)
                .query_async(&mut con)
                .await,
        )?;
        let stored = match found {
            Some(stored) => stored,
            None => self.redis.watch(
                redis::pipe()
                    .cmd("SETNX")
                    .arg(&self.meta_key)
                    .arg(n)
                    .ignore()
                    .cmd("GET")
                    .arg(&self.meta_key)
                    .query_async::<(usize,)>(&mut con)
                    .await
                    .map(|(stored,)| stored),
            )?,
        };
        if stored != n {
            return Err(QueueError::Config(format!(
                "KAIROS_SHARDS is {n} but this namespace's delay queue was created with {stored} shards; every scheduler must use {stored}"
            )));
        }
        Ok(self.redis.watch(load_scripts(&mut con).await)?)
    }

    /// Holds the entries (see [`hold`](Self::hold)); fails when the
    /// replicas asked for did not confirm.
    pub async fn schedule(&self, entries: &[Entry]) -> Result<Vec<Scheduled>, QueueError> {
        let held = self.hold(entries).await?;
        match (held.replicated, self.replica_wait) {
            (false, Some((wanted, _))) => Err(QueueError::NotReplicated {
                acked: held.acked.unwrap_or(0),
                wanted,
            }),
            _ => Ok(held.scheduled),
        }
    }

    /// Holds the entries, one pipelined round trip for the whole batch,
    /// and with a replica wait, ends the pipeline with `WAIT` on the same
    /// connection: it covers every write this connection made. A hold
    /// repeated (after a lost reply, or because replicas lagged) is a no-op
    /// for entries already held, except that with a replica wait it rewrites
    /// their record unchanged, so that this connection's `WAIT` covers them
    /// even when the first write went through another connection.
    pub async fn hold(&self, entries: &[Entry]) -> Result<Held, QueueError> {
        if entries.is_empty() {
            return Ok(Held {
                scheduled: Vec::new(),
                replicated: true,
                acked: None,
            });
        }
        let touch = if self.replica_wait.is_some() { "1" } else { "" };
        let mut pipe = redis::pipe();
        for e in entries {
            let keys = &self.shards[self.shard_for(&e.member)];
            pipe.add_command(evalsha(&SCHEDULE, &[&keys.due, &keys.rec]))
                .arg(&e.member)
                .arg(e.run_at.map(|t| t.to_string()).unwrap_or_default())
                .arg(e.delay_ms)
                .arg(&e.record[..])
                .arg(&self.wake_channel)
                .arg(touch);
        }
        if let Some((replicas, timeout)) = self.replica_wait {
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis() as u64);
        }
        let mut replies: Vec<Value> = query_scripts_within(
            &self.redis,
            &pipe,
            &[&SCHEDULE, &CLAIM, &COMPLETE, &RELEASE],
            self.hold_timeout,
        )
        .await?;
        let acked = match self.replica_wait {
            Some(_) => Some(int(replies.pop())?),
            None => None,
        };
        let scheduled = replies
            .into_iter()
            .map(|r| {
                let mut it = match r {
                    Value::Array(items) => items.into_iter(),
                    other => return Err(QueueError::Reply(format!("{other:?}"))),
                };
                Ok(Scheduled {
                    added: int(it.next())? == 1,
                    due: int(it.next())?,
                    head: int(it.next())? == 1,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let replicated = match (self.replica_wait, acked) {
            (Some((wanted, _)), Some(n)) => n >= i64::from(wanted),
            _ => true,
        };
        Ok(Held {
            scheduled,
            replicated,
            acked,
        })
    }

    /// Claims up to `batch` tasks from every shard (one round trip): those
    /// due now, and those due within `ahead_ms` after now.
    pub async fn claim(
        &self,
        batch: usize,
        lease_ms: u64,
        ahead_ms: u64,
    ) -> Result<Claim, QueueError> {
        self.claim_bounded(batch, usize::MAX, lease_ms, ahead_ms)
            .await
    }

    /// [`claim`](Self::claim), and each shard stops once its records sum
    /// to `batch_bytes` (it always takes its first): the pump's memory is
    /// bounded by bytes as well as by count.
    pub async fn claim_bounded(
        &self,
        batch: usize,
        batch_bytes: usize,
        lease_ms: u64,
        ahead_ms: u64,
    ) -> Result<Claim, QueueError> {
        // Until a claim is answered, every claim repeats its round: one
        // that ran without its reply reaching us is answered by the next.
        let round = self.claim_round.load(Ordering::Relaxed);
        let mut pipe = redis::pipe();
        for keys in &self.shards {
            let keys = [
                &keys.due,
                &keys.rec,
                &keys.lease,
                &keys.legacy_due,
                &keys.claim,
            ];
            pipe.add_command(evalsha(&CLAIM, &keys.map(String::as_str)))
                .arg(batch)
                .arg(lease_ms)
                .arg(ahead_ms)
                .arg(round)
                .arg(batch_bytes.max(1));
        }
        let replies: Vec<Vec<Value>> = self.query(&pipe).await?;
        self.claim_round.store(round + 1, Ordering::Relaxed);
        let mut claim = Claim::default();
        for (shard, reply) in replies.into_iter().enumerate() {
            let mut it = reply.into_iter();
            let now_us = int(it.next())?;
            let next = int(it.next())?;
            claim.now_us = claim.now_us.max(now_us);
            if next >= 0 {
                claim.next_due = Some(claim.next_due.map_or(next, |n: i64| n.min(next)));
            }
            let before = claim.tasks.len();
            while let Some(m) = it.next() {
                let member = string(Some(m))?;
                let due = int(it.next())?;
                let record = bytes(it.next())?;
                claim.tasks.push(Claimed {
                    shard,
                    member,
                    due,
                    record,
                });
            }
            if claim.tasks.len() - before >= batch {
                claim.more = true;
            }
        }
        claim.now = claim.now_us.div_euclid(1000);
        Ok(claim)
    }

    /// Forgets tasks whose publish the broker confirmed.
    pub async fn complete(&self, done: &[&Claimed]) -> Result<(), QueueError> {
        self.complete_as(done, "0").await
    }

    /// [`complete`](Self::complete) again after a call whose outcome is
    /// unknown: forgets only tasks still leased, as the first call may have
    /// run and the id been submitted anew since.
    pub async fn complete_again(&self, done: &[&Claimed]) -> Result<(), QueueError> {
        self.complete_as(done, "1").await
    }

    async fn complete_as(&self, done: &[&Claimed], again: &str) -> Result<(), QueueError> {
        self.per_shard(&COMPLETE, done, &[again.to_string()], |c, cmd| {
            cmd.arg(&c.member);
        })
        .await
    }

    /// Puts tasks whose publish failed back into the due index at once.
    pub async fn release(&self, failed: &[&Claimed]) -> Result<(), QueueError> {
        self.release_after(failed, 0).await
    }

    /// Puts tasks back into the due index, due no sooner than `delay_ms`
    /// from now by Redis's clock (their own due time if later): for
    /// publishes the broker refused, which would be refused again at once.
    pub async fn release_after(
        &self,
        failed: &[&Claimed],
        delay_ms: u64,
    ) -> Result<(), QueueError> {
        self.per_shard(&RELEASE, failed, &[delay_ms.to_string()], |c, cmd| {
            cmd.arg(&c.member).arg(c.due);
        })
        .await
    }

    async fn per_shard(
        &self,
        script: &redis::Script,
        items: &[&Claimed],
        lead: &[String],
        add: impl Fn(&Claimed, &mut redis::Cmd),
    ) -> Result<(), QueueError> {
        let mut by_shard: Vec<Vec<&Claimed>> = vec![Vec::new(); self.shards.len()];
        for c in items {
            by_shard[c.shard].push(c);
        }
        let mut pipe = redis::pipe();
        for (shard, group) in by_shard.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let keys = &self.shards[shard];
            let mut cmd = evalsha(script, &[&keys.due, &keys.rec, &keys.lease]);
            for a in lead {
                cmd.arg(a);
            }
            for c in group {
                add(c, &mut cmd);
            }
            pipe.add_command(cmd);
        }
        if pipe.is_empty() {
            return Ok(());
        }
        let _: Vec<Value> = self.query(&pipe).await?;
        Ok(())
    }

    /// Tasks waiting or leased, over all shards.
    pub async fn pending(&self) -> Result<u64, QueueError> {
        let mut pipe = redis::pipe();
        for keys in &self.shards {
            pipe.cmd("HLEN").arg(&keys.rec);
        }
        let counts: Vec<u64> = self.query(&pipe).await?;
        Ok(counts.into_iter().sum())
    }

    fn shard_for(&self, member: &str) -> usize {
        // Shard by task id, not member, so all attempts of a task share one.
        shard_of(id_of(member), self.shards.len())
    }

    /// Runs a pipeline of this queue's scripts (see [`query_scripts`]).
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, QueueError> {
        query_scripts_within(
            &self.redis,
            pipe,
            &[&SCHEDULE, &CLAIM, &COMPLETE, &RELEASE],
            None,
        )
        .await
    }
}

/// Runs a pipeline of `EVALSHA`s, loading `scripts` and trying once more if
/// Redis lost them (restart, SCRIPT FLUSH). Every Kairos script is safe to
/// run twice.
pub(crate) async fn query_scripts<T: redis::FromRedisValue>(
    redis: &RedisConn,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> Result<T, QueueError> {
    query_scripts_within(redis, pipe, scripts, None).await
}

/// [`query_scripts`], waiting `timeout` for the reply instead of the
/// connection's own timeout when given.
async fn query_scripts_within<T: redis::FromRedisValue>(
    redis: &RedisConn,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
    timeout: Option<Duration>,
) -> Result<T, QueueError> {
    let mut con = redis.get().await?;
    if let Some(t) = timeout {
        // This handle's own setting: other clones keep theirs.
        con.set_response_timeout(t);
    }
    let reply = async {
        match pipe.query_async(&mut con).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                for s in scripts {
                    s.load_async(&mut con).await?;
                }
                pipe.query_async(&mut con).await
            }
            other => other,
        }
    };
    Ok(redis.watch(reply.await)?)
}

pub(crate) fn evalsha(script: &redis::Script, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    cmd
}

async fn load_scripts(con: &mut MultiplexedConnection) -> redis::RedisResult<()> {
    for s in [&*SCHEDULE, &*CLAIM, &*COMPLETE, &*RELEASE] {
        s.load_async(con).await?;
    }
    Ok(())
}

pub(crate) fn int(v: Option<Value>) -> Result<i64, QueueError> {
    match v {
        Some(Value::Int(n)) => Ok(n),
        other => Err(QueueError::Reply(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

pub(crate) fn bytes(v: Option<Value>) -> Result<Vec<u8>, QueueError> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        other => Err(QueueError::Reply(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

pub(crate) fn string(v: Option<Value>) -> Result<String, QueueError> {
    String::from_utf8(bytes(v)?).map_err(|e| QueueError::Reply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_separate_attempts() {
        assert_eq!(member("a", 1), "a");
        assert_eq!(member("a", 3), "a\t3");
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("task-1", 8), shard_of("task-1", 8));
        let mut seen = [0usize; 8];
        for i in 0..8000 {
            seen[shard_of(&format!("task-{i}"), 8)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
    }
}
