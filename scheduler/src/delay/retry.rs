//! Retry policy: how long a failed attempt waits, and when retries run out.
//!
//! The delay after failed attempt `n` is drawn below a ceiling of
//! `base * 2^(n-1)`, capped at `max`. Jitter spreads a burst of failures so
//! they do not return as a burst:
//!
//! * `equal` (default): uniform in `[ceiling/2, ceiling]`. Gaps still grow
//!   from one attempt to the next, which users of Sidekiq and Celery expect.
//! * `full`: uniform in `[0, ceiling]` (best spreading, but a later gap can
//!   be shorter than an earlier one).
//! * `none`: exactly the ceiling.
//!
//! A handler may choose the delay of one retry itself (Retry-After): the
//! failed attempt then carries `x-retry-after-ms`, which replaces the drawn
//! delay for that retry only ([`take_retry_after`]). It does not add
//! retries: a task whose retries are used up is dead-lettered all the same.

use kairos_shared::contract::{int_header, Task, H_RETRY_AFTER_MS, MAX_RETRIES_CAP};
use lapin::types::FieldTable;
use rand::Rng;

/// Retries of a task without an `x-max-retries` header, by default.
const DEFAULT_MAX_RETRIES: u32 = 3;
/// The ceiling of the first retry's delay, by default.
const DEFAULT_BASE_MS: u64 = 1_000;
/// The longest delay between attempts, by default: an hour.
const DEFAULT_MAX_MS: u64 = 3_600_000;
/// Doublings of the base past which the ceiling cannot grow: `base * 2^40`
/// is beyond any cap, and a larger shift would overflow.
const MAX_DOUBLINGS: u32 = 40;

/// How a retry's delay is drawn below its ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`.
    Full,
    /// Uniform in `[ceiling/2, ceiling]`.
    Equal,
    /// Exactly the ceiling.
    None,
}

/// How long failed attempts wait, and how many retries a task gets.
#[derive(Clone, Debug)]
pub(crate) struct RetryPolicy {
    /// Retries when a task has no `x-max-retries` header.
    pub default_max_retries: u32,
    /// The ceiling of the delay after the first failed attempt; it doubles
    /// with each attempt after.
    pub base_ms: u64,
    /// The ceiling never exceeds this.
    pub max_ms: u64,
    /// How the delay is drawn below the ceiling.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            default_max_retries: DEFAULT_MAX_RETRIES,
            base_ms: DEFAULT_BASE_MS,
            max_ms: DEFAULT_MAX_MS,
            jitter: Jitter::Equal,
        }
    }
}

/// What becomes of a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Hold the task again, then run attempt `next_attempt`.
    Retry {
        /// The attempt the retry is.
        next_attempt: u32,
        /// How long it waits.
        delay_ms: u64,
    },
    /// Retries are used up: dead-letter it.
    Exhausted,
}

impl RetryPolicy {
    /// The upper bound of the delay after `failed_attempt` fails.
    pub(crate) fn ceiling_ms(&self, failed_attempt: u32) -> u64 {
        let shift = failed_attempt.saturating_sub(1).min(MAX_DOUBLINGS);
        self.base_ms.saturating_mul(1u64 << shift).min(self.max_ms)
    }

    /// The delay after `failed_attempt` fails: below its ceiling, per the
    /// jitter.
    pub(crate) fn delay_ms(&self, failed_attempt: u32, rng: &mut impl Rng) -> u64 {
        let c = self.ceiling_ms(failed_attempt);
        match self.jitter {
            Jitter::None => c,
            Jitter::Full => rng.random_range(0..=c),
            Jitter::Equal => c / 2 + rng.random_range(0..=c - c / 2),
        }
    }

    /// `max_retries` counts retries after the first attempt, so attempt
    /// `max_retries + 1` is the last. The arithmetic saturates: an attempt
    /// number at the top of its range (a forged `x-attempt`) is exhausted,
    /// never wrapped to attempt 0, which no record can hold.
    pub(crate) fn decide(
        &self,
        failed_attempt: u32,
        max_retries: Option<u32>,
        rng: &mut impl Rng,
    ) -> Decision {
        let max = max_retries
            .unwrap_or(self.default_max_retries)
            .min(MAX_RETRIES_CAP);
        match failed_attempt.checked_add(1) {
            Some(next_attempt) if failed_attempt <= max => Decision::Retry {
                next_attempt,
                delay_ms: self.delay_ms(failed_attempt, rng),
            },
            _ => Decision::Exhausted,
        }
    }
}

