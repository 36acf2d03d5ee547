//! The agent's configuration file (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Agent settings; unknown keys are an error so typos do not pass silently.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in the cluster.
    pub name: String,
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How coordinators reach this agent, e.g. `http://10.0.0.5:7401`; default:
    /// `listen` when it is a specific address, else `ssh_host` with `listen`'s port.
    /// Use [`AgentConfig::advertise_address`].
    #[serde(default)]
    pub advertise: Option<String>,
    /// Every coordinator's address; the agent tries them in turn.
    pub coordinators: Vec<String>,
    /// The daemon's unix socket; default: the first of Incus's and LXD's defaults that exists.
    pub socket: Option<PathBuf>,
    /// Where SSH forwards listen on the host. NAT forwards need a specific address;
    /// with the default wildcard they listen on `ssh_host`'s address.
    #[serde(default = "default_ssh_listen")]
    pub ssh_listen: String,
    /// The address users ssh to (LAN address or name of this host).
    pub ssh_host: String,
    /// How SSH is forwarded: `nat` (default; falls back to `proxy` when the host
    /// cannot do NAT) or `proxy`, a forwarding process per container for images
    /// that do not take an address by DHCP.
    #[serde(default)]
    pub ssh_forward: ForwardMode,
    /// Inclusive range of host ports for per-container SSH.
    #[serde(default = "default_ports")]
    pub ssh_ports: (u16, u16),
    /// Inclusive range of host ports for desktop containers' RDP, at least as long
    /// as `ssh_ports`: a container's is the one at its SSH port's place.
    #[serde(default = "default_rdp_ports")]
    pub rdp_ports: (u16, u16),
    /// Shared folders of specs must lie under these (resolved, they must not lead
    /// out of them); a spec with another is refused.
    #[serde(default = "default_shared_roots")]
    pub shared_roots: Vec<PathBuf>,
    /// The lab's uid range (each container maps its owner's uid and the lab gid of
    /// it 1:1); it must be the coordinator's `uid_range`, and /etc/subuid must let
    /// root map it.
    #[serde(default = "default_uid_range")]
    pub uid_range: (u32, u32),
    /// Labels requests can ask for with `--label` (e.g. `ib`, `nvlink`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Storage pool for root disks.
    #[serde(default = "default_pool")]
    pub storage_pool: String,
    /// A static GPU inventory file, for hosts without NVML; when unset, NVML is used.
    pub gpu_inventory: Option<PathBuf>,
    /// Directory for the agent's own files.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Seconds between heartbeats to the coordinator.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// Seconds between the agent's own passes over every stored spec, which put
    /// back what was changed by hand.
    #[serde(default = "default_resync")]
    pub resync_secs: u64,
    /// How GPU containers get the NVIDIA driver's user-space (`[nvidia]`).
    #[serde(default)]
    pub nvidia: crate::nvidia::NvidiaConfig,
    /// A join token (`sspctl token create --role agent`), used once at first start
    /// when `state_dir/tls` has no certificate; `--token` overrides it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Where this host's daemon listens for moves between hosts (`ADDRESS:PORT`,
    /// set as the daemon's `core.https_address` at the first move out of this
    /// host, unless the daemon already listens somewhere). Default: `ssh_host:8443`.
    #[serde(default)]
    pub migration_address: Option<String>,
    /// The lab's LAN as this host reaches it (`[lan]`): containers in LAN mode get
    /// a NIC there with an address of their own. None: no LAN mode on this host.
    #[serde(default)]
    pub lan: Option<LanConfig>,
    /// frp's client, for a relay that runs frps (default: `frpc` on PATH).
    #[serde(default = "default_frpc")]
    pub frpc: PathBuf,
    /// The loopback port of frpc's admin API, which the agent reloads it through.
    #[serde(default = "default_frpc_admin_port")]
    pub frpc_admin_port: u16,
    /// How many containers this host is meant to hold: the kernel's and the
    /// daemon's limits are checked against it (`sspctl hosts` names a shortfall).
    #[serde(default = "default_max_containers")]
    pub max_containers: u32,
    /// The daemon's log folder, where each container's console log is
    /// (`NAME/console.log`), read to say why a container did not come up. Default:
    /// `/var/log/incus` or `/var/log/lxd` for the packaged daemons' sockets, else
    /// `logs` beside the socket (a snap's, or a daemon with its own dir).
    #[serde(default)]
    pub daemon_logs: Option<PathBuf>,
}

