//! `sspctl user add|list|remove|keys`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use ssp_model::ByteSize;
use ssp_proto::{
    AddUserRequest, ListUsersRequest, RemoveUserRequest, SetSshKeysRequest, SharedFolder,
};

use crate::output::{self, size};
use crate::Cli;

#[derive(Subcommand)]
pub enum UserCmd {
    /// Add a user and create their container.
    Add(Box<AddArgs>),
    /// List users.
    List,
    /// Remove a user and delete their container.
    Remove {
        /// The user's name.
        name: String,
        /// Answer once the removal is recorded; ssp deletes the container in the background.
        #[arg(long)]
        no_wait: bool,
    },
    /// Replace a user's SSH public keys; their containers get the new set.
    Keys {
        /// The user's name.
        name: String,
        /// File with the user's SSH public key(s), one per line; may repeat.
        #[arg(long = "ssh-key", required = true)]
        ssh_key: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// Login name (also the container's name).
    name: String,
    /// File with the user's SSH public key(s), one per line.
    #[arg(long = "ssh-key", required = true)]
    ssh_key: Vec<PathBuf>,
    /// Number of GPUs.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// CPU limit (default: coordinator's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory limit, e.g. 8GiB.
    #[arg(long, value_parser = parse_size)]
    memory: Option<ByteSize>,
    /// Root disk size, e.g. 50GiB.
    #[arg(long, value_parser = parse_size)]
    disk: Option<ByteSize>,
    /// Image alias on the hosts.
    #[arg(long)]
    image: Option<String>,
    /// Extra shared folder, HOST_PATH[:CONTAINER_PATH]; may repeat.
    #[arg(long = "share")]
    shares: Vec<String>,
    /// Do not add the coordinator's default shared folders.
    #[arg(long)]
    no_default_shares: bool,
    /// Role: user or admin.
    #[arg(long, default_value = "user")]
    role: String,
    /// Answer once the user is recorded; ssp creates the container in the background.
    #[arg(long)]
    no_wait: bool,
    /// Only GPUs whose model contains this, e.g. A100 (needs --gpus).
    #[arg(long)]
    gpu_model: Option<String>,
    /// Only GPUs with at least this much memory, e.g. 40GiB (needs --gpus).
    #[arg(long, value_parser = parse_size)]
    gpu_memory: Option<ByteSize>,
    /// Put the container on this host.
    #[arg(long)]
    host: Option<String>,
    /// Prefer the emptiest host instead of packing GPUs onto as few hosts as possible.
    #[arg(long)]
    spread: bool,
    /// Only hosts with this label (from the agent's `labels`); repeat for several.
    #[arg(long = "label", value_name = "LABEL")]
    labels: Vec<String>,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    ByteSize::parse(s).map_err(|e| e.to_string())
}

/// The public keys in `files`, one per line (blank lines and comments skipped).
fn read_keys(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading --ssh-key {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    Ok(keys)
}

pub async fn run(cli: &Cli, cmd: &UserCmd) -> anyhow::Result<()> {
    let c = crate::cmd::Conn::new(cli)?;
    match cmd {
        UserCmd::Add(a) => {
            let keys = read_keys(&a.ssh_key)?;
            let shares = a
                .shares
                .iter()
                .map(|s| {
                    let (h, c) = s.split_once(':').unwrap_or((s, s));
                    SharedFolder {
                        host_path: h.into(),
                        container_path: c.into(),
                    }
                })
                .collect();
            let body = AddUserRequest {
                name: a.name.clone(),
                ssh_keys: keys,
                gpus: a.gpus,
                cpus: a.cpus,
                memory_bytes: a.memory.map(|m| m.0).unwrap_or(0),
                disk_bytes: a.disk.map(|m| m.0).unwrap_or(0),
                image: a.image.clone().unwrap_or_default(),
                shares,
                no_default_shares: a.no_default_shares,
                role: a.role.clone(),
                no_wait: a.no_wait,
                gpu_model: a.gpu_model.clone().unwrap_or_default(),
                gpu_memory_bytes: a.gpu_memory.map(|m| m.0).unwrap_or(0),
                host: a.host.clone().unwrap_or_default(),
                spread: a.spread,
                labels: a.labels.clone(),
            };
            let reply = c
                .call(body, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .add_user(r)
                        .await
                })
                .await?
                .into_inner();
            let i = reply.instance.unwrap_or_default();
            if !reply.warning.is_empty() {
                eprintln!("sspctl: warning: {}", reply.warning);
            }
            match cli.output {
                output::Format::Json => crate::outln!(
                    "{}",
                    json!({"user": a.name, "host": i.host, "state": i.state, "gpus": i.gpu_pci,
                           "ssh_host": i.ssh_host, "ssh_port": i.ssh_port, "warning": reply.warning})
                ),
                output::Format::Table => crate::outln!(
                    "added {} on {} ({}), GPUs [{}], ssh -p {} {}@{}",
                    a.name,
                    i.host,
                    i.state,
                    i.gpu_pci.join(", "),
                    i.ssh_port,
                    a.name,
                    i.ssh_host
                ),
            }
        }
        UserCmd::List => {
            let users = c
                .call(ListUsersRequest {}, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .list_users(r)
                        .await
                })
                .await?
                .into_inner()
                .users;
            let rows = users
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.uid.to_string(),
                        u.role.clone(),
                        u.gpus.to_string(),
                        u.cpus.to_string(),
                        size(u.memory_bytes),
                        size(u.disk_bytes),
                        u.ssh_keys.len().to_string(),
                    ]
                })
                .collect();
            let js = json!(users
                .iter()
                .map(|u| json!({"name": u.name, "uid": u.uid, "role": u.role, "gpus": u.gpus, "cpus": u.cpus,
                                "memory_bytes": u.memory_bytes, "disk_bytes": u.disk_bytes, "ssh_keys": u.ssh_keys}))
                .collect::<Vec<_>>());
            output::print(
                cli.output,
                &[
                    "NAME", "UID", "ROLE", "GPUS", "CPUS", "MEMORY", "DISK", "KEYS",
                ],
                rows,
                js,
            );
        }
        UserCmd::Remove { name, no_wait } => {
            let body = RemoveUserRequest {
                name: name.clone(),
                no_wait: *no_wait,
            };
            c.call(body, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .remove_user(r)
                    .await
            })
            .await?;
            match cli.output {
                output::Format::Json => crate::outln!("{}", json!({"removed": name})),
                output::Format::Table => crate::outln!("removed {name}"),
            }
        }
        UserCmd::Keys { name, ssh_key } => {
            let body = SetSshKeysRequest {
                name: name.clone(),
                ssh_keys: read_keys(ssh_key)?,
            };
            let keys = body.ssh_keys.len();
            let reply = c
                .call(body, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .set_ssh_keys(r)
                        .await
                })
                .await?
                .into_inner();
            if !reply.warning.is_empty() {
                eprintln!("sspctl: warning: {}", reply.warning);
            }
            match cli.output {
                output::Format::Json => crate::outln!(
                    "{}",
                    json!({"user": name, "keys": keys, "instances": reply.instances, "warning": reply.warning})
                ),
                output::Format::Table => crate::outln!(
                    "{name}: {keys} key(s) set on {}",
                    if reply.instances.is_empty() {
                        "no container".to_string()
                    } else {
                        reply.instances.join(", ")
                    }
                ),
            }
        }
    }
    Ok(())
}
