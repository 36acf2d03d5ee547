//! Disk quotas: `sspctl ls` shows each container's use against its size, a resize
//! reaches the running container without a restart, bad resizes are refused by
//! name and change nothing, and a new user whose disk the pool cannot hold is
//! refused with the pool's free space.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

const GIB: u64 = 1 << 30;

fn row(p: &Platform, name: &str) -> Result<serde_json::Value> {
    let ls = p.ctl_json(&["ls"])?;
    ls.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .cloned()
        .with_context(|| format!("{name} in sspctl ls: {ls}"))
}

/// The ssp pool's free bytes as `sspctl hosts` reports them.
fn pool_free(p: &Platform) -> Result<(u64, u64)> {
    let hosts = p.ctl_json(&["hosts"])?;
    let pool = hosts[0]["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["ssp"] == true)
        .with_context(|| format!("the ssp pool in sspctl hosts: {hosts}"))?;
    Ok((
        pool["free_bytes"].as_u64().context("free_bytes")?,
        pool["total_bytes"].as_u64().context("total_bytes")?,
    ))
}

#[test]
fn disk_use_is_shown_a_resize_needs_no_restart_and_a_full_pool_refuses() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let host = Host::start("sq", Kind::Incus, 116)?;
    let p = Platform::start("storage", &[AgentSpec::new(&host)])?;
    let key = ssh_keypair(p.scratch.path(), "ann")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&["user", "add", "ann", "--ssh-key", &pubkey, "--disk", "1GiB"])?;
    let ssh = p.ssh_login("ann", &key)?;
    let boot = ssh.run("cat /proc/sys/kernel/random/boot_id; stat -c %Z /proc/1")?;

    // Use against size, in sspctl ls.
    let r = row(&p, "ann")?;
    println!("ls: {r}");
    let used = r["disk_used_bytes"].as_u64().unwrap_or(0);
    ensure!(r["disk_bytes"] == GIB, "{r}");
    ensure!(used > 0 && used < GIB, "ann's disk use is shown: {r}");
    let table = p.ctl_ok(&["ls"])?;
    ensure!(
        table.contains("DISK USED/SIZE") && table.contains("/1GiB"),
        "{table}"
    );
    let hosts = p.ctl_ok(&["hosts"])?;
    ensure!(
        hosts.contains("free of 12GiB"),
        "pool free space in sspctl hosts: {hosts}"
    );

    // The quota holds: 1.2 GiB does not fit in a 1 GiB disk.
    let full =
        ssh.run("dd if=/dev/zero of=$HOME/big bs=1M count=1200 2>&1; sync; rm -f $HOME/big; sync");
    let said = match &full {
        Ok(s) => s.clone(),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        said.contains("quota exceeded") || said.contains("No space left"),
        "writing past the 1GiB quota fails: {said}"
    );

    // Bad resizes name what is wrong and change nothing.
    for (args, says) in [
        (
            &["user", "resize", "ann"][..],
            "give at least one of --cpus, --memory, --disk",
        ),
        (
            &["user", "resize", "ann", "--disk", "100MiB"][..],
            "must be at least",
        ),
        (
            &["user", "resize", "ann", "--disk", "100GiB"][..],
            "free of 12GiB",
        ),
        (
            &["user", "resize", "zed", "--disk", "2GiB"][..],
            "zed does not exist",
        ),
        (
            &["user", "resize", "ann", "--disk", "lots"][..],
            "512MiB, 8GiB",
        ),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(
        row(&p, "ann")?["disk_bytes"] == GIB,
        "refusals changed nothing"
    );

    // Grow to 3 GiB: the running container gets it at once.
    let out = p.ctl_ok(&["user", "resize", "ann", "--disk", "3GiB"])?;
    ensure!(out.contains("ann:") && out.contains("3GiB disk"), "{out}");
    ensure!(row(&p, "ann")?["disk_bytes"] == 3 * GIB);
    let device = host.cli_run(&["config", "device", "get", "ann", "root", "size"])?;
    ensure!(
        device.trim() == "3072MiB" || device.trim() == "3GiB",
        "the daemon's root device: {device}"
    );
    let wrote = ssh.run(
        "dd if=/dev/zero of=$HOME/big bs=1M count=1200 2>&1 && sync && ls -s --block-size=M $HOME/big",
    )?;
    println!("after the resize: {}", wrote.trim());
    ensure!(wrote.contains("1200M"), "1.2 GiB fits now: {wrote}");
    let df = ssh.run("df -B1 --output=size / | tail -1")?;
    println!("df inside: {} bytes", df.trim());
    ensure!(
        ssh.run("cat /proc/sys/kernel/random/boot_id; stat -c %Z /proc/1")? == boot,
        "no restart"
    );
    let used = row(&p, "ann")?["disk_used_bytes"].as_u64().unwrap_or(0);
    ensure!(used > GIB, "the use shown follows: {used}");
    // Not below what it holds now.
    let err = p.ctl_err(&["user", "resize", "ann", "--disk", "1GiB"])?;
    println!("sspctl user resize ann --disk 1GiB: {}", err.trim());
    ensure!(err.contains("more than the 1GiB asked"), "{err}");
    ensure!(
        row(&p, "ann")?["disk_bytes"] == 3 * GIB,
        "the refusal changed nothing"
    );

    // A new user whose disk is more than the pool has free is refused with it.
    // The agent reports the pool's use with its heartbeats.
    let (free, _) = wait_for(
        "the pool's use in sspctl hosts",
        Duration::from_secs(30),
        || pool_free(&p).ok().filter(|(f, t)| t - f > GIB),
    )?;
    let ask = format!("{}", free + (1 << 20));
    let err = p.ctl_err(&["user", "add", "bob", "--ssh-key", &pubkey, "--disk", &ask])?;
    println!("sspctl user add bob --disk {ask}: {}", err.trim());
    ensure!(
        err.contains("storage pool default has") && err.contains("free of 12GiB"),
        "{err}"
    );
    ensure!(
        p.ctl_json(&["user", "list"])?
            .as_array()
            .is_some_and(|u| u.len() == 1),
        "bob was not recorded"
    );
    Ok(())
}
