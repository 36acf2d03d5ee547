//! Group commit: requests that arrive while earlier ones are being replicated
//! travel together as one log entry, so a burst of writes costs one fsync and
//! one replication round instead of one each. One batch is in flight at a time
//! and the next forms meanwhile, so a lone request never waits for a batch to fill.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Batch, NodeId, Raft, Reply, Request};

/// Most requests in one log entry.
const MAX_BATCH: usize = 256;
/// Most bytes (serialized) in one log entry, besides its first request: with
/// openraft's `max_payload_entries` this keeps every AppendEntries message
/// under the raft message limit, so a burst of large requests cannot stall
/// replication.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Batches being replicated at once: one, so the next batch grows while it replicates
/// (measured: more in flight means smaller batches, more fsyncs, lower throughput).
const IN_FLIGHT: usize = 1;

/// Why a write did not get a reply from the state machine.
#[derive(Debug, Clone)]
pub enum WriteError {
    /// This node is not (or no longer) the leader; the leader's address if known.
    NotLeader(Option<String>),
    /// Replication failed (raft stopped, quorum lost, ...).
    Failed(String),
}

type Pending = (Request, oneshot::Sender<Result<Reply, WriteError>>);

/// The handle writers use; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Pending>,
}

impl Writer {
    /// Starts the batching task for `raft`.
    pub fn start(raft: Raft) -> Writer {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(raft, rx));
        Writer { tx }
    }

    /// Replicates `req` and returns what applying it produced.
    pub async fn write(&self, req: Request) -> Result<Reply, WriteError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .await
            .map_err(|_| WriteError::Failed("the coordinator is shutting down".into()))?;
        rx.await
            .map_err(|_| WriteError::Failed("the write was dropped".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // A request that would have overflowed the last entry starts the next one.
    let mut held: Option<Pending> = None;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = size_of(&first.0);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    let n = size_of(&p.0);
                    if bytes + n > MAX_BATCH_BYTES {
                        held = Some(p);
                        break;
                    }
                    bytes += n;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (reqs, txs): (Vec<Request>, Vec<_>) = batch.into_iter().unzip();
            let res = raft.client_write(Batch(reqs)).await;
            drop(permit);
            match res {
                Ok(resp) => {
                    for (tx, reply) in txs.into_iter().zip(resp.data) {
                        let _ = tx.send(Ok(reply));
                    }
                }
                Err(e) => {
                    let err = classify(e);
                    for tx in txs {
                        let _ = tx.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

/// A request's size in the log (its JSON encoding).
fn size_of(req: &Request) -> usize {
    serde_json::to_vec(req)
        .map(|v| v.len())
        .unwrap_or(MAX_BATCH_BYTES)
}

fn classify(e: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            WriteError::NotLeader(f.leader_node.map(|n| n.addr))
        }
        other => WriteError::Failed(other.to_string()),
    }
}
