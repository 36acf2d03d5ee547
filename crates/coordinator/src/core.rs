//! The coordinator's core: the replicated state, the agents, and converging one
//! instance at a time towards its desired state.
//!
//! Only the raft leader drives agents. Every path that acts on a container
//! (adding a user, removing one, the periodic reconcile) goes through
//! [`Core::converge`], which holds that instance's lock and re-reads the desired
//! state under it. So a reconcile pass working from an old snapshot can never
//! re-create a container that was just removed, and two passes never work on one
//! container at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ssp_model::{Command, Outcome, Rejection, State};
use ssp_proto::InstanceStatus;
use tokio::sync::{Mutex as AsyncMutex, Notify};
use tonic::Status;

use crate::agents::{AgentError, Agents};
use crate::config::CoordinatorConfig;
use crate::convert;
use crate::plan::{self, Backoff, Step};
use crate::raft::batch::WriteError;
use crate::raft::{Replica, Reply, Request};

/// Shared by the gRPC services and the reconcile loop.
#[derive(Clone)]
pub struct Core {
    pub replica: Replica,
    pub agents: Agents,
    pub cfg: Arc<CoordinatorConfig>,
    pub peers: crate::cluster::Peers,
    /// This coordinator's certificate, the CA and the revoked serials.
    pub tls: ssp_net::Tls,
    locks: Arc<AsyncMutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    kick: Arc<Notify>,
    /// When each host last heartbeat to this coordinator (meaningful on the leader).
    pub last_seen: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
    /// Per-instance retry backoff of the reconciler.
    backoff: Arc<std::sync::Mutex<Backoff>>,
    /// What the last reconcile pass found on each host and left alone.
    found: Arc<std::sync::Mutex<HashMap<String, Found>>>,
    /// The moves between hosts this coordinator drives (as leader).
    pub driving: crate::migrate::Driving,
}

/// Containers on a host that ssp leaves alone, from the last reconcile pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Not created by ssp.
    pub unmanaged: Vec<String>,
    /// ssp's, but the state does not place them on this host.
    pub stray: Vec<String>,
}

/// What converging an instance did.
#[derive(Debug)]
pub enum Converged {
    /// The instance runs as specified.
    Ensured(Box<InstanceStatus>),
    /// It was marked for removal; the host deleted it and it is forgotten.
    Deleted,
    /// It is not in the desired state (any more).
    Gone,
    /// It is moving between hosts: the move's driver acts on it, nothing else.
    Moving,
}

/// A write's result: its outcome, or `Earlier` when the same request id was
/// applied before (a client retry) and succeeded then.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Applied {
    Now(Outcome),
    Earlier { index: u64 },
}

/// The one mapping from state-machine rejections to gRPC status codes.
pub fn rejection_status(r: Rejection) -> Status {
    match &r {
        Rejection::UserExists(_) | Rejection::InstanceExists(_) => {
            Status::already_exists(r.to_string())
        }
        Rejection::UnknownUser(_) | Rejection::UnknownInstance(_) | Rejection::UnknownHost(_) => {
            Status::not_found(r.to_string())
        }
        Rejection::NoFit { .. } | Rejection::NoFreeUid { .. } => {
            Status::resource_exhausted(r.to_string())
        }
        Rejection::NotDeleting(_)
        | Rejection::UserRemoving(_)
        | Rejection::Trust(_)
        | Rejection::Migration(_)
        | Rejection::Resize(_)
        | Rejection::Network(_)
        | Rejection::Common(_)
        | Rejection::Adopt(_) => Status::failed_precondition(r.to_string()),
        Rejection::NoSshKey(_) | Rejection::DuplicateGpu { .. } => {
            Status::invalid_argument(r.to_string())
        }
    }
}

impl Core {
    pub fn new(replica: Replica, cfg: CoordinatorConfig, tls: ssp_net::Tls) -> Self {
        Core {
            replica,
            agents: Agents::new(tls.clone()),
            cfg: Arc::new(cfg),
            peers: crate::cluster::Peers::new(tls.clone()),
            tls,
            locks: Default::default(),
            kick: Default::default(),
            last_seen: Default::default(),
            backoff: Default::default(),
            found: Default::default(),
            driving: Default::default(),
        }
    }

    /// What the last reconcile pass found on `host` and left alone.
    pub fn found(&self, host: &str) -> Found {
        self.found
            .lock()
            .ok()
            .and_then(|m| m.get(host).cloned())
            .unwrap_or_default()
    }

    /// Whether this node is the leader right now (as far as it knows).
    pub fn is_leader(&self) -> bool {
        self.replica.raft.metrics().borrow().current_leader == Some(self.replica.id)
    }

