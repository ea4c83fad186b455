//! The `kairos-worker` binary: the built-in handlers only; reads the
//! settings, sets up logging, and runs [`kairos_worker::run`] until SIGTERM
//! or SIGINT. Your own handlers: use the library (`kairos_worker::Worker`).

use clap::Parser;
use kairos_worker::{run, Config};

/// mimalloc rather than glibc's malloc: under the scheduler's and worker's
/// many small, short-lived allocations across threads, glibc spent about a
/// third of the process's CPU in malloc, free and chunk consolidation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    if let Err(e) = config.read_secret_files() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    run(config, kairos_shared::shutdown::signal()).await?;
    Ok(())
}
