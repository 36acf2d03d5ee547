//! Moving a container between hosts: the replicated record of one move and its
//! phases. The leader's driver does the work (the daemons copy the data between
//! themselves); the record says how far it got, so a new leader knows whether to
//! go on or roll back, and what each side holds meanwhile.
//!
//! ```text
//!  copying ──▶ syncing ──▶ starting ──(switch)──▶ cleaning ──▶ done
//!     │           │
//!     └───────────┴──▶ rolling-back ──▶ failed
//! ```
//!
//! Until the switch the container's record places it on the source and the
//! target's GPUs and port are held for the move; after it the record places it
//! on the target and the source's are held until the source copy is deleted.
//! Once the target was started (`starting`) the move only goes forward: the
//! target may have taken writes the source does not have.

use serde::{Deserialize, Serialize};

use crate::names::{HostName, PciAddress};

/// What one side of a move holds: host, GPUs (container order) and SSH port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub host: HostName,
    pub gpus: Vec<PciAddress>,
    pub ssh_port: u16,
}

/// How far a move got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The target copies the container while it keeps running on the source.
    Copying,
    /// The source is stopped (or being stopped); the target takes what changed since.
    Syncing,
    /// The target copy is (being) started; the source copy stays, stopped.
    Starting,
    /// The container runs on the target; the source copy is being deleted.
    Cleaning,
    /// Moved; the source copy is gone.
    Done,
    /// The move failed or was aborted before the target started: the source is
    /// started again and the target copy deleted.
    RollingBack,
    /// Rolled back; the container runs on the source as before.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Syncing => "syncing",
            Phase::Starting => "starting",
            Phase::Cleaning => "cleaning",
            Phase::Done => "done",
            Phase::RollingBack => "rolling-back",
            Phase::Failed => "failed",
        }
    }

    /// Done or failed: nothing more happens.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }

    /// Whether the container's record already places it on the target.
    pub fn switched(self) -> bool {
        matches!(self, Phase::Cleaning | Phase::Done)
    }

    /// Whether a move in this phase may still be rolled back: the target has not
    /// been started, so the source holds every write.
    pub fn may_roll_back(self) -> bool {
        matches!(self, Phase::Copying | Phase::Syncing)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Events a record keeps (the newest last); older ones are dropped.
pub const MAX_EVENTS: usize = 32;
/// Finished moves the state keeps for `sspctl migrations`.
pub const KEEP_FINISHED: usize = 200;

/// One move of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: u64,
    pub instance: String,
    pub from: Side,
    pub to: Side,
    pub phase: Phase,
    /// Milliseconds since the Unix epoch, by the proposing coordinator's clock.
    pub started_ms: i64,
    pub updated_ms: i64,
    /// Whether the container's SSH server answered before the move: the target's
    /// must answer too before the source copy may go.
    #[serde(default)]
    pub ssh: bool,
    /// From the source's stop until the target runs (and its SSH answers).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Why it failed or what it is waiting for (the last error), empty when nothing.
    #[serde(default)]
    pub note: String,
    /// (ms since the epoch, what happened), oldest first, at most [`MAX_EVENTS`].
    #[serde(default)]
    pub events: Vec<(i64, String)>,
}

impl Migration {
    /// What the record holds on top of the container's own record: the target
    /// before the switch, the source after it (until the move is finished).
    pub fn reserved(&self) -> Option<&Side> {
        match self.phase {
            Phase::Done | Phase::Failed => None,
            Phase::Cleaning => Some(&self.from),
            _ => Some(&self.to),
        }
    }

    pub(crate) fn log(&mut self, at_ms: i64, what: String) {
        self.updated_ms = self.updated_ms.max(at_ms);
        self.events.push((at_ms, what));
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }
}

/// Changes to moves; `at_ms` is the proposer's clock, so replicas agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationCommand {
    /// Starts moving `instance` to `to`, or where placement says when `None`:
    /// the target's GPUs (same count, model and memory constraints) and port are
    /// allocated now.
    Begin {
        instance: String,
        to: Option<HostName>,
        at_ms: i64,
    },
    /// Moves to `phase` (forward, or to rolling-back while that is allowed), or
    /// only records `note` when `phase` is the current one.
    Advance {
        id: u64,
        phase: Phase,
        note: String,
        at_ms: i64,
        /// Set with `syncing`: whether SSH answered on the source.
        #[serde(default)]
        ssh: Option<bool>,
    },
    /// The target runs (and answers SSH): the container's record moves to the
    /// target; the source copy is to be deleted.
    Switch {
        id: u64,
        downtime_ms: u64,
        at_ms: i64,
    },
    /// Ends a move that is cleaning (done) or rolling back (failed), releasing
    /// what the other side held.
    Finish { id: u64, at_ms: i64 },
}
