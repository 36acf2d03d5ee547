//! `sspctl image`: alice installs a package in her container and publishes it;
//! the image reaches the other host through the daemons' own image transfer; bob,
//! made from it there, has the package but none of alice's home, keys, history or
//! SSH host keys; deleting the image removes it from both hosts and bob runs on.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// The hosts that have image `alias`, from `sspctl image list`.
fn hosts_with(p: &Platform, alias: &str) -> Result<Vec<String>> {
    let list = p.ctl_json(&["image", "list"])?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| {
            i["aliases"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == alias))
        })
        .flat_map(|i| i["hosts"].as_array().cloned().unwrap_or_default())
        .filter_map(|h| h.as_str().map(String::from))
        .collect())
}

#[test]
fn a_published_image_carries_the_package_not_the_person() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let h1 = Host::start("im1", Kind::Incus, 117)?;
    let h2 = Host::start("im2", Kind::Incus, 118)?;
    let p = Platform::start("images", &[AgentSpec::new(&h1), AgentSpec::new(&h2)])?;
    let dir = p.scratch.path().to_path_buf();
    let key = ssh_keypair(&dir, "k")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        &pubkey,
        "--host",
        "im1",
    ])?;
    let alice = p.ssh_login("alice", &key)?;

    // A package alice installs (built here: the containers have no network).
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN"))?;
    std::fs::create_dir_all(pkg.join("usr/share/ssp-demo"))?;
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: ssp-demo\nVersion: 1.0\nArchitecture: all\nMaintainer: ssp tests <tests@example.invalid>\nDescription: a package a user installs\n",
    )?;
    std::fs::write(pkg.join("usr/share/ssp-demo/hello"), "hello\n")?;
    let deb = dir.join("ssp-demo.deb");
    run(std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&pkg)
        .arg(&deb))?;
    h1.cli_run(&[
        "file",
        "push",
        deb.to_str().unwrap_or_default(),
        "alice/tmp/ssp-demo.deb",
    ])?;
    alice.run("sudo dpkg -i /tmp/ssp-demo.deb >/dev/null && dpkg -s ssp-demo | grep -q 'Status: install ok installed'")?;
    alice.run("echo secret > $HOME/notes.txt && echo 'cat notes.txt' > $HOME/.bash_history")?;
    let alice_hostkey = alice.run("cat /etc/ssh/ssh_host_ed25519_key.pub")?;

    // Bad requests change nothing.
    for (args, says) in [
        (
            &["image", "publish", "zed", "x"][..],
            "zed has no container",
        ),
        (&["image", "publish", "alice", "a b"][..], "image alias"),
        (
            &["image", "publish", "alice", "debian-ssh"][..],
            "already has an image debian-ssh",
        ),
        (
            &[
                "image",
                "publish",
                "alice",
                "x",
                "--from-snapshot",
                "nosuch",
            ][..],
            "nosuch",
        ),
        (
            &["image", "delete", "no-such-image"][..],
            "no host has image no-such-image",
        ),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(hosts_with(&p, "x")?.is_empty(), "no image x was made");

    let out = p.ctl_json(&["image", "publish", "alice", "lab-base"])?;
    println!("published: {out}");
    ensure!(
        out["hosts"] == serde_json::json!(["im1", "im2"]),
        "published on im1, copied to im2: {out}"
    );
    // Nothing of the publication is left on alice's host.
    let left = h1.cli_run(&["list", "-f", "csv", "-c", "n"])?;
    ensure!(
        !left.contains("ssp-publish"),
        "temporary copy removed: {left}"
    );
    let snaps = h1.cli_run(&["query", "/1.0/instances/alice/snapshots"])?;
    ensure!(!snaps.contains("ssp-publish"), "snapshot removed: {snaps}");
    wait_for(
        "both hosts to report lab-base",
        Duration::from_secs(20),
        || (hosts_with(&p, "lab-base").ok()? == ["im1", "im2"]).then_some(()),
    )?;

    // bob from it, on the other host.
    p.ctl_ok(&[
        "user",
        "add",
        "bob",
        "--ssh-key",
        &pubkey,
        "--image",
        "lab-base",
        "--host",
        "im2",
    ])?;
    let bob = p.ssh_login("bob", &key)?;
    bob.run("dpkg -s ssp-demo | grep -q 'Status: install ok installed' && cat /usr/share/ssp-demo/hello")
        .context("bob has the package alice installed")?;
    let homes = bob.run("ls /home")?;
    ensure!(homes.trim() == "bob", "only bob's home: {homes:?}");
    let passwd = bob.run("cat /etc/passwd")?;
    ensure!(
        !passwd.contains("alice:"),
        "no alice account in the image: {passwd}"
    );
    let found = bob.run(
        "sudo find / -xdev \\( -name notes.txt -o -name .bash_history \\) 2>/dev/null | head",
    )?;
    ensure!(
        found.trim().is_empty(),
        "no file or history of alice's: {found}"
    );
    let keys =
        bob.run("sudo cat /root/.ssh/authorized_keys 2>/dev/null; cat $HOME/.ssh/authorized_keys")?;
    ensure!(keys.lines().count() == 1, "only bob's own key: {keys}");
    let bob_hostkey = bob.run("cat /etc/ssh/ssh_host_ed25519_key.pub")?;
    ensure!(
        bob_hostkey != alice_hostkey,
        "bob's container made its own host key"
    );

    // Deleted from every host; bob keeps running.
    let out = p.ctl_json(&["image", "delete", "lab-base"])?;
    ensure!(out["hosts"] == serde_json::json!(["im1", "im2"]), "{out}");
    for h in [&h1, &h2] {
        let images = h.cli_run(&["image", "list", "-f", "csv", "-c", "l"])?;
        ensure!(!images.contains("lab-base"), "{images}");
    }
    ensure!(h2.cli_run(&["list", "bob", "-f", "csv", "-c", "s"])?.trim() == "RUNNING");
    bob.run("true").context("bob still logs in")?;
    let audit = p.ctl_ok(&["audit"])?;
    ensure!(
        audit.contains("image-publish lab-base") && audit.contains("image-delete lab-base"),
        "{audit}"
    );
    Ok(())
}
