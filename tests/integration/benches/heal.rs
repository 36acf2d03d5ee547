//! Benchmark: kill -9 of a container's init until the daemon reports it running
//! again (the agent reacts to the daemon's lifecycle event), median over repeats:
//! once with the coordinator running, once (on another container) with every
//! coordinator stopped so only the agent acts. Next to it, the same daemon's own
//! floor for that cycle on an unmanaged copy with the same devices: kill -9 of its
//! init, then `incus start` tried again and again until the daemon, done handling
//! the stop, accepts it and reports it running.
//!
//! Run: cargo bench -p ssp-integration --bench heal

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ssp_integration::{kill_init_and_time, ssh_keypair, AgentSpec, Host, Kind, Platform};

const REPEATS: usize = 5;

fn main() -> Result<()> {
    let host = Host::start("hb", Kind::Incus, 54)?;
    let mut p = Platform::start("bench-heal", &[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "hb")?;
    // Two containers, so that neither reaches the crash-loop threshold (more than
    // five starts a minute).
    for user in ["hb", "hc"] {
        p.ctl_ok(&[
            "user",
            "add",
            user,
            "--ssh-key",
            &format!("{}.pub", key.display()),
        ])?;
    }
    let with_coordinator = kill_repeats(&host, "hb", "coordinator running")?;
    p.coordinator.signal(libc::SIGKILL);
    // An unmanaged copy (the agent has no spec for it) with the same devices; its
    // SSH forward listens on another port and goes to another bridge address.
    host.cli_run(&["copy", "hb", "raw"])?;
    let raw_addr = "10.232.54.100";
    host.cli_run(&[
        "config",
        "device",
        "set",
        "raw",
        "eth0",
        &format!("ipv4.address={raw_addr}"),
    ])?;
    host.cli_run(&[
        "config",
        "device",
        "set",
        "raw",
        "ssp-ssh",
        &format!("listen=tcp:{}:22099", host.addr),
        &format!("connect=tcp:{raw_addr}:22"),
    ])?;
    host.cli_run(&["start", "raw"])?;
    let mut floor = Vec::new();
    for _ in 0..REPEATS {
        std::thread::sleep(Duration::from_secs(1));
        let (pid, _) = host.init_pid("raw")?;
        let t = Instant::now();
        // SAFETY: kill(2) with a pid the daemon reported.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        // The best any tool can do: ask for a start again and again until the
        // daemon, done with the stop, accepts it.
        let mut refused = 0;
        while host.cli_run(&["start", "raw"]).is_err() {
            refused += 1;
            if t.elapsed() > Duration::from_secs(30) {
                bail!("raw did not start again after kill -9 of its init");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        loop {
            match host.init_pid("raw") {
                Ok((p, s)) if s == "Running" && p > 1 && p != pid => break,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        println!(
            "floor: raw running again {} ms after kill -9 ({refused} starts refused while the daemon handled the stop)",
            t.elapsed().as_millis()
        );
        floor.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let without = kill_repeats(&host, "hc", "no coordinator running")?;
    let (up, down, f) = (median(with_coordinator), median(without), median(floor));
    println!(
        "heal: median {up:.0} ms from kill -9 of a container's init to running again with the coordinator running, {down:.0} ms with every coordinator stopped, {REPEATS} repeats each (target <= 1000 ms); the daemon's own floor (raw start retried from the kill) {f:.0} ms; ratios {:.2} and {:.2}",
        up / f,
        down / f
    );
    Ok(())
}

/// Kills `name`'s init `REPEATS` times, returning how long each restart took in ms.
fn kill_repeats(host: &Host, name: &str, what: &str) -> Result<Vec<f64>> {
    let mut ms = Vec::new();
    for r in 0..REPEATS {
        // Five restarts a minute stay under the crash-loop threshold.
        std::thread::sleep(Duration::from_secs(2));
        let d = kill_init_and_time(host, name)?;
        println!(
            "{name} ({what}) repeat {r}: running again {} ms after kill -9 of init",
            d.as_millis()
        );
        ms.push(d.as_secs_f64() * 1000.0);
    }
    Ok(ms)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
