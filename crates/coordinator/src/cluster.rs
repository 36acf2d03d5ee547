//! Where a request is served: routing to the leader, linearizable reads, and the
//! cluster-membership service (`sspctl cluster ...`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ssp_proto::cluster_client::ClusterClient;
use ssp_proto::coordinator_client::CoordinatorClient;
use ssp_proto::*;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::raft::NodeId;
use ssp_model::CertRole;

/// Header carrying a client's request id; retries reuse it.
pub const REQUEST_ID: &str = "ssp-request-id";
/// Header asking for (`stale`) or reporting (`linearizable`, `local`) a read's kind.
pub const READ: &str = "ssp-read";
/// Header naming the node that served a read.
pub const SERVED_BY: &str = "ssp-served-by";
/// Header naming the leader's address on replies, so clients can go there directly.
pub const LEADER: &str = "ssp-leader";
/// Set on a request a follower forwarded, so it is never forwarded twice.
const FORWARDED: &str = "ssp-forwarded";
/// How long a request waits for a leader to be elected.
const LEADER_WAIT: Duration = Duration::from_secs(3);

/// Where a request runs.
pub enum Route {
    Here,
    Leader(String),
}

/// How a read was served.
#[derive(Clone, Copy)]
pub enum ReadKind {
    /// Current as of the request: confirmed through the leader (read index).
    Linearizable,
    /// From this node's replica without asking the leader; may lag.
    Local,
}

/// Channels to other coordinators for forwarding.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: ssp_net::Tls,
}

impl Peers {
    pub fn new(tls: ssp_net::Tls) -> Self {
        Peers {
            channels: Default::default(),
            tls,
        }
    }

