//! What every [`DelayStore`] promises, as checks run on each store: the
//! in-memory one in this crate's unit tests, the Redis one in
//! `tests/tests/store_conformance.rs`. A check panics (like an assert)
//! when the store breaks a promise.
//!
//! Each check takes an empty store of its own (any shard count) and
//! `pass`, which lets store time go by: the memory store moves its clock,
//! the Redis store waits. Due times are read from the store's own clock
//! (a claim reports it), never from this host's.
//!
//! Compiled for this crate's tests and with the `conformance` feature.

use crate::delay::ports::DelayStore;
use crate::delay::store::{member, shard_of, Claim, Claimed, Entry};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// A lease long enough that no check sees it expire unless it waits.
const LONG_LEASE_MS: u64 = 60_000;
/// A lease a check lets expire.
const SHORT_LEASE_MS: u64 = 100;
/// Claims take this many tasks per shard unless a check says otherwise.
const BATCH: usize = 100;
/// How far in the past "due now" tasks are placed.
const PAST_MS: i64 = 1_000;
/// How far in the future "not due" tasks are placed.
const FUTURE_MS: i64 = 3_600_000;
/// How far a relative due time may be from the expected one: the store's
/// clock is read once before and once after the hold.
const CLOCK_SLACK_MS: i64 = 1_000;

fn entry(id: &str, run_at: Option<i64>, delay_ms: i64, record: &[u8]) -> Entry {
    Entry {
        member: member(id, 1),
        run_at,
        delay_ms,
        record: record.to_vec(),
    }
}

/// The store's clock (ms), read through a claim; call it only when
/// nothing is due.
async fn store_now<S: DelayStore>(store: &S) -> i64 {
    let claim = store.claim_bounded(1, 1, LONG_LEASE_MS, 0).await;
    claim.expect("a claim of nothing").now
}

async fn claim_all<S: DelayStore>(store: &S, lease_ms: u64, ahead_ms: u64) -> Claim {
    store
        .claim_bounded(BATCH, usize::MAX, lease_ms, ahead_ms)
        .await
        .expect("claim")
}

fn members(tasks: &[Claimed]) -> Vec<&str> {
    let mut out: Vec<&str> = tasks.iter().map(|c| c.member.as_str()).collect();
    out.sort_unstable();
    out
}

/// Holds tasks `ids`, due a while ago by the store's clock `now`.
async fn hold_past<S: DelayStore>(store: &S, ids: &[&str], now: i64) {
    let entries: Vec<Entry> = ids
        .iter()
        .map(|id| entry(id, Some(now - PAST_MS), 0, b"r"))
        .collect();
    store.hold(&entries).await.expect("hold");
}

async fn pending<S: DelayStore>(store: &S) -> u64 {
    store.pending().await.expect("pending")
}

/// Ids that all map to one shard of `store`.
fn same_shard_ids<S: DelayStore>(store: &S, prefix: &str, n: usize) -> Vec<String> {
    let shards = store.shard_count();
    let first = format!("{prefix}-0");
    let target = shard_of(&first, shards);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| shard_of(id, shards) == target)
        .take(n)
        .collect()
}

/// A member already held is not held again, whatever its due time or
/// record: the first submission wins, and the result says so.
pub async fn first_submission_wins<S: DelayStore>(store: S) {
    let now = store_now(&store).await;
    let held = store
        .hold(&[entry("a", Some(now - PAST_MS), 0, b"first")])
        .await
        .expect("hold");
    assert!(held.replicated);
    assert!(held.scheduled[0].added);
    assert_eq!(held.scheduled[0].due, now - PAST_MS);
    let again = store
        .hold(&[entry("a", Some(now - 2 * PAST_MS), 0, b"second")])
        .await
        .expect("hold again");
    assert!(
        !again.scheduled[0].added,
        "a pending member is not held twice"
    );
    assert!(!again.scheduled[0].head);
    assert_eq!(pending(&store).await, 1);
    let claim = claim_all(&store, LONG_LEASE_MS, 0).await;
    assert_eq!(claim.tasks.len(), 1);
    assert_eq!(claim.tasks[0].record, b"first");
    assert_eq!(claim.tasks[0].due, now - PAST_MS);
    // Leased, it is still pending: a new submission is ignored too.
    let leased = store
        .hold(&[entry("a", None, 0, b"third")])
        .await
        .expect("hold while leased");
    assert!(!leased.scheduled[0].added);
}

