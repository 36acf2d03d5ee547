//! `sspctl user add|list|remove|keys`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use ssp_model::ByteSize;
use ssp_proto::{
    AddUserRequest, ListUsersRequest, RemoveUserRequest, ResizeUserRequest, SetSshKeysRequest,
    SharedFolder,
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
    /// Admin: change a user's limits; their containers get them at once (a
    /// bigger disk without a restart where the storage driver allows it).
    Resize {
        /// The user's name.
        name: String,
        /// Root disk size, e.g. 200GiB (not below what the container uses).
        #[arg(long, value_parser = parse_size)]
        disk: Option<ByteSize>,
        /// CPU limit.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory limit, e.g. 32GiB.
        #[arg(long, value_parser = parse_size)]
        memory: Option<ByteSize>,
    },
    /// Admin: change how a user's containers are reached, at once and without a
    /// restart: `forward` (SSH through a port of the host) or `lan` (an address of
    /// their own on their host's LAN, from its DHCP server).
    Network {
        /// The user's name.
        name: String,
        /// `forward` or `lan`.
        mode: String,
        /// With `lan`: only if the host is on this LAN.
        #[arg(long, value_name = "NAME")]
        lan: Option<String>,
    },
}

/// See [`AddArgs::wait`].
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    Ssh,
    Running,
    None,
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// Login name (also the container's name).
    name: String,
    /// Give the person a Unix account in this Common-Server (`sspctl common create`)
    /// instead of a container of their own; GPUs, limits, image, shared folders and
    /// host are the Common-Server's.
    #[arg(long, value_name = "SERVER")]
    common: Option<String>,
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
    /// Extra shared folder, HOST_PATH[:CONTAINER_PATH[:MODE]], MODE rw (every member
    /// adds files, only a file's writer removes it; the default) or ro; may repeat.
    #[arg(long = "share")]
    shares: Vec<String>,
    /// Do not add the coordinator's default shared folders.
    #[arg(long)]
    no_default_shares: bool,
    /// Role: user or admin.
    #[arg(long, default_value = "user")]
    role: String,
    /// What to wait for before answering: `ssh` (the user can log in: their
    /// container's SSH server answers at the address `sspctl ssh-config` prints),
    /// `running` (the container runs) or `none` (the user is recorded; ssp creates
    /// the container in the background).
    #[arg(long, value_enum, default_value_t = Wait::Ssh)]
    wait: Wait,
    /// The same as `--wait none`.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for SSH to answer before giving up with an error.
    #[arg(long, default_value_t = 120)]
    wait_timeout: u64,
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
    /// How the container is reached: `forward` (SSH through a port of its host,
    /// the default) or `lan` (an address of its own on the lab's LAN, from the
    /// LAN's DHCP server; only hosts whose agent has a `[lan]`).
    #[arg(long, value_name = "MODE")]
    network: Option<String>,
    /// With `--network lan`: only hosts on this LAN (the `[lan]` name).
    #[arg(long, value_name = "NAME")]
    lan: Option<String>,
    /// A remote desktop: xrdp with Xfce (the desktop image, unless --image says
    /// otherwise), its RDP port forwarded like SSH; `sspctl ls` shows where.
    #[arg(long)]
    desktop: bool,
    /// Where to write the user's credential bundle (their login to sspctl;
    /// default: NAME.bundle in SSP_CREDENTIALS_DIR or the current directory).
    #[arg(long)]
    credentials_out: Option<PathBuf>,
    /// Do not issue credentials (`sspctl cert issue NAME` can later).
    #[arg(long)]
    no_credentials: bool,
}

/// "personal", "common" (a Common-Server), or "account in SERVER".
fn kind_label(u: &ssp_proto::User) -> String {
    match u.kind.as_str() {
        "account" => format!("account in {}", u.common),
        "" => "personal".into(),
        k => k.into(),
    }
}

pub(crate) fn parse_size(s: &str) -> Result<ByteSize, String> {
    ByteSize::parse(s).map_err(|e| e.to_string())
}

