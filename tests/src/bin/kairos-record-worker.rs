//! A `kairos-worker` with one more handler for process-level tests that
//! kill workers: `record` appends the task id to the file named by
//! `KAIROS_RECORD_FILE` before it succeeds, so what ran survives a kill -9
//! of the worker (events, published after the ack, may not).

use clap::Parser;
use kairos_worker::{Config, TaskContext, TaskError, Worker};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let path: Arc<PathBuf> = Arc::new(
        std::env::var_os("KAIROS_RECORD_FILE")
            .ok_or_else(|| anyhow::anyhow!("KAIROS_RECORD_FILE is not set"))?
            .into(),
    );
    let record = move |ctx: TaskContext, _body: Vec<u8>| {
        let path = path.clone();
        async move {
            // One line per run, written whole with O_APPEND: concurrent
            // handlers and processes never interleave within a line.
            let line = format!("{}\n", ctx.id);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path.as_ref())
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .map_err(|e| TaskError::retry(format!("cannot record the run: {e}")))
        }
    };
    Worker::new(config)
        .with_builtins()
        .handler("record", record)
        .run(kairos_shared::shutdown::signal())
        .await?;
    Ok(())
}
