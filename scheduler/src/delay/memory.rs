//! An in-memory [`DelayStore`] with the Redis store's semantics, for tests:
//! first submission wins, due order, claims into a lease bounded by count
//! and bytes, expired leases returned by the next claim, complete and
//! release (with a delay) as `complete.lua` and `release.lua` do them.
//!
//! Its clock is this host's wall clock plus an offset a test moves forward
//! ([`MemoryDelayStore::advance`]), so leases expire without waiting.
//! Faults can be injected per operation ([`MemoryDelayStore::inject`]):
//! a refusal (Redis replied with an error, nothing ran) or a lost reply
//! (the operation ran, the caller cannot know).

use crate::delay::ports::DelayStore;
use crate::delay::store::{
    id_of, shard_of, Claim, Claimed, Entry, Held, QueueError, ReplicaCheck, Scheduled,
};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// Microseconds in a millisecond: claims report their time in both.
const US_PER_MS: i64 = 1_000;

/// A store operation a fault can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`DelayStore::hold`].
    Hold,
    /// [`DelayStore::claim_bounded`].
    Claim,
    /// [`DelayStore::complete`] and [`DelayStore::complete_again`].
    Complete,
    /// [`DelayStore::release`] and [`DelayStore::release_after`].
    Release,
}

/// How an injected fault fails its operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Redis answered with an error: the operation did not run.
    Refused,
    /// The operation ran but its reply was lost (a timeout): the error says
    /// the outcome is unknown.
    LostReply,
}

/// One shard: records, the due index (ordered by due time, then member)
/// and the lease set.
#[derive(Default)]
struct Shard {
    records: HashMap<String, Vec<u8>>,
    due: BTreeSet<(i64, String)>,
    due_of: HashMap<String, i64>,
    leases: HashMap<String, i64>,
}

impl Shard {
    fn add_due(&mut self, member: &str, due: i64) {
        if let Some(old) = self.due_of.insert(member.to_string(), due) {
            self.due.remove(&(old, member.to_string()));
        }
        self.due.insert((due, member.to_string()));
    }

    fn remove_due(&mut self, member: &str) {
        if let Some(old) = self.due_of.remove(member) {
            self.due.remove(&(old, member.to_string()));
        }
    }

    fn head(&self) -> Option<i64> {
        self.due.first().map(|(due, _)| *due)
    }

    /// Leases that expired by `now` go back to the due index, due now
    /// (at most `batch` of them, as `claim.lua` does).
    fn expire_leases(&mut self, now: i64, batch: usize) {
        let mut expired: Vec<(i64, String)> = self
            .leases
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(m, until)| (*until, m.clone()))
            .collect();
        expired.sort();
        for (_, member) in expired.into_iter().take(batch) {
            self.leases.remove(&member);
            self.add_due(&member, now);
        }
    }

    /// Takes up to `batch` tasks due by `until`, stopping once their records
    /// reach `budget` bytes (always taking the first), and leases them.
    fn take(
        &mut self,
        shard: usize,
        until: i64,
        batch: usize,
        budget: usize,
        lease_until: i64,
    ) -> Vec<Claimed> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < batch && bytes < budget {
            let Some((due, member)) = self.due.first().cloned() else {
                break;
            };
            if due > until {
                break;
            }
            self.remove_due(&member);
            let Some(record) = self.records.get(&member) else {
                // Completed meanwhile: nothing left to publish.
                continue;
            };
            bytes += record.len();
            self.leases.insert(member.clone(), lease_until);
            out.push(Claimed {
                shard,
                member,
                due,
                record: record.clone(),
            });
        }
        out
    }
}

struct State {
    shards: Vec<Shard>,
    /// Added to the wall clock: how far a test moved time forward.
    offset_ms: i64,
    faults: VecDeque<(Op, Fault)>,
}

/// The in-memory delay store; clones share one store.
#[derive(Clone)]
pub struct MemoryDelayStore {
    state: Arc<Mutex<State>>,
    /// Bumped on every change, so a test awaits a state instead of polling.
    changes: Arc<watch::Sender<u64>>,
}

impl MemoryDelayStore {
    /// An empty store over `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        let shards = (0..shards.max(1)).map(|_| Shard::default()).collect();
        MemoryDelayStore {
            state: Arc::new(Mutex::new(State {
                shards,
                offset_ms: 0,
                faults: VecDeque::new(),
            })),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// Moves the store's clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.lock().offset_ms += ms;
        self.changed();
    }

