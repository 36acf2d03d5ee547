//! Agents know every coordinator and need no leader's address: with the first
//! coordinator of their list dead, an agent registers through the others and the
//! new leader creates containers on its host.

use anyhow::{ensure, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};
use std::time::Duration;

#[test]
fn an_agent_registers_and_serves_with_its_first_coordinator_dead() -> Result<()> {
    let host = Host::start("af", Kind::Incus, 51)?;
    let mut p = Platform::start_coordinators("agent-failover", 3)?;
    // The first coordinator formed the cluster and leads; kill it before any agent starts.
    p.coordinator.signal(libc::SIGKILL);
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
    let state = wait_for("ann's container running", Duration::from_secs(60), || {
        let ls = p.ctl_json(&["ls"]).ok()?;
        let s = ls[0]["state"].as_str()?.to_string();
        (s == "Running").then_some(s)
    })?;
    ensure!(state == "Running");
    let log = std::fs::read_to_string(p.scratch.path().join("agent-af.log"))?;
    ensure!(
        log.contains("registered"),
        "the agent should have registered through a surviving coordinator:\n{log}"
    );
    Ok(())
}
