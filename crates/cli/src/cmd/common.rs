//! `sspctl common create|list|delete`: Common-Servers, shared containers whose
//! accounts are the lab's people (`sspctl user add NAME --common SERVER`).

use clap::Subcommand;
use serde_json::json;
use ssp_model::ByteSize;
use ssp_proto::{AddUserRequest, ListUsersRequest, RemoveUserRequest};

use crate::cmd::user::parse_size;
use crate::output;
use crate::Cli;

#[derive(Subcommand)]
pub enum CommonCmd {
    /// Admin: make a Common-Server, a shared container with GPUs that its accounts
    /// share; give people accounts in it with `sspctl user add NAME --common SERVER`.
    Create(CreateArgs),
    /// Common-Servers and their accounts.
    List,
    /// Admin: delete a Common-Server (and its container) that has no accounts left.
    Delete {
        /// The Common-Server's name.
        name: String,
    },
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The Common-Server's name (also its container's and hostname).
    name: String,
    /// Number of GPUs, shared by every account.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// CPU limit (default: coordinator's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory limit, e.g. 64GiB.
    #[arg(long, value_parser = parse_size)]
    memory: Option<ByteSize>,
    /// Root disk size (every account's home is on it), e.g. 500GiB.
    #[arg(long, value_parser = parse_size)]
    disk: Option<ByteSize>,
    /// Image alias on the hosts.
    #[arg(long)]
    image: Option<String>,
    /// Put it on this host.
    #[arg(long)]
    host: Option<String>,
    /// Only GPUs whose model contains this, e.g. A100 (needs --gpus).
    #[arg(long)]
    gpu_model: Option<String>,
    /// Answer once it is recorded; ssp creates the container in the background.
    #[arg(long)]
    no_wait: bool,
}

pub async fn run(cli: &Cli, cmd: &CommonCmd) -> anyhow::Result<()> {
    let c = crate::cmd::Conn::new(cli)?;
    match cmd {
        CommonCmd::Create(a) => {
            let body = AddUserRequest {
                name: a.name.clone(),
                gpus: a.gpus,
                cpus: a.cpus,
                memory_bytes: a.memory.map(|m| m.0).unwrap_or(0),
                disk_bytes: a.disk.map(|m| m.0).unwrap_or(0),
                image: a.image.clone().unwrap_or_default(),
                host: a.host.clone().unwrap_or_default(),
                gpu_model: a.gpu_model.clone().unwrap_or_default(),
                no_wait: a.no_wait,
                common_server: true,
                ..Default::default()
            };
            let reply = c
                .call(body, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .add_user(r)
                        .await
                })
                .await?
                .into_inner();
            if !reply.warning.is_empty() {
                eprintln!("sspctl: warning: {}", reply.warning);
            }
            let i = reply.instance.unwrap_or_default();
            match cli.output {
                output::Format::Json => crate::outln!(
                    "{}",
                    json!({"common": a.name, "host": i.host, "state": i.state, "gpus": i.gpu_pci,
                           "ssh_host": i.ssh_host, "ssh_port": i.ssh_port, "warning": reply.warning})
                ),
                output::Format::Table => crate::outln!(
                    "created the Common-Server {} on {} ({}), GPUs [{}], ssh at {}:{}; add accounts with `sspctl user add NAME --common {} --ssh-key FILE`",
                    a.name,
                    i.host,
                    i.state,
                    i.gpu_pci.join(", "),
                    i.ssh_host,
                    i.ssh_port,
                    a.name
                ),
            }
        }
        CommonCmd::List => {
            let users = c
                .call(ListUsersRequest {}, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .list_users(r)
                        .await
                })
                .await?
                .into_inner()
                .users;
            let servers: Vec<_> = users.iter().filter(|u| u.kind == "common").collect();
            let accounts = |s: &str| -> Vec<String> {
                users
                    .iter()
                    .filter(|u| u.common == s)
                    .map(|u| u.name.clone())
                    .collect()
            };
            let rows = servers
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.gpus.to_string(),
                        s.cpus.to_string(),
                        output::size(s.memory_bytes),
                        output::size(s.disk_bytes),
                        accounts(&s.name).join(", "),
                    ]
                })
                .collect();
            let js = json!(servers
                .iter()
                .map(|s| json!({"name": s.name, "gpus": s.gpus, "cpus": s.cpus,
                                "memory_bytes": s.memory_bytes, "disk_bytes": s.disk_bytes,
                                "accounts": accounts(&s.name)}))
                .collect::<Vec<_>>());
            output::print(
                cli.output,
                &["NAME", "GPUS", "CPUS", "MEMORY", "DISK", "ACCOUNTS"],
                rows,
                js,
            );
        }
        CommonCmd::Delete { name } => {
            let body = RemoveUserRequest {
                name: name.clone(),
                no_wait: false,
            };
            c.call(body, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .remove_user(r)
                    .await
            })
            .await?;
            match cli.output {
                output::Format::Json => crate::outln!("{}", json!({"deleted": name})),
                output::Format::Table => crate::outln!("deleted the Common-Server {name}"),
            }
        }
    }
    Ok(())
}
