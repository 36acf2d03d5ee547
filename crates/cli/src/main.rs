//! `sspctl`: the command-line client for ssp.

mod cmd;
mod output;

use clap::{Parser, Subcommand};

/// Manage the ssp GPU container platform.
#[derive(Parser)]
#[command(name = "sspctl", version, about)]
pub struct Cli {
    /// Coordinator address(es), comma-separated; any member of the cluster will do.
    #[arg(
        long,
        global = true,
        env = "SSP_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    coordinator: String,
    /// Let a coordinator answer reads from its own replica without asking the
    /// leader (works without a quorum; may be behind).
    #[arg(long, global = true)]
    stale: bool,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Add, list or remove users.
    #[command(subcommand)]
    User(cmd::user::UserCmd),
    /// List containers: host, state, GPUs, SSH endpoint.
    Ls,
    /// List every GPU and who holds it.
    Gpus,
    /// List hosts: status, last heartbeat, capacity, free GPUs, driver.
    Hosts,
    /// Drain a host (no new containers) or make it ready again.
    #[command(subcommand)]
    Host(cmd::hosts::HostCmd),
    /// Print an ssh_config block for a user's container.
    SshConfig(cmd::ssh_config::Args),
    /// The replicated coordinators: init, join, leave, status.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCmd),
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let res = match cli.command {
        Commands::User(ref c) => cmd::user::run(&cli, c).await,
        Commands::Ls => cmd::ls::run(&cli).await,
        Commands::Gpus => cmd::gpus::run(&cli).await,
        Commands::Hosts => cmd::hosts::run(&cli).await,
        Commands::Host(ref c) => cmd::hosts::set(&cli, c).await,
        Commands::SshConfig(ref a) => cmd::ssh_config::run(&cli, a).await,
        Commands::Cluster(ref c) => cmd::cluster::run(&cli, c).await,
    };
    if let Err(e) = res {
        eprintln!("sspctl: {}", cmd::one_line(&e));
        std::process::exit(1);
    }
}