/// A relative delay counts from the store's clock; `head` says the task
/// became its shard's earliest.
pub async fn due_times_and_head<S: DelayStore>(store: S) {
    let ids = same_shard_ids(&store, "head", 3);
    let before = store_now(&store).await;
    let held = store
        .hold(&[entry(&ids[0], None, FUTURE_MS, b"r")])
        .await
        .expect("hold");
    let after = store_now(&store).await;
    let due = held.scheduled[0].due;
    assert!(
        due >= before + FUTURE_MS - CLOCK_SLACK_MS && due <= after + FUTURE_MS + CLOCK_SLACK_MS
    );
    assert!(
        held.scheduled[0].head,
        "the first task of a shard is its head"
    );
    let held = store
        .hold(&[
            entry(&ids[1], Some(due + 1), 0, b"r"),
            entry(&ids[2], Some(due - 1), 0, b"r"),
        ])
        .await
        .expect("hold");
    assert!(held.scheduled[0].added && !held.scheduled[0].head);
    assert!(held.scheduled[1].added && held.scheduled[1].head);
}

/// A claim takes what is due (and what falls due within its window), in
/// due order per shard, reports the earliest due time left, and leaves
/// the rest.
pub async fn claims_due_tasks_in_order<S: DelayStore>(store: S) {
    let now = store_now(&store).await;
    let entries: Vec<Entry> = (0..10)
        .map(|i| entry(&format!("due-{i}"), Some(now - PAST_MS + 10 * i), 0, b"r"))
        .chain([
            entry("soon", Some(now + FUTURE_MS / 2), 0, b"r"),
            entry("later", Some(now + FUTURE_MS), 0, b"r"),
        ])
        .collect();
    store.hold(&entries).await.expect("hold");
    let claim = claim_all(&store, LONG_LEASE_MS, 0).await;
    assert_eq!(claim.tasks.len(), 10, "only the due tasks");
    assert!(!claim.more);
    assert_eq!(claim.next_due, Some(now + FUTURE_MS / 2));
    assert!(claim.now >= now && claim.now_us / 1000 == claim.now);
    let mut by_shard: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for c in &claim.tasks {
        assert_eq!(c.id(), c.member);
        by_shard.entry(c.shard).or_default().push(c.due);
    }
    for dues in by_shard.values() {
        assert!(dues.windows(2).all(|w| w[0] <= w[1]), "due order: {dues:?}");
    }
    // The window reaches the next one; the last stays.
    let ahead = u64::try_from(FUTURE_MS / 2).expect("positive");
    let claim = claim_all(&store, LONG_LEASE_MS, ahead).await;
    assert_eq!(members(&claim.tasks), ["soon"]);
    assert_eq!(claim.next_due, Some(now + FUTURE_MS));
    assert_eq!(pending(&store).await, 12);
}

/// A claim takes at most its batch per shard, and stops once its records
/// reach the byte budget (always taking the first); `more` says a shard
/// gave a full batch.
pub async fn claims_within_count_and_bytes<S: DelayStore>(store: S) {
    let now = store_now(&store).await;
    let ids = same_shard_ids(&store, "big", 5);
    let entries: Vec<Entry> = ids
        .iter()
        .map(|id| entry(id, Some(now - PAST_MS), 0, &[b'x'; 100]))
        .collect();
    store.hold(&entries).await.expect("hold");
    let claim = store
        .claim_bounded(2, usize::MAX, LONG_LEASE_MS, 0)
        .await
        .expect("claim");
    assert_eq!(claim.tasks.len(), 2);
    assert!(claim.more, "a full batch says more may be due");
    // 100 bytes taken is under 150: a second record is taken, then none.
    let claim = store
        .claim_bounded(BATCH, 150, LONG_LEASE_MS, 0)
        .await
        .expect("claim");
    assert_eq!(claim.tasks.len(), 2);
    // A budget below one record still takes one.
    let claim = store
        .claim_bounded(BATCH, 1, LONG_LEASE_MS, 0)
        .await
        .expect("claim");
    assert_eq!(claim.tasks.len(), 1);
    assert!(!claim.more);
    assert_eq!(claim.next_due, None, "every task is leased");
    assert_eq!(pending(&store).await, 5);
}

