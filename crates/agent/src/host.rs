//! Per-host shared state: the daemon client, inventory, per-instance locks and events.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ssp_lxd::Client;
use ssp_proto::{HostInventory, InstanceEvent};
use tokio::sync::{broadcast, Mutex, OwnedMutexGuard};

use crate::convert;
use crate::inventory::{self, GpuSource};
use crate::render::{GpuMode, HostContext};

/// Everything the agent's tasks share.
pub struct HostState {
    pub client: Client,
    pub gpus: GpuSource,
    pub pool: String,
    pub ssh_listen: String,
    pub events: broadcast::Sender<InstanceEvent>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Control nodes passed along with GPUs when they exist on the host.
const CONTROL_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

impl HostState {
    pub fn new(client: Client, gpus: GpuSource, pool: String, ssh_listen: String) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            client,
            gpus,
            pool,
            ssh_listen,
            events,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// One ensure/delete/action per instance at a time.
    pub async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().await;
            locks.entry(name.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// The host inventory as the wire type.
    pub async fn inventory(&self) -> anyhow::Result<HostInventory> {
        let inv = inventory::collect(&self.client, &self.gpus).await?;
        Ok(convert::inventory_to_wire(&hostname(), &inv))
    }

    /// How GPUs are attached here: by PCI address when the daemon sees every GPU, else as device nodes.
    pub async fn context(&self) -> HostContext {
        let report = self.gpus.read().ok();
        let gpus = report.map(|r| r.gpus).unwrap_or_default();
        let seen = inventory::daemon_gpus(&self.client).await;
        let nvml = matches!(self.gpus, GpuSource::Nvml);
        let gpu_mode =
            if nvml && !gpus.is_empty() && gpus.iter().all(|g| seen.contains(&g.pci.to_string())) {
                GpuMode::Pci
            } else {
                GpuMode::DeviceNodes {
                    minors: gpus
                        .iter()
                        .map(|g| (g.pci.to_string(), g.minor))
                        .collect::<BTreeMap<_, _>>(),
                    control: CONTROL_NODES
                        .iter()
                        .filter(|n| Path::new("/dev").join(n).exists())
                        .map(|n| n.to_string())
                        .collect(),
                }
            };
        HostContext {
            pool: self.pool.clone(),
            ssh_listen: self.ssh_listen.clone(),
            gpu_mode,
        }
    }

    /// Follows the daemon's lifecycle events forever, reconnecting after the daemon restarts.
    pub async fn follow_events(self: Arc<Self>) {
        loop {
            match ssp_lxd::lifecycle_events(self.client.socket()).await {
                Ok(stream) => {
                    tracing::info!("following daemon lifecycle events");
                    let mut stream = Box::pin(stream);
                    while let Some(ev) = stream.next().await {
                        let _ = self.events.send(InstanceEvent {
                            instance: ev.instance,
                            action: ev.action,
                            timestamp: ev.timestamp,
                        });
                    }
                    tracing::warn!("daemon event stream ended; reconnecting");
                }
                Err(e) => tracing::warn!("cannot open daemon event stream: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
