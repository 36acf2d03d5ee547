//! The coordinator's gRPC service: parse, replicate, drive agents.
//!
//! Writes run on the raft leader (a follower forwards them there); reads are
//! served here, linearizable unless the client asked for a local read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use ssp_model::{Command, Outcome};
use ssp_proto::coordinator_server::Coordinator;
use ssp_proto::*;
use tonic::{Request, Response, Status};

use crate::cluster::{annotate, forwarded, from_leader, request_id, Route};
use crate::core::{Applied, Converged, Core};
use crate::{convert, request};

/// The coordinator's gRPC service.
#[derive(Clone)]
pub struct CoordinatorService {
    pub core: Core,
    /// Hosts that registered since this process started; the first registration triggers a reconcile.
    pub seen_hosts: Arc<Mutex<BTreeSet<String>>>,
}

fn input_status(e: ssp_model::InputError) -> Status {
    Status::invalid_argument(e.to_string())
}

use ssp_model::CertRole::{Admin, Agent, User as UserRole};

impl CoordinatorService {
    async fn admit<T>(
        &self,
        req: &Request<T>,
        roles: &[ssp_model::CertRole],
        action: &str,
        target: &str,
    ) -> Result<Arc<ssp_net::Identity>, Status> {
        self.core.admit(req, roles, action, target).await
    }

    /// Admits an admin, or a user acting on their own name.
    async fn admit_self<T>(
        &self,
        req: &Request<T>,
        action: &str,
        name: &str,
    ) -> Result<Arc<ssp_net::Identity>, Status> {
        let id = self.admit(req, &[Admin, UserRole], action, name).await?;
        if id.role == UserRole && id.name != name {
            return Err(self.core.deny(&id, action, name).await);
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_host(
        &self,
        req: Request<RegisterHostRequest>,
    ) -> Result<Response<RegisterHostReply>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self
            .admit(&req, &[Admin, Agent], "register-host", &name)
            .await?;
        // An agent registers its own host only: the name is in its certificate.
        if caller.role == Agent && caller.name != name {
            return Err(self.core.deny(&caller, "register-host", &name).await);
        }
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .register_host(forwarded(req))
                .await;
        }
        let cmd = request::register_host(req.get_ref()).map_err(input_status)?;
        // Heartbeats arrive every few seconds: read the state in place, and write
        // only when the host's record really changed.
        let Command::RegisterHost(h) = &cmd else {
            unreachable!()
        };
        self.core.seen(&name);
        let (changed, was_down) = self.core.read(|s| match s.hosts.get(&name) {
            None => (true, false),
            Some(old) => {
                let mut same = h.clone();
                same.status = old.status;
                (*old != same, old.status == ssp_model::HostStatus::Down)
            }
        });
        if changed {
            self.core.apply_for(&caller, cmd, None).await?;
            tracing::info!(host = %name, "host registered or changed");
        }
        if was_down {
            let up = Command::SetHostStatus {
                name: name.clone(),
                status: ssp_model::HostStatus::Ready,
            };
            self.core.apply(up, None).await?;
            tracing::info!(host = %name, "host is back: heartbeats again");
        }
        let count = self.core.read(|s| {
            s.instances
                .values()
                .filter(|i| i.host.as_str() == name)
                .count() as u32
        });
        let first = self
            .seen_hosts
            .lock()
            .map(|mut s| s.insert(name.clone()))
            .unwrap_or(false);
        if first && count > 0 {
            let core = self.core.clone();
            tokio::spawn(async move { core.reconcile(Some(&name)).await });
        }
        Ok(from_leader(
            Response::new(RegisterHostReply {
                instances: count,
                revoked: self.core.tls.revoked(),
            }),
            &self.core,
        ))
    }

