//! `sspctl cluster init|join|leave|status`: the replicated coordinators.

use clap::Subcommand;
use serde_json::json;
use ssp_proto::cluster_client::ClusterClient;
use ssp_proto::{
    ClusterInitRequest, ClusterJoinRequest, ClusterLeaveRequest, ClusterStatus,
    ClusterStatusRequest,
};

use crate::cmd::Conn;
use crate::output;
use crate::Cli;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Form a one-node cluster of the coordinator given by --coordinator.
    Init,
    /// Add the (empty) coordinator at ADDR; it catches up, then votes.
    Join {
        /// Its advertise address, http://IP:PORT.
        address: String,
    },
    /// Remove a coordinator, by node id or address.
    Leave { node: String },
    /// Members, leader, term, commit and applied index, each member's lag.
    Status,
}

pub async fn run(cli: &Cli, cmd: &ClusterCmd) -> anyhow::Result<()> {
    let c = Conn::new(cli)?;
    let st = match cmd {
        ClusterCmd::Init => {
            c.call(ClusterInitRequest {}, |ch, r| async move {
                ClusterClient::new(ch).init(r).await
            })
            .await?
        }
        ClusterCmd::Join { address } => {
            let body = ClusterJoinRequest {
                address: address.clone(),
            };
            c.call(
                body,
                |ch, r| async move { ClusterClient::new(ch).join(r).await },
            )
            .await?
        }
        ClusterCmd::Leave { node } => {
            let body = ClusterLeaveRequest { node: node.clone() };
            c.call(body, |ch, r| async move {
                ClusterClient::new(ch).leave(r).await
            })
            .await?
        }
        ClusterCmd::Status => {
            c.call(ClusterStatusRequest {}, |ch, r| async move {
                ClusterClient::new(ch).status(r).await
            })
            .await?
        }
    }
    .into_inner();
    print(cli.output, &st);
    Ok(())
}

fn print(format: output::Format, st: &ClusterStatus) {
    let role = |id: u64, voter: bool| {
        if id == st.leader {
            "leader"
        } else if voter {
            "follower"
        } else {
            "learner"
        }
    };
    if let output::Format::Table = format {
        crate::outln!(
            "leader {}  term {}  last log {}  commit {}  applied {}  snapshot {}  (as seen by {})",
            st.leader,
            st.term,
            st.last_log_index,
            st.commit_index,
            st.applied_index,
            st.snapshot_index,
            st.served_by
        );
    }
    let rows = st
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.address.clone(),
                role(m.id, m.voter).to_string(),
                m.matched_index.to_string(),
                m.lag.to_string(),
            ]
        })
        .collect();
    let js = json!({
        "leader": st.leader, "term": st.term, "last_log_index": st.last_log_index,
        "commit_index": st.commit_index, "applied_index": st.applied_index,
        "snapshot_index": st.snapshot_index, "served_by": st.served_by,
        "members": st.members.iter().map(|m| json!({
            "id": m.id, "address": m.address, "role": role(m.id, m.voter),
            "matched_index": m.matched_index, "lag": m.lag})).collect::<Vec<_>>(),
    });
    output::print(
        format,
        &["ID", "ADDRESS", "ROLE", "MATCHED", "LAG"],
        rows,
        js,
    );
}
