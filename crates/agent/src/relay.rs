//! Access from outside the LAN through the lab's relay: for every container whose
//! spec names a relay port, a tunnel from this host to the relay, supervised here.
//! With OpenSSH, one reverse tunnel per container (`ssh -N -R
//! 0.0.0.0:PORT:CONTAINER:22`), started again after a short wait when it ends,
//! longer each time it ends soon after starting; the agent logs in with its own
//! key (`state_dir/relay/id_ed25519`, made at the first start), which `sspctl relay
//! show` lists for the relay's authorized_keys. With frp, one frpc per host with a
//! proxy per container (`state_dir/relay/frpc.toml`), reloaded through frpc's
//! admin API on loopback when containers come and go, and started again when it
//! ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ssp_proto::InstanceSpec;

use crate::host::HostState;

/// The key's file name in the relay directory.
const KEY: &str = "id_ed25519";

/// Makes the agent's relay key if it has none; its public half, in OpenSSH form.
pub fn ensure_key(dir: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = dir.join(KEY);
    if !key.exists() {
        let tmp = dir.join(format!("{KEY}.new"));
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(dir.join(format!("{KEY}.new.pub")));
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ssp-agent", "-f"])
            .arg(&tmp)
            .output()
            .context("running ssh-keygen (package openssh-client)")?;
        if !out.status.success() {
            anyhow::bail!(
                "ssh-keygen: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(
            dir.join(format!("{KEY}.new.pub")),
            dir.join(format!("{KEY}.pub")),
        )?;
        std::fs::rename(&tmp, &key)?;
    }
    public_key(dir).context("reading the relay key")
}

/// The agent's public relay key, if it has one.
pub fn public_key(dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(dir.join(format!("{KEY}.pub")))?
        .trim()
        .to_string())
}

/// What one tunnel is: where it goes and for which container. A change of any
/// part starts it anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub name: String,
    pub relay_host: String,
    pub relay_server_port: u16,
    pub relay_user: String,
    pub relay_port: u16,
    /// The host's forward, for containers whose own address the host cannot reach.
    pub fallback: (String, u16),
}

impl Tunnel {
    /// The tunnel `spec` asks for: one for a running container with a relay port.
    pub fn of(spec: &InstanceSpec, ssh_host: &str) -> Option<Tunnel> {
        let relay_port = u16::try_from(spec.relay_port).ok().filter(|p| *p > 0)?;
        if !spec.running
            || spec.relay_host.is_empty()
            || !matches!(spec.relay_kind.as_str(), "" | "ssh")
        {
            return None;
        }
        Some(Tunnel {
            name: spec.name.clone(),
            relay_host: spec.relay_host.clone(),
            relay_server_port: u16::try_from(spec.relay_server_port)
                .ok()
                .filter(|p| *p > 0)
                .unwrap_or(22),
            relay_user: spec.relay_user.clone(),
            relay_port,
            fallback: (ssh_host.to_string(), spec.ssh_port as u16),
        })
    }

    /// `ssh`'s arguments for a tunnel to `target` (the container's SSH as this host
    /// reaches it).
    pub fn args(&self, dir: &Path, target: &(String, u16)) -> Vec<String> {
        let o = |k: &str, v: &str| ["-o".to_string(), format!("{k}={v}")];
        let mut a = vec!["-N".to_string(), "-T".to_string(), "-i".to_string()];
        a.push(dir.join(KEY).display().to_string());
        for (k, v) in [
            ("IdentitiesOnly", "yes"),
            ("BatchMode", "yes"),
            // A relay port still held (by a tunnel the relay has not yet noticed
            // is gone) ends this one, and it is tried again.
            ("ExitOnForwardFailure", "yes"),
            ("ServerAliveInterval", "5"),
            ("ServerAliveCountMax", "3"),
            ("ConnectTimeout", "5"),
            // The relay's host key is taken at the first connection and then held to.
            ("StrictHostKeyChecking", "accept-new"),
            (
                "UserKnownHostsFile",
                &dir.join("known_hosts").display().to_string(),
            ),
        ] {
            a.extend(o(k, v));
        }
        a.extend([
            "-p".to_string(),
            self.relay_server_port.to_string(),
            "-R".to_string(),
            format!("0.0.0.0:{}:{}:{}", self.relay_port, target.0, target.1),
            format!("{}@{}", self.relay_user, self.relay_host),
        ]);
        a
    }
}

/// The wait before a tunnel that ended is started again: from `FIRST`, doubled
/// each time it ended within a minute of starting, at most `MAX`.
pub fn next_wait(last: Duration, ran: Duration) -> Duration {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);
    if ran >= Duration::from_secs(60) || last.is_zero() {
        FIRST
    } else {
        (last * 2).min(MAX)
    }
}

