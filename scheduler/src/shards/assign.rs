//! Who should own which shard, and what an instance serves after a round of
//! leases: the decisions of the ownership loop, without Redis.

/// Rounds a handed-off shard is still served by its old owner: the new one
/// takes it on its next round (at most one round later), so the shard is
/// served twice for a moment rather than by nobody (make-before-break).
pub(crate) const HANDOFF_ROUNDS: u8 = 2;

/// The live members sorted by id, without repeats: every instance orders
/// them the same way, so they agree on the assignment.
pub(crate) fn sorted_members(mut members: Vec<String>) -> Vec<String> {
    members.sort();
    members.dedup();
    members
}

/// The desired owner of `shard` among `members` (sorted): round robin, so
/// the shard counts of any two instances differ by at most one, and a
/// member joining or leaving moves only about a share of the shards'
/// owners. `None` when there are no members.
pub(crate) fn desired_owner(members: &[String], shard: usize) -> Option<&str> {
    if members.is_empty() {
        return None;
    }
    Some(members[shard % members.len()].as_str())
}

/// What one shard's lease script (`own_shard.lua`) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseOutcome {
    /// Held by another instance, or free and not this one's to take.
    Other,
    /// This instance took the free lease.
    Acquired,
    /// This instance held it and renewed it.
    Renewed,
    /// This instance held it and gave it to the desired owner.
    HandedOff,
    /// This instance held it and let it go (it leaves, nobody else runs).
    Released,
}

impl LeaseOutcome {
    /// The script's reply code.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => LeaseOutcome::Other,
            1 => LeaseOutcome::Acquired,
            2 => LeaseOutcome::Renewed,
            3 => LeaseOutcome::HandedOff,
            4 => LeaseOutcome::Released,
            _ => return None,
        })
    }

    fn held(self) -> bool {
        matches!(self, LeaseOutcome::Acquired | LeaseOutcome::Renewed)
    }
}

/// How the shards an instance holds and serves changed in one round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Change {
    /// Shards served now that were not before: the pump and the ticker
    /// look at them at once.
    pub(crate) gained: usize,
    /// Shards no longer served.
    pub(crate) lost: usize,
    /// The held leases changed (a rebalance).
    pub(crate) rebalanced: bool,
}

/// What an instance holds and serves, round after round.
#[derive(Clone, Debug)]
pub(crate) struct ServeState {
    held: Vec<bool>,
    /// Per shard: rounds it is still served after a handoff.
    draining: Vec<u8>,
    serve: Vec<bool>,
}

impl ServeState {
    /// Nothing held or served, over `shards` shards.
    pub(crate) fn new(shards: usize) -> Self {
        ServeState {
            held: vec![false; shards],
            draining: vec![0; shards],
            serve: vec![false; shards],
        }
    }

    /// The shards to serve: held, or handed off within [`HANDOFF_ROUNDS`].
    pub(crate) fn serve(&self) -> &[bool] {
        &self.serve
    }

    /// The shards whose lease this instance holds.
    #[cfg(test)]
    fn held(&self) -> &[bool] {
        &self.held
    }

    /// How many leases this instance holds.
    pub(crate) fn held_count(&self) -> usize {
        self.held.iter().filter(|&&h| h).count()
    }

    /// Takes in one round's outcomes (one per shard, in order).
    pub(crate) fn apply(&mut self, outcomes: &[LeaseOutcome]) -> Change {
        let mut change = Change::default();
        for (s, outcome) in outcomes.iter().enumerate().take(self.held.len()) {
            let held = outcome.held();
            self.draining[s] = match outcome {
                LeaseOutcome::HandedOff | LeaseOutcome::Released => HANDOFF_ROUNDS,
                _ if held => 0,
                _ => self.draining[s].saturating_sub(1),
            };
            change.rebalanced |= held != self.held[s];
            self.held[s] = held;
            let serve = held || self.draining[s] > 0;
            match (self.serve[s], serve) {
                (false, true) => change.gained += 1,
                (true, false) => change.lost += 1,
                _ => {}
            }
            self.serve[s] = serve;
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LeaseOutcome::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("i{i}")).collect()
    }

    #[test]
    fn round_robin_is_balanced_and_total() {
        for n in 1..=5 {
            let members = names(n);
            let mut counts = vec![0usize; n];
            for shard in 0..16 {
                let owner = desired_owner(&members, shard).expect("an owner");
                counts[members.iter().position(|m| m == owner).expect("a member")] += 1;
            }
            let (min, max) = (counts.iter().min(), counts.iter().max());
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{counts:?}");
            assert_eq!(counts.iter().sum::<usize>(), 16);
        }
        assert_eq!(desired_owner(&[], 3), None);
    }

    #[test]
    fn members_are_ordered_the_same_everywhere() {
        let a = sorted_members(vec!["b".into(), "a".into(), "b".into()]);
        let b = sorted_members(vec!["a".into(), "b".into()]);
        assert_eq!(a, b);
        assert_eq!(desired_owner(&a, 1), Some("b"));
    }

    #[test]
    fn held_shards_are_served_and_gains_are_counted() {
        let mut st = ServeState::new(3);
        let c = st.apply(&[Acquired, Other, Acquired]);
        assert_eq!((c.gained, c.lost, c.rebalanced), (2, 0, true));
        assert_eq!(st.serve(), [true, false, true]);
        let c = st.apply(&[Renewed, Other, Renewed]);
        assert_eq!(c, Change::default(), "a steady round changes nothing");
        assert_eq!(st.held_count(), 2);
    }

    #[test]
    fn a_handed_off_shard_is_served_two_more_rounds() {
        let mut st = ServeState::new(1);
        st.apply(&[Acquired]);
        let c = st.apply(&[HandedOff]);
        assert!(c.rebalanced && c.lost == 0);
        assert_eq!(st.serve(), [true], "the round it was handed off");
        assert_eq!(st.held(), [false]);
        st.apply(&[Other]);
        assert_eq!(st.serve(), [true], "the next round: overlap, not a gap");
        let c = st.apply(&[Other]);
        assert_eq!(st.serve(), [false]);
        assert_eq!(c.lost, 1);
    }

    #[test]
    fn a_shard_taken_back_while_draining_is_held_again() {
        let mut st = ServeState::new(1);
        st.apply(&[Acquired]);
        st.apply(&[HandedOff]);
        let c = st.apply(&[Acquired]);
        assert_eq!(c.gained, 0, "it was still served");
        st.apply(&[Renewed]);
        st.apply(&[Renewed]);
        assert_eq!(st.serve(), [true]);
    }

    #[test]
    fn a_lease_lost_to_another_stops_serving_at_once() {
        // Redis lost the key and another instance took it: this one never
        // handed it off, so nothing drains.
        let mut st = ServeState::new(1);
        st.apply(&[Acquired]);
        let c = st.apply(&[Other]);
        assert_eq!((c.lost, c.rebalanced), (1, true));
    }

    #[test]
    fn reply_codes() {
        let all = [Other, Acquired, Renewed, HandedOff, Released];
        for (code, want) in all.iter().enumerate() {
            assert_eq!(LeaseOutcome::from_code(code as i64), Some(*want));
        }
        assert_eq!(LeaseOutcome::from_code(5), None);
    }
}
