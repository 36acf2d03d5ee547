//! The coordinator's state and the deterministic state machine that changes it.
//!
//! Every change is a [`Command`]; [`State::apply`] either applies it whole or
//! rejects it with a [`Rejection`] and leaves the state untouched. All
//! allocation (host, GPUs, port, uid) happens inside `apply`, so replicas
//! applying the same commands in the same order reach the same state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::migration::{Migration, MigrationCommand, Phase, Side};
use crate::names::{PciAddress, SshKey};
use crate::place::{self, NoFit};
use crate::types::{Host, Instance, NewUser, User, UserKind};

/// Cluster-wide settings fixed when the state is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Inclusive uid range given to users; a container maps its owner's uid of it 1:1.
    pub uid_first: u32,
    pub uid_last: u32,
}

impl Settings {
    /// The lab group's gid: the last of the uid range, never a user's uid. Shared
    /// folders belong to this group (setgid), and every owner is a member inside
    /// their container, so every member can write there and files keep their writer.
    pub fn lab_gid(&self) -> u32 {
        self.uid_last
    }
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
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct State {
    pub settings: Option<Settings>,
    pub users: BTreeMap<String, User>,
    pub hosts: BTreeMap<String, Host>,
    pub instances: BTreeMap<String, Instance>,
    /// Join tokens and issued certificates (absent from state written before them).
    #[serde(default)]
    pub trust: crate::trust::Trust,
    /// Moves between hosts, in progress and the last finished ones, by id.
    #[serde(default)]
    pub migrations: BTreeMap<u64, Migration>,
    /// The id the next move gets.
    #[serde(default)]
    pub next_migration: u64,
    /// Admins' pools of static addresses, by LAN name; a LAN without one uses
    /// its DHCP server.
    #[serde(default)]
    pub lans: BTreeMap<String, crate::types::LanPool>,
    /// The relay for access from outside the LAN, if the lab has one.
    #[serde(default)]
    pub relay: Option<crate::types::Relay>,
    /// Derived from `users` and `instances`; never stored. See [`Usage`].
    #[serde(skip)]
    usage: Usage,
}

impl PartialEq for State {
    fn eq(&self, o: &Self) -> bool {
        self.settings == o.settings
            && self.users == o.users
            && self.hosts == o.hosts
            && self.instances == o.instances
            && self.trust == o.trust
            && self.migrations == o.migrations
            && self.next_migration == o.next_migration
            && self.lans == o.lans
            && self.relay == o.relay
    }
}

impl Eq for State {}

/// What is handed out, by host, and the uids in use: an index over `instances`
/// and `users` that keeps placement from scanning every instance. `apply` keeps
/// it current and rebuilds it when it does not match (after deserializing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub hosts: BTreeMap<String, HostUsage>,
    pub uids: Numbers,
    instances: usize,
    /// Every host as (free GPUs, name): placement walks this in preference order
    /// instead of looking at every host.
    pub by_free: BTreeSet<(u32, String)>,
    free_of: BTreeMap<String, u32>,
    /// Static addresses held on each LAN (by LAN name).
    pub lan_addrs: BTreeMap<String, Numbers>,
    /// Relay ports held.
    pub relay_ports: Numbers,
}

/// One host's ports and GPUs in use (GPU → holding instance).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// Ports that allocation skips: those of the host's instances and its foreign ports.
    pub ports: Numbers,
    pub gpus: BTreeMap<PciAddress, String>,
    /// Ports the host's instances hold.
    own: BTreeSet<u32>,
    /// The host's foreign ports ([`Host::foreign_ports`]), as last registered.
    foreign: BTreeSet<u32>,
}

impl HostUsage {
    fn hold(&mut self, port: u32) {
        self.own.insert(port);
        self.ports.insert(port);
    }

    fn release(&mut self, port: u32) {
        self.own.remove(&port);
        if !self.foreign.contains(&port) {
            self.ports.remove(port);
        }
    }

    /// Replaces the foreign ports, touching only those that changed.
    fn set_foreign(&mut self, ports: &[u16]) {
        let new: BTreeSet<u32> = ports.iter().map(|&p| p.into()).collect();
        for &gone in self.foreign.difference(&new) {
            if !self.own.contains(&gone) {
                self.ports.remove(gone);
            }
        }
        for &p in new.difference(&self.foreign) {
            self.ports.insert(p);
        }
        self.foreign = new;
    }
}

/// Numbers in use, kept as runs of consecutive numbers, so the lowest free number
/// in a range is found in O(log n), not by walking, and the size does not depend on
/// how far apart the numbers are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Numbers {
    /// First → last number of each run; runs neither overlap nor touch.
    runs: BTreeMap<u32, u32>,
    len: usize,
}

impl Numbers {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The run holding `x`, as (first, last).
    fn run_of(&self, x: u32) -> Option<(u32, u32)> {
        self.runs
            .range(..=x)
            .next_back()
            .filter(|(_, &last)| x <= last)
            .map(|(&first, &last)| (first, last))
    }

    pub fn contains(&self, x: u32) -> bool {
        self.run_of(x).is_some()
    }

    pub fn insert(&mut self, x: u32) {
        if self.contains(x) {
            return;
        }
        self.len += 1;
        // Joins the run ending just below and the one starting just above, if any.
        let first = match x.checked_sub(1).and_then(|b| self.run_of(b)) {
            Some((f, _)) => f,
            None => x,
        };
        let last = match x.checked_add(1).and_then(|a| self.runs.remove(&a)) {
            Some(l) => l,
            None => x,
        };
        self.runs.insert(first, last);
    }

    pub fn remove(&mut self, x: u32) {
        let Some((first, last)) = self.run_of(x) else {
            return;
        };
        self.len -= 1;
        self.runs.remove(&first);
        if first < x {
            self.runs.insert(first, x - 1);
        }
        if x < last {
            self.runs.insert(x + 1, last);
        }
    }