fn default_max_containers() -> u32 {
    crate::limits::DEFAULT_CONTAINERS
}

/// The daemon's log folder for the daemon listening on `socket` (see
/// [`AgentConfig::daemon_logs`]).
pub fn default_daemon_logs(socket: &Path) -> PathBuf {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    if dir == Path::new("/var/lib/incus") {
        "/var/log/incus".into()
    } else if dir == Path::new("/var/lib/lxd") {
        "/var/log/lxd".into()
    } else {
        dir.join("logs")
    }
}

fn default_frpc() -> PathBuf {
    "frpc".into()
}
fn default_frpc_admin_port() -> u16 {
    7402
}

/// `[lan]`: where containers in LAN mode join the lab's LAN.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanConfig {
    /// The LAN's name. Hosts with the same name are on the same LAN: a LAN
    /// container moves only between them and keeps its address there.
    pub name: String,
    /// This host's interface on the LAN: a NIC (e.g. `eno1`) or a Linux bridge
    /// (e.g. `br0`) that holds it.
    pub parent: String,
    /// `macvlan` or `bridged`; default: `bridged` when `parent` is a Linux bridge,
    /// else `macvlan` (the host itself then cannot reach its LAN containers, a
    /// property of macvlan; other machines on the LAN can).
    #[serde(default)]
    pub nictype: Option<crate::render::LanNicType>,
}

impl LanConfig {
    /// Checks the name and the interface name (not that the interface exists:
    /// that is the daemon's answer at the first LAN container, and it names it).
    pub fn check(&self) -> anyhow::Result<()> {
        ssp_model::parse_label(&self.name).map_err(|e| anyhow::anyhow!("[lan] name: {e}"))?;
        let p = &self.parent;
        if p.is_empty()
            || p.len() > 15
            || p == "."
            || p == ".."
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            anyhow::bail!(
                "[lan] parent {p:?}: expected a network interface name (1 to 15 letters, digits, '-', '_', '.' or '@'), e.g. eno1 or br0"
            );
        }
        Ok(())
    }

    /// The NIC LAN containers get: `nictype`, or what `parent` is (a bridge when
    /// `/sys/class/net/PARENT/bridge` exists).
    pub fn nic(&self) -> crate::render::LanNic {
        let nictype = self.nictype.unwrap_or_else(|| {
            if Path::new("/sys/class/net")
                .join(&self.parent)
                .join("bridge")
                .exists()
            {
                crate::render::LanNicType::Bridged
            } else {
                crate::render::LanNicType::Macvlan
            }
        });
        crate::render::LanNic {
            parent: self.parent.clone(),
            nictype,
        }
    }
}

impl AgentConfig {
    /// [`AgentConfig::migration_address`] or its default.
    pub fn migration_address(&self) -> String {
        match &self.migration_address {
            Some(a) => a.clone(),
            None => match self.ssh_host.trim().parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:8443"),
                _ => format!("{}:8443", self.ssh_host.trim()),
            },
        }
    }
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:7401".parse().expect("valid literal")
}
/// See [`AgentConfig::ssh_forward`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    #[default]
    Nat,
    Proxy,
}

fn default_ssh_listen() -> String {
    "0.0.0.0".into()
}
fn default_ports() -> (u16, u16) {
    (22000, 22999)
}
fn default_rdp_ports() -> (u16, u16) {
    (23000, 23999)
}
fn default_shared_roots() -> Vec<PathBuf> {
    vec!["/srv/ssp/shared".into()]
}
fn default_uid_range() -> (u32, u32) {
    (10000, 19999)
}
fn default_pool() -> String {
    "default".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/ssp-agent".into()
}
fn default_heartbeat() -> u64 {
    5
}
fn default_resync() -> u64 {
    30
}

