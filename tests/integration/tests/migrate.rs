//! `sspctl migrate`: a user's container moves between two real daemons (each in
//! its own network namespace) while a loop inside it writes a file every 100 ms.
//! Every write acknowledged before the stop is on the target, the snapshot too,
//! the user logs in through the new ssh-config with the host key they pinned
//! before, the source no longer has it and the GPUs moved with it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

#[test]
fn a_container_moves_with_its_files_snapshot_keys_and_gpus() -> Result<()> {
    let mut h1 = Host::start("mg1", Kind::Incus, 93)?;
    let mut h2 = Host::start("mg2", Kind::Incus, 94)?;
    let inv1 = h1.fake_gpus(&[60, 61])?;
    let inv2 = h2.fake_gpus(&[62, 63])?;
    let p = Platform::start(
        "migrate",
        &[
            AgentSpec {
                gpu_inventory: Some(inv1),
                ..AgentSpec::new(&h1)
            },
            AgentSpec {
                gpu_inventory: Some(inv2),
                ..AgentSpec::new(&h2)
            },
        ],
    )?;
    let key = ssh_keypair(p.scratch.path(), "gdw")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&[
        "user",
        "add",
        "gdw",
        "--ssh-key",
        &pubkey,
        "--gpus",
        "1",
        "--host",
        "mg1",
    ])?;
    let ssh = p.ssh_login("gdw", &key)?;
    let known_hosts = p.scratch.path().join("known_hosts-gdw");
    let pinned = std::fs::read_to_string(&known_hosts)?;
    ensure!(
        pinned.contains("ssp-gdw"),
        "the host key is pinned under the container's name: {pinned}"
    );
    let uuid = h1.uuid("gdw")?;
    // Files in the home, then a snapshot, then a file after it.
    let sum = ssh.run(
        "dd if=/dev/urandom of=$HOME/data bs=1M count=40 2>/dev/null && sha256sum $HOME/data",
    )?;
    // A password the user set (the remote desktop logs in with one) stays.
    let hash =
        ssh.run("echo 'gdw:Desk-top-9' | sudo chpasswd && sudo getent shadow gdw | cut -d: -f2")?;
    ensure!(hash.trim().starts_with('$'), "a password hash: {hash}");
    h1.cli_run(&["snapshot", "create", "gdw", "before-move"])?;
    ssh.run("echo after > $HOME/after-snapshot")?;
    // A writer: each file is written, then its number acknowledged.
    ssh.run(
        "mkdir -p $HOME/w; setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > $HOME/w/$i && echo $i >> $HOME/acked; sleep 0.1; done' </dev/null >/dev/null 2>&1 &",
    )?;
    wait_for(
        "the writer's first acknowledgements",
        Duration::from_secs(10),
        || {
            let n = ssh.run("wc -l < $HOME/acked").ok()?;
            (n.trim().parse::<u32>().ok()? >= 5).then_some(())
        },
    )?;
    let gpus_before = held_gpus(&p, "gdw")?;
    ensure!(
        gpus_before.len() == 1 && gpus_before[0].0 == "mg1",
        "{gpus_before:?}"
    );

    // Bad requests say what is wrong and change nothing.
    for (args, says) in [
        (&["migrate", "gdw"][..], "--auto"),
        (&["migrate", "gdw", "mg1"][..], "already on mg1"),
        (&["migrate", "gdw", "mg9"][..], "not registered"),
        (&["migrate", "zed", "mg2"][..], "does not exist"),
        (&["migrate", "gdw", "mg2", "--auto"][..], "not both"),
        (&["migrate", "--abort", "77"][..], "no migration 77"),
        // No CRIU here: the daemon's own words say why.
        (
            &["migrate", "gdw", "mg2", "--live"][..],
            "live migration is not available on mg1",
        ),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(
        p.ctl_json(&["migrations"])?
            .as_array()
            .is_some_and(|l| l.is_empty()),
        "no move was recorded"
    );
    ensure!(h1.instance_names()?.contains(&"gdw".to_string()));

    let out = p.ctl_json(&["migrate", "gdw", "mg2"])?;
    let m = &out[0];
    println!("migration record: {m}");
    ensure!(m["phase"] == "done", "{m}");
    ensure!(
        m["from"]["host"] == "mg1" && m["to"]["host"] == "mg2",
        "{m}"
    );
    let downtime = m["downtime_ms"].as_u64().context("downtime recorded")?;
    println!("downtime {downtime} ms");

    // The source no longer has it; the target has it, running, the same container.
    ensure!(!h1.instance_names()?.contains(&"gdw".to_string()));
    ensure!(h2.instance_names()?.contains(&"gdw".to_string()));
    ensure!(h2.uuid("gdw")? == uuid, "volatile.uuid kept");
    let snaps = h2.cli_run(&["query", "/1.0/instances/gdw/snapshots"])?;
    ensure!(
        snaps.contains("before-move"),
        "snapshot on the target: {snaps}"
    );
    ensure!(
        !snaps.contains("ssp-move-"),
        "the move's own snapshot is removed afterwards: {snaps}"
    );
    // GPUs: free on mg1, the same number held on mg2.
    let gpus_after = held_gpus(&p, "gdw")?;
    ensure!(
        gpus_after.len() == 1 && gpus_after[0].0 == "mg2",
        "{gpus_after:?}"
    );
    let ls = p.ctl_json(&["ls"])?;
    ensure!(
        ls[0]["host"] == "mg2" && ls[0]["state"] == "Running",
        "{ls}"
    );

    // The user logs in through the new ssh-config, with the key pinned before:
    // strict checking, no new known_hosts entry.
    let ssh2 = p.ssh_login("gdw", &key)?;
    let strict = ssp_integration::run(
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(&ssh2.config)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "ssp-gdw",
                "hostname; sha256sum $HOME/data; cat $HOME/after-snapshot",
            ]),
    )?;
    ensure!(
        strict.contains(sum.split_whitespace().next().unwrap_or("?")),
        "{strict}"
    );
    ensure!(strict.contains("after"), "{strict}");
    ensure!(
        std::fs::read_to_string(&known_hosts)? == pinned,
        "known_hosts unchanged: the container kept its host keys"
    );
    let config = std::fs::read_to_string(&ssh2.config)?;
    ensure!(
        config.contains(&h2.addr),
        "ssh-config points at mg2: {config}"
    );

    let after = ssh2.run("sudo getent shadow gdw | cut -d: -f2")?;
    ensure!(
        after.trim() == hash.trim(),
        "the password gdw set is kept through the move (it booted on mg2): {} before, {} after",
        hash.trim(),
        after.trim()
    );
    // Every acknowledged write is there.
    let missing = ssh2.run(
        "n=0; for i in $(cat $HOME/acked); do [ -f $HOME/w/$i ] || echo missing $i; n=$((n+1)); done; echo acked $n",
    )?;
    println!("{}", missing.trim());
    ensure!(!missing.contains("missing"), "{missing}");
    let acked: u32 = missing
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ensure!(acked >= 5, "{missing}");
    // The audit log and the list of moves say what happened.
    let list = p.ctl_json(&["migrations"])?;
    ensure!(list.as_array().is_some_and(|l| l.len() == 1), "{list}");
    let audit = p.ctl_ok(&["audit"])?;
    ensure!(audit.contains("migrate to mg2"), "{audit}");
    drop(h2);
    Ok(())
}

/// (host, pci) of every GPU `holder` holds, from `sspctl gpus`.
fn held_gpus(p: &Platform, holder: &str) -> Result<Vec<(String, String)>> {
    let gpus = p.ctl_json(&["gpus"])?;
    Ok(gpus
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["holder"] == holder)
        .map(|g| {
            (
                g["host"].as_str().unwrap_or_default().to_string(),
                g["pci_address"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}
