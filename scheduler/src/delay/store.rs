//! The sharded Redis delay queue.
//!
//! Each shard's keys (`redis_io::keys`) share one Redis Cluster
//! hash tag, so every script touches a single slot:
//!
//! * the due index `NS:dq{S}:idx` (a bucket's earliest due time) over
//!   small sorted sets `NS:dq{S}:idx:B`, member -> due time (Unix ms,
//!   Redis clock), the bucket chosen by a hash of the member, and
//!   `NS:dq{S}:idx:near`, member -> due time, for tasks due soon after
//!   being added (a claim takes a batch of them at once)
//! * `NS:dq{S}:rec`: hash, member -> stored record ([`kairos_shared::record`])
//! * `NS:dq{S}:lease`: sorted set, member -> lease expiry, for claimed tasks
//!   on their way to RabbitMQ
//!
//! The due times are split into buckets for memory: a sorted set small
//! enough for Redis's listpack encoding costs a fraction of a big one per
//! member (figures in docs/ARCHITECTURE.md). `scripts/due_index.lua` is the
//! delay queue's Lua library (the index, and holding and withdrawing a
//! task) and is prepended to every script that uses it.
//!
//! **Holding occurrences for the schedules.** A schedule's tick must fire
//! exactly once with its occurrence durable in the same atomic step, so the
//! schedule scripts hold occurrences themselves, in the delay queue's
//! shard of the same number (same hash tag). They do it only through this
//! queue's `OccurrenceHold`: its keys, which the scripts pass on untouched
//! to the library's `dq_hold` / `dq_held` / `dq_withdraw` / `dq_head`, and
//! `OccurrenceHold::push_task`, the argument encoding those functions
//! read. The schedule side never names a delay-queue key or writes a
//! record itself; the layout and the record encoding stay here and in the
//! library.
//!
//! A member is the task id for a first attempt and `id\tN` for attempt N, so
//! a retry never collides with the id of the attempt being published, while a
//! repeated retry of the same attempt collapses into one.
//!
//! **Which shards a queue claims from.** A queue claims only from the shards
//! of its serve set ([`ShardSet`], all of them unless told otherwise): the
//! scheduler's ownership loop ([`crate::shards`]) keeps it to the shards this
//! instance holds leases on. Holding writes any shard. Correctness does not
//! rest on the set: the claim is one atomic script, so two instances serving
//! one shard never claim the same task; they only both look.

use crate::redis_io::conn::RedisConn;
use crate::redis_io::delay_calls::{ClaimArgs, CompleteArgs, HoldArgs, ReleaseArgs};
use crate::redis_io::keys::{DelayShardKeys, Keys};
use crate::redis_io::reply::{int, ReplyError};
use crate::redis_io::scripts;
use crate::shards::ShardSet;
use kairos_shared::redis::RedisPool;
use redis::{RedisError, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Why a delay-queue (or schedule-store) call failed.
#[derive(Debug, Error)]
pub enum QueueError {
    /// Redis returned an error, or no reply came.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// No connection could be had from the pool.
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// A reply or stored value that could not be read.
    #[error("unexpected reply from a delay-queue script: {0}")]
    Reply(String),
    /// A script's reply did not have its documented shape.
    #[error("unexpected reply from a script: {0}")]
    Decode(#[from] ReplyError),
    /// A setting disagrees with Redis (shard count, eviction policy).
    #[error("{0}")]
    Config(String),
    /// Fewer replicas than `KAIROS_REDIS_WAIT` asks for confirmed a hold.
    #[error("only {acked} of the {wanted} Redis replicas asked for (KAIROS_REDIS_WAIT) confirmed the write")]
    NotReplicated {
        /// Replicas that confirmed.
        acked: i64,
        /// Replicas asked for.
        wanted: u16,
    },
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
    /// One per entry, in order.
    pub scheduled: Vec<Scheduled>,
    /// The replicas asked for confirmed the write (always true without a
    /// replica wait).
    pub replicated: bool,
    /// Replicas that confirmed (None without a replica wait).
    pub acked: Option<i64>,
    /// With a replica wait: the proof keys the hold wrote, one per shard
    /// it touched, for [`confirm`](RedisDelayQueue::confirm).
    pub proofs: Vec<String>,
}

/// What [`RedisDelayQueue::confirm`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaCheck {
    /// A proof key is gone: the master that took the hold failed before a
    /// replica had it, and the hold must be written again.
    pub lost: bool,
    /// The replicas asked for have every write up to the proofs.
    pub replicated: bool,
    /// Replicas that confirmed.
    pub acked: Option<i64>,
}

/// How long a hold's proof key lives: far longer than a failover takes,
/// short enough that the keys of a busy intake (one per shard and batch,
/// only with `KAIROS_REDIS_WAIT`) do not pile up. A confirmation that comes
/// later finds the proof gone and writes the hold again, which can run a
/// task a second time but never loses one.
const PROOF_TTL_MS: u64 = 300_000;

/// One task to hold.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The member it is held under (see [`member`]).
    pub member: String,
    /// Absolute due time; `None` means `delay_ms` after Redis's now.
    pub run_at: Option<i64>,
    /// The delay used without `run_at`.
    pub delay_ms: i64,
    /// The stored record ([`kairos_shared::record`]).
    pub record: Vec<u8>,
}

