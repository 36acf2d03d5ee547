//! Moves that go wrong: the target's agent killed mid-transfer, the coordinator
//! leader killed mid-move, the target daemon refusing the copy (its pool is full),
//! the source host going down before the source copy is deleted. Each ends with
//! exactly one running copy with its files intact, and `sspctl ls` agrees with
//! what each daemon lists. When in the move a fault strikes comes from a seed
//! (printed; `SSP_SEED=N` repeats a run).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ssp_integration::cluster::Rng;
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// Random data in the container: enough that a transfer takes a second or two.
const DATA_MB: u32 = 500;

fn seed(default: u64) -> u64 {
    let s = std::env::var("SSP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed {s} (repeat with SSP_SEED={s})");
    s
}

/// Two hosts, a platform of `coordinators`, and gdw's container on the first
/// host with `DATA_MB` of random data; returns the data's checksum.
fn rig(tag: &str, idx: u8, coordinators: usize) -> Result<(Host, Host, Platform, String)> {
    let h1 = Host::start(&format!("{tag}1"), Kind::Incus, idx)?;
    let h2 = Host::start(&format!("{tag}2"), Kind::Incus, idx + 1)?;
    let mut p = Platform::start_coordinators(&format!("migrate-{tag}"), coordinators)?;
    p.add_agents(&[AgentSpec::new(&h1), AgentSpec::new(&h2)])?;
    let key = ssh_keypair(p.scratch.path(), "gdw")?;
    p.ctl_ok(&[
        "user",
        "add",
        "gdw",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--host",
        &h1.name,
    ])?;
    let sum = h1.exec(
        "gdw",
        &format!("dd if=/dev/urandom of=/root/data bs=1M count={DATA_MB} 2>/dev/null && sync && sha256sum /root/data"),
    )?;
    Ok((
        h1,
        h2,
        p,
        sum.split_whitespace().next().unwrap_or("").to_string(),
    ))
}

/// The move's record from `sspctl migrations`.
fn record(p: &Platform, id: u64) -> Result<serde_json::Value> {
    let v = p.ctl_json(&["migrations", &id.to_string()])?;
    Ok(v[0].clone())
}

fn begin(p: &Platform, to: &str) -> Result<u64> {
    let v = p.ctl_json(&["migrate", "gdw", to, "--no-wait"])?;
    v[0]["id"].as_u64().context("a migration id")
}

fn wait_finished(p: &Platform, id: u64, limit: Duration) -> Result<serde_json::Value> {
    wait_for(&format!("migration {id} to finish"), limit, || {
        let r = record(p, id).ok()?;
        matches!(r["phase"].as_str(), Some("done") | Some("failed")).then_some(r)
    })
}

/// Exactly one daemon has gdw, it runs, its data is intact, no snapshot of a
/// move is left, and `sspctl ls` places it there. Returns that host's name.
fn one_running_copy(p: &Platform, hosts: &[&Host], sum: &str) -> Result<String> {
    let mut with: Vec<&Host> = Vec::new();
    for h in hosts {
        if h.instance_names()?.iter().any(|n| n == "gdw") {
            with.push(h);
        }
    }
    let names: Vec<&str> = with.iter().map(|h| h.name.as_str()).collect();
    ensure!(
        with.len() == 1,
        "gdw should be on exactly one host, is on {names:?}"
    );
    let h = with[0];
    let ls = wait_for(
        "sspctl ls to show gdw running",
        Duration::from_secs(30),
        || {
            let ls = p.ctl_json(&["ls"]).ok()?;
            (ls[0]["state"] == "Running").then_some(ls)
        },
    )?;
    ensure!(
        ls[0]["host"] == h.name.as_str(),
        "sspctl ls: {ls}, daemons: {names:?}"
    );
    let (_, status) = h.init_pid("gdw")?;
    ensure!(status == "Running", "gdw on {} is {status}", h.name);
    let now = h.exec("gdw", "sha256sum /root/data")?;
    ensure!(now.starts_with(sum), "data changed: {now} vs {sum}");
    let snaps = h.cli_run(&["query", "/1.0/instances/gdw/snapshots"])?;
    ensure!(
        !snaps.contains("ssp-move-"),
        "a move's snapshot was left: {snaps}"
    );
    Ok(h.name.clone())
}

