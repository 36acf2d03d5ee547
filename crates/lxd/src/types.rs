//! The parts of the daemon's API objects that callers need.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which daemon is on the other end, detected from `GET /1.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DaemonKind {
    Incus,
    Lxd,
}

impl DaemonKind {
    /// The prefix of the daemon's custom headers (`X-Incus-uid`, `X-LXD-uid`).
    pub fn header_prefix(self) -> &'static str {
        match self {
            DaemonKind::Incus => "X-Incus",
            DaemonKind::Lxd => "X-LXD",
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonKind::Incus => "incus",
            DaemonKind::Lxd => "lxd",
        }
    }
}

/// What `GET /1.0` says about the daemon.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub kind: DaemonKind,
    pub version: String,
    pub api_extensions: Vec<String>,
    pub certificate: String,
    pub raw: Value,
}

impl ServerInfo {
    /// Reads the kind from `environment.server` (falling back to the extension list).
    pub fn from_json(raw: Value) -> Self {
        let env = &raw["environment"];
        let server = env["server"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let api_extensions: Vec<String> = raw["api_extensions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let kind = if server == "incus"
            || (server.is_empty() && api_extensions.iter().any(|e| e == "instance_ready_state"))
        {
            DaemonKind::Incus
        } else {
            DaemonKind::Lxd
        };
        ServerInfo {
            kind,
            version: env["server_version"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            certificate: env["certificate"].as_str().unwrap_or_default().to_string(),
            api_extensions,
            raw,
        }
    }
}

/// An instance as returned by `GET /1.0/instances?recursion=1`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub status_code: i64,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub expanded_config: BTreeMap<String, String>,
    #[serde(default)]
    pub expanded_devices: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default)]
    pub stateful: bool,
    #[serde(default)]
    pub description: String,
}

impl Instance {
    /// True when the daemon reports it running.
    pub fn is_running(&self) -> bool {
        self.status_code == 103 || self.status.eq_ignore_ascii_case("running")
    }
}

/// An image as returned by `GET /1.0/images?recursion=1` (the parts ssp needs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Image {
    pub fingerprint: String,
    /// `null` from some daemons when there are none.
    #[serde(default)]
    pub aliases: Option<Vec<ImageAlias>>,
}

impl Image {
    /// The alias names, sorted.
    pub fn alias_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .aliases
            .iter()
            .flatten()
            .map(|a| a.name.clone())
            .collect();
        names.sort();
        names
    }
}

/// One alias of an image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageAlias {
    pub name: String,
    #[serde(default)]
    pub description: String,
}
