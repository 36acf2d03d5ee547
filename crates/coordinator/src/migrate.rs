//! The leader's driver of moves between hosts (see `ssp_model::migration` for
//! the phases). Each step is idempotent and the phase it reached is replicated
//! before the next begins, so a new leader picks up any move where it stands:
//! before the target was started it may roll back (the source holds every
//! write); from then on it only goes forward.
//!
//! The data goes from daemon to daemon: the source's agent opens a migration
//! operation, the target's agent has its daemon pull from it. A first pass
//! copies while the container runs (from a snapshot taken for the move, which
//! both sides then have), the container is frozen (`ssp_agent::freeze`), a
//! second pass sends only what changed since that snapshot, and the target
//! starts; the frozen source is then killed, or thawed if the move goes back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ssp_model::{Command, Migration, MigrationCommand, MigrationPhase as Phase, Side};
use tokio::sync::Semaphore;

use crate::agents::AgentError;
use crate::convert;
use crate::core::{Applied, Core};

/// Moves between their first pass and the end of their first cleanup attempt at
/// the same time; others wait their turn. One: a move's downtime (its last pass
/// and the start on the target) never competes with another move's copy, nor
/// with the deletion of the previous move's source copy, for the disks and CPUs.
const PARALLEL_TRANSFERS: usize = 1;
/// How long the target's SSH server may take to greet after the start.
const SSH_WAIT: Duration = Duration::from_secs(60);

/// What the leader knows of the moves it drives (not replicated).
#[derive(Clone)]
pub struct Driving {
    progress: Arc<Mutex<HashMap<u64, Progress>>>,
    slots: Arc<Semaphore>,
}

impl Default for Driving {
    fn default() -> Self {
        Driving {
            progress: Default::default(),
            slots: Arc::new(Semaphore::new(PARALLEL_TRANSFERS)),
        }
    }
}

/// The daemon's last progress report for a move.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub bytes: u64,
    pub bytes_per_sec: u64,
    pub text: String,
}

