//! A container with its own address on the lab's LAN (`--network lan`): the LAN is
//! a bridge in a network namespace of its own with a DHCP server (dnsmasq) and no
//! route anywhere else; each host's agent names its end of a veth pair on that
//! bridge as `[lan] parent`. The container gets an address from the LAN's DHCP
//! server, the user reaches it by ssh at that address from another namespace on
//! the LAN (`sspctl ssh-config` says where), and it keeps the address after a
//! restart and after a move to another host on the same LAN.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform, Proc};

/// The LAN: a bridge in namespace `ssptb-lan{index}` at 10.236.{index}.1/24 with
/// dnsmasq handing out .100-.150, a client namespace at .5, and a veth into each
/// host's namespace (`lan0` there).
struct Lan {
    index: u8,
    ns: String,
    client_ns: String,
    subnet: String,
    hosts: Vec<String>,
    _dhcp: Proc,
}

impl Lan {
    fn start(index: u8, hosts: &[&Host], scratch: &Path) -> Result<Lan> {
        let ns = format!("ssptb-lan{index}");
        let client_ns = format!("ssptb-lanc{index}");
        let subnet = format!("10.236.{index}");
        let sh = |s: String| run(Command::new("sh").arg("-c").arg(&s)).with_context(|| s);
        // Leftovers of a killed run.
        for n in [&ns, &client_ns] {
            let _ = run(Command::new("ip").args(["netns", "del", n]));
        }
        sh(format!("ip netns add {ns}"))?;
        sh(format!(
            "ip -n {ns} link add lanbr type bridge && ip -n {ns} addr add {subnet}.1/24 dev lanbr && ip -n {ns} link set lanbr up && ip -n {ns} link set lo up"
        ))?;
        // Each host's end is its LAN interface, without an address: the host does
        // not take part in the LAN, its containers do (macvlan on it).
        for (i, h) in hosts.iter().enumerate() {
            sh(format!(
                "ip -n {ns} link add lanp{i} type veth peer name lan0 netns {hns} && ip -n {ns} link set lanp{i} master lanbr up && ip -n {hns} link set lan0 up",
                hns = h.netns
            ))?;
        }
        sh(format!("ip netns add {client_ns}"))?;
        sh(format!(
            "ip -n {ns} link add lanc type veth peer name eth0 netns {client_ns} && ip -n {ns} link set lanc master lanbr up && ip -n {client_ns} addr add {subnet}.5/24 dev eth0 && ip -n {client_ns} link set eth0 up && ip -n {client_ns} link set lo up"
        ))?;
        let leases = scratch.join("lan.leases");
        let dhcp = Proc::start(
            "dnsmasq",
            Some(&ns),
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--port=0",
                "--interface=lanbr",
                "--bind-interfaces",
                "--dhcp-authoritative",
                &format!("--dhcp-range={subnet}.100,{subnet}.150,255.255.255.0,1h"),
                &format!("--dhcp-leasefile={}", leases.display()),
                "--log-dhcp",
            ],
            &scratch.join("dnsmasq.log"),
        )?;
        Ok(Lan {
            index,
            ns,
            client_ns,
            subnet,
            hosts: hosts.iter().map(|h| h.netns.clone()).collect(),
            _dhcp: dhcp,
        })
    }

    /// The real OpenSSH client, run from the client namespace on the LAN.
    fn ssh(&self, config: &Path, alias: &str, cmd: &str) -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.client_ns, "ssh", "-F"])
            .arg(config)
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", alias, cmd]))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if std::env::var_os("SSP_TESTBED_KEEP").is_some() && std::thread::panicking() {
            return;
        }
        for ns in &self.hosts {
            let _ = run(Command::new("ip").args(["-n", ns, "link", "del", "lan0"]));
        }
        for ns in [&self.ns, &self.client_ns] {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        let _ = self.index;
    }
}

/// `sspctl ssh-config NAME`, written to a file in the scratch dir.
fn ssh_config(p: &Platform, name: &str, key: &Path) -> Result<PathBuf> {
    Ok(p.ssh_client(name, key, false)?.config)
}

