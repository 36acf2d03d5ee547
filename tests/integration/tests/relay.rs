//! Access from outside the LAN through a relay: a namespace of its own runs the
//! real OpenSSH server as the lab's relay, the host's agent keeps a reverse tunnel
//! there per container (`ssh -N -R`), and the user logs in through the relay's port
//! with the config `sspctl ssh-config NAME --outside` prints. The tunnel's ssh
//! process is killed with SIGKILL; the agent has it back on the same relay port.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform, Proc};

/// The pids of ssh processes forwarding relay port `port`.
fn tunnel_pids(port: u16) -> Vec<i32> {
    run(Command::new("pgrep").args(["-f", "--", &format!("-R 0.0.0.0:{port}:")]))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The relay's sshd, in `ns`, listening on `addr`:22, taking `authorized_keys`.
fn start_sshd(ns: &str, addr: &str, dir: &Path) -> Result<Proc> {
    std::fs::create_dir_all("/run/sshd")?;
    let key = dir.join("relay_host_ed25519");
    if !key.exists() {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key))?;
    }
    let config = dir.join("relay_sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port 22\nListenAddress {addr}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nGatewayPorts clientspecified\nAllowTcpForwarding remote\n",
            key.display(),
            dir.join("relay_authorized_keys").display()
        ),
    )?;
    let config = config.display().to_string();
    let sshd = Proc::start(
        "relay sshd",
        Some(ns),
        &["/usr/sbin/sshd", "-D", "-e", "-f", &config],
        &dir.join("relay_sshd.log"),
    )?;
    Ok(sshd)
}

#[test]
fn a_user_reaches_their_container_through_the_relay_and_the_tunnel_comes_back() -> Result<()> {
    ensure!(
        Path::new("/usr/sbin/sshd").exists(),
        "this test runs the relay's OpenSSH server: install it with `scripts/install-deps.sh --test` (package openssh-server)"
    );
    let h1 = Host::start("rly1", Kind::Incus, 128)?;
    // The relay: a namespace with an address the hosts and this test reach, and
    // nothing else (no daemon).
    let relay = Host::bare("relay", 129)?;
    let p = Platform::start("relay", &[AgentSpec::new(&h1)])?;
    let dir = p.scratch.path().to_path_buf();
    let key = ssh_keypair(&dir, "gdw")?;
    let pubkey = format!("{}.pub", key.display());

    // Without a relay, --outside says so.
    p.ctl_ok(&["user", "add", "gdw", "--ssh-key", &pubkey])?;
    let err = p.ctl_err(&["ssh-config", "gdw", "--outside"])?;
    ensure!(err.contains("no relay"), "{err}");
    // Bad input changes nothing.
    for (args, says) in [
        (
            &[
                "relay",
                "set",
                &relay.addr,
                "--user",
                "root",
                "--ports",
                "30010-30000",
            ][..],
            "FIRST <= LAST",
        ),
        (
            &[
                "relay",
                "set",
                &relay.addr,
                "--user",
                "Root!",
                "--ports",
                "30000-30009",
            ][..],
            "relay user",
        ),
        (
            &[
                "relay",
                "set",
                "relay;rm",
                "--user",
                "root",
                "--ports",
                "30000-30009",
            ][..],
            "address",
        ),
        (
            &[
                "relay",
                "set",
                &relay.addr,
                "--user",
                "root",
                "--ports",
                "20-30",
            ][..],
            "relay's own port",
        ),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(p.ctl_json(&["relay", "show"])?["set"] == false);

    let view = p.ctl_json(&[
        "relay",
        "set",
        &relay.addr,
        "--user",
        "root",
        "--ports",
        "30000-30009",
    ])?;
    println!("relay: {view}");
    ensure!(view["held"] == 1, "gdw got a relay port: {view}");
    let lines: Vec<String> = view["authorized_keys"]
        .as_array()
        .context("authorized_keys")?
        .iter()
        .filter_map(|l| l.as_str().map(String::from))
        .collect();
    ensure!(
        lines.len() == 1
            && lines[0].starts_with("restrict,port-forwarding")
            && lines[0].contains("ssh-ed25519")
            && lines[0].ends_with("ssp-agent@rly1"),
        "the agent's key, limited to forwarding: {lines:?}"
    );
    std::fs::write(dir.join("relay_authorized_keys"), lines.join("\n") + "\n")?;
    let _sshd = start_sshd(&relay.netns, &relay.addr, &dir)?;

    let ls = p.ctl_json(&["ls"])?;
    ensure!(
        ls[0]["relay_port"] == 30000 && ls[0]["relay_host"] == relay.addr.as_str(),
        "{ls}"
    );
    // Inside first (pins the container's host key), then from outside.
    p.ssh_login("gdw", &key)?;
    let outside = p.ssh_client("gdw", &key, true)?;
    let config = std::fs::read_to_string(&outside.config)?;
    ensure!(
        config.contains("Host ssp-gdw-outside")
            && config.contains(&format!("HostName {}", relay.addr))
            && config.contains("Port 30000")
            && config.contains("HostKeyAlias ssp-gdw"),
        "{config}"
    );
    let who = wait_for(
        "gdw's login through the relay",
        Duration::from_secs(60),
        || outside.run("id -un").ok(),
    )?;
    ensure!(who.trim() == "gdw", "{who}");

    // SIGKILL to the tunnel: back on the same relay port within 5 s.
    let pids = tunnel_pids(30000);
    ensure!(
        pids.len() == 1,
        "one tunnel process for port 30000: {pids:?}"
    );
    let t0 = Instant::now();
    run(Command::new("kill").args(["-KILL", &pids[0].to_string()]))?;
    wait_for(
        "the tunnel back, and a login through it",
        Duration::from_secs(5),
        || {
            let now = tunnel_pids(30000);
            (!now.is_empty() && !now.contains(&pids[0]))
                .then(|| outside.run("id -un").ok())
                .flatten()
                .filter(|w| w.trim() == "gdw")
        },
    )?;
    println!(
        "tunnel back and a login through it {} ms after SIGKILL",
        t0.elapsed().as_millis()
    );

    // A second user gets the next port; removing the relay stops the tunnels.
    p.ctl_ok(&["user", "add", "ann", "--ssh-key", &pubkey])?;
    wait_for("ann's tunnel", Duration::from_secs(30), || {
        (!tunnel_pids(30001).is_empty()).then_some(())
    })?;
    let view = p.ctl_json(&["relay", "remove"])?;
    ensure!(view["set"] == false, "{view}");
    wait_for("the tunnels to stop", Duration::from_secs(30), || {
        (tunnel_pids(30000).is_empty() && tunnel_pids(30001).is_empty()).then_some(())
    })?;
    let ls = p.ctl_json(&["ls"])?;
    ensure!(
        ls.as_array()
            .is_some_and(|l| l.iter().all(|r| r["relay_port"] == 0)),
        "{ls}"
    );
    Ok(())
}
