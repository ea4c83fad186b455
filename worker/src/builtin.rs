//! The built-in task names every `kairos-worker` serves (see the contract):
//! `kairos.noop`, `kairos.sleep` and `kairos.fail`.

use crate::handler::{Registry, TaskContext, TaskError, TaskResult};
use serde::Deserialize;
use std::time::Duration;

pub const NOOP: &str = "kairos.noop";
pub const SLEEP: &str = "kairos.sleep";
pub const FAIL: &str = "kairos.fail";

pub fn register(registry: &mut Registry) {
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

/// Reads `{"ms": N}`; anything else is a permanent failure, since no retry
/// makes the body readable.
fn parse_sleep(body: &[u8]) -> Result<Duration, TaskError> {
    serde_json::from_slice::<SleepBody>(body)
        .map(|b| Duration::from_millis(b.ms))
        .map_err(|e| {
            TaskError::permanent(format!("kairos.sleep needs a JSON body {{\"ms\": N}}: {e}"))
        })
}

async fn sleep(_: TaskContext, body: Vec<u8>) -> TaskResult {
    tokio::time::sleep(parse_sleep(&body)?).await;
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

    #[test]
    fn sleep_body_is_checked() {
        assert_eq!(parse_sleep(br#"{"ms": 25}"#), Ok(Duration::from_millis(25)));
        for bad in [
            &b"not json"[..],
            br#"{"ms": -1}"#,
            br#"{"seconds": 1}"#,
            b"",
        ] {
            assert!(
                matches!(parse_sleep(bad), Err(TaskError::Permanent(_))),
                "{bad:?}"
            );
        }
    }
}
