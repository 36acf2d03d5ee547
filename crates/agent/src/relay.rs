//! Access from outside the LAN through the lab's relay: for every container whose
//! spec names a relay port, an OpenSSH reverse tunnel from this host to the relay
//! (`ssh -N -R 0.0.0.0:PORT:CONTAINER:22`), supervised here: a tunnel that ends is
//! started again after a short wait, longer each time it ends soon after starting.
//! The agent logs in with its own key (`state_dir/relay/id_ed25519`, made at the
//! first start), which `sspctl relay show` lists for the relay's authorized_keys.

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
    pub relay_ssh_port: u16,
    pub relay_user: String,
    pub relay_port: u16,
    /// The host's forward, for containers whose own address the host cannot reach.
    pub fallback: (String, u16),
}

impl Tunnel {
    /// The tunnel `spec` asks for: one for a running container with a relay port.
    pub fn of(spec: &InstanceSpec, ssh_host: &str) -> Option<Tunnel> {
        let relay_port = u16::try_from(spec.relay_port).ok().filter(|p| *p > 0)?;
        if !spec.running || spec.relay_host.is_empty() {
            return None;
        }
        Some(Tunnel {
            name: spec.name.clone(),
            relay_host: spec.relay_host.clone(),
            relay_ssh_port: u16::try_from(spec.relay_ssh_port)
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
            self.relay_ssh_port.to_string(),
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
pub async fn supervise(host: Arc<HostState>, dir: PathBuf) {
    let mut running: HashMap<String, (Tunnel, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let wanted: HashMap<String, Tunnel> = host
            .specs
            .names()
            .into_iter()
            .filter_map(|n| host.specs.get(&n))
            .filter_map(|s| Tunnel::of(&s, &host.ssh_host))
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
    match host
        .client
        .get(&format!("/1.0/instances/{}/state", t.name))
        .await
    {
        Ok(state) => match crate::ensure::lan_address(&state) {
            Some(a) => (a.to_string(), 22),
            None => t.fallback.clone(),
        },
        Err(_) => t.fallback.clone(),
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
            relay_ssh_port: 0,
            relay_user: "ssp-relay".into(),
            relay_port: 30001,
            ..Default::default()
        };
        let t = Tunnel::of(&spec, "10.0.0.5").unwrap();
        assert_eq!(t.relay_ssh_port, 22);
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
