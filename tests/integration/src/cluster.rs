//! Replicated coordinators for tests: each in its own network namespace on a
//! shared bridge, with the faults a real cluster meets (kill -9, cut links,
//! SIGSTOP), a retrying client that records a history, and a checker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ssp_proto::cluster_client::ClusterClient;
use ssp_proto::coordinator_client::CoordinatorClient;
use ssp_proto::*;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::procs::{Proc, Ssp};
use crate::{run, Scratch};

/// One coordinator of a test cluster.
pub struct Node {
    pub ns: String,
    pub veth: String,
    pub addr: String,
    pub data: PathBuf,
    pub cfg: PathBuf,
    pub log: PathBuf,
    pub proc: Option<Proc>,
    pub paused: bool,
    pub cut: bool,
}

/// A cluster of coordinators on bridge `sspcb<idx>`, nodes at 10.240.<idx>.<n>.
pub struct Coordinators {
    pub idx: u8,
    pub nodes: Vec<Node>,
    pub ssp: Ssp,
    pub rt: tokio::runtime::Runtime,
    bridge: String,
    snapshot_every: u64,
    scratch: Scratch,
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

impl Coordinators {
    /// Starts `n` coordinators: the first forms the cluster, the others join it.
    pub fn start(tag: &str, idx: u8, n: usize, snapshot_every: u64) -> anyhow::Result<Self> {
        Self::start_with(Ssp::locate()?, tag, idx, n, snapshot_every)
    }

    /// Like [`Coordinators::start`], with these binaries (e.g. [`Ssp::plain`]).
    pub fn start_with(
        ssp: Ssp,
        tag: &str,
        idx: u8,
        n: usize,
        snapshot_every: u64,
    ) -> anyhow::Result<Self> {
        if unsafe_euid() != 0 {
            bail!("the cluster tests need root (network namespaces); run them via scripts/test.sh");
        }
        let bridge = format!("sspcb{idx}");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.240.{idx}.254/24"),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let scratch = Scratch::new(tag)?;
        let mut ssp = ssp;
        ssp.credentials_dir = Some(scratch.path().to_path_buf());
        let mut c = Coordinators {
            idx,
            nodes: Vec::new(),
            ssp,
            rt,
            bridge,
            snapshot_every,
            scratch,
        };
        for i in 0..n {
            c.add_node(i == 0)?;
        }
        c.wait_leader(Duration::from_secs(20))?;
        for i in 1..n {
            c.join(i)?;
        }
        Ok(c)
    }

