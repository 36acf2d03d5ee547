//! The agent heals its host on its own: a container whose init is killed runs
//! again (also with every coordinator stopped), devices and limits changed by hand
//! are put back within one resync, and after kill -9 of the agent and a daemon
//! restart everything converges without recreating anything.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ssp_integration::{kill_init_and_time, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// `resync_secs` in the test platform's agent config.
const RESYNC: Duration = Duration::from_secs(5);

#[test]
fn the_agent_heals_its_host_on_its_own() -> Result<()> {
    let mut host = Host::start("sh", Kind::Incus, 53)?;
    let inv = host.fake_gpus(&[0, 1])?;
    let mut p = Platform::start(
        "self-heal",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ..AgentSpec::new(&host)
        }],
    )?;
    let key = ssh_keypair(p.scratch.path(), "sam")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&["user", "add", "sam", "--ssh-key", &pubkey, "--gpus", "1"])?;
    let uuid = host.uuid("sam")?;

    // 1. init killed: running again, by the agent's reaction to the daemon's event.
    let with = kill_init_and_time(&host, "sam")?;
    println!("init killed: running again after {} ms", with.as_millis());
    // 2. The same with every coordinator stopped.
    p.coordinator.signal(libc::SIGKILL);
    let without = kill_init_and_time(&host, "sam")?;
    println!(
        "init killed with every coordinator stopped: running again after {} ms",
        without.as_millis()
    );

    // 3. Hand changes are put back within one resync (coordinator still stopped).
    let memory = host.cli_run(&["config", "get", "sam", "limits.memory"])?;
    // The agent may put something back between the two edits; then the daemon
    // refuses the second one as based on an old ETag, and it is simply redone.
    let edit = |args: &[&str]| -> Result<()> {
        for _ in 0..10 {
            match host.cli_run(args) {
                Err(e) if e.to_string().contains("ETag doesn't match") => continue,
                other => return other.map(|_| ()),
            }
        }
        anyhow::bail!("incus {} kept racing with the agent", args.join(" "))
    };
    edit(&["config", "device", "remove", "sam", "ssp-gpu0"])?;
    edit(&["config", "set", "sam", "limits.memory", "300MiB"])?;
    let t = Instant::now();
    wait_for(
        "the GPU device and memory limit put back",
        RESYNC * 3,
        || {
            let devices = host.cli_run(&["config", "device", "list", "sam"]).ok()?;
            let mem = host
                .cli_run(&["config", "get", "sam", "limits.memory"])
                .ok()?;
            (devices.lines().any(|l| l.trim() == "ssp-gpu0") && mem == memory).then_some(())
        },
    )?;
    println!(
        "hand changes put back after {:.1}s (resync every {}s)",
        t.elapsed().as_secs_f64(),
        RESYNC.as_secs()
    );
    ensure!(
        t.elapsed() <= RESYNC + Duration::from_secs(3),
        "not within one resync"
    );

    // 4. kill -9 the agent, restart the daemon, start the agent: converged, same container.
    p.agents[0].signal(libc::SIGKILL);
    host.restart_daemon()?;
    host.wait_ready()?;
    p.agents[0].start_again()?;
    wait_for(
        "sam running after the restarts",
        Duration::from_secs(60),
        || {
            let (_, s) = host.init_pid("sam").ok()?;
            (s == "Running").then_some(())
        },
    )?;
    ensure!(host.uuid("sam")? == uuid, "sam's container was recreated");
    let names = host.instance_names().context("instances")?;
    ensure!(
        names == vec!["sam".to_string()],
        "instances after restarts: {names:?}"
    );
    Ok(())
}