/// Waits until the move shows progress from the daemon (bytes flowing).
fn wait_transferring(p: &Platform, id: u64) -> Result<()> {
    wait_for(
        "the transfer to show progress",
        Duration::from_secs(30),
        || {
            let r = record(p, id).ok()?;
            if matches!(r["phase"].as_str(), Some("done") | Some("failed")) {
                return Some(Err(anyhow::anyhow!("the move ended before the fault: {r}")));
            }
            (r["bytes"].as_u64().unwrap_or(0) > 0).then_some(Ok(()))
        },
    )?
}

#[test]
fn the_target_agent_killed_mid_transfer() -> Result<()> {
    let mut rng = Rng::new(seed(11));
    let (h1, h2, mut p, sum) = rig("fa", 101, 1)?;
    let id = begin(&p, "fa2")?;
    wait_transferring(&p, id)?;
    std::thread::sleep(Duration::from_millis(rng.range(0, 600)));
    p.agents[1].signal(libc::SIGKILL);
    println!("target agent killed; phase {}", record(&p, id)?["phase"]);
    // Its supervisor starts it again a little later.
    std::thread::sleep(Duration::from_secs(3));
    p.agents[1].start_again()?;
    let r = wait_finished(&p, id, Duration::from_secs(120))?;
    println!("ended: {r}");
    let at = one_running_copy(&p, &[&h1, &h2], &sum)?;
    if r["phase"] == "failed" {
        ensure!(at == "fa1", "a rolled back move leaves it on the source");
        ensure!(
            !r["note"].as_str().unwrap_or("").is_empty(),
            "the record says why: {r}"
        );
        // And the next try goes through.
        let again = p.ctl_json(&["migrate", "gdw", "fa2"])?;
        ensure!(again[0]["phase"] == "done", "{again}");
        ensure!(one_running_copy(&p, &[&h1, &h2], &sum)? == "fa2");
    } else {
        ensure!(at == "fa2");
    }
    Ok(())
}

#[test]
fn the_leader_killed_mid_move() -> Result<()> {
    let mut rng = Rng::new(seed(23));
    let (h1, h2, mut p, sum) = rig("fl", 103, 3)?;
    let status = p.ctl_json(&["cluster", "status"])?;
    let leader = status["leader"].as_u64().context("a leader")?;
    let addr = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"].as_u64() == Some(leader))
        .and_then(|m| m["address"].as_str())
        .unwrap_or_default()
        .to_string();
    let idx = p
        .coordinator_ports
        .iter()
        .position(|port| addr.ends_with(&format!(":{port}")))
        .context("the leader is one of ours")?;
    let id = begin(&p, "fl2")?;
    let delay = rng.range(0, 3000);
    std::thread::sleep(Duration::from_millis(delay));
    let phase = record(&p, id)?["phase"].clone();
    if idx == 0 {
        p.coordinator.signal(libc::SIGKILL);
    } else {
        p.more_coordinators[idx - 1].signal(libc::SIGKILL);
    }
    println!("leader killed {delay} ms into the move, in phase {phase}");
    let r = wait_finished(&p, id, Duration::from_secs(180))?;
    println!("ended: {r}");
    let at = one_running_copy(&p, &[&h1, &h2], &sum)?;
    ensure!(
        (r["phase"] == "done") == (at == "fl2"),
        "the record and the daemons agree: {r}, on {at}"
    );
    Ok(())
}