    /// Replicates `cmd` through raft; returns once a quorum stored it and this
    /// node applied it. `id` makes a retried request apply once.
    pub async fn apply(&self, cmd: Command, id: Option<String>) -> Result<Applied, Status> {
        self.apply_as(cmd, id, None).await
    }

    /// Like [`Core::apply`], recording `actor` (from their certificate) in the audit log.
    pub async fn apply_as(
        &self,
        cmd: Command,
        id: Option<String>,
        actor: Option<crate::raft::Actor>,
    ) -> Result<Applied, Status> {
        match self.replica.writer.write(Request { id, cmd, actor }).await {
            Ok(Reply::Done(o)) => Ok(Applied::Now(o)),
            Ok(Reply::Rejected(r)) => Err(rejection_status(r)),
            Ok(Reply::AlreadyApplied {
                rejected: Some(r), ..
            }) => Err(rejection_status(r)),
            Ok(Reply::AlreadyApplied {
                index,
                rejected: None,
            }) => Ok(Applied::Earlier { index }),
            Err(WriteError::NotLeader(leader)) => Err(Status::unavailable(format!(
                "this coordinator stopped being the leader{}; retry",
                leader
                    .map(|a| format!(" (the leader is now {a})"))
                    .unwrap_or_default()
            ))),
            Err(WriteError::Failed(e)) => Err(Status::unavailable(format!(
                "replication failed: {e}; retry"
            ))),
        }
    }

