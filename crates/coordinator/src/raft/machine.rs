//! The state machine: ssp's [`State`] plus what raft and request dedup need.
//!
//! It lives in memory behind a lock that readers share. Snapshots are written to
//! redb (fsynced) before openraft may purge the log they cover.
// openraft's storage traits fix StorageError as the error type; it is large.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};
use ssp_model::{Rejection, State};

use super::{NodeId, Reply, Request, TypeConfig};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");
/// How many request ids the state machine remembers for dedup.
pub const DEDUP_KEEP: usize = 50_000;

type SErr = StorageError<NodeId>;

fn sm_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}
fn snap_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

/// Request ids already applied, oldest first, with what they answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dedup {
    applied: BTreeMap<String, (u64, Option<Rejection>)>,
    order: VecDeque<String>,
}

impl Dedup {
    /// When `id` was applied, if it still is remembered.
    pub fn get(&self, id: &str) -> Option<&(u64, Option<Rejection>)> {
        self.applied.get(id)
    }

    /// Every remembered id with the index it was applied at.
    pub fn iter(&self) -> impl Iterator<Item = (&String, u64)> {
        self.applied.iter().map(|(k, (i, _))| (k, *i))
    }

    fn record(&mut self, id: &str, index: u64, rejected: Option<Rejection>) {
        self.applied.insert(id.to_string(), (index, rejected));
        self.order.push_back(id.to_string());
        while self.order.len() > DEDUP_KEEP {
            if let Some(old) = self.order.pop_front() {
                self.applied.remove(&old);
            }
        }
    }
}

/// Entries the audit log keeps; older ones are dropped first.
pub const AUDIT_KEEP: usize = 20_000;

/// One audited request: who, what, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub index: u64,
    pub at_ms: i64,
    pub actor: String,
    pub serial: String,
    pub action: String,
    pub target: String,
    /// "ok", or why it was refused.
    pub outcome: String,
}

/// Everything the replicated state machine holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub state: State,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub requests: Dedup,
    /// The replicated audit log, oldest first (absent from snapshots made before it).
    #[serde(default)]
    pub audit: VecDeque<AuditRecord>,
}

