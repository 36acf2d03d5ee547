//! Benchmark: `sspctl user add` until SSH answers, against a raw `incus launch` of
//! the same image with the same config and devices until SSH answers.
//!
//! Both run on the same testbed host, interleaved, and the figure is the median of
//! the per-round ratios. Run: cargo bench -p ssp-integration --bench user_add

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ssp_integration::{median, ssh_keypair, AgentSpec, Host, Kind, Platform};

const ROUNDS: usize = 7;

/// Waits until an SSH server greets on `addr` (the banner starts with "SSH-").
fn wait_banner(addr: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(500)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_millis(1000)))?;
                let mut buf = [0u8; 4];
                match s.read_exact(&mut buf) {
                    Ok(()) if &buf == b"SSH-" => return Ok(()),
                    Ok(()) => last = format!("unexpected greeting {buf:?}"),
                    Err(e) => last = format!("connected, then {e}"),
                }
            }
            Err(e) => last = format!("connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no SSH banner on {addr} within {limit:?} (last: {last})")
}

/// The instance's own config and devices as YAML for `incus launch`, minus ssp's
/// and the daemon's bookkeeping keys, with the SSH forward moved to `port` and the
/// container to bridge address `addr`.
fn baseline_yaml(host: &Host, from: &str, port: u16, addr: &str) -> Result<String> {
    let shown = host.cli_run(&["config", "show", from])?;
    let mut out = String::new();
    let mut skip_section = false;
    // Indent of a skipped key whose value continues on deeper-indented lines.
    let mut skip_deeper: Option<usize> = None;
    for line in shown.lines() {
        let key = line.trim_start();
        let indent = line.len() - key.len();
        if let Some(i) = skip_deeper {
            if indent > i {
                continue;
            }
            skip_deeper = None;
        }
        if indent == 0 {
            skip_section = !(key.starts_with("config:") || key.starts_with("devices:"));
        }
        if skip_section
            || key.starts_with("volatile.")
            || key.starts_with("user.ssp.")
            || key.starts_with("image.")
        {
            skip_deeper = Some(indent);
            continue;
        }
        let pad = &line[..indent];
        if key.starts_with("listen: tcp:") {
            out.push_str(&format!("{pad}listen: tcp:{}:{port}\n", host.addr));
            continue;
        }
        if key.starts_with("connect: tcp:") {
            out.push_str(&format!("{pad}connect: tcp:{addr}:22\n"));
            continue;
        }
        if key.starts_with("ipv4.address:") {
            out.push_str(&format!("{pad}ipv4.address: {addr}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

/// `sspctl user add` until SSH answers: (total, command alone) in seconds.
fn ssp_add(p: &Platform, host: &Host, name: &str, public: &str) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let out = p.ctl_ok(&[
        "-o",
        "json",
        "user",
        "add",
        name,
        "--ssh-key",
        public,
        "--gpus",
        "1",
    ])?;
    let cmd = t0.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let port = v["ssh_port"].as_u64().context("ssh_port in reply")?;
    if let Err(e) = wait_banner(&format!("{}:{port}", host.addr), Duration::from_secs(60)) {
        let diag = host
            .exec(
                name,
                "systemctl status --no-pager ssh ssp-account ssp-hostkeys 2>&1; ss -ltn",
            )
            .unwrap_or_else(|e| e.to_string());
        bail!("{e}\n{diag}");
    }
    Ok((t0.elapsed().as_secs_f64(), cmd))
}

/// `incus launch` with the same config and devices until SSH answers, in seconds.
fn raw_launch(host: &Host, name: &str, yaml: &str) -> Result<f64> {
    let t0 = Instant::now();
    let mut child = host
        .cli()
        .args(["launch", "debian-ssh", name, "-q"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(yaml.as_bytes())?;
    if !child.wait()?.success() {
        bail!("incus launch {name} failed");
    }
    wait_banner(&format!("{}:23000", host.addr), Duration::from_secs(60))?;
    Ok(t0.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let mut host = Host::start("bench", Kind::Incus, 31)?;
    let inv = host.fake_gpus(&[0, 1, 2, 3])?;
    let p = Platform::start(
        "bench",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ..AgentSpec::new(&host)
        }],
    )?;
    let key = ssh_keypair(p.scratch.path(), "bench")?;
    let public = format!("{}.pub", key.display());

    // Warm-up: the first launch unpacks the image into the pool; both paths then clone it.
    p.ctl_ok(&["user", "add", "warm", "--ssh-key", &public, "--gpus", "1"])?;
    let yaml = baseline_yaml(&host, "warm", 23000, "10.232.31.100")?;
    p.ctl_ok(&["user", "remove", "warm"])?;

    let (mut ssp_t, mut raw_t, mut ratios) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let name = format!("u{round}");
        let raw_name = format!("raw{round}");
        // Alternate which path goes first, so neither always follows the other's work.
        let (ssp, cmd, raw) = if round % 2 == 0 {
            let (ssp, cmd) = ssp_add(&p, &host, &name, &public)?;
            (ssp, cmd, raw_launch(&host, &raw_name, &yaml)?)
        } else {
            let raw = raw_launch(&host, &raw_name, &yaml)?;
            let (ssp, cmd) = ssp_add(&p, &host, &name, &public)?;
            (ssp, cmd, raw)
        };
        println!("round {round}: ssp {ssp:.3}s (command {cmd:.3}s), raw incus launch {raw:.3}s, ratio {:.3}", ssp / raw);
        ssp_t.push(ssp);
        raw_t.push(raw);
        ratios.push(ssp / raw);
        p.ctl_ok(&["user", "remove", &name])?;
        host.cli_run(&["delete", "--force", &raw_name])?;
        // btrfs removes deleted subvolumes in the background; let that finish
        // so it does not land on the next round's first launch.
        std::thread::sleep(Duration::from_secs(3));
    }
    println!(
        "user_add: median sspctl user add→SSH {:.3}s, median raw incus launch→SSH {:.3}s, median ratio {:.3} (target ≤ 1.10, {ROUNDS} rounds)",
        median(ssp_t),
        median(raw_t),
        median(ratios)
    );
    Ok(())
}
