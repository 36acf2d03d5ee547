//! ssp's own processes under test: spawn, signal, restart; and `sspctl` calls.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context};

/// Puts a child in its own process group so signals to the test do not reach it.
pub fn new_session(c: &mut Command) {
    c.process_group(0);
}

/// A free TCP port on loopback (bound and released).
///
/// Chosen below the kernel's ephemeral range (32768 and up): a port from that range,
/// free now, can become the source port of some outgoing connection before the
/// process meant to listen on it binds it (seen: an etcd member that never started).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20000 + (std::process::id() * 7919) % 12000;
    for _ in 0..12000 {
        let port = 20000 + (base - 20000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok()
            && TcpListener::bind(("0.0.0.0", port as u16)).is_ok()
        {
            return port as u16;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(17400)
}

/// Paths of the ssp binaries built from this workspace.
#[derive(Clone)]
pub struct Ssp {
    pub dir: PathBuf,
    /// The credential bundle sspctl presents (`SSP_BUNDLE`): the first admin's,
    /// once the first coordinator made it.
    pub bundle: Option<PathBuf>,
    /// Where `sspctl user add` writes users' bundles (`SSP_CREDENTIALS_DIR`).
    pub credentials_dir: Option<PathBuf>,
    /// Binaries built with `ssp-net/plaintext-bench` (no TLS): benchmarks only.
    pub plain: bool,
}

impl Ssp {
    /// Finds the binaries next to the test executable's target dir.
    pub fn locate() -> anyhow::Result<Ssp> {
        let exe = std::env::current_exe()?;
        // target/<profile>/deps/<test> → target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .context("cannot find the target directory")?
            .to_path_buf();
        for b in ["ssp-agent", "ssp-coordinator", "sspctl"] {
            if !dir.join(b).exists() {
                bail!("{} is missing; build the binaries first: cargo build --workspace --bins (scripts/test.sh does)", dir.join(b).display());
            }
        }
        Ok(Ssp {
            dir,
            bundle: None,
            credentials_dir: None,
            plain: false,
        })
    }

    /// The coordinator and sspctl built without TLS (`target/plain/release`), so a
    /// benchmark can measure what TLS costs in the same run.
    pub fn plain() -> anyhow::Result<Ssp> {
        let tls = Self::locate()?;
        // target/<profile> → target/plain/release
        let dir = tls
            .dir
            .parent()
            .context("no target directory")?
            .join("plain/release");
        for b in ["ssp-coordinator", "sspctl"] {
            if !dir.join(b).exists() {
                bail!("{} is missing; build it: cargo build --release -p ssp-coordinator -p sspctl --features ssp-net/plaintext-bench --target-dir target/plain (scripts/test.sh does)", dir.join(b).display());
            }
        }
        Ok(Ssp {
            dir,
            plain: true,
            ..tls
        })
    }

    /// A lazily connecting channel to the coordinator at `addr`, as the admin: mutual
    /// TLS, or for plaintext binaries plain TCP naming the admin in the first line.
    pub fn channel(&self, addr: &str) -> anyhow::Result<tonic::transport::Channel> {
        let tls = self.admin_tls()?;
        if !self.plain {
            return Ok(ssp_net::channel(addr, &tls, ssp_net::COORDINATOR_NAME)?);
        }
        let me = ssp_net::auth::encode(&tls.identity());
        let ep = tonic::transport::Endpoint::from_shared(addr.to_string())?
            .connect_timeout(std::time::Duration::from_secs(3))
            .tcp_nodelay(true);
        Ok(
            ep.connect_with_connector_lazy(tower::service_fn(move |uri: tonic::transport::Uri| {
                let me = me.clone();
                async move {
                    use tokio::io::AsyncWriteExt;
                    let host = uri.host().unwrap_or_default().to_string();
                    let port = uri.port_u16().unwrap_or(80);
                    let mut tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    tcp.write_all(format!("{me}\n").as_bytes()).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
                }
            })),
        )
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The admin's trust (for tests that call gRPC directly).
    pub fn admin_tls(&self) -> anyhow::Result<ssp_net::Tls> {
        let path = self.bundle.as_ref().context("no admin bundle yet")?;
        Ok(ssp_net::Bundle::load(path)?.tls()?)
    }

    /// `sspctl` with this platform's credentials.
    pub fn sspctl_command(&self) -> Command {
        let mut c = Command::new(self.bin("sspctl"));
        if let Some(b) = &self.bundle {
            c.env("SSP_BUNDLE", b);
        }
        if let Some(d) = &self.credentials_dir {
            c.env("SSP_CREDENTIALS_DIR", d);
        }
        c
    }
}

/// A running ssp process that can be killed and started again with the same command.
pub struct Proc {
    pub name: String,
    argv: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `argv` (run through `ip netns exec NS` when `netns` is given, with the
    /// cgroup hierarchies mounted again there, as on a host: the agent freezes
    /// containers through them), logging to `log`.
    pub fn start(
        name: &str,
        netns: Option<&str>,
        argv: &[&str],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let mut full: Vec<String> = Vec::new();
        if let Some(ns) = netns {
            full.extend(["ip", "netns", "exec", ns].map(String::from));
            full.extend(["sh", "-c", crate::host::REMOUNT_CGROUPS, "sh"].map(String::from));
        }
        full.extend(argv.iter().map(|s| s.to_string()));
        let mut p = Proc {
            name: name.into(),
            argv: full,
            log: log.to_path_buf(),
            child: None,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("SSP_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        new_session(&mut c);
        self.child = Some(
            c.spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        Ok(())
    }

    /// Sends `sig` (e.g. libc::SIGKILL) and reaps the process.
    pub fn signal(&mut self, sig: i32) {
        if let Some(mut ch) = self.child.take() {
            // SAFETY: kill(2) on a pid we own.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(ch.id() as i32, sig);
            }
            let _ = ch.wait();
        }
    }

    /// Sends `sig` without waiting (SIGSTOP, SIGCONT).
    pub fn send(&self, sig: i32) {
        if let Some(ch) = &self.child {
            // SAFETY: kill(2) on a pid we own and have not reaped.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(ch.id() as i32, sig);
            }
        }
    }

    /// Whether the process was started and not yet killed through this handle.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process again if it is not running.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    /// kill -9, then start again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGKILL);
        self.spawn()
    }

    /// The process's log so far (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// Runs `sspctl` against `coordinator`.
pub fn sspctl(ssp: &Ssp, coordinator: &str, args: &[&str]) -> Output {
    ssp.sspctl_command()
        .arg("--coordinator")
        .arg(coordinator)
        .args(args)
        .output()
        .expect("sspctl runs")
}
