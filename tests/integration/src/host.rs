//! One simulated host: a network namespace with its own Incus or LXD daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::{image_cache, run, wait_for};

/// Which daemon a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Incus,
    Lxd,
}

/// `ip netns exec` gives the namespace a fresh /sys, which hides the cgroup
/// hierarchies the daemon needs for limits. Mount them again, as the root
/// mount namespace has them, then exec the daemon.
pub(crate) const REMOUNT_CGROUPS: &str = r#"
set -e
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
awk '{ for (i=1;i<=NF;i++) if ($i=="-") { print $5, $(i+1), $(i+3) } }' /proc/1/mountinfo |
while read -r mp fs opts; do
  case "$mp" in /sys/fs/cgroup/*) ;; *) continue ;; esac
  mkdir -p "$mp"
  case "$fs" in
    cgroup2) mount -t cgroup2 cgroup2 "$mp" ;;
    cgroup) mount -t cgroup -o "$(echo "$opts" | sed -e 's/^rw,//' -e 's/^ro,//')" cgroup "$mp" ;;
  esac
done
# A simulated host can have its own /etc/subuid and /etc/subgid (see Host::daemon).
if [ -n "${SSP_TESTBED_SUBID:-}" ]; then
  mount --bind "$SSP_TESTBED_SUBID/subuid" /etc/subuid
  mount --bind "$SSP_TESTBED_SUBID/subgid" /etc/subgid
fi
exec "$@"
"#;

/// A running simulated host. Dropping it deletes its instances, stops the
/// daemon and removes the namespace, state dir and device nodes it made.
pub struct Host {
    pub name: String,
    pub kind: Kind,
    pub netns: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The host's address inside its namespace (what users ssh to).
    pub addr: String,
    /// The root namespace's end of the veth pair (reachable from the host).
    pub gateway: String,
    veth: String,
    gpu_nodes: Vec<PathBuf>,
    daemon: Option<std::process::Child>,
}

impl Host {
    /// Starts host number `index` (1-200) named `name`.
    pub fn start(name: &str, kind: Kind, index: u8) -> anyhow::Result<Host> {
        let mut h = Host::bare_with(name, kind, index)?;
        h.daemon()?;
        h.init(index)
            .with_context(|| format!("initialising host {name}"))?;
        Ok(h)
    }

    /// Host number `index` with its network namespace but no daemon: for a test
    /// that has a setup script start one (with `dir` as `INCUS_DIR`, through
    /// [`Host::in_ns_with_cgroups`]) and set it up from nothing. Dropping it still
    /// deletes the instances, kills every process in the namespace and removes `dir`.
    pub fn bare(name: &str, index: u8) -> anyhow::Result<Host> {
        Host::bare_with(name, Kind::Incus, index)
    }

    fn bare_with(name: &str, kind: Kind, index: u8) -> anyhow::Result<Host> {
        crate::preflight(kind)?;
        let netns = format!("ssptb-{name}");
        let veth = format!("ssptb{index}");
        let dir = PathBuf::from(format!("/var/lib/ssp-testbed/{name}"));
        let mut h = Host {
            name: name.into(),
            kind,
            socket: dir.join("unix.socket"),
            dir,
            addr: format!("10.231.{index}.2"),
            gateway: format!("10.231.{index}.1"),
            netns,
            veth,
            gpu_nodes: vec![],
            daemon: None,
        };
        h.teardown(); // leftovers of an earlier, killed run
        h.network()?;
        Ok(h)
    }

    /// `sh -c SCRIPT sh PROGRAM ARGS...` in this host's namespace with the cgroup
    /// hierarchies mounted again, as a daemon started there needs them; add the
    /// program and its arguments.
    pub fn in_ns_with_cgroups(&self) -> Command {
        let mut c = self.in_ns("sh");
        c.args(["-c", REMOUNT_CGROUPS, "sh"]);
        c
    }

    fn network(&self) -> anyhow::Result<()> {
        let ns = &self.netns;
        let ip = |args: &str| run(Command::new("sh").arg("-c").arg(format!("ip {args}")));
        ip(&format!("netns add {ns}"))?;
        ip(&format!(
            "link add {} type veth peer name eth0 netns {ns}",
            self.veth
        ))?;
        ip(&format!("addr add {}/24 dev {}", self.gateway, self.veth))?;
        ip(&format!("link set {} up", self.veth))?;
        ip(&format!("-n {ns} addr add {}/24 dev eth0", self.addr))?;
        ip(&format!("-n {ns} link set eth0 up"))?;
        ip(&format!("-n {ns} link set lo up"))?;
        // The other simulated hosts (moves between daemons) and nothing else. The
        // root namespace routes between their veths (the namespaces have no other
        // route, so nothing goes further).
        ip(&format!(
            "-n {ns} route add 10.231.0.0/16 via {}",
            self.gateway
        ))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("enabling forwarding between the simulated hosts")?;
        Ok(())
    }

    fn env_var(&self) -> &'static str {
        match self.kind {
            Kind::Incus => "INCUS_DIR",
            Kind::Lxd => "LXD_DIR",
        }
    }

    /// The daemon's CLI (`incus` or `lxc`) aimed at this host's daemon.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(match self.kind {
            Kind::Incus => "incus",
            Kind::Lxd => "lxc",
        });
        c.env(self.env_var(), &self.dir).env("HOME", &self.dir);
        c
    }

    /// Runs the CLI with `args`, returning stdout.
    pub fn cli_run(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.cli().args(args))
    }

    /// A command run inside this host's network namespace.
    pub fn in_ns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    fn daemon(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::File::create(self.dir.join("daemon.log"))?;
        // Each simulated host has its own /etc/subuid and /etc/subgid, as
        // scripts/prepare-host.sh writes them on a host without other large ranges
        // of root's: the lab's uid range and one large range for isolated containers.
        // This machine's own files may hold a smaller range that another package
        // (Debian's lxd) added, too small for the benchmarks' hundreds of containers.
        for f in ["subuid", "subgid"] {
            std::fs::write(
                self.dir.join(f),
                "root:10000:10000\nroot:1000000:1000000000\n",
            )?;
        }
        let mut c = self.in_ns_with_cgroups();
        c.env("SSP_TESTBED_SUBID", &self.dir);
        c.arg(match self.kind {
            Kind::Incus => "/usr/libexec/incus/incusd",
            Kind::Lxd => "/usr/bin/lxd",
        })
        .args(["--group", "root"])
        .env(self.env_var(), &self.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        crate::procs::new_session(&mut c);
        self.daemon = Some(c.spawn().context("starting the daemon")?);
        let waitready = match self.kind {
            Kind::Incus => run(Command::new("incus")
                .args(["admin", "waitready", "--timeout", "60"])
                .env("INCUS_DIR", &self.dir)),
            Kind::Lxd => run(Command::new("lxd")
                .args(["waitready", "--timeout", "60"])
                .env("LXD_DIR", &self.dir)),
        };
        waitready.with_context(|| {
            format!(
                "daemon of {} did not become ready; see {}/daemon.log",
                self.name,
                self.dir.display()
            )
        })?;
        Ok(())
    }

    fn init(&self, index: u8) -> anyhow::Result<()> {
        self.cli_run(&["storage", "create", "default", "btrfs", "size=12GiB"])?;
        self.cli_run(&[
            "profile",
            "device",
            "add",
            "default",
            "root",
            "disk",
            "path=/",
            "pool=default",
        ])?;
        let subnet = format!("ipv4.address=10.232.{index}.1/24");
        self.cli_run(&[
            "network",
            "create",
            "sspbr0",
            &subnet,
            "ipv4.nat=false",
            "ipv6.address=none",
        ])?;
        self.cli_run(&[
            "profile",
            "device",
            "add",
            "default",
            "eth0",
            "nic",
            "network=sspbr0",
            "name=eth0",
        ])?;
        for (file, alias) in [
            ("busybox.tar.gz", "busybox"),
            ("debian-ssh.tar.gz", "debian-ssh"),
        ] {
            let path = image_cache().join(file);
            self.cli_run(&[
                "image",
                "import",
                path.to_str().unwrap_or_default(),
                "--alias",
                alias,
            ])?;
        }
        Ok(())
    }

    /// Creates fake NVIDIA device nodes for minors `minors` and writes a static
    /// inventory describing them; returns the inventory path.
    pub fn fake_gpus(&mut self, minors: &[u32]) -> anyhow::Result<PathBuf> {
        let mut toml = String::from("driver_version = \"550.54.15\"\n");
        for (i, m) in minors.iter().enumerate() {
            let node = PathBuf::from(format!("/dev/nvidia{m}"));
            if !node.exists() {
                run(Command::new("mknod")
                    .arg(&node)
                    .args(["c", "195", &m.to_string()]))?;
                run(Command::new("chmod").arg("0666").arg(&node))?;
                self.gpu_nodes.push(node);
            }
            toml.push_str(&format!(
                "[[gpu]]\nindex = {i}\nuuid = \"GPU-{name}-{m:04}\"\npci = \"0000:{bus:02x}:00.0\"\nmodel = \"Fake RTX 4090\"\nmemory = \"24GiB\"\nminor = {m}\n",
                name = self.name,
                bus = 0x17 + *m
            ));
        }
        let ctl = PathBuf::from("/dev/nvidiactl");
        if !ctl.exists() {
            run(Command::new("mknod").arg(&ctl).args(["c", "195", "255"]))?;
            self.gpu_nodes.push(ctl);
        }
        let path = self.dir.join("gpus.toml");
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// `volatile.uuid` of an instance, straight from the daemon.
    pub fn uuid(&self, instance: &str) -> anyhow::Result<String> {
        Ok(self
            .cli_run(&["config", "get", instance, "volatile.uuid"])?
            .trim()
            .to_string())
    }

    /// Names of all instances on this daemon.
    pub fn instance_names(&self) -> anyhow::Result<Vec<String>> {
        let out = self.cli_run(&["list", "--format", "csv", "-c", "n"])?;
        Ok(out
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Runs `cmd` inside `instance` through the daemon, returning stdout.
    pub fn exec(&self, instance: &str, cmd: &str) -> anyhow::Result<String> {
        self.cli_run(&["exec", instance, "--", "sh", "-c", cmd])
    }

    /// An instance's init PID and status, straight from the daemon.
    pub fn init_pid(&self, name: &str) -> anyhow::Result<(i64, String)> {
        let out = self.cli_run(&["query", &format!("/1.0/instances/{name}/state")])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok((
            v["pid"].as_i64().unwrap_or(0),
            v["status"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Kills the daemon with SIGKILL (its containers keep running) and starts it again.
    pub fn restart_daemon(&mut self) -> anyhow::Result<()> {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        self.daemon()
    }

    /// Kills the daemon with SIGKILL (the host going down, as far as ssp can tell
    /// with its agent killed too); [`Host::start_daemon`] brings it back.
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// Starts the daemon again after [`Host::kill_daemon`].
    pub fn start_daemon(&mut self) -> anyhow::Result<()> {
        self.daemon()
    }

    /// Waits until the daemon answers again (after a restart).
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for("daemon socket", Duration::from_secs(30), || {
            self.cli()
                .args(["list", "--format", "csv"])
                .output()
                .ok()
                .filter(|o| o.status.success())
        })
        .map(|_| ())
    }

    fn teardown(&mut self) {
        // Running containers stop (their processes live outside the host's
        // namespace); the rest goes with the daemon's dir and its pool's loop file,
        // so a host with hundreds of containers is gone in seconds.
        if self.socket.exists() {
            let stopped = self
                .cli()
                .args(["stop", "--all", "--force"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !stopped {
                for n in self.instance_names().unwrap_or_default() {
                    let _ = self.cli().args(["delete", "--force", &n]).output();
                }
            }
        }
        // Every process left in the namespace (daemon, dnsmasq, forkproxy) goes.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("unix.socket.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        for n in self.gpu_nodes.drain(..) {
            let _ = std::fs::remove_file(n);
        }
    }
}

fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", m]).output();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::env::var_os("SSP_TESTBED_KEEP").is_some() {
            eprintln!(
                "SSP_TESTBED_KEEP: leaving host {} ({}) running",
                self.name,
                self.dir.display()
            );
            return;
        }
        self.teardown();
    }
}
