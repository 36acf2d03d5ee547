//! The ssp coordinator: durable desired state, placement inside a deterministic
//! state machine, and the loop that drives agents towards it.

pub mod agents;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod core;
pub mod migrate;
pub mod plan;
pub mod raft;
pub mod request;
pub mod service;
pub mod sshconfig;
pub mod trust;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::config::CoordinatorConfig;
use crate::service::CoordinatorService;

/// Runs the coordinator until SIGTERM/SIGINT. `token` (or the config's
/// `token_file`) joins the cluster's CA at first start.
pub async fn run(cfg: CoordinatorConfig, token: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let address = cfg.advertise_address()?;
    let token = token.or_else(|| cfg.token_file.clone());
    let node = trust::establish(&cfg, &address, token.as_deref()).await?;
    let tls = node.tls.clone();
    tracing::info!(identity = %tls.identity().label(), serial = %tls.identity().serial, "certificate loaded");
    // Bind before raft starts, so peers reach us as soon as we vote or lead.
    let listener = ssp_net::Listener::bind(cfg.listen).await?;
    let replica =
        raft::Replica::start(&cfg.data_dir, address.clone(), &cfg.raft, tls.clone()).await?;
    replica.read(|m| {
        tracing::info!(
            node = replica.id,
            users = m.state.users.len(),
            hosts = m.state.hosts.len(),
            applied = ?m.last_applied.map(|l| l.index),
            "state loaded"
        )
    });
    let raft_svc = raft::network::RaftService {
        id: replica.id,
        raft: replica.raft.clone(),
    };
    let core = core::Core::new(replica.clone(), cfg.clone(), tls.clone());
    let initialized = replica.initialized().await;
    if !initialized && cfg.bootstrap {
        match replica.init().await {
            Ok(()) => {
                tracing::info!(
                    node = replica.id,
                    "formed a one-node cluster (bootstrap = true)"
                );
                // Settings go in before any request can place a user.
                if core.leader().await.is_ok() {
                    if let Err(e) = core.settle_settings().await {
                        tracing::warn!("recording the settings failed: {}", e.message());
                    }
                    trust::record_unrecorded(&core, &node.unrecorded).await;
                }
            }
            // Only possible if the log appeared between the check and now.
            Err(e) => tracing::warn!(node = replica.id, "bootstrap skipped: {e}"),
        }
    } else if !initialized {
        tracing::info!(
            node = replica.id,
            %address,
            "not part of a cluster yet: waiting for `sspctl cluster init` or `sspctl cluster join {address}`"
        );
    }
    let svc = CoordinatorService {
        core: core.clone(),
        seen_hosts: Arc::new(Mutex::new(BTreeSet::new())),
    };
    let cluster = cluster::ClusterService { core: core.clone() };
    let trust_svc = trust::TrustService {
        core: core.clone(),
        ca: std::sync::Arc::new(node.ca.clone()),
    };
    tokio::spawn(trust::follow_revocations(core.clone()));
    tokio::spawn(trust::renew_loop(core.clone()));
    let every = Duration::from_secs(cfg.reconcile_secs.max(1));
    core.kick();
    tokio::spawn(core.clone().leader_loop(every));
    tokio::spawn(
        core.clone()
            .host_monitor(Duration::from_secs(cfg.host_timeout_secs.max(1))),
    );
    tracing::info!(addr = %listener.local_addr()?, node = replica.id, "coordinator listening");
    let max = raft::network::MAX_MESSAGE;
    use ssp_model::CertRole::Coordinator;
    let raft_server = ssp_proto::raft_server::RaftServer::new(raft_svc)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    ssp_net::Listener::server()
        .add_service(
            ssp_proto::coordinator_server::CoordinatorServer::new(svc)
                .max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(
            ssp_proto::cluster_server::ClusterServer::new(cluster)
                .max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(
            ssp_proto::trust_server::TrustServer::new(trust_svc)
                .max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            raft_server,
            ssp_net::auth::only(tls.clone(), &[Coordinator], "send raft messages"),
        ))
        .serve_with_incoming_shutdown(listener.incoming(tls)?, shutdown())
        .await?;
    let _ = replica.raft.shutdown().await;
    Ok(())
}

/// Largest request a client may send (a user's keys, a host's inventory); raft
/// messages between coordinators have their own, larger limit.
pub const MAX_REQUEST: usize = 1 << 20;

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
