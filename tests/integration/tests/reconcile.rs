//! The leader reconciles from what the agents report: a container ssp did not
//! create is reported and left alone; a container the agent no longer knows about
//! and that was deleted by hand is made again by the leader's pass; a container in
//! a crash loop shows as failing while its agent backs off.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ssp_integration::{kill_init_and_time, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

fn state_of(p: &Platform, name: &str) -> Option<String> {
    let ls = p.ctl_json(&["ls"]).ok()?;
    ls.as_array()?
        .iter()
        .find(|i| i["name"] == name)
        .and_then(|i| i["state"].as_str().map(str::to_string))
}

#[test]
fn the_leader_reconciles_from_reports_and_leaves_others_alone() -> Result<()> {
    let host = Host::start("rc", Kind::Incus, 56)?;
    let mut p = Platform::start("reconcile", &[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "ria")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&["user", "add", "ria", "--ssh-key", &pubkey])?;

    // 1. A container made by hand is reported by `sspctl hosts` and left alone.
    host.cli_run(&[
        "launch",
        "busybox",
        "handmade",
        "-c",
        "security.idmap.isolated=true",
    ])?;
    let uuid = host.uuid("handmade")?;
    wait_for(
        "the hand-made container reported",
        Duration::from_secs(20),
        || {
            let hosts = p.ctl_json(&["hosts"]).ok()?;
            (hosts[0]["unmanaged"] == serde_json::json!(["handmade"])).then_some(())
        },
    )?;
    let table = p.ctl_ok(&["hosts"])?;
    ensure!(
        table.contains("LEFT ALONE") && table.contains("handmade"),
        "sspctl hosts should name the container it leaves alone:\n{table}"
    );
    // Two more passes (every 5 s) and it is still untouched.
    std::thread::sleep(Duration::from_secs(11));
    let (_, status) = host.init_pid("handmade")?;
    let keys = host.cli_run(&["config", "show", "handmade"])?;
    ensure!(
        host.uuid("handmade")? == uuid && status == "Running" && !keys.contains("user.ssp."),
        "the hand-made container was touched: status {status}\n{keys}"
    );

    // 2. The agent forgets ria (its spec file is gone) and ria is deleted by hand
    //    while the agent is down: only the leader knows ria should exist, and its
    //    pass makes it again from the agent's report that it is missing.
    let old = host.uuid("ria")?;
    p.agents[0].signal(libc::SIGKILL);
    let spec = p.scratch.path().join("agent-rc/specs/ria.spec");
    std::fs::remove_file(&spec).with_context(|| format!("removing {}", spec.display()))?;
    host.cli_run(&["delete", "--force", "ria"])?;
    p.agents[0].start_again()?;
    let t = Instant::now();
    wait_for(
        "ria made again by the leader",
        Duration::from_secs(60),
        || {
            let (_, s) = host.init_pid("ria").ok()?;
            (s == "Running").then_some(())
        },
    )?;
    println!(
        "ria made again {:.1}s after the agent came back",
        t.elapsed().as_secs_f64()
    );
    ensure!(host.uuid("ria")? != old, "ria should be a new container");
    ensure!(spec.exists(), "the agent should keep ria's spec again");

    // 3. A crash loop: the sixth start within a minute makes the agent back off,
    //    and ria shows as failing; the next kill is healed only after the backoff.
    wait_for("ria running", Duration::from_secs(30), || {
        (state_of(&p, "ria")? == "Running").then_some(())
    })?;
    for i in 0..6 {
        let d = kill_init_and_time(&host, "ria")?;
        println!("crash {i}: running again after {} ms", d.as_millis());
    }
    let state = wait_for("ria shown as failing", Duration::from_secs(10), || {
        state_of(&p, "ria").filter(|s| s.starts_with("failing"))
    })?;
    println!("sspctl ls: {state}");
    let d = kill_init_and_time(&host, "ria")?;
    println!(
        "crash 6, in backoff: running again after {} ms",
        d.as_millis()
    );
    ensure!(
        d >= Duration::from_millis(1500),
        "in a crash loop the agent should wait out its backoff (2 s), not restart at once ({} ms)",
        d.as_millis()
    );
    Ok(())
}
