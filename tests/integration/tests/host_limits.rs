//! A host's kernel limits for many containers: the set-up keeps them across a
//! reboot and a second run changes nothing; an agent names a shortfall with the
//! number of containers it allows; a container that cannot boot for it shows the
//! units that failed inside, in `sspctl ls` and in `sspctl user add`'s error.
//!
//! These tests change limits that every process on the machine shares (the
//! inotify budget of root's is one for the whole host), so
//! `scripts/integration-tests.sh` runs this file alone, after the others; each
//! test puts back what it changed, also when it fails.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

const INSTANCES: &str = "fs.inotify.max_user_instances";

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn read(key: &str) -> Result<u64> {
    ssp_agent::limits::read_proc_sys(key).with_context(|| format!("reading {key}"))
}

fn write(key: &str, value: u64) -> Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value.to_string()).with_context(|| format!("setting {key} to {value}"))
}

/// Puts sysctls back as they were when it was made (their whole text: some
/// hold more than one number).
struct Restore(Vec<(std::path::PathBuf, String)>);

impl Restore {
    fn keys(keys: &[&str]) -> Result<Restore> {
        Ok(Restore(
            keys.iter()
                .map(|k| {
                    let path = Path::new("/proc/sys").join(k.replace('.', "/"));
                    let text =
                        std::fs::read_to_string(&path).with_context(|| format!("reading {k}"))?;
                    Ok((path, text))
                })
                .collect::<Result<_>>()?,
        ))
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (path, text) in &self.0 {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!(
                    "could not put {} back to {}: {e}",
                    path.display(),
                    text.trim()
                );
            }
        }
    }
}

/// Takes every inotify instance of root's that is free but `leave`, as other
/// containers would have: held until dropped.
fn take_inotify_instances(leave: usize) -> Result<Vec<OwnedFd>> {
    let mut held = Vec::new();
    loop {
        // SAFETY: inotify_init1 has no preconditions; a descriptor it returns is ours.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            ensure!(e.raw_os_error() == Some(libc::EMFILE), "inotify_init1: {e}");
            break;
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        #[allow(unsafe_code)]
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        ensure!(held.len() < 100_000, "no end to root's inotify instances");
    }
    ensure!(
        held.len() >= leave,
        "only {} inotify instances of root's were free, fewer than the {leave} to leave",
        held.len()
    );
    held.truncate(held.len() - leave);
    Ok(held)
}

/// The warnings `sspctl hosts` shows for the (only) host; None if it cannot say.
fn host_warnings(p: &Platform) -> Option<Vec<String>> {
    let hosts = p.ctl_json(&["hosts"]).ok()?;
    Some(
        hosts[0]["warnings"]
            .as_array()?
            .iter()
            .filter_map(|w| w.as_str().map(String::from))
            .collect(),
    )
}

