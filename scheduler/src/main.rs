//! The `kairos-scheduler` binary: reads the settings (flags, `KAIROS_*`,
//! `*_FILE`), sets up logging, and runs [`kairos_scheduler::run`] until
//! SIGTERM or SIGINT.

use clap::{CommandFactory, FromArgMatches};
use kairos_scheduler::{run, Config};

/// mimalloc rather than glibc's malloc: under the scheduler's and worker's
/// many small, short-lived allocations across threads, glibc spent about a
/// third of the process's CPU in malloc, free and chunk consolidation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Config::command().get_matches();
    let mut config = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    config.http_addr_required =
        matches.value_source("http_addr") != Some(clap::parser::ValueSource::DefaultValue);
    if let Err(e) = config.read_secret_files() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    init_tracing();
    run(config, kairos_shared::shutdown::signal()).await?;
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}
