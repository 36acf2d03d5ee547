//! Domain records kept in the coordinator's state.

use serde::{Deserialize, Serialize};

use crate::names::{
    ByteSize, Endpoint, HostName, InputError, NetAddress, PciAddress, SharedFolder, SshKey,
    Username,
};

/// One GPU of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub pci: PciAddress,
    pub model: String,
    pub memory_bytes: u64,
    /// Minor number of the host's /dev/nvidiaN node.
    pub minor: u32,
    pub device_node: String,
}

/// A storage pool on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub driver: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// The pool the host's agent makes containers in (absent from older records).
    #[serde(default)]
    pub ssp: bool,
}

impl Pool {
    /// Use is recorded in steps of this much (or 1/256 of the pool, if more), so a
    /// container writing does not change its host's record at every heartbeat.
    pub const USE_STEP: u64 = 64 << 20;

    /// `used_bytes` rounded up to a step (never past the pool's size, never below
    /// the use itself): what the replicated record keeps.
    pub fn with_rounded_use(mut self) -> Self {
        let step = Self::USE_STEP.max(self.total_bytes / 256);
        let raw = self.used_bytes;
        self.used_bytes = raw
            .div_ceil(step)
            .saturating_mul(step)
            .min(self.total_bytes)
            .max(raw);
        self
    }
}

impl Inventory {
    /// The pool containers are made in: the agent's, else (older agents) the largest.
    pub fn ssp_pool(&self) -> Option<&Pool> {
        self.pools
            .iter()
            .find(|p| p.ssp)
            .or_else(|| self.pools.iter().max_by_key(|p| p.total_bytes))
    }
}

/// An image in a host's daemon.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Image {
    /// The full sha256 fingerprint, lower-case hex.
    pub fingerprint: String,
    /// The image's aliases, sorted.
    pub aliases: Vec<String>,
}

/// Shortest fingerprint prefix a request may name an image by.
pub const MIN_FINGERPRINT_PREFIX: usize = 12;

impl Image {
    /// True when `name` is one of the aliases, the fingerprint, or a prefix of the
    /// fingerprint of at least [`MIN_FINGERPRINT_PREFIX`] hex digits.
    pub fn matches(&self, name: &str) -> bool {
        self.aliases.iter().any(|a| a == name)
            || (name.len() >= MIN_FINGERPRINT_PREFIX
                && name.chars().all(|c| c.is_ascii_hexdigit())
                && self
                    .fingerprint
                    .starts_with(name.to_ascii_lowercase().as_str()))
    }

    /// How people know the image: its aliases, or the start of its fingerprint.
    pub fn label(&self) -> String {
        if self.aliases.is_empty() {
            self.fingerprint
                .chars()
                .take(MIN_FINGERPRINT_PREFIX)
                .collect()
        } else {
            self.aliases.join(", ")
        }
    }
}

/// What an agent reports about its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Inventory {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub pools: Vec<Pool>,
    pub gpus: Vec<Gpu>,
    pub gpu_source: String,
    pub daemon: String,
    pub daemon_version: String,
    pub driver_version: String,
    /// The daemon's images, sorted by fingerprint; containers are made only from these.
    /// `None` in a record from an agent that did not report images (one older than
    /// image-aware placement): placement does not check them there, so the log entries
    /// applied before image reports existed give the same result when replayed.
    #[serde(default)]
    pub images: Option<Vec<Image>>,
}

impl Inventory {
    /// True when the daemon has an image called `name` (alias or fingerprint), or
    /// when the host never reported its images.
    pub fn has_image(&self, name: &str) -> bool {
        self.images
            .as_ref()
            .is_none_or(|l| l.iter().any(|i| i.matches(name)))
    }
}