#[test]
fn a_host_short_of_inotify_instances_is_named_and_its_container_says_why() -> Result<()> {
    let host = Host::start("lim", Kind::Incus, 141)?;
    let p = Platform::start(
        "host-limits",
        &[AgentSpec {
            extra_config: "max_containers = 60\n",
            ..AgentSpec::new(&host)
        }],
    )?;
    let key = ssh_keypair(p.scratch.path(), "gdw")?;
    let public = format!("{}.pub", key.display());

    // Debian's default, as the kernel boots with it.
    let _restore = Restore::keys(&[INSTANCES])?;
    write(INSTANCES, 128)?;

    // 1. The agent names the shortfall, with the containers it allows.
    let warning = wait_for(
        "the agent's warning about inotify instances",
        Duration::from_secs(20),
        || {
            host_warnings(&p)?
                .into_iter()
                .find(|w| w.starts_with(INSTANCES))
        },
    )?;
    println!("sspctl hosts: {warning}");
    ensure!(
        warning.starts_with("fs.inotify.max_user_instances is 128: enough for about 8 containers (16 each")
            && warning.contains("this host is meant for 60 (the agent's max_containers): set it to at least 960 in /etc/sysctl.d"),
        "{warning}"
    );
    let table = p.ctl_ok(&["hosts"])?;
    ensure!(
        table.contains("ready (") && table.contains(&format!("lim: warning: {warning}")),
        "sspctl hosts does not show the warning:\n{table}"
    );

    // The daemon's open files too: with 400, room for 36 containers, not 60.
    let info: serde_json::Value = serde_json::from_str(&host.cli_run(&["query", "/1.0"])?)?;
    let pid = info["environment"]["server_pid"]
        .as_u64()
        .context("the daemon's server_pid")?
        .to_string();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft = ssp_agent::limits::open_files(&limits).context("the daemon's open files")?;
    run(Command::new("prlimit").args(["--pid", &pid, "--nofile=400:"]))?;
    let files = wait_for(
        "the agent's warning about the daemon's open files",
        Duration::from_secs(20),
        || {
            host_warnings(&p)?
                .into_iter()
                .find(|w| w.starts_with("the daemon"))
        },
    );
    run(Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={soft}:")]))?;
    let files = files?;
    println!("sspctl hosts: {files}");
    ensure!(
        files.starts_with(&format!(
            "the daemon (pid {pid}) may open 400 files: enough for about 36 containers"
        )) && files.ends_with("to at least 496"),
        "{files}"
    );

    // 2. With the host's budget used up (as by the containers before it), a new
    //    container's init cannot start: crash loop, and ls and user add say why.
    let held = take_inotify_instances(0)?;
    println!(
        "holding the {} free inotify instances of root's",
        held.len()
    );
    let err = p.ctl_err(&[
        "user",
        "add",
        "ann",
        "--ssh-key",
        &public,
        "--wait-timeout",
        "90",
    ])?;
    println!("sspctl user add ann: {}", err.trim());
    ensure!(
        err.contains("user ann is added, but their container on lim did not come up: failing: ")
            && err.contains("init gave up: Failed to allocate manager object: Too many open files")
            && err.contains("fs.inotify.max_user_instances is 128"),
        "{err}"
    );
    let ls = p.ctl_ok(&["ls"])?;
    ensure!(
        ls.contains(
            "ann on lim: init gave up: Failed to allocate manager object: Too many open files"
        ),
        "sspctl ls does not say why ann is down:\n{ls}"
    );
    p.ctl_ok(&["user", "remove", "ann"])?;

    // 3. One instance left: systemd starts, and units that need more fail; the
    //    network never comes up, so neither does SSH.
    drop(held);
    let held = take_inotify_instances(1)?;
    let err = p.ctl_err(&[
        "user",
        "add",
        "gdw",
        "--ssh-key",
        &public,
        "--wait-timeout",
        "90",
    ])?;
    println!("sspctl user add gdw: {}", err.trim());
    ensure!(
        err.contains(
            "user gdw is added, but their container on lim did not come up: failed inside: "
        ) && err.contains("systemd-networkd.service")
            && err.contains("fs.inotify.max_user_instances is 128"),
        "{err}"
    );
    let ls = p.ctl_json(&["ls"])?;
    let problem = ls[0]["problem"].as_str().unwrap_or_default().to_string();
    ensure!(
        ls[0]["name"] == "gdw"
            && ls[0]["state"] == "Running"
            && problem.starts_with("failed inside: ")
            && problem.contains("systemd-networkd.service"),
        "sspctl ls -o json: {ls}"
    );
    let table = p.ctl_ok(&["ls"])?;
    ensure!(
        table.contains("Running (see below)") && table.contains(&format!("gdw on lim: {problem}")),
        "{table}"
    );

    // 4. With the limit as the set-up makes it, a restart boots cleanly: gdw logs
    //    in and nothing is reported any more; the agent's warning goes. (The
    //    restart of a container whose boot hung used to race the agent's heal: it
    //    saw the restart's stop, started the container itself, and the daemon's
    //    own start failed with "invalid argument".)
    drop(held);
    drop(_restore);
    host.cli_run(&["restart", "gdw", "--force"])?;
    p.ssh_login("gdw", &key)?;
    wait_for("gdw's problem to clear", Duration::from_secs(20), || {
        let ls = p.ctl_json(&["ls"]).ok()?;
        (ls[0]["problem"] == "").then_some(())
    })?;
    wait_for(
        "the host's warning to clear",
        Duration::from_secs(20),
        || {
            let w = host_warnings(&p)?;
            (!w.iter().any(|w| w.starts_with(INSTANCES))).then_some(())
        },
    )?;
    Ok(())
}

/// The values `scripts/host-limits.sh` keeps, from its file.
fn kept(file: &Path) -> Result<Vec<(String, u64)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').context("key = value")?;
            Ok((k.trim().to_string(), v.trim().parse()?))
        })
        .collect()
}

/// Every key the sysctl files set at boot that this kernel has (patterns left out).
fn boot_keys() -> Vec<String> {
    let mut keys = std::collections::BTreeSet::new();
    for dir in [
        "/etc/sysctl.d",
        "/run/sysctl.d",
        "/usr/local/lib/sysctl.d",
        "/usr/lib/sysctl.d",
        "/lib/sysctl.d",
    ] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            keys.extend(sysctl_keys(&text));
        }
    }
    keys.extend(sysctl_keys(
        &std::fs::read_to_string("/etc/sysctl.conf").unwrap_or_default(),
    ));
    keys.into_iter()
        .filter(|k| Path::new("/proc/sys").join(k.replace('.', "/")).is_file())
        .collect()
}

