//! Certificates renew before they end, without a restart or a refused request:
//! with coordinator, agent and admin certificates valid for 30 s, each is replaced
//! after about 20 s, and the platform keeps serving, heartbeating and driving its
//! agent well past the end of the first ones.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, AgentSpec, Host, Kind, Platform};
use ssp_net::Bundle;

fn serial(f: &Path) -> Result<String> {
    Ok(Bundle::load(f)?.identity()?.serial)
}

#[test]
fn certificates_renew_before_they_end_without_downtime() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let host = Host::start("rn", Kind::Incus, 86)?;
    let p = Platform::start_with(
        "renewal",
        &[AgentSpec::new(&host)],
        "cert_ttl_secs = 30\nuser_cert_ttl_secs = 30\n",
    )?;
    let dir = p.scratch.path().to_path_buf();
    let files = [
        ("coordinator", dir.join("coordinator0/tls/node.bundle")),
        ("agent", dir.join("agent-rn/tls/node.bundle")),
        ("admin", p.ssp.bundle.clone().context("admin bundle")?),
    ];
    let first: Vec<String> = files
        .iter()
        .map(|(_, f)| serial(f))
        .collect::<Result<_>>()?;
    let ends = Bundle::load(&files[0].1)?.identity()?.not_after;
    // Every second for 40 s: the admin reads, and the host is ready (its agent
    // heartbeats through its own certificate).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(40) {
        let hosts = p.ctl_json(&["hosts"])?;
        let rn = hosts
            .as_array()
            .and_then(|h| h.iter().find(|x| x["name"] == "rn"))
            .cloned()
            .context("host rn missing")?;
        ensure!(
            rn["status"] == "ready",
            "host rn is {} after {:?}\n{}",
            rn["status"],
            start.elapsed(),
            p.coordinator.log_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    ensure!(
        now > ends,
        "the first certificates should have ended by now"
    );
    for ((what, f), old) in files.iter().zip(&first) {
        let new = serial(f)?;
        ensure!(
            new != *old,
            "the {what} certificate was not renewed ({old})\n{}",
            p.coordinator.log_tail()
        );
    }
    // The coordinator still drives the agent (new connections, new certificates).
    let key = ssh_keypair(&dir, "k")?;
    p.ctl_ok(&[
        "user",
        "add",
        "late",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--image",
        "busybox",
        "--wait",
        "running",
    ])?;
    let certs = p.ctl_json(&["cert", "list"])?;
    let agent_now = serial(&files[1].1)?;
    ensure!(
        certs["certs"]
            .as_array()
            .context("certs")?
            .iter()
            .any(|c| c["serial"] == agent_now.as_str() && c["name"] == "rn"),
        "the cluster should have recorded the agent's renewed certificate {agent_now}: {certs}"
    );
    Ok(())
}