/// A registered GPU host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: HostName,
    /// Where the coordinator reaches the agent (`http://ip:port`).
    pub agent_address: Endpoint,
    /// The address users ssh to.
    pub ssh_host: NetAddress,
    /// Inclusive range of host ports for SSH proxies.
    pub ssh_ports: (u16, u16),
    pub inventory: Inventory,
    /// Set by `SetHostStatus` only; registrations keep it.
    #[serde(default)]
    pub status: HostStatus,
    /// Labels the host's agent declares (e.g. `ib`, `nvlink`); requests may require them.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Ports of `ssh_ports` that something other than ssp's containers holds on the
    /// host (another container's proxy device, a host process), sorted; never allocated.
    #[serde(default)]
    pub foreign_ports: Vec<u16>,
    /// The LAN the agent's `[lan]` parent interface is on: containers in LAN mode
    /// can be placed here (and moved between hosts of the same LAN).
    #[serde(default)]
    pub lan: Option<String>,
    /// The public key the host's agent logs in to the relay with (OpenSSH
    /// format), for the relay's authorized_keys.
    #[serde(default)]
    pub relay_key: Option<String>,
    /// Host ports for remote desktops (RDP), as long a range as `ssh_ports`: a
    /// desktop container's is the one at its SSH port's place in it.
    #[serde(default)]
    pub rdp_ports: Option<(u16, u16)>,
    /// What the host's agent found wrong with it for containers (cgroup
    /// controllers, kernel or daemon limits short of what it is meant to hold);
    /// `sspctl hosts` shows them. Placement does not read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Host {
    /// The RDP port that goes with SSH port `ssh_port` here, if the host has one.
    pub fn rdp_port(&self, ssh_port: u16) -> Option<u16> {
        let (first, last) = self.rdp_ports?;
        let p = u32::from(first) + u32::from(ssh_port.checked_sub(self.ssh_ports.0)?);
        (p <= u32::from(last)).then_some(p as u16)
    }
}

/// The admin's relay for access from outside the LAN: each host's agent keeps a
/// tunnel there per container, from the container's relay port to its SSH: an
/// OpenSSH reverse tunnel, or a proxy of frp's client (frpc) to the relay's frps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relay {
    /// Where users and agents reach the relay.
    pub host: NetAddress,
    /// The port the agents connect to: the relay's sshd, or frps's bindPort.
    pub port: u16,
    /// The account the agents log in as (a Unix name on the relay; OpenSSH only).
    pub user: String,
    /// Inclusive range of relay ports, one per container.
    pub ports: (u16, u16),
    #[serde(default)]
    pub kind: RelayKind,
    /// frp: the token frps expects (its `auth.token`).
    #[serde(default)]
    pub token: String,
}

/// How the agents reach the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayKind {
    /// OpenSSH reverse tunnels (`ssh -N -R`), one per container.
    #[default]
    Ssh,
    /// frp: one frpc per host with a proxy per container.
    Frp,
}

impl RelayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Ssh => "ssh",
            RelayKind::Frp => "frp",
        }
    }
}

/// Whether a host takes new containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    #[default]
    Ready,
    /// An admin asked that no new containers go there; existing ones stay.
    Draining,
    /// The agent stopped heartbeating; its containers show as unavailable.
    Down,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Ready => "ready",
            HostStatus::Draining => "draining",
            HostStatus::Down => "down",
        }
    }

    /// Parses "ready", "draining" or "down".
    pub fn parse(s: &str) -> Result<Self, crate::InputError> {
        match s {
            "ready" => Ok(HostStatus::Ready),
            "draining" => Ok(HostStatus::Draining),
            "down" => Ok(HostStatus::Down),
            _ => Err(crate::InputError::new(
                "host status",
                s,
                "expected ready, draining or down",
            )),
        }
    }
}

/// Role of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self, crate::InputError> {
        match s {
            "" | "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            _ => Err(crate::InputError::new(
                "role",
                s,
                "allowed roles are user and admin",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// What a certificate issued by the cluster CA lets its holder do.
///
/// `admin`: everything; `user`: their own containers, keys and ssh-config and a
/// read-only view of GPU occupancy; `coordinator`: raft, membership and driving
/// agents; `agent`: registering its own host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    Admin,
    User,
    Coordinator,
    Agent,
}

impl CertRole {
    pub const ALL: [CertRole; 4] = [
        CertRole::Admin,
        CertRole::User,
        CertRole::Coordinator,
        CertRole::Agent,
    ];

    pub fn parse(s: &str) -> Result<Self, crate::InputError> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| crate::InputError {
                what: "role",
                value: s.into(),
                reason: "allowed roles are admin, user, coordinator and agent".into(),
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Admin => "admin",
            CertRole::User => "user",
            CertRole::Coordinator => "coordinator",
            CertRole::Agent => "agent",
        }
    }
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource limits of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub cpus: u32,
    pub memory: ByteSize,
    pub disk: ByteSize,
    pub processes: u32,
}

/// A person with an account on the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: Username,
    /// Host uid; the same uid inside every container, so shared files keep their owner.
    pub uid: u32,
    pub role: Role,
    pub ssh_keys: Vec<SshKey>,
    pub limits: Limits,
    pub gpus: u32,
    /// Scheduled snapshots of their containers (absent from older records: none).
    #[serde(default)]
    pub snapshots: SnapshotSchedule,
    /// A person with a container, a Common-Server, or a person with an account in
    /// one (absent from older records: a person with a container).
    #[serde(default)]
    pub kind: UserKind,
}

