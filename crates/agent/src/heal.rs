//! Self-healing on the host: the agent keeps the last spec it was given for each
//! container on local disk and enforces it itself, also while no coordinator can
//! be reached.
//!
//! - A container that should run and stops (init killed, a crash, a poweroff
//!   inside) is started again as soon as the daemon's lifecycle event arrives.
//!   More than [`BURST`] restarts within [`WINDOW`] is a crash loop: further tries
//!   back off exponentially (up to [`MAX_BACKOFF`]) and the container shows as
//!   `failing` until it stays up.
//! - Every `resync_secs` (and at start) every spec is ensured again, which puts
//!   back config keys and devices changed by hand.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use ssp_proto::InstanceSpec;

use crate::host::HostState;

/// Restarts allowed within [`WINDOW`] before backing off.
pub const BURST: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How soon a container the daemon was busy changing is looked at again.
pub const BUSY_RETRY: Duration = Duration::from_millis(500);

/// The specs this host was given, one file per container (`NAME.spec`, protobuf).
pub struct Specs {
    dir: PathBuf,
    map: Mutex<BTreeMap<String, InstanceSpec>>,
}

impl Specs {
    /// Loads every stored spec from `dir` (created if missing).
    pub fn open(dir: &Path) -> anyhow::Result<Specs> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut map = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("spec") {
                continue;
            }
            let bytes = std::fs::read(&path)?;
            match InstanceSpec::decode(bytes.as_slice()) {
                Ok(s) => {
                    map.insert(s.name.clone(), s);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "ignoring an unreadable spec: {e}")
                }
            }
        }
        Ok(Specs {
            dir: dir.to_path_buf(),
            map: Mutex::new(map),
        })
    }

    /// Stores `spec` durably (write, fsync, rename) before it is acted on.
    pub fn put(&self, spec: &InstanceSpec) -> std::io::Result<()> {
        if self.get(&spec.name).as_ref() == Some(spec) {
            return Ok(());
        }
        let path = self.dir.join(format!("{}.spec", spec.name));
        let tmp = self.dir.join(format!(".{}.spec.tmp", spec.name));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&spec.encode_to_vec())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        if let Ok(mut m) = self.map.lock() {
            m.insert(spec.name.clone(), spec.clone());
        }
        Ok(())
    }

    /// Forgets `name`'s spec durably (unlink, fsync of the directory) before the
    /// container is deleted, so a power loss cannot bring the spec back and have the
    /// container made again after the coordinator forgot it.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        if let Ok(mut m) = self.map.lock() {
            m.remove(name);
        }
        match std::fs::remove_file(self.dir.join(format!("{name}.spec"))) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(()) => std::fs::File::open(&self.dir)?.sync_all(),
        }
    }

    /// Moves `name`'s spec aside (`refused/NAME.spec`): the agent no longer acts
    /// on it or heals it, and the file stays for whoever wants to see it.
    pub fn quarantine(&self, name: &str) -> std::io::Result<()> {
        let aside = self.dir.join("refused");
        std::fs::create_dir_all(&aside)?;
        std::fs::rename(
            self.dir.join(format!("{name}.spec")),
            aside.join(format!("{name}.spec")),
        )?;
        if let Ok(mut m) = self.map.lock() {
            m.remove(name);
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }

    pub fn get(&self, name: &str) -> Option<InstanceSpec> {
        self.map.lock().ok()?.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.map
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// Restart history per container, for crash-loop backoff.
#[derive(Default)]
pub struct Restarts {
    map: Mutex<HashMap<String, History>>,
    /// Containers with a retry already waiting for the end of their backoff.
    pending: Mutex<std::collections::HashSet<String>>,
}

#[derive(Default)]
struct History {
    starts: VecDeque<Instant>,
    next_try: Option<Instant>,
    failures: u32,
}

/// How long a restart waits after `failures` crash-loop starts in a row.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(9)).min(MAX_BACKOFF)
}

impl Restarts {
    /// Records that ssp started `name` again; returns how many starts in a row
    /// were beyond the burst (0 when it is not crash-looping).
    fn record_start(&self, name: &str) -> u32 {
        let Ok(mut m) = self.map.lock() else {
            return 0;
        };
        let h = m.entry(name.to_string()).or_default();
        let now = Instant::now();
        h.starts.push_back(now);
        while h.starts.front().is_some_and(|t| now - *t > WINDOW) {
            h.starts.pop_front();
        }
        if h.starts.len() > BURST {
            h.failures += 1;
        } else {
            h.failures = 0;
        }
        h.next_try = None;
        h.failures
    }

    /// Records that `name` stopped although it should run. In a crash loop the
    /// next start waits (2 s, 4 s, … up to [`MAX_BACKOFF`]); returns until when.
    fn stopped(&self, name: &str) -> Option<Instant> {
        let mut m = self.map.lock().ok()?;
        let h = m.get_mut(name)?;
        if h.failures == 0 {
            return None;
        }
        let t = *h
            .next_try
            .get_or_insert_with(|| Instant::now() + backoff(h.failures));
        Some(t)
    }

    /// When `name` may be started again, if it is backing off.
    pub fn wait_until(&self, name: &str) -> Option<Instant> {
        let m = self.map.lock().ok()?;
        m.get(name)
            .and_then(|h| h.next_try)
            .filter(|t| *t > Instant::now())
    }

    /// A `failing` status line for a container in a crash loop, shown while its
    /// restart waits and until it has stayed up for [`WINDOW`].
    pub fn failing(&self, name: &str) -> Option<String> {
        let m = self.map.lock().ok()?;
        let h = m.get(name)?;
        let last = h.starts.back()?;
        let waiting = h.next_try.is_some_and(|t| t > Instant::now());
        (h.failures > 0 && (waiting || last.elapsed() < WINDOW)).then(|| {
            format!(
                "failing: started {} times within {}s; restarts wait {}s",
                h.starts.len(),
                WINDOW.as_secs(),
                backoff(h.failures).as_secs()
            )
        })
    }
}

impl crate::ensure::Starts for Restarts {
    fn may_start(&self, name: &str) -> bool {
        self.wait_until(name).is_none()
    }

    fn started(&self, name: &str) {
        let failures = self.record_start(name);
        if failures > 0 {
            tracing::warn!(instance = %name, next_wait_secs = backoff(failures).as_secs(), "crash loop: the next restart waits");
        }
    }
}

impl HostState {
    /// Makes `name` match its stored spec, unless it is backing off; when it is,
    /// a retry is scheduled for the end of the backoff.
    pub fn heal<'a>(
        self: &'a Arc<Self>,
        name: &'a str,
        why: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if let Some(t) = self.restarts.wait_until(name) {
                self.schedule_heal(name, t);
                return;
            }
            self.heal_now(name, why).await
        })
    }

    /// Heals `name` at `t` (the end of its backoff); one retry per container waits
    /// at a time, however many events and resyncs asked for it.
    pub fn schedule_heal(self: &Arc<Self>, name: &str, t: Instant) {
        let first = self
            .restarts
            .pending
            .lock()
            .is_ok_and(|mut p| p.insert(name.to_string()));
        if !first {
            return;
        }
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep_until(t.into()).await;
            if let Ok(mut p) = me.restarts.pending.lock() {
                p.remove(&name);
            }
            me.heal(&name, "backoff over").await;
        });
    }

    async fn heal_now(self: &Arc<Self>, name: &str, why: &str) {
        let _guard = self.lock(name).await;
        let Some(spec) = self.specs.get(name) else {
            return;
        };
        // Someone restarts (or starts, stops) it through the daemon right now: its
        // stop in the middle of a restart is no crash, and a start of ours then
        // would race the restart's own (the daemon lets it in, and one of the two
        // fails: "invalid argument"). Look again once that is done.
        match self.client.changing(name).await {
            Ok(Some(what)) => {
                tracing::debug!(instance = %name, why, doing = %what, "not healing while the daemon changes it");
                self.schedule_heal(name, Instant::now() + BUSY_RETRY);
                return;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(instance = %name, "the daemon's operations: {e}"),
        }
        let ctx = match self.facts().await {
            Ok(f) => f.context,
            Err(e) => {
                tracing::warn!(instance = %name, "cannot heal: host facts: {e:#}");
                return;
            }
        };
        match self.ensure(&ctx, &spec).await {
            Ok(st) if st.changed.is_empty() => {}
            Ok(st) => tracing::info!(instance = %name, changed = ?st.changed, why, "healed"),
            Err(e) => tracing::warn!(instance = %name, why, "heal failed: {e}"),
        }
    }

    /// [`crate::ensure::ensure`] under the crash-loop backoff (the caller holds the
    /// instance's lock). A start it held back, or a stop that came while it ran,
    /// gets a retry at the end of the wait.
    pub async fn ensure(
        self: &Arc<Self>,
        ctx: &crate::render::HostContext,
        spec: &InstanceSpec,
    ) -> Result<ssp_proto::InstanceStatus, crate::ensure::EnsureError> {
        let st = crate::ensure::ensure(&self.client, ctx, &self.addrs, spec, &self.restarts).await;
        self.note_ensure(&spec.name, st.as_ref().err().map(|e| e.to_string()));
        if let Some(t) = self.restarts.wait_until(&spec.name) {
            self.schedule_heal(&spec.name, t);
        }
        st
    }

    /// Checks every stored spec against one listing of the daemon's instances and
    /// ensures those that differ (or are missing). Returns how many were checked
    /// and how many were ensured.
    pub async fn resync(self: &Arc<Self>, why: &str) -> (usize, usize) {
        // A driver upgrade since the last pass gives GPU containers the new
        // driver's files in this one.
        let me = self.clone();
        if let Ok(true) = tokio::task::spawn_blocking(move || me.nvidia.refresh()).await {
            tracing::info!(
                why,
                "nvidia: the driver changed; GPU containers get its files"
            );
        }
        let names = self.specs.names();
        let listed = match self.client.instances().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(why, "resync cannot list instances: {e}");
                return (names.len(), 0);
            }
        };
        let ctx = match self.facts().await {
            Ok(f) => f.context,
            Err(e) => {
                tracing::warn!(why, "resync cannot read host facts: {e:#}");
                return (names.len(), 0);
            }
        };
        let by_name: HashMap<&str, &ssp_lxd::Instance> =
            listed.iter().map(|i| (i.name.as_str(), i)).collect();
        // Driver directories no container mounts any more go (after an upgrade).
        let in_use: std::collections::BTreeSet<String> = listed
            .iter()
            .filter_map(|i| i.expanded_devices.get(crate::nvidia::DEVICE)?.get("source"))
            .cloned()
            .collect();
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.nvidia.prune_old(&in_use)).await;
        let mut ensured = 0;
        for name in &names {
            let Some(spec) = self.specs.get(name) else {
                continue;
            };
            if by_name
                .get(name.as_str())
                .is_some_and(|i| crate::ensure::in_sync(i, &ctx, &spec))
            {
                continue;
            }
            ensured += 1;
            self.heal(name, why).await;
        }
        (names.len(), ensured)
    }

    /// Resyncs at start and every `every`.
    pub async fn resync_loop(self: Arc<Self>, every: Duration) {
        loop {
            self.resync("resync").await;
            self.prune_locks().await;
            tokio::time::sleep(every).await;
        }
    }

    /// Heals containers that stop: listens to the daemon's lifecycle events.
    pub async fn heal_on_events(self: Arc<Self>) {
        let mut rx = self.events.subscribe();
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let stops = matches!(
                        ev.action.as_str(),
                        "instance-stopped" | "instance-shutdown" | "instance-deleted"
                    );
                    if stops && self.specs.get(&ev.instance).is_some_and(|s| s.running) {
                        self.restarts.stopped(&ev.instance);
                        let me = self.clone();
                        tokio::spawn(async move { me.heal(&ev.instance, &ev.action).await });
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "missed lifecycle events; resyncing");
                    self.resync("missed events").await;
                }
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_survive_reopening_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Specs::open(dir.path()).unwrap();
        let spec = InstanceSpec {
            name: "ann".into(),
            running: true,
            cpus: 2,
            ..Default::default()
        };
        s.put(&spec).unwrap();
        s.put(&InstanceSpec {
            name: "bob".into(),
            ..Default::default()
        })
        .unwrap();
        s.remove("bob").unwrap();
        let again = Specs::open(dir.path()).unwrap();
        assert_eq!(again.get("ann"), Some(spec));
        assert_eq!(again.names(), vec!["ann".to_string()]);
    }

    #[test]
    fn a_crash_loop_backs_off() {
        let r = Restarts::default();
        for _ in 0..BURST {
            assert_eq!(r.record_start("c"), 0);
            assert!(
                r.stopped("c").is_none(),
                "within the burst, restarts are immediate"
            );
        }
        assert_eq!(r.record_start("c"), 1, "the sixth start within a minute");
        assert!(r
            .failing("c")
            .unwrap()
            .starts_with("failing: started 6 times within 60s; restarts wait 2s"));
        let t = r.stopped("c").expect("a stop in a crash loop waits");
        assert!(t > Instant::now() + Duration::from_millis(1500));
        assert_eq!(r.wait_until("c"), Some(t));
        use crate::ensure::Starts;
        assert!(
            !r.may_start("c"),
            "an ensure may not start it before the wait is over"
        );
        assert!(r.may_start("other"));
        assert_eq!(r.record_start("c"), 2);
        assert_eq!(r.wait_until("c"), None);
        assert!(r.may_start("c"));
        assert!(r.stopped("c").unwrap() > Instant::now() + Duration::from_millis(3500));
        assert!(r.failing("other").is_none());
    }
}