/// What happened to one [`Entry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// False when the member was already waiting (first submission wins).
    pub added: bool,
    /// The due time it is held at (Unix ms, Redis's clock).
    pub due: i64,
    /// It became its shard's earliest task: a sleeping pump must wake.
    pub head: bool,
}

/// A task claimed for publishing.
#[derive(Clone, Debug)]
pub struct Claimed {
    /// The shard it was claimed from.
    pub shard: usize,
    /// The member it was held under.
    pub member: String,
    /// Its due time (Unix ms, Redis's clock).
    pub due: i64,
    /// Its stored record.
    pub record: Vec<u8>,
}

impl Claimed {
    /// The task id (the member without its attempt suffix).
    pub fn id(&self) -> &str {
        id_of(&self.member)
    }
}

/// The task id in a member (`id` or `id\tN`).
pub(crate) fn id_of(member: &str) -> &str {
    member.split('\t').next().unwrap_or(member)
}

/// The result of one claim round over the shards served.
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
    /// The tasks claimed, shard by shard.
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

/// Microseconds in a millisecond (a claim reports Redis's clock in µs).
const US_PER_MS: i64 = 1000;

/// The shard of a task id (FNV-1a; shared with the task status).
pub(crate) use kairos_shared::redis::shard_of;

/// What a script of another feature needs to hold tasks in one delay-queue
/// shard atomically with its own writes (see the module doc). The script
/// takes [`keys`](Self::keys) after its own keys and hands them to the delay
/// queue's Lua library unchanged.
#[derive(Clone, Debug)]
pub(crate) struct OccurrenceHold {
    idx: String,
    rec: String,
    wake_channel: String,
}

impl OccurrenceHold {
    /// The hold of the shard with `keys`, waking pumps on `wake_channel`.
    pub(crate) fn new(keys: &DelayShardKeys, wake_channel: &str) -> Self {
        OccurrenceHold {
            idx: keys.idx.clone(),
            rec: keys.rec.clone(),
            wake_channel: wake_channel.to_string(),
        }
    }

    /// The shard's keys for the library's hold functions, in the order they
    /// take them (due index, records).
    pub(crate) fn keys(&self) -> [&str; 2] {
        [&self.idx, &self.rec]
    }

    /// The channel to publish a new earliest due time on.
    pub(crate) fn wake_channel(&self) -> &str {
        &self.wake_channel
    }

