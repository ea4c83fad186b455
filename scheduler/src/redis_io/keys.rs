//! Every Redis key name the scheduler uses, built in one place.
//!
//! A namespace `NS` owns:
//!
//! * per shard `S`, all under the hash tag `{S}` so that every script of a
//!   shard runs on one Redis Cluster slot:
//!   * delay queue ([`DelayShardKeys`]): `NS:dq{S}:idx` (due index; the Lua
//!     library derives its buckets `idx:B` and `idx:near` from this name),
//!     `NS:dq{S}:rec` (records), `NS:dq{S}:lease` (leases),
//!     `NS:dq{S}:claim:C` (claimer C's last claim)
//!   * schedules ([`ScheduleShardKeys`]): `NS:dq{S}:snext` (next ticks),
//!     `NS:dq{S}:sdef` (definitions), `NS:dq{S}:sstate` (per-schedule
//!     state, fields built by [`state_field`])
//!   * ownership ([`Keys::shard_owner`]): `NS:own{S}`, the id of the
//!     scheduler that holds shard S's lease (string, expires with the lease)
//! * outside any shard: `NS:dq:wake` (the wake channel), `NS:dq:shards`
//!   (the shard count), `NS:sbeat` (the schedulers' heartbeat),
//!   `NS:sched:members` (the schedulers that split the shards: sorted set,
//!   instance id -> membership expiry).
//!
//! The names are stored data: a renamed key loses what a running
//! deployment holds, which the layout tests below pin.

/// The key names of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    namespace: String,
}

/// The keys of one delay-queue shard, as its scripts take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DelayShardKeys {
    /// Due index (sorted set bucket -> earliest due); its buckets' names
    /// are derived from it in `scripts/due_index.lua`.
    pub(crate) idx: String,
    /// Hash member -> stored record.
    pub(crate) rec: String,
    /// Sorted set member -> lease expiry.
    pub(crate) lease: String,
    /// This claimer's last claim in the shard (`scripts/claim.lua`).
    pub(crate) claim: String,
    /// Prefix of a hold's proof key in the shard (`KAIROS_REDIS_WAIT`,
    /// see `RedisDelayQueue::hold`): the batch id follows.
    pub(crate) proof: String,
}

/// The keys of one schedule shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScheduleShardKeys {
    /// Sorted set id -> next tick.
    pub(crate) next: String,
    /// Hash id -> definition JSON.
    pub(crate) def: String,
    /// Hash of per-schedule state fields (see [`state_field`]).
    pub(crate) state: String,
}

impl Keys {
    /// The keys of `namespace`.
    pub(crate) fn new(namespace: &str) -> Self {
        Keys {
            namespace: namespace.to_string(),
        }
    }

    /// `NS:dq{S}`: the prefix, with the hash tag, of every key of shard S.
    fn shard_prefix(&self, shard: usize) -> String {
        format!("{}:dq{{{shard}}}", self.namespace)
    }

    /// Delay-queue shard `shard`'s keys, with `claimer`'s claim key.
    pub(crate) fn delay_shard(&self, shard: usize, claimer: &str) -> DelayShardKeys {
        let p = self.shard_prefix(shard);
        DelayShardKeys {
            idx: format!("{p}:idx"),
            rec: format!("{p}:rec"),
            lease: format!("{p}:lease"),
            claim: format!("{p}:claim:{claimer}"),
            proof: format!("{p}:proof:"),
        }
    }

    /// Schedule shard `shard`'s keys (same hash tag as the delay-queue
    /// shard of the same number).
    pub(crate) fn schedule_shard(&self, shard: usize) -> ScheduleShardKeys {
        let p = self.shard_prefix(shard);
        ScheduleShardKeys {
            next: format!("{p}:snext"),
            def: format!("{p}:sdef"),
            state: format!("{p}:sstate"),
        }
    }

    /// The pub/sub channel that wakes every scheduler's pump.
    pub(crate) fn wake_channel(&self) -> String {
        format!("{}:dq:wake", self.namespace)
    }

    /// The key recording the namespace's shard count.
    pub(crate) fn shard_count(&self) -> String {
        format!("{}:dq:shards", self.namespace)
    }

    /// The schedulers' shared heartbeat (`scripts/sched_beat.lua`).
    pub(crate) fn schedule_beat(&self) -> String {
        format!("{}:sbeat", self.namespace)
    }

    /// `NS:own{S}`: who holds shard `shard`'s lease (`scripts/own_shard.lua`);
    /// the shard's hash tag, so it lives on the shard's Redis Cluster slot.
    pub(crate) fn shard_owner(&self, shard: usize) -> String {
        format!("{}:own{{{shard}}}", self.namespace)
    }

    /// The schedulers that split the shards (`scripts/own_members.lua`).
    pub(crate) fn schedulers(&self) -> String {
        format!("{}:sched:members", self.namespace)
    }
}

/// Field `name` of schedule `id` in its shard's state hash (`id<TAB>name`).
pub(crate) fn state_field(id: &str, name: &str) -> String {
    format!("{id}\t{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster hashes: the text inside the first `{...}`.
    fn tag(key: &str) -> Option<&str> {
        let open = key.find('{')?;
        let close = key[open + 1..].find('}')? + open + 1;
        Some(&key[open + 1..close])
    }

    #[test]
    fn the_layout_is_the_stored_one() {
        let keys = Keys::new("ns");
        assert_eq!(
            keys.delay_shard(3, "c1"),
            DelayShardKeys {
                idx: "ns:dq{3}:idx".into(),
                rec: "ns:dq{3}:rec".into(),
                lease: "ns:dq{3}:lease".into(),
                claim: "ns:dq{3}:claim:c1".into(),
                proof: "ns:dq{3}:proof:".into(),
            }
        );
        assert_eq!(
            keys.schedule_shard(3),
            ScheduleShardKeys {
                next: "ns:dq{3}:snext".into(),
                def: "ns:dq{3}:sdef".into(),
                state: "ns:dq{3}:sstate".into(),
            }
        );
        assert_eq!(keys.wake_channel(), "ns:dq:wake");
        assert_eq!(keys.shard_count(), "ns:dq:shards");
        assert_eq!(keys.schedule_beat(), "ns:sbeat");
        assert_eq!(keys.shard_owner(3), "ns:own{3}");
        assert_eq!(keys.schedulers(), "ns:sched:members");
        assert_eq!(state_field("s1", "last"), "s1\tlast");
    }

    #[test]
    fn every_key_of_a_shard_shares_its_hash_tag() {
        let keys = Keys::new("a:b");
        for shard in [0, 1, 7, 15] {
            let d = keys.delay_shard(shard, "c");
            let s = keys.schedule_shard(shard);
            let owner = keys.shard_owner(shard);
            let all = [
                &d.idx, &d.rec, &d.lease, &d.claim, &s.next, &s.def, &s.state, &owner,
            ];
            let want = shard.to_string();
            for key in all {
                assert_eq!(tag(key), Some(want.as_str()), "{key}");
            }
        }
    }

    #[test]
    fn keys_outside_shards_carry_no_hash_tag() {
        let keys = Keys::new("ns");
        for key in [
            keys.wake_channel(),
            keys.shard_count(),
            keys.schedule_beat(),
            keys.schedulers(),
        ] {
            assert_eq!(tag(&key), None, "{key}");
        }
    }
}
