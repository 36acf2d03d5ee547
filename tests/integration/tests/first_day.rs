//! README's first command on an Incus daemon that has never seen ssp: its own state
//! dir, no images, no storage pool, no network, no ssp config. `scripts/ssp-up.sh`
//! starts the daemon, sets it up, builds and starts ssp and adds a demo user; the
//! ssh command it prints logs in. A second run changes nothing. Then what a lab's
//! first day needs: a second user who can log in as soon as `sspctl user add`
//! returns, both users writing in the default shared folder, a plain container
//! beside ssp's, and a hostname that resolves inside (sudo does not complain).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, wait_for, Host, Scratch};

/// Where ssp-up keeps everything of this test's platform (all under a scratch dir).
struct Setup {
    root: PathBuf,
}

impl Setup {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    /// `scripts/ssp-up.sh` inside the host's namespace, aimed at its daemon dir.
    fn ssp_up(&self, host: &Host) -> Result<Output> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut c = host.in_ns_with_cgroups();
        c.arg("bash")
            .arg(repo.join("scripts/ssp-up.sh"))
            .envs(self.env(host))
            // ssp-up, and the daemon it starts, see this run's own /etc/subuid
            // and /etc/subgid (bound over the machine's in their mount namespace).
            .env("SSP_TESTBED_SUBID", self.path("subid"))
            .stdin(Stdio::null());
        let out = c.output().context("running scripts/ssp-up.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/ssp-up.sh failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- logs\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        // Its steps and when each began: shown with the test's output.
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        Ok(out)
    }

    fn env(&self, host: &Host) -> Vec<(String, String)> {
        let p = |s: &str| self.path(s).display().to_string();
        vec![
            ("INCUS_DIR".into(), host.dir.display().to_string()),
            ("SSP_ETC".into(), p("etc")),
            ("SSP_LOG".into(), p("log")),
            ("SSP_RUN".into(), p("run")),
            ("SSP_BIN".into(), p("bin")),
            ("SSP_STATE".into(), p("state")),
            ("SSP_SHARED".into(), p("shared")),
            ("SSP_POOL_SIZE".into(), "24GiB".into()),
            ("HOME".into(), p("home")),
        ]
        .into_iter()
        .chain(toolchain_homes())
        .collect()
    }

    /// sspctl (the one ssp-up installed) in the host's namespace.
    fn ctl(&self, host: &Host, args: &[&str]) -> Result<String> {
        run(host
            .in_ns(self.path("bin/sspctl"))
            .args(args)
            .env("HOME", self.path("home"))
            .env("SSP_CREDENTIALS_DIR", self.path("home")))
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for f in ["ssp-coordinator.log", "ssp-agent.log", "incusd.log"] {
            let text = std::fs::read_to_string(self.path("log").join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            all.push_str(&format!("== {f}\n"));
            for l in tail.into_iter().rev() {
                all.push_str(l);
                all.push('\n');
            }
        }
        all
    }

    fn pid(&self, name: &str) -> String {
        std::fs::read_to_string(self.path("run").join(format!("{name}.pid")))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// ssp-up runs with a HOME of its own; rustup and cargo still need the ones the
/// toolchain was installed in (`cargo test` passes them on; a test binary run by
/// itself finds them under the real HOME).
fn toolchain_homes() -> Vec<(String, String)> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    [("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")]
        .into_iter()
        .filter_map(|(var, dir)| {
            let v = std::env::var(var).unwrap_or_else(|_| format!("{home}/{dir}"));
            Path::new(&v).is_dir().then(|| (var.to_string(), v))
        })
        .collect()
}

/// The `ssh -F FILE ALIAS` line ssp-up prints last.
fn printed_ssh(stdout: &str) -> Result<Vec<String>> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("ssh "))
        .with_context(|| format!("ssp-up printed no ssh command:\n{stdout}"))?;
    Ok(line.split_whitespace().map(String::from).collect())
}

