//! The `kairos-worker` binary: the built-in handlers only; reads the
//! settings, sets up logging and trace export, and runs [`kairos_worker::run`] until SIGTERM
//! or SIGINT. Your own handlers: use the library (`kairos_worker::Worker`).

use clap::Parser;
use kairos_shared::trace_init::init;
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
    let c = &config.common;
    let _traces = match init(&c.log, Some(&c.otlp), "kairos-worker", "info", false) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    run(config, kairos_shared::shutdown::signal()).await?;
    Ok(())
}