impl Driving {
    /// The progress of `id` when this coordinator drives it.
    pub fn progress(&self, id: u64) -> Option<Progress> {
        self.progress.lock().ok()?.get(&id).cloned()
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The snapshot a move takes as the common base of its two passes.
pub fn base_snapshot(id: u64) -> String {
    format!("ssp-move-{id}")
}

/// Why a step did not complete.
#[derive(Debug)]
pub struct StepError(pub String);

impl From<AgentError> for StepError {
    fn from(e: AgentError) -> Self {
        StepError(e.to_string())
    }
}

impl From<tonic::Status> for StepError {
    fn from(s: tonic::Status) -> Self {
        StepError(s.message().to_string())
    }
}

impl Core {
    /// Drives move `id` unless this coordinator drives it already (leader only).
    pub fn drive(&self, id: u64) {
        if !self.is_leader() {
            return;
        }
        {
            let Ok(mut p) = self.driving.progress.lock() else {
                return;
            };
            if p.contains_key(&id) {
                return;
            }
            p.insert(id, Progress::default());
        }
        let core = self.clone();
        tokio::spawn(async move {
            core.run_migration(id).await;
            if let Ok(mut p) = core.driving.progress.lock() {
                p.remove(&id);
            }
        });
    }

    /// Drives every unfinished move nobody here drives yet: after this node became
    /// leader, the moves the last leader left.
    pub fn drive_unfinished(&self) {
        let ids: Vec<u64> = self.read(|s| {
            s.migrations
                .values()
                .filter(|m| !m.phase.finished())
                .map(|m| m.id)
                .collect()
        });
        for id in ids {
            self.drive(id);
        }
    }

    async fn run_migration(&self, id: u64) {
        let mut slot = None;
        let mut failures = 0u32;
        loop {
            // A leader cut off from the others may not know it yet, and its state
            // may be behind: a quorum confirms the leadership (and brings the state
            // up to date) before each step, as before a reconcile pass.
            if !self.is_leader() || !self.confirm_leader().await {
                tracing::info!(
                    migration = id,
                    "no longer the leader: the next one goes on with the move"
                );
                return;
            }
            let Some(m) = self.read(|s| s.migrations.get(&id).cloned()) else {
                return;
            };
            // A cleanup that failed (its host is down) waits without the slot, so
            // other moves go on meanwhile.
            let busy = matches!(m.phase, Phase::Copying | Phase::Syncing | Phase::Starting)
                || (m.phase == Phase::Cleaning && failures == 0);
            if busy && slot.is_none() {
                slot = self.driving.slots.clone().acquire_owned().await.ok();
            }
            if !busy {
                slot = None;
            }
            let step = match m.phase {
                Phase::Copying => self.copy(&m).await,
                Phase::Syncing => self.sync(&m).await,
                Phase::Starting => self.start_target(&m).await,
                Phase::Cleaning => self.clean(&m).await,
                Phase::RollingBack => self.roll_back(&m).await,
                Phase::Done | Phase::Failed => return,
            };
            let Err(StepError(why)) = step else {
                failures = 0;
                continue;
            };
            // The phase may have changed meanwhile (an abort): look again.
            let now = self.read(|s| s.migrations.get(&id).map(|m| m.phase));
            if now != Some(m.phase) {
                continue;
            }
            tracing::warn!(migration = id, instance = %m.instance, phase = %m.phase, "move: {why}");
            let next = if m.phase.may_roll_back() {
                Phase::RollingBack
            } else {
                m.phase
            };
            let note = format!("{}: {why}", m.phase);
            if let Err(e) = self.advance(id, next, note, None).await {
                tracing::warn!(migration = id, "recording the move's state: {}", e.0);
            }
            if next == m.phase {
                // Forward only from here: try again, less often the longer it fails.
                failures += 1;
                let wait = Duration::from_millis(500 * 2u64.pow(failures.min(6)));
                tokio::time::sleep(wait.min(Duration::from_secs(8))).await;
            }
        }
    }

    async fn advance(
        &self,
        id: u64,
        phase: Phase,
        note: String,
        ssh: Option<bool>,
    ) -> Result<Migration, StepError> {
        let cmd = Command::Migrate(MigrationCommand::Advance {
            id,
            phase,
            note,
            at_ms: now_ms(),
            ssh,
        });
        self.migration_write(cmd).await
    }

    /// Applies a migration command and returns the record it produced.
    pub async fn migration_write(&self, cmd: Command) -> Result<Migration, StepError> {
        match self.apply(cmd, None).await? {
            Applied::Now(ssp_model::Outcome::Migration(m)) => Ok(m),
            other => Err(StepError(format!("unexpected outcome {other:?}"))),
        }
    }

    /// The spec of the move's container as it is to be on `side`.
    fn spec_on(
        &self,
        m: &Migration,
        side: &Side,
        running: bool,
    ) -> Result<ssp_proto::InstanceSpec, StepError> {
        self.read(|s| {
            let inst = s
                .instances
                .get(&m.instance)
                .ok_or_else(|| StepError(format!("container {} is gone", m.instance)))?;
            let mut placed = inst.clone();
            placed.host = side.host.clone();
            placed.gpus = side.gpus.clone();
            placed.ssh_port = side.ssh_port;
            let mut spec = convert::spec_of(s, &placed)
                .ok_or_else(|| StepError(format!("user {} is gone", inst.owner)))?;
            spec.running = running;
            Ok(spec)
        })
    }

    fn host_record(&self, name: &str) -> Option<ssp_model::Host> {
        self.read(|s| s.hosts.get(name).cloned())
    }

    /// One pass of the daemons' copy from the source to the target.
    async fn transfer(&self, m: &Migration, snapshot: &str) -> Result<bool, StepError> {
        let (from, to) = (m.from.host.as_str(), m.to.host.as_str());
        let t0 = std::time::Instant::now();
        let source = self
            .agents
            .migrate_out(self.host_record(from).as_ref(), from, &m.instance, snapshot)
            .await?;
        let opened = t0.elapsed();
        let spec = self.spec_on(m, &m.to, false)?;
        let progress = self.driving.progress.clone();
        let id = m.id;
        let refresh = self
            .agents
            .migrate_in(self.host_record(to).as_ref(), to, spec, source, |p| {
                if let Ok(mut map) = progress.lock() {
                    map.insert(
                        id,
                        Progress {
                            bytes: p.bytes,
                            bytes_per_sec: p.bytes_per_sec,
                            text: p.text.clone(),
                        },
                    );
                }
            })
            .await?;
        tracing::debug!(
            migration = m.id,
            open_ms = opened.as_millis() as u64,
            ms = t0.elapsed().as_millis() as u64,
            refresh,
            "transfer"
        );
        Ok(refresh)
    }

    /// Copying: the first pass, while the container runs on the source.
    async fn copy(&self, m: &Migration) -> Result<(), StepError> {
        let from = m.from.host.as_str();
        let ssh = self
            .agents
            .probe_ssh(
                self.host_record(from).as_ref(),
                from,
                &m.instance,
                Duration::from_millis(1500),
            )
            .await
            .map(|r| r.answered)
            .unwrap_or(false);
        let t0 = std::time::Instant::now();
        let refresh = self.transfer(m, &base_snapshot(m.id)).await?;
        tracing::info!(migration = m.id, instance = %m.instance, refresh, ms = t0.elapsed().as_millis() as u64, "first pass copied while running");
        self.advance(m.id, Phase::Syncing, String::new(), Some(ssh))
            .await?;
        Ok(())
    }

    /// Syncing: freeze the source where it is (its agent keeps it from running
    /// again: its spec there says stopped, and a frozen container is only killed or,
    /// when the move goes back, thawed), send what changed since the first pass.
    /// The freeze takes milliseconds through the cgroup freezer, where a stop takes
    /// a quarter second (and the daemon's own freeze up to a second); where there is
    /// no freezer the agent stops it instead.
    async fn sync(&self, m: &Migration) -> Result<(), StepError> {
        let from = m.from.host.as_str();
        let t0 = std::time::Instant::now();
        self.agents
            .freeze(self.host_record(from).as_ref(), from, &m.instance)
            .await?;
        let stopped = t0.elapsed();
        let refresh = self.transfer(m, "").await?;
        tracing::info!(migration = m.id, instance = %m.instance, refresh, stop_ms = stopped.as_millis() as u64, ms = t0.elapsed().as_millis() as u64, "final pass");
        self.advance(m.id, Phase::Starting, String::new(), None)
            .await?;
        Ok(())
    }

    /// Starting: the target runs its spec (stored there from now on, so its agent
    /// heals it); once it runs (and its SSH answers, when the source's did) the
    /// container's record moves there.
    async fn start_target(&self, m: &Migration) -> Result<(), StepError> {
        let to = m.to.host.as_str();
        let record = self.host_record(to);
        let spec = self.spec_on(m, &m.to, true)?;
        let t0 = std::time::Instant::now();
        let st = self.agents.ensure(record.as_ref(), to, spec).await?;
        let ensured = t0.elapsed();
        if st.state() != ssp_proto::RunState::Running {
            return Err(StepError(format!(
                "the container does not run on {to}: {}",
                if st.failing.is_empty() {
                    &st.status
                } else {
                    &st.failing
                }
            )));
        }
        if m.ssh {
            let r = self
                .agents
                .probe_ssh(record.as_ref(), to, &m.instance, SSH_WAIT)
                .await?;
            if !r.answered {
                return Err(StepError(format!(
                    "SSH does not answer on {to}: {}",
                    r.detail
                )));
            }
        }
        // From the stop (the syncing event) until now.
        let stopped_at = m
            .events
            .iter()
            .rev()
            .find(|(_, what)| what == Phase::Syncing.as_str())
            .map(|(at, _)| *at)
            .unwrap_or(m.updated_ms);
        let downtime = (now_ms() - stopped_at).max(0) as u64;
        self.migration_write(Command::Migrate(MigrationCommand::Switch {
            id: m.id,
            downtime_ms: downtime,
            at_ms: now_ms(),
        }))
        .await?;
        tracing::info!(migration = m.id, instance = %m.instance, to, downtime_ms = downtime, ensure_ms = ensured.as_millis() as u64, ms = t0.elapsed().as_millis() as u64, "moved; the source copy goes next");
        Ok(())
    }

    /// Cleaning: delete the source copy (waits for its host if it is down).
    async fn clean(&self, m: &Migration) -> Result<(), StepError> {
        self.finish(m, &m.from, &m.to).await
    }

    /// Rolling back: the source runs again (first: the user waits for it), then the
    /// target's copy goes (waits for the target if it is down).
    async fn roll_back(&self, m: &Migration) -> Result<(), StepError> {
        let from = m.from.host.as_str();
        let spec = self.spec_on(m, &m.from, true)?;
        self.agents
            .ensure(self.host_record(from).as_ref(), from, spec)
            .await?;
        self.finish(m, &m.to, &m.from).await
    }

    /// The last of a move either way: the copy on `gone` is deleted, the move's
    /// snapshot on `kept` too (only logged when that fails: it is of no use any
    /// more), and the record finishes.
    async fn finish(&self, m: &Migration, gone: &Side, kept: &Side) -> Result<(), StepError> {
        let (gone, kept) = (gone.host.as_str(), kept.host.as_str());
        let snapshot = base_snapshot(m.id);
        let (gone_record, kept_record) = (self.host_record(gone), self.host_record(kept));
        // Two hosts: both at once.
        let (deleted, snapshot_deleted) = tokio::join!(
            self.agents.delete(gone_record.as_ref(), gone, &m.instance),
            self.agents
                .delete_snapshot(kept_record.as_ref(), kept, &m.instance, &snapshot,)
        );
        if let Err(e) = snapshot_deleted {
            tracing::warn!(
                migration = m.id,
                "deleting the move's snapshot on {kept}: {e}"
            );
        }
        deleted?;
        self.migration_write(Command::Migrate(MigrationCommand::Finish {
            id: m.id,
            at_ms: now_ms(),
        }))
        .await?;
        Ok(())
    }
}

/// A move as sspctl shows it; `progress` when this coordinator drives it.
pub fn view(m: &Migration, progress: Option<Progress>) -> ssp_proto::MigrationView {
    let driven = progress.is_some();
    let p = progress.unwrap_or_default();
    ssp_proto::MigrationView {
        id: m.id,
        instance: m.instance.clone(),
        from_host: m.from.host.to_string(),
        to_host: m.to.host.to_string(),
        from_gpus: m.from.gpus.iter().map(|g| g.to_string()).collect(),
        to_gpus: m.to.gpus.iter().map(|g| g.to_string()).collect(),
        from_port: m.from.ssh_port.into(),
        to_port: m.to.ssh_port.into(),
        phase: m.phase.as_str().into(),
        started_ms: m.started_ms,
        updated_ms: m.updated_ms,
        downtime_ms: m.downtime_ms.unwrap_or(0),
        note: m.note.clone(),
        events: m
            .events
            .iter()
            .map(|(at, what)| ssp_proto::MigrationEvent {
                at_ms: *at,
                what: what.clone(),
            })
            .collect(),
        bytes: p.bytes,
        bytes_per_sec: p.bytes_per_sec,
        progress: p.text,
        driven,
    }
}
