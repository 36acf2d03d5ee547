//! A whole ssp platform on testbed hosts: one coordinator (or a cluster of them),
//! one agent per host.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{free_port, sspctl, wait_for, Host, Proc, Scratch, Ssp};

/// The coordinator, the agents and the scratch space of one test.
pub struct Platform {
    pub ssp: Ssp,
    /// The first coordinator (the one that formed the cluster).
    pub coordinator: Proc,
    /// Further coordinators of a cluster, and every coordinator's port.
    pub more_coordinators: Vec<Proc>,
    pub coordinator_ports: Vec<u16>,
    /// Addresses `sspctl` uses (comma-separated).
    pub addr: String,
    pub agents: Vec<Proc>,
    /// gRPC address of each agent, in the order given.
    pub agent_addrs: Vec<String>,
    /// Root under which shared folders may live.
    pub shared_root: PathBuf,
    pub scratch: Scratch,
}

/// The real OpenSSH client, driven by an ssh_config file that `sspctl ssh-config` printed.
pub struct SshClient {
    pub config: PathBuf,
    pub alias: String,
}

impl SshClient {
    /// Runs `cmd` in the container over SSH, returning stdout.
    pub fn run(&self, cmd: &str) -> anyhow::Result<String> {
        crate::run(
            std::process::Command::new("ssh")
                .arg("-F")
                .arg(&self.config)
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "ConnectTimeout=5",
                    &self.alias,
                    cmd,
                ]),
        )
    }
}

/// What one agent is given.
pub struct AgentSpec<'a> {
    pub host: &'a Host,
    pub gpu_inventory: Option<PathBuf>,
    /// The agent's `labels`.
    pub labels: &'a [&'a str],
    /// The agent's `ssh_forward` (default: NAT).
    pub ssh_forward: Option<&'a str>,
    /// Raw lines appended to the agent's config (e.g. an `[nvidia]` table).
    pub extra_config: &'a str,
}

impl<'a> AgentSpec<'a> {
    /// An agent on `host` with NVML for GPUs, no labels and the default forward.
    pub fn new(host: &'a Host) -> Self {
        AgentSpec {
            host,
            gpu_inventory: None,
            labels: &[],
            ssh_forward: None,
            extra_config: "",
        }
    }
}

impl Platform {
    /// Starts a coordinator in the root namespace and an agent in each host's namespace,
    /// and waits until every agent has registered.
    pub fn start(tag: &str, agents: &[AgentSpec]) -> anyhow::Result<Platform> {
        Self::start_with(tag, agents, "")
    }

    /// Like [`Platform::start`], with `coordinator_extra` (top-level keys) added to
    /// the coordinator's config.
    pub fn start_with(
        tag: &str,
        agents: &[AgentSpec],
        coordinator_extra: &str,
    ) -> anyhow::Result<Platform> {
        let mut p = Platform::start_coordinators_with(tag, 1, None, coordinator_extra)?;
        p.add_agents(agents)?;
        Ok(p)
    }

    /// Starts `n` coordinators in the root namespace (the first forms the cluster,
    /// the others join it), and no agents yet.
    pub fn start_coordinators(tag: &str, n: usize) -> anyhow::Result<Platform> {
        Self::start_coordinators_as(tag, n, None)
    }

    /// Like [`Platform::start_coordinators`]; with `gid_base`, coordinator `i` runs
    /// with group id `gid_base + i`, so that firewall rules (`-m owner --gid-owner`)
    /// can cut one coordinator's connections and leave the others'.
    pub fn start_coordinators_as(
        tag: &str,
        n: usize,
        gid_base: Option<u32>,
    ) -> anyhow::Result<Platform> {
        Self::start_coordinators_with(tag, n, gid_base, "")
    }