    async fn add_user(
        &self,
        req: Request<AddUserRequest>,
    ) -> Result<Response<AddUserReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "add-user", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .add_user(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let cmd = request::add_user(&r, &self.core.cfg).map_err(input_status)?;
        // The settings (uid range) go into the log before the first user: a user
        // placed before them would get a uid from the default range. Settings never
        // change once set, so checking here on the leader is enough.
        self.core.settle_settings().await?;
        let (user, instance) = match self.core.apply_for(&caller, cmd, id).await? {
            Applied::Now(Outcome::UserAdded { user, instance }) => (user, instance),
            Applied::Earlier { index } => self
                .core
                .read(|s| {
                    Some((s.users.get(&r.name)?.clone(), s.homes_of(&r.name).next()?.clone()))
                })
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "this request added {} earlier (log index {index}), and {} has been removed since",
                        r.name, r.name
                    ))
                })?,
            Applied::Now(other) => {
                return Err(Status::internal(format!(
                    "unexpected outcome of AddUser: {other:?}"
                )))
            }
        };
        tracing::info!(user = %user.name, host = %instance.host, gpus = ?instance.gpus, port = instance.ssh_port, "user added");
        let host = self
            .core
            .read(|s| s.hosts.get(instance.host.as_str()).cloned());
        if r.no_wait {
            self.core.kick();
            let view = convert::instance_view(&instance, host.as_ref(), "pending", "");
            let reply = Response::new(AddUserReply {
                user: Some(convert::user_to_wire(&user)),
                instance: Some(view),
                warning: String::new(),
            });
            return Ok(from_leader(reply, &self.core));
        }
        let (view_state, uuid, lan_address, mut warning) =
            match self.core.converge(&instance.name).await {
                Ok(Converged::Ensured(st)) => (st.status.clone(), st.uuid.clone(), st.lan_address.clone(), String::new()),
                Ok(other) => (
                    "pending".to_string(),
                    String::new(),
                    String::new(),
                    format!("user {} changed while being added ({other:?})", user.name),
                ),
                Err(e) => (
                    "pending".to_string(),
                    String::new(),
                    String::new(),
                    format!("user {} is recorded, but the container is not running yet ({e}); ssp keeps retrying", user.name),
                ),
            };
        if warning.is_empty()
            && instance.network == ssp_model::Network::Lan
            && instance.lan_address.is_none()
            && lan_address.is_empty()
        {
            warning = format!(
                "{}'s container runs on {} but has no address on the LAN yet (no answer from the LAN's DHCP server); `sspctl ls` shows it once it has one",
                user.name, instance.host
            );
        }
        // Every other container learns the new member's name for their uid.
        self.core.kick();
        let mut view = convert::instance_view(&instance, host.as_ref(), &view_state, &uuid);
        if !lan_address.is_empty() {
            if view.desktop && view.rdp_host.is_empty() {
                view.rdp_host = lan_address.clone();
            }
            view.lan_address = lan_address;
        }
        Ok(Response::new(AddUserReply {
            user: Some(convert::user_to_wire(&user)),
            instance: Some(view),
            warning,
        }))
    }

    async fn remove_user(
        &self,
        req: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "remove-user", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .remove_user(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let RemoveUserRequest { name, no_wait } = req.into_inner();
        let instances = match self
            .core
            .apply_for(&caller, Command::RemoveUser { name: name.clone() }, id)
            .await?
        {
            Applied::Now(Outcome::UserRemoving { instances }) => instances,
            Applied::Earlier { .. } => self.core.read(|s| {
                s.instances
                    .values()
                    .filter(|i| i.owner.as_str() == name && i.deleting)
                    .map(|i| i.name.clone())
                    .collect()
            }),
            Applied::Now(other) => {
                return Err(Status::internal(format!(
                    "unexpected outcome of RemoveUser: {other:?}"
                )))
            }
        };
        if no_wait {
            self.core.kick();
            return Ok(from_leader(Response::new(RemoveUserReply {}), &self.core));
        }
        // Removal is recorded; deleting the containers now is the fast path, and
        // the reconciler finishes it if a host cannot be reached.
        for inst in &instances {
            self.core.converge(inst).await.map_err(|e| {
                Status::unavailable(format!(
                    "{name} is marked for removal, but {inst} is not deleted yet: {e}; ssp keeps retrying"
                ))
            })?;
        }
        tracing::info!(user = %name, "user removed");
        self.core.kick();
        Ok(Response::new(RemoveUserReply {}))
    }

    async fn set_ssh_keys(
        &self,
        req: Request<SetSshKeysRequest>,
    ) -> Result<Response<SetSshKeysReply>, Status> {
        let caller = self
            .admit_self(&req, "set-ssh-keys", &req.get_ref().name.clone())
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .set_ssh_keys(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let cmd = request::set_ssh_keys(&r).map_err(input_status)?;
        let instances = match self.core.apply_for(&caller, cmd, id).await? {
            Applied::Now(Outcome::SshKeysSet { instances }) => instances,
            Applied::Earlier { .. } => self
                .core
                .read(|s| s.homes_of(&r.name).map(|i| i.name.clone()).collect()),
            Applied::Now(other) => {
                return Err(Status::internal(format!(
                    "unexpected outcome of SetSshKeys: {other:?}"
                )))
            }
        };
        tracing::info!(user = %r.name, keys = r.ssh_keys.len(), "ssh keys replaced");
        // The containers get the new keys now; where a host cannot be reached, the
        // reconciler finishes it (the spec changed, so its hash did).
        let mut late = Vec::new();
        for inst in &instances {
            match self.core.converge(inst).await {
                Ok(Converged::Ensured(_)) => {}
                Ok(other) => late.push(format!("{inst}: {other:?}")),
                Err(e) => late.push(format!("{inst}: {e}")),
            }
        }
        let warning = if late.is_empty() {
            String::new()
        } else {
            format!(
                "the new keys are recorded, but not every container has them yet ({}); ssp keeps retrying",
                late.join("; ")
            )
        };
        Ok(Response::new(SetSshKeysReply { instances, warning }))
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<UserList>, Status> {
        let caller = self
            .admit(&req, &[Admin, UserRole], "list-users", "")
            .await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        // A user sees their own record only.
        let users = self.core.read(|s| {
            s.users
                .values()
                .filter(|u| caller.role == Admin || u.name.as_str() == caller.name)
                .map(convert::user_to_wire)
                .collect()
        });
        Ok(annotate(
            Response::new(UserList { users }),
            &self.core,
            kind,
        ))
    }

    async fn list_instances(
        &self,
        req: Request<ListInstancesViewRequest>,
    ) -> Result<Response<InstanceViewList>, Status> {
        let caller = self
            .admit(&req, &[Admin, UserRole], "list-instances", "")
            .await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        let mut state = self.core.snapshot();
        if caller.role != Admin {
            state
                .instances
                .retain(|_, i| i.owner.as_str() == caller.name);
        }
        let only = &req.get_ref().name;
        if !only.is_empty() {
            state.instances.retain(|_, i| i.owner.as_str() == only);
        }
        // One container asked for: its agent looks at it alone.
        let one = match (only.is_empty(), state.instances.len()) {
            (false, 1) => state.instances.keys().next().cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let one = one.as_str();
        let down = |h: &str| {
            state
                .hosts
                .get(h)
                .is_some_and(|h| h.status == ssp_model::HostStatus::Down)
        };
        let hosts: BTreeSet<&str> = state
            .instances
            .values()
            .map(|i| i.host.as_str())
            .filter(|h| !down(h))
            .collect();
        let observed = futures::future::join_all(hosts.iter().map(|h| {
            let agents = self.core.agents.clone();
            let state = &state;
            async move {
                (
                    h.to_string(),
                    agents.observe(state.hosts.get(*h), h, true, one).await,
                )
            }
        }))
        .await;
        let mut seen: BTreeMap<(String, String), InstanceStatus> = BTreeMap::new();
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        for (h, r) in observed {
            match r {
                Ok(list) => seen.extend(list.into_iter().map(|s| ((h.clone(), s.name.clone()), s))),
                Err(e) => {
                    errors.insert(h, e.to_string());
                }
            }
        }
        let instances = state
            .instances
            .values()
            .map(|i| {
                let key = (i.host.to_string(), i.name.clone());
                let (st, uuid) = match (seen.get(&key), errors.get(i.host.as_str())) {
                    _ if down(i.host.as_str()) => {
                        ("unavailable (host down)".to_string(), String::new())
                    }
                    // A crash-looping container shows why ("failing: ...").
                    (Some(s), _) if !s.failing.is_empty() => (s.failing.clone(), s.uuid.clone()),
                    (Some(s), _) => (s.status.clone(), s.uuid.clone()),
                    (None, Some(_)) => ("unknown (host unreachable)".to_string(), String::new()),
                    (None, None) => ("missing".to_string(), String::new()),
                };
                let mut v = convert::instance_view(i, state.hosts.get(i.host.as_str()), &st, &uuid);
                if let (Some(r), true) = (&state.relay, i.relay_port.is_some()) {
                    v.relay_host = r.host.to_string();
                }
                if let Some(s) = seen.get(&key) {
                    v.problem = s.problem.clone();
                    v.disk_used_bytes = s.disk_used_bytes;
                    if i.network == ssp_model::Network::Lan && i.lan_address.is_none() {
                        v.lan_address = s.lan_address.clone();
                        if v.desktop {
                            v.rdp_host = v.lan_address.clone();
                        }
                    }
                }
                v
            })
            .collect();
        Ok(annotate(
            Response::new(InstanceViewList { instances }),
            &self.core,
            kind,
        ))
    }

    async fn list_gpus(
        &self,
        req: Request<ListGpusRequest>,
    ) -> Result<Response<GpuViewList>, Status> {
        self.admit(&req, &[Admin, UserRole], "list-gpus", "")
            .await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        let state = self.core.snapshot();
        let mut gpus = Vec::new();
        for h in state.hosts.values() {
            for g in &h.inventory.gpus {
                gpus.push(GpuView {
                    host: h.name.to_string(),
                    gpu: Some(ssp_wire::gpu_to_wire(g)),
                    holder: state
                        .gpu_holder(h.name.as_str(), &g.pci)
                        .map(|i| i.name.clone())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(annotate(
            Response::new(GpuViewList { gpus }),
            &self.core,
            kind,
        ))
    }

    async fn list_hosts(
        &self,
        req: Request<ListHostsRequest>,
    ) -> Result<Response<HostViewList>, Status> {
        self.admit(&req, &[Admin], "list-hosts", "").await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        let state = self.core.snapshot();
        let leader = self.core.is_leader();
        let hosts = state
            .hosts
            .values()
            .map(|h| {
                let found = self.core.found(h.name.as_str());
                HostView {
                    name: h.name.to_string(),
                    agent_address: h.agent_address.to_string(),
                    ssh_host: h.ssh_host.to_string(),
                    gpus_total: h.inventory.gpus.len() as u32,
                    gpus_free: ssp_model::place::free_gpus(&state, h).len() as u32,
                    inventory: Some(ssp_wire::inventory_to_wire("", &h.inventory)),
                    instances: state
                        .instances
                        .values()
                        .filter(|i| i.host == h.name)
                        .count() as u32,
                    status: h.status.as_str().into(),
                    last_heartbeat_ms_ago: match (leader, self.core.seen_ago(h.name.as_str())) {
                        (true, Some(d)) => d.as_millis() as i64,
                        _ => -1,
                    },
                    unmanaged: found.unmanaged,
                    stray: found.stray,
                    labels: h.labels.clone(),
                    foreign_ports: h.foreign_ports.iter().map(|&p| p.into()).collect(),
                    lan: h.lan.clone().unwrap_or_default(),
                    warnings: h.warnings.clone(),
                }
            })
            .collect();
        Ok(annotate(
            Response::new(HostViewList { hosts }),
            &self.core,
            kind,
        ))
    }

    async fn set_host_status(
        &self,
        req: Request<SetHostStatusRequest>,
    ) -> Result<Response<SetHostStatusReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "set-host-status", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .set_host_status(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let status = ssp_model::HostStatus::parse(&r.status).map_err(input_status)?;
        if status == ssp_model::HostStatus::Down {
            return Err(Status::invalid_argument(
                "host status \"down\": ssp sets it itself when a host stops heartbeating; use ready or draining",
            ));
        }
        self.core
            .apply_for(
                &caller,
                Command::SetHostStatus {
                    name: r.name.clone(),
                    status,
                },
                id,
            )
            .await?;
        tracing::info!(host = %r.name, status = status.as_str(), "host status set");
        Ok(from_leader(
            Response::new(SetHostStatusReply {}),
            &self.core,
        ))
    }

    async fn migrate(
        &self,
        req: Request<MigrateRequest>,
    ) -> Result<Response<MigrationView>, Status> {
        let caller = self
            .admit(&req, &[Admin], "migrate", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .migrate(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let name = ssp_model::Username::parse(&r.name).map_err(input_status)?;
        let to = match (r.host.is_empty(), r.auto) {
            (false, false) => Some(ssp_model::HostName::parse(&r.host).map_err(input_status)?),
            (true, true) => None,
            (false, true) => {
                return Err(Status::invalid_argument(
                    "name a target host or ask for --auto, not both",
                ))
            }
            (true, false) => {
                return Err(Status::invalid_argument(
                    "name the target host, or ask for --auto to let placement choose",
                ))
            }
        };
        if r.live {
            let host = self
                .core
                .read(|s| {
                    s.instances
                        .get(name.as_str())
                        .map(|i| s.hosts.get(i.host.as_str()).cloned())
                })
                .ok_or_else(|| Status::not_found(format!("container {name} does not exist")))?;
            let host_name = host
                .as_ref()
                .map(|h| h.name.to_string())
                .unwrap_or_default();
            let check = self
                .core
                .agents
                .check_live(host.as_ref(), &host_name, name.as_str())
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            return Err(Status::failed_precondition(match check {
                Err(why) => format!(
                    "live migration is not available on {host_name}: its daemon says: {why}; without --live ssp moves {name} with seconds of downtime"
                ),
                Ok(()) => format!(
                    "{host_name}'s daemon can migrate {name} live, but ssp does not drive live moves; without --live it moves with seconds of downtime"
                ),
            }));
        }
        let cmd = Command::Migrate(ssp_model::MigrationCommand::Begin {
            instance: name.to_string(),
            to,
            at_ms: crate::migrate::now_ms(),
        });
        let m = match self.core.apply_for(&caller, cmd, id).await? {
            Applied::Now(Outcome::Migration(m)) => m,
            // A retried request: the move it began.
            _ => self
                .core
                .read(|s| {
                    s.migrations
                        .values()
                        .rev()
                        .find(|m| m.instance == name.as_str())
                        .cloned()
                })
                .ok_or_else(|| Status::internal("the move was begun but its record is missing"))?,
        };
        tracing::info!(migration = m.id, instance = %m.instance, from = %m.from.host, to = %m.to.host, "move begun");
        self.core.drive(m.id);
        Ok(from_leader(
            Response::new(crate::migrate::view(&m, self.core.driving.progress(m.id))),
            &self.core,
        ))
    }

    async fn control_migration(
        &self,
        req: Request<ControlMigrationRequest>,
    ) -> Result<Response<MigrationView>, Status> {
        let target = req.get_ref().id.to_string();
        let caller = self
            .admit(&req, &[Admin], "control-migration", &target)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .control_migration(forwarded(req))
                .await;
        }
        let r = req.into_inner();
        let m = self
            .core
            .read(|s| s.migrations.get(&r.id).cloned())
            .ok_or_else(|| {
                Status::not_found(format!("no migration {} (see sspctl migrations)", r.id))
            })?;
        match r.action.as_str() {
            "resume" => {}
            "abort" => {
                if !m.phase.may_roll_back() {
                    return Err(Status::failed_precondition(format!(
                        "migration {} is {}: {}",
                        m.id,
                        m.phase,
                        if m.phase.finished() {
                            "it is over"
                        } else {
                            "the target has been started and may hold new writes, so it only goes forward; resume it instead"
                        }
                    )));
                }
                let cmd = Command::Migrate(ssp_model::MigrationCommand::Advance {
                    id: m.id,
                    phase: ssp_model::MigrationPhase::RollingBack,
                    note: format!("aborted by {}", caller.label()),
                    at_ms: crate::migrate::now_ms(),
                    ssh: None,
                });
                self.core.apply_for(&caller, cmd, None).await?;
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "action {:?}: expected resume or abort",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
        self.core.drive(m.id);
        let m = self
            .core
            .read(|s| s.migrations.get(&m.id).cloned())
            .unwrap_or(m);
        Ok(from_leader(
            Response::new(crate::migrate::view(&m, self.core.driving.progress(m.id))),
            &self.core,
        ))
    }

    async fn list_migrations(
        &self,
        req: Request<ListMigrationsRequest>,
    ) -> Result<Response<MigrationList>, Status> {
        let caller = self
            .admit(&req, &[Admin, UserRole], "list-migrations", "")
            .await?;
        self.core.prepare_read(req.metadata()).await?;
        let want = req.get_ref().id;
        let mine = |m: &ssp_model::Migration| caller.role == Admin || m.instance == caller.name;
        let migrations = self.core.read(|s| {
            s.migrations
                .values()
                .filter(|m| (want == 0 || m.id == want) && mine(m))
                .cloned()
                .collect::<Vec<_>>()
        });
        if want != 0 && migrations.is_empty() {
            return Err(Status::not_found(format!("no migration {want}")));
        }
        let migrations = migrations
            .iter()
            .map(|m| crate::migrate::view(m, self.core.driving.progress(m.id)))
            .collect();
        Ok(from_leader(
            Response::new(MigrationList { migrations }),
            &self.core,
        ))
    }

    async fn evacuate_host(
        &self,
        req: Request<EvacuateHostRequest>,
    ) -> Result<Response<EvacuateHostReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "evacuate-host", &req.get_ref().host)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .evacuate_host(forwarded(req))
                .await;
        }
        let host = req.into_inner().host;
        let host = ssp_model::HostName::parse(&host).map_err(input_status)?;
        self.core
            .apply_for(
                &caller,
                Command::SetHostStatus {
                    name: host.to_string(),
                    status: ssp_model::HostStatus::Draining,
                },
                None,
            )
            .await?;
        let names: Vec<String> = self.core.read(|s| {
            s.instances
                .values()
                .filter(|i| i.host == host && !i.deleting && s.moving(&i.name).is_none())
                .map(|i| i.name.clone())
                .collect()
        });
        let mut reply = EvacuateHostReply::default();
        for name in names {
            let cmd = Command::Migrate(ssp_model::MigrationCommand::Begin {
                instance: name.clone(),
                to: None,
                at_ms: crate::migrate::now_ms(),
            });
            match self.core.apply_for(&caller, cmd, None).await {
                Ok(Applied::Now(Outcome::Migration(m))) => {
                    self.core.drive(m.id);
                    reply.migrations.push(crate::migrate::view(&m, None));
                }
                Ok(_) => {}
                Err(s) => reply.refused.push(format!("{name}: {}", s.message())),
            }
        }
        // Moves begun earlier are part of the evacuation too.
        let begun: Vec<u64> = reply.migrations.iter().map(|m| m.id).collect();
        let earlier: Vec<MigrationView> = self.core.read(|s| {
            s.migrations
                .values()
                .filter(|m| m.from.host == host && !m.phase.finished() && !begun.contains(&m.id))
                .map(|m| crate::migrate::view(m, None))
                .collect()
        });
        reply.migrations.extend(earlier);
        tracing::info!(host = %host, moving = reply.migrations.len(), refused = reply.refused.len(), "evacuating");
        Ok(from_leader(Response::new(reply), &self.core))
    }

    async fn publish_image(
        &self,
        req: Request<PublishImageRequest>,
    ) -> Result<Response<ImageHosts>, Status> {
        let caller = self
            .admit_self(&req, "image-publish", &req.get_ref().name.clone())
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .publish_image(forwarded(req))
                .await;
        }
        let r = req.into_inner();
        let name = ssp_model::Username::parse(&r.name).map_err(input_status)?;
        let alias = ssp_model::parse_image(&r.alias).map_err(input_status)?;
        if !r.snapshot.is_empty() {
            ssp_model::parse_snapshot_name(&r.snapshot, false).map_err(input_status)?;
        }
        let state = self.core.snapshot();
        let inst = state
            .instances
            .get(name.as_str())
            .ok_or_else(|| Status::not_found(format!("{name} has no container")))?;
        if let Some(m) = state.moving(&inst.name) {
            return Err(Status::failed_precondition(format!(
                "{name}'s container is moving to {} (migration {}); publish it when the move is done",
                m.to.host, m.id
            )));
        }
        if let Some(h) = state.hosts.values().find(|h| h.inventory.has_image(&alias)) {
            return Err(Status::already_exists(format!(
                "host {} already has an image {alias}; pick another alias, or `sspctl image delete {alias}` first",
                h.name
            )));
        }
        let source = inst.host.to_string();
        let published = self
            .core
            .agents
            .publish_image(
                state.hosts.get(&source),
                &source,
                PublishImageRequest {
                    name: name.to_string(),
                    alias: alias.clone(),
                    snapshot: r.snapshot.clone(),
                },
            )
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(user = %name, %alias, fingerprint = %published.fingerprint, host = %source, "image published");
        // Every other ready host pulls it from the source's daemon, so a container
        // from it may go anywhere.
        let mut hosts = vec![source.clone()];
        let mut warnings = Vec::new();
        let others: Vec<_> = state
            .hosts
            .values()
            .filter(|h| h.name.as_str() != source && h.status == ssp_model::HostStatus::Ready)
            .collect();
        let copies = futures::future::join_all(others.iter().map(|h| {
            self.core.agents.copy_image(
                (state.hosts.get(&source), &source),
                (Some(*h), h.name.as_str()),
                &published.fingerprint,
                vec![alias.clone()],
            )
        }))
        .await;
        for (h, c) in others.iter().zip(copies) {
            match c {
                Ok(()) => hosts.push(h.name.to_string()),
                Err(e) => warnings.push(format!("{}: {e}", h.name)),
            }
        }
        let cmd = Command::Audit {
            action: format!("image-publish {alias}"),
            target: name.to_string(),
            outcome: format!("{} on {}", published.fingerprint, hosts.join(", ")),
        };
        if let Err(e) = self.core.apply_for(&caller, cmd, None).await {
            tracing::warn!(%alias, "audit of image-publish: {}", e.message());
        }
        Ok(Response::new(ImageHosts {
            image: alias,
            fingerprint: published.fingerprint,
            hosts,
            warnings,
        }))
    }

    async fn delete_image(
        &self,
        req: Request<DeleteImageRequest>,
    ) -> Result<Response<ImageHosts>, Status> {
        let caller = self
            .admit(&req, &[Admin], "image-delete", &req.get_ref().image)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .delete_image(forwarded(req))
                .await;
        }
        let image = ssp_model::parse_image(&req.get_ref().image).map_err(input_status)?;
        let state = self.core.snapshot();
        let having: Vec<_> = state
            .hosts
            .values()
            .filter(|h| h.inventory.has_image(&image))
            .collect();
        if having.is_empty() {
            return Err(Status::not_found(format!(
                "no host has image {image} (see `sspctl image list`)"
            )));
        }
        let mut hosts = Vec::new();
        let mut warnings = Vec::new();
        for h in having {
            match self
                .core
                .agents
                .delete_image(Some(h), h.name.as_str(), &image)
                .await
            {
                Ok(_) => hosts.push(h.name.to_string()),
                Err(e) => warnings.push(format!("{}: {e}", h.name)),
            }
        }
        let cmd = Command::Audit {
            action: format!("image-delete {image}"),
            target: image.clone(),
            outcome: format!("deleted on {}", hosts.join(", ")),
        };
        if let Err(e) = self.core.apply_for(&caller, cmd, None).await {
            tracing::warn!(%image, "audit of image-delete: {}", e.message());
        }
        Ok(Response::new(ImageHosts {
            image,
            fingerprint: String::new(),
            hosts,
            warnings,
        }))
    }

    async fn adopt(&self, req: Request<AdoptRequest>) -> Result<Response<AdoptReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "adopt", &req.get_ref().container)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self.core.peers.coordinator(&a)?.adopt(forwarded(req)).await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let name = r.container.clone();
        let record = self
            .core
            .read(|s| s.hosts.get(&r.host).cloned())
            .ok_or_else(|| Status::not_found(format!("host {} is not registered", r.host)))?;
        let found = self
            .core
            .agents
            .survey(Some(&record), &r.host, &name, &name)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !found.exists {
            return Err(Status::not_found(format!(
                "no container {name} on host {}",
                r.host
            )));
        }
        // Recorded by an earlier adopt that did not get to take it over: finish it.
        let earlier = self.core.read(|s| {
            s.instances
                .get(&name)
                .filter(|i| i.host.as_str() == r.host && !i.deleting)
                .cloned()
        });
        let instance = match earlier {
            Some(i) if !found.managed => i,
            Some(_) => {
                return Err(Status::already_exists(format!(
                    "{name} on {} is ssp's already",
                    r.host
                )))
            }
            None if found.managed => {
                return Err(Status::failed_precondition(format!(
                    "{name} on {} carries ssp's mark (user.ssp.managed) but ssp has no record of it: a leftover of a move or an earlier cluster; `sspctl hosts` lists it as stray",
                    r.host
                )))
            }
            None => {
                if !found.problems.is_empty() {
                    let all = found.problems.join("; ");
                    return Err(Status::failed_precondition(format!(
                        "cannot adopt {name}: {all}"
                    )));
                }
                let cmd = request::adopt(&r, &found, &self.core.cfg).map_err(input_status)?;
                self.core.settle_settings().await?;
                match self.core.apply_for(&caller, cmd, id).await? {
                    Applied::Now(Outcome::UserAdded { instance, .. }) => instance,
                    Applied::Earlier { .. } => self
                        .core
                        .read(|s| s.instances.get(&name).cloned())
                        .ok_or_else(|| Status::not_found(format!("{name} was removed since")))?,
                    Applied::Now(other) => {
                        return Err(Status::internal(format!(
                            "unexpected outcome of Adopt: {other:?}"
                        )))
                    }
                }
            }
        };
        // Recorded: the GPUs and port are held. Now the container becomes ssp's and
        // gets ssp's config and devices (a restart for the idmap).
        self.core
            .agents
            .take_over(Some(&record), &r.host, &name, &found.uuid)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "{name} is recorded, but not yet taken over ({e}); run `sspctl adopt {} {name}` again",
                    r.host
                ))
            })?;
        tracing::info!(container = %name, host = %r.host, gpus = ?instance.gpus, port = instance.ssh_port, "adopted");
        let (state, uuid, warning) = match self.core.converge(&name).await {
            Ok(Converged::Ensured(st)) => (st.status.clone(), st.uuid.clone(), String::new()),
            Ok(other) => ("pending".into(), String::new(), format!("{other:?}")),
            Err(e) => (
                "pending".into(),
                String::new(),
                format!(
                    "{name} is ssp's now, but not yet as its spec says ({e}); ssp keeps retrying"
                ),
            ),
        };
        self.core.kick();
        let (user, host) = self.core.read(|s| {
            (
                s.users.get(&name).map(convert::user_to_wire),
                s.hosts.get(&r.host).cloned(),
            )
        });
        Ok(Response::new(AdoptReply {
            user,
            instance: Some(convert::instance_view(
                &instance,
                host.as_ref(),
                &state,
                &uuid,
            )),
            warning,
        }))
    }

    async fn resize_user(
        &self,
        req: Request<ResizeUserRequest>,
    ) -> Result<Response<ResizeUserReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "resize", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .resize_user(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let name = ssp_model::Username::parse(&r.name).map_err(input_status)?;
        let cmd = request::resize(&r, &self.core.cfg).map_err(input_status)?;
        // A disk cannot shrink below what the container holds: asked of its host
        // before anything is recorded.
        if r.disk_bytes > 0 {
            let placed: Vec<(String, Option<ssp_model::Host>)> = self.core.read(|s| {
                s.instances
                    .values()
                    .filter(|i| i.owner.as_str() == name.as_str() && r.disk_bytes < i.limits.disk.0)
                    .map(|i| (i.host.to_string(), s.hosts.get(i.host.as_str()).cloned()))
                    .collect()
            });
            for (host, record) in placed {
                let seen = self
                    .core
                    .agents
                    .observe(record.as_ref(), &host, true, "")
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "a smaller disk needs {name}'s current use, and {e}"
                        ))
                    })?;
                if let Some(s) = seen
                    .iter()
                    .find(|s| s.owner == name.as_str() && s.disk_used_bytes > r.disk_bytes)
                {
                    return Err(Status::failed_precondition(format!(
                        "cannot resize: {} uses {} of its disk, more than the {} asked; free space in it first",
                        s.name,
                        ssp_model::ByteSize(s.disk_used_bytes),
                        ssp_model::ByteSize(r.disk_bytes)
                    )));
                }
            }
        }
        let instances = match self.core.apply_for(&caller, cmd, id).await? {
            Applied::Now(Outcome::Resized { instances }) => instances,
            _ => self.core.read(|s| {
                s.instances
                    .values()
                    .filter(|i| i.owner.as_str() == name.as_str())
                    .map(|i| i.name.clone())
                    .collect()
            }),
        };
        tracing::info!(user = %name, "resized");
        let mut late = Vec::new();
        for inst in &instances {
            match self.core.converge(inst).await {
                Ok(Converged::Ensured(_)) => {}
                Ok(other) => late.push(format!("{inst}: {other:?}")),
                Err(e) => late.push(format!("{inst}: {e}")),
            }
        }
        let user = self
            .core
            .read(|s| s.users.get(name.as_str()).map(convert::user_to_wire));
        Ok(Response::new(ResizeUserReply {
            user,
            instances,
            warning: if late.is_empty() {
                String::new()
            } else {
                format!(
                    "the new limits are recorded, but not every container has them yet ({}); ssp keeps retrying",
                    late.join("; ")
                )
            },
        }))
    }

    async fn set_relay(
        &self,
        req: Request<ssp_proto::SetRelayRequest>,
    ) -> Result<Response<ssp_proto::RelayView>, Status> {
        let caller = self
            .admit(&req, &[Admin], "set-relay", &req.get_ref().host)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .set_relay(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let cmd = request::set_relay(req.get_ref()).map_err(input_status)?;
        self.core.apply_for(&caller, cmd, id).await?;
        // Every container's spec names its relay port: the agents start (or stop) the tunnels.
        self.core.kick();
        Ok(Response::new(self.core.read(relay_view)))
    }

    async fn get_relay(
        &self,
        req: Request<ssp_proto::GetRelayRequest>,
    ) -> Result<Response<ssp_proto::RelayView>, Status> {
        self.admit(&req, &[Admin], "get-relay", "").await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        let view = self.core.read(relay_view);
        Ok(annotate(Response::new(view), &self.core, kind))
    }

    async fn set_lan(
        &self,
        req: Request<ssp_proto::SetLanRequest>,
    ) -> Result<Response<ssp_proto::LanList>, Status> {
        let caller = self
            .admit(&req, &[Admin], "set-lan", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .set_lan(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let cmd = request::set_lan(req.get_ref()).map_err(input_status)?;
        self.core.apply_for(&caller, cmd, id).await?;
        Ok(Response::new(self.core.read(lan_list)))
    }

    async fn list_lans(
        &self,
        req: Request<ssp_proto::ListLansRequest>,
    ) -> Result<Response<ssp_proto::LanList>, Status> {
        self.admit(&req, &[Admin], "list-lans", "").await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        let list = self.core.read(lan_list);
        Ok(annotate(Response::new(list), &self.core, kind))
    }

    async fn set_network(
        &self,
        req: Request<ssp_proto::SetNetworkRequest>,
    ) -> Result<Response<ssp_proto::SetNetworkReply>, Status> {
        let caller = self
            .admit(&req, &[Admin], "set-network", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .set_network(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let cmd = request::set_network(&r).map_err(input_status)?;
        let changed = match self.core.apply_for(&caller, cmd, id).await? {
            Applied::Now(Outcome::NetworkSet { instances }) => instances,
            _ => vec![],
        };
        tracing::info!(user = %r.name, network = %r.network, ?changed, "network set");
        let mut late = Vec::new();
        let mut addresses = BTreeMap::new();
        for inst in &changed {
            match self.core.converge(inst).await {
                Ok(Converged::Ensured(st)) => {
                    addresses.insert(inst.clone(), st.lan_address.clone());
                }
                Ok(other) => late.push(format!("{inst}: {other:?}")),
                Err(e) => late.push(format!("{inst}: {e}")),
            }
        }
        let instances = self.core.read(|s| {
            s.instances
                .values()
                .filter(|i| i.owner.as_str() == r.name)
                .map(|i| {
                    let mut v = convert::instance_view(i, s.hosts.get(i.host.as_str()), "", "");
                    if let Some(a) = addresses.get(&i.name).filter(|a| !a.is_empty()) {
                        v.lan_address = a.clone();
                    }
                    v
                })
                .collect()
        });
        Ok(Response::new(ssp_proto::SetNetworkReply {
            instances,
            warning: if late.is_empty() {
                String::new()
            } else {
                format!(
                    "the new network is recorded, but not every container has it yet ({}); ssp keeps retrying",
                    late.join("; ")
                )
            },
        }))
    }

    async fn snapshots(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        let op = SnapshotOp::try_from(req.get_ref().op)
            .map_err(|_| Status::invalid_argument("op must be list, create, restore or delete"))?;
        let action = format!(
            "snapshot-{}",
            op.as_str_name()["SNAPSHOT_OP_".len()..].to_lowercase()
        );
        let caller = self
            .admit_self(&req, &action, &req.get_ref().name.clone())
            .await?;
        // The leader knows where a container is while it moves.
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .snapshots(forwarded(req))
                .await;
        }
        let r = req.into_inner();
        let name = ssp_model::Username::parse(&r.name).map_err(input_status)?;
        match op {
            SnapshotOp::List => {}
            SnapshotOp::Create if r.snapshot.is_empty() => {}
            SnapshotOp::Create => {
                ssp_model::parse_snapshot_name(&r.snapshot, true).map_err(input_status)?;
            }
            SnapshotOp::Restore | SnapshotOp::Delete => {
                if r.snapshot.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "name the snapshot to {} (see `sspctl snapshot list {name}`)",
                        if op == SnapshotOp::Restore {
                            "restore"
                        } else {
                            "delete"
                        }
                    )));
                }
                ssp_model::parse_snapshot_name(&r.snapshot, false).map_err(input_status)?;
            }
        }
        let (host, record) = self
            .core
            .read(|s| -> Result<_, Status> {
                let inst = s.instances.get(name.as_str()).ok_or_else(|| {
                    Status::not_found(format!("{name} has no container"))
                })?;
                if inst.deleting {
                    return Err(Status::failed_precondition(format!(
                        "{name}'s container is being removed"
                    )));
                }
                if let Some(m) = s.moving(&inst.name) {
                    return Err(Status::failed_precondition(format!(
                        "{name}'s container is moving to {} (migration {}, {}); snapshots wait until the move is done",
                        m.to.host, m.id, m.phase
                    )));
                }
                Ok((inst.host.to_string(), s.hosts.get(inst.host.as_str()).cloned()))
            })?;
        let snapshot = r.snapshot.clone();
        let list = self
            .core
            .agents
            .snapshots(
                record.as_ref(),
                &host,
                SnapshotRequest {
                    name: name.to_string(),
                    op: op as i32,
                    snapshot: r.snapshot,
                },
            )
            .await?;
        if op != SnapshotOp::List {
            // Who restored or deleted what stays in the audit log.
            let cmd = Command::Audit {
                action: format!("{action} {snapshot}").trim().to_string(),
                target: name.to_string(),
                outcome: list.done.clone(),
            };
            if let Err(e) = self.core.apply_for(&caller, cmd, None).await {
                tracing::warn!(user = %name, "audit of {action}: {}", e.message());
            }
        }
        Ok(from_leader(Response::new(list), &self.core))
    }

    async fn set_snapshot_schedule(
        &self,
        req: Request<SetSnapshotScheduleRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        let caller = self
            .admit(&req, &[Admin], "snapshot-schedule", &req.get_ref().name)
            .await?;
        if let Route::Leader(a) = self.core.route(req.metadata()).await? {
            return self
                .core
                .peers
                .coordinator(&a)?
                .set_snapshot_schedule(forwarded(req))
                .await;
        }
        let id = request_id(req.metadata());
        let r = req.into_inner();
        let name = ssp_model::Username::parse(&r.name).map_err(input_status)?;
        let schedule =
            ssp_model::SnapshotSchedule::new(r.every_secs, r.keep).map_err(input_status)?;
        let cmd = Command::SetSnapshotSchedule {
            name: name.to_string(),
            schedule,
        };
        self.core.apply_for(&caller, cmd, id).await?;
        let instances: Vec<String> = self.core.read(|s| {
            s.instances
                .values()
                .filter(|i| i.owner.as_str() == name.as_str())
                .map(|i| i.name.clone())
                .collect()
        });
        tracing::info!(user = %name, every_secs = schedule.every_secs, keep = schedule.keep, "snapshot schedule set");
        // The agents get the schedule with the spec; where a host cannot be
        // reached now, the reconciler brings it later.
        let mut late = Vec::new();
        for inst in &instances {
            match self.core.converge(inst).await {
                Ok(Converged::Ensured(_)) => {}
                Ok(other) => late.push(format!("{inst}: {other:?}")),
                Err(e) => late.push(format!("{inst}: {e}")),
            }
        }
        Ok(Response::new(SnapshotList {
            instance: instances.join(","),
            host: String::new(),
            snapshots: vec![],
            done: if late.is_empty() {
                format!(
                    "{name}: {}",
                    if schedule.every_secs == 0 {
                        "no scheduled snapshots".to_string()
                    } else {
                        format!(
                            "a snapshot every {}s, the newest {} kept",
                            schedule.every_secs, schedule.keep
                        )
                    }
                )
            } else {
                format!(
                    "the schedule is recorded, but not every host has it yet ({}); ssp keeps retrying",
                    late.join("; ")
                )
            },
            every_secs: schedule.every_secs,
            keep: schedule.keep,
        }))
    }

    async fn ssh_config(
        &self,
        req: Request<SshConfigRequest>,
    ) -> Result<Response<SshConfigReply>, Status> {
        let caller = self
            .admit(&req, &[Admin, UserRole], "ssh-config", &req.get_ref().name)
            .await?;
        let kind = self.core.prepare_read(req.metadata()).await?;
        let r = req.into_inner();
        let state = self.core.snapshot();
        // A person's own container, or the Common-Server they have an account in.
        let inst = state
            .homes_of(&r.name)
            .find(|i| !i.deleting)
            .filter(|_| caller.role == Admin || r.name == caller.name);
        let Some(inst) = inst else {
            if caller.role != Admin {
                // The same answer whether bob exists or not.
                return Err(self.core.deny(&caller, "ssh-config", &r.name).await);
            }
            return Err(Status::not_found(format!("no container named {}", r.name)));
        };
        let host = state.hosts.get(inst.host.as_str()).ok_or_else(|| {
            Status::internal(format!(
                "host {} of {} is not registered",
                inst.host, r.name
            ))
        })?;
        if r.outside {
            let (Some(relay), Some(port)) = (&state.relay, inst.relay_port) else {
                return Err(Status::failed_precondition(match &state.relay {
                    None => "this lab has no relay for access from outside the LAN (an admin sets one with `sspctl relay set`)".to_string(),
                    Some(_) => format!("{}'s container has no relay port yet", r.name),
                }));
            };
            let config = crate::sshconfig::render(
                inst,
                &r.name,
                crate::sshconfig::Route::Relay {
                    host: relay.host.as_str(),
                    port,
                },
                &r.identity_file,
            );
            return Ok(annotate(
                Response::new(SshConfigReply { config }),
                &self.core,
                kind,
            ));
        }
        // A container on the LAN is reached at its own address there, which the
        // LAN's DHCP server gave it: its agent reads it from the daemon.
        let lan_address = match inst.network {
            ssp_model::Network::Forward => None,
            ssp_model::Network::Lan if inst.lan_address.is_some() => {
                inst.lan_address.map(|a| a.to_string())
            }
            ssp_model::Network::Lan => {
                let seen = self
                    .core
                    .agents
                    .observe(Some(host), inst.host.as_str(), true, &inst.name)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!(
                            "{}'s container is on the LAN and its address comes from its host {}, which did not answer: {e}",
                            r.name, inst.host
                        ))
                    })?;
                let addr = seen
                    .into_iter()
                    .find(|s| s.name == inst.name)
                    .map(|s| s.lan_address)
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| {
                        Status::unavailable(format!(
                            "{}'s container has no address on the LAN yet (is it running, and does the LAN's DHCP server answer?)",
                            r.name
                        ))
                    })?;
                Some(addr)
            }
        };
        let route = match &lan_address {
            Some(a) => crate::sshconfig::Route::Lan(a),
            None => crate::sshconfig::Route::Forward(host),
        };
        let mut config = crate::sshconfig::render(inst, &r.name, route, &r.identity_file);
        if inst.desktop {
            let rdp = match &lan_address {
                Some(a) => Some(format!("{a}:3389")),
                None => host
                    .rdp_port(inst.ssh_port)
                    .map(|p| format!("{}:{p}", host.ssh_host)),
            };
            if let Some(rdp) = rdp {
                config.insert_str(
                    0,
                    &format!("# Remote desktop (RDP) of ssp-{}: {rdp}\n", r.name),
                );
            }
        }
        Ok(annotate(
            Response::new(SshConfigReply { config }),
            &self.core,
            kind,
        ))
    }
}

