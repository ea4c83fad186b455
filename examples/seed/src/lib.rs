//! The seed example's handlers: the design note behind Kairos ran three
//! interval jobs (every 5, 10 and 15 s; priorities 1, 2, 3; resource needs
//! 1, 2, 3) in an in-process APScheduler. Here the schedules live in
//! `schedules.toml` and these handlers run in any number of workers.

use kairos_worker::{TaskContext, TaskError, Worker};
use std::time::Duration;

/// The three task names, in order.
pub const TASKS: [&str; 3] = ["seed.task1", "seed.task2", "seed.task3"];

/// One job: reads its resource need from the body and "works" for that
/// many tenths of a second.
pub async fn job(ctx: TaskContext, body: Vec<u8>) -> Result<(), TaskError> {
    let body: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| TaskError::Permanent(format!("body: {e}")))?;
    let resources = body["resources"].as_u64().unwrap_or(1);
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
