//! Tick arithmetic: the first tick strictly after an instant.
//!
//! Cron expressions follow Unix cron (croner 4.0.3): 5 fields, or 6 with a
//! leading seconds field; day-of-week 0-7 (0 and 7 Sunday) and names;
//! day-of-month and day-of-week ORed as in Vixie cron; `@hourly`-style
//! aliases. They are matched against the wall clock of the schedule's time
//! zone, and the wall-clock matches are mapped to instants by our own rule,
//! the same for every expression (croner's own DST rule differs between
//! "fixed-time" and "wildcard" expressions):
//!
//! * a local time that does not exist (spring forward) fires once, at the
//!   first valid instant after it (the end of the gap);
//! * a local time that occurs twice (fall back) fires once, at its first
//!   occurrence.
//!
//! Ticks are always computed from the previous tick, never from "now", and
//! are whole UTC instants in Unix milliseconds.

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Timelike};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// Wall-clock matches examined for one answer before giving up: only the
/// repeated hour of a fall-back can need more than one.
const MAX_WALK: usize = 8_000;

/// When a schedule fires.
#[derive(Clone, Debug)]
pub enum Trigger {
    /// A cron expression read in a time zone.
    Cron {
        /// The parsed expression.
        cron: Box<Cron>,
        /// The zone its wall-clock times are in.
        tz: Tz,
    },
    /// Every `every_ms`, at `start_at + k * every_ms` (Unix ms).
    Every {
        /// The interval.
        every_ms: i64,
        /// The first tick.
        start_at: i64,
    },
    /// Once, at this Unix ms.
    At(i64),
}