impl User {
    /// The Common-Server this person has an account in, if that is what they have.
    pub fn server(&self) -> Option<&Username> {
        match &self.kind {
            UserKind::Account { server } => Some(server),
            _ => None,
        }
    }
}

/// What a user record stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserKind {
    /// A person with a container of their own, named after them.
    #[default]
    Personal,
    /// A Common-Server: a shared container (named after the record) whose GPUs its
    /// accounts share. It has no owner account and no keys of its own.
    Common,
    /// A person with a Unix account in a Common-Server instead of a container.
    Account { server: Username },
}

impl UserKind {
    /// "personal", "common" or "account".
    pub fn as_str(&self) -> &'static str {
        match self {
            UserKind::Personal => "personal",
            UserKind::Common => "common",
            UserKind::Account { .. } => "account",
        }
    }
}

/// A snapshot schedule: one snapshot every `every_secs`, the newest `keep` kept.
/// The agents take and prune them (also while no coordinator answers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSchedule {
    /// 0: no scheduled snapshots.
    pub every_secs: u64,
    pub keep: u32,
}

impl SnapshotSchedule {
    /// The shortest interval allowed.
    pub const MIN_EVERY_SECS: u64 = 5;
    /// The most scheduled snapshots kept.
    pub const MAX_KEEP: u32 = 1000;

    /// A schedule, checked: `every_secs` 0 turns it off (then `keep` is ignored).
    pub fn new(every_secs: u64, keep: u32) -> Result<Self, InputError> {
        if every_secs == 0 {
            return Ok(Self::default());
        }
        if every_secs < Self::MIN_EVERY_SECS {
            return Err(InputError::new(
                "snapshot interval",
                &format!("{every_secs}s"),
                format!("at least {}s, or 0 for no schedule", Self::MIN_EVERY_SECS),
            ));
        }
        if keep == 0 || keep > Self::MAX_KEEP {
            return Err(InputError::new(
                "snapshots to keep",
                &keep.to_string(),
                format!("1 to {}", Self::MAX_KEEP),
            ));
        }
        Ok(Self { every_secs, keep })
    }
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub owner: Username,
    pub host: HostName,
    /// Host GPUs in container order: the first is GPU 0 inside.
    pub gpus: Vec<PciAddress>,
    pub ssh_port: u16,
    pub limits: Limits,
    pub image: String,
    pub shares: Vec<SharedFolder>,
    /// Marked for removal: the reconciler deletes the container, then forgets it.
    /// Its GPUs and port stay held until then.
    #[serde(default)]
    pub deleting: bool,
    /// The GPU model, GPU memory and labels asked for when it was made; a move
    /// places it under the same (absent from records written before moves).
    #[serde(default)]
    pub placement: Constraints,
    /// How it is reached (absent from older records: a forwarded SSH port).
    #[serde(default)]
    pub network: Network,
    /// On a LAN with an admin's pool: its static address there, from the pool
    /// (`None`: the LAN's DHCP server gives it one, or it is not on a LAN).
    #[serde(default)]
    pub lan_address: Option<std::net::Ipv4Addr>,
    /// Its port on the relay (when the lab has one): users outside the LAN reach
    /// its SSH there, through its host's reverse tunnel.
    #[serde(default)]
    pub relay_port: Option<u16>,
    /// A remote desktop (xrdp with Xfce, from the image) with its RDP port forwarded.
    #[serde(default)]
    pub desktop: bool,
}

/// An admin's pool of static addresses on a LAN (`sspctl lan set`): containers
/// there get one each, never one given to another, instead of asking the LAN's
/// DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanPool {
    pub first: std::net::Ipv4Addr,
    pub last: std::net::Ipv4Addr,
    /// The LAN's prefix length (its netmask), e.g. 24.
    pub prefix: u8,
    /// The LAN's router, if containers should have a default route.
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl LanPool {
    /// The most addresses a pool may hold.
    pub const MAX: u32 = 65536;

    /// A pool, checked: `first..=last` inside one subnet of `prefix`, neither its
    /// network nor broadcast address, and the gateway (if any) in it but not in the range.
    pub fn new(
        first: std::net::Ipv4Addr,
        last: std::net::Ipv4Addr,
        prefix: u8,
        gateway: Option<std::net::Ipv4Addr>,
    ) -> Result<Self, InputError> {
        let shown = format!("{first}-{last}/{prefix}");
        let bad = |why: String| Err(InputError::new("address pool", &shown, why));
        if !(8..=30).contains(&prefix) {
            return bad("the prefix length must be 8 to 30, e.g. /24".into());
        }
        let (a, b) = (u32::from(first), u32::from(last));
        let mask = u32::MAX << (32 - u32::from(prefix));
        if a > b {
            return bad("the first address must not be above the last".into());
        }
        if a & mask != b & mask {
            return bad(format!("both ends must be in one /{prefix} subnet"));
        }
        if a & !mask == 0 || b & !mask == !mask {
            return bad("the subnet's network and broadcast addresses cannot be given out".into());
        }
        if b - a >= Self::MAX {
            return bad(format!("at most {} addresses", Self::MAX));
        }
        if let Some(g) = gateway {
            let g32 = u32::from(g);
            if g32 & mask != a & mask {
                return bad(format!("the gateway {g} is not in the pool's subnet"));
            }
            if (a..=b).contains(&g32) {
                return bad(format!("the gateway {g} is inside the range"));
            }
        }
        Ok(LanPool {
            first,
            last,
            prefix,
            gateway,
        })
    }

    pub fn contains(&self, a: std::net::Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(a))
    }
}

