//! The `kairos-scheduler` binary: reads the settings (flags, `KAIROS_*`,
//! `*_FILE`), sets up logging (`KAIROS_LOG_FORMAT`, `RUST_LOG`) and trace
//! export (`KAIROS_OTLP_ENDPOINT`), and runs [`kairos_scheduler::run`] until
//! SIGTERM or SIGINT.

use clap::{CommandFactory, FromArgMatches};
use kairos_scheduler::{run, Config};
use kairos_shared::trace_init::init;

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
    let c = &config.common;
    let _traces = match init(&c.log, Some(&c.otlp), "kairos-scheduler", "info", false) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    run(config, kairos_shared::shutdown::signal()).await?;
    Ok(())
}
