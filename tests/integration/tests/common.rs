//! A Common-Server: one shared container whose GPUs its accounts share. Two people
//! get accounts in it and log in with the real OpenSSH client, each with their own
//! key; neither can read the other's home; both see the Common-Server's GPUs, which
//! `sspctl gpus` shows as held by it. A new account needs no restart, files in the
//! shared folder keep their writer's uid, and removing a person removes their
//! account and keeps their home as an archive.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// The PID of the container's init as the daemon reports it: it changes at a restart.
fn init_pid(host: &Host, name: &str) -> Result<String> {
    let v: serde_json::Value =
        serde_json::from_str(&host.cli_run(&["query", &format!("/1.0/instances/{name}/state")])?)?;
    Ok(v["pid"].to_string())
}

#[test]
fn a_common_server_shares_its_gpus_between_accounts_that_cannot_read_each_other() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let mut host = Host::start("cm", Kind::Incus, 119)?;
    let inv = host.fake_gpus(&[86, 87])?;
    let p = Platform::start(
        "common",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ..AgentSpec::new(&host)
        }],
    )?;
    let dir = p.scratch.path().to_path_buf();
    let alice_key = ssh_keypair(&dir, "alice")?;
    let bob_key = ssh_keypair(&dir, "bob")?;
    let alice_pub = format!("{}.pub", alice_key.display());
    let bob_pub = format!("{}.pub", bob_key.display());

    let out = p.ctl_ok(&["common", "create", "lab1", "--gpus", "2"])?;
    ensure!(out.contains("created the Common-Server lab1"), "{out}");
    // Bad requests name what is wrong and change nothing.
    let users_before = p.ctl_ok(&["-o", "json", "user", "list"])?;
    for (args, says) in [
        (
            &[
                "user",
                "add",
                "carol",
                "--common",
                "lab1",
                "--gpus",
                "1",
                "--ssh-key",
                &alice_pub,
            ][..],
            "--gpus",
        ),
        (
            &[
                "user",
                "add",
                "carol",
                "--common",
                "nosuch",
                "--ssh-key",
                &alice_pub,
            ][..],
            "nosuch is not a Common-Server",
        ),
        (
            &["common", "create", "lab2", "--gpus", "9"][..],
            "cannot place lab2",
        ),
    ] {
        let err = p.ctl_err(args)?;
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(p.ctl_ok(&["-o", "json", "user", "list"])? == users_before);

    for (name, key) in [("alice", &alice_pub), ("bob", &bob_pub)] {
        let out = p.ctl_ok(&[
            "user",
            "add",
            name,
            "--common",
            "lab1",
            "--ssh-key",
            key,
            "--no-credentials",
        ])?;
        ensure!(
            out.contains(&format!(
                "added {name} with an account in the Common-Server lab1"
            )),
            "{out}"
        );
        if name == "alice" {
            // Recorded here, compared once bob has his account too.
            std::fs::write(dir.join("pid-after-alice"), init_pid(&host, "lab1")?)?;
        }
    }
    ensure!(
        init_pid(&host, "lab1")? == std::fs::read_to_string(dir.join("pid-after-alice"))?,
        "a new account restarted the Common-Server"
    );
    let list = p.ctl_ok(&["user", "list"])?;
    ensure!(list.contains("account in lab1"), "{list}");
    let ls = p.ctl_json(&["ls"])?;
    let containers: Vec<_> = ls
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .collect();
    ensure!(
        containers == ["lab1"],
        "only the Common-Server has a container: {ls}"
    );

    // Each logs in with their own key, through their own `sspctl ssh-config`.
    let alice = p.ssh_login("alice", &alice_key)?;
    let bob = p.ssh_login("bob", &bob_key)?;
    let users = p.ctl_json(&["user", "list"])?;
    let uid = |n: &str| -> Result<u64> {
        users
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["name"] == n)
            .and_then(|u| u["uid"].as_u64())
            .with_context(|| format!("{n} in {users}"))
    };
    ensure!(alice.run("id -u")?.trim() == uid("alice")?.to_string());
    ensure!(bob.run("id -u")?.trim() == uid("bob")?.to_string());
    // bob's key does not open alice's account: alice's ssh-config with bob's key.
    let config = std::fs::read_to_string(&alice.config)?;
    let alice_path = alice_key.display().to_string();
    ensure!(config.contains(&alice_path), "{config}");
    let swapped = ssp_integration::SshClient {
        config: dir.join("ssh_config-alice-with-bobs-key"),
        alias: alice.alias.clone(),
    };
    std::fs::write(
        &swapped.config,
        config.replace(&alice_path, &bob_key.display().to_string()),
    )?;
    ensure!(swapped.run("true").is_err(), "bob's key logged in as alice");

    // Homes are their owner's alone; nobody has sudo.
    alice.run("echo alice-only > ~/secret && chmod 644 ~/secret")?;
    for cmd in ["cat /home/alice/secret", "ls /home/alice"] {
        ensure!(bob.run(cmd).is_err(), "bob could run `{cmd}`");
    }
    ensure!(
        alice.run("sudo -n true").is_err(),
        "an account has sudo in the Common-Server"
    );
    // Both see the Common-Server's GPUs; `sspctl gpus` says lab1 holds them.
    for who in [&alice, &bob] {
        let nodes = who.run("ls /dev/nvidia0 /dev/nvidia1")?;
        ensure!(nodes.lines().count() == 2, "{nodes}");
    }
    let gpus = p.ctl_json(&["gpus"])?;
    let held = gpus
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["holder"] == "lab1")
        .count();
    ensure!(held == 2, "sspctl gpus: {gpus}");
    // Files in the shared folder keep their writer's uid on the host (the whole
    // lab range is mapped, so an account's uid is its own there too).
    alice.run("echo hi > /shared/from-alice")?;
    let team = p.shared_root.join("team/from-alice");
    let meta = std::fs::metadata(&team).with_context(|| team.display().to_string())?;
    ensure!(
        u64::from(std::os::unix::fs::MetadataExt::uid(&meta)) == uid("alice")?,
        "{} belongs to uid {}",
        team.display(),
        std::os::unix::fs::MetadataExt::uid(&meta)
    );

    // A Common-Server with accounts is not deleted; an account is not resized.
    let err = p.ctl_err(&["common", "delete", "lab1"])?;
    ensure!(err.contains("still has accounts (alice, bob)"), "{err}");
    let err = p.ctl_err(&["user", "resize", "alice", "--disk", "3GiB"])?;
    ensure!(err.contains("resize lab1 instead"), "{err}");

    // alice goes: her account goes, her home is kept as an archive, bob stays.
    p.ctl_ok(&["user", "remove", "alice"])?;
    ensure!(alice.run("true").is_err(), "alice still logs in");
    let archived = host.cli_run(&[
        "exec",
        "lab1",
        "--",
        "sh",
        "-c",
        "cat /var/lib/ssp-archive/alice-*/secret; stat -c %a /var/lib/ssp-archive; test ! -e /home/alice && echo home-gone",
    ])?;
    let lines: Vec<&str> = archived.lines().collect();
    ensure!(
        lines.first() == Some(&"alice-only")
            && lines.get(1) == Some(&"700")
            && lines.get(2) == Some(&"home-gone"),
        "after removing alice: {archived}"
    );
    ensure!(bob.run("id -un")?.trim() == "bob");
    wait_for("lab1 to settle", Duration::from_secs(30), || {
        let ls = p.ctl_json(&["ls"]).ok()?;
        (ls[0]["state"] == "Running").then_some(())
    })?;
    p.ctl_ok(&["user", "remove", "bob"])?;
    p.ctl_ok(&["common", "delete", "lab1"])?;
    ensure!(host
        .cli_run(&["list", "-f", "csv", "-c", "n"])?
        .trim()
        .is_empty());
    Ok(())
}
