//! The coordinator's state and the deterministic state machine that changes it.
//!
//! Every change is a [`Command`]; [`State::apply`] either applies it whole or
//! rejects it with a [`Rejection`] and leaves the state untouched. All
//! allocation (host, GPUs, port, uid) happens inside `apply`, so replicas
//! applying the same commands in the same order reach the same state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::place::{self, NoFit};
use crate::types::{Host, Instance, NewUser, User};

/// Cluster-wide settings fixed when the state is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Inclusive uid range given to users; mapped 1:1 into every container.
    pub uid_first: u32,
    pub uid_last: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            uid_first: 10000,
            uid_last: 19999,
        }
    }
}

/// Everything the coordinator knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    pub settings: Option<Settings>,
    pub users: BTreeMap<String, User>,
    pub hosts: BTreeMap<String, Host>,
    pub instances: BTreeMap<String, Instance>,
}

/// A change to the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets the settings; ignored when they are already set.
    Init(Settings),
    /// Adds or refreshes a host and its inventory.
    RegisterHost(Host),
    /// Adds a user and places their container.
    AddUser(NewUser),
    /// Marks a user's containers for removal; the user goes when the last is forgotten.
    RemoveUser { name: String },
    /// Forgets a container the host has deleted (and its owner, if being removed
    /// and this was their last container).
    ForgetInstance { name: String },
}

/// What an applied command produced.
// Outcomes are short-lived return values; boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Initialized,
    HostRegistered,
    UserAdded {
        user: User,
        instance: Instance,
    },
    /// The user's containers are marked for removal (the user is gone if they had none).
    UserRemoving {
        instances: Vec<String>,
    },
    InstanceForgotten {
        user_removed: bool,
    },
}

/// Why a command was refused; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("an instance named {0} already exists")]
    InstanceExists(String),
    #[error("user {0} does not exist")]
    UnknownUser(String),
    #[error("container {0} does not exist")]
    UnknownInstance(String),
    #[error("container {0} is not marked for removal")]
    NotDeleting(String),
    #[error("user {0} needs at least one ssh key")]
    NoSshKey(String),
    #[error("cannot place {user}: {reason}")]
    NoFit { user: String, reason: String },
    #[error("no free uid left in {first}-{last}; widen the uid range")]
    NoFreeUid { first: u32, last: u32 },
    #[error("host {host} has GPU {pci} twice in its inventory")]
    DuplicateGpu { host: String, pci: String },
}

impl State {
    /// The settings, or the defaults before `Init`.
    pub fn settings(&self) -> Settings {
        self.settings.clone().unwrap_or_default()
    }

    /// Applies `cmd`, or rejects it without changing anything.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, Rejection> {
        match cmd {
            Command::Init(s) => {
                if self.settings.is_none() {
                    self.settings = Some(s.clone());
                }
                Ok(Outcome::Initialized)
            }
            Command::RegisterHost(h) => {
                let mut seen = BTreeSet::new();
                for g in &h.inventory.gpus {
                    if !seen.insert(&g.pci) {
                        return Err(Rejection::DuplicateGpu {
                            host: h.name.to_string(),
                            pci: g.pci.to_string(),
                        });
                    }
                }
                self.hosts.insert(h.name.to_string(), h.clone());
                Ok(Outcome::HostRegistered)
            }
            Command::AddUser(req) => self.add_user(req),
            Command::RemoveUser { name } => {
                if !self.users.contains_key(name) {
                    return Err(Rejection::UnknownUser(name.clone()));
                }
                let mut instances = Vec::new();
                for i in self
                    .instances
                    .values_mut()
                    .filter(|i| i.owner.as_str() == name)
                {
                    i.deleting = true;
                    instances.push(i.name.clone());
                }
                if instances.is_empty() {
                    self.users.remove(name);
                }
                Ok(Outcome::UserRemoving { instances })
            }
            Command::ForgetInstance { name } => {
                let inst = self
                    .instances
                    .get(name)
                    .ok_or_else(|| Rejection::UnknownInstance(name.clone()))?;
                if !inst.deleting {
                    return Err(Rejection::NotDeleting(name.clone()));
                }
                let owner = inst.owner.to_string();
                self.instances.remove(name);
                let last = !self.instances.values().any(|i| i.owner.as_str() == owner);
                if last {
                    self.users.remove(&owner);
                }
                Ok(Outcome::InstanceForgotten { user_removed: last })
            }
        }
    }

    fn add_user(&mut self, req: &NewUser) -> Result<Outcome, Rejection> {
        let name = req.name.as_str();
        if self.users.contains_key(name) {
            return Err(Rejection::UserExists(name.into()));
        }
        if self.instances.contains_key(name) {
            return Err(Rejection::InstanceExists(name.into()));
        }
        if req.ssh_keys.is_empty() {
            return Err(Rejection::NoSshKey(name.into()));
        }
        let place =
            place::choose(self, &req.limits, req.gpus).map_err(|e: NoFit| Rejection::NoFit {
                user: name.into(),
                reason: e.to_string(),
            })?;
        let s = self.settings();
        let used: BTreeSet<u32> = self.users.values().map(|u| u.uid).collect();
        let uid = (s.uid_first..=s.uid_last)
            .find(|u| !used.contains(u))
            .ok_or(Rejection::NoFreeUid {
                first: s.uid_first,
                last: s.uid_last,
            })?;
        let user = User {
            name: req.name.clone(),
            uid,
            role: req.role,
            ssh_keys: req.ssh_keys.clone(),
            limits: req.limits,
            gpus: req.gpus,
        };
        let instance = Instance {
            name: name.to_string(),
            owner: req.name.clone(),
            host: place.host,
            gpus: place.gpus,
            ssh_port: place.ssh_port,
            limits: req.limits,
            image: req.image.clone(),
            shares: req.shares.clone(),
            deleting: false,
        };
        self.users.insert(name.into(), user.clone());
        self.instances.insert(name.into(), instance.clone());
        Ok(Outcome::UserAdded { user, instance })
    }

    /// The instance holding GPU `pci` on `host`, if any.
    pub fn gpu_holder(&self, host: &str, pci: &crate::PciAddress) -> Option<&Instance> {
        self.instances
            .values()
            .find(|i| i.host.as_str() == host && i.gpus.contains(pci))
    }
}

#[cfg(test)]
mod tests;
