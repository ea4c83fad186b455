//! Shard ownership: the schedulers of a namespace split the shards between
//! them instead of each serving all of them (issue 17).
//!
//! * [`set`]: the shards this instance serves, shared with the pump's claims
//!   and the ticker's reads ([`ShardSet`]).
//! * [`assign`]: who should own which shard, and which shards to serve
//!   after a round of leases (pure functions, unit-tested).
//! * [`lease`]: the loop that keeps this instance a member, takes, renews
//!   and hands off shard leases in Redis, and updates the set.
//!
//! Correctness never rests on ownership: a claim and a tick's
//! compare-and-set are atomic scripts, so two instances serving one shard
//! only repeat work. Ownership removes the repetition; every rebalance errs
//! on the side of overlap (a shard handed off is still served for two
//! rounds) rather than a gap (a shard nobody serves only waits).

pub(crate) mod assign;
pub(crate) mod lease;
pub(crate) mod set;

pub(crate) use lease::Ownership;
pub(crate) use set::ShardSet;