    /// Appends one task to hold, as `dq_hold` reads it: member, due time,
    /// record.
    pub(crate) fn push_task(cmd: &mut redis::Cmd, member: &str, due: i64, record: &[u8]) {
        cmd.arg(member).arg(due).arg(record);
    }
}

/// The Redis delay queue of one namespace.
#[derive(Clone)]
pub struct RedisDelayQueue {
    redis: RedisConn,
    shards: Vec<DelayShardKeys>,
    /// This process's claimer id (in the claim keys' names).
    claimer: Arc<str>,
    /// The shards claims take from (see the module doc).
    serve: Arc<ShardSet>,
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
    /// The queue of `namespace` over `shards` shards, on `pool`.
    pub fn new(pool: impl Into<RedisPool>, namespace: &str, shards: usize) -> Self {
        // Names this queue's claims: every process (and every queue a test
        // makes) claims under its own.
        let claimer = format!("{:016x}", rand::random::<u64>());
        let keys = Keys::new(namespace);
        RedisDelayQueue {
            redis: RedisConn::new(pool),
            shards: (0..shards).map(|s| keys.delay_shard(s, &claimer)).collect(),
            claimer: claimer.into(),
            serve: Arc::new(ShardSet::all(shards)),
            wake_channel: keys.wake_channel(),
            meta_key: keys.shard_count(),
            claim_round: Arc::default(),
            replica_wait: None,
            hold_timeout: None,
        }
    }

    /// Holds are confirmed by `replicas` Redis replicas (`WAIT`, blocking
    /// up to `wait` each time) before [`hold`](Self::hold) says so; 0
    /// replicas: no wait. `reply_timeout` is the pool's reply timeout: a
    /// hold's reply may come that much after the `WAIT` ends.
    pub(crate) fn with_replica_wait(
        mut self,
        replicas: u16,
        wait: Duration,
        reply_timeout: Duration,
    ) -> Self {
        self.replica_wait = (replicas > 0).then_some((replicas, wait));
        self.hold_timeout = self.replica_wait.map(|_| reply_timeout + wait);
        self
    }

    /// The same queue, claiming only from the shards in `serve` (kept up
    /// to date by the ownership loop); clones made after share it.
    pub(crate) fn serving(mut self, serve: Arc<ShardSet>) -> Self {
        self.serve = serve;
        self
    }

    /// The shards claims take from.
    pub(crate) fn serve_set(&self) -> &Arc<ShardSet> {
        &self.serve
    }

    /// This process's claimer id.
    pub(crate) fn claimer(&self) -> &str {
        &self.claimer
    }

    /// The queue's Redis connection.
    pub(crate) fn redis(&self) -> &RedisConn {
        &self.redis
    }

    /// The same queue over a connection of its own (see
    /// [`RedisConn::separate`]).
    pub(crate) fn with_own_connection(&self) -> Self {
        RedisDelayQueue {
            redis: self.redis.separate(),
            ..self.clone()
        }
    }

    /// The number of shards.
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The pub/sub channel on which a new earliest due time is published.
    pub(crate) fn wake_channel(&self) -> &str {
        &self.wake_channel
    }

