//! Model → wire conversions for what the agent reports.

use ssp_model::Inventory;
use ssp_proto::{Gpu, HostInventory, StoragePool};

/// The inventory as sent to coordinators.
pub fn inventory_to_wire(hostname: &str, inv: &Inventory) -> HostInventory {
    HostInventory {
        hostname: hostname.into(),
        cpus: inv.cpus,
        memory_bytes: inv.memory_bytes,
        pools: inv
            .pools
            .iter()
            .map(|p| StoragePool {
                name: p.name.clone(),
                driver: p.driver.clone(),
                total_bytes: p.total_bytes,
                used_bytes: p.used_bytes,
            })
            .collect(),
        gpus: inv
            .gpus
            .iter()
            .map(|g| Gpu {
                index: g.index,
                uuid: g.uuid.clone(),
                pci_address: g.pci.to_string(),
                model: g.model.clone(),
                memory_bytes: g.memory_bytes,
                minor: g.minor,
                device_node: g.device_node.clone(),
            })
            .collect(),
        gpu_source: inv.gpu_source.clone(),
        daemon: inv.daemon.clone(),
        daemon_version: inv.daemon_version.clone(),
        driver_version: inv.driver_version.clone(),
    }
}
