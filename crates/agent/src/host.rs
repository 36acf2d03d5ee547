//! Per-host shared state: the daemon client, inventory, per-instance locks and events.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ssp_lxd::Client;
use ssp_proto::{HostInventory, InstanceEvent};
use tokio::sync::{broadcast, Mutex, OwnedMutexGuard, RwLock};

use crate::inventory::{self, GpuSource};
use crate::render::{GpuMode, HostContext};

/// Everything the agent's tasks share.
pub struct HostState {
    pub client: Client,
    pub gpus: GpuSource,
    pub pool: String,
    pub ssh_listen: String,
    pub ssh_host: String,
    pub ssh_forward: crate::config::ForwardMode,
    /// Bridge addresses for NAT-forwarded SSH.
    pub addrs: crate::forward::Addrs,
    pub events: broadcast::Sender<InstanceEvent>,
    /// The last spec given for each container, kept on disk (see `heal`).
    pub specs: crate::heal::Specs,
    pub restarts: crate::heal::Restarts,
    /// The NVIDIA driver's user-space for GPU containers.
    pub nvidia: crate::nvidia::Nvidia,
    /// The lab's members files, mounted into every container.
    pub members: crate::members::Members,
    /// Where LAN containers join the LAN (`[lan]`).
    pub lan: Option<crate::render::LanNic>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    facts: RwLock<Option<Facts>>,
    /// The images and foreign ports last read, reported again while the daemon
    /// does not answer (a heartbeat says the agent is alive; it must not fail for that).
    last_images: std::sync::Mutex<Option<Vec<ssp_proto::Image>>>,
    last_foreign: std::sync::Mutex<Option<Vec<u16>>>,
    /// The containers' console logs, read to say why one did not come up.
    pub consoles: crate::boot::Consoles,
    /// The daemon's error at each container's last failed ensure (a start it
    /// refused, say), until an ensure succeeds.
    start_errors: std::sync::Mutex<HashMap<String, String>>,
}

/// Host facts gathered from the daemon and the GPU source. `/1.0/resources`
/// scans the hardware and is slow, so facts are cached, not read per request.
#[derive(Clone)]
pub struct Facts {
    pub inventory: HostInventory,
    pub context: HostContext,
    at: Instant,
}

/// How long host facts are reused before they are read again.
const FACTS_TTL: Duration = Duration::from_secs(60);

/// Control nodes passed along with GPUs when they exist on the host.
const CONTROL_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

