//! Bad input is refused by name and changes nothing, on two real Incus daemons:
//! a port held by a container ssp did not make is never handed out, an image no
//! host has is refused with every host's images, and `--cpus 0` is refused.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform};

/// Every TCP port the proxy devices of `host`'s instances listen on, with the
/// instance and device holding it, straight from the daemon.
fn proxy_ports(host: &Host) -> Result<Vec<(u16, String)>> {
    let out = host.cli_run(&["query", "/1.0/instances?recursion=1"])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let mut ports = Vec::new();
    for i in list.as_array().context("instance list")? {
        let name = i["name"].as_str().unwrap_or_default();
        for (dev, d) in i["expanded_devices"].as_object().into_iter().flatten() {
            if d["type"] != "proxy" {
                continue;
            }
            let listen = d["listen"].as_str().unwrap_or_default();
            for p in ssp_agent::ports::proxy_listen_ports(listen) {
                ports.push((p, format!("{name}/{dev}")));
            }
        }
    }
    Ok(ports)
}

/// `sspctl hosts` entry of `name`.
fn host_view(p: &Platform, name: &str) -> Option<serde_json::Value> {
    p.ctl_json(&["hosts"])
        .ok()?
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .cloned()
}

#[test]
fn bad_input_is_refused_by_name_and_changes_nothing() -> Result<()> {
    let rf1 = Host::start("rf1", Kind::Incus, 81)?;
    let rf2 = Host::start("rf2", Kind::Incus, 82)?;
    let p = Platform::start("refusals", &[AgentSpec::new(&rf1), AgentSpec::new(&rf2)])?;
    let key = ssh_keypair(p.scratch.path(), "k")?;
    let pubkey = format!("{}.pub", key.display());

    // (a) A container made by hand, not through ssp, forwards the first port of the
    // agent's range (22000-22099) with a proxy process of its own.
    rf1.cli_run(&["launch", "busybox", "handmade"])?;
    rf1.cli_run(&[
        "config",
        "device",
        "add",
        "handmade",
        "fwd",
        "proxy",
        "listen=tcp:0.0.0.0:22000",
        "connect=tcp:127.0.0.1:22",
    ])?;
    wait_for(
        "rf1's agent to report port 22000 as taken",
        Duration::from_secs(30),
        || {
            let h = host_view(&p, "rf1")?;
            h["foreign_ports"]
                .as_array()?
                .iter()
                .any(|x| x == 22000)
                .then_some(())
        },
    )?;
    p.ctl_ok(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        &pubkey,
        "--image",
        "busybox",
        "--host",
        "rf1",
        "--wait",
        "running",
    ])?;
    let ls = p.ctl_json(&["ls"])?;
    let alice = ls
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "alice"))
        .with_context(|| format!("alice missing from ls: {ls}"))?;
    ensure!(
        alice["host"] == "rf1" && alice["ssh_port"] == 22001,
        "alice should get rf1's next free port, 22001: {alice}"
    );
    let mut seen = BTreeMap::new();
    for r in ls.as_array().context("ls")? {
        let k = (r["host"].to_string(), r["ssh_port"].to_string());
        ensure!(
            seen.insert(k, r["name"].clone()).is_none(),
            "two containers share an SSH port in ls: {ls}"
        );
    }
    let forwards = proxy_ports(&rf1)?;
    let mut by_port: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for (port, who) in &forwards {
        by_port.entry(*port).or_default().push(who);
    }
    ensure!(
        by_port.values().all(|w| w.len() == 1),
        "two forwards on one port on rf1's daemon: {by_port:?}"
    );
    ensure!(
        by_port.get(&22001) == Some(&vec!["alice/ssp-ssh"])
            && by_port.get(&22000) == Some(&vec!["handmade/fwd"]),
        "rf1's forwards: {by_port:?}"
    );

    // (b) rf2 loses an image by hand; its agent reports the change with its next
    // heartbeat, and an image no host has is refused with every host's images.
    rf2.cli_run(&["image", "delete", "debian-ssh"])?;
    wait_for(
        "rf2's agent to report its images without debian-ssh",
        Duration::from_secs(30),
        || {
            let h = host_view(&p, "rf2")?;
            let images = h["images"].as_array()?;
            (images.len() == 1 && images[0]["aliases"] == serde_json::json!(["busybox"]))
                .then_some(())
        },
    )?;
    let users_before = p.ctl_json(&["user", "list"])?;
    let daemons_before = (rf1.instance_names()?, rf2.instance_names()?);
    let unchanged = |what: &str| -> Result<()> {
        ensure!(
            p.ctl_json(&["user", "list"])? == users_before,
            "{what} changed the user list"
        );
        ensure!(
            (rf1.instance_names()?, rf2.instance_names()?) == daemons_before,
            "{what} changed the daemons' instances"
        );
        Ok(())
    };
    let err = p.ctl_err(&[
        "user",
        "add",
        "carol",
        "--ssh-key",
        &pubkey,
        "--image",
        "no-such-image",
    ])?;
    ensure!(
        err.contains(
            "cannot place carol: no host has image no-such-image (rf1: busybox, debian-ssh; rf2: busybox)"
        ),
        "{err}"
    );
    unchanged("--image no-such-image")?;
    let err = p.ctl_err(&[
        "user",
        "add",
        "carol",
        "--ssh-key",
        &pubkey,
        "--image",
        "debian-ssh",
        "--host",
        "rf2",
    ])?;
    ensure!(
        err.contains("no host has image debian-ssh (rf2: busybox)"),
        "{err}"
    );
    unchanged("--image debian-ssh --host rf2")?;

    // (c) Zero CPUs (and zero memory) are refused, not taken for the default.
    let err = p.ctl_err(&[
        "user",
        "add",
        "carol",
        "--ssh-key",
        &pubkey,
        "--image",
        "busybox",
        "--cpus",
        "0",
    ])?;
    ensure!(
        err.contains("invalid CPU count \"0\": must be at least 1"),
        "{err}"
    );
    unchanged("--cpus 0")?;
    let err = p.ctl_err(&[
        "user",
        "add",
        "carol",
        "--ssh-key",
        &pubkey,
        "--image",
        "busybox",
        "--memory",
        "0",
    ])?;
    ensure!(err.contains("must be more than zero"), "{err}");
    unchanged("--memory 0")?;

    // An image named by a prefix of its fingerprint is found and used.
    let images: serde_json::Value =
        serde_json::from_str(&rf2.cli_run(&["query", "/1.0/images?recursion=1"])?)?;
    let print = images[0]["fingerprint"]
        .as_str()
        .context("busybox's fingerprint")?
        .to_string();
    p.ctl_ok(&[
        "user",
        "add",
        "bob",
        "--ssh-key",
        &pubkey,
        "--image",
        &print[..12],
        "--host",
        "rf2",
        "--wait",
        "running",
    ])?;
    ensure!(
        rf2.instance_names()?.contains(&"bob".to_string()),
        "bob's container should exist on rf2"
    );
    Ok(())
}
