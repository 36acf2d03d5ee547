//! Benchmark: how long after kill -9 of the leader a write is acknowledged again,
//! three coordinators each in its own network namespace; median over repeats.
//! The same scenario runs with the coordinators built without TLS
//! (`ssp-net/plaintext-bench`), so the figure says what mutual TLS costs.
//!
//! Run: cargo bench -p ssp-integration --bench failover

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ssp_integration::cluster::{paper_host, Coordinators, Outcome};
use ssp_integration::Ssp;

const REPEATS: usize = 7;

/// Milliseconds from kill -9 of the leader to the next acknowledged write, per repeat.
fn failovers(ssp: Ssp, idx: u8, what: &str) -> Result<Vec<f64>> {
    let mut c = Coordinators::start_with(ssp, &format!("bench-failover-{what}"), idx, 3, 1000)?;
    let mut client = c.client()?;
    client.attempt_timeout = Duration::from_millis(300);
    if c.rt.block_on(client.register_host(paper_host("gpu1", 8))) != Outcome::Ok {
        bail!("registering a host failed\n{}", c.logs());
    }
    let mut ms = Vec::new();
    for r in 0..REPEATS {
        let leader = c.wait_leader(Duration::from_secs(20))?;
        let name = format!("f{r}");
        let t = Instant::now();
        c.kill(leader);
        let (o, _) = c.rt.block_on(client.add_user(&name, &name, 0));
        let took = t.elapsed().as_secs_f64() * 1000.0;
        if o != Outcome::Ok {
            bail!("write after failover {r}: {o:?}\n{}", c.logs());
        }
        println!("{what} repeat {r}: write acknowledged {took:.0} ms after kill -9 of the leader");
        ms.push(took);
        c.start_node(leader)?;
        c.wait_identical(&[0, 1, 2], Duration::from_secs(30))?;
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms)
}

fn main() -> Result<()> {
    let tls = failovers(Ssp::locate()?, 124, "mtls")?;
    let plain = failovers(Ssp::plain()?, 125, "plaintext")?;
    let med = |v: &[f64]| v[v.len() / 2];
    println!(
        "failover: median {:.0} ms, max {:.0} ms from kill -9 of the leader to the next acknowledged write, {REPEATS} repeats (target <= 2000 ms); without TLS median {:.0} ms; ratio mTLS/plaintext {:.2} (target <= 1.10)",
        med(&tls),
        tls[tls.len() - 1],
        med(&plain),
        med(&tls) / med(&plain)
    );
    Ok(())
}