    /// Keeps channels only to these addresses (the current members).
    pub fn retain(&self, members: &[String]) {
        if let Ok(mut map) = self.channels.lock() {
            map.retain(|a, _| members.contains(a));
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut map = self
            .channels
            .lock()
            .map_err(|_| Status::internal("peer map poisoned"))?;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = ssp_net::channel(addr, &self.tls, ssp_net::COORDINATOR_NAME)
            .map_err(|e| Status::internal(e.to_string()))?;
        map.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    pub fn coordinator(&self, addr: &str) -> Result<CoordinatorClient<Channel>, Status> {
        Ok(CoordinatorClient::new(self.channel(addr)?))
    }

    pub fn cluster(&self, addr: &str) -> Result<ClusterClient<Channel>, Status> {
        Ok(ClusterClient::new(self.channel(addr)?))
    }
}

/// The request id a client attached, if any.
pub fn request_id(md: &MetadataMap) -> Option<String> {
    md.get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(String::from)
}

/// `req` re-addressed to the leader: same body and request id, marked forwarded,
/// naming the original caller (from its certificate) for the leader to authorize.
pub fn forwarded<T>(req: Request<T>) -> Request<T> {
    let md = req.metadata().clone();
    let peer = req.extensions().get::<ssp_net::Peer>().cloned();
    let mut out = Request::new(req.into_inner());
    let on_behalf = match &peer {
        Some(p) if p.identity.role == ssp_model::CertRole::Coordinator && !p.identity.token => md
            .get(ssp_net::auth::ON_BEHALF)
            .cloned()
            .or_else(|| ssp_net::auth::encode(&p.identity).parse().ok()),
        Some(p) => ssp_net::auth::encode(&p.identity).parse().ok(),
        None => None,
    };
    if let Some(v) = on_behalf {
        out.metadata_mut().insert(ssp_net::auth::ON_BEHALF, v);
    }
    for key in [REQUEST_ID, READ] {
        if let Some(v) = md.get(key) {
            out.metadata_mut().insert(key, v.clone());
        }
    }
    out.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    out
}

/// Tells the client where the leader is (this node answered as leader).
pub fn from_leader<T>(mut resp: Response<T>, core: &Core) -> Response<T> {
    if let Ok(v) = core.replica.address.parse() {
        resp.metadata_mut().insert(LEADER, v);
    }
    resp
}

/// Marks a read reply with who served it and how.
pub fn annotate<T>(mut resp: Response<T>, core: &Core, kind: ReadKind) -> Response<T> {
    let v = match kind {
        ReadKind::Linearizable => "linearizable",
        ReadKind::Local => "local",
    };
    resp.metadata_mut()
        .insert(READ, tonic::metadata::MetadataValue::from_static(v));
    if let Ok(id) = core.replica.id.to_string().parse() {
        resp.metadata_mut().insert(SERVED_BY, id);
    }
    resp
}

/// Set on errors from a coordinator that is not in a cluster yet, so clients that
/// know several coordinators try the next one instead of giving up.
pub const NOT_IN_CLUSTER: &str = "ssp-not-in-cluster";

fn not_in_cluster() -> Status {
    let mut md = MetadataMap::new();
    md.insert(
        NOT_IN_CLUSTER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    Status::with_metadata(
        tonic::Code::FailedPrecondition,
        "this coordinator is not part of a cluster yet: run `sspctl cluster init` on it, or add it to a cluster with `sspctl cluster join ADDR`",
        md,
    )
}

impl Core {
    /// Waits (briefly) for a known leader.
    pub async fn leader(&self) -> Result<(NodeId, String), Status> {
        if !self.replica.initialized().await {
            return Err(not_in_cluster());
        }
        if let Some(l) = self.replica.leader() {
            return Ok(l);
        }
        let _ = self
            .replica
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await;
        self.replica.leader().ok_or_else(|| {
            Status::unavailable(format!(
                "no coordinator leader after {}s (fewer than a majority of coordinators reachable?); retry",
                LEADER_WAIT.as_secs()
            ))
        })
    }

    /// Writes run on the leader: here, or forwarded there (once).
    pub async fn route(&self, md: &MetadataMap) -> Result<Route, Status> {
        let (id, addr) = self.leader().await?;
        if id == self.replica.id {
            return Ok(Route::Here);
        }
        if md.get(FORWARDED).is_some() {
            return Err(Status::unavailable(
                "the leader changed while the request was forwarded; retry",
            ));
        }
        Ok(Route::Leader(addr))
    }

    /// Makes this node's replica current enough for the read the client asked for.
    pub async fn prepare_read(&self, md: &MetadataMap) -> Result<ReadKind, Status> {
        if md.get(READ).and_then(|v| v.to_str().ok()) == Some("stale") {
            return Ok(ReadKind::Local);
        }
        let (leader, addr) = self.leader().await?;
        let index = if leader == self.replica.id {
            self.read_index().await?
        } else {
            let mut c = self.peers.cluster(&addr)?;
            let mut r = Request::new(ReadIndexRequest {});
            r.set_timeout(Duration::from_secs(5));
            c.read_index(r).await?.into_inner().index
        };
        self.replica
            .raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|e| {
                Status::unavailable(format!("replica did not catch up to the read index: {e}"))
            })?;
        Ok(ReadKind::Linearizable)
    }

    /// Leader only: confirms leadership with a quorum; the index a read must see.
    pub async fn read_index(&self) -> Result<u64, Status> {
        let (read, _) = self
            .replica
            .raft
            .get_read_log_id()
            .await
            .map_err(|e| Status::unavailable(format!("not confirmed as leader: {e}; retry")))?;
        Ok(read.map(|l| l.index).unwrap_or(0))
    }

    /// The cluster as this node sees it (members' lag is known on the leader).
    pub fn status(&self) -> ClusterStatus {
        let m = self.replica.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
                    .unwrap_or(if *id == self.replica.id { last } else { 0 });
                ClusterMember {
                    id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                    matched_index: matched,
                    lag: last.saturating_sub(matched),
                }
            })
            .collect();
        ClusterStatus {
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: last,
            commit_index: self.replica.commit_index(),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            members,
            served_by: self.replica.id,
        }
    }
}

/// The cluster-membership service.
#[derive(Clone)]
pub struct ClusterService {
    pub core: Core,
}

fn cluster_status(e: crate::raft::ClusterError) -> Status {
    match e {
        crate::raft::ClusterError::Refused(m) => Status::failed_precondition(m),
        crate::raft::ClusterError::Raft(m) => Status::unavailable(m),
    }
}

