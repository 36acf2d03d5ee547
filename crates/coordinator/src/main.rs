//! `ssp-coordinator`: holds the desired state and drives the agents.

use std::path::PathBuf;

use clap::Parser;

/// The ssp coordinator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Path to the coordinator's TOML config.
    #[arg(
        long,
        short,
        default_value = "/etc/ssp/coordinator.toml",
        env = "SSP_COORDINATOR_CONFIG"
    )]
    config: PathBuf,
    /// A join token (`sspctl token create --role coordinator`), used at first start.
    #[arg(long, env = "SSP_TOKEN")]
    token: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let cfg = ssp_coordinator::config::CoordinatorConfig::load(&args.config)?;
    ssp_coordinator::run(cfg, args.token).await
}
