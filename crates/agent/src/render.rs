//! Spec → daemon config and devices. Pure, so it is table-tested without a daemon.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ssp_proto::InstanceSpec;

use crate::nvidia::Userspace;

/// A device: its keys and values, all strings as the daemon wants them.
pub type Device = BTreeMap<String, String>;

/// Config keys ssp owns on its instances; others are left as they are.
pub const MANAGED_KEYS: &[&str] = &[
    "security.privileged",
    "security.nesting",
    "security.idmap.isolated",
    "boot.autostart",
    "limits.cpu",
    "limits.memory",
    "limits.processes",
    "raw.idmap",
    "user.ssp.managed",
    "user.ssp.owner",
    "user.ssp.spec-hash",
    crate::account::SCRIPT_KEY,
    "nvidia.runtime",
    "nvidia.driver.capabilities",
];

/// Device names ssp owns start with this (plus the root disk).
pub const DEVICE_PREFIX: &str = "ssp-";

/// How GPUs reach the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuMode {
    /// `gpu` devices by PCI address: the daemon sees the GPU.
    Pci,
    /// `unix-char` device nodes: the assigned /dev/nvidiaN renumbered from 0.
    DeviceNodes {
        /// PCI address → host minor number.
        minors: BTreeMap<String, u32>,
        /// Control nodes present on the host (nvidiactl, nvidia-uvm, nvidia-uvm-tools).
        control: Vec<String>,
    },
}

/// How a container's SSH port is forwarded from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshForward {
    /// A `proxy` device in NAT mode: the daemon installs a DNAT rule to the
    /// container's static address on its bridge. Nothing runs per container, so a
    /// start costs no more than without it.
    Nat {
        /// The host address users connect to (NAT cannot listen on a wildcard).
        listen: Ipv4Addr,
        /// The default profile's bridged NIC: its device name and keys, copied
        /// into the instance with `ipv4.address` added.
        nic_name: String,
        nic: Device,
        /// The bridge's IPv4 subnet, from which container addresses are picked.
        subnet: Subnet,
    },
    /// A `proxy` device with a forwarding process (forkproxy) that connects to
    /// 127.0.0.1:22 inside: works without container networking, but the daemon
    /// waits about a second for the process at every start.
    Proxy { listen: String },
}

/// How containers in LAN mode join the lab's LAN (the agent's `[lan]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanNic {
    /// The host interface on the LAN.
    pub parent: String,
    pub nictype: LanNicType,
}

/// The daemon's NIC type for a LAN container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LanNicType {
    /// A macvlan interface on a physical NIC.
    Macvlan,
    /// A port of a Linux bridge that holds the LAN NIC.
    Bridged,
}

impl LanNicType {
    pub fn as_str(self) -> &'static str {
        match self {
            LanNicType::Macvlan => "macvlan",
            LanNicType::Bridged => "bridged",
        }
    }
}

/// The NIC name a LAN container's LAN device replaces (the profile's), or `eth0`:
/// the images take an address by DHCP on eth0.
pub const LAN_NIC: &str = "eth0";

/// True for a spec of a container in LAN mode.
pub fn on_lan(spec: &InstanceSpec) -> bool {
    spec.network == "lan"
}

/// An IPv4 subnet with the bridge's own (gateway) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses the daemon's `ipv4.address` form, `10.211.0.1/24`.
    pub fn parse(s: &str) -> Option<Subnet> {
        let (ip, prefix) = s.split_once('/')?;
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 30).then_some(())?;
        Some(Subnet {
            gateway: ip.parse().ok()?,
            prefix,
        })
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// True for a host address of this subnet (not network, broadcast or gateway).
    pub fn usable(&self, a: Ipv4Addr) -> bool {
        let (a, g, m) = (u32::from(a), u32::from(self.gateway), self.mask());
        a & m == g & m && a != g && a & !m != 0 && a & !m != !m
    }

    /// The highest usable address not in `used`. ssp takes addresses from the top
    /// of the subnet; a bridge's DHCP range for other containers can be kept low.
    pub fn pick(&self, used: &std::collections::BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let m = self.mask();
        let net = u32::from(self.gateway) & m;
        (net + 1..net | !m)
            .rev()
            .map(Ipv4Addr::from)
            .find(|a| self.usable(*a) && !used.contains(a))
    }
}

