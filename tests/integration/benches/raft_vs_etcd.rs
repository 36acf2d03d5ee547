//! Benchmark: user creations through a 3-coordinator ssp cluster against puts of
//! the same payload size into a 3-member etcd cluster, both on loopback, both
//! fsyncing, same concurrency, interleaved in one run.
//!
//! Run: cargo bench -p ssp-integration --bench raft_vs_etcd

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use prost::Message;
use ssp_integration::cluster::{paper_host, Client, Outcome, TEST_KEY};
use ssp_integration::{free_port, sspctl, Proc, Scratch, Ssp};
use ssp_proto::AddUserRequest;

const CONCURRENCY: usize = 32;
const ROUNDS: usize = 3;

/// Operations per round and side; SSP_BENCH_OPS overrides.
fn ops() -> usize {
    std::env::var("SSP_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

struct Run {
    secs: f64,
    lat_ms: Vec<f64>,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.lat_ms.len() as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.lat_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn start_ssp(dir: &Path, mut ssp: Ssp) -> Result<(Vec<Proc>, Vec<String>, Ssp)> {
    let mut procs = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let addr = format!("http://127.0.0.1:{port}");
        let d = dir.join(format!("ssp{i}"));
        std::fs::create_dir_all(&d)?;
        let cfg = d.join("coordinator.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadvertise = \"{addr}\"\ndata_dir = \"{}\"\nbootstrap = {}\nreconcile_secs = 3600\nuid_range = [10000, 999999]\n",
                d.join("data").display(),
                i == 0
            ),
        )?;
        let bin = ssp.bin("ssp-coordinator");
        let token = d.join("token");
        let mut argv = vec![
            bin.to_str().unwrap_or_default(),
            "--config",
            cfg.to_str().unwrap_or_default(),
        ];
        if i > 0 {
            let out = sspctl(
                &ssp,
                &addrs[0],
                &[
                    "token",
                    "create",
                    "--role",
                    "coordinator",
                    "--out",
                    token.to_str().unwrap_or_default(),
                ],
            );
            if !out.status.success() {
                bail!("token: {}", String::from_utf8_lossy(&out.stderr));
            }
            argv.extend(["--token", token.to_str().unwrap_or_default()]);
        }
        procs.push(Proc::start(
            &format!("coordinator {i}"),
            None,
            &argv,
            &d.join("log"),
        )?);
        if i == 0 {
            let admin = d.join("data/tls/admin.bundle");
            ssp_integration::wait_for("admin bundle", Duration::from_secs(20), || {
                admin.exists().then_some(())
            })?;
            ssp.bundle = Some(admin);
        }
        addrs.push(addr);
    }
    std::thread::sleep(Duration::from_millis(500));
    for a in &addrs[1..] {
        let out = sspctl(&ssp, &addrs[0], &["cluster", "join", a]);
        if !out.status.success() {
            bail!("join {a}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok((procs, addrs, ssp))
}

fn start_etcd(dir: &Path) -> Result<(Vec<Proc>, Vec<String>)> {
    if !Path::new("/usr/bin/etcd").exists() {
        bail!(
            "/usr/bin/etcd is missing; run scripts/install-deps.sh --test (installs etcd-server)"
        );
    }
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Vec::new();
    for i in 0..3 {
        let d = dir.join(format!("etcd{i}"));
        let c = format!("http://127.0.0.1:{}", clients[i]);
        let p = format!("http://127.0.0.1:{}", peers[i]);
        procs.push(Proc::start(
            &format!("etcd {i}"),
            None,
            &[
                "/usr/bin/etcd",
                "--name",
                &format!("e{i}"),
                "--data-dir",
                d.to_str().unwrap_or_default(),
                "--listen-client-urls",
                &c,
                "--advertise-client-urls",
                &c,
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "ssp-bench",
                "--log-level",
                "warn",
            ],
            &dir.join(format!("etcd{i}.log")),
        )?);
    }
    Ok((
        procs,
        clients
            .iter()
            .map(|c| format!("http://127.0.0.1:{c}"))
            .collect(),
    ))
}

async fn run_ssp(client: &Client, prefix: &str) -> Result<Run> {
    let client = Arc::new(client.clone());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for k in (w..ops()).step_by(CONCURRENCY) {
                let name = format!("{prefix}u{k}");
                let t = Instant::now();
                let (o, _) = client.add_user(&name, &name, 0).await;
                if o != Outcome::Ok {
                    return Err(anyhow::anyhow!("add {name}: {o:?}"));
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(lat)
        }));
    }
    let mut lat_ms = Vec::new();
    for t in tasks {
        lat_ms.extend(t.await??);
    }
    Ok(Run {
        secs: start.elapsed().as_secs_f64(),
        lat_ms,
    })
}

async fn run_etcd(client: &etcd_client::Client, prefix: &str, size: usize) -> Result<Run> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let mut client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for k in (w..ops()).step_by(CONCURRENCY) {
                let t = Instant::now();
                client
                    .put(format!("/ssp/users/{prefix}u{k}"), vec![b'x'; size], None)
                    .await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat_ms = Vec::new();
    for t in tasks {
        lat_ms.extend(t.await??);
    }
    Ok(Run {
        secs: start.elapsed().as_secs_f64(),
        lat_ms,
    })
}

fn main() -> Result<()> {
    let scratch = Scratch::new("bench-raft")?;
    if std::env::var_os("SSP_BENCH_KEEP").is_some() {
        std::mem::forget(Scratch::new("keep-marker")?);
    }
    // etcd first: its members must bind their ports before the coordinators'
    // connections start taking ports.
    let (_etcd_procs, etcd_addrs) = start_etcd(scratch.path())?;
    let (_ssp_procs, ssp_addrs, ssp_bins) =
        start_ssp(&scratch.path().join("mtls"), Ssp::locate()?)?;
    // The same coordinators built without TLS: what mutual TLS costs.
    let (_plain_procs, plain_addrs, plain_bins) =
        start_ssp(&scratch.path().join("plain"), Ssp::plain()?)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ssp = Client::new(ssp_addrs.clone(), &ssp_bins)?;
        let plain = Client::new(plain_addrs.clone(), &plain_bins)?;
        for c in [&ssp, &plain] {
            for h in ["gpu1", "gpu2", "gpu3"] {
                let o = c.register_host(paper_host(h, 8)).await;
                if o != Outcome::Ok {
                    bail!("registering {h}: {o:?}");
                }
            }
        }
        let payload = AddUserRequest {
            name: format!("r0u{}", ops() - 1),
            ssh_keys: vec![TEST_KEY.into()],
            no_wait: true,
            ..Default::default()
        }
        .encoded_len();
        let etcd = {
            let start = Instant::now();
            loop {
                if let Ok(mut c) = etcd_client::Client::connect(&etcd_addrs, None).await {
                    if c.put("/ssp/warmup", "x", None).await.is_ok() {
                        break c;
                    }
                }
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("etcd did not come up; see {}", scratch.path().display())
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        // Warm both up (connections, first elections settled).
        run_ssp(&ssp, "warm").await.context("ssp warm-up")?;
        run_ssp(&plain, "warm").await.context("plaintext ssp warm-up")?;
        run_etcd(&etcd, "warm", payload).await.context("etcd warm-up")?;
        let (mut s_runs, mut p_runs, mut e_runs) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            // Alternate which ssp goes first, so neither always follows the other.
            let (s, pl) = if r % 2 == 0 {
                let s = run_ssp(&ssp, &format!("r{r}")).await?;
                (s, run_ssp(&plain, &format!("r{r}")).await?)
            } else {
                let pl = run_ssp(&plain, &format!("r{r}")).await?;
                (run_ssp(&ssp, &format!("r{r}")).await?, pl)
            };
            let e = run_etcd(&etcd, &format!("r{r}"), payload).await?;
            println!(
                "round {r}: ssp {:.0} ops/s (p50 {:.1} ms, p99 {:.1} ms), ssp without TLS {:.0} ops/s, etcd {:.0} puts/s (p50 {:.1} ms, p99 {:.1} ms), ratio ssp/etcd {:.2}, mTLS/plaintext {:.2}",
                s.throughput(), s.pct(0.5), s.pct(0.99),
                pl.throughput(),
                e.throughput(), e.pct(0.5), e.pct(0.99),
                s.throughput() / e.throughput(),
                s.throughput() / pl.throughput()
            );
            s_runs.push(s);
            p_runs.push(pl);
            e_runs.push(e);
        }
        let tls_cost = median(
            s_runs
                .iter()
                .zip(&p_runs)
                .map(|(s, p)| s.throughput() / p.throughput())
                .collect(),
        );
        let ratio = median(
            s_runs
                .iter()
                .zip(&e_runs)
                .map(|(s, e)| s.throughput() / e.throughput())
                .collect(),
        );
        let med = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "raft_vs_etcd: {} ops x {ROUNDS} rounds, concurrency {CONCURRENCY}, payload {payload} B, 3 nodes on loopback, fsync on both: \
             ssp user creations {:.0}/s (p50 {:.1} ms, p99 {:.1} ms), etcd puts {:.0}/s (p50 {:.1} ms, p99 {:.1} ms), median throughput ratio ssp/etcd {ratio:.2} (target >= 1.0); \
             ssp without TLS {:.0}/s, median throughput ratio mTLS/plaintext {tls_cost:.2} (target >= 0.90)",
            ops(),
            med(&s_runs, &|r| r.throughput()),
            med(&s_runs, &|r| r.pct(0.5)),
            med(&s_runs, &|r| r.pct(0.99)),
            med(&e_runs, &|r| r.throughput()),
            med(&e_runs, &|r| r.pct(0.5)),
            med(&e_runs, &|r| r.pct(0.99)),
            med(&p_runs, &|r| r.throughput()),
        );
        Ok(())
    })
}
