//! The ssp coordinator: durable desired state, placement inside a deterministic
//! state machine, and the loop that drives agents towards it.

pub mod agents;
pub mod config;
pub mod convert;
pub mod core;
pub mod request;
pub mod service;
pub mod sshconfig;
pub mod store;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ssp_model::{Command, Settings};

use crate::config::CoordinatorConfig;
use crate::service::CoordinatorService;

/// Runs the coordinator until SIGTERM/SIGINT.
pub async fn run(cfg: CoordinatorConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let path = cfg.data_dir.join("state.redb");
    let mut store =
        store::Store::open(&path).with_context(|| format!("opening {}", path.display()))?;
    if store.state().settings.is_none() {
        store.apply(&Command::Init(Settings {
            uid_first: cfg.uid_range.0,
            uid_last: cfg.uid_range.1,
        }))?;
    }
    tracing::info!(
        users = store.state().users.len(),
        hosts = store.state().hosts.len(),
        index = store.index(),
        "state loaded"
    );
    let core = core::Core::new(store, cfg.clone());
    let svc = CoordinatorService {
        core: core.clone(),
        seen_hosts: Arc::new(Mutex::new(BTreeSet::new())),
    };
    let every = Duration::from_secs(cfg.reconcile_secs.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            core.reconcile(None).await;
        }
    });
    let listener = ssp_net::Listener::bind(cfg.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "coordinator listening");
    ssp_net::Listener::server()
        .add_service(ssp_proto::coordinator_server::CoordinatorServer::new(svc))
        .serve_with_incoming_shutdown(listener.incoming(), shutdown())
        .await?;
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
