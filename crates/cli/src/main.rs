//! `sspctl`: the command-line client for ssp.

mod cmd;
mod output;

use clap::{Parser, Subcommand};

/// Manage the ssp GPU container platform.
#[derive(Parser)]
#[command(name = "sspctl", version, about)]
pub struct Cli {
    /// Coordinator address(es), comma-separated; any member of the cluster will do
    /// (default: those in the credential bundle, else http://127.0.0.1:7400).
    #[arg(long, global = true, env = "SSP_COORDINATOR")]
    coordinator: Option<String>,
    /// Credential bundle (certificate, key, CA, coordinators) that `sspctl login`
    /// installed (default: ~/.config/ssp/bundle.pem).
    #[arg(long, global = true, env = "SSP_BUNDLE")]
    bundle: Option<std::path::PathBuf>,
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
    /// The lab's LANs and their pools of static addresses (containers with
    /// `--network lan` get an address there).
    #[command(subcommand)]
    Lan(cmd::lan::LanCmd),
    /// The relay for access from outside the LAN (a reverse SSH tunnel per container).
    #[command(subcommand)]
    Relay(cmd::relay::RelayCmd),
    /// Print an ssh_config block for a user's container.
    SshConfig(cmd::ssh_config::Args),
    /// The replicated coordinators: init, join, leave, status.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCmd),
    /// Install a credential bundle (from `sspctl user add` or an admin), or
    /// exchange a user or admin join token for one.
    Login(cmd::trust::LoginArgs),
    /// Join tokens for agents, coordinators, users and admins.
    #[command(subcommand)]
    Token(cmd::trust::TokenCmd),
    /// Certificates: list, issue, revoke.
    #[command(subcommand)]
    Cert(cmd::trust::CertCmd),
    /// Who did what, when, from which certificate, and the outcome.
    Audit(cmd::trust::AuditArgs),
    /// Move a user's container to another host (seconds of downtime: copied while
    /// it runs, then only what changed), or resume or abort an interrupted move.
    Migrate(cmd::migrate::Args),
    /// Moves in progress and recent ones, with phase and outcome.
    Migrations(cmd::migrate::ListArgs),
    /// Snapshots of a user's container: create, list, restore, delete, and the
    /// schedule an admin sets.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCmd),
    /// Images made from users' containers: publish, list, delete (on every host).
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Common-Servers: shared containers whose GPUs their accounts share (people
    /// get an account with `sspctl user add NAME --common SERVER`).
    #[command(subcommand)]
    Common(cmd::common::CommonCmd),
    /// Take a container made by hand under ssp's management as a user's: the GPUs
    /// and SSH port it uses are recorded (or the conflict is named), and from then
    /// on ssp heals it. Nothing in it is recreated.
    Adopt(cmd::adopt::Args),
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Commands::Login(_)) {
        cmd::trust::renew_if_due(&cli).await;
    }
    let res = match cli.command {
        Commands::User(ref c) => cmd::user::run(&cli, c).await,
        Commands::Ls => cmd::ls::run(&cli).await,
        Commands::Gpus => cmd::gpus::run(&cli).await,
        Commands::Hosts => cmd::hosts::run(&cli).await,
        Commands::Host(ref c) => cmd::hosts::set(&cli, c).await,
        Commands::Lan(ref c) => cmd::lan::run(&cli, c).await,
        Commands::Relay(ref c) => cmd::relay::run(&cli, c).await,
        Commands::SshConfig(ref a) => cmd::ssh_config::run(&cli, a).await,
        Commands::Cluster(ref c) => cmd::cluster::run(&cli, c).await,
        Commands::Login(ref a) => cmd::trust::login(&cli, a).await,
        Commands::Token(ref c) => cmd::trust::token(&cli, c).await,
        Commands::Cert(ref c) => cmd::trust::cert(&cli, c).await,
        Commands::Audit(ref a) => cmd::trust::audit(&cli, a).await,
        Commands::Migrate(ref a) => cmd::migrate::migrate(&cli, a).await,
        Commands::Migrations(ref a) => cmd::migrate::list(&cli, a).await,
        Commands::Snapshot(ref c) => cmd::snapshot::run(&cli, c).await,
        Commands::Image(ref c) => cmd::image::run(&cli, c).await,
        Commands::Common(ref c) => cmd::common::run(&cli, c).await,
        Commands::Adopt(ref a) => cmd::adopt::run(&cli, a).await,
    };
    if let Err(e) = res {
        eprintln!("sspctl: {}", cmd::one_line(&e));
        std::process::exit(1);
    }
}
