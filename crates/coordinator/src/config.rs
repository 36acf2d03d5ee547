//! The coordinator's configuration file (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use ssp_model::{ByteSize, Limits, SharedFolder};

/// Coordinator settings; unknown keys are an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Host folders under which shared folders may be created.
    #[serde(default)]
    pub shared_roots: Vec<String>,
    /// Shares every new user gets unless they ask otherwise (`HOST[:CONTAINER]`).
    #[serde(default)]
    pub default_shares: Vec<String>,
    #[serde(default)]
    pub defaults: Defaults,
    /// uid range for users (its last id is the lab group's gid); each container maps
    /// its owner's uid and the lab gid 1:1. Fixed when the state is created.
    #[serde(default = "default_uid_range")]
    pub uid_range: (u32, u32),
    /// Seconds between full reconcile passes over every instance.
    #[serde(default = "default_reconcile")]
    pub reconcile_secs: u64,
    /// A host whose agent has not heartbeat for this long is marked down.
    #[serde(default = "default_host_timeout")]
    pub host_timeout_secs: u64,
    /// The address other coordinators, agents and sspctl reach this one at
    /// (`http://IP:PORT`); defaults to `listen` when that is not a wildcard.
    #[serde(default)]
    pub advertise: Option<String>,
    /// On first start with an empty data_dir, form a one-node cluster of this
    /// coordinator. Leave it off for a coordinator that will be added with
    /// `sspctl cluster join`, or start it and run `sspctl cluster init`.
    #[serde(default)]
    pub bootstrap: bool,
    #[serde(default)]
    pub raft: RaftTuning,
    /// The most one user may be given; unset keys are unlimited.
    #[serde(default)]
    pub quota: Quota,
    /// Validity of coordinator and agent certificates (renewed after two thirds).
    #[serde(default = "default_cert_ttl")]
    pub cert_ttl_secs: u64,
    /// Validity of user and admin credentials.
    #[serde(default = "default_user_cert_ttl")]
    pub user_cert_ttl_secs: u64,
    /// A join token (`sspctl token create --role coordinator`), used once at first
    /// start when data_dir has no certificate; `--token` overrides it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Per-user maxima, checked when a user is added.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub disk: Option<String>,
}

/// Raft timing; the defaults give failover well under two seconds on a LAN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Log entries between snapshots; older entries are then compacted away.
    pub snapshot_every: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            election_min_ms: 400,
            election_max_ms: 800,
            snapshot_every: 5000,
        }
    }
}

/// Limits and image a user gets when the request leaves them out; every key is
/// optional (the built-in default fills in).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    pub cpus: u32,
    pub memory: String,
    pub disk: String,
    pub processes: u32,
    pub image: String,
    /// The image of containers made with `--desktop` (xrdp with Xfce).
    pub desktop_image: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            cpus: 2,
            memory: "4GiB".into(),
            disk: "20GiB".into(),
            processes: 4000,
            image: "debian-ssh".into(),
            desktop_image: "debian-desktop".into(),
        }
    }
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:7400".parse().expect("valid literal")
}
fn default_data_dir() -> PathBuf {
    "/var/lib/ssp-coordinator".into()
}
fn default_uid_range() -> (u32, u32) {
    (10000, 19999)
}
fn default_cert_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_user_cert_ttl() -> u64 {
    365 * 24 * 3600
}
fn default_reconcile() -> u64 {
    30
}
fn default_host_timeout() -> u64 {
    15
}