impl std::fmt::Display for LanPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}/{}", self.first, self.last, self.prefix)
    }
}

/// How a container is reached from the lab.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// SSH forwarded from a port of its host (`ssh_port`).
    #[default]
    Forward,
    /// Its own address on the host's LAN (a bridged or macvlan NIC on the parent
    /// the host's agent names), from the LAN's DHCP server; SSH on port 22 there.
    Lan,
}

impl Network {
    /// Parses "forward" (or "") and "lan".
    pub fn parse(s: &str) -> Result<Self, InputError> {
        match s {
            "" | "forward" => Ok(Network::Forward),
            "lan" => Ok(Network::Lan),
            _ => Err(InputError::new(
                "network",
                s,
                "expected forward (SSH through a port of the host) or lan (its own address on the host's LAN)",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Network::Forward => "forward",
            Network::Lan => "lan",
        }
    }
}

/// A validated request to add a user (defaults already filled in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUser {
    pub name: Username,
    pub role: Role,
    pub ssh_keys: Vec<SshKey>,
    pub limits: Limits,
    pub gpus: u32,
    pub image: String,
    pub shares: Vec<SharedFolder>,
    /// Where the container may go, beyond capacity.
    #[serde(default)]
    pub placement: Constraints,
    /// A person with a container, a Common-Server, or an account in one (then no
    /// container is placed and limits, GPUs, image and shares are not used).
    #[serde(default)]
    pub kind: UserKind,
    /// How the container is reached.
    #[serde(default)]
    pub network: Network,
    /// A remote desktop: only hosts with RDP ports.
    #[serde(default)]
    pub desktop: bool,
}

/// Placement constraints of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraints {
    /// Only GPUs whose model name contains this (case-insensitive), e.g. "A100".
    pub gpu_model: Option<String>,
    /// Only GPUs with at least this much memory.
    pub gpu_memory: Option<u64>,
    /// Only this host.
    pub host: Option<HostName>,
    /// Spread: prefer the host with the most free GPUs (default: pack onto the fullest).
    pub spread: bool,
    /// Only hosts that carry every one of these labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Only hosts on a LAN (a container in LAN mode): this one, or any when empty.
    /// A placed LAN container records its host's LAN here, so a move stays on it.
    #[serde(default)]
    pub lan: Option<String>,
    /// Only hosts with RDP ports (a desktop container).
    #[serde(default)]
    pub desktop: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_use_is_kept_in_steps_within_the_pool() {
        let pool = |total_bytes, used_bytes| Pool {
            name: "default".into(),
            driver: "btrfs".into(),
            total_bytes,
            used_bytes,
            ssp: true,
        };
        const MIB: u64 = 1 << 20;
        // 12 GiB: steps of 64 MiB (1/256 is 48 MiB).
        assert_eq!(pool(12 << 30, 0).with_rounded_use().used_bytes, 0);
        assert_eq!(pool(12 << 30, 1).with_rounded_use().used_bytes, 64 * MIB);
        assert_eq!(
            pool(12 << 30, 64 * MIB).with_rounded_use().used_bytes,
            64 * MIB
        );
        assert_eq!(
            pool(12 << 30, 65 * MIB).with_rounded_use().used_bytes,
            128 * MIB
        );
        // 1 TiB: steps of 4 GiB.
        assert_eq!(pool(1 << 40, 1).with_rounded_use().used_bytes, 4 << 30);
        // Never past the size, never below the use.
        assert_eq!(
            pool(100 * MIB, 99 * MIB).with_rounded_use().used_bytes,
            100 * MIB
        );
        assert_eq!(pool(0, 5).with_rounded_use().used_bytes, 5);
    }
}