#[tonic::async_trait]
impl ssp_proto::cluster_server::Cluster for ClusterService {
    async fn node_info(
        &self,
        req: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoReply>, Status> {
        self.core
            .admit(
                &req,
                &[CertRole::Admin, CertRole::Coordinator],
                "node-info",
                "",
            )
            .await?;
        let r = &self.core.replica;
        Ok(Response::new(NodeInfoReply {
            id: r.id,
            address: r.address.clone(),
            initialized: r.initialized().await,
            last_log_index: r.raft.metrics().borrow().last_log_index.unwrap_or(0),
        }))
    }

    async fn init(
        &self,
        req: Request<ClusterInitRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        self.core
            .admit(&req, &[CertRole::Admin], "init", "")
            .await?;
        let r = &self.core.replica;
        if r.initialized().await {
            return Err(Status::already_exists(format!(
                "coordinator {} is already part of a cluster; `sspctl cluster status` shows it",
                r.id
            )));
        }
        r.init().await.map_err(cluster_status)?;
        self.core.leader().await?;
        self.core.settle_settings().await?;
        self.core.kick();
        Ok(Response::new(self.core.status()))
    }

    async fn join(
        &self,
        req: Request<ClusterJoinRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        self.core
            .admit(&req, &[CertRole::Admin], "join", "")
            .await?;
        if let crate::cluster::Route::Leader(addr) = self.core.route(req.metadata()).await? {
            return self.core.peers.cluster(&addr)?.join(forwarded(req)).await;
        }
        let addr = req.into_inner().address;
        if !addr.starts_with("http://") || addr.len() <= "http://".len() {
            return Err(Status::invalid_argument(format!(
                "coordinator address {addr:?}: expected http://IP:PORT (its advertise address)"
            )));
        }
        let mut c = self.core.peers.cluster(&addr)?;
        let mut r = Request::new(NodeInfoRequest {});
        r.set_timeout(Duration::from_secs(5));
        let info = c
            .node_info(r)
            .await
            .map_err(|s| {
                Status::unavailable(format!(
                    "coordinator at {addr} does not answer: {} (is ssp-coordinator running there?)",
                    s.message()
                ))
            })?
            .into_inner();
        if info.address != addr {
            return Err(Status::invalid_argument(format!(
                "the coordinator at {addr} advertises itself as {}; set advertise = \"{addr}\" in its config, or join it by {}",
                info.address, info.address
            )));
        }
        let member = self
            .core
            .replica
            .membership()
            .membership()
            .voter_ids()
            .any(|v| v == info.id);
        if info.initialized && !member {
            return Err(Status::failed_precondition(format!(
                "coordinator at {addr} (node {}) already has state of its own ({} log entries); start it with an empty data_dir and bootstrap = false, then join it",
                info.id, info.last_log_index
            )));
        }
        self.core
            .replica
            .join(info.id, &addr)
            .await
            .map_err(cluster_status)?;
        tracing::info!(node = info.id, %addr, "coordinator joined");
        Ok(Response::new(self.core.status()))
    }

    async fn leave(
        &self,
        req: Request<ClusterLeaveRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        self.core
            .admit(&req, &[CertRole::Admin], "leave", "")
            .await?;
        if let crate::cluster::Route::Leader(addr) = self.core.route(req.metadata()).await? {
            return self.core.peers.cluster(&addr)?.leave(forwarded(req)).await;
        }
        let node = req.into_inner().node;
        let members: Vec<(NodeId, String)> = self
            .core
            .replica
            .membership()
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let id = members
            .iter()
            .find(|(id, addr)| id.to_string() == node || *addr == node)
            .map(|(id, _)| *id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no member {node:?}; give a node id or address from: {}",
                    members
                        .iter()
                        .map(|(id, a)| format!("{id} ({a})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        self.core.replica.leave(id).await.map_err(cluster_status)?;
        tracing::info!(node = id, "coordinator left the cluster");
        Ok(Response::new(self.core.status()))
    }

    async fn status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        self.core
            .admit(
                &req,
                &[CertRole::Admin, CertRole::Coordinator],
                "status",
                "",
            )
            .await?;
        let stale = req.metadata().get(READ).and_then(|v| v.to_str().ok()) == Some("stale");
        if !stale {
            if let crate::cluster::Route::Leader(addr) = self.core.route(req.metadata()).await? {
                return self.core.peers.cluster(&addr)?.status(forwarded(req)).await;
            }
        }
        Ok(Response::new(self.core.status()))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        self.core
            .admit(&req, &[CertRole::Coordinator], "read-index", "")
            .await?;
        let index = self.core.read_index().await?;
        Ok(Response::new(ReadIndexReply {
            index,
            leader: self.core.replica.id,
        }))
    }

    async fn local_state(
        &self,
        req: Request<LocalStateRequest>,
    ) -> Result<Response<LocalStateReply>, Status> {
        self.core
            .admit(
                &req,
                &[CertRole::Admin, CertRole::Coordinator],
                "local-state",
                "",
            )
            .await?;
        let (json, applied) = self.core.replica.read(|m| {
            (
                serde_json::to_vec(m).map_err(|e| Status::internal(e.to_string())),
                m.last_applied.map(|l| l.index).unwrap_or(0),
            )
        });
        Ok(Response::new(LocalStateReply {
            id: self.core.replica.id,
            applied_index: applied,
            json: json?,
        }))
    }
}