/// Runs the printed ssh command with `remote` as the command, once, no retry.
fn ssh(words: &[String], known_hosts: &Path, remote: &str) -> Result<Output> {
    Command::new(&words[0])
        .args(&words[1..])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(remote)
        .output()
        .context("running ssh")
}

fn ssh_ok(words: &[String], known_hosts: &Path, remote: &str) -> Result<String> {
    let out = ssh(words, known_hosts, remote)?;
    ensure!(
        out.status.success(),
        "`{} {remote}` failed: {}",
        words.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// What a second run of ssp-up must leave exactly as it was.
fn snapshot(setup: &Setup, host: &Host) -> Result<BTreeMap<String, String>> {
    let mut s = BTreeMap::new();
    for (what, args) in [
        ("instances", &["list", "-f", "csv", "-c", "nst"][..]),
        ("demo", &["config", "show", "demo"][..]),
        ("profile", &["profile", "show", "default"][..]),
        ("networks", &["network", "list", "-f", "csv"][..]),
        ("pools", &["storage", "list", "-f", "csv", "-c", "nd"][..]),
        ("images", &["image", "list", "-f", "csv", "-c", "lf"][..]),
    ] {
        s.insert(what.to_string(), host.cli_run(args)?);
    }
    s.insert(
        "users".into(),
        setup.ctl(host, &["-o", "json", "user", "list"])?,
    );
    // Disk use grows while the demo container runs (its journal); the rest stays.
    let mut containers: serde_json::Value =
        serde_json::from_str(&setup.ctl(host, &["-o", "json", "ls"])?)?;
    for c in containers.as_array_mut().into_iter().flatten() {
        if let Some(c) = c.as_object_mut() {
            c.remove("disk_used_bytes");
        }
    }
    s.insert("containers".into(), containers.to_string());
    for f in ["etc/coordinator.toml", "etc/agent.toml"] {
        s.insert(f.into(), std::fs::read_to_string(setup.path(f))?);
    }
    for f in ["subuid", "subgid"] {
        s.insert(
            format!("/etc/{f}"),
            std::fs::read_to_string(setup.path("subid").join(f))?,
        );
    }
    for p in ["ssp-coordinator", "ssp-agent", "incusd"] {
        s.insert(format!("pid {p}"), setup.pid(p));
    }
    Ok(s)
}

#[test]
fn ssp_up_from_nothing_then_a_lab_first_day() -> Result<()> {
    let host = Host::bare("up", 91)?;
    let scratch = Scratch::new("first-day")?;
    let setup = Setup {
        root: scratch.path().to_path_buf(),
    };
    std::fs::create_dir_all(setup.path("home"))?;
    // /etc/subuid and /etc/subgid as a fresh Debian 12 machine has them once the
    // Incus package is installed: one large range of root's (incus-base's). This
    // machine's own files also hold the range Debian's lxd package (which only the
    // test suite installs) gives root at install; with two large ranges every plain
    // container fails to start (the daemon maps both at id 0), ssp or not.
    std::fs::create_dir_all(setup.path("subid"))?;
    for f in ["subuid", "subgid"] {
        std::fs::write(setup.path("subid").join(f), "root:1000000:1000000000\n")?;
    }
    let known_hosts = setup.path("known_hosts");

    // 1. The first run: from a daemon that does not exist yet to a login.
    ensure!(
        !host.socket.exists(),
        "the daemon must start from nothing, but {} exists",
        host.socket.display()
    );
    // A bridge an earlier daemon left behind (its state dir gone, the kernel bridge
    // not) has the name ssp-up wants; nothing is attached to it, so it goes.
    run(host
        .in_ns("ip")
        .args(["link", "add", "sspbr0", "type", "bridge"]))?;
    let first = setup.ssp_up(&host)?;
    let out = String::from_utf8_lossy(&first.stdout);
    ensure!(
        out.contains("removing the unused bridge sspbr0"),
        "ssp-up did not report the stale bridge:\n{out}"
    );
    let stdout = String::from_utf8_lossy(&first.stdout).to_string();
    ensure!(stdout.contains("ssp-up: ready"), "no 'ready' in:\n{stdout}");
    let demo = printed_ssh(&stdout)?;
    // Right away, once, as the user would: who we are, the container's name as its
    // hostname, and sudo without "unable to resolve host".
    let out = ssh(&demo, &known_hosts, "id -un; hostname; sudo -n true")?;
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(out.status.success(), "demo login failed: {e}");
    ensure!(o.lines().collect::<Vec<_>>() == ["demo", "demo"], "{o}");
    ensure!(
        !e.contains("unable to resolve host"),
        "sudo cannot resolve the hostname: {e}"
    );

    // 2. A second run changes nothing: no lifecycle event on the daemon, the same
    // processes, containers, config and state.
    let before = snapshot(&setup, &host)?;
    let mut monitor = host
        .cli()
        .args(["monitor", "--type", "lifecycle", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let mut out = monitor.stdout.take().context("monitor stdout")?;
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = seen.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        })
    };
    let seen_text = || seen.lock().map(|s| s.clone()).unwrap_or_default();
    // The monitor listens once it reports a probe's events; only then is "no
    // event during the second run" worth anything.
    host.cli_run(&["profile", "create", "ssp-probe"])?;
    host.cli_run(&["profile", "delete", "ssp-probe"])?;
    wait_for(
        "the monitor to see the probe",
        Duration::from_secs(15),
        || seen_text().contains("profile-deleted").then_some(()),
    )?;
    let from = seen_text().len();
    let second = setup.ssp_up(&host)?;
    std::thread::sleep(Duration::from_secs(1));

    // 3. A plain container (no ssp, the daemon's default idmap) starts beside ssp's:
    // the ranges in /etc/subuid and /etc/subgid are ones the daemon accepts. Its
    // events also show that the monitor above sees what happens on the daemon.
    host.cli_run(&["launch", "busybox", "plain"])
        .context("a plain `incus launch` on the daemon ssp-up set up")?;
    let plain = host.cli_run(&["list", "plain", "-f", "csv", "-c", "s"])?;
    ensure!(plain.trim() == "RUNNING", "plain container is {plain:?}");
    host.cli_run(&["delete", "--force", "plain"])?;
    wait_for(
        "the monitor to see the plain container",
        Duration::from_secs(15),
        || {
            seen_text()[from..]
                .contains("instance-deleted")
                .then_some(())
        },
    )?;
    let _ = monitor.kill();
    let _ = monitor.wait();
    let _ = reader.join();
    let events = seen_text()[from..].to_string();
    let after = snapshot(&setup, &host)?;
    ensure!(
        String::from_utf8_lossy(&second.stdout).contains("ssp-up: ready"),
        "second run: {}",
        String::from_utf8_lossy(&second.stdout)
    );
    for (k, v) in &before {
        ensure!(
            after.get(k) == Some(v),
            "the second run changed {k}:\nbefore: {v}\nafter:  {:?}",
            after.get(k)
        );
    }
    let events: Vec<serde_json::Value> = events
        .lines()
        .filter(|e| !e.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("incus monitor printed {events}"))?;
    ensure!(
        events
            .iter()
            .any(|e| e["metadata"]["source"] == "/1.0/instances/plain"),
        "the monitor saw no event of the plain container: {events:?}"
    );
    let others: Vec<_> = events
        .iter()
        .filter(|e| e["metadata"]["source"] != "/1.0/instances/plain")
        .collect();
    ensure!(
        others.is_empty(),
        "the second run made lifecycle events: {others:?}"
    );

    // 4. A second user logs in with the real client as soon as `user add` returns.
    let bob_key = ssh_keypair(&setup.root, "bob")?;
    setup.ctl(
        &host,
        &[
            "user",
            "add",
            "bob",
            "--ssh-key",
            &format!("{}.pub", bob_key.display()),
        ],
    )?;
    let conf = setup.ctl(
        &host,
        &[
            "ssh-config",
            "bob",
            "--identity",
            bob_key.to_str().unwrap_or_default(),
        ],
    )?;
    let bob_conf = setup.path("bob.conf");
    std::fs::write(&bob_conf, conf)?;
    let bob: Vec<String> = [
        "ssh",
        "-F",
        bob_conf.to_str().unwrap_or_default(),
        "ssp-bob",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let who = ssh_ok(&bob, &known_hosts, "id -un")?;
    ensure!(who.trim() == "bob", "logged in as {who:?}");

    // 5. Both write in the default shared folder, each sees the other's file, and
    // on the host each file belongs to its writer's uid.
    ssh_ok(&demo, &known_hosts, "echo from-demo > /shared/demo.txt")?;
    ssh_ok(&bob, &known_hosts, "echo from-bob > /shared/bob.txt")?;
    let seen_by_bob = ssh_ok(&bob, &known_hosts, "cat /shared/demo.txt; ls -l /shared")?;
    let seen_by_demo = ssh_ok(&demo, &known_hosts, "cat /shared/bob.txt")?;
    ensure!(seen_by_bob.starts_with("from-demo"), "{seen_by_bob}");
    ensure!(seen_by_demo.trim() == "from-bob", "{seen_by_demo}");
    // Inside bob's container his own file is his, and demo's is nobody's: a
    // container maps its owner's uid only, so root there can never act as demo.
    let owner_and_group = |name: &str| {
        seen_by_bob
            .lines()
            .find(|l| l.ends_with(name))
            .map(|l| l.split_whitespace().skip(2).take(2).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    ensure!(
        owner_and_group("bob.txt") == ["bob", "lab"]
            && owner_and_group("demo.txt") == ["nobody", "lab"],
        "ls -l /shared in bob's container: {seen_by_bob}"
    );
    // demo's name still resolves there, from the agent's members files.
    let pw = ssh_ok(&bob, &known_hosts, "getent passwd demo")?;
    ensure!(
        pw.starts_with("demo:x:"),
        "getent passwd demo in bob's container: {pw}"
    );
    ensure!(
        ssh(&bob, &known_hosts, "echo from-bob >> /shared/demo.txt")?
            .status
            .code()
            != Some(0)
            && ssh(&bob, &known_hosts, "rm -f /shared/demo.txt")?
                .status
                .code()
                != Some(0),
        "bob changed or removed demo's file"
    );
    let users: serde_json::Value =
        serde_json::from_str(&setup.ctl(&host, &["-o", "json", "user", "list"])?)?;
    let uid = |name: &str| -> Result<u32> {
        users
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == name))
            .and_then(|u| u["uid"].as_u64())
            .map(|u| u as u32)
            .with_context(|| format!("no uid for {name} in {users}"))
    };
    for (file, owner) in [("demo.txt", "demo"), ("bob.txt", "bob")] {
        let m = std::fs::metadata(setup.path("shared").join(file))?;
        ensure!(
            m.uid() == uid(owner)?,
            "{file} on the host belongs to uid {}, expected {owner}'s {}",
            m.uid(),
            uid(owner)?
        );
    }
    let dir = std::fs::metadata(setup.path("shared"))?;
    ensure!(
        (dir.gid(), dir.mode() & 0o7777) == (19999, 0o3775),
        "the shared folder is group {} mode {:o}, expected the lab group 19999 (the last uid of the range) and 3775 (setgid, sticky, group-writable)",
        dir.gid(),
        dir.mode() & 0o7777
    );
    for file in ["demo.txt", "bob.txt"] {
        let gid = std::fs::metadata(setup.path("shared").join(file))?.gid();
        ensure!(
            gid == 19999,
            "{file} has group {gid}, expected the lab's (setgid)"
        );
    }
    Ok(())
}