impl Machine {
    /// Applies one request at log `index`, identically on every replica.
    pub fn apply_request(&mut self, index: u64, req: &Request) -> Reply {
        if let Some(id) = &req.id {
            if let Some((at, rejected)) = self.requests.get(id) {
                return Reply::AlreadyApplied {
                    index: *at,
                    rejected: rejected.clone(),
                };
            }
        }
        let res = self.state.apply(&req.cmd);
        if let Some(id) = &req.id {
            self.requests.record(id, index, res.as_ref().err().cloned());
        }
        if let Some(actor) = &req.actor {
            let (action, target) = req.cmd.describe();
            let outcome = match (&req.cmd, &res) {
                (ssp_model::Command::Audit { outcome, .. }, _) => outcome.clone(),
                (_, Ok(_)) => "ok".to_string(),
                (_, Err(r)) => r.to_string(),
            };
            self.audit.push_back(AuditRecord {
                index,
                at_ms: actor.at_ms,
                actor: actor.label.clone(),
                serial: actor.serial.clone(),
                action,
                target,
                outcome,
            });
            while self.audit.len() > AUDIT_KEEP {
                self.audit.pop_front();
            }
        }
        match res {
            Ok(o) => Reply::Done(o),
            Err(r) => Reply::Rejected(r),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// openraft's view of the machine; [`MachineStore::shared`] is the readers' view.
pub struct MachineStore {
    machine: Arc<RwLock<Machine>>,
    db: Arc<Database>,
    snapshots_built: u64,
}

impl MachineStore {
    /// Loads the latest snapshot, if any.
    pub fn open(db: Arc<Database>) -> anyhow::Result<Self> {
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOT)?;
        tx.commit()?;
        let store = MachineStore {
            machine: Default::default(),
            db,
            snapshots_built: 0,
        };
        if let Some(s) = store.load()? {
            let mut m: Machine = serde_json::from_slice(&s.data)?;
            m.last_applied = s.meta.last_log_id;
            m.membership = s.meta.last_membership.clone();
            *store
                .machine
                .write()
                .map_err(|_| anyhow::anyhow!("poisoned"))? = m;
        }
        Ok(store)
    }

    /// The machine, for readers.
    pub fn shared(&self) -> Arc<RwLock<Machine>> {
        self.machine.clone()
    }

    fn load(&self) -> anyhow::Result<Option<StoredSnapshot>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOT)?;
        let v = t.get("current")?;
        Ok(match v {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    async fn save(&self, snap: StoredSnapshot) -> Result<(), SErr> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let bytes = serde_json::to_vec(&snap)?;
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(SNAPSHOT)?;
                t.insert("current", bytes.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)
    }

    fn lock(&self) -> Result<std::sync::RwLockWriteGuard<'_, Machine>, SErr> {
        self.machine
            .write()
            .map_err(|_| sm_err("state machine lock poisoned"))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, last, membership) = {
            let m = self
                .machine
                .read()
                .map_err(|_| sm_err("state machine lock poisoned"))?;
            (
                serde_json::to_vec(&*m).map_err(snap_err)?,
                m.last_applied,
                m.membership.clone(),
            )
        };
        self.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                last.map(|l| l.index).unwrap_or(0),
                self.snapshots_built
            ),
        };
        self.save(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MachineStore {
    type SnapshotBuilder = MachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let m = self.lock()?;
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Reply>>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut m = self.lock()?;
        let mut out = Vec::new();
        for e in entries {
            m.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Vec::new()),
                EntryPayload::Normal(batch) => out.push(
                    batch
                        .0
                        .iter()
                        .map(|req| m.apply_request(e.log_id.index, req))
                        .collect(),
                ),
                EntryPayload::Membership(mem) => {
                    m.membership = StoredMembership::new(Some(e.log_id), mem);
                    out.push(Vec::new());
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MachineStore {
            machine: self.machine.clone(),
            db: self.db.clone(),
            snapshots_built: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let mut m: Machine = serde_json::from_slice(&data).map_err(snap_err)?;
        m.last_applied = meta.last_log_id;
        m.membership = meta.last_membership.clone();
        self.save(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        *self.lock()? = m;
        tracing::info!(index = ?meta.last_log_id.map(|l| l.index), "installed snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let s = self.load().map_err(snap_err)?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_model::{Command, Settings};

    #[test]
    fn a_request_id_is_applied_once() {
        let mut m = Machine::default();
        let req = Request {
            id: Some("c1-1".into()),
            cmd: Command::Init(Settings::default()),
            actor: None,
        };
        assert_eq!(
            m.apply_request(1, &req),
            Reply::Done(ssp_model::Outcome::Initialized)
        );
        assert_eq!(
            m.apply_request(2, &req),
            Reply::AlreadyApplied {
                index: 1,
                rejected: None
            }
        );
        let bad = Request {
            id: Some("c1-2".into()),
            cmd: Command::RemoveUser {
                name: "ghost".into(),
            },
            actor: Some(super::super::Actor {
                label: "user:alice".into(),
                serial: "0a".into(),
                at_ms: 7,
            }),
        };
        let first = m.apply_request(3, &bad);
        assert!(matches!(first, Reply::Rejected(Rejection::UnknownUser(_))));
        // Only the request with an actor is audited, with its outcome.
        assert_eq!(m.audit.len(), 1);
        let a = &m.audit[0];
        assert_eq!(
            (
                a.index,
                a.at_ms,
                a.actor.as_str(),
                a.action.as_str(),
                a.target.as_str()
            ),
            (3, 7, "user:alice", "remove-user", "ghost")
        );
        assert_eq!(a.outcome, "user ghost does not exist");
        assert_eq!(
            m.apply_request(4, &bad),
            Reply::AlreadyApplied {
                index: 3,
                rejected: Some(Rejection::UnknownUser("ghost".into()))
            }
        );
    }

    #[test]
    fn dedup_forgets_oldest_ids_beyond_its_bound() {
        let mut d = Dedup::default();
        for i in 0..(DEDUP_KEEP as u64 + 3) {
            d.record(&format!("r{i}"), i, None);
        }
        assert!(d.get("r0").is_none() && d.get("r2").is_none());
        assert!(d.get("r3").is_some());
        assert_eq!(d.applied.len(), DEDUP_KEEP);
    }
}