    /// The lowest number in `first..=last` not in use.
    pub fn lowest_free(&self, first: u32, last: u32) -> Option<u32> {
        if first > last {
            return None;
        }
        // Runs do not touch, so the number after a run is free.
        let cand = match self.run_of(first) {
            Some((_, end)) => end.checked_add(1)?,
            None => first,
        };
        (cand <= last).then_some(cand)
    }
}

impl Usage {
    fn build(
        users: &BTreeMap<String, User>,
        instances: &BTreeMap<String, Instance>,
        hosts: &BTreeMap<String, Host>,
        migrations: &BTreeMap<u64, Migration>,
    ) -> Usage {
        let mut u = Usage {
            ..Default::default()
        };
        for h in hosts.values() {
            u.hosts.entry(h.name.to_string()).or_default();
        }
        for user in users.values() {
            u.uids.insert(user.uid);
        }
        for i in instances.values() {
            u.add(i);
        }
        for m in migrations.values() {
            if let Some(side) = m.reserved() {
                u.hold_side(&m.instance, side);
            }
        }
        for h in hosts.values() {
            u.set_foreign(h);
            u.refresh(h);
        }
        u
    }

    /// Takes `host`'s foreign ports into its used ports (after it registered).
    fn set_foreign(&mut self, host: &Host) {
        self.hosts
            .entry(host.name.to_string())
            .or_default()
            .set_foreign(&host.foreign_ports);
    }

    /// Re-counts `host`'s free GPUs in `by_free` (after its inventory or holders changed).
    fn refresh(&mut self, host: &Host) {
        let name = host.name.to_string();
        let held = self.hosts.get(&name);
        let free = host
            .inventory
            .gpus
            .iter()
            .filter(|g| !held.is_some_and(|h| h.gpus.contains_key(&g.pci)))
            .count() as u32;
        if let Some(old) = self.free_of.insert(name.clone(), free) {
            self.by_free.remove(&(old, name.clone()));
        }
        self.by_free.insert((free, name));
    }

    fn add(&mut self, i: &Instance) {
        let h = self.hosts.entry(i.host.to_string()).or_default();
        h.hold(i.ssh_port.into());
        for g in &i.gpus {
            h.gpus.insert(g.clone(), i.name.clone());
        }
        if let (Some(lan), Some(a)) = (&i.placement.lan, i.lan_address) {
            self.lan_addrs
                .entry(lan.clone())
                .or_default()
                .insert(a.into());
        }
        if let Some(p) = i.relay_port {
            self.relay_ports.insert(p.into());
        }
        self.instances += 1;
    }

    /// Holds what a move reserves for `name` on the side its record does not place it.
    fn hold_side(&mut self, name: &str, side: &Side) {
        let h = self.hosts.entry(side.host.to_string()).or_default();
        h.hold(side.ssh_port.into());
        for g in &side.gpus {
            h.gpus.insert(g.clone(), name.to_string());
        }
    }

    fn release_side(&mut self, side: &Side) {
        if let Some(h) = self.hosts.get_mut(side.host.as_str()) {
            h.release(side.ssh_port.into());
            for g in &side.gpus {
                h.gpus.remove(g);
            }
        }
    }

    fn remove(&mut self, i: &Instance) {
        if let Some(h) = self.hosts.get_mut(i.host.as_str()) {
            h.release(i.ssh_port.into());
            for g in &i.gpus {
                h.gpus.remove(g);
            }
        }
        if let (Some(lan), Some(a)) = (&i.placement.lan, i.lan_address) {
            if let Some(n) = self.lan_addrs.get_mut(lan) {
                n.remove(a.into());
            }
        }
        if let Some(p) = i.relay_port {
            self.relay_ports.remove(p.into());
        }
        self.instances -= 1;
    }
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
    /// Records a container made by hand as `user`'s, holding the GPUs it already
    /// passes and its SSH port (`None`: a free one of the host's range).
    Adopt {
        user: NewUser,
        host: String,
        gpus: Vec<PciAddress>,
        ssh_port: Option<u16>,
    },
    /// Marks a user's containers for removal; the user goes when the last is forgotten.
    RemoveUser { name: String },
    /// Forgets a container the host has deleted (and its owner, if being removed
    /// and this was their last container).
    ForgetInstance { name: String },
    /// Replaces a user's SSH public keys (their containers get the new set).
    SetSshKeys { name: String, keys: Vec<SshKey> },
    /// Changes a user's limits (`None`: unchanged); their containers get them.
    Resize {
        name: String,
        cpus: Option<u32>,
        memory: Option<crate::names::ByteSize>,
        disk: Option<crate::names::ByteSize>,
    },
    /// Sets a user's snapshot schedule (their containers' agents take them).
    SetSnapshotSchedule {
        name: String,
        schedule: crate::types::SnapshotSchedule,
    },
    /// Changes how a user's containers are reached: a forwarded SSH port, or an
    /// address of their own on their host's LAN (`lan`: only if it is this one).
    SetNetwork {
        name: String,
        network: crate::types::Network,
        #[serde(default)]
        lan: Option<String>,
    },
    /// Sets (or with `None` removes) the relay; every container gets a relay port.
    SetRelay { relay: Option<crate::types::Relay> },
    /// Sets (or with `None` removes) a LAN's pool of static addresses.
    SetLan {
        name: String,
        pool: Option<crate::types::LanPool>,
    },
    /// Marks a host ready, draining or down.
    SetHostStatus {
        name: String,
        status: crate::types::HostStatus,
    },
    /// Tokens and certificates.
    Trust(crate::trust::TrustCommand),
    /// Moves a container between hosts (see [`crate::migration`]).
    Migrate(MigrationCommand),
    /// Changes nothing: records, in the audit log, a request refused before it
    /// reached the state (e.g. permission denied).
    Audit {
        action: String,
        target: String,
        outcome: String,
    },
}