    /// Creates the namespace and starts coordinator number `nodes.len()`.
    pub fn add_node(&mut self, bootstrap: bool) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let n = i + 1;
        let idx = self.idx;
        let ns = format!("sspc{idx}n{n}");
        let veth = format!("sc{idx}n{n}");
        let _ = ip(&["netns", "del", &ns]);
        let _ = ip(&["link", "del", &veth]);
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        let addr_ip = format!("10.240.{idx}.{n}");
        let cidr = format!("{addr_ip}/24");
        for args in [
            ["addr", "add", cidr.as_str(), "dev", "eth0"],
            ["link", "set", "eth0", "up", ""],
            ["link", "set", "lo", "up", ""],
        ] {
            let mut full = vec!["netns", "exec", ns.as_str(), "ip"];
            full.extend(args.iter().copied().filter(|a| !a.is_empty()));
            ip(&full)?;
        }
        let dir = self.scratch.path().join(format!("n{n}"));
        std::fs::create_dir_all(&dir)?;
        let addr = format!("http://{addr_ip}:7400");
        let data = dir.join("data");
        let cfg = dir.join("coordinator.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{addr_ip}:7400\"\nadvertise = \"{addr}\"\ndata_dir = \"{}\"\nbootstrap = {bootstrap}\nreconcile_secs = 30\n[raft]\nsnapshot_every = {}\n",
                data.display(),
                self.snapshot_every
            ),
        )?;
        let log = dir.join("coordinator.log");
        if !bootstrap {
            self.make_token(&dir.join("token"))?;
        }
        let mut node = Node {
            ns,
            veth,
            addr,
            data,
            cfg,
            log,
            proc: None,
            paused: false,
            cut: false,
        };
        node.proc = Some(self.spawn(&node)?);
        self.nodes.push(node);
        Ok(i)
    }

    /// A join token for a coordinator, from the running cluster.
    fn make_token(&self, path: &std::path::Path) -> anyhow::Result<()> {
        self.ctl(&[
            "token",
            "create",
            "--role",
            "coordinator",
            "--out",
            path.to_str().unwrap_or_default(),
        ])
        .map(|_| ())
    }

    fn spawn(&mut self, node: &Node) -> anyhow::Result<Proc> {
        let bin = self.ssp.bin("ssp-coordinator");
        let token = node.cfg.with_file_name("token");
        let mut argv = vec![
            bin.to_str().unwrap_or_default(),
            "--config",
            node.cfg.to_str().unwrap_or_default(),
        ];
        if token.exists() {
            argv.extend(["--token", token.to_str().unwrap_or_default()]);
        }
        let p = Proc::start(
            &format!("coordinator {}", node.addr),
            Some(&node.ns),
            &argv,
            &node.log,
        )?;
        if self.ssp.bundle.is_none() {
            let admin = node.data.join("tls/admin.bundle");
            crate::wait_for(
                "the first coordinator's admin credentials",
                Duration::from_secs(20),
                || admin.exists().then_some(()),
            )
            .with_context(|| p.log_tail())?;
            self.ssp.bundle = Some(admin);
        }
        Ok(p)
    }

    /// Every member's address, comma-separated, as sspctl takes them.
    pub fn addr_list(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs sspctl against every coordinator.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = crate::procs::sspctl(&self.ssp, &self.addr_list(), args);
        if !out.status.success() {
            bail!(
                "sspctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// `sspctl cluster join` of node `i`.
    pub fn join(&self, i: usize) -> anyhow::Result<()> {
        let addr = self.nodes[i].addr.clone();
        self.ctl(&["cluster", "join", &addr]).map(|_| ())
    }

    /// `sspctl cluster leave` of node `i`.
    pub fn leave(&self, i: usize) -> anyhow::Result<()> {
        let addr = self.nodes[i].addr.clone();
        self.ctl(&["cluster", "leave", &addr]).map(|_| ())
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc.as_mut() {
            p.signal(libc::SIGKILL);
        }
        self.nodes[i].paused = false;
    }

    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(p) = self.nodes[i].proc.as_mut() {
            p.start_again()?;
            return Ok(());
        }
        // Wiped: it needs a new join token to get a certificate again.
        let token = self.nodes[i].cfg.with_file_name("token");
        self.make_token(&token)?;
        let node = std::mem::replace(
            &mut self.nodes[i],
            Node {
                ns: String::new(),
                veth: String::new(),
                addr: String::new(),
                data: PathBuf::new(),
                cfg: PathBuf::new(),
                log: PathBuf::new(),
                proc: None,
                paused: false,
                cut: false,
            },
        );
        let p = self.spawn(&node);
        self.nodes[i] = node;
        self.nodes[i].proc = Some(p?);
        Ok(())
    }

    pub fn cut(&mut self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.nodes[i].veth, "down"])?;
        self.nodes[i].cut = true;
        Ok(())
    }

    pub fn heal(&mut self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.nodes[i].veth, "up"])?;
        self.nodes[i].cut = false;
        Ok(())
    }

    pub fn pause(&mut self, i: usize) {
        if let Some(p) = &self.nodes[i].proc {
            p.send(libc::SIGSTOP);
            self.nodes[i].paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if let Some(p) = &self.nodes[i].proc {
            p.send(libc::SIGCONT);
        }
        self.nodes[i].paused = false;
    }

    /// Kills node `i` and deletes its data directory; it will start empty and
    /// wait to be joined.
    pub fn wipe(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.nodes[i].proc = None;
        std::fs::remove_dir_all(&self.nodes[i].data)
            .with_context(|| format!("wiping {}", self.nodes[i].data.display()))?;
        let cfg = std::fs::read_to_string(&self.nodes[i].cfg)?
            .replace("bootstrap = true", "bootstrap = false");
        std::fs::write(&self.nodes[i].cfg, cfg)?;
        Ok(())
    }

    /// Heals every fault and starts every stopped node.
    pub fn heal_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].cut {
                self.heal(i)?;
            }
            if self.nodes[i].paused {
                self.resume(i);
            }
            self.start_node(i)?;
        }
        Ok(())
    }

    /// Node `i`'s own view of the cluster (no forwarding), if it answers within 1 s.
    pub fn local_status(&self, i: usize) -> Option<ClusterStatus> {
        let addr = self.nodes[i].addr.clone();
        let ch = {
            let _rt = self.rt.enter();
            self.ssp.channel(&addr).ok()?
        };
        self.rt.block_on(async move {
            let mut r = Request::new(ClusterStatusRequest {});
            r.metadata_mut().insert("ssp-read", "stale".parse().ok()?);
            r.set_timeout(Duration::from_secs(1));
            let mut c = ClusterClient::new(ch);
            tokio::time::timeout(Duration::from_secs(1), c.status(r))
                .await
                .ok()?
                .ok()
                .map(Response::into_inner)
        })
    }

    /// The index of the node the reachable nodes agree is leader (highest term wins).
    pub fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, u64)> = None;
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused || self.nodes[i].cut {
                continue;
            }
            if let Some(st) = self.local_status(i) {
                if st.leader != 0 && best.is_none_or(|(t, _)| st.term > t) {
                    let addr = st
                        .members
                        .iter()
                        .find(|m| m.id == st.leader)
                        .map(|m| m.address.clone());
                    if let Some(pos) =
                        addr.and_then(|a| self.nodes.iter().position(|n| n.addr == a))
                    {
                        best = Some((st.term, pos as u64));
                    }
                }
            }
        }
        best.map(|(_, i)| i as usize)
    }

    /// Waits for a leader, failing with the nodes' logs.
    pub fn wait_leader(&self, limit: Duration) -> anyhow::Result<usize> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if start.elapsed() > limit {
                bail!("no coordinator leader after {limit:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's replica of the state machine (JSON), from the nodes given.
    pub fn local_states(&self, which: &[usize]) -> anyhow::Result<Vec<(u64, serde_json::Value)>> {
        let mut out = Vec::new();
        for &i in which {
            let addr = self.nodes[i].addr.clone();
            let ch = {
                let _rt = self.rt.enter();
                self.ssp.channel(&addr)?
            };
            let r = self.rt.block_on(async move {
                let mut r = Request::new(LocalStateRequest {});
                r.set_timeout(Duration::from_secs(5));
                anyhow::Ok(ClusterClient::new(ch).local_state(r).await?.into_inner())
            })?;
            out.push((r.applied_index, serde_json::from_slice(&r.json)?));
        }
        Ok(out)
    }

    /// Waits until the given nodes hold identical replicas; returns one of them.
    pub fn wait_identical(
        &self,
        which: &[usize],
        limit: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let states = self.local_states(which);
            if let Ok(states) = &states {
                let first = &states[0].1;
                if states.iter().all(|(_, s)| s == first) {
                    return Ok(first.clone());
                }
            }
            if start.elapsed() > limit {
                let summary = match states {
                    Ok(s) => s
                        .iter()
                        .map(|(i, v)| {
                            format!(
                                "applied {i}, {} users",
                                v["state"]["users"]
                                    .as_object()
                                    .map(|m| m.len())
                                    .unwrap_or(0)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(e) => e.to_string(),
                };
                bail!(
                    "replicas still differ after {limit:?}: {summary}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tail of every node's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} ---\n{}",
                    n.addr,
                    n.proc.as_ref().map(|p| p.log_tail()).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Writes `text` to a file in this cluster's scratch directory; returns its path.
    pub fn scratch_file(&self, name: &str, text: &str) -> String {
        let p = self.scratch.path().join(name);
        std::fs::write(&p, text).expect("scratch file");
        p.display().to_string()
    }

    /// A client of every node.
    pub fn client(&self) -> anyhow::Result<Client> {
        let _rt = self.rt.enter();
        Client::new(
            self.nodes.iter().map(|n| n.addr.clone()).collect(),
            &self.ssp,
        )
    }
}

impl Drop for Coordinators {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(p) = &n.proc {
                p.send(libc::SIGCONT);
            }
            n.proc = None;
            let _ = ip(&["link", "del", &n.veth]);
            let _ = ip(&["netns", "del", &n.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn unsafe_euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// How one client operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Rejected(Code, String),
    /// The client gave up without a definite answer: it may or may not have applied.
    Unknown(String),
}

/// A client that tries every coordinator in turn, retrying with one request id.
#[derive(Clone)]
pub struct Client {
    channels: Arc<Vec<(String, Channel)>>,
    next: Arc<AtomicUsize>,
    /// The node the last reply named as leader (`usize::MAX`: none known).
    leader: Arc<AtomicUsize>,
    pub attempt_timeout: Duration,
    pub give_up_after: Duration,
}

impl Client {
    pub fn new(addrs: Vec<String>, ssp: &Ssp) -> anyhow::Result<Client> {
        let channels = addrs
            .into_iter()
            .map(|a| Ok((a.clone(), ssp.channel(&a)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Client {
            channels: Arc::new(channels),
            next: Default::default(),
            leader: Arc::new(AtomicUsize::new(usize::MAX)),
            attempt_timeout: Duration::from_secs(2),
            give_up_after: Duration::from_secs(40),
        })
    }

    async fn call<T, R, F, Fut>(&self, id: &str, body: T, f: F) -> (Outcome, Option<R>)
    where
        T: Clone,
        F: Fn(Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let start = Instant::now();
        loop {
            let hint = self.leader.swap(usize::MAX, Ordering::Relaxed);
            let k = if hint < self.channels.len() {
                hint
            } else {
                self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len()
            };
            let (addr, ch) = &self.channels[k];
            let mut req = Request::new(body.clone());
            if let Ok(v) = id.parse() {
                req.metadata_mut().insert("ssp-request-id", v);
            }
            req.set_timeout(self.attempt_timeout);
            let last = match tokio::time::timeout(self.attempt_timeout, f(ch.clone(), req)).await {
                Ok(Ok(r)) => {
                    let leader = r.metadata().get("ssp-leader").and_then(|v| v.to_str().ok());
                    if let Some(i) =
                        leader.and_then(|l| self.channels.iter().position(|(a, _)| a == l))
                    {
                        self.leader.store(i, Ordering::Relaxed);
                    }
                    return (Outcome::Ok, Some(r.into_inner()));
                }
                Ok(Err(s)) if s.metadata().get("ssp-not-in-cluster").is_some() => {
                    format!("{addr}: {}", s.message())
                }
                Ok(Err(s))
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                            | Code::Unknown
                    ) =>
                {
                    format!("{addr}: {:?} {}", s.code(), s.message())
                }
                Ok(Err(s)) => return (Outcome::Rejected(s.code(), s.message().to_string()), None),
                Err(_) => format!("{addr}: no answer in {:?}", self.attempt_timeout),
            };
            if start.elapsed() > self.give_up_after {
                return (Outcome::Unknown(last), None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn register_host(&self, req: RegisterHostRequest) -> Outcome {
        self.call("", req, |ch, r| async move {
            CoordinatorClient::new(ch).register_host(r).await
        })
        .await
        .0
    }

    pub async fn add_user(
        &self,
        id: &str,
        name: &str,
        gpus: u32,
    ) -> (Outcome, Option<AddUserReply>) {
        let body = AddUserRequest {
            name: name.into(),
            ssh_keys: vec![TEST_KEY.into()],
            gpus,
            no_wait: true,
            ..Default::default()
        };
        self.call(id, body, |ch, r| async move {
            CoordinatorClient::new(ch).add_user(r).await
        })
        .await
    }

    pub async fn remove_user(&self, id: &str, name: &str) -> Outcome {
        let body = RemoveUserRequest {
            name: name.into(),
            no_wait: true,
        };
        self.call(id, body, |ch, r| async move {
            CoordinatorClient::new(ch).remove_user(r).await
        })
        .await
        .0
    }
}

/// A public key for test users (never used to log in).
pub const TEST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHmB2v0iuKUmLtTb9ysu7x6sPvZxvZn6ZnKp3jnrbJ1M ssp-test";

/// A host with `gpus` GPUs whose agent is never there (placement only).
pub fn paper_host(name: &str, gpus: u32) -> RegisterHostRequest {
    RegisterHostRequest {
        name: name.into(),
        // The coordinator's own loopback in its namespace: refused at once.
        agent_address: "http://127.0.0.1:9".into(),
        ssh_host: "127.0.0.1".into(),
        ssh_port_first: 20000,
        ssh_port_last: 29999,
        inventory: Some(HostInventory {
            hostname: name.into(),
            cpus: 1024,
            memory_bytes: 4 << 40,
            pools: vec![StoragePool {
                name: "default".into(),
                driver: "btrfs".into(),
                total_bytes: 100 << 40,
                used_bytes: 0,
                ssp: true,
            }],
            gpus: (0..gpus)
                .map(|g| Gpu {
                    index: g,
                    uuid: format!("GPU-{name}-{g}"),
                    pci_address: format!("0000:{:02x}:00.0", g + 1),
                    model: "Test GPU".into(),
                    memory_bytes: 80 << 30,
                    minor: g,
                    device_node: format!("/dev/nvidia{g}"),
                })
                .collect(),
            gpu_source: "static:test".into(),
            daemon: "incus".into(),
            daemon_version: "6.0".into(),
            driver_version: String::new(),
            images: ["busybox", "debian-ssh"]
                .iter()
                .enumerate()
                .map(|(n, a)| ssp_proto::Image {
                    fingerprint: format!("{n:064x}"),
                    aliases: vec![a.to_string()],
                })
                .collect(),
            images_reported: true,
        }),
        labels: vec![],
        foreign_ports: vec![],
        lan: String::new(),
        relay_key: String::new(),
        rdp_port_first: 0,
        rdp_port_last: 0,
        warnings: vec![],
    }
}

/// One operation of a recorded history.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub op: Op,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Add { name: String, gpus: u32 },
    Remove { name: String },
}

/// A small deterministic generator, so any seed replays the same schedule.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn step(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.step() % (hi - lo).max(1)
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    pub acked: usize,
    pub rejected: usize,
    pub unknown: usize,
    pub users: usize,
    /// Refusals by gRPC code (ResourceExhausted: GPUs ran out).
    pub refusals: BTreeMap<String, usize>,
}

/// Checks a history against a final replica: every acknowledged operation is
/// there, none applied twice, no GPU or port held twice.
pub fn check(history: &[Event], machine: &serde_json::Value) -> anyhow::Result<Report> {
    let state = &machine["state"];
    let users = state["users"].as_object().context("state.users")?;
    let instances = state["instances"].as_object().context("state.instances")?;
    let mut errors = Vec::new();
    let mut report = Report {
        users: users.len(),
        ..Default::default()
    };
    let mut removed_acked: BTreeSet<&str> = BTreeSet::new();
    let mut remove_tried: BTreeSet<&str> = BTreeSet::new();
    for e in history {
        if let Op::Remove { name } = &e.op {
            remove_tried.insert(name);
            if e.outcome == Outcome::Ok {
                removed_acked.insert(name);
            }
        }
    }
    for e in history {
        match &e.outcome {
            Outcome::Ok => report.acked += 1,
            Outcome::Rejected(code, msg) => {
                report.rejected += 1;
                *report.refusals.entry(format!("{code:?}")).or_default() += 1;
                // The client's own retry being refused as a duplicate means it applied twice.
                if matches!(code, Code::AlreadyExists | Code::NotFound) {
                    errors.push(format!(
                        "{:?} {:?}: refused as {code:?}: {msg} (applied twice?)",
                        e.id, e.op
                    ));
                }
            }
            Outcome::Unknown(_) => report.unknown += 1,
        }
        match (&e.op, &e.outcome) {
            (Op::Add { name, .. }, Outcome::Ok) => {
                let inst = instances.get(name.as_str());
                if !users.contains_key(name.as_str()) || inst.is_none() {
                    if !remove_tried.contains(name.as_str()) {
                        errors.push(format!("acknowledged add of {name} is lost"));
                    }
                } else if removed_acked.contains(name.as_str())
                    && inst.and_then(|i| i["deleting"].as_bool()) != Some(true)
                {
                    errors.push(format!("acknowledged removal of {name} is lost"));
                }
            }
            (Op::Add { name, .. }, Outcome::Rejected(..)) if users.contains_key(name.as_str()) => {
                errors.push(format!("{name} exists although its add was refused"));
            }
            _ => {}
        }
    }
    let mut gpus: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut ports: BTreeMap<(String, u64), String> = BTreeMap::new();
    for (name, i) in instances {
        let host = i["host"].as_str().unwrap_or_default().to_string();
        for g in i["gpus"].as_array().into_iter().flatten() {
            let key = (host.clone(), g.as_str().unwrap_or_default().to_string());
            if let Some(other) = gpus.insert(key.clone(), name.clone()) {
                errors.push(format!("GPU {key:?} held by {other} and {name}"));
            }
        }
        let key = (host.clone(), i["ssh_port"].as_u64().unwrap_or_default());
        if let Some(other) = ports.insert(key.clone(), name.clone()) {
            errors.push(format!("port {key:?} held by {other} and {name}"));
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        bail!("{} violations:\n{}", errors.len(), errors.join("\n"))
    }
}

/// `ops` user additions and removals from `workers` concurrent clients; each
/// worker removes only users it added itself, after their addition was acknowledged.
/// Each worker pauses up to `pace` between operations, so a fault schedule has
/// time to run while the stream lasts.
pub async fn workload(
    client: Client,
    prefix: &str,
    ops: usize,
    workers: usize,
    seed: u64,
    pace: Duration,
) -> Vec<Event> {
    let per = ops.div_ceil(workers);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed * 1000 + w as u64);
            let mut mine: Vec<String> = Vec::new();
            let mut events = Vec::new();
            for k in 0..per {
                let id = format!("{prefix}-w{w}-{k}");
                let op = if !mine.is_empty() && rng.range(0, 10) < 3 {
                    let i = rng.range(0, mine.len() as u64) as usize;
                    Op::Remove {
                        name: mine.swap_remove(i),
                    }
                } else {
                    Op::Add {
                        name: format!("{prefix}w{w}u{k}"),
                        gpus: rng.range(0, 3) as u32,
                    }
                };
                let outcome = match &op {
                    Op::Add { name, gpus } => {
                        let (o, _) = client.add_user(&id, name, *gpus).await;
                        if o == Outcome::Ok {
                            mine.push(name.clone());
                        }
                        o
                    }
                    Op::Remove { name } => client.remove_user(&id, name).await,
                };
                events.push(Event { id, op, outcome });
                let pause = rng.range(0, pace.as_millis() as u64 + 1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            events
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(mut e) = t.await {
            all.append(&mut e);
        }
    }
    all
}