    /// The store's clock (Unix ms).
    pub fn now_ms(&self) -> i64 {
        self.lock().now_us() / US_PER_MS
    }

    /// Fails the next call of `op` with `fault`; faults queue up in order.
    pub fn inject(&self, op: Op, fault: Fault) {
        self.lock().faults.push_back((op, fault));
    }

    /// Tasks waiting or leased.
    pub fn len(&self) -> usize {
        self.lock().shards.iter().map(|s| s.records.len()).sum()
    }

    /// Whether no task waits or is leased.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tasks currently leased.
    pub fn leased(&self) -> usize {
        self.lock().shards.iter().map(|s| s.leases.len()).sum()
    }

    /// The record held under `member`, if any.
    pub fn record(&self, member: &str) -> Option<Vec<u8>> {
        let state = self.lock();
        let shard = shard_of(id_of(member), state.shards.len());
        state.shards[shard].records.get(member).cloned()
    }

    /// When `member` falls due, if it waits in the due index (not leased).
    pub fn due_of(&self, member: &str) -> Option<i64> {
        let state = self.lock();
        let shard = shard_of(id_of(member), state.shards.len());
        state.shards[shard].due_of.get(member).copied()
    }

    /// Waits until `ready` holds for this store (checked on every change).
    pub async fn wait_for(&self, mut ready: impl FnMut(&Self) -> bool) {
        let mut changes = self.changes.subscribe();
        while !ready(self) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs `apply` unless a fault for `op` is due; a lost reply runs it
    /// and still fails.
    fn run<T>(&self, op: Op, apply: impl FnOnce(&mut State) -> T) -> Result<T, QueueError> {
        let fault = {
            let mut state = self.lock();
            let at = state.faults.iter().position(|(o, _)| *o == op);
            at.and_then(|i| state.faults.remove(i)).map(|(_, f)| f)
        };
        let out = match fault {
            Some(Fault::Refused) => {
                return Err(QueueError::Reply(format!("injected refusal of {op:?}")))
            }
            Some(Fault::LostReply) => {
                apply(&mut self.lock());
                Err(lost_reply(op))
            }
            None => Ok(apply(&mut self.lock())),
        };
        self.changed();
        out
    }
}

/// The error of a call whose reply never came, as the Redis client reports it.
fn lost_reply(op: Op) -> QueueError {
    QueueError::Redis(redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("injected lost reply of {op:?}"),
    )))
}

impl State {
    fn now_us(&self) -> i64 {
        kairos_shared::amqp::now_ms() * US_PER_MS + self.offset_ms * US_PER_MS
    }

    fn shard_for(&self, member: &str) -> usize {
        shard_of(id_of(member), self.shards.len())
    }

    fn hold(&mut self, entries: &[Entry]) -> Vec<Scheduled> {
        let now = self.now_us() / US_PER_MS;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let due = e.run_at.unwrap_or(now + e.delay_ms);
            let shard = self.shard_for(&e.member);
            let s = &mut self.shards[shard];
            if s.records.contains_key(&e.member) {
                out.push(Scheduled {
                    added: false,
                    due,
                    head: false,
                });
                continue;
            }
            s.records.insert(e.member.clone(), e.record.clone());
            let head = s.head().is_none_or(|h| due < h);
            s.add_due(&e.member, due);
            out.push(Scheduled {
                added: true,
                due,
                head,
            });
        }
        out
    }

    fn claim(&mut self, batch: usize, batch_bytes: usize, lease_ms: u64, ahead_ms: u64) -> Claim {
        let now_us = self.now_us();
        let now = now_us.div_euclid(US_PER_MS);
        let lease_until = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        let until = now.saturating_add(i64::try_from(ahead_ms).unwrap_or(i64::MAX));
        let mut claim = Claim {
            now,
            now_us,
            ..Claim::default()
        };
        for (i, s) in self.shards.iter_mut().enumerate() {
            s.expire_leases(now, batch);
            let taken = s.take(i, until, batch, batch_bytes.max(1), lease_until);
            claim.more |= taken.len() >= batch;
            claim.tasks.extend(taken);
            if let Some(head) = s.head() {
                claim.next_due = Some(claim.next_due.map_or(head, |n| n.min(head)));
            }
        }
        claim
    }

    fn complete(&mut self, done: &[&Claimed], again: bool) {
        for c in done {
            let Some(s) = self.shards.get_mut(c.shard) else {
                continue;
            };
            let was_leased = s.leases.remove(&c.member).is_some();
            if again && !was_leased {
                // It may have been submitted anew since the first call.
                continue;
            }
            if !was_leased {
                s.remove_due(&c.member);
            }
            s.records.remove(&c.member);
        }
    }

    fn release_after(&mut self, failed: &[&Claimed], delay_ms: u64) {
        let floor = if delay_ms > 0 {
            let delay = i64::try_from(delay_ms).unwrap_or(i64::MAX);
            (self.now_us() / US_PER_MS).saturating_add(delay)
        } else {
            0
        };
        for c in failed {
            let Some(s) = self.shards.get_mut(c.shard) else {
                continue;
            };
            if s.leases.remove(&c.member).is_some() {
                s.add_due(&c.member, c.due.max(floor));
            }
        }
    }
}