impl Command {
    /// What the command does and to whom, as the audit log shows it.
    pub fn describe(&self) -> (String, String) {
        use crate::trust::TrustCommand as T;
        let (a, t): (&str, String) = match self {
            Command::Init(_) => ("init", String::new()),
            Command::RegisterHost(h) => ("register-host", h.name.to_string()),
            Command::AddUser(u) => ("add-user", u.name.to_string()),
            Command::Adopt { user, host, .. } => {
                return (format!("adopt on {host}"), user.name.to_string())
            }
            Command::RemoveUser { name } => ("remove-user", name.clone()),
            Command::ForgetInstance { name } => ("forget-instance", name.clone()),
            Command::SetSshKeys { name, .. } => ("set-ssh-keys", name.clone()),
            Command::Resize { name, .. } => ("resize", name.clone()),
            Command::SetNetwork { name, network, .. } => {
                return (format!("set-network {}", network.as_str()), name.clone())
            }
            Command::SetRelay { relay } => {
                return (
                    match relay {
                        Some(r) => format!("set-relay ports {}-{}", r.ports.0, r.ports.1),
                        None => "set-relay none".into(),
                    },
                    relay
                        .as_ref()
                        .map(|r| r.host.as_str().to_string())
                        .unwrap_or_default(),
                )
            }
            Command::SetLan { name, pool } => {
                return (
                    match pool {
                        Some(p) => format!("set-lan pool {p}"),
                        None => "set-lan dhcp".into(),
                    },
                    name.clone(),
                )
            }
            Command::SetSnapshotSchedule { name, schedule } => {
                return (
                    format!(
                        "snapshot-schedule every {}s keep {}",
                        schedule.every_secs, schedule.keep
                    ),
                    name.clone(),
                )
            }
            Command::SetHostStatus { name, status } => {
                return (format!("set-host-status {}", status.as_str()), name.clone())
            }
            Command::Trust(T::CreateToken { id, role, .. }) => {
                return (format!("create-token {role}"), id.clone())
            }
            Command::Trust(T::UseToken { id, .. }) => ("use-token", id.clone()),
            Command::Trust(T::RecordCert { record, .. }) => {
                return (format!("issue-cert {}", record.role), record.name.clone())
            }
            Command::Trust(T::Revoke { serial_or_name, .. }) => ("revoke", serial_or_name.clone()),
            Command::Audit { action, target, .. } => return (action.clone(), target.clone()),
            Command::Migrate(MigrationCommand::Begin { instance, to, .. }) => {
                return (
                    format!(
                        "migrate to {}",
                        to.as_ref().map(|h| h.as_str()).unwrap_or("auto")
                    ),
                    instance.clone(),
                )
            }
            Command::Migrate(MigrationCommand::Advance { id, phase, .. }) => {
                return (format!("migration {phase}"), id.to_string())
            }
            Command::Migrate(MigrationCommand::Switch { id, .. }) => {
                ("migration switch", id.to_string())
            }
            Command::Migrate(MigrationCommand::Finish { id, .. }) => {
                ("migration finish", id.to_string())
            }
        };
        (a.to_string(), t)
    }
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
    HostStatusSet,
    /// The user's keys are replaced; these containers carry them.
    SshKeysSet {
        instances: Vec<String>,
    },
    /// The user's limits are changed; these containers get them.
    Resized {
        instances: Vec<String>,
    },
    LanSet,
    /// The relay is set; these containers got (or lost) a relay port.
    RelaySet {
        instances: Vec<String>,
    },
    /// The user's containers are reached the new way; these change.
    NetworkSet {
        instances: Vec<String>,
    },
    /// The user's schedule is set; these containers follow it.
    SnapshotScheduleSet {
        instances: Vec<String>,
    },
    Trust(crate::trust::TrustOutcome),
    Audited,
    /// A move's record after the command.
    Migration(Migration),
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
    #[error("cannot resize: {0}")]
    Resize(String),
    #[error("cannot change the network: {0}")]
    Network(String),
    #[error("container {0} does not exist")]
    UnknownInstance(String),
    #[error("user {0} is being removed")]
    UserRemoving(String),
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
    #[error("host {0} is not registered")]
    UnknownHost(String),
    #[error("{0}")]
    Trust(String),
    #[error("{0}")]
    Migration(String),
    /// A request that does not fit a Common-Server or an account in one.
    #[error("{0}")]
    Common(String),
    /// A container made by hand that cannot be taken over as it is.
    #[error("{0}")]
    Adopt(String),
}

impl State {
    /// The settings, or the defaults before `Init`.
    pub fn settings(&self) -> Settings {
        self.settings.clone().unwrap_or_default()
    }

    /// The usage index, when it matches the state (always, after `apply`).
    pub fn usage(&self) -> Option<&Usage> {
        (self.usage.instances == self.instances.len()
            && self.usage.uids.len() == self.users.len()
            && self.usage.free_of.len() == self.hosts.len())
        .then_some(&self.usage)
    }

    fn ensure_usage(&mut self) {
        if self.usage().is_none() {
            self.usage = Usage::build(&self.users, &self.instances, &self.hosts, &self.migrations);
        }
    }

