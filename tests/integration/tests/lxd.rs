//! The create, SSH and limits path against LXD 5.0 (Debian's package), with SSH
//! through the daemon's forwarding process (`ssh_forward = "proxy"`); the Incus
//! tests use the default NAT forward.

use anyhow::{ensure, Result};
use ssp_integration::{ssh_keypair, AgentSpec, Host, Kind, Platform};

#[test]
fn lxd_create_ssh_and_limits() -> Result<()> {
    let mut host = Host::start("lxd1", Kind::Lxd, 21)?;
    let inv = host.fake_gpus(&[4, 5])?;
    let p = Platform::start(
        "lxd",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ssh_forward: Some("proxy"),
            ..AgentSpec::new(&host)
        }],
    )?;
    let hosts = p.ctl_json(&["hosts"])?;
    ensure!(
        hosts[0]["daemon"] == "lxd",
        "the agent should detect LXD: {hosts}"
    );

    let dir = p.scratch.path().to_path_buf();
    let key = ssh_keypair(&dir, "erin")?;
    let public = format!("{}.pub", key.display());
    p.ctl_ok(&[
        "user",
        "add",
        "erin",
        "--ssh-key",
        &public,
        "--gpus",
        "1",
        "--cpus",
        "1",
        "--memory",
        "768MiB",
    ])?;
    let nodes = host.exec("erin", "ls /dev | grep -E '^nvidia[0-9]+$'")?;
    ensure!(
        nodes.split_whitespace().collect::<Vec<_>>() == ["nvidia0"],
        "GPU nodes inside: {nodes:?}"
    );

    let connect = host.cli_run(&["config", "device", "get", "erin", "ssp-ssh", "connect"])?;
    ensure!(
        connect.trim() == "tcp:127.0.0.1:22",
        "with ssh_forward = \"proxy\" the forward connects inside: {connect:?}"
    );
    let client = p.ssh_login("erin", &key)?;
    let ssh = |cmd: &str| client.run(cmd);
    ensure!(ssh("nproc")?.trim() == "1", "nproc should be 1");
    let mem_kib: u64 = ssh("awk '/MemTotal/ {print $2}' /proc/meminfo")?
        .trim()
        .parse()?;
    ensure!(
        mem_kib == 768 * 1024,
        "MemTotal inside is {mem_kib} KiB, asked for 768MiB"
    );

    // LXD 5.0 takes the owner-only idmap too, and runs with the one its config
    // asks for (the agent would restart it otherwise).
    let uid = p.ctl_json(&["user", "list"])?[0]["uid"]
        .as_u64()
        .unwrap_or(0);
    let map = host.exec("erin", "cat /proc/self/uid_map")?;
    ensure!(
        map.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == [uid.to_string(), uid.to_string(), "1".into()]),
        "erin's uid {uid} is not mapped 1:1: {map}"
    );
    let idmap = |k: &str| host.cli_run(&["config", "get", "erin", k]);
    ensure!(
        idmap("volatile.idmap.current")? == idmap("volatile.idmap.next")?,
        "erin runs with another idmap than her config asks for"
    );

    p.ctl_ok(&["user", "remove", "erin"])?;
    ensure!(
        host.instance_names()?.is_empty(),
        "erin's container should be gone"
    );
    Ok(())
}
