//! Registration and heartbeats: the agent tells a coordinator who it is and what it has.

use std::sync::Arc;
use std::time::Duration;

use ssp_proto::coordinator_client::CoordinatorClient;
use ssp_proto::RegisterHostRequest;

use crate::config::AgentConfig;
use crate::host::HostState;

/// Registers with the first coordinator that answers, then keeps re-registering as a
/// heartbeat. `cgroup_problems` (found at start) go with every heartbeat, with the
/// kernel's and the daemon's limits read each time.
pub async fn register_loop(
    cfg: AgentConfig,
    host: Arc<HostState>,
    tls: ssp_net::Tls,
    cgroup_problems: Vec<String>,
) {
    let mut next = 0usize;
    let mut registered = false;
    let mut last_limits = None;
    let mut daemon = None;
    loop {
        let addr = &cfg.coordinators[next % cfg.coordinators.len()];
        // The daemon's pid is asked for again only once it is not the daemon's.
        if !daemon.is_some_and(crate::limits::is_daemon) {
            daemon = crate::limits::daemon_pid(&host.client).await;
        }
        let limits = crate::limits::check(cfg.max_containers, daemon);
        if last_limits.as_ref().is_some_and(|l| *l != limits) {
            match limits.is_empty() {
                true => tracing::info!("host check: the limits are enough now"),
                false => {
                    for l in &limits {
                        tracing::error!("host check: {l}");
                    }
                }
            }
        }
        let mut warnings = cgroup_problems.clone();
        warnings.extend(limits.iter().cloned());
        last_limits = Some(limits);
        match register_once(&cfg, &host, addr, &tls, warnings).await {
            Ok(n) => {
                if !registered {
                    tracing::info!(coordinator = %addr, instances = n, "registered");
                    registered = true;
                }
                tokio::time::sleep(Duration::from_secs(cfg.heartbeat_secs)).await;
            }
            Err(e) => {
                registered = false;
                tracing::warn!(coordinator = %addr, "registration failed: {e:#}");
                next += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn register_once(
    cfg: &AgentConfig,
    host: &HostState,
    addr: &str,
    tls: &ssp_net::Tls,
    warnings: Vec<String>,
) -> anyhow::Result<u32> {
    // Sent with every heartbeat; the coordinator writes the record only when it
    // changed (a new image, a port taken or given back).
    let inventory = host.inventory().await?;
    let foreign_ports = host.foreign_ports(cfg.ssh_ports).await?;
    let channel = ssp_net::connect(addr, tls, ssp_net::COORDINATOR_NAME).await?;
    let mut c = CoordinatorClient::new(channel);
    let mut req = tonic::Request::new(RegisterHostRequest {
        name: cfg.name.clone(),
        agent_address: cfg.advertise_address()?,
        ssh_host: cfg.ssh_host.clone(),
        ssh_port_first: cfg.ssh_ports.0 as u32,
        ssh_port_last: cfg.ssh_ports.1 as u32,
        inventory: Some(inventory),
        labels: cfg.labels.clone(),
        lan: cfg.lan.as_ref().map(|l| l.name.clone()).unwrap_or_default(),
        relay_key: crate::relay::public_key(&cfg.state_dir.join("relay")).unwrap_or_default(),
        rdp_port_first: cfg.rdp_ports.0.into(),
        rdp_port_last: cfg.rdp_ports.1.into(),
        foreign_ports: foreign_ports.into_iter().map(u32::from).collect(),
        warnings,
    });
    // A coordinator that is paused or cut off must not hold the heartbeat up.
    req.set_timeout(Duration::from_secs(5));
    let reply = c.register_host(req).await?.into_inner();
    // The coordinators' revoked serials: refused here too, also after a restart.
    if reply.revoked != tls.revoked() {
        tracing::info!(
            revoked = reply.revoked.len(),
            "revoked certificates updated"
        );
        tls.set_revoked(reply.revoked.iter().cloned());
        crate::trust::save_revoked(cfg, &reply.revoked);
    }
    Ok(reply.instances)
}