impl DelayStore for MemoryDelayStore {
    fn shard_count(&self) -> usize {
        self.lock().shards.len()
    }

    async fn hold(&self, entries: &[Entry]) -> Result<Held, QueueError> {
        let scheduled = self.run(Op::Hold, |s| s.hold(entries))?;
        Ok(Held {
            scheduled,
            replicated: true,
            acked: None,
            proofs: Vec::new(),
        })
    }

    /// One process's memory has no replicas to wait for.
    async fn confirm(&self, _proofs: &[String]) -> Result<ReplicaCheck, QueueError> {
        Ok(ReplicaCheck {
            lost: false,
            replicated: true,
            acked: None,
        })
    }

    async fn claim_bounded(
        &self,
        batch: usize,
        batch_bytes: usize,
        lease_ms: u64,
        ahead_ms: u64,
    ) -> Result<Claim, QueueError> {
        self.run(Op::Claim, |s| {
            s.claim(batch, batch_bytes, lease_ms, ahead_ms)
        })
    }

    async fn complete(&self, done: &[&Claimed]) -> Result<(), QueueError> {
        self.run(Op::Complete, |s| s.complete(done, false))
    }

    async fn complete_again(&self, done: &[&Claimed]) -> Result<(), QueueError> {
        self.run(Op::Complete, |s| s.complete(done, true))
    }

    async fn release_after(&self, failed: &[&Claimed], delay_ms: u64) -> Result<(), QueueError> {
        self.run(Op::Release, |s| s.release_after(failed, delay_ms))
    }

    async fn pending(&self) -> Result<u64, QueueError> {
        Ok(self.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delay::conformance as check;
    use crate::delay::store::member;

    /// Several shards, so the checks see tasks spread over them.
    const SHARDS: usize = 4;

    fn store() -> MemoryDelayStore {
        MemoryDelayStore::new(SHARDS)
    }

    #[tokio::test]
    async fn first_submission_wins() {
        check::first_submission_wins(store()).await;
    }

    #[tokio::test]
    async fn due_times_and_head() {
        check::due_times_and_head(store()).await;
    }

    #[tokio::test]
    async fn claims_due_tasks_in_order() {
        check::claims_due_tasks_in_order(store()).await;
    }

    #[tokio::test]
    async fn claims_within_count_and_bytes() {
        check::claims_within_count_and_bytes(store()).await;
    }

    #[tokio::test]
    async fn complete_forgets() {
        check::complete_forgets(store()).await;
    }

    #[tokio::test]
    async fn release_returns_tasks() {
        check::release_returns_tasks(store()).await;
    }

    #[tokio::test]
    async fn expired_leases_return() {
        let s = store();
        let clock = s.clone();
        check::expired_leases_return(s, move |by| {
            clock.advance(by);
            std::future::ready(())
        })
        .await;
    }

    fn entry(id: &str) -> Entry {
        Entry {
            member: member(id, 1),
            run_at: None,
            delay_ms: 0,
            record: b"r".to_vec(),
        }
    }

    #[tokio::test]
    async fn a_refused_call_does_not_run() {
        let s = store();
        s.inject(Op::Hold, Fault::Refused);
        let err = s.hold(&[entry("a")]).await.expect_err("refused");
        assert!(!err.outcome_unknown(), "Redis answered: nothing ran");
        assert!(s.is_empty());
        s.hold(&[entry("a")]).await.expect("the fault was used up");
        assert_eq!(s.len(), 1);
    }

    #[tokio::test]
    async fn a_lost_reply_runs_and_says_the_outcome_is_unknown() {
        let s = store();
        s.inject(Op::Hold, Fault::LostReply);
        let err = s.hold(&[entry("a")]).await.expect_err("lost reply");
        assert!(err.outcome_unknown());
        assert_eq!(s.len(), 1, "the call ran");
    }
}