    fn start_coordinators_with(
        tag: &str,
        n: usize,
        gid_base: Option<u32>,
        extra: &str,
    ) -> anyhow::Result<Platform> {
        let mut ssp = Ssp::locate()?;
        let scratch = Scratch::new(tag)?;
        let dir = scratch.path().to_path_buf();
        ssp.credentials_dir = Some(dir.clone());
        let shared_root = dir.join("shared");
        std::fs::create_dir_all(&shared_root)?;
        let mut procs = Vec::new();
        let mut ports = Vec::new();
        for i in 0..n.max(1) {
            let port = free_port();
            let cfg = format!(
                "listen = \"0.0.0.0:{port}\"\nadvertise = \"http://127.0.0.1:{port}\"\ndata_dir = \"{data}\"\nshared_roots = [\"{root}\"]\ndefault_shares = [\"{root}/team:/shared\"]\nreconcile_secs = 5\nhost_timeout_secs = 6\nbootstrap = {boot}\n{extra}[defaults]\ncpus = 1\nmemory = \"1GiB\"\ndisk = \"2GiB\"\nprocesses = 2000\nimage = \"debian-ssh\"\n",
                data = dir.join(format!("coordinator{i}")).display(),
                root = shared_root.display(),
                boot = i == 0,
            );
            let cfg_path = dir.join(format!("coordinator{i}.toml"));
            std::fs::write(&cfg_path, cfg)?;
            let gid = gid_base.map(|g| format!("--regid={}", g + i as u32));
            let mut argv: Vec<&str> = match &gid {
                Some(g) => vec!["setpriv", g, "--clear-groups", "--"],
                None => vec![],
            };
            let bin = ssp.bin("ssp-coordinator");
            argv.extend([
                bin.to_str().unwrap_or_default(),
                "--config",
                cfg_path.to_str().unwrap_or_default(),
            ]);
            // The first coordinator forms the CA; the others join it with a token.
            let token = dir.join(format!("token-coordinator{i}"));
            if i > 0 {
                let first = format!("http://127.0.0.1:{}", ports[0]);
                let out = sspctl(
                    &ssp,
                    &first,
                    &[
                        "token",
                        "create",
                        "--role",
                        "coordinator",
                        "--out",
                        token.to_str().unwrap_or_default(),
                    ],
                );
                if !out.status.success() {
                    bail!(
                        "token for coordinator {i}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                argv.extend(["--token", token.to_str().unwrap_or_default()]);
            }
            procs.push(Proc::start(
                &format!("coordinator{i}"),
                None,
                &argv,
                &dir.join(format!("coordinator{i}.log")),
            )?);
            ports.push(port);
            if i == 0 {
                let admin = dir.join("coordinator0/tls/admin.bundle");
                wait_for(
                    "the first coordinator's admin credentials",
                    Duration::from_secs(20),
                    || admin.exists().then_some(()),
                )
                .with_context(|| procs[0].log_tail())?;
                ssp.bundle = Some(admin);
            }
        }
        let addr = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = procs.into_iter();
        let coordinator = procs.next().context("no coordinator")?;
        let p = Platform {
            ssp,
            coordinator,
            more_coordinators: procs.collect(),
            coordinator_ports: ports.clone(),
            addr,
            agents: Vec::new(),
            agent_addrs: Vec::new(),
            shared_root,
            scratch,
        };
        let first = format!("http://127.0.0.1:{}", ports[0]);
        for port in &ports[1..] {
            let out = sspctl(
                &p.ssp,
                &first,
                &["cluster", "join", &format!("http://127.0.0.1:{port}")],
            );
            if !out.status.success() {
                bail!(
                    "cluster join of coordinator on port {port} failed: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    p.coordinator.log_tail()
                );
            }
        }
        Ok(p)
    }

    /// Starts an agent in each host's namespace, listing every coordinator, and
    /// waits until each has registered.
    pub fn add_agents(&mut self, agents: &[AgentSpec]) -> anyhow::Result<()> {
        let dir = self.scratch.path().to_path_buf();
        for a in agents {
            let h = a.host;
            let aport = free_port();
            let coordinators = self
                .coordinator_ports
                .iter()
                .map(|p| format!("\"http://{}:{p}\"", h.gateway))
                .collect::<Vec<_>>()
                .join(", ");
            let mut cfg = format!(
                "name = \"{name}\"\nlisten = \"0.0.0.0:{aport}\"\nadvertise = \"http://{addr}:{aport}\"\ncoordinators = [{coordinators}]\nsocket = \"{sock}\"\nssh_host = \"{addr}\"\nssh_ports = [22000, 22099]\nshared_roots = [\"{root}\"]\nstate_dir = \"{state}\"\nheartbeat_secs = 2\nresync_secs = 5\n",
                name = h.name,
                addr = h.addr,
                sock = h.socket.display(),
                state = dir.join(format!("agent-{}", h.name)).display(),
                root = self.shared_root.display(),
            );
            if let Some(inv) = &a.gpu_inventory {
                cfg.push_str(&format!("gpu_inventory = \"{}\"\n", inv.display()));
            }
            if let Some(f) = a.ssh_forward {
                cfg.push_str(&format!("ssh_forward = \"{f}\"\n"));
            }
            if !a.labels.is_empty() {
                cfg.push_str(&format!("labels = {:?}\n", a.labels));
            }
            cfg.push_str(a.extra_config);
            self.agent_addrs.push(format!("http://{}:{aport}", h.addr));
            let path = dir.join(format!("agent-{}.toml", h.name));
            std::fs::write(&path, cfg)?;
            let token = self.agent_token(&h.name)?;
            self.agents.push(Proc::start(
                &format!("agent-{}", h.name),
                Some(&h.netns),
                &[
                    self.ssp.bin("ssp-agent").to_str().unwrap_or_default(),
                    "--config",
                    path.to_str().unwrap_or_default(),
                    "--token",
                    token.to_str().unwrap_or_default(),
                ],
                &dir.join(format!("agent-{}.log", h.name)),
            )?);
        }
        for a in agents {
            self.wait_registered(&a.host.name)?;
        }
        Ok(())
    }

    /// The first coordinator's own trust: what agents accept calls from (for
    /// tests that drive an agent directly, as a coordinator would).
    pub fn coordinator_tls(&self) -> anyhow::Result<ssp_net::Tls> {
        let b = ssp_net::Bundle::load(&self.scratch.path().join("coordinator0/tls/node.bundle"))?;
        Ok(b.tls()?)
    }

    /// A fresh join token for the agent of `host` (used once, at its first start).
    pub fn agent_token(&self, host: &str) -> anyhow::Result<PathBuf> {
        let token = self.scratch.path().join(format!("token-agent-{host}"));
        self.ctl_ok(&[
            "token",
            "create",
            "--role",
            "agent",
            "--out",
            token.to_str().unwrap_or_default(),
        ])?;
        Ok(token)
    }

    /// Waits until `host` is known to the coordinator.
    pub fn wait_registered(&self, host: &str) -> anyhow::Result<()> {
        wait_for(
            &format!("agent of {host} to register"),
            Duration::from_secs(30),
            || {
                let out = self.ctl(&["-o", "json", "hosts"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                v.as_array()?
                    .iter()
                    .any(|h| h["name"] == host)
                    .then_some(())
            },
        )
        .with_context(|| {
            format!(
                "coordinator log:\n{}\nagent log:\n{}",
                self.coordinator.log_tail(),
                self.agents
                    .iter()
                    .map(|a| a.log_tail())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    /// Runs `sspctl ARGS` against this platform.
    pub fn ctl(&self, args: &[&str]) -> Output {
        sspctl(&self.ssp, &self.addr, args)
    }

    /// Runs `sspctl ARGS`, failing with its stderr unless it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctl(args);
        if !out.status.success() {
            bail!(
                "sspctl {} failed: {}\ncoordinator log:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.coordinator.log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Runs `sspctl ARGS`, expecting it to fail; returns its stderr.
    pub fn ctl_err(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctl(args);
        if out.status.success() {
            bail!("sspctl {} succeeded but should have failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stderr).to_string())
    }

    /// Writes what `sspctl ssh-config NAME [--outside]` prints (with `key` as the
    /// identity and a known_hosts file of NAME's) and returns an OpenSSH client that
    /// uses only that file.
    pub fn ssh_client(&self, name: &str, key: &Path, outside: bool) -> anyhow::Result<SshClient> {
        let dir = self.scratch.path();
        let known_hosts = dir.join(format!("known_hosts-{name}"));
        let mut args = vec![
            "ssh-config",
            name,
            "--identity",
            key.to_str().unwrap_or_default(),
            "--known-hosts",
            known_hosts.to_str().unwrap_or_default(),
        ];
        let suffix = if outside { "-outside" } else { "" };
        if outside {
            args.push("--outside");
        }
        let config = self.ctl_ok(&args)?;
        let path = dir.join(format!("ssh_config-{name}{suffix}"));
        std::fs::write(&path, config)?;
        Ok(SshClient {
            config: path,
            alias: format!("ssp-{name}{suffix}"),
        })
    }

    /// [`Platform::ssh_client`] for the login from here, once a login as NAME works.
    pub fn ssh_login(&self, name: &str, key: &Path) -> anyhow::Result<SshClient> {
        let client = self.ssh_client(name, key, false)?;
        let who = wait_for(&format!("{name}'s sshd"), Duration::from_secs(60), || {
            client.run("id -un").ok()
        })?;
        if who.trim() != name {
            bail!("logged in as {who:?}, expected {name}");
        }
        Ok(client)
    }

    /// `sspctl -o json ARGS`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let text = self.ctl_ok(&full)?;
        serde_json::from_str(&text)
            .with_context(|| format!("sspctl {} printed {text}", args.join(" ")))
    }

    /// `sspctl ls` without the disk use each daemon measures as its containers
    /// write (their journals, say): what ssp placed and how each is reached, for
    /// comparing before and after.
    pub fn ls_placed(&self) -> anyhow::Result<serde_json::Value> {
        let mut ls = self.ctl_json(&["ls"])?;
        for row in ls.as_array_mut().into_iter().flatten() {
            if let Some(o) = row.as_object_mut() {
                o.remove("disk_used_bytes");
            }
        }
        Ok(ls)
    }
}
