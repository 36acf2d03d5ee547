//! `sspctl adopt HOST CONTAINER`: a container made by hand becomes a user's.

use std::path::PathBuf;

use serde_json::json;
use ssp_proto::AdoptRequest;

use crate::output;
use crate::Cli;

#[derive(clap::Args)]
pub struct Args {
    /// The host the container is on.
    host: String,
    /// The container (made by hand, e.g. with `incus launch`).
    container: String,
    /// The user it becomes (default: the container's name, which it must be).
    #[arg(long)]
    user: Option<String>,
    /// File with the user's SSH public key(s); may repeat. Default: the keys in
    /// their ~/.ssh/authorized_keys inside the (running) container.
    #[arg(long = "ssh-key")]
    ssh_key: Vec<PathBuf>,
    /// Role: user or admin.
    #[arg(long, default_value = "user")]
    role: String,
}

pub async fn run(cli: &Cli, a: &Args) -> anyhow::Result<()> {
    let c = crate::cmd::Conn::new(cli)?;
    let body = AdoptRequest {
        host: a.host.clone(),
        container: a.container.clone(),
        user: a.user.clone().unwrap_or_default(),
        ssh_keys: crate::cmd::user::read_keys(&a.ssh_key)?,
        role: a.role.clone(),
    };
    let reply = c
        .call(body, |ch, r| async move {
            ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                .adopt(r)
                .await
        })
        .await?
        .into_inner();
    if !reply.warning.is_empty() {
        eprintln!("sspctl: warning: {}", reply.warning);
    }
    let i = reply.instance.unwrap_or_default();
    let u = reply.user.unwrap_or_default();
    match cli.output {
        output::Format::Json => crate::outln!(
            "{}",
            json!({"adopted": i.name, "user": u.name, "uid": u.uid, "host": i.host, "state": i.state,
                   "gpus": i.gpu_pci, "ssh_host": i.ssh_host, "ssh_port": i.ssh_port,
                   "warning": reply.warning})
        ),
        output::Format::Table => crate::outln!(
            "adopted {} on {} ({}) as {}'s: GPUs [{}], ssh -p {} {}@{}",
            i.name,
            i.host,
            i.state,
            u.name,
            i.gpu_pci.join(", "),
            i.ssh_port,
            u.name,
            i.ssh_host
        ),
    }
    Ok(())
}
