//! A testbed of real daemons for ssp's integration tests and benchmarks.
//!
//! Each simulated host is a network namespace joined to the root namespace by a
//! veth pair, with its own Incus or LXD daemon (own state dir, btrfs pool on a
//! loop file, bridge without NAT) and ssp's offline images imported. Tests run
//! the real ssp binaries against it. Everything is torn down on drop.

pub mod cluster;
pub mod host;
pub mod monitor;
pub mod platform;
pub mod procs;

pub use host::{Host, Kind};
pub use monitor::Monitor;
pub use platform::{AgentSpec, Platform, SshClient};
pub use procs::{free_port, sspctl, Proc, Ssp};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the offline images live (built by scripts/build-images.sh).
pub fn image_cache() -> PathBuf {
    std::env::var_os("SSP_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/ssp/images".into())
}

/// Fails, saying how to fix it, unless this machine can run the testbed.
pub fn preflight(kind: Kind) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        bail!("the integration tests need root (network namespaces, daemons); run them as root via scripts/test.sh");
    }
    let daemon = match kind {
        Kind::Incus => "/usr/libexec/incus/incusd",
        Kind::Lxd => "/usr/bin/lxd",
    };
    for tool in [daemon, "/usr/bin/ip", "/usr/bin/ssh", "/usr/bin/ssh-keygen"] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing; run scripts/prepare-host.sh (installs Incus, LXD, iproute2 and OpenSSH) first");
        }
    }
    for img in ["busybox.tar.gz", "debian-ssh.tar.gz"] {
        if !image_cache().join(img).exists() {
            bail!(
                "image {} is missing; run scripts/build-images.sh first",
                image_cache().join(img).display()
            );
        }
    }
    if std::fs::metadata("/var/lib/lxcfs/proc/meminfo").is_err() {
        bail!(
            "lxcfs is not running (or its mount is stale); run scripts/prepare-host.sh (it starts `lxcfs /var/lib/lxcfs`)"
        );
    }
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    if !subuid.lines().any(|l| l.starts_with("root:10000:")) {
        bail!("/etc/subuid lacks root:10000:10000 (ssp's uid range); run scripts/prepare-host.sh");
    }
    // Every Debian container takes about 8 of root's inotify instances; with the
    // kernel's 128 the test files running side by side would run out.
    let key = "fs.inotify.max_user_instances";
    match ssp_agent::limits::read_proc_sys(key) {
        Some(n) if n >= 4096 => {}
        n => bail!(
            "{key} is {}: too few for the test suite's containers; run scripts/prepare-host.sh (it raises the kernel's limits, in /etc/sysctl.d/90-ssp.conf)",
            n.map(|n| n.to_string()).unwrap_or_else(|| "unreadable".into())
        ),
    }
    let hook = std::path::Path::new(ssp_agent::lxcfs::REBOOT_HOOK);
    if ssp_agent::lxcfs::hook_sleeps_at_every_stop(hook) {
        bail!(
            "{} sleeps 0.5 s at every container stop; run scripts/prepare-host.sh (it puts a hook there that skips the sleep for containers with a cgroup namespace)",
            hook.display()
        );
    }
    Ok(())
}

/// Kills `name`'s init with SIGKILL from the host; returns how long until the
/// daemon reports it running again with a new init.
pub fn kill_init_and_time(host: &Host, name: &str) -> anyhow::Result<Duration> {
    let (pid, status) = host.init_pid(name)?;
    if status != "Running" || pid <= 1 {
        bail!("{name} is {status} (pid {pid})");
    }
    let t = Instant::now();
    // SAFETY: kill(2) with a pid the daemon reported.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    if rc != 0 {
        bail!("kill -9 {pid} failed");
    }
    loop {
        if let Ok((p, s)) = host.init_pid(name) {
            if s == "Running" && p > 1 && p != pid {
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{name} did not run again within 30s of kill -9 of its init");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The median of `v` (the mean of the middle two for an even count), for
/// benchmarks' figures.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Polls `f` until it returns `Some`, or fails after `limit` with `what`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("ssp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("SSP_TESTBED_KEEP").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates an ed25519 key pair at `dir/name`, returning the private key path.
pub fn ssh_keypair(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let key = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key))?;
    Ok(key)
}