    /// Reads this node's replica of the state in place (callers decide how current it must be).
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.replica.read(|m| f(&m.state))
    }

    /// A copy of this node's replica of the state.
    pub fn snapshot(&self) -> State {
        self.read(State::clone)
    }

    /// Asks the reconcile loop for a pass soon; passes asked for together run once.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .await
            .entry(name.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// Forgets per-instance locks and backoff nobody uses (instances gone), and
    /// channels to hosts and coordinators that are no longer members.
    async fn prune(&self) {
        self.locks
            .lock()
            .await
            .retain(|_, m| Arc::strong_count(m) > 1);
        let (instances, agents): (BTreeSet<String>, Vec<String>) = self.read(|s| {
            (
                s.instances.keys().cloned().collect(),
                s.hosts
                    .values()
                    .map(|h| h.agent_address.to_string())
                    .collect(),
            )
        });
        if let Ok(mut b) = self.backoff.lock() {
            b.retain(|name| instances.contains(name));
        }
        self.agents.retain(&agents).await;
        self.peers.retain(&self.coordinator_addresses());
    }

    /// Drives one instance towards its desired state: ensure it, or delete and forget it.
    pub async fn converge(&self, name: &str) -> Result<Converged, AgentError> {
        let _guard = self.lock(name).await;
        // Take only what this instance needs from the state, under the read lock.
        enum Plan {
            Gone,
            Moving,
            Delete(String),
            Ensure(String, Box<ssp_proto::InstanceSpec>),
        }
        let (plan, state_for_host) = self.read(|state| {
            let Some(inst) = state.instances.get(name) else {
                return (Plan::Gone, None);
            };
            if state.moving(name).is_some() {
                return (Plan::Moving, None);
            }
            let host = state.hosts.get(inst.host.as_str()).cloned();
            if inst.deleting {
                return (Plan::Delete(inst.host.to_string()), host);
            }
            let Some(spec) = convert::spec_of(state, inst) else {
                return (Plan::Gone, None);
            };
            (Plan::Ensure(inst.host.to_string(), Box::new(spec)), host)
        });
        match plan {
            Plan::Gone => Ok(Converged::Gone),
            Plan::Moving => Ok(Converged::Moving),
            Plan::Delete(host) => {
                self.agents
                    .delete(state_for_host.as_ref(), &host, name)
                    .await?;
                match self
                    .apply(Command::ForgetInstance { name: name.into() }, None)
                    .await
                {
                    Ok(_) => Ok(Converged::Deleted),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(Converged::Deleted),
                    Err(s) => Err(AgentError::Call {
                        host,
                        message: s.message().to_string(),
                    }),
                }
            }
            Plan::Ensure(host, spec) => {
                let st = self
                    .agents
                    .ensure(state_for_host.as_ref(), &host, *spec)
                    .await?;
                Ok(Converged::Ensured(Box::new(st)))
            }
        }
    }

    /// Whether a quorum confirms this node as leader now; the replica has then
    /// applied everything committed up to the confirmation.
    pub(crate) async fn confirm_leader(&self) -> bool {
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.replica.raft.ensure_linearizable(),
        )
        .await
        {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::info!("reconcile stopped: leadership not confirmed: {e}");
                false
            }
            Err(_) => {
                tracing::info!("reconcile stopped: no quorum confirmed the leadership within 5 s");
                false
            }
        }
    }

    /// One reconcile pass over every host that is not down (or just `only_host`):
    /// each agent lists its containers, [`plan::plan`] compares that with the
    /// desired state, hosts whose members files are stale get the member list, and
    /// the steps run one by one through [`Core::converge`] (idempotent), each
    /// instance under its own backoff. A host that stops answering is skipped for
    /// the rest of the pass.
    pub async fn reconcile(&self, only_host: Option<&str>) {
        if !self.is_leader() {
            return;
        }
        // A leader cut off from the other coordinators does not know it at once
        // (openraft keeps it leader until it hears a higher term), while its state may
        // miss what a newer leader did since: a user removed there would be made
        // again here. A quorum confirms the leadership and the state is brought up to
        // the confirmed index before anything is planned.
        if !self.confirm_leader().await {
            return;
        }
        let mut confirmed = Instant::now();
        let hosts: Vec<ssp_model::Host> = self.read(|s| {
            s.hosts
                .values()
                .filter(|h| h.status != ssp_model::HostStatus::Down)
                .filter(|h| only_host.is_none_or(|o| o == h.name.as_str()))
                .cloned()
                .collect()
        });
        let listed = futures::future::join_all(hosts.iter().map(|h| async move {
            (
                h.name.to_string(),
                self.agents.report(Some(h), h.name.as_str(), false).await,
            )
        }))
        .await;
        let mut reports = std::collections::BTreeMap::new();
        for (host, r) in listed {
            match r {
                Ok(list) => {
                    reports.insert(host, list);
                }
                Err(e) => tracing::warn!(%host, "reconcile: no report: {e}"),
            }
        }
        let plan = self.read(|s| plan::plan(s, &reports));
        self.record_found(&reports, &plan);
        if !plan.failing.is_empty() {
            tracing::warn!(instances = ?plan.failing, "crash-looping; the agents back off");
        }
        let mut down: BTreeSet<String> = BTreeSet::new();
        self.push_members(&hosts, &plan.members, &mut down).await;
        for step in plan.steps {
            let name = step.name().to_string();
            if !self.is_leader() {
                return;
            }
            // Steps of a long pass: confirmed again once a second has gone by.
            if confirmed.elapsed() > Duration::from_secs(1) {
                if !self.confirm_leader().await {
                    return;
                }
                confirmed = Instant::now();
            }
            let host = self.read(|s| s.instances.get(&name).map(|i| i.host.to_string()));
            if host.as_ref().is_some_and(|h| down.contains(h)) {
                continue;
            }
            let ready = self
                .backoff
                .lock()
                .map(|b| b.ready(&name, Instant::now()))
                .unwrap_or(true);
            if !ready {
                continue;
            }
            let why = match &step {
                Step::Ensure { why, .. } => *why,
                Step::Delete { .. } => "marked for removal",
            };
            match self.converge(&name).await {
                Ok(c) => {
                    if let Ok(mut b) = self.backoff.lock() {
                        b.succeeded(&name);
                    }
                    match c {
                        Converged::Ensured(st) if !st.changed.is_empty() => {
                            tracing::info!(instance = %name, why, changed = ?st.changed, "reconciled")
                        }
                        Converged::Deleted => {
                            tracing::info!(instance = %name, "deleted and forgotten")
                        }
                        _ => {}
                    }
                }
                Err(e) => {
                    let wait = self
                        .backoff
                        .lock()
                        .map(|mut b| b.failed(&name, Instant::now()))
                        .unwrap_or_default();
                    if matches!(
                        e,
                        AgentError::Timeout { .. } | AgentError::Unreachable { .. }
                    ) {
                        down.extend(host);
                    }
                    tracing::warn!(instance = %name, why, retry_in_secs = wait.as_secs(), "reconcile: {e}")
                }
            }
        }
    }

    /// Sends the lab's member list to each of `stale` (hosts whose members files
    /// differ from it), all at once. Only the members files change there: no
    /// container is touched. A host that does not answer joins `down`.
    async fn push_members(
        &self,
        hosts: &[ssp_model::Host],
        stale: &[String],
        down: &mut BTreeSet<String>,
    ) {
        if stale.is_empty() {
            return;
        }
        let members = self.read(|s| convert::lab_members(s.users.values(), &s.settings()));
        let sent = futures::future::join_all(
            hosts
                .iter()
                .filter(|h| stale.iter().any(|n| n == h.name.as_str()))
                .map(|h| {
                    let members = members.clone();
                    async move {
                        let r = self
                            .agents
                            .set_members(Some(h), h.name.as_str(), members)
                            .await;
                        (h.name.to_string(), r)
                    }
                }),
        )
        .await;
        for (host, r) in sent {
            match r {
                Ok(hash) => {
                    tracing::info!(%host, members = members.members.len(), %hash, "lab members sent")
                }
                Err(e) => {
                    if matches!(
                        e,
                        AgentError::Timeout { .. } | AgentError::Unreachable { .. }
                    ) {
                        down.insert(host.clone());
                    }
                    tracing::warn!(%host, "reconcile: lab members not sent: {e}")
                }
            }
        }
    }

    /// Keeps what a pass found and left alone, logging what is new.
    fn record_found(
        &self,
        reports: &std::collections::BTreeMap<String, ssp_proto::InstanceList>,
        plan: &plan::Plan,
    ) {
        let Ok(mut found) = self.found.lock() else {
            return;
        };
        for host in reports.keys() {
            let now = Found {
                unmanaged: plan.unmanaged.get(host).cloned().unwrap_or_default(),
                stray: plan.stray.get(host).cloned().unwrap_or_default(),
            };
            if found.get(host) != Some(&now) {
                if !now.unmanaged.is_empty() {
                    tracing::info!(%host, containers = ?now.unmanaged, "containers ssp did not create; left alone");
                }
                if !now.stray.is_empty() {
                    tracing::warn!(%host, containers = ?now.stray, "ssp containers the state does not place on this host; left alone");
                }
            }
            found.insert(host.clone(), now);
        }
    }

    /// Records a heartbeat from `host`.
    pub fn seen(&self, host: &str) {
        if let Ok(mut m) = self.last_seen.lock() {
            m.insert(host.to_string(), Instant::now());
        }
    }

    /// How long ago `host` heartbeat, if this coordinator heard it.
    pub fn seen_ago(&self, host: &str) -> Option<Duration> {
        self.last_seen
            .lock()
            .ok()
            .and_then(|m| m.get(host).map(|t| t.elapsed()))
    }

    /// The leader marks a ready host down when it has not heartbeat for
    /// `timeout` (counting from when this node became leader, for hosts it has
    /// not heard yet). A heartbeat marks it ready again (see the service).
    pub async fn host_monitor(self, timeout: Duration) {
        let mut leader_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !self.is_leader() {
                leader_since = None;
                continue;
            }
            let since = *leader_since.get_or_insert_with(Instant::now);
            let ready: Vec<String> = self.read(|s| {
                s.hosts
                    .values()
                    .filter(|h| h.status == ssp_model::HostStatus::Ready)
                    .map(|h| h.name.to_string())
                    .collect()
            });
            for name in ready {
                let silent = self.seen_ago(&name).unwrap_or_else(|| since.elapsed());
                if silent > timeout {
                    let cmd = Command::SetHostStatus {
                        name: name.clone(),
                        status: ssp_model::HostStatus::Down,
                    };
                    match self.apply(cmd, None).await {
                        Ok(_) => {
                            tracing::warn!(host = %name, silent_secs = silent.as_secs(), "host marked down: no heartbeat")
                        }
                        Err(e) => {
                            tracing::warn!(host = %name, "marking the host down failed: {}", e.message())
                        }
                    }
                }
            }
        }
    }

    /// The leader's background duties: settle the settings once, then reconcile
    /// every `every` and whenever kicked.
    pub async fn leader_loop(self, every: Duration) {
        let mut was_leader = false;
        let mut last_pass: Option<Instant> = None;
        loop {
            // Leadership is checked often; full passes run every `every` or when kicked.
            let mut due = tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => false,
                _ = self.kick.notified() => true,
            };
            let leader = self.is_leader();
            if leader && !was_leader {
                tracing::info!(node = self.replica.id, "this coordinator is the leader");
                if let Err(e) = self.settle_settings().await {
                    tracing::warn!("recording the settings failed: {}", e.message());
                    continue;
                }
                due = true;
            }
            was_leader = leader;
            if leader {
                // Moves a previous leader left (or this one dropped) go on.
                self.drive_unfinished();
            }
            if !leader || !(due || last_pass.is_none_or(|t| t.elapsed() >= every)) {
                continue;
            }
            self.reconcile(None).await;
            self.prune().await;
            last_pass = Some(Instant::now());
            // Kicks that arrive during a pass are served by one more pass, and a
            // stream of writes does not keep the leader reconciling back to back.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Records the cluster-wide settings from this coordinator's config, once.
    pub async fn settle_settings(&self) -> Result<(), Status> {
        if self.read(|s| s.settings.is_some()) {
            return Ok(());
        }
        let init = Command::Init(ssp_model::Settings {
            uid_first: self.cfg.uid_range.0,
            uid_last: self.cfg.uid_range.1,
        });
        self.apply(init, None).await.map(|_| ())
    }
}
