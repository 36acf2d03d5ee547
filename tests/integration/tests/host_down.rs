//! A host whose agent stops heartbeating is marked down within the coordinator's
//! host timeout; its containers show as unavailable (never deleted), nothing new
//! is placed there, and it is ready again when the agent returns.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// `host_timeout_secs` in the test platform's coordinator config.
const TIMEOUT: Duration = Duration::from_secs(6);

#[test]
fn a_silent_host_is_marked_down_and_comes_back() -> Result<()> {
    let host = Host::start("hd", Kind::Incus, 52)?;
    let mut p = Platform::start("host-down", &[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "hal")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&[
        "user",
        "add",
        "hal",
        "--ssh-key",
        &pubkey,
        "--image",
        "busybox",
        "--wait",
        "running",
    ])?;
    let status = |p: &Platform| -> Option<String> {
        let hosts = p.ctl_json(&["hosts"]).ok()?;
        Some(hosts[0]["status"].as_str()?.to_string())
    };
    ensure!(status(&p).as_deref() == Some("ready"));

    let t = Instant::now();
    p.agents[0].signal(libc::SIGKILL);
    wait_for("the host marked down", TIMEOUT * 3, || {
        (status(&p).as_deref() == Some("down")).then_some(())
    })?;
    let took = t.elapsed();
    println!(
        "host marked down {:.1}s after its agent was killed (timeout {}s, heartbeat every 2s)",
        took.as_secs_f64(),
        TIMEOUT.as_secs()
    );
    // Marked down by the timeout, not before it, and not long after (one monitor tick).
    // The last heartbeat came up to one interval (2 s, plus the time a heartbeat
    // takes to gather and send) before the kill.
    ensure!(
        took >= TIMEOUT - Duration::from_secs(3),
        "marked down too early: {took:?}"
    );
    ensure!(
        took <= TIMEOUT + Duration::from_secs(3),
        "marked down late: {took:?}"
    );
    let ls = p.ctl_json(&["ls"])?;
    ensure!(
        ls[0]["state"] == "unavailable (host down)",
        "hal's container should show as unavailable: {ls}"
    );
    // Nothing new goes to a down host; the refusal names it.
    let err = p.ctl_err(&[
        "user",
        "add",
        "ivy",
        "--ssh-key",
        &pubkey,
        "--image",
        "busybox",
        "--wait",
        "running",
    ])?;
    ensure!(err.contains("hd: down"), "{err}");

    p.agents[0].start_again()?;
    wait_for("the host ready again", Duration::from_secs(30), || {
        (status(&p).as_deref() == Some("ready")).then_some(())
    })?;
    let ls = p.ctl_json(&["ls"])?;
    ensure!(
        ls[0]["state"] == "Running",
        "hal's container survives: {ls}"
    );
    Ok(())
}
