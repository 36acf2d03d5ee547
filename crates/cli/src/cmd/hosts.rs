//! `sspctl hosts`: registered hosts with capacity and free GPUs.

use serde_json::json;
use ssp_proto::ListHostsRequest;

use crate::output::{self, size};
use crate::Cli;

pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let list = crate::cmd::Conn::new(cli)?
        .call(ListHostsRequest {}, |ch, r| async move {
            ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                .list_hosts(r)
                .await
        })
        .await?
        .into_inner()
        .hosts;
    let rows = list
        .iter()
        .map(|h| {
            let inv = h.inventory.clone().unwrap_or_default();
            vec![
                h.name.clone(),
                match h.warnings.len() {
                    0 => h.status.clone(),
                    1 => format!("{} (1 warning)", h.status),
                    n => format!("{} ({n} warnings)", h.status),
                },
                if h.labels.is_empty() {
                    "-".into()
                } else {
                    h.labels.join(",")
                },
                if h.last_heartbeat_ms_ago < 0 {
                    "-".into()
                } else {
                    format!("{:.1}s ago", h.last_heartbeat_ms_ago as f64 / 1000.0)
                },
                format!("{} {}", inv.daemon, inv.daemon_version),
                inv.cpus.to_string(),
                size(inv.memory_bytes),
                format!("{}/{}", h.gpus_free, h.gpus_total),
                pool_free(&inv),
                h.instances.to_string(),
                if h.unmanaged.is_empty() && h.stray.is_empty() {
                    "-".into()
                } else {
                    h.unmanaged
                        .iter()
                        .chain(&h.stray)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(",")
                },
                if inv.driver_version.is_empty() {
                    "-".into()
                } else {
                    inv.driver_version.clone()
                },
                h.ssh_host.clone(),
            ]
        })
        .collect();
    let js = json!(list
        .iter()
        .map(|h| {
            let inv = h.inventory.clone().unwrap_or_default();
            json!({"name": h.name, "agent_address": h.agent_address, "ssh_host": h.ssh_host,
                   "daemon": inv.daemon, "daemon_version": inv.daemon_version, "cpus": inv.cpus,
                   "memory_bytes": inv.memory_bytes, "gpus_total": h.gpus_total, "gpus_free": h.gpus_free,
                   "instances": h.instances, "driver_version": inv.driver_version, "gpu_source": inv.gpu_source,
                   "status": h.status, "last_heartbeat_ms_ago": h.last_heartbeat_ms_ago,
                   "unmanaged": h.unmanaged, "stray": h.stray, "labels": h.labels,
                   "images": inv.images.iter().map(|i| json!({"fingerprint": i.fingerprint, "aliases": i.aliases})).collect::<Vec<_>>(),
                   "foreign_ports": h.foreign_ports, "lan": h.lan, "warnings": h.warnings,
                   "pools": inv.pools.iter().map(|p| json!({"name": p.name, "driver": p.driver, "total_bytes": p.total_bytes,
                                                             "used_bytes": p.used_bytes, "free_bytes": p.total_bytes.saturating_sub(p.used_bytes),
                                                             "ssp": p.ssp})).collect::<Vec<_>>()})
        })
        .collect::<Vec<_>>());
    output::print(
        cli.output,
        &[
            "NAME",
            "STATUS",
            "LABELS",
            "LAST HEARTBEAT",
            "DAEMON",
            "CPUS",
            "MEMORY",
            "GPUS FREE",
            "POOL",
            "CONTAINERS",
            "LEFT ALONE",
            "DRIVER",
            "SSH HOST",
        ],
        rows,
        js,
    );
    if matches!(cli.output, output::Format::Table) {
        for h in &list {
            for w in &h.warnings {
                crate::outln!("{}: warning: {w}", h.name);
            }
        }
    }
    Ok(())
}

/// `sspctl host drain|ready NAME`.
#[derive(clap::Subcommand)]
pub enum HostCmd {
    /// Take no new containers on this host; the ones there stay.
    Drain { name: String },
    /// Take new containers on this host again.
    Ready { name: String },
    /// Drain the host, then move every container off it where placement says.
    Evacuate(crate::cmd::migrate::EvacuateArgs),
}

pub async fn set(cli: &Cli, cmd: &HostCmd) -> anyhow::Result<()> {
    let (name, status) = match cmd {
        HostCmd::Drain { name } => (name, "draining"),
        HostCmd::Ready { name } => (name, "ready"),
        HostCmd::Evacuate(a) => return crate::cmd::migrate::evacuate(cli, a).await,
    };
    let body = ssp_proto::SetHostStatusRequest {
        name: name.clone(),
        status: status.into(),
    };
    crate::cmd::Conn::new(cli)?
        .call(body, |ch, r| async move {
            ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                .set_host_status(r)
                .await
        })
        .await?;
    match cli.output {
        output::Format::Json => crate::outln!("{}", json!({"host": name, "status": status})),
        output::Format::Table => crate::outln!("{name}: {status}"),
    }
    Ok(())
}

/// The pool containers are made in, with its free space: `default 9.1GiB free of 12GiB`.
fn pool_free(inv: &ssp_proto::HostInventory) -> String {
    let p = inv
        .pools
        .iter()
        .find(|p| p.ssp)
        .or_else(|| inv.pools.iter().max_by_key(|p| p.total_bytes));
    match p {
        Some(p) if p.total_bytes > 0 => format!(
            "{} {} free of {}",
            p.name,
            size(p.total_bytes.saturating_sub(p.used_bytes)),
            size(p.total_bytes)
        ),
        Some(p) => p.name.clone(),
        None => "-".into(),
    }
}
