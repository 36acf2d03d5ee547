//! Conversions between the domain model (`ssp-model`) and the wire messages
//! (`ssp-proto`) that both the agent and the coordinator need.

use ssp_model::{Gpu, Image, Inventory, PciAddress, Pool};
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
                ssp: p.ssp,
            })
            .collect(),
        gpus,
        gpu_source: w.gpu_source.clone(),
        daemon: w.daemon.clone(),
        daemon_version: w.daemon_version.clone(),
        driver_version: w.driver_version.clone(),
        images: w.images_reported.then(|| {
            w.images
                .iter()
                .map(|i| Image {
                    fingerprint: i.fingerprint.clone(),
                    aliases: i.aliases.clone(),
                })
                .collect()
        }),
    })
}

/// An inventory as the wire type.
pub fn inventory_to_wire(hostname: &str, inv: &Inventory) -> pb::HostInventory {
    pb::HostInventory {
        hostname: hostname.to_string(),
        cpus: inv.cpus,
        memory_bytes: inv.memory_bytes,
        pools: inv.pools.iter().map(pool_to_wire).collect(),
        gpus: inv.gpus.iter().map(gpu_to_wire).collect(),
        gpu_source: inv.gpu_source.clone(),
        daemon: inv.daemon.clone(),
        daemon_version: inv.daemon_version.clone(),
        driver_version: inv.driver_version.clone(),
        images_reported: inv.images.is_some(),
        images: inv
            .images
            .iter()
            .flatten()
            .map(|i| pb::Image {
                fingerprint: i.fingerprint.clone(),
                aliases: i.aliases.clone(),
            })
            .collect(),
    }
}

/// A GPU as the wire type.
/// A storage pool as the wire type.
pub fn pool_to_wire(p: &Pool) -> pb::StoragePool {
    pb::StoragePool {
        name: p.name.clone(),
        driver: p.driver.clone(),
        total_bytes: p.total_bytes,
        used_bytes: p.used_bytes,
        ssp: p.ssp,
    }
}

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

/// A short hash of what an instance spec asks for, the same on the coordinator and
/// the agent (which records it in the instance config as `user.ssp.spec-hash`).
/// `running` is left out: it is state, reported on its own.
pub fn spec_hash(spec: &pb::InstanceSpec) -> String {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let mut s = spec.clone();
    s.running = false;
    Sha256::digest(s.encode_to_vec())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A short hash of a lab member list, the same on the coordinator and the agent
/// (which reports it with every `ListInstances`, so the leader sees a host whose
/// members files are stale). The order members are given in does not count.
pub fn members_hash(m: &pb::LabMembers) -> String {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let mut m = m.clone();
    m.members
        .sort_by(|a, b| (&a.name, a.uid).cmp(&(&b.name, b.uid)));
    Sha256::digest(m.encode_to_vec())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, uid: u32) -> pb::LabMember {
        pb::LabMember {
            name: name.into(),
            uid,
        }
    }

    #[test]
    fn members_hash_ignores_order_and_sees_every_change() {
        let a = pb::LabMembers {
            members: vec![member("ann", 10000), member("bob", 10001)],
            lab_gid: 19999,
        };
        let mut b = a.clone();
        b.members.reverse();
        assert_eq!(members_hash(&a), members_hash(&b));
        let mut more = a.clone();
        more.members.push(member("cat", 10002));
        let mut gid = a.clone();
        gid.lab_gid = 29999;
        let mut uid = a.clone();
        uid.members[1].uid = 10005;
        for other in [more, gid, uid] {
            assert_ne!(members_hash(&a), members_hash(&other));
        }
    }
}
