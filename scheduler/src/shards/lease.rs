//! The ownership loop: every third of the shard lease, this instance
//! renews its membership (`NS:sched:members`, `own_members.lua`), computes
//! the desired owner of each shard from the live members, and runs
//! `own_shard.lua` on every shard's lease (`NS:own{S}`), pipelined: take a
//! free lease it should own, renew one it holds and should own, hand one it
//! holds to the desired owner. Then it updates the [`ShardSet`] the pump
//! and the ticker read, and wakes them when it gained a shard.
//!
//! * An instance dies: its membership and leases expire within the lease;
//!   the desired owners (computed without it) take the leases on their next
//!   round. Takeover within the lease plus one round.
//! * An instance joins: the others see it on their next round and hand it
//!   its share; each keeps serving a handed-off shard for
//!   [`HANDOFF_ROUNDS`](super::assign::HANDOFF_ROUNDS) rounds.
//! * Redis cannot be reached: the set stays as it was (claims fail anyway,
//!   and the leases of the others expire alike), so nothing stops being
//!   served because the ownership loop could not look.
//! * A graceful stop: the instance leaves the members and hands its leases
//!   to their next owners at once, rather than letting them expire.

use crate::delay::store::QueueError;
use crate::redis_io::conn::RedisConn;
use crate::redis_io::keys::Keys;
use crate::redis_io::reply::{int, ReplyError};
use crate::redis_io::scripts::{self, Script};
use crate::shards::assign::{desired_owner, sorted_members, Change, LeaseOutcome, ServeState};
use crate::shards::set::ShardSet;
use kairos_shared::amqp::sleep_or_cancel;
use redis::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rounds per lease: a lease is renewed twice before it could expire, so
/// one slow or lost round costs nothing.
const ROUNDS_PER_LEASE: u64 = 3;

/// The ownership loop of one instance; cheap to clone (a restart of the
/// loop starts from a clone, and re-learns what it holds on its first
/// round: its own leases come back as renewed).
#[derive(Clone)]
pub(crate) struct Ownership {
    redis: RedisConn,
    members_key: String,
    owner_keys: Vec<String>,
    me: String,
    lease_ms: u64,
    set: Arc<ShardSet>,
    wake: Vec<Arc<Notify>>,
}

impl Ownership {
    /// The loop of instance `me` over `shards` shards of `namespace`,
    /// updating `set`. `redis` should be a connection of its own: a round
    /// must not wait behind a long claim or schedule pipeline.
    pub(crate) fn new(
        redis: RedisConn,
        namespace: &str,
        shards: usize,
        me: String,
        lease_ms: u64,
        set: Arc<ShardSet>,
    ) -> Self {
        let keys = Keys::new(namespace);
        Ownership {
            redis,
            members_key: keys.schedulers(),
            owner_keys: (0..shards).map(|s| keys.shard_owner(s)).collect(),
            me,
            lease_ms,
            set,
            wake: Vec::new(),
        }
    }

    /// Also notifies `wake` whenever a shard is gained.
    pub(crate) fn waking(mut self, wake: Arc<Notify>) -> Self {
        self.wake.push(wake);
        self
    }

    /// This instance's id in the members and the leases.
    pub(crate) fn id(&self) -> &str {
        &self.me
    }

    /// Runs rounds until `cancel`, then leaves (see the module doc).
    pub(crate) async fn run(&self, cancel: CancellationToken) {
        let every = Duration::from_millis(self.lease_ms / ROUNDS_PER_LEASE);
        let mut state = ServeState::new(self.owner_keys.len());
        loop {
            match self.round(&mut state).await {
                Ok(change) => self.report(&state, change),
                Err(err) => {
                    tracing::warn!(cause = %err, "shard ownership round failed; serving the same shards")
                }
            }
            if !sleep_or_cancel(every, &cancel).await {
                break;
            }
        }
        // Bounded: a stop must not wait on a Redis that does not answer;
        // the leases then pass on when they expire.
        let leave = tokio::time::timeout(Duration::from_millis(self.lease_ms), self.leave());
        match leave.await {
            Ok(Ok(())) => {
                tracing::info!(instance = %self.me, "left the schedulers; shards handed off")
            }
            Ok(Err(err)) => {
                tracing::warn!(cause = %err, "cannot hand off the shards; they pass on when the leases expire")
            }
            Err(_) => tracing::warn!(
                "Redis did not answer the handoff; the shards pass on when the leases expire"
            ),
        }
        metrics::gauge!("kairos_scheduler_shards_owned").set(0.0);
    }

    /// One round: membership, then every shard's lease.
    pub(crate) async fn round(&self, state: &mut ServeState) -> Result<Change, QueueError> {
        let members = self.members(false).await?;
        let outcomes = self.leases(&members).await?;
        let change = state.apply(&outcomes);
        self.set.replace(state.serve());
        Ok(change)
    }

    fn report(&self, state: &ServeState, change: Change) {
        metrics::gauge!("kairos_scheduler_shards_owned").set(state.held_count() as f64);
        if change.rebalanced {
            metrics::counter!("kairos_scheduler_rebalances_total").increment(1);
            tracing::info!(instance = %self.me, owned = state.held_count(), serving = self.set.count(), gained = change.gained, lost = change.lost, "shards rebalanced");
        }
        if change.gained > 0 {
            for w in &self.wake {
                w.notify_one();
            }
        }
    }

    /// Leaves the members and hands every lease it holds to its next owner
    /// (among the others), or frees it when there is none.
    async fn leave(&self) -> Result<(), QueueError> {
        let others = self.members(true).await?;
        self.leases(&others).await?;
        Ok(())
    }

    /// Renews (or, `leaving`, ends) this instance's membership; the live
    /// members, sorted.
    async fn members(&self, leaving: bool) -> Result<Vec<String>, QueueError> {
        let mut cmd = Script::OwnMembers.call(&[&self.members_key]);
        cmd.arg(&self.me)
            .arg(self.lease_ms)
            .arg(if leaving { "1" } else { "0" });
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let (members,): (Vec<String>,) = scripts::run(&self.redis, &pipe, None).await?;
        Ok(sorted_members(members))
    }

    /// Runs every shard's lease script against the desired owners among
    /// `members`, in one round trip.
    async fn leases(&self, members: &[String]) -> Result<Vec<LeaseOutcome>, QueueError> {
        let mut pipe = redis::pipe();
        for (shard, key) in self.owner_keys.iter().enumerate() {
            let want = desired_owner(members, shard).unwrap_or("");
            let mut cmd = Script::OwnShard.call(&[key]);
            cmd.arg(&self.me).arg(want).arg(self.lease_ms);
            pipe.add_command(cmd);
        }
        let replies: Vec<Value> = scripts::run(&self.redis, &pipe, None).await?;
        replies
            .into_iter()
            .map(|r| {
                let code = int(r, "shard lease reply")?;
                LeaseOutcome::from_code(code).ok_or_else(|| {
                    QueueError::Decode(ReplyError::Script(format!(
                        "shard lease reply {code} is none of 0 to 4"
                    )))
                })
            })
            .collect()
    }
}

/// This instance's id: `HOST:PID:CLAIMER`, where CLAIMER is the delay
/// queue's claimer id (unique per process), so an operator reading
/// `NS:own{S}` sees which host and process serves the shard.
pub(crate) fn instance_id(claimer: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "scheduler".to_string());
    format!("{host}:{}:{claimer}", std::process::id())
}
