//! The raft log and vote in redb; every write is fsynced before it is reported done.
// openraft's storage traits fix StorageError as the error type; it is large.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};

use super::{NodeId, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

type SErr = StorageError<NodeId>;

fn r(e: impl std::fmt::Display) -> SErr {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

fn w(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

/// The log store; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    committed: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens the tables, creating this node's id on first open.
    pub fn open(db: Arc<Database>) -> anyhow::Result<(Self, NodeId)> {
        let tx = db.begin_write()?;
        let id = {
            tx.open_table(LOG)?;
            let mut meta = tx.open_table(META)?;
            let existing = meta
                .get("node_id")?
                .map(|v| serde_json::from_slice::<NodeId>(v.value()))
                .transpose()?;
            match existing {
                Some(id) => id,
                None => {
                    let id = random_id()?;
                    meta.insert("node_id", serde_json::to_vec(&id)?.as_slice())?;
                    id
                }
            }
        };
        tx.commit()?;
        let store = LogStore {
            db,
            committed: Arc::new(AtomicU64::new(0)),
        };
        Ok((store, id))
    }

    /// Shared view of the committed index.
    pub fn committed_handle(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SErr> {
        let tx = self.db.begin_read().map_err(r)?;
        let meta = tx.open_table(META).map_err(r)?;
        match meta.get(key).map_err(r)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(r),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(value).map_err(w)?;
        let tx = self.db.begin_write().map_err(w)?;
        {
            let mut meta = tx.open_table(META).map_err(w)?;
            meta.insert(key, bytes.as_slice()).map_err(w)?;
        }
        tx.commit().map_err(w)
    }
}

fn random_id() -> std::io::Result<NodeId> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    // Small enough to read aloud and to survive JSON numbers in any tool.
    Ok(u64::from_le_bytes(b) % 1_000_000_000 + 1)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e + 1),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        let tx = self.db.begin_read().map_err(r)?;
        let log = tx.open_table(LOG).map_err(r)?;
        let iter = match end {
            Some(end) => log.range(start..end),
            None => log.range(start..),
        }
        .map_err(r)?;
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(r)?;
            out.push(serde_json::from_slice(v.value()).map_err(r)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let tx = self.db.begin_read().map_err(r)?;
        let log = tx.open_table(LOG).map_err(r)?;
        let last = match log.last().map_err(r)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(r)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Kept in memory for `cluster status` only. Not persisting it costs nothing
        // in safety: after a restart the state machine resumes from its snapshot
        // and applies the rest as the leader tells this node what is committed.
        if let Some(c) = committed {
            self.committed.store(c.index, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, serde_json::to_vec(&e).map_err(w)?));
        }
        let db = self.db.clone();
        // The raft core waits for this write anyway; block_in_place spares a thread hop.
        let res = tokio::task::block_in_place(move || -> Result<(), redb::Error> {
            let tx = db.begin_write()?;
            {
                let mut log = tx.open_table(LOG)?;
                for (i, bytes) in &rows {
                    log.insert(*i, bytes.as_slice())?;
                }
            }
            // Durability::Immediate (the default): fsynced before commit returns.
            tx.commit()?;
            Ok(())
        });
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(w(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let tx = self.db.begin_write().map_err(w)?;
        {
            let mut log = tx.open_table(LOG).map_err(w)?;
            log.retain(|k, _| k < log_id.index).map_err(w)?;
        }
        tx.commit().map_err(w)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(&log_id).map_err(w)?;
        let tx = self.db.begin_write().map_err(w)?;
        {
            let mut meta = tx.open_table(META).map_err(w)?;
            meta.insert("last_purged", bytes.as_slice()).map_err(w)?;
            let mut log = tx.open_table(LOG).map_err(w)?;
            log.retain(|k, _| k > log_id.index).map_err(w)?;
        }
        tx.commit().map_err(w)
    }
}
