//! Model → wire conversions only the coordinator needs (the shared ones are in ssp-wire).

use ssp_model::{Host, Instance, Settings, User};
use ssp_proto as pb;

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
        kind: u.kind.as_str().into(),
        common: u.server().map(|s| s.to_string()).unwrap_or_default(),
    }
}

/// The spec of `inst` in `state` (with its owner, and a Common-Server's accounts),
/// or `None` when its owner is not recorded.
pub fn spec_of(state: &ssp_model::State, inst: &Instance) -> Option<pb::InstanceSpec> {
    let owner = state.users.get(inst.owner.as_str())?;
    let mut spec = spec_for(inst, owner, &state.settings());
    if inst.desktop {
        spec.rdp_port = state
            .hosts
            .get(inst.host.as_str())
            .and_then(|h| h.rdp_port(inst.ssh_port))
            .map(u32::from)
            .unwrap_or(0);
    }
    if let (Some(r), Some(port)) = (&state.relay, inst.relay_port) {
        spec.relay_host = r.host.to_string();
        spec.relay_server_port = r.port.into();
        spec.relay_kind = r.kind.as_str().into();
        spec.relay_token = r.token.clone();
        spec.relay_user = r.user.to_string();
        spec.relay_port = port.into();
    }
    // A static address from the LAN's pool, with the pool's prefix and router.
    if let (Some(a), Some(pool)) = (
        inst.lan_address,
        inst.placement.lan.as_ref().and_then(|l| state.lans.get(l)),
    ) {
        spec.lan_address = format!("{a}/{}", pool.prefix);
        spec.lan_gateway = pool.gateway.map(|g| g.to_string()).unwrap_or_default();
    }
    if owner.kind == ssp_model::UserKind::Common {
        spec.common = true;
        // A Common-Server has no owner account: no keys, and its uid is no one's login.
        spec.ssh_keys.clear();
        spec.accounts = state
            .accounts_of(owner.name.as_str())
            .map(|u| pb::Account {
                name: u.name.to_string(),
                uid: u.uid,
                ssh_keys: u.ssh_keys.iter().map(|k| k.to_string()).collect(),
            })
            .collect();
    }
    Some(spec)
}

/// The spec an agent needs to run `inst`. It names no other member, so adding or
/// removing a user changes no other container's spec (see [`lab_members`]); only a
/// Common-Server's names its accounts ([`spec_of`]).
fn spec_for(inst: &Instance, owner: &User, settings: &Settings) -> pb::InstanceSpec {
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
                mode: s.mode.as_str().into(),
            })
            .collect(),
        running: true,
        uid_range: format!("{}-{}", settings.uid_first, settings.uid_last),
        lab_gid: settings.lab_gid(),
        snapshot_every_secs: owner.snapshots.every_secs,
        snapshot_keep: owner.snapshots.keep,
        common: false,
        accounts: vec![],
        network: match inst.network {
            ssp_model::Network::Forward => String::new(),
            ssp_model::Network::Lan => "lan".into(),
        },
        hwaddr: match inst.network {
            ssp_model::Network::Forward => String::new(),
            ssp_model::Network::Lan => lan_hwaddr(owner.uid),
        },
        lan_address: String::new(),
        lan_gateway: String::new(),
        relay_host: String::new(),
        relay_server_port: 0,
        relay_kind: String::new(),
        relay_token: String::new(),
        desktop: inst.desktop,
        rdp_port: 0,
        relay_user: String::new(),
        relay_port: 0,
    }
}

/// The MAC address of `uid`'s container on the LAN: locally administered, made
/// from the uid (unique in the lab), so it is the same on every host and the LAN's
/// DHCP server gives the container the same address after a restart or a move.
pub fn lan_hwaddr(uid: u32) -> String {
    let b = uid.to_be_bytes();
    format!("02:73:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// The lab's member list every agent writes into its members files: every user's
/// name and uid, sorted by name, and the lab gid.
pub fn lab_members<'a>(
    users: impl IntoIterator<Item = &'a User>,
    settings: &Settings,
) -> pb::LabMembers {
    let mut members: Vec<pb::LabMember> = users
        .into_iter()
        .map(|u| pb::LabMember {
            name: u.name.to_string(),
            uid: u.uid,
        })
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    pb::LabMembers {
        members,
        lab_gid: settings.lab_gid(),
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
        ssh_host: host.map(|h| h.ssh_host.to_string()).unwrap_or_default(),
        ssh_port: inst.ssh_port as u32,
        cpus: inst.limits.cpus,
        memory_bytes: inst.limits.memory.0,
        disk_bytes: inst.limits.disk.0,
        image: inst.image.clone(),
        uuid: uuid.into(),
        disk_used_bytes: 0,
        network: inst.network.as_str().into(),
        lan: inst.placement.lan.clone().unwrap_or_default(),
        // A static one is known from the record; one by DHCP only from its host.
        lan_address: inst.lan_address.map(|a| a.to_string()).unwrap_or_default(),
        relay_host: String::new(),
        problem: String::new(),
        relay_port: inst.relay_port.map(u32::from).unwrap_or(0),
        desktop: inst.desktop,
        // A desktop on the LAN listens at its own address; elsewhere its host forwards.
        rdp_host: match (inst.desktop, inst.network) {
            (false, _) => String::new(),
            (true, ssp_model::Network::Lan) => {
                inst.lan_address.map(|a| a.to_string()).unwrap_or_default()
            }
            (true, ssp_model::Network::Forward) => {
                host.map(|h| h.ssh_host.to_string()).unwrap_or_default()
            }
        },
        rdp_port: match (inst.desktop, inst.network) {
            (false, _) => 0,
            (true, ssp_model::Network::Lan) => 3389,
            (true, ssp_model::Network::Forward) => host
                .and_then(|h| h.rdp_port(inst.ssh_port))
                .map(u32::from)
                .unwrap_or(0),
        },
    }
}
