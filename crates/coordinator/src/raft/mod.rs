//! The replicated state machine: openraft over redb, with gRPC between coordinators.
//!
//! Every change to ssp's desired state is a [`Request`] appended to the raft log.
//! The log and the vote are stored in redb and fsynced before openraft is told
//! they are written, so an entry counted towards a quorum survives a crash. The
//! state machine itself lives in memory; it is rebuilt at start from the latest
//! snapshot (also in redb) and the committed log after it.
//!
//! Writes arriving together share one log entry (see [`batch`]).
//!
//! A request may carry a client-chosen id: the state machine remembers the ids it
//! applied, so a write retried after a timeout or a leader change is applied once.

pub mod batch;
pub mod log;
pub mod machine;
pub mod network;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use ssp_model::{Command, Outcome, Rejection};

use crate::config::RaftTuning;
pub use machine::Machine;

/// Coordinator node ids; random at first start, so a wiped node never reuses an id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// ssp's raft types.
    pub TypeConfig:
        D = Batch,
        R = Vec<Reply>,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// One entry in the log: a command and, optionally, the client's id for it and
/// who asked (from their certificate), which puts it in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: Option<String>,
    pub cmd: Command,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
}

/// Who sent a request, as their certificate says, and when the coordinator
/// that proposed it received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// `role:name`.
    pub label: String,
    pub serial: String,
    pub at_ms: i64,
}

/// One log entry: requests that arrived together, applied in order (group commit:
/// one fsync and one replication round for the lot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Request>);

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {}", self.0.len())
    }
}

/// What applying a request produced, identically on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    Done(Outcome),
    Rejected(Rejection),
    /// The request id was applied before, at `index`; `rejected` is what it said then.
    AlreadyApplied {
        index: u64,
        rejected: Option<Rejection>,
    },
}

/// This node's raft: the handle, its state machine and what it stored.
#[derive(Clone)]
pub struct Replica {
    pub id: NodeId,
    pub address: String,
    pub raft: Raft,
    pub writer: batch::Writer,
    pub machine: Arc<RwLock<Machine>>,
    /// Highest index openraft told the log store is committed.
    pub committed: Arc<AtomicU64>,
}

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Raft(String),
}

impl Replica {
    /// Opens the store in `dir` and starts raft; nothing is initialised here.
    pub async fn start(
        dir: &Path,
        address: String,
        t: &RaftTuning,
        tls: ssp_net::Tls,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = dir.join("raft.redb");
        let db = Arc::new(
            redb::Database::create(&path).with_context(|| format!("opening {}", path.display()))?,
        );
        let (log, id) = log::LogStore::open(db.clone())?;
        let committed = log.committed_handle();
        let machine = machine::MachineStore::open(db)?;
        let shared = machine.shared();
        let config = Config {
            cluster_name: "ssp".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_min_ms,
            election_timeout_max: t.election_max_ms,
            install_snapshot_timeout: 5_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every),
            max_in_snapshot_log_to_keep: t.snapshot_every / 2,
            // Entries are at most MAX_BATCH_BYTES (plus one request of at most
            // the 1 MiB request limit): 24 of them stay under MAX_MESSAGE.
            max_payload_entries: 24,
            ..Default::default()
        }
        .validate()?;
        let net = network::Network::new(tls);
        let raft = Raft::new(id, Arc::new(config), net, log, machine).await?;
        tracing::info!(node = id, %address, "raft started");
        Ok(Replica {
            id,
            address,
            writer: batch::Writer::start(raft.clone()),
            raft,
            machine: shared,
            committed,
        })
    }

    /// Reads the local replica in place (may lag the leader).
    pub fn read<T>(&self, f: impl FnOnce(&Machine) -> T) -> T {
        match self.machine.read() {
            Ok(m) => f(&m),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Whether this node has a log or membership of its own.
    pub async fn initialized(&self) -> bool {
        // The metrics answer without a round trip through raft's core; they start
        // empty, so only a "no" is checked with the core.
        let known = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.last_log_index.is_some() || m.membership_config.membership().nodes().next().is_some()
        };
        known || self.raft.is_initialized().await.unwrap_or(false)
    }

    /// The current leader, as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Starts a one-node cluster of this node.
    pub async fn init(&self) -> Result<(), ClusterError> {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            self.id,
            BasicNode {
                addr: self.address.clone(),
            },
        );
        self.raft
            .initialize(nodes)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    /// Adds `id` at `addr`: first as a learner that catches up, then as a voter.
    /// A member already at `addr` under another id (a node whose disk was wiped)
    /// is replaced.
    pub async fn join(&self, id: NodeId, addr: &str) -> Result<(), ClusterError> {
        let membership = self.membership();
        let m = membership.membership();
        if m.voter_ids().any(|v| v == id) {
            return Ok(());
        }
        let stale: Vec<NodeId> = m
            .nodes()
            .filter(|(nid, n)| **nid != id && n.addr == addr)
            .map(|(nid, _)| *nid)
            .collect();
        self.raft
            .add_learner(
                id,
                BasicNode {
                    addr: addr.to_string(),
                },
                true,
            )
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let mut voters: BTreeSet<NodeId> = m.voter_ids().collect();
        for s in &stale {
            voters.remove(s);
        }
        voters.insert(id);
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(())
    }

    /// The membership this node knows.
    pub fn membership(&self) -> Arc<openraft::StoredMembership<NodeId, BasicNode>> {
        self.raft.metrics().borrow().membership_config.clone()
    }

    /// Removes `id` from the cluster.
    pub async fn leave(&self, id: NodeId) -> Result<(), ClusterError> {
        let membership = self.membership();
        let m = membership.membership();
        let is_member = m.nodes().any(|(n, _)| *n == id);
        if !is_member {
            return Err(ClusterError::Refused(format!(
                "node {id} is not a member; members: {}",
                m.nodes()
                    .map(|(n, node)| format!("{n} ({})", node.addr))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let voters: BTreeSet<NodeId> = m.voter_ids().filter(|v| *v != id).collect();
        if voters.is_empty() {
            return Err(ClusterError::Refused(format!(
                "node {id} is the last voter; a cluster cannot remove its last member"
            )));
        }
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        // A learner (or the voter just demoted) is dropped from the node list too.
        if self
            .membership()
            .membership()
            .nodes()
            .any(|(n, _)| *n == id)
        {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    /// The committed index the log store last saw.
    pub fn commit_index(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }
}
