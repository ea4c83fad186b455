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

/// Default bound of a handler's result: 1 MiB.
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 1024 * 1024;
/// Default bound of a handler's checkpoint: 1 MiB.
pub const DEFAULT_MAX_CHECKPOINT_BYTES: u64 = 1024 * 1024;
/// Highest bound either setting takes: 64 MiB. Results and checkpoints
/// live in Redis's memory beside every task's status.
pub const MAX_HANDLER_BYTES: u64 = 64 * 1024 * 1024;
/// Longest progress message kept, in bytes: a longer one is cut at a
/// character boundary.
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 1024;

/// Bounds on what a handler leaves in Redis: its result and its
/// checkpoints. The worker checks them for Rust handlers, the scheduler's
/// HTTP routes for handlers in other languages; set them alike on both.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandlerLimits {
    /// Largest result a handler may leave, in bytes (the JSON text, or the
    /// bytes). A larger result is dropped: the task still succeeds, its
    /// status says why it has no result (over HTTP: 413).
    #[arg(long, env = "KAIROS_MAX_RESULT_BYTES", value_name = "KAIROS_MAX_RESULT_BYTES", default_value_t = DEFAULT_MAX_RESULT_BYTES, value_parser = clap::value_parser!(u64).range(1..=MAX_HANDLER_BYTES))]
    pub max_result_bytes: u64,

    /// Largest checkpoint a handler may save, in bytes; a larger one is
    /// refused (the handler gets an error; over HTTP: 413).
    #[arg(long, env = "KAIROS_MAX_CHECKPOINT_BYTES", value_name = "KAIROS_MAX_CHECKPOINT_BYTES", default_value_t = DEFAULT_MAX_CHECKPOINT_BYTES, value_parser = clap::value_parser!(u64).range(1..=MAX_HANDLER_BYTES))]
    pub max_checkpoint_bytes: u64,
}

impl Default for HandlerLimits {
    fn default() -> Self {
        HandlerLimits {
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_checkpoint_bytes: DEFAULT_MAX_CHECKPOINT_BYTES,
        }
    }
}

impl HandlerLimits {
    /// Checks a result of `len` bytes; the error names the setting.
    pub fn check_result(&self, len: usize) -> Result<(), String> {
        over(
            "result",
            len,
            self.max_result_bytes,
            "KAIROS_MAX_RESULT_BYTES",
        )
    }

    /// Checks a checkpoint of `len` bytes; the error names the setting.
    pub fn check_checkpoint(&self, len: usize) -> Result<(), String> {
        over(
            "checkpoint",
            len,
            self.max_checkpoint_bytes,
            "KAIROS_MAX_CHECKPOINT_BYTES",
        )
    }
}

fn over(what: &str, len: usize, max: u64, setting: &str) -> Result<(), String> {
    if u64::try_from(len).unwrap_or(u64::MAX) > max {
        return Err(format!(
            "{what} of {len} bytes exceeds {setting} ({max} bytes)"
        ));
    }
    Ok(())
}

/// `message` cut to at most [`MAX_PROGRESS_MESSAGE_BYTES`], at a character
/// boundary.
pub fn progress_message(message: &str) -> &str {
    if message.len() <= MAX_PROGRESS_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_PROGRESS_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

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

    #[test]
    fn handler_limits_name_their_setting() {
        let l = HandlerLimits::default();
        assert!(l.check_result(1024 * 1024).is_ok());
        let err = l.check_result(1024 * 1024 + 1).unwrap_err();
        assert!(err.contains("KAIROS_MAX_RESULT_BYTES"), "{err}");
        let err = l.check_checkpoint(2 << 20).unwrap_err();
        assert!(err.contains("KAIROS_MAX_CHECKPOINT_BYTES"), "{err}");
    }

    #[test]
    fn progress_messages_are_cut_at_a_character() {
        assert_eq!(progress_message("half way"), "half way");
        let long = "é".repeat(MAX_PROGRESS_MESSAGE_BYTES);
        let cut = progress_message(&long);
        assert!(
            cut.len() <= MAX_PROGRESS_MESSAGE_BYTES && cut.len() >= MAX_PROGRESS_MESSAGE_BYTES - 1
        );
        assert!(cut.chars().all(|c| c == 'é'));
    }
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