    /// What the schedule scripts need to hold occurrences in shard `shard`
    /// (see the module doc); `None` past the last shard.
    pub(crate) fn occurrence_hold(&self, shard: usize) -> Option<OccurrenceHold> {
        self.shards
            .get(shard)
            .map(|k| OccurrenceHold::new(k, &self.wake_channel))
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
        Ok(self.redis.watch(scripts::load_all(&mut con).await)?)
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
    /// connection: it covers every write this connection made. With a
    /// replica wait the pipeline also writes a proof key per shard touched
    /// (after the holds, in the shard's slot, so on its master): while the
    /// replicas lag, [`confirm`](Self::confirm) checks the proofs are still
    /// there instead of holding again (see there why). A hold
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
                proofs: Vec::new(),
            });
        }
        let mut pipe = redis::pipe();
        let mut shards: Vec<usize> = entries.iter().map(|e| self.shard_for(&e.member)).collect();
        for e in entries {
            let call = HoldArgs {
                keys: &self.shards[self.shard_for(&e.member)],
                member: &e.member,
                run_at: e.run_at,
                delay_ms: e.delay_ms,
                record: &e.record,
                wake_channel: &self.wake_channel,
                touch: self.replica_wait.is_some(),
            };
            pipe.add_command(call.command());
        }
        let mut proofs = Vec::new();
        if let Some((replicas, timeout)) = self.replica_wait {
            shards.sort_unstable();
            shards.dedup();
            let batch = format!("{:016x}", rand::random::<u64>());
            for shard in shards {
                let key = format!("{}{batch}", self.shards[shard].proof);
                pipe.cmd("SET").arg(&key).arg(1).arg("PX").arg(PROOF_TTL_MS);
                proofs.push(key);
            }
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis() as u64);
        }
        let mut replies: Vec<Value> = scripts::run(&self.redis, &pipe, self.hold_timeout).await?;
        let acked = match self.replica_wait {
            Some(_) => Some(int(
                replies.pop().ok_or(ReplyError::Missing("WAIT reply"))?,
                "WAIT reply",
            )?),
            None => None,
        };
        // The proofs' replies (`OK`), between the holds' and the `WAIT`'s.
        // Not `ignore`d: a pipeline split per slot (a cluster) would return
        // them anyway.
        replies.truncate(entries.len());
        let scheduled = replies
            .into_iter()
            .map(HoldArgs::decode)
            .collect::<Result<Vec<_>, _>>()?;
        let replicated = match (self.replica_wait, acked) {
            (Some((wanted, _)), Some(n)) => n >= i64::from(wanted),
            _ => true,
        };
        Ok(Held {
            scheduled,
            replicated,
            acked,
            proofs,
        })
    }

    /// While the replicas have not confirmed a hold: refreshes its proofs
    /// (`PEXPIRE`, a write that reaches the replicas only when the key is
    /// there) and waits for the replicas again, one round trip.
    ///
    /// Holding again instead would put back tasks that were published and
    /// completed meanwhile, and run them again on every round (a master
    /// without a replica after a failover can take minutes to get one).
    /// The proofs say whether that is needed: a proof present on the shard's
    /// master now was written after the hold on the same master, or came
    /// to it with the hold by replication (a replica's data is a prefix of
    /// its master's), so the hold is there too and a `WAIT` covering the
    /// refresh covers the hold. A proof gone means the hold was lost in a
    /// failover (or the proof expired): then it must be written again.
    pub async fn confirm(&self, proofs: &[String]) -> Result<ReplicaCheck, QueueError> {
        let Some((replicas, timeout)) = self.replica_wait else {
            return Ok(ReplicaCheck {
                lost: false,
                replicated: true,
                acked: None,
            });
        };
        let mut pipe = redis::pipe();
        for key in proofs {
            pipe.cmd("PEXPIRE").arg(key).arg(PROOF_TTL_MS);
        }
        pipe.cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis() as u64);
        let mut replies: Vec<Value> = scripts::run(&self.redis, &pipe, self.hold_timeout).await?;
        let acked = int(
            replies.pop().ok_or(ReplyError::Missing("WAIT reply"))?,
            "WAIT reply",
        )?;
        let mut lost = replies.len() != proofs.len();
        for reply in replies {
            lost |= int(reply, "PEXPIRE reply")? != 1;
        }
        Ok(ReplicaCheck {
            lost,
            replicated: !lost && acked >= i64::from(replicas),
            acked: Some(acked),
        })
    }

    /// Claims up to `batch` tasks from every shard served (one round trip):
    /// those due now, and those due within `ahead_ms` after now.
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
        let served = self.serve.members();
        if served.is_empty() {
            // Nothing to claim from: only the clock, which the pump maps
            // due times with and sleeps from.
            let now_us = self.now_us().await?;
            return Ok(Claim {
                now_us,
                now: now_us.div_euclid(US_PER_MS),
                ..Claim::default()
            });
        }
        let mut pipe = redis::pipe();
        for keys in served.iter().filter_map(|&s| self.shards.get(s)) {
            let call = ClaimArgs {
                keys,
                batch,
                lease_ms,
                ahead_ms,
                round,
                batch_bytes,
            };
            pipe.add_command(call.command());
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        self.claim_round.store(round + 1, Ordering::Relaxed);
        let mut claim = Claim::default();
        for (shard, reply) in served.into_iter().zip(replies) {
            let reply = ClaimArgs::decode(reply)?;
            claim.now_us = claim.now_us.max(reply.now_us);
            if let Some(head) = reply.head {
                claim.next_due = Some(claim.next_due.map_or(head, |n: i64| n.min(head)));
            }
            if reply.tasks.len() >= batch {
                claim.more = true;
            }
            claim.tasks.extend(reply.tasks.into_iter().map(|t| Claimed {
                shard,
                member: t.member,
                due: t.due,
                record: t.record,
            }));
        }
        claim.now = claim.now_us.div_euclid(US_PER_MS);
        Ok(claim)
    }

    /// Forgets tasks whose publish the broker confirmed.
    pub async fn complete(&self, done: &[&Claimed]) -> Result<(), QueueError> {
        self.complete_as(done, false).await
    }

    /// [`complete`](Self::complete) again after a call whose outcome is
    /// unknown: forgets only tasks still leased, as the first call may have
    /// run and the id been submitted anew since.
    pub async fn complete_again(&self, done: &[&Claimed]) -> Result<(), QueueError> {
        self.complete_as(done, true).await
    }

    async fn complete_as(&self, done: &[&Claimed], again: bool) -> Result<(), QueueError> {
        let pipe = self.per_shard(done, |keys, group| {
            CompleteArgs {
                keys,
                again,
                members: group.iter().map(|c| c.member.as_str()).collect(),
            }
            .command()
        });
        self.run_counted(pipe, CompleteArgs::decode).await
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
        let pipe = self.per_shard(failed, |keys, group| {
            ReleaseArgs {
                keys,
                delay_ms,
                tasks: group.iter().map(|c| (c.member.as_str(), c.due)).collect(),
            }
            .command()
        });
        self.run_counted(pipe, ReleaseArgs::decode).await
    }

    /// A pipeline of one call per shard that has items, built by `call`.
    fn per_shard(
        &self,
        items: &[&Claimed],
        call: impl Fn(&DelayShardKeys, &[&Claimed]) -> redis::Cmd,
    ) -> redis::Pipeline {
        let mut by_shard: Vec<Vec<&Claimed>> = vec![Vec::new(); self.shards.len()];
        for c in items {
            by_shard[c.shard].push(c);
        }
        let mut pipe = redis::pipe();
        for (keys, group) in self.shards.iter().zip(&by_shard) {
            if !group.is_empty() {
                pipe.add_command(call(keys, group));
            }
        }
        pipe
    }

    /// Runs a pipeline of calls whose replies are counts, checking each.
    async fn run_counted(
        &self,
        pipe: redis::Pipeline,
        decode: fn(Value) -> Result<i64, ReplyError>,
    ) -> Result<(), QueueError> {
        if pipe.is_empty() {
            return Ok(());
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        for reply in replies {
            decode(reply)?;
        }
        Ok(())
    }

    /// Redis's clock in microseconds.
    async fn now_us(&self) -> Result<i64, QueueError> {
        let mut con = self.redis.get().await?;
        let (s, us): (i64, i64) = self
            .redis
            .watch(redis::cmd("TIME").query_async(&mut con).await)?;
        Ok(s * 1_000_000 + us)
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

    /// Runs a pipeline of this queue's scripts (see [`scripts::run`]).
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, QueueError> {
        scripts::run(&self.redis, pipe, None).await
    }
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