/// Host facts that shape the rendering.
#[derive(Debug, Clone)]
pub struct HostContext {
    pub pool: String,
    pub ssh: SshForward,
    pub gpu_mode: GpuMode,
    /// How GPU containers get the NVIDIA driver's user-space (chosen and kept
    /// current by [`crate::nvidia::Nvidia`]; render itself reads no files).
    pub nvidia: crate::nvidia::Userspace,
    /// The host folder with the lab's members files ([`crate::members`]), mounted
    /// read-only into every container; `None` mounts nothing.
    pub members_dir: Option<String>,
    /// The LAN containers in LAN mode join; `None`: this host has no `[lan]`.
    pub lan: Option<LanNic>,
}

/// The rendered config and devices, plus a hash of both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub config: BTreeMap<String, String>,
    pub devices: BTreeMap<String, Device>,
}

fn dev(pairs: &[(&str, &str)]) -> Device {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The ids a container maps 1:1 to the host, on top of its isolated map: the
/// owner's uid and their own group (gid = uid), and the lab group's gid. Nothing
/// else of the lab's range: another member's uid inside is an id of the isolated
/// map, so root in this container can never act as them on a shared folder (their
/// files show as `nobody` here). Only ids inside the spec's `uid_range` (which the
/// agent's policy has checked against its own) are mapped; no range, no map.
///
/// A Common-Server maps the whole range: its accounts come and go without a restart
/// (a new raw.idmap takes effect only at one), and no one but the admin is root there.
pub fn idmap(spec: &InstanceSpec) -> Option<String> {
    let (first, last) = spec.uid_range.split_once('-')?;
    let range = first.parse::<u32>().ok()?..=last.parse::<u32>().ok()?;
    if spec.common {
        let (first, last) = (range.start(), range.end());
        return (first <= last).then(|| format!("both {first}-{last} {first}-{last}"));
    }
    let mut lines = Vec::new();
    if range.contains(&spec.owner_uid) {
        lines.push(format!("both {0} {0}", spec.owner_uid));
    }
    if range.contains(&spec.lab_gid) && spec.lab_gid != spec.owner_uid {
        lines.push(format!("gid {0} {0}", spec.lab_gid));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Renders `spec` for a host. `addr` is the container's address on the bridge,
/// needed when SSH is forwarded by NAT.
pub fn render(
    spec: &InstanceSpec,
    host: &HostContext,
    addr: Option<Ipv4Addr>,
) -> Result<Rendered, String> {
    let mut config: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        config.insert(k.to_string(), v);
    };
    set("security.privileged", "false".into());
    // systemd in an unprivileged container wants nesting for its own sandboxing.
    set("security.nesting", "true".into());
    set("security.idmap.isolated", "true".into());
    set("boot.autostart", "true".into());
    set("limits.cpu", spec.cpus.to_string());
    set(
        "limits.memory",
        format!("{}MiB", spec.memory_bytes.div_ceil(1 << 20)),
    );
    set("limits.processes", spec.processes.to_string());
    if let Some(map) = idmap(spec) {
        set("raw.idmap", map);
    }
    set("user.ssp.managed", "true".into());
    set("user.ssp.owner", spec.owner.clone());
    set(crate::account::SCRIPT_KEY, crate::account::script(spec));

    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    let size = format!("{}MiB", spec.disk_bytes.div_ceil(1 << 20));
    devices.insert(
        "root".into(),
        dev(&[
            ("type", "disk"),
            ("path", "/"),
            ("pool", &host.pool),
            ("size", &size),
        ]),
    );
    if on_lan(spec) {
        // Its own address on the LAN, by DHCP there; no forward from the host. The
        // NIC takes the place of the profile's, under its name, so the image's
        // DHCP on eth0 asks the LAN.
        let lan = host.lan.as_ref().ok_or_else(|| {
            "the spec asks for the LAN, and this host's agent has no [lan]".to_string()
        })?;
        let name = match &host.ssh {
            SshForward::Nat { nic_name, .. } => nic_name.as_str(),
            SshForward::Proxy { .. } => LAN_NIC,
        };
        let mut nic = dev(&[
            ("type", "nic"),
            ("nictype", lan.nictype.as_str()),
            ("parent", &lan.parent),
            ("name", LAN_NIC),
        ]);
        if !spec.hwaddr.is_empty() {
            nic.insert("hwaddr".into(), spec.hwaddr.clone());
        }
        devices.insert(name.to_string(), nic);
    } else {
        forward_ssh(spec, host, addr, &mut devices)?;
        if spec.desktop && spec.rdp_port != 0 {
            forward_rdp(spec, host, addr, &mut devices)?;
        }
    }
    gpus(spec, host, &mut config, &mut devices)?;
    if let Some(dir) = &host.members_dir {
        devices.insert(
            crate::members::DEVICE.into(),
            dev(&[
                ("type", "disk"),
                ("source", dir),
                ("path", crate::members::MOUNT_PATH),
                ("readonly", "true"),
            ]),
        );
    }
    for (i, s) in spec.shares.iter().enumerate() {
        let mut d = dev(&[
            ("type", "disk"),
            ("source", &s.host_path),
            ("path", &s.container_path),
        ]);
        if ssp_model::ShareMode::parse(&s.mode) == Ok(ssp_model::ShareMode::Ro) {
            d.insert("readonly".into(), "true".into());
        }
        devices.insert(format!("{DEVICE_PREFIX}share{i}"), d);
    }
    config.insert("user.ssp.spec-hash".into(), ssp_wire::spec_hash(spec));
    Ok(Rendered { config, devices })
}

/// The SSH forward from the host's port to the container (and with NAT, the
/// bridge NIC with the container's static address).
fn forward_ssh(
    spec: &InstanceSpec,
    host: &HostContext,
    addr: Option<Ipv4Addr>,
    devices: &mut BTreeMap<String, Device>,
) -> Result<(), String> {
    match &host.ssh {
        SshForward::Nat {
            listen,
            nic_name,
            nic,
            subnet,
        } => {
            let addr = addr
                .filter(|a| subnet.usable(*a))
                .ok_or_else(|| "no address on the bridge for the SSH forward".to_string())?;
            let mut nic = nic.clone();
            nic.insert("ipv4.address".into(), addr.to_string());
            devices.insert(nic_name.clone(), nic);
            devices.insert(
                format!("{DEVICE_PREFIX}ssh"),
                dev(&[
                    ("type", "proxy"),
                    ("listen", &format!("tcp:{listen}:{}", spec.ssh_port)),
                    ("connect", &format!("tcp:{addr}:22")),
                    ("nat", "true"),
                ]),
            );
        }
        SshForward::Proxy { listen } => {
            devices.insert(
                format!("{DEVICE_PREFIX}ssh"),
                dev(&[
                    ("type", "proxy"),
                    ("listen", &format!("tcp:{listen}:{}", spec.ssh_port)),
                    ("connect", "tcp:127.0.0.1:22"),
                    ("bind", "host"),
                ]),
            );
        }
    }
    Ok(())
}

/// A desktop container's RDP (xrdp on 3389 inside), forwarded from its RDP port
/// on the host the way SSH is.
fn forward_rdp(
    spec: &InstanceSpec,
    host: &HostContext,
    addr: Option<Ipv4Addr>,
    devices: &mut BTreeMap<String, Device>,
) -> Result<(), String> {
    let d = match &host.ssh {
        SshForward::Nat { listen, subnet, .. } => {
            let addr = addr
                .filter(|a| subnet.usable(*a))
                .ok_or_else(|| "no address on the bridge for the RDP forward".to_string())?;
            dev(&[
                ("type", "proxy"),
                ("listen", &format!("tcp:{listen}:{}", spec.rdp_port)),
                ("connect", &format!("tcp:{addr}:3389")),
                ("nat", "true"),
            ])
        }
        SshForward::Proxy { listen } => dev(&[
            ("type", "proxy"),
            ("listen", &format!("tcp:{listen}:{}", spec.rdp_port)),
            ("connect", "tcp:127.0.0.1:3389"),
            ("bind", "host"),
        ]),
    };
    devices.insert(format!("{DEVICE_PREFIX}rdp"), d);
    Ok(())
}

/// GPU devices and the NVIDIA driver's user-space.
fn gpus(
    spec: &InstanceSpec,
    host: &HostContext,
    config: &mut BTreeMap<String, String>,
    devices: &mut BTreeMap<String, Device>,
) -> Result<(), String> {
    match &host.gpu_mode {
        GpuMode::Pci => {
            for (i, pci) in spec.gpu_pci.iter().enumerate() {
                devices.insert(
                    format!("{DEVICE_PREFIX}gpu{i}"),
                    dev(&[("type", "gpu"), ("gputype", "physical"), ("pci", pci)]),
                );
            }
        }
        GpuMode::DeviceNodes { minors, control } => {
            for (i, pci) in spec.gpu_pci.iter().enumerate() {
                let minor = minors
                    .get(pci)
                    .ok_or_else(|| format!("GPU {pci} is not in this host's inventory"))?;
                devices.insert(
                    format!("{DEVICE_PREFIX}gpu{i}"),
                    dev(&[
                        ("type", "unix-char"),
                        ("source", &format!("/dev/nvidia{minor}")),
                        ("path", &format!("/dev/nvidia{i}")),
                        ("mode", "0666"),
                    ]),
                );
            }
            if !spec.gpu_pci.is_empty() {
                for node in control {
                    devices.insert(
                        format!("{DEVICE_PREFIX}{node}"),
                        dev(&[
                            ("type", "unix-char"),
                            ("source", &format!("/dev/{node}")),
                            ("path", &format!("/dev/{node}")),
                            ("mode", "0666"),
                        ]),
                    );
                }
            }
        }
    }
    if !spec.gpu_pci.is_empty() {
        match &host.nvidia {
            Userspace::Off => {}
            Userspace::Runtime => {
                config.insert("nvidia.runtime".into(), "true".into());
                config.insert(
                    "nvidia.driver.capabilities".into(),
                    "compute,utility".into(),
                );
            }
            Userspace::Bind { dir } => {
                devices.insert(
                    crate::nvidia::DEVICE.into(),
                    dev(&[
                        ("type", "disk"),
                        ("source", dir),
                        ("path", crate::nvidia::MOUNT_PATH),
                        ("readonly", "true"),
                    ]),
                );
            }
        }
    }
    Ok(())
}

/// Merges the rendered config into an instance's current config: managed keys
/// are set or removed, every other key is kept.
pub fn merge_config(current: &BTreeMap<String, String>, r: &Rendered) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = current
        .iter()
        .filter(|(k, _)| !MANAGED_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(r.config.clone());
    out
}

/// Merges devices: ssp's devices replace every `ssp-*` device, the root disk and
/// the NIC it overrides. GPUs and SSH are ssp's alone: a device of another name
/// that passes a GPU or forwards a host port to port 22 goes too (an adopted
/// container's hand-made ones, or one added by hand since).
pub fn merge_devices(current: &BTreeMap<String, Device>, r: &Rendered) -> BTreeMap<String, Device> {
    let mut out: BTreeMap<String, Device> = current
        .iter()
        .filter(|(k, d)| {
            !(k.starts_with(DEVICE_PREFIX)
                || k.as_str() == "root"
                || r.devices.contains_key(*k)
                || crate::adopt::is_gpu_device(d)
                || crate::adopt::ssh_proxy_port(d).is_some())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(r.devices.clone());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_proto::SharedFolder;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            name: "alice".into(),
            owner: "alice".into(),
            owner_uid: 10000,
            ssh_keys: vec![],
            image: "debian-ssh".into(),
            cpus: 2,
            memory_bytes: 4 << 30,
            disk_bytes: 10 << 30,
            processes: 2000,
            gpu_pci: vec!["0000:19:00.0".into(), "0000:1a:00.0".into()],
            ssh_port: 22005,
            shares: vec![
                SharedFolder {
                    host_path: "/srv/ssp/shared/team".into(),
                    container_path: "/shared".into(),
                    mode: "rw".into(),
                },
                SharedFolder {
                    host_path: "/srv/ssp/shared/papers".into(),
                    container_path: "/papers".into(),
                    mode: "ro".into(),
                },
            ],
            running: true,
            uid_range: "10000-19999".into(),
            lab_gid: 19999,
            ..Default::default()
        }
    }

    fn nodes_ctx() -> HostContext {
        HostContext {
            pool: "default".into(),
            ssh: SshForward::Proxy {
                listen: "0.0.0.0".into(),
            },
            gpu_mode: GpuMode::DeviceNodes {
                minors: [
                    ("0000:17:00.0", 0),
                    ("0000:18:00.0", 1),
                    ("0000:19:00.0", 2),
                    ("0000:1a:00.0", 3),
                ]
                .into_iter()
                .map(|(p, m)| (p.to_string(), m))
                .collect(),
                control: vec!["nvidiactl".into(), "nvidia-uvm".into()],
            },
            nvidia: Userspace::Off,
            members_dir: Some("/var/lib/ssp-agent/extrausers".into()),
            lan: None,
        }
    }

    #[test]
    fn driver_userspace_by_runtime_or_bind_only_for_gpu_containers() {
        let off = render(&spec(), &nodes_ctx(), None).unwrap();
        assert!(!off.devices.contains_key("ssp-nvidia"));
        assert!(!off.config.keys().any(|k| k.starts_with("nvidia.")));
        let runtime = HostContext {
            nvidia: Userspace::Runtime,
            ..nodes_ctx()
        };
        let r = render(&spec(), &runtime, None).unwrap();
        assert_eq!(r.config["nvidia.runtime"], "true");
        assert_eq!(r.config["nvidia.driver.capabilities"], "compute,utility");
        assert!(!r.devices.contains_key("ssp-nvidia"));
        let bind = HostContext {
            nvidia: Userspace::Bind {
                dir: "/var/lib/ssp-agent/nvidia/580.159.04".into(),
            },
            ..nodes_ctx()
        };
        let b = render(&spec(), &bind, None).unwrap();
        let d = &b.devices["ssp-nvidia"];
        assert_eq!(d["type"], "disk");
        assert_eq!(d["source"], "/var/lib/ssp-agent/nvidia/580.159.04");
        assert_eq!(d["path"], "/usr/local/lib/ssp-nvidia");
        assert_eq!(d["readonly"], "true");
        assert!(!b.config.contains_key("nvidia.runtime"));
        // Without GPUs, neither; and a key left from runtime mode is removed on merge.
        let mut s = spec();
        s.gpu_pci.clear();
        for ctx in [&runtime, &bind] {
            let n = render(&s, ctx, None).unwrap();
            assert!(!n.devices.contains_key("ssp-nvidia"));
            assert!(!n.config.contains_key("nvidia.runtime"));
            let merged = merge_config(&r.config, &n);
            assert!(!merged.contains_key("nvidia.runtime"));
            assert!(!merged.contains_key("nvidia.driver.capabilities"));
        }
        // A driver upgrade changes only the device's source.
        let up = HostContext {
            nvidia: Userspace::Bind {
                dir: "/var/lib/ssp-agent/nvidia/580.200.01".into(),
            },
            ..nodes_ctx()
        };
        let u = render(&spec(), &up, None).unwrap();
        assert_eq!(u.config, b.config);
        assert_eq!(
            u.devices["ssp-nvidia"]["source"],
            "/var/lib/ssp-agent/nvidia/580.200.01"
        );
    }

    #[test]
    fn device_nodes_are_renumbered_from_zero() {
        let r = render(&spec(), &nodes_ctx(), None).unwrap();
        let g0 = &r.devices["ssp-gpu0"];
        assert_eq!(
            (g0["source"].as_str(), g0["path"].as_str()),
            ("/dev/nvidia2", "/dev/nvidia0")
        );
        let g1 = &r.devices["ssp-gpu1"];
        assert_eq!(
            (g1["source"].as_str(), g1["path"].as_str()),
            ("/dev/nvidia3", "/dev/nvidia1")
        );
        assert!(
            r.devices.contains_key("ssp-nvidiactl") && r.devices.contains_key("ssp-nvidia-uvm")
        );
        assert_eq!(r.config["limits.memory"], "4096MiB");
        assert_eq!(r.config["security.idmap.isolated"], "true");
        assert_eq!(r.devices["ssp-ssh"]["listen"], "tcp:0.0.0.0:22005");
        assert_eq!(r.devices["root"]["size"], "10240MiB");
        assert_eq!(r.devices["ssp-share0"]["source"], "/srv/ssp/shared/team");
        assert!(!r.devices["ssp-share0"].contains_key("readonly"));
        assert_eq!(r.devices["ssp-share1"]["readonly"], "true");
    }

    #[test]
    fn pci_mode_uses_gpu_devices_by_address_never_id() {
        let ctx = HostContext {
            gpu_mode: GpuMode::Pci,
            ..nodes_ctx()
        };
        let r = render(&spec(), &ctx, None).unwrap();
        let g = &r.devices["ssp-gpu0"];
        assert_eq!(g["type"], "gpu");
        assert_eq!(g["pci"], "0000:19:00.0");
        assert!(!g.contains_key("id"));
        assert!(!r.devices.contains_key("ssp-nvidiactl"));
    }

    #[test]
    fn no_gpus_no_control_nodes() {
        let mut s = spec();
        s.gpu_pci.clear();
        let r = render(&s, &nodes_ctx(), None).unwrap();
        assert!(!r
            .devices
            .keys()
            .any(|k| k.contains("nvidia") || k.contains("gpu")));
    }

    #[test]
    fn unknown_gpu_is_an_error() {
        let mut s = spec();
        s.gpu_pci = vec!["0000:99:00.0".into()];
        assert!(render(&s, &nodes_ctx(), None)
            .unwrap_err()
            .contains("0000:99:00.0"));
    }

    #[test]
    fn merge_keeps_foreign_keys_and_replaces_ours() {
        let r = render(&spec(), &nodes_ctx(), None).unwrap();
        let current: BTreeMap<String, String> = [
            ("limits.cpu", "8"),
            ("volatile.uuid", "u1"),
            ("user.note", "x"),
            ("limits.memory.swap", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = merge_config(&current, &r);
        assert_eq!(m["limits.cpu"], "2");
        assert_eq!(m["volatile.uuid"], "u1");
        assert_eq!(m["user.note"], "x");
        let mut devs = BTreeMap::new();
        devs.insert("ssp-gpu7".to_string(), dev(&[("type", "gpu")]));
        devs.insert("mine".to_string(), dev(&[("type", "disk")]));
        // GPUs and SSH forwards added by hand give way to ssp's; other proxies stay.
        devs.insert(
            "hand-gpu".to_string(),
            dev(&[("type", "gpu"), ("pci", "17:00.0")]),
        );
        devs.insert(
            "hand-node".to_string(),
            dev(&[("type", "unix-char"), ("source", "/dev/nvidia0")]),
        );
        devs.insert(
            "hand-ssh".to_string(),
            dev(&[
                ("type", "proxy"),
                ("listen", "tcp:0.0.0.0:60601"),
                ("connect", "tcp:127.0.0.1:22"),
            ]),
        );
        devs.insert(
            "web".to_string(),
            dev(&[
                ("type", "proxy"),
                ("listen", "tcp:0.0.0.0:8080"),
                ("connect", "tcp:127.0.0.1:80"),
            ]),
        );
        let d = merge_devices(&devs, &r);
        assert!(
            !d.contains_key("ssp-gpu7") && d.contains_key("mine") && d.contains_key("ssp-gpu0")
        );
        assert!(
            !d.contains_key("hand-gpu")
                && !d.contains_key("hand-node")
                && !d.contains_key("hand-ssh")
        );
        assert!(d.contains_key("web"));
    }

    #[test]
    fn hash_changes_with_the_spec() {
        let a = render(&spec(), &nodes_ctx(), None).unwrap();
        let mut s = spec();
        s.cpus = 3;
        let b = render(&s, &nodes_ctx(), None).unwrap();
        assert_ne!(
            a.config["user.ssp.spec-hash"],
            b.config["user.ssp.spec-hash"]
        );
        assert_eq!(a, render(&spec(), &nodes_ctx(), None).unwrap());
    }

    #[test]
    fn the_idmap_holds_the_owner_and_the_lab_group_only() {
        let r = render(&spec(), &nodes_ctx(), None).unwrap();
        assert_eq!(r.config["raw.idmap"], "both 10000 10000\ngid 19999 19999");
        assert_eq!(r.config["security.idmap.isolated"], "true");
        let mut s = spec();
        s.owner_uid = 10042;
        assert_eq!(
            idmap(&s).as_deref(),
            Some("both 10042 10042\ngid 19999 19999")
        );
        // A spec from a coordinator older than lab groups: the owner only.
        s.lab_gid = 0;
        assert_eq!(idmap(&s).as_deref(), Some("both 10042 10042"));
        // Ids outside the spec's range, or no range, map nothing: never the
        // host's root or system ids.
        for (uid, gid, range) in [
            (0, 0, "10000-19999"),
            (5, 19999999, "10000-19999"),
            (10042, 19999, ""),
            (10042, 19999, "junk"),
        ] {
            let s = InstanceSpec {
                owner_uid: uid,
                lab_gid: gid,
                uid_range: range.into(),
                ..spec()
            };
            assert_eq!(idmap(&s), None, "{uid} {gid} {range:?}");
            assert!(!render(&s, &nodes_ctx(), None)
                .unwrap()
                .config
                .contains_key("raw.idmap"));
        }
    }

    #[test]
    fn a_common_server_maps_the_whole_lab_range() {
        let s = InstanceSpec {
            common: true,
            owner_uid: 10007,
            ..spec()
        };
        assert_eq!(idmap(&s).as_deref(), Some("both 10000-19999 10000-19999"));
        for range in ["", "junk", "19999-10000"] {
            let s = InstanceSpec {
                uid_range: range.into(),
                ..s.clone()
            };
            assert_eq!(idmap(&s), None, "{range:?}");
        }
    }

    #[test]
    fn every_container_mounts_the_members_folder_read_only() {
        let r = render(&spec(), &nodes_ctx(), None).unwrap();
        let d = &r.devices["ssp-members"];
        assert_eq!(d["type"], "disk");
        assert_eq!(d["source"], "/var/lib/ssp-agent/extrausers");
        assert_eq!(d["path"], "/var/lib/extrausers");
        assert_eq!(d["readonly"], "true");
        let none = HostContext {
            members_dir: None,
            ..nodes_ctx()
        };
        assert!(!render(&spec(), &none, None)
            .unwrap()
            .devices
            .contains_key("ssp-members"));
    }

    fn nat_ctx() -> HostContext {
        HostContext {
            ssh: SshForward::Nat {
                listen: "192.0.2.7".parse().unwrap(),
                nic_name: "eth0".into(),
                nic: dev(&[("type", "nic"), ("network", "sspbr0"), ("name", "eth0")]),
                subnet: Subnet::parse("10.211.0.1/24").unwrap(),
            },
            ..nodes_ctx()
        }
    }

    #[test]
    fn a_lan_container_gets_the_lan_nic_in_place_of_the_bridge_and_no_forward() {
        let lan_spec = InstanceSpec {
            network: "lan".into(),
            hwaddr: "02:73:00:00:27:10".into(),
            ..spec()
        };
        let ctx = HostContext {
            lan: Some(LanNic {
                parent: "eno1".into(),
                nictype: LanNicType::Macvlan,
            }),
            ..nat_ctx()
        };
        let r = render(&lan_spec, &ctx, None).unwrap();
        let nic = &r.devices["eth0"];
        assert_eq!(nic["nictype"], "macvlan");
        assert_eq!(nic["parent"], "eno1");
        assert_eq!(nic["hwaddr"], "02:73:00:00:27:10");
        assert_eq!(nic["name"], "eth0");
        assert!(!nic.contains_key("network") && !nic.contains_key("ipv4.address"));
        assert!(
            !r.devices.contains_key("ssp-ssh"),
            "no forward from the host"
        );
        // A host without [lan] refuses the spec, naming why.
        let err = render(&lan_spec, &nat_ctx(), None).unwrap_err();
        assert!(err.contains("[lan]"), "{err}");
        // Merged over a container that had the bridge NIC and the forward: both go.
        let mut current = BTreeMap::new();
        current.insert(
            "eth0".to_string(),
            dev(&[
                ("type", "nic"),
                ("network", "sspbr0"),
                ("ipv4.address", "10.211.0.254"),
            ]),
        );
        current.insert("ssp-ssh".to_string(), dev(&[("type", "proxy")]));
        let d = merge_devices(&current, &r);
        assert_eq!(d["eth0"]["nictype"], "macvlan");
        assert!(!d.contains_key("ssp-ssh"));
        // The forward spec's hash differs: the agent notices a change of mode.
        assert_ne!(ssp_wire::spec_hash(&lan_spec), ssp_wire::spec_hash(&spec()));
    }

    #[test]
    fn a_desktop_gets_its_rdp_port_forwarded_like_ssh() {
        let desk = InstanceSpec {
            desktop: true,
            rdp_port: 23005,
            ..spec()
        };
        let r = render(&desk, &nat_ctx(), Some("10.211.0.254".parse().unwrap())).unwrap();
        let rdp = &r.devices["ssp-rdp"];
        assert_eq!(rdp["listen"], "tcp:192.0.2.7:23005");
        assert_eq!(rdp["connect"], "tcp:10.211.0.254:3389");
        assert_eq!(rdp["nat"], "true");
        let r = render(&desk, &nodes_ctx(), None).unwrap();
        assert_eq!(r.devices["ssp-rdp"]["connect"], "tcp:127.0.0.1:3389");
        // Not a desktop, or on the LAN (its own address): no forward.
        let r = render(&spec(), &nat_ctx(), Some("10.211.0.254".parse().unwrap())).unwrap();
        assert!(!r.devices.contains_key("ssp-rdp"));
        let lan = HostContext {
            lan: Some(LanNic {
                parent: "eno1".into(),
                nictype: LanNicType::Macvlan,
            }),
            ..nat_ctx()
        };
        let on_lan = InstanceSpec {
            network: "lan".into(),
            ..desk
        };
        assert!(!render(&on_lan, &lan, None)
            .unwrap()
            .devices
            .contains_key("ssp-rdp"));
    }

    #[test]
    fn nat_forward_overrides_the_nic_with_a_static_address() {
        let r = render(&spec(), &nat_ctx(), Some("10.211.0.254".parse().unwrap())).unwrap();
        let ssh = &r.devices["ssp-ssh"];
        assert_eq!(ssh["listen"], "tcp:192.0.2.7:22005");
        assert_eq!(ssh["connect"], "tcp:10.211.0.254:22");
        assert_eq!(ssh["nat"], "true");
        assert!(!ssh.contains_key("bind"));
        let nic = &r.devices["eth0"];
        assert_eq!(nic["ipv4.address"], "10.211.0.254");
        assert_eq!(nic["network"], "sspbr0");
        // Without an address, or with one outside the bridge's subnet, it refuses.
        assert!(render(&spec(), &nat_ctx(), None).is_err());
        assert!(render(&spec(), &nat_ctx(), Some("10.9.0.5".parse().unwrap())).is_err());
        // The overridden NIC is replaced on merge; other devices are kept.
        let mut current = BTreeMap::new();
        current.insert(
            "eth0".to_string(),
            dev(&[("type", "nic"), ("network", "x")]),
        );
        current.insert("mine".to_string(), dev(&[("type", "disk")]));
        let d = merge_devices(&current, &r);
        assert_eq!(d["eth0"]["network"], "sspbr0");
        assert!(d.contains_key("mine"));
    }

    #[test]
    fn addresses_are_picked_from_the_top_never_gateway_network_or_broadcast() {
        let s = Subnet::parse("10.211.0.1/24").unwrap();
        let mut used = std::collections::BTreeSet::new();
        assert_eq!(s.pick(&used), Some("10.211.0.254".parse().unwrap()));
        used.insert("10.211.0.254".parse().unwrap());
        assert_eq!(s.pick(&used), Some("10.211.0.253".parse().unwrap()));
        for a in ["10.211.0.0", "10.211.0.1", "10.211.0.255", "10.211.1.5"] {
            assert!(!s.usable(a.parse().unwrap()), "{a}");
        }
        // A /30 has two host addresses; one is the gateway.
        let small = Subnet::parse("10.0.0.1/30").unwrap();
        assert_eq!(
            small.pick(&Default::default()),
            Some("10.0.0.2".parse().unwrap())
        );
        let full: std::collections::BTreeSet<_> = ["10.0.0.2".parse().unwrap()].into();
        assert_eq!(small.pick(&full), None);
        assert!(Subnet::parse("10.0.0.1").is_none() && Subnet::parse("10.0.0.1/31").is_none());
    }
}
