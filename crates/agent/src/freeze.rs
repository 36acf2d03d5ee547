//! A move's final pass from a frozen source: the container's processes are held
//! where they are through the kernel's cgroup freezer, which takes milliseconds
//! (a stop takes a quarter second here, and the daemons' own freeze waits up to a
//! second polling for it). The daemon still counts the container as running, so
//! ssp marks it in its config ([`MARK`]) to know it froze it, across restarts of
//! the agent.
//!
//! A frozen container runs no user code again unless the move goes back: then it
//! is thawed and goes on where it was. Otherwise it is killed while frozen (every
//! process gets SIGKILL before the thaw, so none runs another instruction) and
//! nothing it could have acknowledged after the freeze exists.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use ssp_lxd::Client;

use crate::ensure::EnsureError;

/// Instance config key set while ssp holds the container frozen.
pub const MARK: &str = "user.ssp.frozen";

/// How long the kernel may take to freeze every process before ssp gives up.
const FREEZE_WAIT: Duration = Duration::from_secs(3);

/// The container's cgroup, where its freezer is.
#[derive(Debug, Clone, PartialEq)]
pub enum Cgroup {
    /// cgroup v1: the freezer hierarchy's directory.
    V1(PathBuf),
    /// cgroup v2: the unified hierarchy's directory.
    V2(PathBuf),
}

/// The freezer cgroup of the process `pid` (the container's init), from the lines
/// of `/proc/PID/cgroup`; `root` is where cgroup file systems are mounted.
pub fn cgroup_of(proc_cgroup: &str, root: &Path) -> Option<Cgroup> {
    let mut unified = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "freezer") {
            let dir = root.join("freezer").join(path);
            if dir.join("freezer.state").exists() {
                return Some(Cgroup::V1(dir));
            }
        }
        if controllers.is_empty() {
            // systemd inside the container keeps its own init in init.scope; the
            // container's whole tree is the directory above.
            let path = path.strip_suffix("/init.scope").unwrap_or(path);
            unified = [root.to_path_buf(), root.join("unified")]
                .into_iter()
                .map(|r| r.join(path))
                .find(|d| d.join("cgroup.freeze").exists())
                .map(Cgroup::V2);
        }
    }
    unified
}

impl Cgroup {
    fn dir(&self) -> &Path {
        match self {
            Cgroup::V1(d) | Cgroup::V2(d) => d,
        }
    }

    /// Whether the kernel holds its processes frozen.
    pub fn is_frozen(&self) -> bool {
        match self {
            Cgroup::V1(d) => read(&d.join("freezer.state")).trim() == "FROZEN",
            Cgroup::V2(d) => read(&d.join("cgroup.events"))
                .lines()
                .any(|l| l.trim() == "frozen 1"),
        }
    }

