//! Benchmark: a whole lab on one host. After a first user alone, 59 more Debian
//! users are added 4 at a time; each one's time runs from `sspctl user add` until
//! a login with the real ssh client works as them. Prints the first user's time
//! next to the median and the slowest of all 60, and how long `sspctl ls` takes
//! with them. Every user must log in: one who cannot fails the run.
//!
//! Run: cargo bench -p ssp-integration --bench lab

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use ssp_integration::{median, ssh_keypair, AgentSpec, Host, Kind, Platform};

const USERS: usize = 60;
const AT_ONCE: usize = 4;

/// `sspctl user add NAME` until NAME logs in over SSH, in seconds.
fn add_and_login(p: &Platform, name: &str, key: &Path) -> Result<f64> {
    let public = format!("{}.pub", key.display());
    let t = Instant::now();
    p.ctl_ok(&["user", "add", name, "--ssh-key", &public])?;
    p.ssh_login(name, key)
        .with_context(|| format!("{name} cannot log in"))?;
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let host = Host::start("lab", Kind::Incus, 142)?;
    let p = Platform::start("lab-bench", &[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "lab")?;

    // Warm-up: the first container from an image unpacks it into the pool; every
    // later one clones it.
    add_and_login(&p, "warm", &key)?;
    p.ctl_ok(&["user", "remove", "warm"])?;

    let first = add_and_login(&p, "u01", &key)?;
    println!("lab: first user u01: {first:.2}s from user add to login");
    let next = Mutex::new(2usize);
    let times = Mutex::new(vec![first]);
    let wall = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let n = {
                            let mut n = next.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                            if *n > USERS {
                                return Ok(());
                            }
                            *n += 1;
                            *n - 1
                        };
                        let name = format!("u{n:02}");
                        let t = add_and_login(&p, &name, &key)?;
                        println!("lab: {name}: {t:.2}s");
                        times
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .push(t);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        Ok(())
    })?;
    let wall = wall.elapsed().as_secs_f64();
    let times = times
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let slowest = times.iter().copied().fold(0.0, f64::max);
    let med = median(times);

    // Every container is there and running, with nothing reported wrong.
    let ls = p.ctl_json(&["ls"])?;
    let rows = ls.as_array().context("ls is a list")?;
    anyhow::ensure!(
        rows.len() == USERS,
        "{} containers listed, not {USERS}",
        rows.len()
    );
    for r in rows {
        anyhow::ensure!(
            r["state"] == "Running" && r["problem"] == "",
            "{}: {} {}",
            r["name"],
            r["state"],
            r["problem"]
        );
    }
    let ls_times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            p.ctl_ok(&["ls"])
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<Result<_>>()?;
    println!(
        "lab: {USERS} Debian users on one host, {AT_ONCE} at a time, each logged in with ssh: user add→login median {med:.2}s ({:.2}× the first user's {first:.2}s), slowest {slowest:.2}s ({:.2}×); {} users in {wall:.1}s; sspctl ls with {USERS} containers: median {:.0} ms",
        med / first,
        slowest / first,
        USERS - 1,
        median(ls_times)
    );
    Ok(())
}
