//! The agent's instance event stream follows the daemon's lifecycle events and
//! keeps following them after the daemon is killed and started again.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ssp_integration::{ssh_keypair, AgentSpec, Host, Kind, Platform};
use ssp_proto::agent_client::AgentClient;
use ssp_proto::{InstanceEvent, WatchEventsRequest};
use tonic::Streaming;

/// Waits for an event about `instance` whose action starts with `prefix`.
async fn expect(
    stream: &mut Streaming<InstanceEvent>,
    instance: &str,
    prefix: &str,
) -> Result<InstanceEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .with_context(|| format!("no {prefix}* event for {instance} within 30s"))??;
        match next {
            Some(ev) if ev.instance == instance && ev.action.starts_with(prefix) => return Ok(ev),
            Some(_) => continue,
            None => bail!("the agent closed the event stream"),
        }
    }
}

#[test]
fn events_survive_a_daemon_restart() -> Result<()> {
    let mut host = Host::start("ev", Kind::Incus, 41)?;
    let p = Platform::start("events", &[AgentSpec::new(&host)])?;
    // No static inventory: the agent asks NVML, which this host does not have; it
    // runs anyway, reports no GPUs and says why.
    let hosts = p.ctl_json(&["hosts"])?;
    let source = hosts[0]["gpu_source"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        source.starts_with("none: NVML unavailable"),
        "gpu_source: {source:?}"
    );
    ensure!(hosts[0]["gpus_total"] == 0, "no GPUs expected: {hosts}");

    let key = ssh_keypair(p.scratch.path(), "fay")?;
    p.ctl_ok(&[
        "user",
        "add",
        "fay",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--image",
        "busybox",
        "--wait",
        "running",
    ])?;

    let rt = tokio::runtime::Runtime::new()?;
    let mut stream = rt.block_on(async {
        let tls = p.coordinator_tls()?;
        let ch = ssp_net::connect(&p.agent_addrs[0], &tls, ssp_net::AGENT_NAME).await?;
        anyhow::Ok(
            AgentClient::new(ch)
                .watch_events(WatchEventsRequest {})
                .await?
                .into_inner(),
        )
    })?;

    host.cli_run(&["stop", "--force", "fay"])?;
    let ev = rt.block_on(expect(&mut stream, "fay", "instance-stopped"))?;
    ensure!(
        !ev.timestamp.is_empty(),
        "event without a timestamp: {ev:?}"
    );

    // Kill the daemon; the agent must reconnect to the new one on its own.
    host.restart_daemon()?;
    host.wait_ready()?;
    std::thread::sleep(Duration::from_secs(1));
    // ssp's reconciler may start fay again on its own at any moment, so the
    // event this test causes after the restart is a config change.
    host.cli_run(&["config", "set", "fay", "user.probe", "1"])?;
    rt.block_on(expect(&mut stream, "fay", "instance-updated"))?;
    Ok(())
}
