//! The seed example's handlers: the design note behind Kairos ran three
//! interval jobs (every 5, 10 and 15 s; priorities 1, 2, 3; resource needs
//! 1, 2, 3) in an in-process APScheduler. Here the schedules live in
//! `schedules.toml` and these handlers run in any number of workers. The
//! resource needs are each task's `x-cost`: a worker runs a task only when
//! its cost fits in its free units (`KAIROS_CAPACITY`).

use kairos_shared::client::NewTask;
use kairos_shared::contract::{int_header, H_COST};
use kairos_worker::{TaskContext, TaskError, Worker};
use std::time::Duration;

/// The three task names, in order.
pub const TASKS: [&str; 3] = ["seed.task1", "seed.task2", "seed.task3"];

/// One run of seed task `n` (1, 2 or 3) as its schedule sends it:
/// priority `n`, cost `n` (`x-cost`), body `{"resources": n}`. For
/// enqueueing one by hand; `None` for another `n`.
pub fn task(n: u8) -> Option<NewTask> {
    let name = TASKS.get(usize::from(n).checked_sub(1)?)?;
    Some(
        NewTask::new(*name)
            .priority(n)
            .cost(u32::from(n))
            .body(format!(r#"{{"resources": {n}}}"#)),
    )
}

/// One job: "works" for as many tenths of a second as the resource units
/// it holds (its `x-cost`; the body's `resources` for a task sent without
/// one).
pub async fn job(ctx: TaskContext, body: Vec<u8>) -> Result<(), TaskError> {
    let body: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| TaskError::Permanent(format!("body: {e}")))?;
    let declared = int_header(&ctx.headers, H_COST).map_err(TaskError::permanent)?;
    let resources = declared
        .and_then(|c| u64::try_from(c).ok())
        .or_else(|| body["resources"].as_u64())
        .unwrap_or(1);
    let late = ctx.due_at.map(|d| kairos_shared::amqp::now_ms() - d);
    tracing::info!(task = %ctx.name, id = %ctx.id, priority = ctx.priority, resources, late_ms = ?late, "seed job running");
    tokio::time::sleep(Duration::from_millis(100 * resources)).await;
    Ok(())
}

/// A worker with the three handlers registered.
pub fn worker(config: kairos_worker::Config) -> Worker {
    TASKS
        .iter()
        .fold(Worker::new(config), |w, name| w.handler(*name, job))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_task_costs_its_resource_needs() {
        for n in 1..=3u8 {
            let (_, props) = task(n).expect("a seed task").to_message().expect("message");
            let headers = props.headers().clone().unwrap_or_default();
            assert_eq!(int_header(&headers, H_COST).unwrap(), Some(i64::from(n)));
            assert_eq!(props.priority(), &Some(n));
        }
        assert!(task(0).is_none() && task(4).is_none());
    }

    #[test]
    fn the_schedules_declare_the_same_costs() {
        let file = include_str!("../schedules.toml");
        for n in 1..=3 {
            let line = format!(r#"name = "seed.task{n}", priority = {n}, cost = {n},"#);
            assert!(file.contains(&line), "schedules.toml: {line}");
        }
    }
}
