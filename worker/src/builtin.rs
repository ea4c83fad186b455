//! The built-in task names every `kairos-worker` serves (see the contract):
//! `kairos.noop`, `kairos.sleep`, `kairos.fail` and `kairos.count`.

use crate::handler::{Registry, TaskContext, TaskError, TaskResult};
use serde::{Deserialize, Serialize};
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
/// Counts to the body's `{"to": N, "ms_per_step": M}`, a step every M ms,
/// saving a checkpoint and reporting progress at each step, and resumes
/// from the last checkpoint on a later attempt or redelivery. Its result is
/// `{"started_at": K, "to": N}`: K = 0 for a run from the start. With
/// `"fail_at": F` it fails (retryably) once on reaching F. For showing and
/// testing checkpoints.
pub const COUNT: &str = "kairos.count";

/// The highest `kairos.count` target.
pub(crate) const MAX_COUNT: u64 = 1_000_000;
/// The longest `kairos.count` step: a minute.
pub(crate) const MAX_STEP_MS: u64 = 60_000;

/// The longest `kairos.sleep`: one hour. It is a test and benchmark
/// helper; a longer sleep is a mistake (seconds taken for milliseconds)
/// that would hold a slot for hours.
pub(crate) const MAX_SLEEP_MS: u64 = 3_600_000;

/// Adds the built-in handlers to `registry` under their names.
pub(crate) fn register(registry: &mut Registry) {
    registry.register(NOOP, noop);
    registry.register(SLEEP, sleep);
    registry.register(FAIL, fail);
    registry.register(COUNT, count);
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountBody {
    to: u64,
    #[serde(default)]
    ms_per_step: u64,
    #[serde(default)]
    fail_at: Option<u64>,
}

/// What `kairos.count` saves at each step: the steps done.
#[derive(Serialize, Deserialize)]
struct CountCheckpoint {
    at: u64,
}

/// Reads `kairos.count`'s body; anything unusable is a permanent failure.
fn parse_count(body: &[u8]) -> Result<CountBody, TaskError> {
    let b = serde_json::from_slice::<CountBody>(body).map_err(|e| {
        TaskError::permanent(format!(
            "kairos.count needs a JSON body {{\"to\": N, \"ms_per_step\": M}}: {e}"
        ))
    })?;
    if b.to > MAX_COUNT || b.ms_per_step > MAX_STEP_MS {
        return Err(TaskError::permanent(format!(
            "kairos.count: `to` is at most {MAX_COUNT} and `ms_per_step` at most {MAX_STEP_MS}"
        )));
    }
    Ok(b)
}

async fn count(ctx: TaskContext, body: Vec<u8>) -> Result<serde_json::Value, TaskError> {
    let b = parse_count(&body)?;
    // A checkpoint that does not read is ignored: counting again is safe.
    let start = match ctx.checkpoint_json::<CountCheckpoint>() {
        Some(Ok(c)) => c.at.min(b.to),
        Some(Err(err)) => {
            tracing::warn!(cause = %err, "kairos.count: unreadable checkpoint; counting from 0");
            0
        }
        None => 0,
    };
    for done in start + 1..=b.to {
        tokio::time::sleep(Duration::from_millis(b.ms_per_step)).await;
        ctx.save_checkpoint_json(&CountCheckpoint { at: done })
            .await?;
        let percent = u8::try_from(done * 100 / b.to.max(1)).unwrap_or(100);
        ctx.progress(percent, format!("{done} of {}", b.to)).await;
        if b.fail_at == Some(done) && start < done {
            return Err(TaskError::retry(format!(
                "kairos.count fails once at {done}, as asked"
            )));
        }
    }
    Ok(serde_json::json!({ "started_at": start, "to": b.to }))
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

    #[test]
    fn count_body_is_checked() {
        let b = parse_count(br#"{"to": 5, "ms_per_step": 10}"#).unwrap();
        assert_eq!((b.to, b.ms_per_step, b.fail_at), (5, 10, None));
        for bad in [
            &br#"{"to": -1}"#[..],
            br#"{"to": 2000000}"#,
            br#"{"to": 5, "ms_per_step": 3600000}"#,
            br#"{"to": 5, "steps": 1}"#,
            b"",
        ] {
            assert!(
                matches!(parse_count(bad), Err(TaskError::Permanent(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn count_resumes_from_its_checkpoint() {
        use crate::task_io::tests::{io_with, MemStore};
        use std::sync::Arc;
        let store = Arc::new(MemStore::default());
        let (_, props) = kairos_shared::client::NewTask::new(COUNT)
            .id("c-1")
            .to_message()
            .unwrap();
        let task = kairos_shared::contract::Task::decode("default", &props, b"").unwrap();
        let body = br#"{"to": 4, "fail_at": 2}"#.to_vec();
        let ctx = || TaskContext::from_task(&task);
        let io = io_with(&store, 1024);
        let first = count(ctx().with_io(io.for_task(None)), body.clone()).await;
        assert!(matches!(first, Err(TaskError::Retry(_))), "{first:?}");
        let saved = store.checkpoints.lock().unwrap()["c-1"].clone();
        assert_eq!(saved, br#"{"at":2}"#);
        let second = count(ctx().with_io(io.for_task(Some(saved))), body).await;
        assert_eq!(second, Ok(serde_json::json!({"started_at": 2, "to": 4})));
        let progress = store.progress.lock().unwrap();
        assert_eq!(
            progress.last().map(|p| (p.1, p.2.as_str())),
            Some((100, "4 of 4"))
        );
    }
}
