//! Raft messages between coordinators over gRPC (through ssp-net, like every channel).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ssp_proto::raft_client::RaftClient;
use ssp_proto::RaftMessage;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{NodeId, Raft, TypeConfig};

/// Largest message a coordinator accepts from a peer (snapshot chunks, log batches).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Channels to peers, one per address, shared by every replication stream;
/// mutual TLS, so only coordinators of this cluster take part.
#[derive(Clone)]
pub struct Network {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: ssp_net::Tls,
}

impl Network {
    pub fn new(tls: ssp_net::Tls) -> Self {
        Network {
            channels: Default::default(),
            tls,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let channel = match self.channels.lock() {
            Ok(mut map) => match map.get(&node.addr) {
                Some(c) => Some(c.clone()),
                None => match ssp_net::channel(&node.addr, &self.tls, ssp_net::COORDINATOR_NAME) {
                    Ok(c) => {
                        map.insert(node.addr.clone(), c.clone());
                        Some(c)
                    }
                    Err(e) => {
                        tracing::warn!(target, addr = %node.addr, "bad peer address: {e}");
                        None
                    }
                },
            },
            Err(_) => None,
        };
        Peer {
            target,
            addr: node.addr.clone(),
            client: channel.map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE)
            }),
        }
    }
}

/// One peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Channel>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    async fn call<Q, P, E>(
        &mut self,
        kind: Kind,
        req: &Q,
        option: &RPCOption,
    ) -> Result<P, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Q: Serialize,
        P: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "bad address {}",
                self.addr
            )))));
        };
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut r = Request::new(RaftMessage {
            target: self.target,
            payload,
        });
        r.set_timeout(option.hard_ttl());
        let res = match kind {
            Kind::Append => client.append_entries(r).await,
            Kind::Vote => client.vote(r).await,
            Kind::Snapshot => client.install_snapshot(r).await,
        };
        let reply = match res {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                    "{}: {}",
                    self.addr,
                    s.message()
                )))))
            }
            Err(s) => {
                return Err(RPCError::Network(NetworkError::new(&Msg(format!(
                    "{}: {}",
                    self.addr,
                    s.message()
                )))))
            }
        };
        let out: Result<P, RaftError<NodeId, E>> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        out.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Kind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Kind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Kind::Vote, &rpc, &option).await
    }
}

/// The receiving side: hands peers' messages to this node's raft.
#[derive(Clone)]
pub struct RaftService {
    pub id: NodeId,
    pub raft: Raft,
}

impl RaftService {
    fn decode<T: DeserializeOwned>(&self, m: &RaftMessage) -> Result<T, Status> {
        if m.target != self.id {
            return Err(Status::failed_precondition(format!(
                "this coordinator is node {}, not node {} (its data was wiped or replaced)",
                self.id, m.target
            )));
        }
        serde_json::from_slice(&m.payload)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { target: 0, payload }))
}

#[tonic::async_trait]
impl ssp_proto::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.decode(req.get_ref())?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = self.decode(req.get_ref())?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self.decode(req.get_ref())?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