impl AgentConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ssp_model::HostName::parse(&cfg.name)?;
        if cfg.ssh_ports.0 == 0 || cfg.ssh_ports.0 > cfg.ssh_ports.1 {
            anyhow::bail!(
                "ssh_ports {:?} in {}: expected [FIRST, LAST] with 0 < FIRST <= LAST",
                cfg.ssh_ports,
                path.display()
            );
        }
        let (r0, r1) = cfg.rdp_ports;
        let (s0, s1) = cfg.ssh_ports;
        if r0 == 0 || r0 > r1 || r1 - r0 < s1 - s0 || (r0 <= s1 && s0 <= r1) {
            anyhow::bail!(
                "rdp_ports {:?} in {}: expected [FIRST, LAST] with as many ports as ssh_ports {:?}, not overlapping them",
                cfg.rdp_ports,
                path.display(),
                cfg.ssh_ports
            );
        }
        if cfg.max_containers == 0 {
            anyhow::bail!(
                "max_containers = 0 in {}: expected how many containers this host is meant to hold, e.g. {}",
                path.display(),
                crate::limits::DEFAULT_CONTAINERS
            );
        }
        if cfg.coordinators.is_empty() {
            anyhow::bail!(
                "coordinators in {} is empty: list at least one coordinator address",
                path.display()
            );
        }
        cfg.advertise_address()
            .with_context(|| format!("advertise in {}", path.display()))?;
        if let Some(lan) = &cfg.lan {
            lan.check()
                .with_context(|| format!("in {}", path.display()))?;
        }
        Ok(cfg)
    }

    /// How coordinators reach this agent: `advertise`, or `http://LISTEN` when
    /// `listen` is a specific address, or `http://SSH_HOST:PORT` (users reach the host
    /// at `ssh_host`, so coordinators can too) when it is a wildcard.
    pub fn advertise_address(&self) -> anyhow::Result<String> {
        match &self.advertise {
            Some(a) if a.starts_with("http://") => Ok(a.clone()),
            Some(a) => anyhow::bail!("{a:?}: expected http://ADDRESS:PORT"),
            None if !self.listen.ip().is_unspecified() => Ok(format!("http://{}", self.listen)),
            None => {
                let port = self.listen.port();
                let host = self.ssh_host.trim();
                match host.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(ip)) => Ok(format!("http://[{ip}]:{port}")),
                    Ok(ip) => Ok(format!("http://{ip}:{port}")),
                    Err(_) if is_host_name(host) => Ok(format!("http://{host}:{port}")),
                    Err(_) => anyhow::bail!(
                        "not set, and ssh_host {host:?} is no address or host name to derive it \
                         from: set advertise = \"http://ADDRESS:{port}\""
                    ),
                }
            }
        }
    }
}

