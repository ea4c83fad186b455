//! The built-in task names every `kairos-worker` serves (see the contract):
//! `kairos.noop`, `kairos.sleep` and `kairos.fail`.

use crate::handler::{Registry, TaskContext, TaskError, TaskResult};
use serde::Deserialize;
use std::time::Duration;

/// Succeeds at once, whatever the body: for measuring the platform's own
/// cost per task.
pub const NOOP: &str = "kairos.noop";
/// Sleeps for the body's `{"ms": N}`, then succeeds: for tasks that hold a
/// slot for a known time.
pub const SLEEP: &str = "kairos.sleep";
/// Fails every attempt with a retryable error: for exercising retries and
/// dead-lettering.
pub const FAIL: &str = "kairos.fail";

/// The longest `kairos.sleep`: one hour. It is a test and benchmark
/// helper; a longer sleep is a mistake (seconds taken for milliseconds)
/// that would hold a slot for hours.
pub(crate) const MAX_SLEEP_MS: u64 = 3_600_000;

/// Adds the built-in handlers to `registry` under their names.
pub(crate) fn register(registry: &mut Registry) {
    registry.register(NOOP, noop);
    registry.register(SLEEP, sleep);
    registry.register(FAIL, fail);
}

async fn noop(_: TaskContext, _: Vec<u8>) -> TaskResult {
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepBody {
    ms: u64,
}

/// Reads `{"ms": N}` with N at most [`MAX_SLEEP_MS`] and below the
/// attempt's time limit. Anything else is a permanent failure (dead letter
/// with the reason): no retry makes the body readable, and a sleep longer
/// than its time limit would time out on every attempt.
fn parse_sleep(body: &[u8], limit: Duration) -> Result<Duration, TaskError> {
    let ms = serde_json::from_slice::<SleepBody>(body)
        .map_err(|e| {
            TaskError::permanent(format!("kairos.sleep needs a JSON body {{\"ms\": N}}: {e}"))
        })?
        .ms;
    if ms > MAX_SLEEP_MS {
        return Err(TaskError::permanent(format!(
            "kairos.sleep of {ms} ms is over its maximum of {MAX_SLEEP_MS} ms"
        )));
    }
    let wanted = Duration::from_millis(ms);
    if wanted >= limit {
        return Err(TaskError::permanent(format!(
            "kairos.sleep of {ms} ms cannot finish within the attempt's time limit of {} ms (x-timeout-ms or KAIROS_TASK_TIMEOUT_MS)",
            limit.as_millis()
        )));
    }
    Ok(wanted)
}

async fn sleep(ctx: TaskContext, body: Vec<u8>) -> TaskResult {
    tokio::time::sleep(parse_sleep(&body, ctx.timeout)?).await;
    Ok(())
}

async fn fail(ctx: TaskContext, _: Vec<u8>) -> TaskResult {
    Err(TaskError::retry(format!(
        "kairos.fail fails every attempt (attempt {})",
        ctx.attempt
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(7200);

    #[test]
    fn sleep_body_is_checked() {
        assert_eq!(
            parse_sleep(br#"{"ms": 25}"#, HOUR),
            Ok(Duration::from_millis(25))
        );
        for bad in [
            &b"not json"[..],
            br#"{"ms": -1}"#,
            br#"{"seconds": 1}"#,
            b"",
        ] {
            assert!(
                matches!(parse_sleep(bad, HOUR), Err(TaskError::Permanent(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sleep_is_bounded() {
        let max = format!(r#"{{"ms": {MAX_SLEEP_MS}}}"#);
        assert!(parse_sleep(max.as_bytes(), HOUR).is_ok());
        let over = format!(r#"{{"ms": {}}}"#, MAX_SLEEP_MS + 1);
        let err = parse_sleep(over.as_bytes(), HOUR).unwrap_err().to_string();
        assert!(err.contains("maximum"), "{err}");
        let err = parse_sleep(br#"{"ms": 5000}"#, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("time limit"), "{err}");
    }
}
