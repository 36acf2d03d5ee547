//! Benchmark: the agent's full resync of 500 containers that are all in sync,
//! against `incus list --format json` on the same daemon; medians over repeats.
//! The containers are made through the agent's own ensure (busybox, stopped, SSH
//! forwarded by NAT to a static bridge address each), so the resync compares
//! exactly what the agent would enforce.
//!
//! Run: cargo bench -p ssp-integration --bench resync
//! (SSP_RESYNC_N sets the number of containers.)

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use ssp_agent::heal::Specs;
use ssp_agent::host::HostState;
use ssp_agent::inventory::GpuSource;
use ssp_integration::{Host, Kind, Scratch};
use ssp_proto::InstanceSpec;

const REPEATS: usize = 7;

fn main() -> Result<()> {
    let n: usize = std::env::var("SSP_RESYNC_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let host = Host::start("rs", Kind::Incus, 55)?;
    // A /22 bridge: room for more than 500 static addresses.
    host.cli_run(&["network", "set", "sspbr0", "ipv4.address=10.233.0.1/22"])?;
    let scratch = Scratch::new("bench-resync")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = ssp_lxd::Client::connect(&host.socket).await?;
        let specs = Specs::open(&scratch.path().join("specs"))?;
        let state = HostState::new(
            client,
            GpuSource::nvml(),
            "default".into(),
            "0.0.0.0".into(),
            host.addr.clone(),
            ssp_agent::config::ForwardMode::Nat,
            specs,
            ssp_agent::nvidia::Nvidia::off(),
            ssp_agent::members::Members::open(scratch.path())?,
            None,
            host.dir.join("logs"),
        );
        let ctx = state.facts().await?.context;
        if !matches!(ctx.ssh, ssp_agent::render::SshForward::Nat { .. }) {
            bail!("expected SSH forwarded by NAT on the bench host");
        }
        let t = Instant::now();
        let made = futures::stream::iter(0..n)
            .map(|i| {
                let (state, ctx) = (Arc::clone(&state), ctx.clone());
                async move {
                    let spec = InstanceSpec {
                        name: format!("r{i:04}"),
                        owner: "rs".into(),
                        owner_uid: 2000,
                        image: "busybox".into(),
                        cpus: 1,
                        memory_bytes: 256 << 20,
                        disk_bytes: 1 << 30,
                        processes: 100,
                        ssh_port: 20000 + i as u32,
                        running: false,
                        ..Default::default()
                    };
                    state.specs.put(&spec)?;
                    ssp_agent::ensure::ensure(
                        &state.client,
                        &ctx,
                        &state.addrs,
                        &spec,
                        &ssp_agent::ensure::Unlimited,
                    )
                        .await
                        .with_context(|| format!("creating {}", spec.name))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        made.into_iter().collect::<Result<Vec<_>>>()?;
        println!(
            "made {n} containers through the agent's ensure in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let (mut list, mut resync) = (Vec::new(), Vec::new());
        for r in 0..=REPEATS {
            let t = Instant::now();
            let out = host.cli_run(&["list", "--format", "json"])?;
            let l = t.elapsed().as_secs_f64() * 1000.0;
            let listed = serde_json::from_str::<serde_json::Value>(&out)?
                .as_array()
                .map_or(0, |a| a.len());
            let t = Instant::now();
            let (checked, ensured) = state.resync("bench").await;
            let s = t.elapsed().as_secs_f64() * 1000.0;
            if listed != n || checked != n || ensured != 0 {
                bail!("expected {n} listed and checked and none ensured; got {listed} listed, {checked} checked, {ensured} ensured");
            }
            println!("round {r}: incus list --format json {l:.0} ms, agent resync {s:.0} ms");
            if r > 0 {
                list.push(l);
                resync.push(s);
            }
        }
        list.sort_by(|a, b| a.total_cmp(b));
        resync.sort_by(|a, b| a.total_cmp(b));
        let (l, s) = (list[list.len() / 2], resync[resync.len() / 2]);
        println!(
            "resync: {n} containers, agent full resync median {s:.0} ms, incus list --format json median {l:.0} ms, ratio {:.2} (target <= 1.5), {REPEATS} repeats",
            s / l
        );
        Ok(())
    })
}