/// gdw's row of `sspctl ls`.
fn row(p: &Platform, name: &str) -> Result<serde_json::Value> {
    p.ctl_json(&["ls"])?
        .as_array()
        .and_then(|l| l.iter().find(|r| r["name"] == name).cloned())
        .with_context(|| format!("{name} in sspctl ls"))
}

#[test]
fn a_container_on_the_lan_has_its_own_address_kept_across_restart_and_move() -> Result<()> {
    let h1 = Host::start("lan1", Kind::Incus, 126)?;
    let h2 = Host::start("lan2", Kind::Incus, 127)?;
    let lan_cfg = "[lan]\nname = \"lab\"\nparent = \"lan0\"\n";
    let p = Platform::start(
        "network",
        &[
            AgentSpec {
                extra_config: lan_cfg,
                ..AgentSpec::new(&h1)
            },
            AgentSpec {
                extra_config: lan_cfg,
                ..AgentSpec::new(&h2)
            },
        ],
    )?;
    let lan = Lan::start(126, &[&h1, &h2], p.scratch.path())?;
    let key = ssh_keypair(p.scratch.path(), "gdw")?;
    let pubkey = format!("{}.pub", key.display());

    // Bad input is refused with what is allowed, and nothing is recorded.
    for (args, says) in [
        (&["--network", "wifi"][..], "expected forward"),
        (&["--lan", "lab"][..], "--network lan"),
        (
            &["--network", "lan", "--lan", "annex"][..],
            "on LAN lab, not annex",
        ),
    ] {
        let mut full = vec!["user", "add", "gdw", "--ssh-key", &pubkey];
        full.extend_from_slice(args);
        let err = p.ctl_err(&full)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    ensure!(
        p.ctl_json(&["ls"])?
            .as_array()
            .is_some_and(|l| l.is_empty()),
        "refused requests recorded nothing"
    );

    // sspctl runs outside the LAN here, so it waits for the container, not for SSH.
    p.ctl_ok(&[
        "user",
        "add",
        "gdw",
        "--ssh-key",
        &pubkey,
        "--network",
        "lan",
        "--host",
        "lan1",
        "--wait",
        "running",
    ])?;
    let r = row(&p, "gdw")?;
    println!("sspctl ls: {r}");
    ensure!(r["network"] == "lan" && r["lan"] == "lab", "{r}");
    let addr = r["lan_address"].as_str().unwrap_or_default().to_string();
    ensure!(
        addr.starts_with(&format!("{}.", lan.subnet)),
        "gdw's address should come from the LAN's DHCP server ({}.100-150): {r}",
        lan.subnet
    );
    let leases = std::fs::read_to_string(p.scratch.path().join("lan.leases"))?;
    ensure!(
        leases.contains(&addr),
        "the LAN's DHCP server leased {addr}: {leases}"
    );
    // No port of the host is forwarded to it.
    let devices = h1.cli_run(&["config", "device", "show", "gdw"])?;
    ensure!(
        !devices.contains("ssp-ssh") && devices.contains("macvlan") && devices.contains("lan0"),
        "gdw's devices: {devices}"
    );

    // The user logs in at that address, from another machine on the LAN.
    let config = ssh_config(&p, "gdw", &key)?;
    let text = std::fs::read_to_string(&config)?;
    ensure!(
        text.contains(&format!("HostName {addr}")) && text.contains("Port 22"),
        "ssh-config points at the LAN address: {text}"
    );
    let who = wait_for("gdw's sshd on the LAN", Duration::from_secs(60), || {
        lan.ssh(&config, "ssp-gdw", "id -un; hostname -I").ok()
    })?;
    println!("on the LAN: {who}");
    ensure!(who.starts_with("gdw") && who.contains(&addr), "{who}");
    lan.ssh(&config, "ssp-gdw", "echo kept > $HOME/note")?;

    // A restart: the same address.
    h1.cli_run(&["restart", "gdw", "--force"])?;
    let again = wait_for(
        "gdw's address after the restart",
        Duration::from_secs(60),
        || {
            let r = row(&p, "gdw").ok()?;
            let a = r["lan_address"].as_str()?.to_string();
            (r["state"] == "Running" && !a.is_empty()).then_some(a)
        },
    )?;
    ensure!(
        again == addr,
        "after a restart gdw has {again}, before {addr}"
    );
    let who = wait_for(
        "gdw's sshd after the restart",
        Duration::from_secs(60),
        || lan.ssh(&config, "ssp-gdw", "cat $HOME/note").ok(),
    )?;
    ensure!(who.trim() == "kept", "{who}");

    // A move to the other host on the same LAN: the same address there, the
    // same host key (strict checking against the key pinned before).
    let out = p.ctl_json(&["migrate", "gdw", "lan2"])?;
    ensure!(out[0]["phase"] == "done", "{out}");
    let moved = wait_for("gdw's address on lan2", Duration::from_secs(60), || {
        let r = row(&p, "gdw").ok()?;
        let a = r["lan_address"].as_str()?.to_string();
        (r["host"] == "lan2" && !a.is_empty()).then_some(a)
    })?;
    ensure!(
        moved == addr,
        "after the move gdw has {moved}, before {addr}"
    );
    let config = ssh_config(&p, "gdw", &key)?;
    let who = wait_for("gdw's sshd on lan2", Duration::from_secs(60), || {
        lan.ssh(&config, "ssp-gdw", "cat $HOME/note").ok()
    })?;
    ensure!(who.trim() == "kept", "{who}");
    ensure!(!h1.instance_names()?.contains(&"gdw".to_string()));

    // Changed later, while it runs: back to a forwarded port (the user logs in
    // through the host, from outside the LAN), then onto the LAN again, with the
    // same address; the container is not restarted for either.
    for (args, says) in [
        (&["user", "network", "gdw", "wifi"][..], "expected forward"),
        (
            &["user", "network", "gdw", "lan", "--lan", "annex"][..],
            "on LAN lab, not annex",
        ),
        (&["user", "network", "zed", "lan"][..], "does not exist"),
    ] {
        let err = p.ctl_err(args)?;
        println!("sspctl {}: {}", args.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", args.join(" "));
    }
    let init = h2.init_pid("gdw")?;
    let out = p.ctl_json(&["user", "network", "gdw", "forward"])?;
    println!("to forward: {out}");
    let r = row(&p, "gdw")?;
    ensure!(r["network"] == "forward" && r["lan_address"] == "", "{r}");
    let devices = h2.cli_run(&["config", "device", "show", "gdw"])?;
    ensure!(
        devices.contains("ssp-ssh") && !devices.contains("macvlan"),
        "gdw's devices: {devices}"
    );
    let ssh = p.ssh_login("gdw", &key)?;
    ensure!(ssh.run("cat $HOME/note")?.trim() == "kept");
    let out = p.ctl_json(&["user", "network", "gdw", "lan"])?;
    println!("to lan: {out}");
    ensure!(
        out["instances"][0]["lan_address"] == addr.as_str(),
        "back on the LAN with {addr}: {out}"
    );
    let config = ssh_config(&p, "gdw", &key)?;
    let who = wait_for(
        "gdw's sshd on the LAN again",
        Duration::from_secs(60),
        || lan.ssh(&config, "ssp-gdw", "cat $HOME/note").ok(),
    )?;
    ensure!(who.trim() == "kept", "{who}");
    ensure!(
        h2.init_pid("gdw")? == init,
        "the container was not restarted"
    );

    static_pool(&p, &lan, &h1, &h2, &pubkey, &key)
}

/// An admin's pool of static addresses on the LAN: each container gets its own,
/// never one given to another, the same after a restart and a move; a full pool
/// refuses, and a pool cannot be taken away from addresses in use.
fn static_pool(
    p: &Platform,
    lan: &Lan,
    h1: &Host,
    h2: &Host,
    pubkey: &str,
    key: &Path,
) -> Result<()> {
    let net = &lan.subnet;
    for (args, says) in [
        (
            vec!["--pool".to_string(), format!("{net}.210-{net}.200/24")],
            "not be above",
        ),
        (vec!["--pool".into(), "lots".into()], "FIRST-LAST/PREFIX"),
        (
            vec![
                "--pool".into(),
                format!("{net}.200-{net}.210/24"),
                "--gateway".into(),
                format!("{net}.205"),
            ],
            "inside the range",
        ),
        (
            vec!["--pool".into(), format!("{net}.200-10.237.0.1/24")],
            "one /24 subnet",
        ),
    ] {
        let mut full = vec!["lan", "set", "lab"];
        full.extend(args.iter().map(String::as_str));
        let err = p.ctl_err(&full)?;
        println!("sspctl {}: {}", full.join(" "), err.trim());
        ensure!(err.contains(says), "sspctl {}: {err}", full.join(" "));
    }
    let pool = format!("{net}.200-{net}.201/24");
    let out = p.ctl_json(&[
        "lan",
        "set",
        "lab",
        "--pool",
        &pool,
        "--gateway",
        &format!("{net}.1"),
    ])?;
    println!("sspctl lan set: {out}");
    ensure!(
        out[0]["name"] == "lab" && out[0]["pool"] == pool.as_str(),
        "{out}"
    );
    let add = |name: &str, host: &str| {
        p.ctl(&[
            "user",
            "add",
            name,
            "--ssh-key",
            pubkey,
            "--network",
            "lan",
            "--host",
            host,
            "--wait",
            "running",
        ])
    };
    for (name, host, want) in [("ann", "lan1", ".200"), ("bob", "lan2", ".201")] {
        let out = add(name, host);
        ensure!(
            out.status.success(),
            "adding {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = row(p, name)?;
        ensure!(
            r["lan_address"] == format!("{net}{want}").as_str(),
            "{name} gets {net}{want} from the pool: {r}"
        );
    }
    let out = add("carol", "lan1");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("no free address left in LAN lab's pool"),
        "a full pool refuses: {err}"
    );
    ensure!(row(p, "carol").is_err(), "carol is not recorded");
    // Not a DHCP lease: the container holds the address itself.
    let leases = std::fs::read_to_string(p.scratch.path().join("lan.leases"))?;
    ensure!(!leases.contains(&format!("{net}.200")), "{leases}");
    let config = ssh_config(p, "ann", key)?;
    let ann = wait_for(
        "ann's sshd at her static address",
        Duration::from_secs(60),
        || lan.ssh(&config, "ssp-ann", "hostname -I; ip route").ok(),
    )?;
    println!("ann: {ann}");
    ensure!(
        ann.contains(&format!("{net}.200")) && ann.contains(&format!("default via {net}.1")),
        "{ann}"
    );
    // A restart and a move keep it.
    h1.cli_run(&["restart", "ann", "--force"])?;
    wait_for(
        "ann's sshd after the restart",
        Duration::from_secs(60),
        || lan.ssh(&config, "ssp-ann", "true").ok(),
    )?;
    let out = p.ctl_json(&["migrate", "ann", "lan2"])?;
    ensure!(out[0]["phase"] == "done", "{out}");
    ensure!(row(p, "ann")?["lan_address"] == format!("{net}.200").as_str());
    let moved = wait_for("ann's sshd on lan2", Duration::from_secs(60), || {
        lan.ssh(&config, "ssp-ann", "hostname -I").ok()
    })?;
    ensure!(moved.contains(&format!("{net}.200")), "{moved}");
    ensure!(h2.instance_names()?.contains(&"ann".to_string()));
    // The pool cannot go while addresses of it are held.
    let err = p.ctl_err(&["lan", "set", "lab", "--dhcp"])?;
    ensure!(
        err.contains("ann holds") && err.contains("bob holds"),
        "{err}"
    );
    // Off the LAN, bob's address is free again, and the next one gets it.
    p.ctl_ok(&["user", "network", "bob", "forward"])?;
    let out = add("carol", "lan1");
    ensure!(
        out.status.success(),
        "adding carol: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(row(p, "carol")?["lan_address"] == format!("{net}.201").as_str());
    let lans = p.ctl_json(&["lan", "ls"])?;
    println!("sspctl lan ls: {lans}");
    ensure!(lans[0]["held"] == 2 && lans[0]["containers"] == 3, "{lans}");
    Ok(())
}