/// Keeps one tunnel per container that asks for one, following the stored specs.
pub async fn supervise(host: Arc<HostState>, dir: PathBuf, frpc: FrpcConfig) {
    let mut running: HashMap<String, (Tunnel, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut frp = Frpc::new(frpc, dir.clone());
    loop {
        let specs: Vec<InstanceSpec> = host
            .specs
            .names()
            .into_iter()
            .filter_map(|n| host.specs.get(&n))
            .collect();
        frp.follow(&host, &specs).await;
        let wanted: HashMap<String, Tunnel> = specs
            .iter()
            .filter_map(|s| Tunnel::of(s, &host.ssh_host))
            .map(|t| (t.name.clone(), t))
            .collect();
        running.retain(|name, (t, task)| {
            let keep = wanted.get(name) == Some(t) && !task.is_finished();
            if !keep {
                task.abort();
                tracing::info!(instance = %name, "relay tunnel stopped");
            }
            keep
        });
        for (name, t) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(keep_up(host.clone(), dir.clone(), t.clone()));
            running.insert(name, (t, task));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs one tunnel for as long as it is wanted (the task is aborted, which kills
/// its ssh).
async fn keep_up(host: Arc<HostState>, dir: PathBuf, t: Tunnel) {
    let mut wait = Duration::ZERO;
    loop {
        let target = target(&host, &t).await;
        let started = Instant::now();
        let child = tokio::process::Command::new("ssh")
            .args(t.args(&dir, &target))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let why = match child {
            Ok(child) => {
                tracing::info!(instance = %t.name, relay = %t.relay_host, port = t.relay_port, target = %format!("{}:{}", target.0, target.1), "relay tunnel started");
                match child.wait_with_output().await {
                    Ok(out) => format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => format!("cannot run ssh (package openssh-client): {e}"),
        };
        wait = next_wait(wait, started.elapsed());
        tracing::warn!(instance = %t.name, port = t.relay_port, retry_ms = wait.as_millis() as u64, "relay tunnel ended: {why}");
        tokio::time::sleep(wait).await;
    }
}

/// Where the container's SSH is for this host: its own address (the bridge's,
/// or a bridged LAN's), else the host's forward.
async fn target(host: &HostState, t: &Tunnel) -> (String, u16) {
    address_of(host, &t.name, &t.fallback).await
}

async fn address_of(host: &HostState, name: &str, fallback: &(String, u16)) -> (String, u16) {
    match crate::ensure::wait_lan_address(&host.client, name, Duration::ZERO).await {
        a if a.is_empty() => fallback.clone(),
        a => (a, 22),
    }
}

/// Where frpc is and the loopback port of its admin API (the agent's config).
#[derive(Debug, Clone)]
pub struct FrpcConfig {
    pub program: PathBuf,
    pub admin_port: u16,
}

/// The relay's frps, as a host's frpc reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrpServer {
    pub host: String,
    pub port: u16,
    pub token: String,
}

/// One container's proxy: its relay port, and the host's forward for when its own
/// address cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrpProxy {
    pub name: String,
    pub remote_port: u16,
    pub fallback: (String, u16),
}

/// The frp proxy `spec` asks for: a running container with a relay port on an
/// frp relay.
pub fn frp_of(spec: &InstanceSpec, ssh_host: &str) -> Option<(FrpServer, FrpProxy)> {
    let remote_port = u16::try_from(spec.relay_port).ok().filter(|p| *p > 0)?;
    if !spec.running || spec.relay_kind != "frp" || spec.relay_host.is_empty() {
        return None;
    }
    Some((
        FrpServer {
            host: spec.relay_host.clone(),
            port: u16::try_from(spec.relay_server_port)
                .ok()
                .filter(|p| *p > 0)
                .unwrap_or(7000),
            token: spec.relay_token.clone(),
        },
        FrpProxy {
            name: spec.name.clone(),
            remote_port,
            fallback: (ssh_host.to_string(), spec.ssh_port as u16),
        },
    ))
}

/// frpc's configuration (frp's TOML format, 0.52 and later): the server, the
/// admin API on loopback (for reloads), and one TCP proxy per container, to
/// `targets[name]`. The values are checked by the coordinator (an address, a
/// token without quotes or backslashes, container names), so none needs escaping.
pub fn frpc_config(
    server: &FrpServer,
    admin_port: u16,
    proxies: &[FrpProxy],
    targets: &HashMap<String, (String, u16)>,
) -> String {
    let mut out = format!(
        "# Written by ssp-agent: each container's SSH on its relay port; reloaded as\n\
         # containers come and go.\n\
         serverAddr = \"{}\"\nserverPort = {}\nauth.method = \"token\"\nauth.token = \"{}\"\n\
         loginFailExit = false\nwebServer.addr = \"127.0.0.1\"\nwebServer.port = {admin_port}\n",
        server.host, server.port, server.token
    );
    for p in proxies {
        let (ip, port) = targets.get(&p.name).unwrap_or(&p.fallback);
        out.push_str(&format!(
            "\n[[proxies]]\nname = \"ssp-{}\"\ntype = \"tcp\"\nlocalIP = \"{ip}\"\nlocalPort = {port}\nremotePort = {}\n",
            p.name, p.remote_port
        ));
    }
    out
}

/// The host's frpc: its config follows the wanted proxies, a change of the set is
/// a reload, a change of server (or an frpc that ended) a new start.
struct Frpc {
    cfg: FrpcConfig,
    dir: PathBuf,
    server: Option<FrpServer>,
    text: String,
    targets: HashMap<String, (String, u16)>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Frpc {
    fn new(cfg: FrpcConfig, dir: PathBuf) -> Self {
        Frpc {
            cfg,
            dir,
            server: None,
            text: String::new(),
            targets: HashMap::new(),
            task: None,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("frpc.toml")
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            tracing::info!("frpc stopped: no container has an frp relay port here");
        }
        self.server = None;
        self.text.clear();
    }

    async fn follow(&mut self, host: &HostState, specs: &[InstanceSpec]) {
        let wanted: Vec<(FrpServer, FrpProxy)> = specs
            .iter()
            .filter_map(|s| frp_of(s, &host.ssh_host))
            .collect();
        let Some(server) = wanted.first().map(|(s, _)| s.clone()) else {
            self.stop();
            return;
        };
        let mut proxies: Vec<FrpProxy> = wanted.into_iter().map(|(_, p)| p).collect();
        proxies.sort_by(|a, b| a.name.cmp(&b.name));
        self.targets
            .retain(|n, _| proxies.iter().any(|p| &p.name == n));
        for p in &proxies {
            if !self.targets.contains_key(&p.name) {
                let t = address_of(host, &p.name, &p.fallback).await;
                self.targets.insert(p.name.clone(), t);
            }
        }
        let text = frpc_config(&server, self.cfg.admin_port, &proxies, &self.targets);
        let alive = self.task.as_ref().is_some_and(|t| !t.is_finished());
        if text == self.text && alive {
            return;
        }
        if let Err(e) = write_private(&self.file(), &text) {
            tracing::error!("writing {}: {e}", self.file().display());
            return;
        }
        let restart = !alive || self.server.as_ref() != Some(&server);
        if !restart {
            // The same server, another set of proxies: frpc reloads them without
            // dropping the others' connections.
            let out = tokio::process::Command::new(&self.cfg.program)
                .arg("reload")
                .arg("-c")
                .arg(self.file())
                .output()
                .await;
            match out {
                Ok(o) if o.status.success() => {
                    tracing::info!(proxies = proxies.len(), "frpc reloaded");
                    self.text = text;
                    return;
                }
                Ok(o) => tracing::warn!(
                    "frpc reload: {}; starting it anew",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => tracing::warn!("frpc reload: {e}; starting it anew"),
            }
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.task = Some(tokio::spawn(keep_frpc(
            self.cfg.program.clone(),
            self.file(),
        )));
        self.server = Some(server);
        self.text = text;
    }
}

/// Writes `text` to `path` readable by root only (it holds the frp token).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("toml.new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs frpc on `file` for as long as it is wanted (the task is aborted, which
/// kills it), starting it again when it ends.
async fn keep_frpc(program: PathBuf, file: PathBuf) {
    let mut wait = Duration::ZERO;
    let log = file.with_extension("log");
    loop {
        let started = Instant::now();
        // frpc logs as it runs; its output goes to a file beside its config.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|f| Ok((f.try_clone()?, f)));
        let child = out.and_then(|(o, e)| {
            tokio::process::Command::new(&program)
                .arg("-c")
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e)
                .kill_on_drop(true)
                .spawn()
        });
        let why = match child {
            Ok(mut child) => {
                tracing::info!(config = %file.display(), log = %log.display(), "frpc started");
                match child.wait().await {
                    Ok(status) => format!("{status} (see {})", log.display()),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => format!("cannot run {} (frp's client): {e}", program.display()),
        };
        wait = next_wait(wait, started.elapsed());
        tracing::warn!(retry_ms = wait.as_millis() as u64, "frpc ended: {why}");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_is_asked_for_by_running_containers_with_a_relay_port() {
        let spec = InstanceSpec {
            name: "gdw".into(),
            running: true,
            ssh_port: 22005,
            relay_host: "relay.example.org".into(),
            relay_server_port: 0,
            relay_user: "ssp-relay".into(),
            relay_port: 30001,
            ..Default::default()
        };
        let t = Tunnel::of(&spec, "10.0.0.5").unwrap();
        assert_eq!(t.relay_server_port, 22);
        assert_eq!(t.fallback, ("10.0.0.5".to_string(), 22005));
        let args = t.args(
            Path::new("/var/lib/ssp-agent/relay"),
            &("10.211.0.254".into(), 22),
        );
        let line = args.join(" ");
        assert!(line.contains("-R 0.0.0.0:30001:10.211.0.254:22"), "{line}");
        assert!(
            line.contains("-i /var/lib/ssp-agent/relay/id_ed25519"),
            "{line}"
        );
        assert!(line.contains("ExitOnForwardFailure=yes"), "{line}");
        assert!(line.ends_with("ssp-relay@relay.example.org"), "{line}");
        for s in [
            InstanceSpec {
                running: false,
                ..spec.clone()
            },
            InstanceSpec {
                relay_port: 0,
                ..spec.clone()
            },
            InstanceSpec {
                relay_port: 70000,
                ..spec.clone()
            },
        ] {
            assert_eq!(Tunnel::of(&s, "10.0.0.5"), None, "{s:?}");
        }
    }

    #[test]
    fn frp_relay_ports_become_proxies_of_one_frpc_config() {
        let spec = |name: &str, port: u32| InstanceSpec {
            name: name.into(),
            running: true,
            ssh_port: 22005,
            relay_host: "relay.example.org".into(),
            relay_server_port: 0,
            relay_kind: "frp".into(),
            relay_token: "s3cret".into(),
            relay_port: port,
            ..Default::default()
        };
        let a = spec("ann", 30000);
        assert_eq!(Tunnel::of(&a, "10.0.0.5"), None, "no ssh tunnel for frp");
        let (server, pa) = frp_of(&a, "10.0.0.5").unwrap();
        assert_eq!(server.port, 7000, "frps's default bindPort");
        let (_, pb) = frp_of(&spec("bob", 30001), "10.0.0.5").unwrap();
        assert_eq!(
            frp_of(
                &InstanceSpec {
                    running: false,
                    ..a.clone()
                },
                "10.0.0.5"
            ),
            None
        );
        let targets: HashMap<String, (String, u16)> =
            [("ann".to_string(), ("10.211.0.254".to_string(), 22))].into();
        let text = frpc_config(&server, 7402, &[pa, pb], &targets);
        // frp's documented keys (frp 0.52+, TOML).
        for line in [
            "serverAddr = \"relay.example.org\"",
            "serverPort = 7000",
            "auth.method = \"token\"",
            "auth.token = \"s3cret\"",
            "webServer.addr = \"127.0.0.1\"",
            "webServer.port = 7402",
            "[[proxies]]",
            "name = \"ssp-ann\"",
            "type = \"tcp\"",
            "localIP = \"10.211.0.254\"",
            "localPort = 22",
            "remotePort = 30000",
            "name = \"ssp-bob\"",
            // bob's address not read: the host's forward.
            "localIP = \"10.0.0.5\"",
            "localPort = 22005",
            "remotePort = 30001",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        // It parses as TOML, with the proxies as an array of tables.
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["proxies"].as_array().unwrap().len(), 2);
        assert_eq!(v["auth"]["token"].as_str(), Some("s3cret"));
    }

    #[test]
    fn the_wait_doubles_while_it_fails_soon_and_starts_over_after_a_long_run() {
        let first = next_wait(Duration::ZERO, Duration::from_millis(10));
        assert_eq!(first, Duration::from_millis(500));
        let second = next_wait(first, Duration::from_secs(1));
        assert_eq!(second, Duration::from_secs(1));
        let mut w = second;
        for _ in 0..10 {
            w = next_wait(w, Duration::from_secs(1));
        }
        assert_eq!(w, Duration::from_secs(30));
        assert_eq!(
            next_wait(w, Duration::from_secs(120)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_key_is_made_once() {
        let dir = std::env::temp_dir().join(format!("ssp-relay-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = ensure_key(&dir).unwrap();
        assert!(a.starts_with("ssh-ed25519 "), "{a}");
        assert_eq!(ensure_key(&dir).unwrap(), a, "kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