    /// Applies `cmd`, or rejects it without changing anything.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, Rejection> {
        self.ensure_usage();
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
                let mut h = h.clone();
                h.status = self
                    .hosts
                    .get(h.name.as_str())
                    .map(|old| old.status)
                    .unwrap_or_default();
                self.usage.set_foreign(&h);
                self.usage.refresh(&h);
                self.hosts.insert(h.name.to_string(), h);
                Ok(Outcome::HostRegistered)
            }
            Command::AddUser(req) => self.add_user(req),
            Command::Adopt {
                user,
                host,
                gpus,
                ssh_port,
            } => self.adopt(user, host, gpus, *ssh_port),
            Command::Trust(t) => self.trust.apply(t).map(Outcome::Trust),
            Command::Audit { .. } => Ok(Outcome::Audited),
            Command::Migrate(m) => self.migrate(m).map(Outcome::Migration),
            Command::SetHostStatus { name, status } => {
                let h = self
                    .hosts
                    .get_mut(name)
                    .ok_or_else(|| Rejection::UnknownHost(name.clone()))?;
                h.status = *status;
                Ok(Outcome::HostStatusSet)
            }
            Command::Resize {
                name,
                cpus,
                memory,
                disk,
            } => {
                let user = self
                    .users
                    .get(name)
                    .ok_or_else(|| Rejection::UnknownUser(name.clone()))?;
                self.not_an_account(name, "resize")?;
                let mut limits = user.limits;
                limits.cpus = cpus.unwrap_or(limits.cpus);
                limits.memory = memory.unwrap_or(limits.memory);
                limits.disk = disk.unwrap_or(limits.disk);
                let mut instances = Vec::new();
                for i in self.instances.values().filter(|i| i.owner.as_str() == name) {
                    if i.deleting {
                        return Err(Rejection::UserRemoving(name.clone()));
                    }
                    if let Some(m) = self.moving(&i.name) {
                        return Err(Rejection::Migration(format!(
                            "{}'s container is moving to {} (migration {}, {}); resize it when the move is done",
                            name, m.to.host, m.id, m.phase
                        )));
                    }
                    if let Some(inv) = self.hosts.get(i.host.as_str()).map(|h| &h.inventory) {
                        let fits = |what: &str, asked: u64, has: u64| {
                            if has > 0 && asked > has {
                                Err(Rejection::Resize(format!(
                                    "{what} of {} asked, host {} has {}",
                                    crate::names::ByteSize(asked),
                                    i.host,
                                    crate::names::ByteSize(has)
                                )))
                            } else {
                                Ok(())
                            }
                        };
                        if inv.cpus > 0 && limits.cpus > inv.cpus {
                            return Err(Rejection::Resize(format!(
                                "{} CPUs asked, host {} has {}",
                                limits.cpus, i.host, inv.cpus
                            )));
                        }
                        fits("memory", limits.memory.0, inv.memory_bytes)?;
                        if let Some(pool) = inv.ssp_pool() {
                            // Growing takes free space from the pool; what it has now is the bound.
                            let grow = limits.disk.0.saturating_sub(i.limits.disk.0);
                            let free = pool.total_bytes.saturating_sub(pool.used_bytes);
                            if pool.total_bytes > 0 && grow > free {
                                return Err(Rejection::Resize(format!(
                                    "a disk of {} asked ({} more), pool {} on {} has {} free of {}",
                                    limits.disk,
                                    crate::names::ByteSize(grow),
                                    pool.name,
                                    i.host,
                                    crate::names::ByteSize(free),
                                    crate::names::ByteSize(pool.total_bytes)
                                )));
                            }
                        }
                    }
                    instances.push(i.name.clone());
                }
                if let Some(u) = self.users.get_mut(name) {
                    u.limits = limits;
                }
                for n in &instances {
                    if let Some(i) = self.instances.get_mut(n) {
                        i.limits = limits;
                    }
                }
                Ok(Outcome::Resized { instances })
            }
            Command::SetNetwork { name, network, lan } => {
                self.set_network(name, *network, lan.as_deref())
            }
            Command::SetRelay { relay } => self.set_relay(relay.as_ref()),
            Command::SetLan { name, pool } => {
                // Every address held on this LAN must stay in its pool: a container
                // keeps its address; an admin moves it off the LAN first.
                let outside: Vec<String> = self
                    .instances
                    .values()
                    .filter(|i| i.placement.lan.as_deref() == Some(name.as_str()))
                    .filter_map(|i| {
                        let a = i.lan_address?;
                        (!pool.is_some_and(|p| p.contains(a)))
                            .then(|| format!("{} holds {a}", i.name))
                    })
                    .collect();
                if !outside.is_empty() {
                    return Err(Rejection::Network(format!(
                        "on LAN {name}, {}; put them on forward first (`sspctl user network NAME forward`)",
                        outside.join(", ")
                    )));
                }
                match pool {
                    Some(p) => self.lans.insert(name.clone(), *p),
                    None => self.lans.remove(name),
                };
                Ok(Outcome::LanSet)
            }
            Command::SetSnapshotSchedule { name, schedule } => {
                self.not_an_account(name, "set the snapshot schedule of")?;
                let mut instances = Vec::new();
                for i in self.instances.values().filter(|i| i.owner.as_str() == name) {
                    if i.deleting {
                        return Err(Rejection::UserRemoving(name.clone()));
                    }
                    instances.push(i.name.clone());
                }
                let user = self
                    .users
                    .get_mut(name)
                    .ok_or_else(|| Rejection::UnknownUser(name.clone()))?;
                user.snapshots = *schedule;
                Ok(Outcome::SnapshotScheduleSet { instances })
            }
            Command::SetSshKeys { name, keys } => {
                if keys.is_empty() {
                    return Err(Rejection::NoSshKey(name.clone()));
                }
                if self
                    .users
                    .get(name)
                    .is_some_and(|u| u.kind == UserKind::Common)
                {
                    return Err(Rejection::Common(format!(
                        "{name} is a Common-Server: it has no keys of its own, its accounts do"
                    )));
                }
                let mut instances = Vec::new();
                for i in self.homes_of(name) {
                    if i.deleting {
                        return Err(Rejection::UserRemoving(i.owner.to_string()));
                    }
                    instances.push(i.name.clone());
                }
                let user = self
                    .users
                    .get_mut(name)
                    .ok_or_else(|| Rejection::UnknownUser(name.clone()))?;
                user.ssh_keys = keys.clone();
                Ok(Outcome::SshKeysSet { instances })
            }
            Command::RemoveUser { name } => {
                let Some(user) = self.users.get(name) else {
                    return Err(Rejection::UnknownUser(name.clone()));
                };
                if user.server().is_some() {
                    // The account goes from the Common-Server's container (its home
                    // is archived there); the person goes now.
                    let instances = self.homes_of(name).map(|i| i.name.clone()).collect();
                    if let Some(u) = self.users.remove(name) {
                        self.usage.uids.remove(u.uid);
                    }
                    return Ok(Outcome::UserRemoving { instances });
                }
                let accounts: Vec<String> =
                    self.accounts_of(name).map(|u| u.name.to_string()).collect();
                if !accounts.is_empty() {
                    return Err(Rejection::Common(format!(
                        "the Common-Server {name} still has accounts ({}); remove them first",
                        accounts.join(", ")
                    )));
                }
                if let Some(m) = self
                    .instances
                    .values()
                    .filter(|i| i.owner.as_str() == name)
                    .find_map(|i| self.moving(&i.name))
                {
                    return Err(Rejection::Migration(format!(
                        "{}'s container is moving to {} (migration {}, {}); wait for it or abort it with `sspctl migrate --abort {}`",
                        name, m.to.host, m.id, m.phase, m.id
                    )));
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
                    if let Some(u) = self.users.remove(name) {
                        self.usage.uids.remove(u.uid);
                    }
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
                if let Some(gone) = self.instances.remove(name) {
                    self.usage.remove(&gone);
                    if let Some(h) = self.hosts.get(gone.host.as_str()) {
                        self.usage.refresh(h);
                    }
                }
                let last = !self.instances.values().any(|i| i.owner.as_str() == owner);
                if last {
                    if let Some(u) = self.users.remove(&owner) {
                        self.usage.uids.remove(u.uid);
                    }
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
        if req.ssh_keys.is_empty() && req.kind != UserKind::Common {
            return Err(Rejection::NoSshKey(name.into()));
        }
        if let UserKind::Account { server } = &req.kind {
            return self.add_account(req, server);
        }
        let place = place::choose(self, &req.limits, req.gpus, &req.image, &req.placement)
            .map_err(|e: NoFit| Rejection::NoFit {
                user: name.into(),
                reason: e.to_string(),
            })?;
        let uid = self.free_uid()?;
        let lan = self
            .hosts
            .get(place.host.as_str())
            .and_then(|h| h.lan.clone());
        let lan_address = match (req.network, &lan) {
            (crate::types::Network::Lan, Some(l)) => {
                self.free_lan_address(l)
                    .map_err(|reason| Rejection::NoFit {
                        user: name.into(),
                        reason,
                    })?
            }
            _ => None,
        };
        let relay_port = self.free_relay_port().map_err(|reason| Rejection::NoFit {
            user: name.into(),
            reason,
        })?;
        let user = User {
            name: req.name.clone(),
            uid,
            role: req.role,
            ssh_keys: req.ssh_keys.clone(),
            limits: req.limits,
            gpus: req.gpus,
            snapshots: Default::default(),
            kind: req.kind.clone(),
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
            placement: crate::types::Constraints {
                gpu_model: req.placement.gpu_model.clone(),
                gpu_memory: req.placement.gpu_memory,
                host: None,
                spread: false,
                labels: req.placement.labels.clone(),
                lan: match req.network {
                    crate::types::Network::Lan => lan,
                    crate::types::Network::Forward => None,
                },
                desktop: req.desktop,
            },
            network: req.network,
            lan_address,
            relay_port,
            desktop: req.desktop,
        };
        Ok(self.insert_placed(user, instance))
    }

    /// The lowest free uid of the range; its last is the lab group's gid, never a user's.
    fn free_uid(&self) -> Result<u32, Rejection> {
        let s = self.settings();
        self.usage
            .uids
            .lowest_free(s.uid_first, s.lab_gid().saturating_sub(1))
            .ok_or(Rejection::NoFreeUid {
                first: s.uid_first,
                last: s.uid_last,
            })
    }

    /// Records a new user and their container, holding its uid, port and GPUs.
    fn insert_placed(&mut self, user: User, instance: Instance) -> Outcome {
        self.usage.uids.insert(user.uid);
        self.usage.add(&instance);
        if let Some(h) = self.hosts.get(instance.host.as_str()) {
            self.usage.refresh(h);
        }
        self.users.insert(user.name.to_string(), user.clone());
        self.instances
            .insert(instance.name.clone(), instance.clone());
        Outcome::UserAdded { user, instance }
    }

    /// A container made by hand becomes `req`'s: what it holds is checked against
    /// what is held, and recorded.
    fn adopt(
        &mut self,
        req: &NewUser,
        host: &str,
        gpus: &[PciAddress],
        ssh_port: Option<u16>,
    ) -> Result<Outcome, Rejection> {
        let name = req.name.as_str();
        let bad = |s: String| Err(Rejection::Adopt(format!("cannot adopt {name}: {s}")));
        if self.users.contains_key(name) {
            return Err(Rejection::UserExists(name.into()));
        }
        if self.instances.contains_key(name) {
            return Err(Rejection::InstanceExists(name.into()));
        }
        if req.ssh_keys.is_empty() {
            return Err(Rejection::NoSshKey(name.into()));
        }
        let Some(h) = self.hosts.get(host) else {
            return Err(Rejection::UnknownHost(host.into()));
        };
        if h.status == crate::types::HostStatus::Down {
            return bad(format!("host {host} is down"));
        }
        let usage = self.usage.hosts.get(host).cloned().unwrap_or_default();
        let mut seen = BTreeSet::new();
        for g in gpus {
            if !h.inventory.gpus.iter().any(|i| &i.pci == g) {
                return bad(format!("GPU {g} is not in host {host}'s inventory"));
            }
            if let Some(holder) = usage.gpus.get(g) {
                return bad(format!("its GPU {g} is held by {holder}"));
            }
            if !seen.insert(g) {
                return bad(format!("it passes GPU {g} twice"));
            }
        }
        let (first, last) = h.ssh_ports;
        let port = match ssh_port {
            Some(p) if !(first..=last).contains(&p) => {
                return bad(format!(
                    "its SSH port {p} is outside host {host}'s ssh_ports {first}-{last} (widen ssh_ports in the agent's config, or remove its proxy device and ssp gives it a port)"
                ))
            }
            Some(p) if usage.own.contains(&u32::from(p)) => {
                let holder = self
                    .instances
                    .values()
                    .find(|i| i.host.as_str() == host && i.ssh_port == p)
                    .map(|i| i.name.clone())
                    .unwrap_or_else(|| "a move".into());
                return bad(format!("its SSH port {p} is held by {holder}"));
            }
            Some(p) => p,
            None => match usage.ports.lowest_free(first.into(), last.into()) {
                Some(p) => p as u16,
                None => return bad(format!("no free SSH port left on host {host}")),
            },
        };
        let uid = self.free_uid()?;
        let user = User {
            name: req.name.clone(),
            uid,
            role: req.role,
            ssh_keys: req.ssh_keys.clone(),
            limits: req.limits,
            gpus: gpus.len() as u32,
            snapshots: Default::default(),
            kind: UserKind::Personal,
        };
        let instance = Instance {
            name: name.to_string(),
            owner: req.name.clone(),
            host: h.name.clone(),
            gpus: gpus.to_vec(),
            ssh_port: port,
            limits: req.limits,
            image: req.image.clone(),
            shares: req.shares.clone(),
            deleting: false,
            placement: Default::default(),
            network: Default::default(),
            lan_address: None,
            desktop: false,
            relay_port: self.free_relay_port().map_err(|reason| Rejection::NoFit {
                user: req.name.to_string(),
                reason,
            })?,
        };
        Ok(self.insert_placed(user, instance))
    }

    /// A person with an account in Common-Server `server`: a uid and a record, no
    /// container; the outcome names the Common-Server's container, which gets the
    /// account.
    fn add_account(
        &mut self,
        req: &NewUser,
        server: &crate::Username,
    ) -> Result<Outcome, Rejection> {
        let name = req.name.as_str();
        let common = self
            .users
            .get(server.as_str())
            .filter(|u| u.kind == UserKind::Common)
            .ok_or_else(|| {
                Rejection::Common(format!(
                    "{server} is not a Common-Server; make one with `sspctl common create {server}`"
                ))
            })?;
        let instance = self
            .instances
            .get(server.as_str())
            .filter(|i| i.owner == common.name)
            .ok_or_else(|| {
                Rejection::Common(format!("the Common-Server {server} has no container"))
            })?
            .clone();
        if instance.deleting {
            return Err(Rejection::UserRemoving(server.to_string()));
        }
        let uid = self.free_uid()?;
        let user = User {
            name: req.name.clone(),
            uid,
            role: req.role,
            ssh_keys: req.ssh_keys.clone(),
            limits: instance.limits,
            gpus: 0,
            snapshots: Default::default(),
            kind: req.kind.clone(),
        };
        self.usage.uids.insert(uid);
        self.users.insert(name.into(), user.clone());
        Ok(Outcome::UserAdded { user, instance })
    }

    /// The containers a user's account is in: their own, or (an account in a
    /// Common-Server) the Common-Server's.
    pub fn homes_of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        let owner = match self.users.get(user).and_then(User::server) {
            Some(server) => server.as_str(),
            None => user,
        };
        self.instances
            .values()
            .filter(move |i| i.owner.as_str() == owner)
    }

    /// The accounts of Common-Server `server`, by name.
    pub fn accounts_of<'a>(&'a self, server: &'a str) -> impl Iterator<Item = &'a User> + 'a {
        self.users
            .values()
            .filter(move |u| u.server().is_some_and(|s| s.as_str() == server))
    }

    /// `name`'s containers reached by `network`: on the LAN only where their host
    /// is on one (this one, if named), which is recorded so a move stays on it.
    fn set_network(
        &mut self,
        name: &str,
        network: crate::types::Network,
        lan: Option<&str>,
    ) -> Result<Outcome, Rejection> {
        if !self.users.contains_key(name) {
            return Err(Rejection::UnknownUser(name.into()));
        }
        self.not_an_account(name, "change the network of")?;
        let mut changes = Vec::new();
        for i in self.instances.values().filter(|i| i.owner.as_str() == name) {
            if i.deleting {
                return Err(Rejection::UserRemoving(name.into()));
            }
            if let Some(m) = self.moving(&i.name) {
                return Err(Rejection::Migration(format!(
                    "{name}'s container is moving to {} (migration {}, {}); change its network when the move is done",
                    m.to.host, m.id, m.phase
                )));
            }
            let host_lan = self.hosts.get(i.host.as_str()).and_then(|h| h.lan.clone());
            let record = match (network, host_lan) {
                (crate::types::Network::Forward, _) => None,
                (crate::types::Network::Lan, None) => {
                    return Err(Rejection::Network(format!(
                        "{}'s host {} is on no LAN (its agent has no [lan]); move it to a host on one first",
                        i.name, i.host
                    )))
                }
                (crate::types::Network::Lan, Some(l)) if lan.is_some_and(|w| !w.is_empty() && w != l) => {
                    return Err(Rejection::Network(format!(
                        "{}'s host {} is on LAN {l}, not {}",
                        i.name,
                        i.host,
                        lan.unwrap_or_default()
                    )))
                }
                (crate::types::Network::Lan, Some(l)) => Some(l),
            };
            changes.push((i.name.clone(), record));
        }
        // Static addresses for those joining a LAN with a pool, all checked first.
        let mut given: BTreeMap<String, Numbers> = BTreeMap::new();
        let mut plan = Vec::new();
        for (n, record) in changes {
            let Some(i) = self.instances.get(&n) else {
                continue;
            };
            let same_lan = i.placement.lan == record;
            let address = match &record {
                None => None,
                Some(_) if same_lan && i.lan_address.is_some() => i.lan_address,
                Some(l) => match self.lans.get(l) {
                    None => None,
                    Some(pool) => {
                        let taken = given.entry(l.clone()).or_default();
                        let held = self.usage.lan_addrs.get(l);
                        let free = (u32::from(pool.first)..=u32::from(pool.last))
                            .find(|a| !taken.contains(*a) && !held.is_some_and(|h| h.contains(*a)));
                        let Some(a) = free else {
                            return Err(Rejection::Network(format!(
                                "no free address left in LAN {l}'s pool {pool}"
                            )));
                        };
                        taken.insert(a);
                        Some(a.into())
                    }
                },
            };
            plan.push((n, record, address));
        }
        let mut instances = Vec::new();
        for (n, record, address) in plan {
            let Some(old) = self.instances.get(&n).cloned() else {
                continue;
            };
            if old.network == network && old.placement.lan == record && old.lan_address == address {
                continue;
            }
            let mut new = old.clone();
            new.network = network;
            new.placement.lan = record;
            new.lan_address = address;
            self.usage.remove(&old);
            self.usage.add(&new);
            self.instances.insert(n.clone(), new);
            instances.push(n);
        }
        Ok(Outcome::NetworkSet { instances })
    }

    /// The relay: ports held stay (each must be in the new range), every
    /// container without one gets the lowest free; no relay, no ports.
    fn set_relay(&mut self, relay: Option<&crate::types::Relay>) -> Result<Outcome, Rejection> {
        let Some(r) = relay else {
            self.relay = None;
            let held: Vec<String> = self
                .instances
                .values()
                .filter(|i| i.relay_port.is_some())
                .map(|i| i.name.clone())
                .collect();
            for n in &held {
                self.set_relay_port(n, None);
            }
            return Ok(Outcome::RelaySet { instances: held });
        };
        let (first, last) = r.ports;
        if first == 0 || first > last {
            return Err(Rejection::Network(format!(
                "relay ports {first}-{last}: expected FIRST-LAST with 0 < FIRST <= LAST"
            )));
        }
        let outside: Vec<String> = self
            .instances
            .values()
            .filter_map(|i| {
                let p = i.relay_port?;
                (!(first..=last).contains(&p)).then(|| format!("{} holds {p}", i.name))
            })
            .collect();
        if !outside.is_empty() {
            return Err(Rejection::Network(format!(
                "the relay ports {first}-{last} leave out ports in use ({}); keep them in the range",
                outside.join(", ")
            )));
        }
        let without: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.relay_port.is_none() && !i.deleting)
            .map(|i| i.name.clone())
            .collect();
        let free =
            (u32::from(last - first) + 1).saturating_sub(self.usage.relay_ports.len() as u32);
        if (without.len() as u32) > free {
            return Err(Rejection::Network(format!(
                "{} containers need a relay port and {first}-{last} has {free} free",
                without.len()
            )));
        }
        self.relay = Some(r.clone());
        for n in &without {
            let p = self
                .usage
                .relay_ports
                .lowest_free(first.into(), last.into());
            self.set_relay_port(n, p.map(|p| p as u16));
        }
        Ok(Outcome::RelaySet { instances: without })
    }

    /// Gives `name` relay port `port` (or none), keeping the usage index current.
    fn set_relay_port(&mut self, name: &str, port: Option<u16>) {
        if let Some(old) = self.instances.get(name).cloned() {
            let mut new = old.clone();
            new.relay_port = port;
            self.usage.remove(&old);
            self.usage.add(&new);
            self.instances.insert(name.to_string(), new);
        }
    }

    /// A relay port for a new container: `None` without a relay, else the lowest
    /// free, or why there is none.
    fn free_relay_port(&self) -> Result<Option<u16>, String> {
        let Some(r) = &self.relay else {
            return Ok(None);
        };
        self.usage
            .relay_ports
            .lowest_free(r.ports.0.into(), r.ports.1.into())
            .map(|p| Some(p as u16))
            .ok_or_else(|| format!("no free relay port left in {}-{}", r.ports.0, r.ports.1))
    }

    /// The lowest free address of `lan`'s pool, `None` when the LAN has no pool
    /// (its DHCP server gives addresses), or why there is none.
    fn free_lan_address(&self, lan: &str) -> Result<Option<std::net::Ipv4Addr>, String> {
        let Some(pool) = self.lans.get(lan) else {
            return Ok(None);
        };
        let (first, last) = (u32::from(pool.first), u32::from(pool.last));
        let free = match self.usage.lan_addrs.get(lan) {
            Some(held) => held.lowest_free(first, last),
            None => Some(first),
        };
        free.map(|a| Some(a.into()))
            .ok_or_else(|| format!("no free address left in LAN {lan}'s pool {pool}"))
    }

    /// Refuses a change of limits or schedule on an account in a Common-Server:
    /// those belong to the Common-Server.
    fn not_an_account(&self, name: &str, what: &str) -> Result<(), Rejection> {
        match self.users.get(name).and_then(User::server) {
            Some(server) => Err(Rejection::Common(format!(
                "{name} has an account in the Common-Server {server}, not a container of their own; {what} {server} instead"
            ))),
            None => Ok(()),
        }
    }

    /// The move of `instance` in progress, if any.
    pub fn moving(&self, instance: &str) -> Option<&Migration> {
        self.migrations
            .values()
            .rev()
            .find(|m| m.instance == instance && !m.phase.finished())
    }

    fn migrate(&mut self, cmd: &MigrationCommand) -> Result<Migration, Rejection> {
        let bad = |s: String| Rejection::Migration(s);
        match cmd {
            MigrationCommand::Begin {
                instance,
                to,
                at_ms,
            } => {
                let inst = self
                    .instances
                    .get(instance)
                    .ok_or_else(|| Rejection::UnknownInstance(instance.clone()))?;
                if inst.deleting {
                    return Err(Rejection::UserRemoving(inst.owner.to_string()));
                }
                if let Some(m) = self.moving(instance) {
                    return Err(bad(format!(
                        "container {instance} is already moving to {} (migration {}, {})",
                        m.to.host, m.id, m.phase
                    )));
                }
                if let Some(h) = to {
                    if !self.hosts.contains_key(h.as_str()) {
                        return Err(bad(format!(
                            "host {h} is not registered (registered: {})",
                            self.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                        )));
                    }
                    if *h == inst.host {
                        return Err(bad(format!("container {instance} is already on {h}")));
                    }
                }
                let p = place::choose_for_move(self, inst, to.as_ref()).map_err(|e| {
                    Rejection::NoFit {
                        user: inst.owner.to_string(),
                        reason: e.to_string(),
                    }
                })?;
                let id = self.next_migration.max(1);
                let mut m = Migration {
                    id,
                    instance: instance.clone(),
                    from: Side {
                        host: inst.host.clone(),
                        gpus: inst.gpus.clone(),
                        ssh_port: inst.ssh_port,
                    },
                    to: Side {
                        host: p.host,
                        gpus: p.gpus,
                        ssh_port: p.ssh_port,
                    },
                    phase: Phase::Copying,
                    started_ms: *at_ms,
                    updated_ms: *at_ms,
                    ssh: false,
                    downtime_ms: None,
                    note: String::new(),
                    events: Vec::new(),
                };
                m.log(
                    *at_ms,
                    format!("from {} to {}: copying", m.from.host, m.to.host),
                );
                self.next_migration = id + 1;
                self.usage.hold_side(instance, &m.to);
                if let Some(h) = self.hosts.get(m.to.host.as_str()) {
                    self.usage.refresh(h);
                }
                self.migrations.insert(id, m.clone());
                Ok(m)
            }
            MigrationCommand::Advance {
                id,
                phase,
                note,
                at_ms,
                ssh,
            } => {
                let m = self
                    .migrations
                    .get_mut(id)
                    .ok_or_else(|| bad(format!("no migration {id}")))?;
                let allowed = *phase == m.phase
                    || matches!(
                        (m.phase, phase),
                        (Phase::Copying, Phase::Syncing)
                            | (Phase::Syncing, Phase::Starting)
                            | (Phase::Copying | Phase::Syncing, Phase::RollingBack)
                    );
                if !allowed || m.phase.finished() {
                    return Err(bad(format!(
                        "migration {id} is {}; it cannot go to {phase}",
                        m.phase
                    )));
                }
                if *phase != m.phase {
                    m.log(*at_ms, phase.to_string());
                }
                if let Some(s) = ssh {
                    m.ssh = *s;
                }
                m.phase = *phase;
                m.updated_ms = m.updated_ms.max(*at_ms);
                if !note.is_empty() && *note != m.note {
                    m.log(*at_ms, note.clone());
                }
                // A rollback keeps the reason it began with; later errors (it waits
                // for a host) are in the events.
                let keep = *phase == Phase::RollingBack && !m.note.is_empty();
                if !keep {
                    m.note = note.clone();
                }
                Ok(m.clone())
            }
            MigrationCommand::Switch {
                id,
                downtime_ms,
                at_ms,
            } => {
                let m = self
                    .migrations
                    .get(id)
                    .ok_or_else(|| bad(format!("no migration {id}")))?;
                if m.phase != Phase::Starting {
                    return Err(bad(format!(
                        "migration {id} is {}; only a starting one switches",
                        m.phase
                    )));
                }
                let mut m = m.clone();
                let inst = self
                    .instances
                    .get(&m.instance)
                    .cloned()
                    .ok_or_else(|| Rejection::UnknownInstance(m.instance.clone()))?;
                self.usage.release_side(&m.to);
                self.usage.remove(&inst);
                let mut moved = inst;
                moved.host = m.to.host.clone();
                moved.gpus = m.to.gpus.clone();
                moved.ssh_port = m.to.ssh_port;
                self.usage.add(&moved);
                self.usage.hold_side(&m.instance, &m.from);
                for h in [&m.from.host, &m.to.host] {
                    if let Some(h) = self.hosts.get(h.as_str()) {
                        self.usage.refresh(h);
                    }
                }
                self.instances.insert(m.instance.clone(), moved);
                m.phase = Phase::Cleaning;
                m.downtime_ms = Some(*downtime_ms);
                m.note.clear();
                m.log(
                    *at_ms,
                    format!("running on {} ({downtime_ms} ms down); cleaning", m.to.host),
                );
                self.migrations.insert(*id, m.clone());
                Ok(m)
            }
            MigrationCommand::Finish { id, at_ms } => {
                let m = self
                    .migrations
                    .get_mut(id)
                    .ok_or_else(|| bad(format!("no migration {id}")))?;
                let (end, held) = match m.phase {
                    Phase::Cleaning => (Phase::Done, m.from.clone()),
                    Phase::RollingBack => (Phase::Failed, m.to.clone()),
                    p => {
                        return Err(bad(format!(
                            "migration {id} is {p}; only a cleaning or rolling-back one finishes"
                        )))
                    }
                };
                m.phase = end;
                if end == Phase::Done {
                    m.note.clear();
                }
                m.log(*at_ms, end.to_string());
                let m = m.clone();
                self.usage.release_side(&held);
                if let Some(h) = self.hosts.get(held.host.as_str()) {
                    self.usage.refresh(h);
                }
                // Keep the last finished ones for `sspctl migrations`.
                let finished: Vec<u64> = self
                    .migrations
                    .values()
                    .filter(|m| m.phase.finished())
                    .map(|m| m.id)
                    .collect();
                let extra = finished
                    .len()
                    .saturating_sub(crate::migration::KEEP_FINISHED);
                for old in finished.into_iter().take(extra) {
                    self.migrations.remove(&old);
                }
                Ok(m)
            }
        }
    }

    /// The instance holding GPU `pci` on `host`, if any.
    pub fn gpu_holder(&self, host: &str, pci: &crate::PciAddress) -> Option<&Instance> {
        match self.usage() {
            Some(u) => u
                .hosts
                .get(host)
                .and_then(|h| h.gpus.get(pci))
                .and_then(|name| self.instances.get(name)),
            None => self
                .instances
                .values()
                .find(|i| i.host.as_str() == host && i.gpus.contains(pci)),
        }
    }
}

#[cfg(test)]
mod tests;
