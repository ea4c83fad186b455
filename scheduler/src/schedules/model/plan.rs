//! Which ticks to fire now. Pure: the ticker feeds it the stored next tick
//! and Redis's clock.
//!
//! A healthy ticker reads a schedule `lookahead` before its tick and hands
//! the occurrence to the delay queue, due at the tick, so ticks fire with
//! the delay queue's precision. A stored next tick older than `grace` is
//! late, for one of two reasons, which the schedulers' shared heartbeat
//! tells apart (`alive_since`: since when some scheduler has beaten at
//! least every `grace`):
//!
//! * the ticks before `alive_since` fell due while no scheduler ran: they
//!   are missed, and the misfire policy decides what runs;
//! * the ticks after it fell due while a scheduler ran but had not reached
//!   them yet (a loaded machine, thousands of ticks a second): they all
//!   fire, late. Dropping them would lose tasks of a running system.
//!
//! The policies:
//!
//! * `fire_once`: one occurrence, for the latest missed tick;
//! * `skip`: none;
//! * `fire_all`: one per missed tick, at most `MAX_CATCH_UP` (100) (the latest).
//!
//! Catch-up occurrences keep their tick as due time, so they run at once and
//! their lateness stays visible.

use super::{Misfire, Trigger};
use std::collections::VecDeque;

/// Most catch-up runs `fire_all` makes for one outage.
pub(crate) const MAX_CATCH_UP: usize = 100;
/// Most missed ticks counted before jumping ahead (a 10 ms cron... an
/// interval of 100 ms down for a day has 864,000).
const MAX_SCAN: usize = 100_000;
/// Most ticks fired in one plan without misfire (fast intervals with a long
/// lookahead).
const MAX_AHEAD: usize = 1_000;

/// What to do for one schedule now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Ticks to fire, in order.
    pub(crate) fire: Vec<i64>,
    /// Ticks missed while no scheduler ran (counted, not all fired).
    pub(crate) missed: u64,
    /// Ticks fired more than `grace` late although a scheduler ran.
    pub(crate) late: u64,
    /// The following tick; `None` when the trigger is exhausted.
    pub(crate) next: Option<i64>,
}