/// Every LAN a host is on or a pool is set for, with its hosts and use.
fn lan_list(s: &ssp_model::State) -> ssp_proto::LanList {
    let mut names: std::collections::BTreeSet<String> = s.lans.keys().cloned().collect();
    names.extend(s.hosts.values().filter_map(|h| h.lan.clone()));
    let lans = names
        .into_iter()
        .map(|n| {
            let pool = s.lans.get(&n);
            let on = |i: &&ssp_model::Instance| i.placement.lan.as_deref() == Some(n.as_str());
            ssp_proto::LanView {
                hosts: s
                    .hosts
                    .values()
                    .filter(|h| h.lan.as_deref() == Some(n.as_str()))
                    .map(|h| h.name.to_string())
                    .collect(),
                pool: pool.map(|p| p.to_string()).unwrap_or_default(),
                gateway: pool
                    .and_then(|p| p.gateway)
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                held: s
                    .instances
                    .values()
                    .filter(on)
                    .filter(|i| i.lan_address.is_some())
                    .count() as u32,
                size: pool
                    .map(|p| u32::from(p.last) - u32::from(p.first) + 1)
                    .unwrap_or(0),
                containers: s.instances.values().filter(on).count() as u32,
                name: n,
            }
        })
        .collect();
    ssp_proto::LanList { lans }
}

/// The relay and the lines its account's authorized_keys needs: each host
/// agent's key, allowed to forward ports and nothing else.
fn relay_view(s: &ssp_model::State) -> ssp_proto::RelayView {
    let Some(r) = &s.relay else {
        return ssp_proto::RelayView::default();
    };
    ssp_proto::RelayView {
        set: true,
        host: r.host.to_string(),
        port: r.port.into(),
        kind: r.kind.as_str().into(),
        user: r.user.to_string(),
        ports_first: r.ports.0.into(),
        ports_last: r.ports.1.into(),
        held: s
            .instances
            .values()
            .filter(|i| i.relay_port.is_some())
            .count() as u32,
        authorized_keys: s
            .hosts
            .values()
            .filter(|_| r.kind == ssp_model::RelayKind::Ssh)
            .filter_map(|h| {
                let key = h.relay_key.as_deref()?;
                let mut parts = key.split_whitespace();
                let (kind, blob) = (parts.next()?, parts.next()?);
                Some(format!(
                    "restrict,port-forwarding,command=\"/bin/false\" {kind} {blob} ssp-agent@{}",
                    h.name
                ))
            })
            .collect(),
    }
}
