//! `sspctl snapshot`: a user snapshots their own container, deletes a file and
//! restores it: the file is back, and the container has the same GPU, SSH port,
//! address and SSH host keys. An admin's schedule is then carried out by the agent
//! with every coordinator stopped, and scheduled snapshots beyond the limit go.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// sspctl as the holder of `bundle`.
fn ctl_as(p: &Platform, bundle: &Path, args: &[&str]) -> Output {
    let mut ssp = p.ssp.clone();
    ssp.bundle = Some(bundle.to_path_buf());
    ssp_integration::sspctl(&ssp, &p.addr, args)
}

fn ok_as(p: &Platform, bundle: &Path, args: &[&str]) -> Result<String> {
    let out = ctl_as(p, bundle, args);
    ensure!(
        out.status.success(),
        "sspctl {} as {}: {}",
        args.join(" "),
        bundle.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The container's snapshots as the daemon lists them.
fn daemon_snapshots(host: &Host, name: &str) -> Result<BTreeSet<String>> {
    let v: serde_json::Value = serde_json::from_str(
        &host.cli_run(&["query", &format!("/1.0/instances/{name}/snapshots")])?,
    )?;
    Ok(v.as_array()
        .context("a list of snapshots")?
        .iter()
        .filter_map(|s| s.as_str()?.rsplit('/').next().map(String::from))
        .collect())
}

/// What ssp gives the container and must survive a restore.
fn what_it_holds(p: &Platform, host: &Host, name: &str) -> Result<String> {
    let ls = p.ctl_json(&["ls"])?;
    let row = ls
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .context("the container in sspctl ls")?;
    let gpus = p.ctl_json(&["gpus"])?;
    let held: Vec<_> = gpus
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["holder"] == name)
        .map(|g| g["pci_address"].to_string())
        .collect();
    Ok(format!(
        "ssh {} {}; gpus {held:?}; address {}; uuid {}; devices:\n{}",
        row["ssh_host"],
        row["ssh_port"],
        host.cli_run(&["list", name, "-f", "csv", "-c", "4"])?
            .trim(),
        host.uuid(name)?,
        host.cli_run(&["config", "device", "show", name])?
    ))
}

#[test]
fn snapshot_restore_keeps_what_ssp_gave_and_the_schedule_runs_without_coordinators() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let mut host = Host::start("sn", Kind::Incus, 115)?;
    let inv = host.fake_gpus(&[78, 79])?;
    let mut p = Platform::start(
        "snapshots",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ..AgentSpec::new(&host)
        }],
    )?;
    let dir = p.scratch.path().to_path_buf();
    let key = ssh_keypair(&dir, "gdw")?;
    let pubkey = format!("{}.pub", key.display());
    let gdw = dir.join("gdw.bundle");
    p.ctl_ok(&[
        "user",
        "add",
        "gdw",
        "--ssh-key",
        &pubkey,
        "--gpus",
        "1",
        "--credentials-out",
        gdw.to_str().unwrap_or_default(),
    ])?;
    p.ctl_ok(&[
        "user",
        "add",
        "bob",
        "--ssh-key",
        &pubkey,
        "--image",
        "busybox",
        "--wait",
        "running",
    ])?;
    let ssh = p.ssh_login("gdw", &key)?;
    let known_hosts = std::fs::read_to_string(dir.join("known_hosts-gdw"))?;
    let before = what_it_holds(&p, &host, "gdw")?;
    println!("before: {before}");
    ensure!(before.contains("gpus [\""), "gdw holds a GPU: {before}");
    ssh.run("echo precious > $HOME/keep.txt && sync")?;

    // gdw snapshots their own container.
    let out = ok_as(&p, &gdw, &["snapshot", "create", "gdw", "before-rm"])?;
    ensure!(out.contains("took snapshot before-rm of gdw"), "{out}");
    ensure!(daemon_snapshots(&host, "gdw")?.contains("before-rm"));

    // Bad requests say what is wrong and change nothing.
    let snaps = daemon_snapshots(&host, "gdw")?;
    for (args, says) in [
        (
            &["snapshot", "create", "gdw", "auto-x"][..],
            "belong to the snapshot schedule",
        ),
        (&["snapshot", "create", "gdw", "a/b"][..], "snapshot name"),
        (
            &["snapshot", "create", "gdw", "ssp-move-1"][..],
            "belong to moves",
        ),
        (
            &["snapshot", "restore", "gdw", "nosuch"][..],
            "no snapshot nosuch",
        ),
        (
            &["snapshot", "delete", "gdw", "nosuch"][..],
            "no snapshot nosuch",
        ),
        (&["snapshot", "create", "zed"][..], "zed has no container"),
        (
            &["snapshot", "schedule", "gdw", "--every", "2s"][..],
            "at least 5s",
        ),
        (
            &[
                "snapshot", "schedule", "gdw", "--every", "1h", "--keep", "0",
            ][..],
            "1 to 1000",
        ),
        (
            &["snapshot", "schedule", "gdw", "--every", "soon"][..],
            "hourly, daily, weekly",
        ),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    // A user acts on their own container only, and sets no schedule.
    for args in [
        &["snapshot", "create", "bob", "mine"][..],
        &["snapshot", "list", "bob"][..],
        &["snapshot", "schedule", "gdw", "--every", "1h"][..],
    ] {
        let out = ctl_as(&p, &gdw, args);
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("user:gdw may not"),
            "gdw: sspctl {}: {err}",
            args.join(" ")
        );
    }
    ensure!(
        daemon_snapshots(&host, "gdw")? == snaps,
        "refusals changed nothing"
    );
    ensure!(daemon_snapshots(&host, "bob")?.is_empty());

    // Delete the file, restore, and it is back in the same container.
    ssh.run("rm $HOME/keep.txt")?;
    let out = ok_as(&p, &gdw, &["snapshot", "restore", "gdw", "before-rm"])?;
    ensure!(out.contains("restored gdw to snapshot before-rm"), "{out}");
    // The same ssh-config and the known_hosts entry pinned before (strict
    // checking): the host keys are the container's own, unchanged.
    let ssh = p.ssh_login("gdw", &key)?;
    ensure!(
        std::fs::read_to_string(dir.join("known_hosts-gdw"))? == known_hosts,
        "the host key pinned before still matches"
    );
    let back = ssh.run("cat $HOME/keep.txt")?;
    ensure!(back.trim() == "precious", "the file is back: {back:?}");
    let after = what_it_holds(&p, &host, "gdw")?;
    ensure!(
        after == before,
        "the restore kept what ssp gave:\nbefore: {before}\nafter:  {after}"
    );
    let list = p.ctl_json(&["snapshot", "list", "gdw"])?;
    ensure!(
        list["snapshots"][0]["name"] == "before-rm" && list["snapshots"][0]["scheduled"] == false,
        "{list}"
    );
    let audit = p.ctl_ok(&["audit"])?;
    ensure!(
        audit.contains("snapshot-restore before-rm") && audit.contains("snapshot-create before-rm"),
        "the audit log names who snapshotted and restored: {audit}"
    );

    // The admin's schedule: every 5 s, 2 kept. The agent takes them with every
    // coordinator stopped and removes the oldest beyond 2; the one by hand stays.
    let out = p.ctl_ok(&[
        "snapshot", "schedule", "gdw", "--every", "5s", "--keep", "2",
    ])?;
    ensure!(
        out.contains("a snapshot every 5s, the newest 2 kept"),
        "{out}"
    );
    p.coordinator.signal(libc::SIGKILL);
    let mut seen = BTreeSet::new();
    let mut max_kept = 0;
    let now = wait_for(
        "three scheduled snapshots taken, the oldest removed",
        Duration::from_secs(45),
        || {
            let now = daemon_snapshots(&host, "gdw").ok()?;
            let auto: BTreeSet<_> = now
                .iter()
                .filter(|s| s.starts_with("auto-"))
                .cloned()
                .collect();
            max_kept = max_kept.max(auto.len());
            seen.extend(auto.iter().cloned());
            let first = seen.iter().next()?.clone();
            (seen.len() >= 3 && !now.contains(&first)).then_some(now)
        },
    )?;
    println!("scheduled snapshots seen {seen:?}; now {now:?}");
    // A new one is taken before the oldest goes (a failed snapshot never costs
    // one kept), so 3 may exist for a moment.
    ensure!(
        max_kept <= 3,
        "at most one beyond the 2 kept, briefly (saw {max_kept})"
    );
    let auto = now.iter().filter(|s| s.starts_with("auto-")).count();
    ensure!(auto == 2, "2 scheduled snapshots kept: {now:?}");
    ensure!(
        now.contains("before-rm"),
        "the snapshot by hand is not pruned: {now:?}"
    );
    ensure!(
        host.cli_run(&["list", "gdw", "-f", "csv", "-c", "s"])?
            .trim()
            == "RUNNING",
        "gdw runs throughout"
    );
    Ok(())
}