impl Trigger {
    /// Parses a cron expression: 5 or 6 fields, or an `@` alias.
    pub fn cron(expr: &str, tz: Tz) -> Result<Self, String> {
        let fields = expr.split_whitespace().count();
        let alias = expr.trim_start().starts_with('@');
        if !alias && !(5..=6).contains(&fields) {
            return Err(format!(
                "{expr:?} has {fields} fields; use 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))?;
        let t = Trigger::Cron {
            cron: Box::new(cron),
            tz,
        };
        // An expression that parses but never matches (`0 0 30 2 *`) would
        // never fire: refuse it now rather than leave a dead schedule.
        if t.next_after(0).is_none() {
            return Err(format!("{expr:?} never matches a date"));
        }
        Ok(t)
    }

    /// The first tick strictly after `t_ms`, or `None` when there is none
    /// (a one-shot in the past, an expression with no more matches).
    pub fn next_after(&self, t_ms: i64) -> Option<i64> {
        match self {
            Trigger::At(at) => (*at > t_ms).then_some(*at),
            Trigger::Every { every_ms, start_at } => {
                if t_ms < *start_at {
                    Some(*start_at)
                } else {
                    let k = (t_ms - start_at) / every_ms + 1;
                    start_at.checked_add(k.checked_mul(*every_ms)?)
                }
            }
            Trigger::Cron { cron, tz } => cron_next_after(cron, tz, t_ms),
        }
    }
}

fn cron_next_after(cron: &Cron, tz: &Tz, t_ms: i64) -> Option<i64> {
    let after = DateTime::from_timestamp_millis(t_ms)?;
    // Walk wall-clock matches from the wall time of `t_ms` (whole seconds:
    // ticks are whole seconds). Mapping wall times to instants is monotone
    // except in a repeated hour, so the first match whose instant lies
    // after `t_ms` is the answer; matches before it are skipped.
    let mut cursor = after.with_timezone(tz).naive_local().with_nanosecond(0)?;
    for _ in 0..MAX_WALK {
        let m = cron.find_next_occurrence(&cursor, false).ok()?;
        let instant = resolve(tz, m)?;
        if instant > t_ms {
            return Some(instant);
        }
        cursor = m;
    }
    None
}

/// The instant a wall-clock tick fires at: its first occurrence when the
/// clock repeats it, the end of the gap when the clock skips it.
fn resolve(tz: &Tz, local: NaiveDateTime) -> Option<i64> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(d) => Some(d.timestamp_millis()),
        LocalResult::Ambiguous(first, _) => Some(first.timestamp_millis()),
        LocalResult::None => gap_end(tz, local),
    }
}

/// The first instant after a skipped wall time: step forward a minute at a
/// time out of the gap, then back a second at a time to its exact edge.
fn gap_end(tz: &Tz, local: NaiveDateTime) -> Option<i64> {
    let mut probe = local;
    // Real gaps last at most a day (Samoa, 2011).
    for _ in 0..(26 * 60) {
        probe = probe.checked_add_signed(TimeDelta::minutes(1))?;
        if let Some(valid) = tz.from_local_datetime(&probe).earliest() {
            let mut edge = valid;
            for _ in 0..60 {
                let earlier = edge
                    .naive_local()
                    .checked_sub_signed(TimeDelta::seconds(1))?;
                match tz.from_local_datetime(&earlier).earliest() {
                    Some(e) => edge = e,
                    None => break,
                }
            }
            return Some(edge.timestamp_millis());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn iso(t: i64, tz: Tz) -> String {
        DateTime::<Utc>::from_timestamp_millis(t)
            .unwrap()
            .with_timezone(&tz)
            .to_rfc3339()
    }

    fn cron(expr: &str, zone: &str) -> Trigger {
        Trigger::cron(expr, zone.parse().unwrap()).unwrap()
    }

    /// The ticks strictly after `from`, rendered in the zone.
    fn ticks(t: &Trigger, from: &str, n: usize) -> Vec<String> {
        let tz = match t {
            Trigger::Cron { tz, .. } => *tz,
            _ => Tz::UTC,
        };
        let mut at = ms(from);
        (0..n)
            .map(|_| {
                at = t.next_after(at).unwrap();
                iso(at, tz)
            })
            .collect()
    }

    /// Asserts the ticks of cron `expr` in `zone` after `from`.
    fn assert_ticks(expr: &str, zone: &str, from: &str, want: &[&str]) {
        assert_eq!(
            ticks(&cron(expr, zone), from, want.len()),
            want,
            "{expr} in {zone}"
        );
    }

    /// Pins croner's field counts with `Seconds::Optional`: a sixth field
    /// is a leading seconds field, and five fields fire at second 0.
    #[test]
    fn six_fields_have_seconds_five_fire_at_second_zero() {
        assert_ticks(
            "*/2 * * * * *",
            "UTC",
            "2026-01-01T00:00:00.500Z",
            &[
                "2026-01-01T00:00:02+00:00",
                "2026-01-01T00:00:04+00:00",
                "2026-01-01T00:00:06+00:00",
            ],
        );
        assert_ticks(
            "*/15 * * * *",
            "UTC",
            "2026-01-01T00:00:01Z",
            &["2026-01-01T00:15:00+00:00", "2026-01-01T00:30:00+00:00"],
        );
    }

    /// Pins croner's Unix day-of-week numbering: 0 and 7 are Sunday, names
    /// in any case, `1-5` Monday to Friday.
    #[test]
    fn unix_day_of_week_rules() {
        // 2026-01-04 is a Sunday: 0 and 7 both mean Sunday.
        for dow in ["0", "7", "SUN", "sun"] {
            let t = cron(&format!("0 12 * * {dow}"), "UTC");
            assert_eq!(
                ticks(&t, "2026-01-01T00:00:00Z", 1),
                ["2026-01-04T12:00:00+00:00"],
                "{dow}"
            );
        }
        // 1-5 is Monday to Friday.
        // From a Friday, after 09:00.
        assert_ticks(
            "0 9 * * 1-5",
            "UTC",
            "2026-01-02T10:00:00Z",
            &["2026-01-05T09:00:00+00:00", "2026-01-06T09:00:00+00:00"],
        );
    }

    /// Pins croner's default OR of the two day fields when both are
    /// restricted (Vixie cron), not the AND some parsers use.
    #[test]
    fn day_of_month_and_day_of_week_are_ored() {
        // The 13th, or any Friday (Vixie cron), from Thu 2026-02-05.
        assert_ticks(
            "0 0 13 * 5",
            "UTC",
            "2026-02-05T00:00:00Z",
            &[
                "2026-02-06T00:00:00+00:00",
                "2026-02-13T00:00:00+00:00",
                "2026-02-20T00:00:00+00:00",
            ],
        );
    }

    /// Pins croner's aliases: every one docs/SCHEDULES.md lists, with the
    /// meaning Unix cron gives it (`@weekly` is Sunday midnight).
    #[test]
    fn aliases() {
        assert_ticks(
            "@hourly",
            "UTC",
            "2026-01-01T00:30:00Z",
            &["2026-01-01T01:00:00+00:00"],
        );
        assert_ticks(
            "@daily",
            "Europe/Berlin",
            "2026-01-01T12:00:00Z",
            &["2026-01-02T00:00:00+01:00"],
        );
        // 2026-01-01 is a Thursday; the next Sunday is the 4th.
        let t = cron("@weekly", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-01T12:00:00Z", 2),
            ["2026-01-04T00:00:00+00:00", "2026-01-11T00:00:00+00:00"]
        );
        let t = cron("@monthly", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-15T00:00:00Z", 2),
            ["2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"]
        );
        for yearly in ["@yearly", "@annually"] {
            let t = cron(yearly, "UTC");
            assert_eq!(
                ticks(&t, "2026-01-01T00:00:00Z", 1),
                ["2027-01-01T00:00:00+00:00"],
                "{yearly}"
            );
        }
    }

    /// Pins croner's reading of a day field left as `*`: the other day
    /// field alone decides (the OR of Vixie cron applies only when both are
    /// restricted, so `*` does not widen a restricted field to every day).
    #[test]
    fn a_wildcard_day_field_does_not_widen_the_other() {
        let t = cron("0 0 13 * *", "UTC");
        assert_eq!(
            ticks(&t, "2026-02-05T00:00:00Z", 2),
            ["2026-02-13T00:00:00+00:00", "2026-03-13T00:00:00+00:00"]
        );
        // Fridays only, from Thu 2026-02-05.
        let t = cron("0 0 * * 5", "UTC");
        assert_eq!(
            ticks(&t, "2026-02-05T00:00:00Z", 2),
            ["2026-02-06T00:00:00+00:00", "2026-02-13T00:00:00+00:00"]
        );
    }

    /// Pins croner's `L`: in day-of-month the month's last day, whatever
    /// its length; after a weekday number (`5L`) that weekday's last
    /// occurrence in the month.
    #[test]
    fn last_day_syntax() {
        let t = cron("0 0 L * *", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-31T12:00:00Z", 3),
            [
                "2026-02-28T00:00:00+00:00",
                "2026-03-31T00:00:00+00:00",
                "2026-04-30T00:00:00+00:00"
            ]
        );
        // The last Friday: 2026-01-30, then 2026-02-27.
        let t = cron("0 0 * * 5L", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-01T00:00:00Z", 2),
            ["2026-01-30T00:00:00+00:00", "2026-02-27T00:00:00+00:00"]
        );
    }

    /// Pins croner's `#`: `1#2` in day-of-week is the month's second Monday.
    #[test]
    fn nth_weekday_syntax() {
        let t = cron("0 9 * * 1#2", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-01T00:00:00Z", 2),
            ["2026-01-12T09:00:00+00:00", "2026-02-09T09:00:00+00:00"]
        );
    }

    /// Pins croner's `W`: the weekday nearest the given day of the month,
    /// the Friday before a Saturday and the Monday after a Sunday.
    #[test]
    fn nearest_weekday_syntax() {
        let t = cron("0 0 15W * *", "UTC");
        // 2026-07-15 is a Wednesday; 2026-08-15 a Saturday (fires Friday
        // the 14th); 2026-11-15 a Sunday (fires Monday the 16th).
        assert_eq!(
            ticks(&t, "2026-07-01T00:00:00Z", 2),
            ["2026-07-15T00:00:00+00:00", "2026-08-14T00:00:00+00:00"]
        );
        assert_eq!(
            ticks(&t, "2026-11-01T00:00:00Z", 1),
            ["2026-11-16T00:00:00+00:00"]
        );
    }

    /// Pins croner's search horizon: a date that exists only in leap years
    /// is found years ahead rather than refused as never matching.
    #[test]
    fn a_leap_day_is_found_years_ahead() {
        let t = cron("0 0 29 2 *", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-01T00:00:00Z", 2),
            ["2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]
        );
    }

    /// Pins what croner refuses (out-of-range values, day-of-week 8,
    /// words) and that a date that never exists finds no occurrence.
    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        let tz = Tz::UTC;
        for bad in [
            "",
            "* * * *",
            "* * * * * * *",
            "61 * * * *",
            "* * * * 8",
            "0 0 30 2 *",
            "bogus",
        ] {
            let e = Trigger::cron(bad, tz).unwrap_err();
            assert!(e.contains(bad) || bad.is_empty(), "{bad}: {e}");
        }
    }

    /// The DST rule is ours, not croner's: it needs croner to match naive
    /// wall times with no time zone, so a croner that brought its own gap
    /// handling to naive times (running a gap tick twice, or not at all)
    /// fails here.
    #[test]
    fn spring_forward_fires_once_at_the_end_of_the_gap() {
        // New York, 2026-03-08: 02:00 EST becomes 03:00 EDT.
        assert_ticks(
            "30 2 * * *",
            "America/New_York",
            "2026-03-07T12:00:00-05:00",
            &[
                "2026-03-08T03:00:00-04:00",
                "2026-03-09T02:30:00-04:00",
                "2026-03-10T02:30:00-04:00",
            ],
        );
        // A wildcard expression: every gap tick collapses into 03:00, once.
        assert_ticks(
            "*/20 * * * *",
            "America/New_York",
            "2026-03-08T01:30:00-05:00",
            &[
                "2026-03-08T01:40:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T03:20:00-04:00",
                "2026-03-08T03:40:00-04:00",
            ],
        );
        // Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST.
        assert_ticks(
            "15 2 * * *",
            "Europe/Berlin",
            "2026-03-28T12:00:00+01:00",
            &["2026-03-29T03:00:00+02:00", "2026-03-30T02:15:00+02:00"],
        );
        assert_ticks(
            "0 * * * *",
            "Europe/Berlin",
            "2026-03-29T01:30:00+01:00",
            &["2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"],
        );
    }

    /// The fold rule is ours as well: croner, matching naive wall times,
    /// sees the repeated hour once; `resolve` picks its first instant.
    #[test]
    fn fall_back_fires_once_at_the_first_occurrence() {
        // New York, 2026-11-01: 02:00 EDT becomes 01:00 EST.
        assert_ticks(
            "30 1 * * *",
            "America/New_York",
            "2026-10-31T12:00:00-04:00",
            &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
        );
        // Wildcards do not run the repeated hour twice either.
        assert_ticks(
            "*/30 * * * *",
            "America/New_York",
            "2026-11-01T00:45:00-04:00",
            &[
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T02:30:00-05:00",
            ],
        );
        // Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET.
        assert_ticks(
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-24T12:00:00+02:00",
            &["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
        );
        assert_ticks(
            "0 * * * *",
            "Europe/Berlin",
            "2026-10-25T01:30:00+02:00",
            &[
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T03:00:00+01:00",
                "2026-10-25T04:00:00+01:00",
            ],
        );
        // Starting inside the repeated hour's second pass skips its ticks.
        assert_ticks(
            "*/15 * * * *",
            "Europe/Berlin",
            "2026-10-25T02:20:00+01:00",
            &["2026-10-25T03:00:00+01:00"],
        );
    }

    #[test]
    fn intervals_and_one_shots() {
        let t = Trigger::Every {
            every_ms: 5000,
            start_at: 0,
        };
        assert_eq!(t.next_after(12_345), Some(15_000));
        assert_eq!(t.next_after(15_000), Some(20_000));
        let t = Trigger::Every {
            every_ms: 1000,
            start_at: 10_500,
        };
        assert_eq!(t.next_after(0), Some(10_500));
        assert_eq!(t.next_after(10_500), Some(11_500));
        let t = Trigger::At(7);
        assert_eq!(t.next_after(6), Some(7));
        assert_eq!(t.next_after(7), None);
    }
}