/// The keys a sysctl file sets (`key = value`, `-key = value`; `/` for `.`).
fn sysctl_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k.trim().trim_start_matches('-').replace('/', "."))
        .filter(|k| !k.is_empty() && !k.contains('*'))
        .collect()
}

/// What the kernel starts with (Debian 12's 6.1 and later; watches depend on the
/// memory, this is the least).
fn boot_default(key: &str) -> u64 {
    match key {
        "fs.inotify.max_user_instances" => 128,
        "fs.inotify.max_user_watches" => 8192,
        "fs.inotify.max_queued_events" => 16384,
        "kernel.keys.maxkeys" => 200,
        "kernel.keys.maxbytes" => 20000,
        "vm.max_map_count" => 65530,
        _ => 1024,
    }
}

fn host_limits(env: &[(&str, &str)]) -> Result<String> {
    let mut c = Command::new("bash");
    c.arg(repo().join("scripts/host-limits.sh"));
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

#[test]
fn the_set_up_keeps_the_limits_across_a_reboot_and_a_second_run_changes_nothing() -> Result<()> {
    let file = Path::new("/etc/sysctl.d/90-ssp.conf");
    host_limits(&[])?;
    let values = kept(file)?;
    let keys: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
    ensure!(keys.contains(&INSTANCES) && keys.len() >= 6, "{values:?}");
    for (k, v) in &values {
        ensure!(
            read(k)? == *v,
            "{k} is {} now, {v} in {}",
            read(k)?,
            file.display()
        );
    }
    let _restore = Restore::keys(&keys)?;

    // A second run changes nothing: not the file, not a value.
    let before = (std::fs::read(file)?, std::fs::metadata(file)?.modified()?);
    let out = host_limits(&[])?;
    ensure!(out.contains("unchanged"), "second run: {out}");
    ensure!(
        before == (std::fs::read(file)?, std::fs::metadata(file)?.modified()?),
        "the second run rewrote {}",
        file.display()
    );
    for (k, v) in &values {
        ensure!(
            read(k)? == *v,
            "{k} changed to {} in the second run",
            read(k)?
        );
    }

    // A reboot: the kernel starts with its defaults, then the sysctl files are
    // applied in order (what systemd-sysctl does at boot; `sysctl --system` here).
    // Every other key those files set is put back afterwards too: this machine's
    // own values must stay as they were (fs.protected_regular = 2 from Debian's
    // 99-protect-links.conf, say, changes what members may do in shared folders).
    let boot = boot_keys();
    let _others = Restore::keys(&boot.iter().map(String::as_str).collect::<Vec<_>>())?;
    for (k, _) in &values {
        write(k, boot_default(k))?;
    }
    let out = Command::new("sysctl").arg("--system").output()?;
    ensure!(
        out.status.success(),
        "sysctl --system: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (k, v) in &values {
        ensure!(
            read(k)? >= *v,
            "after the reboot {k} is {}, below {v}",
            read(k)?
        );
    }

    // A value set higher by the admin is kept, in the file too.
    let scratch = ssp_integration::Scratch::new("host-limits")?;
    let other = scratch.path().join("90-ssp.conf");
    let queued = "fs.inotify.max_queued_events";
    let higher = read(queued)? + 4096;
    write(queued, higher)?;
    let out = host_limits(&[("SSP_SYSCTL_FILE", other.to_str().unwrap_or_default())])?;
    let in_file = kept(&other)?;
    ensure!(
        in_file.iter().any(|(k, v)| k == queued && *v == higher) && read(queued)? == higher,
        "{queued} set to {higher} by hand: {out}\n{in_file:?}"
    );
    // And bad input changes nothing.
    let mut c = Command::new("bash");
    c.arg(repo().join("scripts/host-limits.sh"))
        .env("SSP_MAX_CONTAINERS", "lots")
        .env("SSP_SYSCTL_FILE", scratch.path().join("bad.conf"));
    let bad = c.output()?;
    let said = String::from_utf8_lossy(&bad.stderr);
    if bad.status.success() || !said.contains("SSP_MAX_CONTAINERS=lots: expected a whole number") {
        bail!("SSP_MAX_CONTAINERS=lots was taken: {said}");
    }
    ensure!(!scratch.path().join("bad.conf").exists());
    Ok(())
}
