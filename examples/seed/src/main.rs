//! `kairos-seed-worker`: the seed example's worker (settings as
//! `kairos-worker`'s: KAIROS_AMQP_URL, KAIROS_NAMESPACE, KAIROS_QUEUES...).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = kairos_worker::Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    kairos_example_seed::worker(config)
        .run(kairos_shared::shutdown::signal())
        .await?;
    Ok(())
}
