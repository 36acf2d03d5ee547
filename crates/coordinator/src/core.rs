//! The coordinator's core: the durable store, the agents, and converging one
//! instance at a time towards its desired state.
//!
//! Every path that acts on a container (adding a user, removing one, the
//! periodic reconcile) goes through [`Core::converge`], which holds that
//! instance's lock and re-reads the desired state under it. So a reconcile pass
//! working from an old snapshot can never re-create a container that was just
//! removed, and two passes never work on one container at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ssp_model::{Command, Outcome, Rejection, State};
use ssp_proto::InstanceStatus;
use tokio::sync::Mutex as AsyncMutex;
use tonic::Status;

use crate::agents::{AgentError, Agents};
use crate::config::CoordinatorConfig;
use crate::convert;
use crate::store::{ApplyError, Store};

/// Shared by the gRPC service and the reconcile loop.
#[derive(Clone)]
pub struct Core {
    pub store: Arc<Mutex<Store>>,
    pub agents: Agents,
    pub cfg: Arc<CoordinatorConfig>,
    locks: Arc<AsyncMutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

/// What converging an instance did.
#[derive(Debug)]
pub enum Converged {
    /// The instance runs as specified.
    Ensured(InstanceStatus),
    /// It was marked for removal; the host deleted it and it is forgotten.
    Deleted,
    /// It is not in the desired state (any more).
    Gone,
}

/// The one mapping from state-machine errors to gRPC status codes.
pub fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::Rejected(r) => match &r {
            Rejection::UserExists(_) | Rejection::InstanceExists(_) => {
                Status::already_exists(r.to_string())
            }
            Rejection::UnknownUser(_) | Rejection::UnknownInstance(_) => {
                Status::not_found(r.to_string())
            }
            Rejection::NoFit { .. } | Rejection::NoFreeUid { .. } => {
                Status::resource_exhausted(r.to_string())
            }
            Rejection::NotDeleting(_) => Status::failed_precondition(r.to_string()),
            Rejection::NoSshKey(_) | Rejection::DuplicateGpu { .. } => {
                Status::invalid_argument(r.to_string())
            }
        },
        ApplyError::Store(s) => Status::internal(s.to_string()),
    }
}

impl Core {
    pub fn new(store: Store, cfg: CoordinatorConfig) -> Self {
        Core {
            store: Arc::new(Mutex::new(store)),
            agents: Agents::default(),
            cfg: Arc::new(cfg),
            locks: Default::default(),
        }
    }

    /// Applies a command durably.
    pub fn apply(&self, cmd: &Command) -> Result<Outcome, Status> {
        let mut store = self
            .store
            .lock()
            .map_err(|_| Status::internal("state store lock poisoned"))?;
        store.apply(cmd).map_err(apply_status)
    }

    /// Reads the current state in place, without copying it.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.store.lock() {
            Ok(s) => f(s.state()),
            Err(poisoned) => f(poisoned.get_ref().state()),
        }
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> State {
        self.store
            .lock()
            .map(|s| s.state().clone())
            .unwrap_or_default()
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

    /// Drives one instance towards its desired state: ensure it, or delete and forget it.
    pub async fn converge(&self, name: &str) -> Result<Converged, AgentError> {
        let _guard = self.lock(name).await;
        let state = self.snapshot();
        let Some(inst) = state.instances.get(name) else {
            return Ok(Converged::Gone);
        };
        if inst.deleting {
            self.agents.delete(&state, inst.host.as_str(), name).await?;
            self.apply(&Command::ForgetInstance { name: name.into() })
                .map_err(|s| AgentError::Call {
                    host: inst.host.to_string(),
                    message: s.message().to_string(),
                })?;
            return Ok(Converged::Deleted);
        }
        let Some(owner) = state.users.get(inst.owner.as_str()) else {
            return Ok(Converged::Gone);
        };
        let spec = convert::spec_for(inst, owner, &state.settings(), state.users.values());
        let st = self.agents.ensure(&state, inst.host.as_str(), spec).await?;
        Ok(Converged::Ensured(st))
    }

    /// One pass over every instance (or those of `only_host`).
    pub async fn reconcile(&self, only_host: Option<&str>) {
        let names: Vec<String> = self
            .snapshot()
            .instances
            .values()
            .filter(|i| only_host.is_none_or(|h| h == i.host.as_str()))
            .map(|i| i.name.clone())
            .collect();
        for name in names {
            match self.converge(&name).await {
                Ok(Converged::Ensured(st)) if !st.changed.is_empty() => {
                    tracing::info!(instance = %name, changed = ?st.changed, "reconciled")
                }
                Ok(Converged::Deleted) => tracing::info!(instance = %name, "deleted and forgotten"),
                Ok(_) => {}
                Err(e) => tracing::warn!(instance = %name, "reconcile: {e}"),
            }
        }
    }
}