/// Takes the handler's Retry-After off a failed attempt: removes
/// `x-retry-after-ms` from its headers (so it applies to this retry only,
/// never to a later one) and returns the delay it asks for. A value that
/// is not an integer from 0 to `max_delay_ms` (`KAIROS_MAX_DELAY_MS`) is
/// ignored with a warning: the computed backoff applies. A delay beyond the
/// horizon is a unit mistake (seconds taken for milliseconds, or worse),
/// not something to hold a task for.
pub(crate) fn take_retry_after(task: &mut Task, max_delay_ms: i64) -> Option<u64> {
    let headers = task.properties.headers().as_ref()?;
    if !headers.contains_key(H_RETRY_AFTER_MS) {
        return None;
    }
    let wanted = int_header(headers, H_RETRY_AFTER_MS);
    let mut rest = headers.inner().clone();
    rest.remove(H_RETRY_AFTER_MS);
    task.properties = std::mem::take(&mut task.properties).with_headers(FieldTable::from(rest));
    match wanted {
        Ok(Some(ms)) if (0..=max_delay_ms).contains(&ms) => u64::try_from(ms).ok(),
        Ok(value) => {
            tracing::warn!(task_id = %task.id, value = ?value, max_delay_ms, "x-retry-after-ms out of range (0 to KAIROS_MAX_DELAY_MS); the backoff applies");
            None
        }
        Err(err) => {
            tracing::warn!(task_id = %task.id, cause = %err, "x-retry-after-ms unusable; the backoff applies");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            default_max_retries: 3,
            base_ms: 100,
            max_ms: 1_000,
            jitter,
        }
    }

    #[test]
    fn ceilings_double_and_cap() {
        let p = policy(Jitter::None);
        let c: Vec<u64> = (1..=6).map(|a| p.ceiling_ms(a)).collect();
        assert_eq!(c, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.ceiling_ms(u32::MAX), 1000);
    }

    #[test]
    fn jitter_stays_in_its_window() {
        let mut rng = rand::rng();
        for attempt in 1..6 {
            for _ in 0..200 {
                let c = policy(Jitter::Full).ceiling_ms(attempt);
                let full = policy(Jitter::Full).delay_ms(attempt, &mut rng);
                assert!(full <= c);
                let eq = policy(Jitter::Equal).delay_ms(attempt, &mut rng);
                assert!(eq >= c / 2 && eq <= c, "{eq} not in [{}, {c}]", c / 2);
            }
        }
    }

    #[test]
    fn equal_jitter_gaps_never_shrink_below_the_cap() {
        let mut rng = rand::rng();
        let p = policy(Jitter::Equal);
        for _ in 0..500 {
            let gaps: Vec<u64> = (1..=3).map(|a| p.delay_ms(a, &mut rng)).collect();
            assert!(gaps[0] <= gaps[1] && gaps[1] <= gaps[2], "{gaps:?}");
        }
    }

    #[test]
    fn max_retries_counts_retries_after_the_first_attempt() {
        let mut rng = rand::rng();
        let p = policy(Jitter::None);
        assert_eq!(
            p.decide(1, Some(3), &mut rng),
            Decision::Retry {
                next_attempt: 2,
                delay_ms: 100
            }
        );
        assert!(matches!(
            p.decide(3, Some(3), &mut rng),
            Decision::Retry {
                next_attempt: 4,
                ..
            }
        ));
        assert_eq!(p.decide(4, Some(3), &mut rng), Decision::Exhausted);
        assert_eq!(p.decide(1, Some(0), &mut rng), Decision::Exhausted);
        // Without a header the deployment default (3) applies.
        assert_eq!(p.decide(4, None, &mut rng), Decision::Exhausted);
    }

    #[test]
    fn attempts_at_the_top_of_the_range_do_not_wrap() {
        let mut rng = rand::rng();
        let p = policy(Jitter::None);
        // x-attempt = x-max-retries = u32::MAX once wrapped to attempt 0.
        assert_eq!(
            p.decide(u32::MAX, Some(u32::MAX), &mut rng),
            Decision::Exhausted
        );
        assert_eq!(p.decide(u32::MAX, None, &mut rng), Decision::Exhausted);
        // A cap above MAX_RETRIES_CAP (a deployment default, or a decoder
        // that let one through) counts as the cap.
        let cap = MAX_RETRIES_CAP;
        assert!(matches!(
            p.decide(cap, Some(u32::MAX), &mut rng),
            Decision::Retry { next_attempt, .. } if next_attempt == cap + 1
        ));
        assert_eq!(
            p.decide(cap + 1, Some(u32::MAX), &mut rng),
            Decision::Exhausted
        );
    }

    fn failed_with(value: Option<lapin::types::AMQPValue>) -> Task {
        let mut t = kairos_shared::client::NewTask::new("x").id("t-1");
        if let Some(v) = value {
            t = t.header(H_RETRY_AFTER_MS, v);
        }
        let (_, props) = t.to_message().expect("message");
        Task::decode("q", &props, b"").expect("task")
    }

    #[test]
    fn retry_after_is_taken_once_and_checked() {
        use lapin::types::AMQPValue;
        let mut t = failed_with(Some(AMQPValue::LongLongInt(2_500)));
        assert_eq!(take_retry_after(&mut t, 10_000), Some(2_500));
        assert!(t.header(H_RETRY_AFTER_MS).is_none(), "removed");
        assert_eq!(take_retry_after(&mut t, 10_000), None);
        // Any integer width, or a decimal string, as every integer header.
        let mut t = failed_with(Some(AMQPValue::LongString("0".into())));
        assert_eq!(take_retry_after(&mut t, 10_000), Some(0));
        for bad in [
            AMQPValue::LongLongInt(-1),
            AMQPValue::LongLongInt(10_001),
            AMQPValue::LongString("soon".into()),
            AMQPValue::Boolean(true),
        ] {
            let mut t = failed_with(Some(bad.clone()));
            assert_eq!(take_retry_after(&mut t, 10_000), None, "{bad:?}");
            assert!(t.header(H_RETRY_AFTER_MS).is_none(), "{bad:?} removed");
        }
        assert_eq!(take_retry_after(&mut failed_with(None), 10_000), None);
    }
}