/// The public keys in `files`, one per line (blank lines and comments skipped).
pub(crate) fn read_keys(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
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
                    let (host, container, mode) = ssp_model::SharedFolder::split(s);
                    SharedFolder {
                        host_path: host.into(),
                        container_path: container.into(),
                        mode: mode.into(),
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
                no_wait: a.no_wait || a.wait == Wait::None,
                gpu_model: a.gpu_model.clone().unwrap_or_default(),
                gpu_memory_bytes: a.gpu_memory.map(|m| m.0).unwrap_or(0),
                host: a.host.clone().unwrap_or_default(),
                spread: a.spread,
                labels: a.labels.clone(),
                common: a.common.clone().unwrap_or_default(),
                common_server: false,
                network: a.network.clone().unwrap_or_default(),
                lan: a.lan.clone().unwrap_or_default(),
                desktop: a.desktop,
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
            // The user's credentials are issued while the container's SSH comes up.
            let ssh = async {
                if a.wait != Wait::Ssh || a.no_wait {
                    return Ok(());
                }
                let seen = std::sync::Mutex::new(String::new());
                let down = |why: String| {
                    anyhow::anyhow!(
                        "user {} is added, but their container on {} did not come up: {why} (`sspctl ls` shows it)",
                        a.name,
                        i.host
                    )
                };
                if !reply.warning.is_empty() {
                    // Its start failed: say why, if its host can tell soon.
                    let limit = std::time::Duration::from_secs(a.wait_timeout.min(30));
                    if let Ok(why) =
                        tokio::time::timeout(limit, watch_boot(&c, &a.name, &seen)).await
                    {
                        return Err(down(why));
                    }
                    anyhow::bail!(
                        "user {} is added, but their container is not running yet, so they cannot log in; `sspctl ls` shows when it runs",
                        a.name
                    );
                }
                let timeout = std::time::Duration::from_secs(a.wait_timeout);
                let (addr, port) = crate::output::ssh_address(&i);
                tokio::select! {
                    r = wait_for_ssh(&addr, port, timeout) => r.with_context(|| {
                        let why = seen.lock().map(|s| s.clone()).unwrap_or_default();
                        let why = if why.is_empty() { String::new() } else { format!(": {why}") };
                        format!(
                            "user {} is added and their container runs on {}, but SSH at {addr}:{port} did not answer from here within {}s (--wait running or --no-wait do not wait for it){why}",
                            a.name, i.host, a.wait_timeout
                        )
                    }),
                    why = watch_boot(&c, &a.name, &seen) => Err(down(why)),
                }
            };
            let issue = async {
                if a.no_credentials {
                    return Ok(None);
                }
                let path = a
                    .credentials_out
                    .clone()
                    .unwrap_or_else(|| crate::cmd::trust::credentials_path(&a.name));
                let role = if a.role == "admin" { "admin" } else { "user" };
                crate::cmd::trust::issue_to(&c, &a.name, role, None, &path)
                    .await
                    .with_context(|| {
                        format!(
                            "user {} is added, but their credentials were not issued (`sspctl cert issue {}` retries)",
                            a.name, a.name
                        )
                    })?;
                anyhow::Ok(Some(path))
            };
            let (ssh, bundle) = tokio::join!(ssh, issue);
            let bundle = bundle?;
            if let (Err(_), Some(p)) = (&ssh, &bundle) {
                eprintln!("sspctl: {}'s credentials are in {}", a.name, p.display());
            }
            ssh?;
            if let (Some(p), output::Format::Table) = (&bundle, cli.output) {
                eprintln!(
                    "sspctl: {}'s credentials are in {} (give them to {}: `sspctl login {}`)",
                    a.name,
                    p.display(),
                    a.name,
                    p.file_name()
                        .map(|f| f.to_string_lossy())
                        .unwrap_or_default()
                );
            }
            match cli.output {
                output::Format::Json => crate::outln!(
                    "{}",
                    json!({"user": a.name, "container": i.name, "host": i.host, "state": i.state, "gpus": i.gpu_pci,
                           "ssh_host": i.ssh_host, "ssh_port": i.ssh_port, "warning": reply.warning,
                           "credentials": bundle.as_ref().map(|p| p.display().to_string())})
                ),
                output::Format::Table if a.common.is_some() => crate::outln!(
                    "added {} with an account in the Common-Server {} on {} ({}), its GPUs [{}], ssh -p {} {}@{}",
                    a.name,
                    i.name,
                    i.host,
                    i.state,
                    i.gpu_pci.join(", "),
                    i.ssh_port,
                    a.name,
                    i.ssh_host
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
                        kind_label(u),
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
                .map(|u| json!({"name": u.name, "uid": u.uid, "role": u.role, "kind": u.kind,
                                "common": (!u.common.is_empty()).then_some(&u.common), "gpus": u.gpus, "cpus": u.cpus,
                                "memory_bytes": u.memory_bytes, "disk_bytes": u.disk_bytes, "ssh_keys": u.ssh_keys}))
                .collect::<Vec<_>>());
            output::print(
                cli.output,
                &[
                    "NAME", "UID", "ROLE", "KIND", "GPUS", "CPUS", "MEMORY", "DISK", "KEYS",
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
        UserCmd::Resize {
            name,
            disk,
            cpus,
            memory,
        } => {
            let body = ResizeUserRequest {
                name: name.clone(),
                cpus: cpus.unwrap_or(0),
                memory_bytes: memory.map(|m| m.0).unwrap_or(0),
                disk_bytes: disk.map(|d| d.0).unwrap_or(0),
            };
            let reply = c
                .call(body, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .resize_user(r)
                        .await
                })
                .await?
                .into_inner();
            if !reply.warning.is_empty() {
                eprintln!("sspctl: warning: {}", reply.warning);
            }
            let u = reply.user.unwrap_or_default();
            match cli.output {
                output::Format::Json => crate::outln!(
                    "{}",
                    json!({"user": name, "cpus": u.cpus, "memory_bytes": u.memory_bytes,
                           "disk_bytes": u.disk_bytes, "instances": reply.instances, "warning": reply.warning})
                ),
                output::Format::Table => crate::outln!(
                    "{name}: {} CPUs, {} memory, {} disk",
                    u.cpus,
                    output::size(u.memory_bytes),
                    output::size(u.disk_bytes)
                ),
            }
        }
        UserCmd::Network { name, mode, lan } => {
            let body = ssp_proto::SetNetworkRequest {
                name: name.clone(),
                network: mode.clone(),
                lan: lan.clone().unwrap_or_default(),
            };
            let reply = c
                .call(body, |ch, r| async move {
                    ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                        .set_network(r)
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
                    json!({"user": name, "instances": reply.instances.iter().map(|i| json!({
                        "name": i.name, "host": i.host, "network": i.network, "lan": i.lan,
                        "lan_address": i.lan_address, "ssh_host": i.ssh_host, "ssh_port": i.ssh_port,
                    })).collect::<Vec<_>>(), "warning": reply.warning})
                ),
                output::Format::Table => {
                    for i in &reply.instances {
                        crate::outln!("{}: {}", i.name, output::reach(i));
                    }
                }
            }
        }
    }
    Ok(())
}

/// While SSH does not answer: how the container's boot went, from its agent.
/// Resolves with why it did not come up once that is clear (its agent backs off
/// restarting it, or units failed in its boot and [`BOOT_GRACE`] later SSH still
/// does not answer); until then, `seen` holds the last problem reported.
async fn watch_boot(c: &crate::cmd::Conn, name: &str, seen: &std::sync::Mutex<String>) -> String {
    use tokio::time::{sleep, Duration, Instant};
    let mut since: Option<Instant> = None;
    loop {
        sleep(Duration::from_secs(2)).await;
        let body = ssp_proto::ListInstancesViewRequest { name: name.into() };
        let Ok(r) = c
            .call(body, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .list_instances(r)
                    .await
            })
            .await
        else {
            continue;
        };
        let Some(v) = r.into_inner().instances.into_iter().next() else {
            continue;
        };
        if let Ok(mut s) = seen.lock() {
            s.clone_from(&v.problem);
        }
        if v.state.starts_with("failing") {
            return match v.problem.as_str() {
                "" => v.state,
                p => format!("{}; {p}", v.state),
            };
        }
        if v.problem.is_empty() {
            since = None;
            continue;
        }
        let t = *since.get_or_insert_with(Instant::now);
        if t.elapsed() >= BOOT_GRACE {
            return v.problem;
        }
    }
}

/// How long SSH may still come after units failed in a container's boot (a unit
/// that failed may start on its own next try).
const BOOT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits until an SSH server answers at `host:port`: the connection is accepted and
/// the server sends its identification line (`SSH-2.0-...`). The account and keys
/// are in place before sshd starts (ssp's images make them first; for other images
/// the agent has made them before the container is reported running), so from then
/// on a login with the user's key works.
async fn wait_for_ssh(host: &str, port: u32, timeout: std::time::Duration) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    use tokio::time::{sleep, timeout as within, Duration, Instant};
    let port = u16::try_from(port).context("the coordinator gave no SSH port")?;
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        // A short connect timeout at first: until the container has its address, a
        // SYN sent to it is dropped, and the kernel would resend it only after a
        // second. After 5 s, a longer one, for a far-away sspctl.
        let limit = if Instant::now() < start + Duration::from_secs(5) {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(3)
        };
        let connect = tokio::net::TcpStream::connect((host, port));
        let last = match within(limit, connect).await {
            Err(_) => format!("no connection within {limit:?}"),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(mut conn)) => {
                let greeting = async {
                    let mut banner = Vec::new();
                    let mut buf = [0u8; 256];
                    while !banner.contains(&b'\n') && banner.len() < 1024 {
                        let n = conn.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        banner.extend_from_slice(&buf[..n]);
                    }
                    Ok::<_, std::io::Error>(banner)
                };
                match within(Duration::from_secs(3), greeting).await {
                    Ok(Ok(b)) if b.starts_with(b"SSH-") => return Ok(()),
                    Ok(Ok(b)) if b.is_empty() => {
                        "the connection was closed without a greeting".to_string()
                    }
                    Ok(Ok(_)) => "something other than an SSH server answered".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no greeting within 3s".to_string(),
                }
            }
        };
        if Instant::now() >= deadline {
            anyhow::bail!("last try: {last}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}
