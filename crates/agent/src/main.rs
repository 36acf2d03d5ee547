//! `ssp-agent`: runs on every GPU host.

use std::path::PathBuf;

use clap::Parser;

/// The ssp host agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Path to the agent's TOML config.
    #[arg(
        long,
        short,
        default_value = "/etc/ssp/agent.toml",
        env = "SSP_AGENT_CONFIG"
    )]
    config: PathBuf,
    /// A join token (`sspctl token create --role agent`), used at first start.
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
    let mut cfg = ssp_agent::config::AgentConfig::load(&args.config)?;
    if args.token.is_some() {
        cfg.token_file = args.token;
    }
    ssp_agent::run(cfg).await
}
