//! The agent's gRPC service: parses requests and hands them to the ensure layer.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use ssp_lxd::Client;
use ssp_proto::agent_server::Agent;
use ssp_proto::*;
use tonic::{Request, Response, Status};

use crate::ensure::{self, EnsureError};
use crate::host::HostState;

/// The agent's service state.
#[derive(Clone)]
pub struct AgentService {
    pub host: Arc<HostState>,
    /// What this host allows in a spec, whoever sends it.
    pub policy: Arc<crate::policy::Policy>,
    /// Held from the policy check until the spec is stored, so two specs sent at
    /// once cannot both take the same GPU or port.
    pub admit: Arc<tokio::sync::Mutex<()>>,
    /// Where the daemon listens for moves out of this host.
    pub migration_address: String,
}

fn to_status(e: EnsureError) -> Status {
    match &e {
        EnsureError::Foreign(_) | EnsureError::Host(_) | EnsureError::Refused(_) => {
            Status::failed_precondition(e.to_string())
        }
        EnsureError::Render { .. } => Status::invalid_argument(e.to_string()),
        EnsureError::Daemon(d) if d.is_not_found() => Status::not_found(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn check_name(name: &str) -> Result<(), Status> {
    ssp_model::Username::parse(name)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

impl AgentService {
    fn client(&self) -> &Client {
        &self.host.client
    }

    /// The host policy's verdict on `spec` against the host's GPUs and the other
    /// stored specs; the caller holds `admit` until it has stored or used it.
    fn check_spec(
        &self,
        spec: &InstanceSpec,
        inventory: &HostInventory,
        what: &str,
    ) -> Result<(), Status> {
        let gpus: Vec<String> = inventory
            .gpus
            .iter()
            .map(|g| g.pci_address.clone())
            .collect();
        let others: Vec<InstanceSpec> = self
            .host
            .specs
            .names()
            .iter()
            .filter_map(|n| self.host.specs.get(n))
            .collect();
        crate::policy::check(spec, &self.policy, &gpus, &others).map_err(|why| {
            tracing::warn!(instance = %spec.name, "refused {what}: {why}");
            Status::invalid_argument(format!(
                "this host refuses the spec of {}: {why}",
                spec.name
            ))
        })
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn inventory(
        &self,
        _: Request<InventoryRequest>,
    ) -> Result<Response<HostInventory>, Status> {
        let inv = self
            .host
            .inventory()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(inv))
    }

    async fn list_instances(
        &self,
        req: Request<ListInstancesRequest>,
    ) -> Result<Response<InstanceList>, Status> {
        let mut instances = ensure::list(self.client(), req.get_ref().managed_only)
            .await
            .map_err(to_status)?;
        if !req.get_ref().name.is_empty() {
            instances.retain(|i| i.name == req.get_ref().name);
        } else {
            let names: Vec<&str> = instances.iter().map(|i| i.name.as_str()).collect();
            self.host.forget_others(&names);
        }
        for i in &mut instances {
            if let Some(f) = self.host.restarts.failing(&i.name) {
                i.failing = f;
            }
        }
        if req.get_ref().with_usage {
            // For people (`sspctl ls`, `user add`): the leader's reconcile, which
            // lists without usage, has no use for it.
            for i in &mut instances {
                i.problem = self.host.problem(&i.name);
            }
            let client = self.client();
            let usage = futures::future::join_all(instances.iter().map(|i| async move {
                client
                    .get(&format!("/1.0/instances/{}/state", i.name))
                    .await
            }))
            .await;
            for (i, u) in instances.iter_mut().zip(usage) {
                let Ok(s) = u else { continue };
                // Not known (a stopped container on some drivers): 0.
                i.disk_used_bytes = s["disk"]["root"]["usage"].as_u64().unwrap_or(0);
                i.lan_address = crate::ensure::lan_address(&s)
                    .map(|a| a.to_string())
                    .unwrap_or_default();
            }
        }
        Ok(Response::new(InstanceList {
            instances,
            members_hash: self.host.members.hash(),
        }))
    }

    async fn ensure_instance(
        &self,
        req: Request<InstanceSpec>,
    ) -> Result<Response<InstanceStatus>, Status> {
        let spec = req.into_inner();
        check_name(&spec.name)?;
        let facts = self
            .host
            .facts()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read host facts: {e:#}")))?;
        let ctx = facts.context;
        let _guard = self.host.lock(&spec.name).await;
        // Refused specs are never stored, so the agent never heals them either.
        let admitting = self.admit.lock().await;
        self.check_spec(&spec, &facts.inventory, "a spec")?;
        // Kept before acting, so the agent can enforce it on its own from now on.
        self.host
            .specs
            .put(&spec)
            .map_err(|e| Status::internal(format!("storing the spec of {}: {e}", spec.name)))?;
        drop(admitting);
        let st = self.host.ensure(&ctx, &spec).await.map_err(to_status)?;
        if !st.changed.is_empty() {
            tracing::info!(instance = %spec.name, changed = ?st.changed, "ensured");
        }
        Ok(Response::new(st))
    }

    async fn instance_action(
        &self,
        req: Request<InstanceActionRequest>,
    ) -> Result<Response<InstanceStatus>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        let action = match Action::try_from(r.action) {
            Ok(Action::Start) => "start",
            Ok(Action::Stop) => "stop",
            Ok(Action::Restart) => "restart",
            Ok(Action::Freeze) => "freeze",
            _ => {
                return Err(Status::invalid_argument(
                    "action must be start, stop, restart or freeze",
                ))
            }
        };
        let _guard = self.host.lock(&r.name).await;
        // A stop asked for through ssp stays stopped; start and restart undo it.
        if let Some(mut spec) = self.host.specs.get(&r.name) {
            spec.running = action == "start" || action == "restart";
            self.host
                .specs
                .put(&spec)
                .map_err(|e| Status::internal(format!("storing the spec of {}: {e}", r.name)))?;
        }
        let (inst, _) = self
            .client()
            .instance(&r.name)
            .await
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| Status::not_found(format!("instance {} does not exist", r.name)))?;
        if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
            return Err(to_status(EnsureError::Foreign(r.name)));
        }
        let frozen = crate::freeze::marked(&inst.config);
        let running = inst.is_running();
        let client = self.client();
        let daemon = |e: ssp_lxd::Error| to_status(e.into());
        match action {
            "freeze" if !running => {}
            "freeze" => {
                if !crate::freeze::freeze(client, &r.name)
                    .await
                    .map_err(to_status)?
                {
                    client
                        .set_state(&r.name, "stop", true)
                        .await
                        .map_err(daemon)?;
                }
            }
            // Frozen by a move: killed where it stands, never thawed to run on.
            "stop" | "restart" if frozen => {
                crate::freeze::kill(client, &r.name, true)
                    .await
                    .map_err(to_status)?;
                if action == "restart" {
                    client
                        .set_state(&r.name, "start", false)
                        .await
                        .map_err(daemon)?;
                }
            }
            "start" if frozen => {
                crate::freeze::thaw(client, &r.name)
                    .await
                    .map_err(to_status)?;
                if !running {
                    client
                        .set_state(&r.name, "start", false)
                        .await
                        .map_err(daemon)?;
                }
            }
            _ => {
                client
                    .set_state(&r.name, action, action != "start")
                    .await
                    .map_err(daemon)?;
            }
        }
        let (inst, _) = self
            .client()
            .instance(&r.name)
            .await
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| Status::not_found(format!("instance {} vanished", r.name)))?;
        Ok(Response::new(ensure::status_of(&inst)))
    }

    async fn delete_instance(
        &self,
        req: Request<DeleteInstanceRequest>,
    ) -> Result<Response<DeleteInstanceReply>, Status> {
        let name = req.into_inner().name;
        check_name(&name)?;
        let _guard = self.host.lock(&name).await;
        // Forget the spec first, so the stop that deletion causes is not healed.
        self.host
            .specs
            .remove(&name)
            .map_err(|e| Status::internal(format!("forgetting the spec of {name}: {e}")))?;
        let existed = ensure::delete(self.client(), &name)
            .await
            .map_err(to_status)?;
        tracing::info!(instance = %name, existed, "deleted");
        Ok(Response::new(DeleteInstanceReply { existed }))
    }

    async fn set_lab_members(
        &self,
        req: Request<LabMembers>,
    ) -> Result<Response<SetLabMembersReply>, Status> {
        let m = req.into_inner();
        crate::policy::check_members(&m, &self.policy).map_err(|why| {
            tracing::warn!("refused a member list: {why}");
            Status::invalid_argument(format!("this host refuses the member list: {why}"))
        })?;
        let before = self.host.members.hash();
        let host = Arc::clone(&self.host);
        let n = m.members.len();
        let hash = tokio::task::spawn_blocking(move || host.members.set(&m))
            .await
            .map_err(|e| Status::internal(format!("writing the members files: {e}")))?
            .map_err(|e| Status::internal(format!("writing the members files: {e}")))?;
        if hash != before {
            tracing::info!(members = n, %hash, "lab members files written");
        }
        Ok(Response::new(SetLabMembersReply { hash }))
    }

    async fn migrate_out(
        &self,
        req: Request<MigrateOutRequest>,
    ) -> Result<Response<MigrateOutReply>, Status> {
        let r = req.into_inner();
        let name = r.name;
        check_name(&name)?;
        if !r.snapshot.is_empty() {
            check_name(&r.snapshot).map_err(|_| {
                Status::invalid_argument(format!(
                    "snapshot name {:?}: letters, digits and '-' only",
                    r.snapshot.chars().take(80).collect::<String>()
                ))
            })?;
        }
        let _guard = self.host.lock(&name).await;
        if r.check_live {
            let (live_available, live_reason) =
                match crate::migrate::check_live(self.client(), &name).await {
                    Ok(()) => (true, String::new()),
                    Err(why) => (false, why),
                };
            return Ok(Response::new(MigrateOutReply {
                live_available,
                live_reason,
                ..Default::default()
            }));
        }
        let reply = crate::migrate::migrate_out(
            self.client(),
            &self.migration_address,
            &self.host.ssh_host,
            &name,
            &r.snapshot,
        )
        .await
        .map_err(to_status)?;
        tracing::info!(instance = %name, operation = %reply.operation, "a move out of this host may pull it");
        Ok(Response::new(reply))
    }

    type MigrateInStream = Pin<Box<dyn Stream<Item = Result<MigrateProgress, Status>> + Send>>;

    async fn migrate_in(
        &self,
        req: Request<MigrateInRequest>,
    ) -> Result<Response<Self::MigrateInStream>, Status> {
        let r = req.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("a move needs the container's spec"))?;
        let source = r
            .source
            .ok_or_else(|| Status::invalid_argument("a move needs the source's operation"))?;
        check_name(&spec.name)?;
        if !source.operation.starts_with("https://") {
            return Err(Status::invalid_argument(format!(
                "the source operation must be an https:// URL, not {:?}",
                source.operation.chars().take(80).collect::<String>()
            )));
        }
        let facts = self
            .host
            .facts()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read host facts: {e:#}")))?;
        {
            let _admitting = self.admit.lock().await;
            self.check_spec(&spec, &facts.inventory, "a move in")?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<MigrateProgress, Status>>(64);
        let host = Arc::clone(&self.host);
        tokio::spawn(async move {
            let _guard = host.lock(&spec.name).await;
            let (ptx, mut prx) = tokio::sync::mpsc::channel::<MigrateProgress>(64);
            let forward = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(p) = prx.recv().await {
                        let _ = tx.send(Ok(p)).await;
                    }
                })
            };
            let t0 = std::time::Instant::now();
            let result = crate::migrate::migrate_in(
                &host.client,
                &facts.context,
                &host.addrs,
                &spec,
                &source,
                &ptx,
            )
            .await;
            drop(ptx);
            let _ = forward.await;
            let last = match result {
                Ok(refresh) => {
                    tracing::info!(instance = %spec.name, refresh, ms = t0.elapsed().as_millis() as u64, "moved in");
                    Ok(MigrateProgress {
                        refresh,
                        done: true,
                        ..Default::default()
                    })
                }
                Err(e) => {
                    tracing::warn!(instance = %spec.name, "a move in failed: {e}");
                    Err(to_status(e))
                }
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn probe_ssh(
        &self,
        req: Request<ProbeSshRequest>,
    ) -> Result<Response<ProbeSshReply>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        let timeout = std::time::Duration::from_millis(u64::from(r.timeout_ms.min(120_000)));
        let (answered, detail) = crate::migrate::probe_ssh(self.client(), &r.name, timeout).await;
        Ok(Response::new(ProbeSshReply { answered, detail }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotReply>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        check_name(&r.snapshot)
            .map_err(|_| Status::invalid_argument("snapshot names are letters, digits and '-'"))?;
        let _guard = self.host.lock(&r.name).await;
        let existed = crate::migrate::delete_snapshot(self.client(), &r.name, &r.snapshot)
            .await
            .map_err(to_status)?;
        Ok(Response::new(DeleteSnapshotReply { existed }))
    }

    async fn snapshots(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        use crate::snapshot;
        let r = req.into_inner();
        check_name(&r.name)?;
        let op = SnapshotOp::try_from(r.op)
            .map_err(|_| Status::invalid_argument("op must be list, create, restore or delete"))?;
        let input = |e: ssp_model::InputError| Status::invalid_argument(e.to_string());
        let _guard = self.host.lock(&r.name).await;
        let client = self.client();
        let done = match op {
            SnapshotOp::List => String::new(),
            SnapshotOp::Create => {
                let snap = if r.snapshot.is_empty() {
                    snapshot::stamped("snap-")
                } else {
                    ssp_model::parse_snapshot_name(&r.snapshot, true).map_err(input)?
                };
                snapshot::create(client, &r.name, &snap)
                    .await
                    .map_err(to_status)?;
                tracing::info!(instance = %r.name, snapshot = %snap, "snapshot taken");
                format!("took snapshot {snap} of {}", r.name)
            }
            SnapshotOp::Restore => {
                let snap = ssp_model::parse_snapshot_name(&r.snapshot, false).map_err(input)?;
                let have = snapshot::list(client, &r.name).await.map_err(to_status)?;
                if !have.iter().any(|s| s.name == snap) {
                    return Err(Status::not_found(format!(
                        "{} has no snapshot {snap}",
                        r.name
                    )));
                }
                snapshot::restore(&self.host, &r.name, &snap)
                    .await
                    .map_err(to_status)?;
                tracing::info!(instance = %r.name, snapshot = %snap, "restored");
                format!("restored {} to snapshot {snap}", r.name)
            }
            SnapshotOp::Delete => {
                let snap = ssp_model::parse_snapshot_name(&r.snapshot, false).map_err(input)?;
                if !snapshot::delete(client, &r.name, &snap)
                    .await
                    .map_err(to_status)?
                {
                    return Err(Status::not_found(format!(
                        "{} has no snapshot {snap}",
                        r.name
                    )));
                }
                tracing::info!(instance = %r.name, snapshot = %snap, "snapshot deleted");
                format!("deleted snapshot {snap} of {}", r.name)
            }
        };
        let snapshots = snapshot::list(client, &r.name).await.map_err(to_status)?;
        let spec = self.host.specs.get(&r.name).unwrap_or_default();
        Ok(Response::new(SnapshotList {
            instance: r.name,
            host: String::new(),
            snapshots,
            done,
            every_secs: spec.snapshot_every_secs,
            keep: spec.snapshot_keep,
        }))
    }

    async fn publish_image(
        &self,
        req: Request<PublishImageRequest>,
    ) -> Result<Response<ImageReply>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        let alias = ssp_model::parse_image(&r.alias)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !r.snapshot.is_empty() {
            ssp_model::parse_snapshot_name(&r.snapshot, false)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        // The container's lock: a move or restore waits, and this waits for them.
        let _guard = self.host.lock(&r.name).await;
        let stamp = crate::snapshot::stamped("");
        let fingerprint =
            crate::image::publish(self.client(), &r.name, &r.snapshot, &alias, &stamp)
                .await
                .map_err(to_status)?;
        Ok(Response::new(ImageReply {
            done: format!("published {} as {alias}", r.name),
            fingerprint,
        }))
    }

    async fn share_image(
        &self,
        req: Request<ShareImageRequest>,
    ) -> Result<Response<ShareImageReply>, Status> {
        let r = req.into_inner();
        let image = ssp_model::parse_image(&r.image)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let reply = crate::image::share(
            self.client(),
            &self.migration_address,
            &self.host.ssh_host,
            &image,
        )
        .await
        .map_err(to_status)?;
        Ok(Response::new(reply))
    }

    async fn fetch_image(
        &self,
        req: Request<FetchImageRequest>,
    ) -> Result<Response<ImageReply>, Status> {
        let r = req.into_inner();
        for a in &r.aliases {
            ssp_model::parse_image(a).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if !r.server.starts_with("https://")
            || r.fingerprint.len() != 64
            || !r.fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Status::invalid_argument(
                "fetch needs an https:// server and a full sha256 fingerprint",
            ));
        }
        let reply = crate::image::fetch(self.client(), &r)
            .await
            .map_err(to_status)?;
        tracing::info!(fingerprint = %r.fingerprint, aliases = ?r.aliases, from = %r.server, "image copied here");
        Ok(Response::new(reply))
    }

    async fn delete_image(
        &self,
        req: Request<DeleteImageRequest>,
    ) -> Result<Response<DeleteImageReply>, Status> {
        let r = req.into_inner();
        let image = ssp_model::parse_image(&r.image)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let existed = crate::image::delete(self.client(), &image)
            .await
            .map_err(to_status)?;
        if existed {
            tracing::info!(%image, "image deleted");
        }
        Ok(Response::new(DeleteImageReply { existed }))
    }

    async fn survey(&self, req: Request<SurveyRequest>) -> Result<Response<SurveyReply>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        let Some((inst, _)) =
            self.client().instance(&r.name).await.map_err(|e| {
                Status::unavailable(format!("reading {} from the daemon: {e}", r.name))
            })?
        else {
            return Ok(Response::new(SurveyReply::default()));
        };
        let facts = self
            .host
            .facts()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read host facts: {e:#}")))?;
        let mut s = crate::adopt::survey(&inst, &facts.inventory.gpus);
        if inst.is_running() && !r.user.is_empty() {
            s.ssh_keys = crate::adopt::keys_inside(self.client(), &r.name, &r.user).await;
        }
        Ok(Response::new(s))
    }

    async fn take_over(
        &self,
        req: Request<TakeOverRequest>,
    ) -> Result<Response<TakeOverReply>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        let _guard = self.host.lock(&r.name).await;
        let inst = self
            .client()
            .instance(&r.name)
            .await
            .map_err(|e| Status::unavailable(format!("reading {} from the daemon: {e}", r.name)))?
            .map(|(i, _)| i)
            .ok_or_else(|| Status::not_found(format!("no container {} on this host", r.name)))?;
        let uuid = inst
            .config
            .get("volatile.uuid")
            .cloned()
            .unwrap_or_default();
        if uuid != r.uuid {
            return Err(Status::failed_precondition(format!(
                "container {} is not the one surveyed (volatile.uuid {uuid}, not {})",
                r.name, r.uuid
            )));
        }
        if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
            self.client()
                .patch(
                    &format!("/1.0/instances/{}", r.name),
                    serde_json::json!({"config": {"user.ssp.managed": "true"}}),
                )
                .await
                .map_err(|e| Status::unavailable(format!("marking {} as ssp's: {e}", r.name)))?;
            tracing::info!(instance = %r.name, %uuid, "taken over: a container made by hand is ssp's now");
        }
        Ok(Response::new(TakeOverReply {}))
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<InstanceEvent, Status>> + Send>>;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let rx = self.host.events.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| r.ok().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

use tokio_stream::StreamExt as _;