    fn write(&self, frozen: bool) -> std::io::Result<()> {
        match self {
            Cgroup::V1(d) => std::fs::write(
                d.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            Cgroup::V2(d) => {
                std::fs::write(d.join("cgroup.freeze"), if frozen { "1" } else { "0" })
            }
        }
    }

    /// Freezes every process, waiting until the kernel says they are.
    pub async fn freeze(&self) -> std::io::Result<()> {
        self.write(true)?;
        let deadline = Instant::now() + FREEZE_WAIT;
        while !self.is_frozen() {
            if Instant::now() >= deadline {
                let _ = self.write(false);
                return Err(std::io::Error::other(format!(
                    "{} did not freeze within {FREEZE_WAIT:?}",
                    self.dir().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    pub fn thaw(&self) -> std::io::Result<()> {
        self.write(false)
    }

    /// Sends SIGKILL to every process in the tree (they are frozen: each dies on
    /// its way out of the freezer, before running any of its own code), then
    /// thaws it. Returns how many were signalled.
    pub fn kill_then_thaw(&self) -> std::io::Result<usize> {
        let mut pids = Vec::new();
        collect_pids(self.dir(), &mut pids);
        if !pids.is_empty() {
            // The shell's own kill: one process for them all.
            let status = std::process::Command::new("sh")
                .args(["-c", "kill -9 \"$@\" 2>/dev/null; exit 0", "sh"])
                .args(pids.iter().map(|p| p.to_string()))
                .status()?;
            if !status.success() {
                return Err(std::io::Error::other(format!(
                    "kill -9 exited with {status}"
                )));
            }
        }
        self.thaw()?;
        Ok(pids.len())
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>) {
    out.extend(
        read(&dir.join("cgroup.procs"))
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .filter(|p| *p > 0),
    );
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

/// The cgroup of running container `name`, through its init's pid.
pub async fn cgroup(client: &Client, name: &str) -> Result<Option<Cgroup>, EnsureError> {
    let state = client.get(&format!("/1.0/instances/{name}/state")).await?;
    let pid = state["pid"].as_i64().unwrap_or(0);
    if pid <= 0 {
        return Ok(None);
    }
    let lines = read(Path::new(&format!("/proc/{pid}/cgroup")));
    Ok(cgroup_of(&lines, Path::new("/sys/fs/cgroup")))
}

/// Whether the kernel holds running container `name` frozen.
pub async fn frozen(client: &Client, name: &str) -> Result<bool, EnsureError> {
    Ok(cgroup(client, name).await?.is_some_and(|c| c.is_frozen()))
}

/// Freezes running container `name` and marks it so. `Ok(false)` when it could not
/// be frozen (no freezer, or it would not freeze); the caller stops it instead.
pub async fn freeze(client: &Client, name: &str) -> Result<bool, EnsureError> {
    let Some(cg) = cgroup(client, name).await? else {
        return Ok(false);
    };
    // Marked first: an agent that dies between the two still knows to look.
    client
        .patch(
            &format!("/1.0/instances/{name}"),
            json!({"config": {MARK: "true"}}),
        )
        .await?;
    if cg.is_frozen() {
        return Ok(true);
    }
    match cg.freeze().await {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(
                instance = name,
                "freezing for the move: {e}; stopping it instead"
            );
            unmark(client, name).await?;
            Ok(false)
        }
    }
}

async fn unmark(client: &Client, name: &str) -> Result<(), EnsureError> {
    client
        .patch(
            &format!("/1.0/instances/{name}"),
            json!({"config": {MARK: null}}),
        )
        .await?;
    Ok(())
}

/// Whether `config` says ssp froze the container.
pub fn marked(config: &std::collections::BTreeMap<String, String>) -> bool {
    config.get(MARK).map(String::as_str) == Some("true")
}

/// The container ssp froze goes on where it was (a move went back).
pub async fn thaw(client: &Client, name: &str) -> Result<(), EnsureError> {
    if let Some(cg) = cgroup(client, name).await? {
        cg.thaw()
            .map_err(|e| EnsureError::Refused(format!("thawing {name}: {e}")))?;
    }
    unmark(client, name).await
}

/// The container ssp froze is killed where it stands (none of its processes runs
/// again), then the daemon is left with a stopped container: waits up to 10 s for
/// the daemon to see it stopped (then stops it the daemon's way). With `unmark`,
/// the mark goes too (the container stays; not before a deletion).
pub async fn kill(client: &Client, name: &str, unmark_it: bool) -> Result<(), EnsureError> {
    if let Some(cg) = cgroup(client, name).await? {
        if cg.is_frozen() {
            let n = cg
                .kill_then_thaw()
                .map_err(|e| EnsureError::Refused(format!("killing frozen {name}: {e}")))?;
            tracing::info!(instance = name, processes = n, "killed while frozen");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Until the daemon has finished its own stop (status Stopped).
        match client.instance(name).await? {
            Some((inst, _)) if inst.status_code != 102 => {}
            _ => break,
        }
        if Instant::now() >= deadline {
            client.set_state(name, "stop", true).await?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if unmark_it && client.instance(name).await?.is_some() {
        when_not_busy(|| unmark(client, name)).await?;
    }
    Ok(())
}

/// Runs `f` again while the daemon says the instance is busy with another
/// operation or still running (its own stop after a kill: it says the container
/// is stopped a little before it lets it go), for up to 10 s.
pub async fn when_not_busy<T, F, Fut>(mut f: F) -> Result<T, EnsureError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EnsureError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Err(EnsureError::Daemon(e))
                if (e.is_busy() || e.to_string().contains("Instance is running"))
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freezer_is_found_in_either_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let v1 = root.path().join("freezer/lxc.payload.gdw");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("freezer.state"), "THAWED\n").unwrap();
        let lines = "6:freezer:/lxc.payload.gdw\n0::/lxc.payload.gdw/init.scope\n";
        assert_eq!(cgroup_of(lines, root.path()), Some(Cgroup::V1(v1.clone())));
        assert!(!Cgroup::V1(v1.clone()).is_frozen());
        std::fs::write(v1.join("freezer.state"), "FROZEN\n").unwrap();
        assert!(Cgroup::V1(v1).is_frozen());

        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("lxc.payload.gdw");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.freeze"), "0\n").unwrap();
        std::fs::write(v2.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let lines = "0::/lxc.payload.gdw/init.scope\n";
        let cg = cgroup_of(lines, root.path()).unwrap();
        assert_eq!(cg, Cgroup::V2(v2));
        assert!(cg.is_frozen());
        // No freezer anywhere: none.
        assert_eq!(cgroup_of("0::/elsewhere\n", root.path()), None);
    }
}
