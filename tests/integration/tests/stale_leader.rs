//! A leader cut off from the other coordinators, but not from the agents, must
//! not undo what the new leader did: a user removed through the new leader stays
//! removed, although the old leader's state still has the container and it can
//! still reach the agent.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, sspctl, wait_for, AgentSpec, Host, Kind, Platform};

const GID_BASE: u32 = 61000;

/// iptables rules in this machine's root namespace, deleted again on drop.
struct Cut(Vec<Vec<String>>);

impl Cut {
    fn add(rules: &[Vec<String>]) -> Result<Cut> {
        let mut cut = Cut(Vec::new());
        for r in rules {
            run(Command::new("iptables").arg("-I").args(r))?;
            cut.0.push(r.clone());
        }
        Ok(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = Command::new("iptables").arg("-D").args(r).status();
        }
    }
}

fn rule(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_cut_off_leader_does_not_remake_what_the_new_leader_removed() -> Result<()> {
    let host = Host::start("sl", Kind::Incus, 57)?;
    let mut p = Platform::start_coordinators_as("stale-leader", 3, Some(GID_BASE))?;
    p.add_agents(&[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "ann")?;
    p.ctl_ok(&[
        "user",
        "add",
        "ann",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--image",
        "busybox",
        "--wait",
        "running",
    ])?;
    ensure!(
        host.instance_names()?.contains(&"ann".to_string()),
        "ann's container was not made"
    );

    // Cut the leader off from the other coordinators (their traffic runs over this
    // machine's loopback); the agents reach every coordinator over their own links.
    let status = p.ctl_json(&["cluster", "status"])?;
    let leader = status["leader"].as_u64().context("no leader")?;
    let addr = status["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"].as_u64() == Some(leader)))
        .and_then(|m| m["address"].as_str())
        .context("the leader's address")?
        .to_string();
    let port: u16 = addr.rsplit(':').next().unwrap_or_default().parse()?;
    let l = p
        .coordinator_ports
        .iter()
        .position(|x| *x == port)
        .context("the leader is none of ours")?;
    let others: Vec<String> = p
        .coordinator_ports
        .iter()
        .filter(|x| **x != port)
        .map(|x| x.to_string())
        .collect();
    let gid = (GID_BASE + l as u32).to_string();
    let port = port.to_string();
    let cut = Cut::add(&[
        rule(&[
            "OUTPUT",
            "-o",
            "lo",
            "-m",
            "owner",
            "--gid-owner",
            &gid,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &others.join(","),
            "-j",
            "DROP",
        ]),
        rule(&[
            "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", &port, "-j", "DROP",
        ]),
    ])?;
    let rest = others
        .iter()
        .map(|x| format!("http://127.0.0.1:{x}"))
        .collect::<Vec<_>>()
        .join(",");
    let ctl = |args: &[&str]| -> Result<String> {
        let out = sspctl(&p.ssp, &rest, args);
        if !out.status.success() {
            bail!(
                "sspctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    wait_for(
        "a new leader among the other two",
        Duration::from_secs(30),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&ctl(&["-o", "json", "cluster", "status"]).ok()?).ok()?;
            let now = v["leader"].as_u64()?;
            (now != 0 && now != leader).then_some(now)
        },
    )?;

    // Removed through the new leader: the container goes.
    ctl(&["user", "remove", "ann"])?;
    ensure!(
        !host.instance_names()?.contains(&"ann".to_string()),
        "ann's container is still there after the removal"
    );
    // The old leader, reconciling every 5 s, still has ann in its state and still
    // reaches the agent. It must not make the container again.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(16) {
        ensure!(
            !host.instance_names()?.contains(&"ann".to_string()),
            "the cut-off leader made ann's container again {} ms after the removal",
            t.elapsed().as_millis()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(p.scratch.path().join(format!("coordinator{l}.log")))?;
    ensure!(
        log.contains("reconcile stopped"),
        "the old leader should have tried to reconcile and stopped for want of a quorum:\n{log}"
    );

    // Joined again, the old leader follows and learns of the removal.
    drop(cut);
    let old = format!("http://127.0.0.1:{port}");
    wait_for(
        "ann gone from the old leader's own state",
        Duration::from_secs(30),
        || {
            let out = sspctl(&p.ssp, &old, &["-o", "json", "--stale", "user", "list"]);
            let users = String::from_utf8_lossy(&out.stdout).to_string();
            (out.status.success() && !users.contains("\"ann\"")).then_some(())
        },
    )?;
    ensure!(
        !host.instance_names()?.contains(&"ann".to_string()),
        "ann's container came back after the cut healed"
    );
    Ok(())
}