/// A DNS name: dot-separated labels of letters, digits and '-'.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"h1\"\nadvertise = \"http://10.0.0.5:7401\"\ncoordinators = [\"http://10.0.0.2:7400\"]\nssh_host = \"10.0.0.5\"\n";

    #[test]
    fn ssh_forward_defaults_to_nat_and_names_the_choices_when_wrong() {
        let c: AgentConfig = toml::from_str(BASE).unwrap();
        assert_eq!(c.ssh_forward, ForwardMode::Nat);
        let c: AgentConfig = toml::from_str(&format!("{BASE}ssh_forward = \"proxy\"\n")).unwrap();
        assert_eq!(c.ssh_forward, ForwardMode::Proxy);
        let e = toml::from_str::<AgentConfig>(&format!("{BASE}ssh_forward = \"dnat\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nat`") && e.contains("`proxy`"), "{e}");
    }

    #[test]
    fn a_host_is_meant_for_256_containers_and_its_daemon_logs_are_found_by_its_socket() {
        let c: AgentConfig = toml::from_str(BASE).unwrap();
        assert_eq!(c.max_containers, 256);
        assert_eq!(c.daemon_logs, None);
        let c: AgentConfig = toml::from_str(&format!("{BASE}max_containers = 40\n")).unwrap();
        assert_eq!(c.max_containers, 40);
        for (socket, logs) in [
            ("/var/lib/incus/unix.socket", "/var/log/incus"),
            ("/var/lib/lxd/unix.socket", "/var/log/lxd"),
            (
                "/var/snap/lxd/common/lxd/unix.socket",
                "/var/snap/lxd/common/lxd/logs",
            ),
            ("/srv/incus-2/unix.socket", "/srv/incus-2/logs"),
        ] {
            assert_eq!(default_daemon_logs(Path::new(socket)), Path::new(logs));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("{BASE}max_containers = 0\n")).unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(e.starts_with("max_containers = 0 in "), "{e}");
    }

    #[test]
    fn the_lan_table_names_the_lan_and_its_parent_interface() {
        use crate::render::LanNicType;
        let c: AgentConfig = toml::from_str(BASE).unwrap();
        assert_eq!(c.lan, None);
        let c: AgentConfig = toml::from_str(&format!(
            "{BASE}[lan]\nname = \"lab\"\nparent = \"ssp-no-such0\"\n"
        ))
        .unwrap();
        let lan = c.lan.unwrap();
        lan.check().unwrap();
        // Not a bridge (it does not exist here): macvlan.
        assert_eq!(lan.nic().nictype, LanNicType::Macvlan);
        assert_eq!(lan.nic().parent, "ssp-no-such0");
        let c: AgentConfig = toml::from_str(&format!(
            "{BASE}[lan]\nname = \"lab\"\nparent = \"eno1\"\nnictype = \"bridged\"\n"
        ))
        .unwrap();
        assert_eq!(c.lan.unwrap().nic().nictype, LanNicType::Bridged);
        for (table, says) in [
            ("name = \"Lab!\"\nparent = \"eno1\"", "[lan] name"),
            ("name = \"lab\"\nparent = \"eno1; rm\"", "[lan] parent"),
            (
                "name = \"lab\"\nparent = \"a-very-long-interface\"",
                "[lan] parent",
            ),
        ] {
            let c: AgentConfig = toml::from_str(&format!("{BASE}[lan]\n{table}\n")).unwrap();
            let e = c.lan.unwrap().check().unwrap_err().to_string();
            assert!(e.contains(says), "{table}: {e}");
        }
        let e = toml::from_str::<AgentConfig>(&format!(
            "{BASE}[lan]\nname = \"lab\"\nparent = \"eno1\"\nnictype = \"ipvlan\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`macvlan`") && e.contains("`bridged`"), "{e}");
    }

    #[test]
    fn nvidia_table_is_optional_key_by_key() {
        use crate::nvidia::{Mode, NvidiaConfig};
        let c: AgentConfig = toml::from_str(BASE).unwrap();
        assert_eq!(c.nvidia, NvidiaConfig::default());
        assert_eq!(c.nvidia.mode, Mode::Auto);
        assert_eq!(
            c.nvidia.version_file,
            PathBuf::from("/proc/driver/nvidia/version")
        );
        assert_eq!(
            c.nvidia.lib_dirs[0],
            PathBuf::from("/usr/local/nvidia/lib64")
        );
        assert_eq!(c.nvidia.bin_dirs[0], PathBuf::from("/usr/local/nvidia/bin"));
        let c: AgentConfig = toml::from_str(&format!(
            "{BASE}[nvidia]\nmode = \"bind\"\nlib_dirs = [\"/opt/nv/lib\"]\n"
        ))
        .unwrap();
        assert_eq!(c.nvidia.mode, Mode::Bind);
        assert_eq!(c.nvidia.lib_dirs, vec![PathBuf::from("/opt/nv/lib")]);
        assert_eq!(c.nvidia.bin_dirs, NvidiaConfig::default().bin_dirs);
        for bad in ["[nvidia]\nmode = \"cdi\"\n", "[nvidia]\nlibdirs = []\n"] {
            assert!(
                toml::from_str::<AgentConfig>(&format!("{BASE}{bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn advertise_defaults_to_a_specific_listen_address_else_to_ssh_host() {
        let base = "name = \"h1\"\ncoordinators = [\"http://10.0.0.2:7400\"]\n";
        let adv = |extra: &str| {
            toml::from_str::<AgentConfig>(&format!("{base}{extra}"))
                .unwrap()
                .advertise_address()
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            adv("ssh_host = \"10.0.0.5\"\n").unwrap(),
            "http://10.0.0.5:7401"
        );
        assert_eq!(
            adv("ssh_host = \"gpu1.lab.example\"\nlisten = \"[::]:7500\"\n").unwrap(),
            "http://gpu1.lab.example:7500"
        );
        assert_eq!(
            adv("ssh_host = \"fd00::5\"\n").unwrap(),
            "http://[fd00::5]:7401"
        );
        assert_eq!(
            adv("ssh_host = \"10.0.0.5\"\nlisten = \"192.0.2.9:7401\"\n").unwrap(),
            "http://192.0.2.9:7401"
        );
        assert_eq!(
            adv("ssh_host = \"10.0.0.5\"\nadvertise = \"http://10.9.9.9:1\"\n").unwrap(),
            "http://10.9.9.9:1"
        );
        let e = adv("ssh_host = \"not a host\"\n").unwrap_err();
        assert!(e.contains("set advertise"), "{e}");
        let e = adv("ssh_host = \"10.0.0.5\"\nadvertise = \"10.0.0.5:7401\"\n").unwrap_err();
        assert!(e.contains("expected http://"), "{e}");
    }
}
