//! The shards an instance serves, shared between the ownership loop (which
//! writes it) and the pump and ticker (which read it before each claim or
//! round). A bitset of atomics: a reader never waits for the writer, and a
//! reader that sees half of an update serves a shard one round early or
//! late, which overlap or a short wait absorbs.

use std::sync::atomic::{AtomicU64, Ordering};

const BITS: usize = 64;

/// A set of shard numbers below a fixed count.
#[derive(Debug)]
pub(crate) struct ShardSet {
    words: Vec<AtomicU64>,
    len: usize,
}

impl ShardSet {
    /// Every one of `len` shards: what an instance serves when nothing
    /// splits the shards (the in-process API, tests, a store made alone).
    pub(crate) fn all(len: usize) -> Self {
        let set = Self::none(len);
        set.replace(&vec![true; len]);
        set
    }

    /// None of `len` shards: an instance before its first ownership round.
    pub(crate) fn none(len: usize) -> Self {
        ShardSet {
            words: (0..len.div_ceil(BITS)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Whether shard `shard` is in the set.
    pub(crate) fn contains(&self, shard: usize) -> bool {
        shard < self.len
            && self.words[shard / BITS].load(Ordering::Relaxed) & (1 << (shard % BITS)) != 0
    }

    /// The shards in the set, in order.
    pub(crate) fn members(&self) -> Vec<usize> {
        (0..self.len).filter(|&s| self.contains(s)).collect()
    }

    /// How many shards are in the set.
    pub(crate) fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// Makes the set `serve` (one flag per shard; missing flags are false).
    pub(crate) fn replace(&self, serve: &[bool]) {
        for (i, word) in self.words.iter().enumerate() {
            let mut bits = 0u64;
            for b in 0..BITS {
                if serve.get(i * BITS + b).copied().unwrap_or(false) && i * BITS + b < self.len {
                    bits |= 1 << b;
                }
            }
            word.store(bits, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_none_and_replace() {
        let all = ShardSet::all(70);
        assert_eq!(all.count(), 70);
        assert!(all.contains(69) && !all.contains(70));
        let set = ShardSet::none(70);
        assert_eq!(set.count(), 0);
        let mut serve = vec![false; 70];
        serve[3] = true;
        serve[65] = true;
        set.replace(&serve);
        assert_eq!(set.members(), [3, 65]);
        set.replace(&[true]);
        assert_eq!(set.members(), [0]);
    }
}
