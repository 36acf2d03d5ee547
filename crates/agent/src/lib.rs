//! The ssp host agent: exposes the local Incus/LXD daemon and GPU inventory over
//! gRPC, makes instances match the specs it is given, and registers with the
//! coordinators.

pub mod account;
pub mod adopt;
pub mod boot;
pub mod config;
pub mod ensure;
pub mod forward;
pub mod freeze;
pub mod heal;
pub mod host;
pub mod hostcheck;
pub mod image;
pub mod inventory;
pub mod limits;
pub mod lxcfs;
pub mod members;
pub mod migrate;
pub mod nvidia;
pub mod policy;
pub mod ports;
pub mod register;
pub mod relay;
pub mod render;
pub mod service;
pub mod share;
pub mod snapshot;
pub mod subid;
pub mod trust;
pub mod uvm;

use std::sync::Arc;

use anyhow::Context;

use crate::config::AgentConfig;
use crate::host::HostState;
use crate::inventory::GpuSource;

/// Runs the agent until the process is stopped.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Credentials first: without them no coordinator would listen to this agent.
    let tls = trust::establish(&cfg).await?;
    tracing::info!(identity = %tls.identity().label(), serial = %tls.identity().serial, "certificate loaded");
    let socket = cfg
        .socket
        .clone()
        .or_else(ssp_lxd::default_socket)
        .context(
            "no Incus or LXD socket found; start the daemon or set `socket` in the agent config",
        )?;
    let client = ssp_lxd::Client::connect(&socket)
        .await
        .with_context(|| format!("connecting to the daemon at {}", socket.display()))?;
    tracing::info!(
        daemon = client.kind().as_str(),
        version = %client.info().version,
        socket = %socket.display(),
        "connected to the daemon"
    );
    match uvm::ensure_nodes(std::path::Path::new("/proc"), std::path::Path::new("/dev")) {
        Ok(uvm::Uvm::Created(nodes)) => {
            tracing::info!(?nodes, "made the missing nvidia-uvm device nodes")
        }
        Ok(_) => {}
        Err(why) => tracing::warn!("GPU host check: {why}"),
    }
    if lxcfs::hook_sleeps_at_every_stop(std::path::Path::new(lxcfs::REBOOT_HOOK)) {
        tracing::warn!(
            hook = lxcfs::REBOOT_HOOK,
            "lxcfs's post-stop hook sleeps 0.5 s at every container stop, so a crashed container runs again that much later; scripts/prepare-host.sh replaces it"
        );
    }
    let gpus = match &cfg.gpu_inventory {
        Some(p) => GpuSource::Static(p.clone()),
        None => GpuSource::nvml(),
    };
    // Checked once: the check enables missing cgroup2 controllers as it goes.
    let cgroup_problems = hostcheck::cgroups(std::path::Path::new(hostcheck::CGROUP_ROOT));
    for problem in &cgroup_problems {
        tracing::error!("host check: {problem}");
    }
    // The limits are read again at every heartbeat (an admin may raise them).
    for problem in limits::check(cfg.max_containers, limits::daemon_pid(&client).await) {
        tracing::error!("host check: {problem}");
    }
    let daemon_logs = cfg
        .daemon_logs
        .clone()
        .unwrap_or_else(|| config::default_daemon_logs(&socket));
    if !daemon_logs.is_dir() {
        tracing::warn!(
            dir = %daemon_logs.display(),
            "the daemon's log folder is not there: containers that do not come up cannot be told why (set daemon_logs in the agent config)"
        );
    }
    let nvidia = {
        let (nv, dir) = (cfg.nvidia.clone(), cfg.state_dir.clone());
        tokio::task::spawn_blocking(move || nvidia::Nvidia::start(&nv, &dir)).await?
    };
    let specs = heal::Specs::open(&cfg.state_dir.join("specs"))?;
    let members = members::Members::open(&cfg.state_dir)?;
    let host = HostState::new(
        client,
        gpus,
        cfg.storage_pool.clone(),
        cfg.ssh_listen.clone(),
        cfg.ssh_host.clone(),
        cfg.ssh_forward,
        specs,
        nvidia,
        members,
        cfg.lan.as_ref().map(|l| l.nic()),
        daemon_logs,
    );
    let policy = Arc::new(policy::Policy {
        shared_roots: cfg.shared_roots.clone(),
        ssh_ports: cfg.ssh_ports,
        rdp_ports: cfg.rdp_ports,
        uid_range: cfg.uid_range,
    });
    recheck_stored_specs(&host, &policy).await;
    tokio::spawn(host.clone().follow_events());
    tokio::spawn(host.clone().heal_on_events());
    tokio::spawn(
        host.clone()
            .resync_loop(std::time::Duration::from_secs(cfg.resync_secs.max(1))),
    );
    tokio::spawn(snapshot::schedule_loop(host.clone()));
    match relay::ensure_key(&cfg.state_dir.join("relay")) {
        Ok(_) => {
            tokio::spawn(relay::supervise(
                host.clone(),
                cfg.state_dir.join("relay"),
                relay::FrpcConfig {
                    program: cfg.frpc.clone(),
                    admin_port: cfg.frpc_admin_port,
                },
            ));
        }
        Err(e) => tracing::error!(
            "no key for the relay, so no tunnels for access from outside the LAN: {e:#}"
        ),
    }
    tokio::spawn(register::register_loop(
        cfg.clone(),
        host.clone(),
        tls.clone(),
        cgroup_problems,
    ));
    tokio::spawn(trust::renew_loop(cfg.clone(), tls.clone()));

    let listener = ssp_net::Listener::bind(cfg.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "agent listening");
    let svc = service::AgentService {
        host: Arc::clone(&host),
        policy,
        admit: Default::default(),
        migration_address: cfg.migration_address(),
    };
    // Only coordinators of this cluster drive an agent.
    ssp_net::Listener::server()
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ssp_proto::agent_server::AgentServer::new(svc).max_decoding_message_size(1 << 20),
            ssp_net::auth::only(
                tls.clone(),
                &[ssp_model::CertRole::Coordinator],
                "drive agents",
            ),
        ))
        .serve_with_incoming_shutdown(listener.incoming(tls)?, shutdown())
        .await?;
    Ok(())
}

/// Checks the specs stored before this start (by an older agent, or under another
/// config) against this host's policy, in name order, as if they arrived now; one
/// that breaks it is moved aside and never acted on or healed.
async fn recheck_stored_specs(host: &HostState, policy: &policy::Policy) {
    let gpus: Vec<String> = match host.facts().await {
        Ok(f) => f
            .inventory
            .gpus
            .iter()
            .map(|g| g.pci_address.clone())
            .collect(),
        Err(e) => {
            tracing::warn!("stored specs not re-checked (no host facts): {e:#}");
            return;
        }
    };
    let mut kept: Vec<ssp_proto::InstanceSpec> = Vec::new();
    for name in host.specs.names() {
        let Some(spec) = host.specs.get(&name) else {
            continue;
        };
        match policy::check(&spec, policy, &gpus, &kept) {
            Ok(()) => kept.push(spec),
            Err(why) => {
                tracing::error!(instance = %name, "a stored spec breaks this host's policy, set aside in specs/refused: {why}");
                if let Err(e) = host.specs.quarantine(&name) {
                    tracing::error!(instance = %name, "setting the spec aside failed: {e}");
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
