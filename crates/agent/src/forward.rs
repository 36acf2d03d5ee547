//! How SSH reaches a container: NAT to its static bridge address when the host
//! allows it, else the daemon's forwarding process (see [`SshForward`]).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use ssp_lxd::{Client, Instance};

use crate::render::{Device, SshForward, Subnet};

/// Picks the forward for this host. NAT needs a specific IPv4 address to listen
/// on (`ssh_listen`, or `ssh_host` when `ssh_listen` is a wildcard) and a default
/// profile whose NIC sits on a managed bridge with an IPv4 subnet and DHCP. The
/// second value says why NAT was not chosen.
pub async fn discover(
    client: &Client,
    mode: crate::config::ForwardMode,
    ssh_listen: &str,
    ssh_host: &str,
) -> (SshForward, String) {
    let proxy = SshForward::Proxy {
        listen: ssh_listen.to_string(),
    };
    if mode == crate::config::ForwardMode::Proxy {
        return (proxy, "ssh_forward = \"proxy\" in the agent config".into());
    }
    let listen = match [ssh_listen, ssh_host]
        .iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(|ip| !ip.is_unspecified())
    {
        Some(IpAddr::V4(ip)) => ip,
        _ => {
            return (
                proxy,
                format!("neither ssh_listen ({ssh_listen}) nor ssh_host ({ssh_host}) is a specific IPv4 address"),
            )
        }
    };
    match bridge_nic(client).await {
        Ok((nic_name, nic, subnet)) => (
            SshForward::Nat {
                listen,
                nic_name,
                nic,
                subnet,
            },
            String::new(),
        ),
        Err(why) => (proxy, why),
    }
}

async fn bridge_nic(client: &Client) -> Result<(String, Device, Subnet), String> {
    let profile = client
        .get("/1.0/profiles/default")
        .await
        .map_err(|e| format!("reading the default profile: {e}"))?;
    let devices: std::collections::BTreeMap<String, Device> =
        serde_json::from_value(profile["devices"].clone()).unwrap_or_default();
    let Some((name, nic)) = devices.into_iter().find(|(_, d)| {
        d.get("type").map(String::as_str) == Some("nic") && d.contains_key("network")
    }) else {
        return Err("the default profile has no NIC on a managed network".into());
    };
    let network = nic["network"].clone();
    let net = client
        .get(&format!("/1.0/networks/{network}"))
        .await
        .map_err(|e| format!("reading network {network}: {e}"))?;
    let cfg = |k: &str| net["config"][k].as_str().unwrap_or_default().to_string();
    if net["managed"] != Value::Bool(true) || net["type"] != "bridge" {
        return Err(format!("network {network} is not a managed bridge"));
    }
    if cfg("ipv4.dhcp") == "false" {
        return Err(format!("network {network} has DHCP off"));
    }
    let subnet = Subnet::parse(&cfg("ipv4.address"))
        .ok_or_else(|| format!("network {network} has no IPv4 subnet"))?;
    Ok((name, nic, subnet))
}

/// The static address an instance already has on the NIC ssp overrides.
pub fn current(inst: &Instance, nic_name: &str, subnet: &Subnet) -> Option<Ipv4Addr> {
    inst.devices
        .get(nic_name)?
        .get("ipv4.address")?
        .parse()
        .ok()
        .filter(|a| subnet.usable(*a))
}

/// Every static IPv4 address the daemon's instances hold on any NIC.
pub fn used(instances: &[Instance]) -> BTreeSet<Ipv4Addr> {
    instances
        .iter()
        .flat_map(|i| i.expanded_devices.values().chain(i.devices.values()))
        .filter_map(|d| d.get("ipv4.address")?.parse().ok())
        .collect()
}

/// The IPv4 addresses in a `GET /1.0/networks/NAME/leases` answer: DHCP leases of
/// containers ssp did not make, which a static address must not take.
pub fn leased(leases: &Value) -> BTreeSet<Ipv4Addr> {
    leases
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["address"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Hands out bridge addresses to new instances. Picking lists the daemon's
/// instances, so an address is free unless an instance holds it or another
/// ensure has it reserved and has not yet written it.
#[derive(Default)]
pub struct Addrs {
    picking: tokio::sync::Mutex<()>,
    pending: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
}

/// An address kept from others until dropped (once the instance holds it).
pub struct Reserved {
    pub addr: Ipv4Addr,
    pending: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.addr);
        }
    }
}

impl Addrs {
    /// Picks a free address on `network` (`subnet`): not static on any instance,
    /// not leased by the bridge's DHCP server, not reserved by another ensure.
    pub async fn reserve(
        &self,
        client: &Client,
        network: &str,
        subnet: &Subnet,
    ) -> Result<Reserved, String> {
        let _one = self.picking.lock().await;
        let mut used = used(
            &client
                .instances()
                .await
                .map_err(|e| format!("listing instances: {e}"))?,
        );
        match client.get(&format!("/1.0/networks/{network}/leases")).await {
            Ok(leases) => used.extend(leased(&leases)),
            // Leases are a courtesy to other containers; the daemon still refuses an
            // address another NIC holds statically.
            Err(e) => tracing::debug!(network, "cannot read DHCP leases: {e}"),
        }
        let mut pending = self.pending.lock().map_err(|_| "address table poisoned")?;
        used.extend(pending.iter().copied());
        let addr = subnet.pick(&used).ok_or_else(|| {
            format!(
                "no free address left on the bridge ({}/{})",
                subnet.gateway, subnet.prefix
            )
        })?;
        pending.insert(addr);
        Ok(Reserved {
            addr,
            pending: self.pending.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_give_their_ipv4_addresses() {
        let leases = serde_json::json!([
            {"hostname": "web", "hwaddr": "10:66:6a:00:00:01", "address": "10.211.0.57", "type": "dynamic"},
            {"hostname": "web", "hwaddr": "10:66:6a:00:00:01", "address": "fd42::57", "type": "dynamic"},
            {"hostname": "sspbr0.gw", "address": "10.211.0.1", "type": "gateway"},
            {"hostname": "odd"}
        ]);
        let got: Vec<String> = leased(&leases).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["10.211.0.1", "10.211.0.57"]);
        assert!(leased(&serde_json::json!({"not": "a list"})).is_empty());
    }
}
