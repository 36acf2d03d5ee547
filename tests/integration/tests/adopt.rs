//! `sspctl adopt`: a container made by hand with `incus launch` (a person's account
//! with their key and files inside, a GPU device and an SSH proxy of its own) is
//! taken under ssp's management: the same container (volatile.uuid), its GPU held
//! in ssp's records, its port kept, the person logs in as before, and from then on
//! a hand change to it is put back. A container whose GPU someone else holds is
//! refused with the holder's name; containers not adopted are left alone.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

#[test]
fn a_hand_made_container_is_adopted_in_place_and_healed_from_then_on() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let mut host = Host::start("ad", Kind::Incus, 120)?;
    let inv = host.fake_gpus(&[88, 89])?;
    let p = Platform::start(
        "adopt",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ..AgentSpec::new(&host)
        }],
    )?;
    let dir = p.scratch.path().to_path_buf();
    let key = ssh_keypair(&dir, "gdw")?;
    let pubkey = std::fs::read_to_string(format!("{}.pub", key.display()))?;

    // alice, through ssp, holds one of the two GPUs.
    p.ctl_ok(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        &format!("{}.pub", key.display()),
        "--gpus",
        "1",
        "--image",
        "busybox",
        "--wait",
        "running",
        "--no-credentials",
    ])?;
    let gpus = p.ctl_json(&["gpus"])?;
    let minor_of = |holder: Option<&str>| -> Result<u64> {
        gpus.as_array()
            .into_iter()
            .flatten()
            .find(|g| g["holder"].as_str() == holder)
            .and_then(|g| g["minor"].as_u64())
            .with_context(|| format!("a GPU held by {holder:?} in {gpus}"))
    };
    let (alices, free) = (minor_of(Some("alice"))?, minor_of(None)?);

    // Made by hand, as a lab does without ssp: gdw's container with their account
    // (uid 1000), key and files, the free GPU's device node and an SSH proxy.
    host.cli_run(&["launch", "debian-ssh", "gdw"])?;
    wait_for(
        "gdw's container to take commands",
        Duration::from_secs(60),
        || host.cli_run(&["exec", "gdw", "--", "true"]).ok(),
    )?;
    host.cli_run(&[
        "exec",
        "gdw",
        "--",
        "sh",
        "-c",
        &format!(
            "set -e; useradd -m -u 1000 -s /bin/bash gdw; mkdir -p /home/gdw/.ssh; \
             echo '{}' > /home/gdw/.ssh/authorized_keys; echo precious > /home/gdw/notes.txt; \
             chmod 700 /home/gdw/.ssh; chmod 600 /home/gdw/.ssh/authorized_keys; chown -R gdw:gdw /home/gdw",
            pubkey.trim()
        ),
    ])?;
    host.cli_run(&[
        "config",
        "device",
        "add",
        "gdw",
        "mygpu",
        "unix-char",
        &format!("source=/dev/nvidia{free}"),
        "path=/dev/nvidia0",
        "mode=0666",
    ])?;
    host.cli_run(&[
        "config",
        "device",
        "add",
        "gdw",
        "myssh",
        "proxy",
        "listen=tcp:0.0.0.0:22050",
        "connect=tcp:127.0.0.1:22",
    ])?;
    // Another one passes alice's GPU; a third is none of ssp's business.
    host.cli_run(&["launch", "busybox", "dup"])?;
    host.cli_run(&[
        "config",
        "device",
        "add",
        "dup",
        "g",
        "unix-char",
        &format!("source=/dev/nvidia{alices}"),
    ])?;
    host.cli_run(&["launch", "busybox", "other"])?;
    let uuid = host.uuid("gdw")?;

    // Conflicts are named, and nothing changes.
    let users = p.ctl_ok(&["-o", "json", "user", "list"])?;
    for (args, says) in [
        (
            &[
                "adopt",
                "ad",
                "dup",
                "--ssh-key",
                &format!("{}.pub", key.display()),
            ][..],
            "is held by alice",
        ),
        (
            &["adopt", "ad", "nosuch"][..],
            "no container nosuch on host ad",
        ),
        (
            &["adopt", "ad", "gdw", "--user", "bob"][..],
            "rename it first",
        ),
        (&["adopt", "ad", "alice"][..], "ssp's already"),
    ] {
        let err = p.ctl_err(args)?;
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(p.ctl_ok(&["-o", "json", "user", "list"])? == users);
    ensure!(
        host.cli_run(&["config", "get", "dup", "user.ssp.managed"])?
            .trim()
            .is_empty(),
        "a refused adoption marked dup"
    );

    // gdw is adopted, keys read from inside.
    let out = p.ctl_ok(&["adopt", "ad", "gdw"])?;
    ensure!(out.contains("adopted gdw on ad"), "{out}");
    ensure!(host.uuid("gdw")? == uuid, "gdw was recreated");
    let gpus = p.ctl_json(&["gpus"])?;
    let held: Vec<u64> = gpus
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["holder"] == "gdw")
        .filter_map(|g| g["minor"].as_u64())
        .collect();
    ensure!(held == [free], "gdw holds {held:?}: {gpus}");
    let ls = p.ctl_json(&["ls"])?;
    let row = ls
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "gdw")
        .context("gdw in sspctl ls")?;
    ensure!(row["ssh_port"] == 22050, "gdw's port: {row}");
    let devices = host.cli_run(&["config", "device", "show", "gdw"])?;
    ensure!(
        !devices.contains("mygpu:") && !devices.contains("myssh:") && devices.contains("ssp-gpu0:"),
        "the hand-made GPU and SSH devices gave way to ssp's:\n{devices}"
    );
    // gdw logs in as before: their uid, their files.
    let ssh = p.ssh_login("gdw", &key)?;
    ensure!(ssh.run("id -u; cat notes.txt; ls /dev/nvidia0")? == "1000\nprecious\n/dev/nvidia0\n");

    // From now on a hand change is put back.
    host.cli_run(&["config", "set", "gdw", "limits.cpu", "3"])?;
    host.cli_run(&["config", "device", "remove", "gdw", "ssp-gpu0"])?;
    wait_for("ssp to put gdw back", Duration::from_secs(60), || {
        let cpu = host.cli_run(&["config", "get", "gdw", "limits.cpu"]).ok()?;
        let devices = host.cli_run(&["config", "device", "show", "gdw"]).ok()?;
        (cpu.trim() == "1" && devices.contains("ssp-gpu0:")).then_some(())
    })?;
    ensure!(host.uuid("gdw")? == uuid);

    // What was not adopted is left alone, and listed.
    wait_for(
        "sspctl hosts to list dup and other",
        Duration::from_secs(30),
        || {
            let hosts = p.ctl_json(&["hosts"]).ok()?;
            let unmanaged = hosts[0]["unmanaged"].to_string();
            (unmanaged.contains("dup") && unmanaged.contains("other") && !unmanaged.contains("gdw"))
                .then_some(())
        },
    )?;
    ensure!(
        host.cli_run(&["list", "other", "-f", "csv", "-c", "s"])?
            .trim()
            == "RUNNING"
    );
    Ok(())
}
