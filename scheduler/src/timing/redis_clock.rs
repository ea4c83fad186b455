//! Redis's clock on this host's monotonic clock. Every due time is Redis
//! time (all schedulers share that one clock), but a publish is timed
//! locally. A reading of Redis's clock (`TIME` inside a script) happened
//! somewhere between sending the request and receiving the reply, so
//! `redis_now - received_at` is a lower bound of the offset between the
//! two clocks; the largest bound seen lately is the best estimate that never
//! maps a due time before it is reached. Each reply's arrival alone would
//! make every timer late by however long a busy Redis queued the request;
//! the midpoint of the round trip can map a due time before it is reached.
//!
//! Bounds expire after [`WINDOW`], so a stepped wall clock on the Redis
//! host is followed within it.
//!
//! Readings are in microseconds: in whole milliseconds both Redis's reading
//! (truncated) and the arrival (rounded up, so as never to map early) would
//! cost up to a millisecond each, and every timer would err late.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// How long a bound on the offset counts. Long enough to keep the bound of
/// a fast round trip through a run of slow ones; short enough that a step
/// of the Redis host's wall clock is followed within it.
const WINDOW: Duration = Duration::from_secs(5);

/// Microseconds in a millisecond: due times are Redis milliseconds, the
/// mapping keeps microseconds.
const MICROS_PER_MS: i64 = 1_000;

/// Nanoseconds in a microsecond.
const NANOS_PER_MICRO: u128 = 1_000;

/// The pump's estimate of Redis's clock: fed with every reading of it (a
/// claim's `TIME`), it answers with the [`ClockMap`] to time publishes by.
#[derive(Debug)]
pub(crate) struct RedisClock {
    base: Instant,
    /// (when observed, offset µs) with offsets strictly decreasing from the
    /// front: the front is the largest bound within the window.
    bounds: VecDeque<(Instant, i64)>,
}

/// A fixed mapping from Redis time to local instants, copied into the
/// tasks that publish on timers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClockMap {
    base: Instant,
    offset_us: i64,
}

impl RedisClock {
    /// A clock with no reading yet; its local base is now.
    pub(crate) fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    fn starting_at(base: Instant) -> Self {
        RedisClock {
            base,
            bounds: VecDeque::new(),
        }
    }

    /// Records that Redis's clock read `redis_now_us` (microseconds) before
    /// `received_at`; returns the mapping with it.
    pub(crate) fn observe(&mut self, redis_now_us: i64, received_at: Instant) -> ClockMap {
        let offset = redis_now_us - self.local_us(received_at);
        while self.bounds.back().is_some_and(|&(_, o)| o <= offset) {
            self.bounds.pop_back();
        }
        self.bounds.push_back((received_at, offset));
        while self
            .bounds
            .front()
            .is_some_and(|&(at, _)| received_at.saturating_duration_since(at) > WINDOW)
        {
            self.bounds.pop_front();
        }
        ClockMap {
            base: self.base,
            // The bound just pushed stays in, so the front is never empty.
            offset_us: self.bounds.front().map_or(offset, |&(_, o)| o),
        }
    }

    /// Rounded up: rounding down would make the bound too large by up to
    /// a microsecond, and a task could start that much before its due time.
    fn local_us(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.base)
            .as_nanos()
            .div_ceil(NANOS_PER_MICRO) as i64
    }
}

impl Default for RedisClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ClockMap {
    /// The local instant at which Redis's clock reads `redis_ms` (at the
    /// earliest: the estimate errs late, never early).
    pub(crate) fn instant_of(&self, redis_ms: i64) -> Instant {
        let local = redis_ms.saturating_mul(MICROS_PER_MS) - self.offset_us;
        self.base + Duration::from_micros(local.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1000;

    #[test]
    fn keeps_the_tightest_bound_and_never_maps_early() {
        let t0 = Instant::now();
        let mut clock = RedisClock::starting_at(t0);
        // Redis reads 1,000,000 ms at local 0..10 ms; the reply arrives at 10.
        let m = clock.observe(1_000_000 * MS, t0 + Duration::from_millis(10));
        // Taken at face value: Redis reaches 1,000,010 at local 20 at the
        // latest (if it read its clock at the very end of the round trip).
        assert_eq!(m.instant_of(1_000_010), t0 + Duration::from_millis(20));
        // A faster round trip later tightens it: the reading 1,000,100 came
        // back at local 101, so the offset is at least 999,999 ms.
        let m = clock.observe(1_000_100 * MS, t0 + Duration::from_millis(101));
        assert_eq!(m.instant_of(1_000_010), t0 + Duration::from_millis(11));
        // A slow round trip (a looser bound) changes nothing.
        let m = clock.observe(1_000_150 * MS, t0 + Duration::from_millis(190));
        assert_eq!(m.instant_of(1_000_010), t0 + Duration::from_millis(11));
    }

    #[test]
    fn maps_to_the_microsecond() {
        let t0 = Instant::now();
        let mut clock = RedisClock::starting_at(t0);
        // Redis read 1,000,000.250 ms; the reply arrived at local 10.400 ms.
        // Redis then reaches 1,000,005 ms (4.750 ms later) at local 15.150
        // at the latest. Whole milliseconds said 16.
        let m = clock.observe(1_000_000 * MS + 250, t0 + Duration::from_micros(10_400));
        assert_eq!(m.instant_of(1_000_005), t0 + Duration::from_micros(15_150));
    }

    #[test]
    fn an_arrival_between_two_microseconds_counts_as_the_later_one() {
        let t0 = Instant::now();
        let mut clock = RedisClock::starting_at(t0);
        // Arrival at 10,000.5 µs counts as 10,001: the mapping may be half
        // a microsecond late, never early.
        let m = clock.observe(1_000_000 * MS, t0 + Duration::from_nanos(10_000_500));
        assert_eq!(m.instant_of(1_000_005), t0 + Duration::from_micros(15_001));
    }

    #[test]
    fn forgets_bounds_older_than_the_window() {
        let t0 = Instant::now();
        let mut clock = RedisClock::starting_at(t0);
        clock.observe(1_000_000 * MS, t0 + Duration::from_millis(1));
        // Redis's clock stepped back by a second.
        let later = t0 + WINDOW + Duration::from_secs(1);
        let local = later.duration_since(t0).as_millis() as i64;
        let m = clock.observe((1_000_000 + local - 1_000) * MS, later);
        assert_eq!(
            m.instant_of(1_000_000 + local - 1_000),
            later,
            "the stale, larger bound is gone"
        );
    }
}