impl HostState {
    // Each argument is one part of the host from the agent's config; a struct
    // for them would repeat these fields.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        gpus: GpuSource,
        pool: String,
        ssh_listen: String,
        ssh_host: String,
        ssh_forward: crate::config::ForwardMode,
        specs: crate::heal::Specs,
        nvidia: crate::nvidia::Nvidia,
        members: crate::members::Members,
        lan: Option<crate::render::LanNic>,
        daemon_logs: std::path::PathBuf,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            client,
            gpus,
            pool,
            ssh_listen,
            ssh_host,
            ssh_forward,
            addrs: Default::default(),
            events,
            specs,
            restarts: Default::default(),
            nvidia,
            members,
            lan,
            locks: Mutex::new(HashMap::new()),
            facts: RwLock::new(None),
            last_images: Default::default(),
            last_foreign: Default::default(),
            consoles: crate::boot::Consoles::new(daemon_logs),
            start_errors: Default::default(),
        })
    }

    /// Records how `name`'s last ensure ended: its error, or none.
    pub fn note_ensure(&self, name: &str, error: Option<String>) {
        if let Ok(mut m) = self.start_errors.lock() {
            match error {
                Some(e) => m.insert(name.to_string(), e),
                None => m.remove(name),
            };
        }
    }

    /// Forgets what was read or recorded about containers not in `names`
    /// (deleted ones).
    pub fn forget_others(&self, names: &[&str]) {
        self.consoles.retain(names);
        if let Ok(mut m) = self.start_errors.lock() {
            m.retain(|n, _| names.contains(&n.as_str()));
        }
    }

    /// Why `name`, which its spec says should run, did not come up: the units
    /// that failed in its last boot or why its init gave up (its console log),
    /// else the error of its last ensure; "" when nothing is known to be wrong.
    pub fn problem(&self, name: &str) -> String {
        if !self.specs.get(name).is_some_and(|s| s.running) {
            return String::new();
        }
        if let Some(d) = self.consoles.diagnose(name) {
            if !d.inotify {
                return d.problem;
            }
            let limit = crate::limits::read_proc_sys("fs.inotify.max_user_instances")
                .map(|v| v.to_string())
                .unwrap_or_else(|| "unknown".into());
            return format!(
                "{}; the host's inotify instances ran out (fs.inotify.max_user_instances is {limit}, shared by every container; `sspctl hosts` names the shortfall)",
                d.problem
            );
        }
        self.start_errors
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .map(|e| format!("its last start failed: {e}"))
            .unwrap_or_default()
    }

    /// One ensure/delete/action per instance at a time.
    pub async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().await;
            locks.entry(name.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Forgets the locks nobody holds or waits for (instances gone, names tried
    /// once), so the map does not grow with every name ever seen.
    pub async fn prune_locks(&self) {
        self.locks
            .lock()
            .await
            .retain(|_, m| Arc::strong_count(m) > 1);
    }

    /// The host's facts, read again when older than a minute; the NVIDIA driver
    /// directory is always the current one.
    pub async fn facts(&self) -> anyhow::Result<Facts> {
        let mut f = self.cached_facts().await?;
        f.context.nvidia = self.nvidia.userspace();
        Ok(f)
    }

    async fn cached_facts(&self) -> anyhow::Result<Facts> {
        if let Some(f) = self
            .facts
            .read()
            .await
            .as_ref()
            .filter(|f| f.at.elapsed() < FACTS_TTL)
        {
            return Ok(f.clone());
        }
        let (inv, daemon_gpus) = inventory::collect(&self.client, &self.gpus, &self.pool).await?;
        let (ssh, why) = crate::forward::discover(
            &self.client,
            self.ssh_forward,
            &self.ssh_listen,
            &self.ssh_host,
        )
        .await;
        let context = self.context_for(&inv.gpus, &daemon_gpus, ssh);
        let was = self
            .facts
            .read()
            .await
            .as_ref()
            .map(|f| f.context.ssh.clone());
        if was.as_ref() != Some(&context.ssh) {
            match &context.ssh {
                crate::render::SshForward::Nat { listen, subnet, .. } => tracing::info!(
                    %listen, bridge = %format!("{}/{}", subnet.gateway, subnet.prefix),
                    "SSH forwarded by NAT to static bridge addresses"
                ),
                crate::render::SshForward::Proxy { .. } => tracing::warn!(
                    "SSH forwarded by the daemon's proxy process, which adds about a second to every container start: {why}"
                ),
            }
        }
        let f = Facts {
            inventory: ssp_wire::inventory_to_wire(&hostname(), &inv),
            context,
            at: Instant::now(),
        };
        *self.facts.write().await = Some(f.clone());
        Ok(f)
    }

    /// The host inventory as the wire type. Images are read each time (one cheap
    /// request): they are imported and deleted by hand, and placement needs them current.
    pub async fn inventory(&self) -> anyhow::Result<HostInventory> {
        let mut inv = self.facts().await?.inventory;
        inv.images = self.images().await?;
        // Pool use too: placement refuses a new container the pool cannot hold.
        inv.pools = crate::inventory::pools(&self.client, &self.pool)
            .await?
            .iter()
            .map(ssp_wire::pool_to_wire)
            .collect();
        inv.images_reported = true;
        Ok(inv)
    }

    /// The daemon's images with their aliases, sorted by fingerprint.
    pub async fn images(&self) -> anyhow::Result<Vec<ssp_proto::Image>> {
        let read = self.client.images().await;
        or_last(
            read.map_err(Into::into).map(|list| {
                let mut images: Vec<ssp_proto::Image> = list
                    .iter()
                    .map(|i| ssp_proto::Image {
                        fingerprint: i.fingerprint.to_ascii_lowercase(),
                        aliases: i.alias_names(),
                    })
                    .collect();
                images.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
                images
            }),
            &self.last_images,
            "images",
        )
    }

    /// Ports of `range` that something other than ssp's own forwards holds here.
    pub async fn foreign_ports(&self, range: (u16, u16)) -> anyhow::Result<Vec<u16>> {
        // Listeners first: one that appears while the daemon is listed belongs to an
        // instance the listing already shows, so it is not taken for a foreign port.
        let listening = crate::ports::host_listeners();
        let read = self.client.instances().await;
        or_last(
            read.map_err(Into::into)
                .map(|list| crate::ports::foreign_ports(&list, &listening, range)),
            &self.last_foreign,
            "foreign ports",
        )
    }

    /// How GPUs are attached here: by PCI address when the daemon sees every
    /// GPU (NVML hosts), else as device nodes.
    fn context_for(
        &self,
        gpus: &[ssp_model::Gpu],
        daemon_gpus: &[String],
        ssh: crate::render::SshForward,
    ) -> HostContext {
        let nvml = matches!(self.gpus, GpuSource::Nvml(_));
        let gpu_mode = if nvml
            && !gpus.is_empty()
            && gpus
                .iter()
                .all(|g| daemon_gpus.contains(&g.pci.to_string()))
        {
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
            ssh,
            gpu_mode,
            nvidia: Default::default(),
            members_dir: Some(self.members.dir().display().to_string()),
            lan: self.lan.clone(),
        }
    }

    /// Follows the daemon's lifecycle events forever, reconnecting after the daemon restarts.
    pub async fn follow_events(self: Arc<Self>) {
        let mut first = true;
        loop {
            match ssp_lxd::lifecycle_events(self.client.socket()).await {
                Ok(stream) => {
                    tracing::info!("following daemon lifecycle events");
                    if !std::mem::take(&mut first) {
                        // A container that stopped while no stream was open sent its
                        // event to nobody: look at everything now, not at the next resync.
                        let me = self.clone();
                        tokio::spawn(async move { me.resync("event stream reopened").await });
                    }
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

/// `read` when it worked (and remembered in `last`), else what `last` holds, if anything.
fn or_last<T: Clone>(
    read: anyhow::Result<T>,
    last: &std::sync::Mutex<Option<T>>,
    what: &str,
) -> anyhow::Result<T> {
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    match read {
        Ok(v) => {
            *last = Some(v.clone());
            Ok(v)
        }
        Err(e) => match last.as_ref() {
            Some(v) => {
                tracing::warn!("cannot read {what} from the daemon, reporting the last: {e:#}");
                Ok(v.clone())
            }
            None => Err(e),
        },
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_read_reports_the_last_good_one_and_nothing_before_the_first() {
        let last = std::sync::Mutex::new(None);
        assert!(or_last::<Vec<u16>>(Err(anyhow::anyhow!("down")), &last, "ports").is_err());
        assert_eq!(
            or_last(Ok(vec![22000]), &last, "ports").unwrap(),
            vec![22000]
        );
        assert_eq!(
            or_last(Err(anyhow::anyhow!("down")), &last, "ports").unwrap(),
            vec![22000]
        );
        assert_eq!(
            or_last(Ok(vec![]), &last, "ports").unwrap(),
            Vec::<u16>::new()
        );
    }
}