impl CoordinatorConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.default_limits()
            .with_context(|| format!("[defaults] in {}", path.display()))?;
        cfg.default_share_list()
            .with_context(|| format!("default_shares in {}", path.display()))?;
        cfg.quota_limits()
            .with_context(|| format!("[quota] in {}", path.display()))?;
        if cfg.uid_range.0 < 1000 || cfg.uid_range.0 > cfg.uid_range.1 {
            anyhow::bail!(
                "uid_range {:?} in {}: expected [FIRST, LAST] with 1000 <= FIRST <= LAST",
                cfg.uid_range,
                path.display()
            );
        }
        if cfg.raft.heartbeat_ms == 0
            || cfg.raft.election_min_ms <= cfg.raft.heartbeat_ms
            || cfg.raft.election_max_ms <= cfg.raft.election_min_ms
        {
            anyhow::bail!(
                "[raft] in {}: expected 0 < heartbeat_ms < election_min_ms < election_max_ms",
                path.display()
            );
        }
        if cfg.raft.snapshot_every < 10 {
            anyhow::bail!(
                "[raft] snapshot_every in {}: expected at least 10",
                path.display()
            );
        }
        cfg.advertise_address()
            .with_context(|| format!("advertise in {}", path.display()))?;
        let max = ssp_net::ca::MAX_TTL.as_secs();
        for (key, v) in [
            ("cert_ttl_secs", cfg.cert_ttl_secs),
            ("user_cert_ttl_secs", cfg.user_cert_ttl_secs),
        ] {
            if !(15..=max).contains(&v) {
                anyhow::bail!("{key} = {v} in {}: expected 15 to {max}", path.display());
            }
        }
        Ok(cfg)
    }

    /// The address peers and clients use for this coordinator.
    pub fn advertise_address(&self) -> anyhow::Result<String> {
        match &self.advertise {
            Some(a) if a.starts_with("http://") => Ok(a.clone()),
            Some(a) => anyhow::bail!("{a:?}: expected http://IP:PORT"),
            // A lone coordinator is reached on loopback; a cluster needs advertise.
            None if self.listen.ip().is_unspecified() => {
                Ok(format!("http://127.0.0.1:{}", self.listen.port()))
            }
            None => Ok(format!("http://{}", self.listen)),
        }
    }

    /// The default limits, parsed.
    pub fn default_limits(&self) -> Result<Limits, ssp_model::InputError> {
        for (what, n) in [
            ("CPU count", self.defaults.cpus),
            ("process limit", self.defaults.processes),
        ] {
            if n == 0 {
                return Err(ssp_model::InputError {
                    what,
                    value: "0".into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(Limits {
            cpus: self.defaults.cpus,
            memory: ByteSize::parse(&self.defaults.memory)?,
            disk: ByteSize::parse(&self.defaults.disk)?,
            processes: self.defaults.processes,
        })
    }

    /// The quota's memory and disk maxima, parsed.
    pub fn quota_limits(
        &self,
    ) -> Result<(Option<ByteSize>, Option<ByteSize>), ssp_model::InputError> {
        let parse = |s: &Option<String>| s.as_deref().map(ByteSize::parse).transpose();
        Ok((parse(&self.quota.memory)?, parse(&self.quota.disk)?))
    }

    /// The default shares, parsed against the roots.
    pub fn default_share_list(&self) -> Result<Vec<SharedFolder>, ssp_model::InputError> {
        self.default_shares
            .iter()
            .map(|s| SharedFolder::parse(s, &self.shared_roots))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<CoordinatorConfig> {
        let f = tempfile::NamedTempFile::new()?;
        std::fs::write(f.path(), text)?;
        CoordinatorConfig::load(f.path())
    }

    #[test]
    fn every_key_of_every_table_is_optional() {
        let c = load("").unwrap();
        assert_eq!(c.defaults.image, "debian-ssh");
        let c = load("[defaults]\nimage = \"busybox\"\n").unwrap();
        assert_eq!(c.defaults.image, "busybox");
        let l = c.default_limits().unwrap();
        assert_eq!(
            (l.cpus, l.memory.0, l.disk.0, l.processes),
            (2, 4 << 30, 20 << 30, 4000)
        );
        let c = load("[defaults]\ncpus = 4\n[raft]\nsnapshot_every = 100\n[quota]\ngpus = 1\n")
            .unwrap();
        assert_eq!(c.defaults.cpus, 4);
        assert_eq!(c.defaults.memory, "4GiB");
        assert_eq!(c.raft.snapshot_every, 100);
        assert_eq!(c.raft.heartbeat_ms, 100);
        assert_eq!(c.quota.gpus, Some(1));
        assert_eq!(c.quota.memory, None);
    }

    #[test]
    fn bad_defaults_and_unknown_keys_are_refused_by_name() {
        let e = format!("{:#}", load("[defaults]\ncpus = 0\n").unwrap_err());
        assert!(
            e.contains("[defaults]") && e.contains("invalid CPU count \"0\": must be at least 1"),
            "{e}"
        );
        let e = format!("{:#}", load("[defaults]\nimages = \"x\"\n").unwrap_err());
        assert!(e.contains("unknown field `images`"), "{e}");
    }
}