/// `now` and `alive_since` are Redis's clock, as the heartbeat returned
/// them (`alive_since <= now`).
pub(crate) fn plan(
    trigger: &Trigger,
    misfire: Misfire,
    next: i64,
    now: i64,
    alive_since: i64,
    lookahead: i64,
    grace: i64,
) -> Plan {
    let mut out = Plan::default();
    let mut tick = Some(next);
    if next < now - grace {
        let mut latest: VecDeque<i64> = VecDeque::new();
        let mut scanned = 0;
        while let Some(t) = tick.filter(|t| *t <= now && *t < alive_since) {
            out.missed += 1;
            if latest.len() == MAX_CATCH_UP {
                latest.pop_front();
            }
            latest.push_back(t);
            scanned += 1;
            tick = if scanned >= MAX_SCAN {
                // Too many to count: jump to the live period (past
                // now, after a restart); keep the latest.
                out.missed += 1;
                trigger.next_after(alive_since.min(now))
            } else {
                trigger.next_after(t)
            };
        }
        match misfire {
            Misfire::Skip => {}
            Misfire::FireOnce => out.fire.extend(latest.back()),
            Misfire::FireAll => out.fire.extend(latest),
        }
    }
    while let Some(t) = tick.filter(|t| *t <= now + lookahead) {
        if out.fire.len() >= MAX_AHEAD {
            break;
        }
        if t < now - grace {
            out.late += 1;
        }
        out.fire.push(t);
        tick = trigger.next_after(t);
    }
    out.next = tick;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY_S: Trigger = Trigger::Every {
        every_ms: 1000,
        start_at: 0,
    };

    #[test]
    fn on_time_fires_within_the_lookahead() {
        let p = plan(&EVERY_S, Misfire::FireOnce, 10_000, 9_900, 9_900, 100, 1000);
        assert_eq!(
            p,
            Plan {
                fire: vec![10_000],
                missed: 0,
                late: 0,
                next: Some(11_000)
            }
        );
        let p = plan(&EVERY_S, Misfire::Skip, 10_000, 9_800, 9_800, 100, 1000);
        assert_eq!(p.fire, Vec::<i64>::new());
        assert_eq!(p.next, Some(10_000));
        // A little late is still on time.
        let p = plan(&EVERY_S, Misfire::Skip, 10_000, 10_300, 10_300, 100, 1000);
        assert_eq!(p.fire, vec![10_000]);
    }

    #[test]
    fn five_missed_seconds_by_policy() {
        // Next tick 11 s, restarted at 15.2 s: 11..15 missed.
        let run = |m| plan(&EVERY_S, m, 11_000, 15_200, 15_200, 100, 1000);
        assert_eq!(run(Misfire::FireOnce).fire, vec![15_000]);
        assert_eq!(run(Misfire::Skip).fire, Vec::<i64>::new());
        assert_eq!(
            run(Misfire::FireAll).fire,
            vec![11_000, 12_000, 13_000, 14_000, 15_000]
        );
        for m in [Misfire::FireOnce, Misfire::Skip, Misfire::FireAll] {
            assert_eq!(run(m).missed, 5);
            assert_eq!(run(m).next, Some(16_000));
        }
        // The lookahead still applies after a catch-up.
        let p = plan(
            &EVERY_S,
            Misfire::FireOnce,
            11_000,
            15_950,
            15_950,
            100,
            1000,
        );
        assert_eq!(p.fire, vec![15_000, 16_000]);
    }

    #[test]
    fn a_running_scheduler_that_fell_behind_fires_every_tick_late() {
        // Next tick 11 s, read at 15.2 s, but schedulers beat all along.
        for m in [Misfire::FireOnce, Misfire::Skip, Misfire::FireAll] {
            let p = plan(&EVERY_S, m, 11_000, 15_200, 5_000, 100, 1000);
            assert_eq!(p.fire, vec![11_000, 12_000, 13_000, 14_000, 15_000]);
            assert_eq!((p.missed, p.late), (0, 4), "{m:?}");
            assert_eq!(p.next, Some(16_000));
        }
    }

    #[test]
    fn only_the_ticks_of_the_outage_are_missed() {
        // No scheduler ran until 13.5 s; the one that came back is behind.
        let run = |m| plan(&EVERY_S, m, 11_000, 15_200, 13_500, 100, 1000);
        assert_eq!(run(Misfire::FireOnce).fire, vec![13_000, 14_000, 15_000]);
        assert_eq!(run(Misfire::Skip).fire, vec![14_000, 15_000]);
        assert_eq!(
            run(Misfire::FireAll).fire,
            vec![11_000, 12_000, 13_000, 14_000, 15_000]
        );
        for m in [Misfire::FireOnce, Misfire::Skip, Misfire::FireAll] {
            assert_eq!((run(m).missed, run(m).late), (3, 1), "{m:?}");
        }
    }

    #[test]
    fn fire_all_is_bounded() {
        // Back 200 ms after the tick at 1,000 s.
        let p = plan(
            &EVERY_S,
            Misfire::FireAll,
            1_000,
            1_000_400,
            1_000_200,
            0,
            1000,
        );
        assert_eq!(p.fire.len(), MAX_CATCH_UP);
        assert_eq!(p.fire.last(), Some(&1_000_000));
        assert_eq!(p.missed, 1000);
        let fast = Trigger::Every {
            every_ms: 100,
            start_at: 0,
        };
        let p = plan(
            &fast,
            Misfire::FireOnce,
            100,
            86_400_000,
            86_400_000,
            0,
            1000,
        );
        assert_eq!(p.fire.len(), 1);
        assert_eq!(p.next, Some(86_400_100));
    }

    #[test]
    fn a_one_shot_fires_once_then_ends() {
        // Read at `now`, with a scheduler just back.
        let at = |m, now| plan(&Trigger::At(5_000), m, 5_000, now, now, 100, 1000);
        let p = at(Misfire::FireOnce, 4_950);
        assert_eq!(
            p,
            Plan {
                fire: vec![5_000],
                missed: 0,
                late: 0,
                next: None
            }
        );
        let p = at(Misfire::Skip, 60_000);
        assert_eq!(
            p,
            Plan {
                fire: vec![],
                missed: 1,
                late: 0,
                next: None
            }
        );
    }
}
