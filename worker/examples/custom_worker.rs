//! Your own worker binary: the kairos-worker library with your handlers.
//!
//! ```sh
//! KAIROS_QUEUES=default,emails cargo run -p kairos-worker --example custom_worker
//! ```
//!
//! Then enqueue from any language, e.g.
//! `python3 docs/examples/python/enqueue.py --name email.send --queue emails --body '{"to":"a@b.c"}'`.

use clap::Parser;
use kairos_worker::{Config, TaskContext, TaskError, Worker};
use serde::Deserialize;

#[derive(Deserialize)]
struct Email {
    to: String,
}

/// A handler is any `async fn(TaskContext, Vec<u8>) -> Result<(), TaskError>`.
async fn send_email(ctx: TaskContext, body: Vec<u8>) -> Result<(), TaskError> {
    // A body that cannot be read will never succeed: fail permanently, so it
    // goes to the dead-letter queue at once instead of being retried.
    let email: Email = serde_json::from_slice(&body).map_err(TaskError::permanent)?;
    if email.to.is_empty() {
        return Err(TaskError::permanent("no recipient"));
    }
    // A transient failure (SMTP down, say) would be `TaskError::retry(..)`:
    // Kairos retries it with backoff up to `x-max-retries`.
    tracing::info!(task_id = %ctx.id, attempt = ctx.attempt, to = %email.to, "sending email");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    // The same settings as kairos-worker: KAIROS_QUEUES, KAIROS_CONCURRENCY, ...
    let config = Config::parse();
    Worker::new(config)
        .with_builtins()
        .handler("email.send", send_email)
        .run(kairos_shared::shutdown::signal())
        .await?;
    Ok(())
}
