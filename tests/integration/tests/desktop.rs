//! A remote desktop (`sspctl user add --desktop`): the container runs the desktop
//! image (xrdp with Xfce, built offline by `SSP_DESKTOP_IMAGE=1
//! scripts/build-images.sh`), its RDP port is forwarded from the host like SSH,
//! and the real RDP client (FreeRDP's xfreerdp, on an Xvfb screen) logs in through
//! that port and gets an Xfce session. A screenshot of it is kept in
//! `target/test-logs/desktop.png`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ssp_integration::{
    image_cache, run, ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform, Proc,
};

/// Where the screenshot is kept (beside the test logs).
fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-logs")
        .join("desktop.png")
}

#[test]
fn an_rdp_client_gets_an_xfce_session_through_the_forwarded_port() -> Result<()> {
    let image = image_cache().join("debian-desktop.tar.gz");
    ensure!(
        image.exists(),
        "{} is missing: build it with `SSP_DESKTOP_IMAGE=1 scripts/build-images.sh` (scripts/prepare-host.sh --test does)",
        image.display()
    );
    for tool in ["Xvfb", "xfreerdp", "import", "identify"] {
        ensure!(
            run(Command::new("sh").arg("-c").arg(format!("command -v {tool}"))).is_ok(),
            "{tool} is missing: install the test packages with `scripts/install-deps.sh --test` (xvfb, freerdp2-x11, imagemagick)"
        );
    }
    let h = Host::start("desk1", Kind::Incus, 132)?;
    h.cli_run(&[
        "image",
        "import",
        image.to_str().unwrap_or_default(),
        "--alias",
        "debian-desktop",
    ])?;
    let p = Platform::start("desktop", &[AgentSpec::new(&h)])?;
    let dir = p.scratch.path().to_path_buf();
    let key = ssh_keypair(&dir, "gdw")?;
    let pubkey = format!("{}.pub", key.display());

    // An account in a Common-Server has its server's desktop, not one of its own.
    let err = p.ctl_err(&[
        "user",
        "add",
        "ann",
        "--ssh-key",
        &pubkey,
        "--common",
        "lab",
        "--desktop",
    ])?;
    ensure!(err.contains("--desktop"), "{err}");

    p.ctl_ok(&[
        "user",
        "add",
        "gdw",
        "--ssh-key",
        &pubkey,
        "--desktop",
        "--memory",
        "2GiB",
    ])?;
    let ls = p.ctl_json(&["ls"])?;
    println!("sspctl ls: {ls}");
    let row = &ls[0];
    ensure!(
        row["desktop"] == true && row["image"] == "debian-desktop",
        "{row}"
    );
    let rdp_host = row["rdp_host"].as_str().context("rdp_host")?.to_string();
    let rdp_port = row["rdp_port"].as_u64().context("rdp_port")?;
    ensure!(rdp_host == h.addr && rdp_port == 23000, "{row}");
    let config = p.ctl_ok(&["ssh-config", "gdw"])?;
    ensure!(
        config.contains(&format!(
            "# Remote desktop (RDP) of ssp-gdw: {rdp_host}:{rdp_port}"
        )),
        "{config}"
    );
    // RDP logs in with a password (xrdp asks PAM): the user sets one over SSH.
    let ssh = p.ssh_login("gdw", &key)?;
    ssh.run("echo 'gdw:Desk-top-2026' | sudo chpasswd")?;

    // The RDP client on a virtual screen of its own.
    let display = ":77";
    let _ = std::fs::remove_file("/tmp/.X77-lock");
    let _ = std::fs::remove_file("/tmp/.X11-unix/X77");
    let _xvfb = Proc::start(
        "Xvfb",
        None,
        &[
            "Xvfb",
            display,
            "-screen",
            "0",
            "1280x800x24",
            "-nolisten",
            "tcp",
        ],
        &dir.join("xvfb.log"),
    )?;
    wait_for("the Xvfb screen", Duration::from_secs(20), || {
        Path::new("/tmp/.X11-unix/X77").exists().then_some(())
    })?;
    // xrdp starts beside sshd at the first boot (after making its keys) and
    // forks into the background; the client connects once the daemon listens.
    wait_for("xrdp inside", Duration::from_secs(60), || {
        ssh.run("sudo grep -q 'starting xrdp with pid' /var/log/xrdp.log && echo up")
            .ok()
            .filter(|s| s.trim() == "up")
    })?;
    let target = format!("/v:{rdp_host}:{rdp_port}");
    let mut rdp = Proc::start(
        "xfreerdp",
        None,
        &[
            "env",
            &format!("DISPLAY={display}"),
            "xfreerdp",
            &target,
            "/u:gdw",
            "/p:Desk-top-2026",
            "/cert:ignore",
            "/size:1280x800",
            "-wallpaper",
        ],
        &dir.join("xfreerdp.log"),
    )?;
    // The session runs in the container: Xfce's session manager as gdw. A client
    // that got no session within 30 s is started again (it gives up on a refused
    // connection).
    let mut started = std::time::Instant::now();
    let session = wait_for("gdw's Xfce session", Duration::from_secs(150), || {
        if started.elapsed() > Duration::from_secs(30) {
            println!("no session yet; the RDP client again");
            rdp.restart().ok()?;
            started = std::time::Instant::now();
        }
        ssh.run("pgrep -u gdw -a xfce4-session || pgrep -u gdw -a xfwm4")
            .ok()
            .filter(|s| !s.trim().is_empty())
    })?;
    println!("in the container: {}", session.trim());
    // Its panel and desktop drawn, then the screenshot.
    wait_for("Xfce's panel", Duration::from_secs(60), || {
        ssh.run("pgrep -u gdw -a xfce4-panel")
            .ok()
            .filter(|s| !s.trim().is_empty())
    })?;
    std::thread::sleep(Duration::from_secs(5));
    let shot = screenshot_path();
    std::fs::create_dir_all(shot.parent().context("test-logs dir")?)?;
    run(Command::new("import")
        .args(["-display", display, "-window", "root"])
        .arg(&shot))?;
    let colors = run(Command::new("identify").args(["-format", "%k"]).arg(&shot))?;
    println!("screenshot {} ({} colours)", shot.display(), colors.trim());
    ensure!(
        colors.trim().parse::<u32>().unwrap_or(0) > 16,
        "the screen shows more than a blank frame: {} colours in {} (see {})",
        colors.trim(),
        shot.display(),
        dir.join("xfreerdp.log").display()
    );
    Ok(())
}
