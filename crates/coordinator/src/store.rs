//! Durable desired state: a command log plus periodic snapshots in redb.
//!
//! A command is appended to the log and committed (redb fsyncs on commit)
//! before its outcome is returned, so an acknowledged change survives a crash.
//! On open the latest snapshot is loaded and the log after it replayed.
//! Rejected commands are never logged, so replay is deterministic.

use std::path::Path;

use redb::{Database, TableDefinition};
use ssp_model::{Command, Outcome, Rejection, State};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT_EVERY: u64 = 1000;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(String),
    #[error("state store is corrupt: {0}")]
    Corrupt(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    index: u64,
    state: State,
}

/// The state and the log that produced it.
pub struct Store {
    db: Database,
    state: State,
    index: u64,
}

/// Either the command was rejected, or storing it failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Opens (or creates) the store at `path` and rebuilds the state.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let (mut state, mut index) = (State::default(), 0);
        {
            let tx = db.begin_write()?;
            tx.open_table(LOG)?;
            tx.open_table(META)?;
            tx.commit()?;
        }
        let tx = db.begin_read()?;
        let meta = tx.open_table(META)?;
        if let Some(snap) = meta.get("snapshot")? {
            let s: Snapshot = serde_json::from_slice(snap.value())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            state = s.state;
            index = s.index;
        }
        let log = tx.open_table(LOG)?;
        for entry in log.range(index + 1..)? {
            let (k, v) = entry?;
            let cmd: Command = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            // A logged command was accepted once; it must apply again identically.
            state.apply(&cmd).map_err(|e| {
                StoreError::Corrupt(format!("log entry {} no longer applies: {e}", k.value()))
            })?;
            index = k.value();
        }
        drop(log);
        drop(meta);
        drop(tx);
        Ok(Self { db, state, index })
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Index of the last applied command.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Applies `cmd`; on success it is durable before this returns.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, ApplyError> {
        let mut next = self.state.clone();
        let outcome = next.apply(cmd)?;
        let index = self.index + 1;
        let bytes = serde_json::to_vec(cmd).map_err(|e| StoreError::Db(e.to_string()))?;
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        {
            let mut log = tx.open_table(LOG).map_err(StoreError::from)?;
            log.insert(index, bytes.as_slice())
                .map_err(StoreError::from)?;
            if index.is_multiple_of(SNAPSHOT_EVERY) {
                let snap = serde_json::to_vec(&Snapshot {
                    index,
                    state: next.clone(),
                })
                .map_err(|e| StoreError::Db(e.to_string()))?;
                let mut meta = tx.open_table(META).map_err(StoreError::from)?;
                meta.insert("snapshot", snap.as_slice())
                    .map_err(StoreError::from)?;
                // Entries up to the snapshot are no longer needed.
                log.retain(|k, _| k > index).map_err(StoreError::from)?;
            }
        }
        tx.commit().map_err(StoreError::from)?;
        self.state = next;
        self.index = index;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_model::Settings;

    #[test]
    fn state_survives_reopen_and_rejections_are_not_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut s = Store::open(&path).unwrap();
        s.apply(&Command::Init(Settings::default())).unwrap();
        assert!(s
            .apply(&Command::RemoveUser {
                name: "ghost".into()
            })
            .is_err());
        assert_eq!(s.index(), 1);
        let before = s.state().clone();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.state(), &before);
        assert_eq!(s.index(), 1);
    }

    #[test]
    fn snapshots_compact_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut s = Store::open(&path).unwrap();
        for _ in 0..(SNAPSHOT_EVERY + 5) {
            s.apply(&Command::Init(Settings::default())).unwrap();
        }
        let idx = s.index();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.index(), idx);
        use redb::ReadableTableMetadata;
        let tx = s.db.begin_read().unwrap();
        assert_eq!(tx.open_table(LOG).unwrap().len().unwrap(), 5);
    }
}