#[test]
fn the_target_daemon_refuses_the_copy() -> Result<()> {
    let (h1, h2, p, sum) = rig("fp", 105, 1)?;
    // Fill mg2's pool but for 100 MB with a container of its own (left alone by ssp).
    // btrfs reports its free space as an estimate that can lag the allocations
    // just made: fill, sync and look again until at most 200 MB are left (once, a
    // first pass of the whole container fit after a single fill).
    h2.cli_run(&["launch", "busybox", "filler"])?;
    let left = h2.exec(
        "filler",
        "for i in 1 2 3 4 5 6; do avail=$(df -k / | awk 'NR==2 {print $4}'); [ \"$avail\" -le 204800 ] && break; \
         fallocate -l $(( (avail - 102400) * 1024 )) /fill$i && sync; sleep 1; done; df -k / | awk 'NR==2 {print $4}'",
    )?;
    let left: u64 = left.trim().parse().context("free KiB in the filler")?;
    println!("fp2's pool has {} MiB free", left / 1024);
    ensure!(
        left <= 204800,
        "fp2's pool still has {} MiB free after filling it",
        left / 1024
    );
    let t = Instant::now();
    let out = p.ctl(&["-o", "json", "migrate", "gdw", "fp2"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("sspctl migrate: {stderr} ({:?})", t.elapsed());
    ensure!(!out.status.success(), "a refused copy is a failed move");
    ensure!(
        stderr.contains("space") && stderr.contains("runs on fp1"),
        "the error says why and where it runs: {stderr}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(r[0]["phase"] == "failed", "{r}");
    ensure!(one_running_copy(&p, &[&h1, &h2], &sum)? == "fp1");
    // Nothing is held for the move on the target any more: its port is free again.
    let hosts = p.ctl_json(&["hosts"])?;
    let fp2 = hosts
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["name"] == "fp2")
        .context("fp2 listed")?;
    ensure!(fp2["instances"] == 0, "{fp2}");
    Ok(())
}

#[test]
fn the_source_host_down_before_the_source_copy_goes() -> Result<()> {
    let (mut h1, h2, mut p, sum) = rig("fs", 107, 1)?;
    let id = begin(&p, "fs2")?;
    // Once the target has been started, the source is not needed any more but
    // for deleting its copy: take the whole source host down then.
    wait_for("the target starting", Duration::from_secs(120), || {
        let r = record(&p, id).ok()?;
        match r["phase"].as_str()? {
            "starting" | "cleaning" => Some(Ok(())),
            "done" | "failed" => Some(Err(anyhow::anyhow!("the move ended first: {r}"))),
            _ => None,
        }
    })??;
    p.agents[0].signal(libc::SIGKILL);
    h1.kill_daemon();
    println!("source host down in phase {}", record(&p, id)?["phase"]);
    // The move goes on to the target and waits to delete the source copy.
    let r = wait_for(
        "the container running on the target",
        Duration::from_secs(90),
        || {
            let r = record(&p, id).ok()?;
            (r["phase"] == "cleaning").then_some(r)
        },
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let r2 = record(&p, id)?;
    ensure!(
        r2["phase"] == "cleaning",
        "it waits for the source host: {r2}"
    );
    println!("waiting: {}", r2["note"]);
    // It may only go forward now: an abort is refused, a resume is fine.
    let err = p.ctl_err(&["migrate", "--abort", &id.to_string()])?;
    ensure!(err.contains("only goes forward"), "{err}");
    p.ctl_ok(&["migrate", "--resume", &id.to_string(), "--no-wait"])?;
    let ls = p.ctl_json(&["ls"])?;
    ensure!(
        ls[0]["host"] == "fs2" && ls[0]["state"] == "Running",
        "{ls}"
    );
    let now = h2.exec("gdw", "sha256sum /root/data")?;
    ensure!(now.starts_with(&sum), "{now}");
    // The host comes back: its daemon and agent (which keeps the copy stopped)
    // start again, and the move deletes the old copy.
    h1.start_daemon()?;
    h1.wait_ready()?;
    p.agents[0].start_again()?;
    let r = wait_finished(&p, id, Duration::from_secs(90)).with_context(|| format!("{r}"))?;
    ensure!(r["phase"] == "done", "{r}");
    ensure!(one_running_copy(&p, &[&h1, &h2], &sum)? == "fs2");
    if h1.instance_names()?.iter().any(|n| n == "gdw") {
        bail!("the source copy should be gone");
    }
    Ok(())
}

#[test]
fn an_aborted_move_rolls_back() -> Result<()> {
    let (h1, h2, p, sum) = rig("fb", 113, 1)?;
    let id = begin(&p, "fb2")?;
    let r = p.ctl_json(&["migrate", "--abort", &id.to_string(), "--no-wait"])?;
    ensure!(r[0]["phase"] == "rolling-back", "{r}");
    let r = wait_finished(&p, id, Duration::from_secs(120))?;
    ensure!(r["phase"] == "failed", "{r}");
    ensure!(
        r["note"]
            .as_str()
            .unwrap_or("")
            .contains("aborted by admin"),
        "{r}"
    );
    ensure!(one_running_copy(&p, &[&h1, &h2], &sum)? == "fb1");
    Ok(())
}

#[test]
fn a_move_turned_back_after_the_freeze_thaws_the_source() -> Result<()> {
    let (h1, h2, p, sum) = rig("fz", 133, 1)?;
    // A writer that acknowledges each file it wrote, and a churner that rewrites
    // 300 MB over and over, so the final pass has much to send and the move
    // stays a while in `syncing`, with the source frozen.
    let writers = || -> Result<i64> {
        h1.exec(
            "gdw",
            "setsid sh -c 'i=$(wc -l < /root/acked 2>/dev/null || echo 0); while :; do i=$((i+1)); echo $i > /root/n.$i && echo $i >> /root/acked; sleep 0.05; done' </dev/null >/dev/null 2>&1 &",
        )?;
        h1.exec(
            "gdw",
            "setsid sh -c 'i=0; while :; do dd if=/root/data of=/root/churn.$((i%3)) bs=1M count=100 skip=$((i%4*100)) 2>/dev/null; i=$((i+1)); done' </dev/null >/dev/null 2>&1 &",
        )?;
        Ok(h1.init_pid("gdw")?.0)
    };
    let mut init = writers()?;
    let mut turned = None;
    for attempt in 1..=3 {
        let id = begin(&p, "fz2")?;
        let syncing = wait_for("the final pass", Duration::from_secs(120), || {
            let r = record(&p, id).ok()?;
            match r["phase"].as_str()? {
                "syncing" => Some(true),
                "copying" => None,
                _ => Some(false),
            }
        })?;
        if syncing
            && p.ctl(&["migrate", "--abort", &id.to_string(), "--no-wait"])
                .status
                .success()
        {
            turned = Some(id);
            break;
        }
        // Too late: it went through. Back to fz1, writers anew, and again.
        let r = wait_finished(&p, id, Duration::from_secs(120))?;
        println!(
            "attempt {attempt}: the abort came too late ({})",
            r["phase"]
        );
        let back = p.ctl_json(&["migrate", "gdw", "fz1"])?;
        ensure!(back[0]["phase"] == "done", "{back}");
        init = writers()?;
    }
    let id = turned.context("no attempt turned the move back")?;
    let r = wait_finished(&p, id, Duration::from_secs(120))?;
    println!("turned back: {r}");
    ensure!(r["phase"] == "failed", "{r}");
    ensure!(one_running_copy(&p, &[&h1, &h2], &sum)? == "fz1");
    // Thawed, not restarted: the same init, and the writer goes on acknowledging,
    // every acknowledged file there.
    let (after, status) = h1.init_pid("gdw")?;
    ensure!(
        after == init && status == "Running",
        "gdw's init was {init}, is {after} ({status}): it was restarted, not thawed"
    );
    let count = || -> Result<u64> { Ok(h1.exec("gdw", "wc -l < /root/acked")?.trim().parse()?) };
    let before = count()?;
    wait_for("the writer to go on", Duration::from_secs(10), || {
        (count().ok()? > before).then_some(())
    })?;
    let missing = h1.exec(
        "gdw",
        "for i in $(cat /root/acked); do [ -f /root/n.$i ] || echo missing $i; done; echo checked",
    )?;
    ensure!(!missing.contains("missing"), "{missing}");
    Ok(())
}
