//! Wire ↔ model conversions at the coordinator's edge.

use ssp_model::{Gpu, Host, Instance, Inventory, PciAddress, Pool, Settings, User};
use ssp_proto as pb;

/// Parses an agent's inventory report.
pub fn inventory_from_wire(w: &pb::HostInventory) -> Result<Inventory, ssp_model::InputError> {
    let gpus = w
        .gpus
        .iter()
        .map(|g| {
            Ok(Gpu {
                index: g.index,
                uuid: g.uuid.clone(),
                pci: PciAddress::parse(&g.pci_address)?,
                model: g.model.clone(),
                memory_bytes: g.memory_bytes,
                minor: g.minor,
                device_node: g.device_node.clone(),
            })
        })
        .collect::<Result<Vec<_>, ssp_model::InputError>>()?;
    Ok(Inventory {
        cpus: w.cpus,
        memory_bytes: w.memory_bytes,
        pools: w
            .pools
            .iter()
            .map(|p| Pool {
                name: p.name.clone(),
                driver: p.driver.clone(),
                total_bytes: p.total_bytes,
                used_bytes: p.used_bytes,
            })
            .collect(),
        gpus,
        gpu_source: w.gpu_source.clone(),
        daemon: w.daemon.clone(),
        daemon_version: w.daemon_version.clone(),
        driver_version: w.driver_version.clone(),
    })
}

/// An inventory as the wire type.
pub fn inventory_to_wire(inv: &Inventory) -> pb::HostInventory {
    pb::HostInventory {
        hostname: String::new(),
        cpus: inv.cpus,
        memory_bytes: inv.memory_bytes,
        pools: inv
            .pools
            .iter()
            .map(|p| pb::StoragePool {
                name: p.name.clone(),
                driver: p.driver.clone(),
                total_bytes: p.total_bytes,
                used_bytes: p.used_bytes,
            })
            .collect(),
        gpus: inv.gpus.iter().map(gpu_to_wire).collect(),
        gpu_source: inv.gpu_source.clone(),
        daemon: inv.daemon.clone(),
        daemon_version: inv.daemon_version.clone(),
        driver_version: inv.driver_version.clone(),
    }
}

/// A GPU as the wire type.
pub fn gpu_to_wire(g: &Gpu) -> pb::Gpu {
    pb::Gpu {
        index: g.index,
        uuid: g.uuid.clone(),
        pci_address: g.pci.to_string(),
        model: g.model.clone(),
        memory_bytes: g.memory_bytes,
        minor: g.minor,
        device_node: g.device_node.clone(),
    }
}

/// A user as the wire type.
pub fn user_to_wire(u: &User) -> pb::User {
    pb::User {
        name: u.name.to_string(),
        uid: u.uid,
        role: u.role.as_str().into(),
        ssh_keys: u.ssh_keys.iter().map(|k| k.to_string()).collect(),
        cpus: u.limits.cpus,
        memory_bytes: u.limits.memory.0,
        disk_bytes: u.limits.disk.0,
        gpus: u.gpus,
    }
}

/// The spec an agent needs to run `inst`.
pub fn spec_for(inst: &Instance, owner: &User, settings: &Settings) -> pb::InstanceSpec {
    pb::InstanceSpec {
        name: inst.name.clone(),
        owner: owner.name.to_string(),
        owner_uid: owner.uid,
        ssh_keys: owner.ssh_keys.iter().map(|k| k.to_string()).collect(),
        image: inst.image.clone(),
        cpus: inst.limits.cpus,
        memory_bytes: inst.limits.memory.0,
        disk_bytes: inst.limits.disk.0,
        processes: inst.limits.processes,
        gpu_pci: inst.gpus.iter().map(|p| p.to_string()).collect(),
        ssh_port: inst.ssh_port as u32,
        shares: inst
            .shares
            .iter()
            .map(|s| pb::SharedFolder {
                host_path: s.host_path.clone(),
                container_path: s.container_path.clone(),
            })
            .collect(),
        running: true,
        uid_range: format!("{}-{}", settings.uid_first, settings.uid_last),
    }
}

/// An instance view with its observed state.
pub fn instance_view(
    inst: &Instance,
    host: Option<&Host>,
    state: &str,
    uuid: &str,
) -> pb::InstanceView {
    pb::InstanceView {
        name: inst.name.clone(),
        owner: inst.owner.to_string(),
        host: inst.host.to_string(),
        state: state.into(),
        gpu_pci: inst.gpus.iter().map(|p| p.to_string()).collect(),
        ssh_host: host.map(|h| h.ssh_host.clone()).unwrap_or_default(),
        ssh_port: inst.ssh_port as u32,
        cpus: inst.limits.cpus,
        memory_bytes: inst.limits.memory.0,
        disk_bytes: inst.limits.disk.0,
        image: inst.image.clone(),
        uuid: uuid.into(),
    }
}
