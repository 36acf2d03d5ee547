//! `sspctl ssh-config NAME`: an ssh_config block for `ssh -F`, PyCharm and VS Code.

use std::path::PathBuf;

use serde_json::json;
use ssp_proto::SshConfigRequest;

use crate::Cli;

#[derive(clap::Args)]
pub struct Args {
    /// The container (user) name.
    name: String,
    /// Private key to name in the block as IdentityFile.
    #[arg(long, short = 'i')]
    identity: Option<PathBuf>,
    /// Known-hosts file to name in the block (default: the ssh client's own).
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// For outside the LAN: through the lab's relay (`Host ssp-NAME-outside`),
    /// to the container's port there.
    #[arg(long)]
    outside: bool,
}

pub async fn run(cli: &Cli, a: &Args) -> anyhow::Result<()> {
    let identity = a
        .identity
        .as_ref()
        .map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        })
        .unwrap_or_default();
    let body = SshConfigRequest {
        name: a.name.clone(),
        identity_file: identity,
        outside: a.outside,
    };
    let mut config = crate::cmd::Conn::new(cli)?
        .call(body, |ch, r| async move {
            ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                .ssh_config(r)
                .await
        })
        .await?
        .into_inner()
        .config;
    if let Some(k) = &a.known_hosts {
        let k = std::path::absolute(k).unwrap_or_else(|_| k.clone());
        config.push_str(&format!("    UserKnownHostsFile {}\n", k.display()));
    }
    match cli.output {
        crate::output::Format::Json => {
            crate::outln!("{}", json!({"name": a.name, "ssh_config": config}))
        }
        crate::output::Format::Table => crate::out!("{config}"),
    }
    Ok(())
}