/// Completed tasks are gone; a repeated complete spares a member that was
/// not leased any more (it may be a new submission of the id).
pub async fn complete_forgets<S: DelayStore>(store: S) {
    let now = store_now(&store).await;
    hold_past(&store, &["a", "b"], now).await;
    let claim = claim_all(&store, LONG_LEASE_MS, 0).await;
    let all: Vec<&Claimed> = claim.tasks.iter().collect();
    store.complete(&all).await.expect("complete");
    assert_eq!(pending(&store).await, 0);
    assert!(claim_all(&store, LONG_LEASE_MS, 0).await.tasks.is_empty());
    // Submitted anew after the first complete ran: a repeat spares it.
    store
        .hold(&[entry("a", Some(now - PAST_MS), 0, b"new")])
        .await
        .expect("hold again");
    store.complete_again(&all).await.expect("complete again");
    assert_eq!(pending(&store).await, 1);
    // A first complete of a task back in the due index removes it there.
    store.complete(&all).await.expect("complete unleased");
    assert_eq!(pending(&store).await, 0);
    assert!(claim_all(&store, LONG_LEASE_MS, 0).await.tasks.is_empty());
}

/// A release returns leased tasks to the due index at once, or no sooner
/// than its delay; it moves nothing that is not leased.
pub async fn release_returns_tasks<S: DelayStore>(store: S) {
    let now = store_now(&store).await;
    hold_past(&store, &["a", "b"], now).await;
    let claim = claim_all(&store, LONG_LEASE_MS, 0).await;
    let (a, b) = match claim.tasks.as_slice() {
        [x, y] if x.member == "a" => (x, y),
        [x, y] => (y, x),
        other => panic!("claimed {other:?}"),
    };
    store.release(&[a]).await.expect("release");
    let delay = u64::try_from(FUTURE_MS).expect("positive");
    store
        .release_after(&[b], delay)
        .await
        .expect("release after");
    let again = claim_all(&store, LONG_LEASE_MS, 0).await;
    assert_eq!(
        members(&again.tasks),
        ["a"],
        "released at once, due as before"
    );
    assert_eq!(again.tasks[0].due, now - PAST_MS);
    let next = again.next_due.expect("b waits");
    assert!(next >= now + FUTURE_MS, "released no sooner than its delay");
    // Not leased (completed): a release moves nothing.
    let a_again: Vec<&Claimed> = again.tasks.iter().collect();
    store.complete(&a_again).await.expect("complete");
    store.release(&a_again).await.expect("release of nothing");
    assert_eq!(pending(&store).await, 1);
    assert!(claim_all(&store, LONG_LEASE_MS, 0).await.tasks.is_empty());
}

/// A lease that expires returns its task: the next claim takes it again.
pub async fn expired_leases_return<S, F, Fut>(store: S, pass: F)
where
    S: DelayStore,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let now = store_now(&store).await;
    hold_past(&store, &["a"], now).await;
    let claim = claim_all(&store, SHORT_LEASE_MS, 0).await;
    assert_eq!(members(&claim.tasks), ["a"]);
    assert!(
        claim_all(&store, SHORT_LEASE_MS, 0).await.tasks.is_empty(),
        "leased"
    );
    pass(Duration::from_millis(2 * SHORT_LEASE_MS)).await;
    let again = claim_all(&store, LONG_LEASE_MS, 0).await;
    assert_eq!(
        members(&again.tasks),
        ["a"],
        "an expired lease is claimed again"
    );
    assert_eq!(again.tasks[0].record, b"r");
}
