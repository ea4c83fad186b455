//! Limits on what one message may carry and ask for (docs/RELIABILITY.md,
//! "Limits"). The scheduler checks them where a task enters (the `NS.delay`
//! intake and `POST /v1/tasks`); a message over a limit is dead-lettered
//! with a reason naming the limit, or refused over HTTP.

use crate::contract::{encoded_properties, ProtocolError, H_DELAY_MS, H_RUN_AT};
use lapin::BasicProperties;

/// Default body cap: 4 MiB. RabbitMQ 4 refuses messages above 16 MiB by
/// default (`max_message_size`), 3.x above 128 MiB; a task body is a
/// description of work, not the data it works on.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Default cap on the encoded properties (headers included): 32 KiB. The
/// properties travel in one content-header frame, which must fit the
/// negotiated `frame_max` (RabbitMQ's default 128 KiB, at least 4 KiB);
/// Kairos adds up to about 4.2 KiB on a retry or dead letter (`x-error`,
/// capped at 4 KiB, `x-attempt`, `x-failed-at`, `x-origin-queue`).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Default horizon: 3,650 days. A due time further ahead is a mistake in
/// units far more often than a plan (microseconds put it 55,000 years out).
pub const DEFAULT_MAX_DELAY_MS: i64 = 3_650 * DAY_MS;

const DAY_MS: i64 = 86_400_000;

/// The limits in force (the scheduler's `KAIROS_MAX_*` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest body, in bytes (`KAIROS_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Largest encoded properties and headers (`KAIROS_MAX_HEADER_BYTES`).
    pub max_header_bytes: usize,
    /// Furthest due time ahead, in ms (`KAIROS_MAX_DELAY_MS`).
    pub max_delay_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_delay_ms: DEFAULT_MAX_DELAY_MS,
        }
    }
}

impl Limits {
    /// The body cap alone: checked first, so the HTTP API can answer 413.
    pub fn check_body(&self, body_len: usize) -> Result<(), ProtocolError> {
        if body_len > self.max_body_bytes {
            return Err(ProtocolError::OverLimit(format!(
                "body of {body_len} bytes exceeds KAIROS_MAX_BODY_BYTES ({} bytes)",
                self.max_body_bytes
            )));
        }
        Ok(())
    }

    /// Body and header caps of a message as received.
    pub fn check_message(
        &self,
        properties: &BasicProperties,
        body_len: usize,
    ) -> Result<(), ProtocolError> {
        self.check_body(body_len)?;
        let header_len = encoded_properties(properties)?.len();
        if header_len > self.max_header_bytes {
            return Err(ProtocolError::OverLimit(format!(
                "properties and headers of {header_len} bytes exceed KAIROS_MAX_HEADER_BYTES ({} bytes; Kairos adds up to 4.2 KiB on a retry, and all of it must fit one AMQP frame)",
                self.max_header_bytes
            )));
        }
        Ok(())
    }

    /// The due time a task asks for, against the horizon: `x-run-at` no
    /// further than `max_delay_ms` after `now_ms`, `x-delay-ms` no longer.
    pub fn check_due(
        &self,
        run_at: Option<i64>,
        delay_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), ProtocolError> {
        let horizon_days = self.max_delay_ms / DAY_MS;
        let too_far = |name: &'static str, value: i64, ahead: i64, unit_hint: &str| {
            ProtocolError::BadHeader {
                name,
                reason: format!(
                    "{value} is too far ahead: {} days, beyond the horizon of {horizon_days} days (KAIROS_MAX_DELAY_MS = {} ms){unit_hint}",
                    ahead / DAY_MS,
                    self.max_delay_ms
                ),
            }
        };
        if let Some(at) = run_at {
            let ahead = at.saturating_sub(now_ms);
            if ahead > self.max_delay_ms {
                return Err(too_far(
                    H_RUN_AT,
                    at,
                    ahead,
                    "; x-run-at is Unix epoch milliseconds, not microseconds or nanoseconds",
                ));
            }
        } else if let Some(delay) = delay_ms {
            if delay > self.max_delay_ms {
                return Err(too_far(
                    H_DELAY_MS,
                    delay,
                    delay,
                    "; x-delay-ms is milliseconds, not microseconds",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    const NOW: i64 = 1_764_000_000_000;

    #[test]
    fn a_run_at_in_microseconds_is_too_far_ahead_and_says_why() {
        let l = Limits::default();
        let err = l.check_due(Some(NOW * 1000), None, NOW).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("x-run-at"), "{text}");
        assert!(text.contains("too far ahead"), "{text}");
        assert!(text.contains("microseconds"), "{text}");
        assert!(text.contains("3650 days"), "{text}");
        // Nine years ahead is a plan; eleven is not.
        assert!(l.check_due(Some(NOW + 9 * 365 * DAY_MS), None, NOW).is_ok());
        assert!(l
            .check_due(Some(NOW + 11 * 365 * DAY_MS), None, NOW)
            .is_err());
        // In the past, or far in the past, is due now: not refused.
        assert!(l.check_due(Some(i64::MIN), None, NOW).is_ok());
        // x-run-at wins: a huge x-delay-ms beside it is ignored, as by due_at.
        assert!(l.check_due(Some(NOW), Some(i64::MAX), NOW).is_ok());
    }

    #[test]
    fn a_huge_delay_is_too_far_ahead() {
        let l = Limits::default();
        let err = l.check_due(None, Some(i64::MAX), NOW).unwrap_err();
        assert!(err.to_string().contains("x-delay-ms"), "{err}");
        assert!(err.to_string().contains("too far ahead"), "{err}");
        assert!(l.check_due(None, Some(DEFAULT_MAX_DELAY_MS), NOW).is_ok());
        assert!(l.check_due(None, Some(-5), NOW).is_ok());
    }

    #[test]
    fn bodies_and_headers_over_their_caps_name_the_setting() {
        let l = Limits {
            max_body_bytes: 10,
            max_header_bytes: 200,
            ..Limits::default()
        };
        let p = BasicProperties::default().with_type("t".into());
        assert!(l.check_message(&p, 10).is_ok());
        let err = l.check_message(&p, 11).unwrap_err().to_string();
        assert!(err.contains("KAIROS_MAX_BODY_BYTES (10 bytes)"), "{err}");
        let mut h = FieldTable::default();
        h.insert("note".into(), AMQPValue::LongString("x".repeat(300).into()));
        let err = l
            .check_message(&p.with_headers(h), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("KAIROS_MAX_HEADER_BYTES (200 bytes"), "{err}");
    }
}
