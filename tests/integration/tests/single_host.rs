//! One host, end to end, on a real Incus daemon: user add → coordinator → agent →
//! a running container with its GPUs, limits and shared folder, reached over real SSH.

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, AgentSpec, Host, Kind, Platform};

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn single_host_end_to_end() -> Result<()> {
    let mut host = Host::start("one", Kind::Incus, 11)?;
    let inv = host.fake_gpus(&[0, 1, 2, 3])?;
    let mut p = Platform::start(
        "single",
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

    // 1. alice gets two GPUs: exactly two nodes inside, numbered 0 and 1, the ones `gpus` says she holds.
    p.ctl_ok(&[
        "user",
        "add",
        "alice",
        "--ssh-key",
        &alice_pub,
        "--gpus",
        "2",
        "--cpus",
        "2",
        "--memory",
        "1536MiB",
    ])?;
    let gpus = p.ctl_json(&["gpus"])?;
    let held: Vec<u64> = gpus
        .as_array()
        .context("gpus is a list")?
        .iter()
        .filter(|g| g["holder"] == "alice")
        .map(|g| g["minor"].as_u64().unwrap_or(999))
        .collect();
    ensure!(
        held.len() == 2,
        "alice should hold 2 GPUs, sspctl gpus says {held:?}"
    );
    let inside = host.exec("alice", "ls /dev | grep -E '^nvidia[0-9]+$' | sort")?;
    ensure!(
        inside.split_whitespace().collect::<Vec<_>>() == ["nvidia0", "nvidia1"],
        "GPU nodes inside alice: {inside:?}"
    );
    for (i, minor) in held.iter().enumerate() {
        let rdev = host.exec("alice", &format!("stat -c '%t:%T' /dev/nvidia{i}"))?;
        ensure!(
            rdev.trim() == format!("c3:{minor:x}"),
            "/dev/nvidia{i} inside is {rdev:?}, expected host minor {minor}"
        );
    }

    // A request for 3 GPUs is refused with the number free, and nothing is created.
    let state_before = p.ctl_json(&["user", "list"])?;
    let daemon_before = host.instance_names()?;
    let out = p.ctl(&["user", "add", "carol", "--ssh-key", &bob_pub, "--gpus", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "3 GPUs should be refused");
    ensure!(
        err.contains("only 2 free"),
        "refusal should say how many are free: {err}"
    );
    ensure!(err.lines().count() == 1, "one-line error expected: {err}");
    ensure!(
        p.ctl_json(&["user", "list"])? == state_before,
        "state changed after refusal"
    );
    ensure!(
        host.instance_names()? == daemon_before,
        "daemon instances changed after refusal"
    );

    // 2. alice logs in with only what `ssh-config` printed; CPU count and memory match the request.
    // SSH reaches her container by NAT to its static bridge address: no forwarding process.
    let nat = host.cli_run(&["config", "device", "get", "alice", "ssp-ssh", "nat"])?;
    let addr = host.cli_run(&["config", "device", "get", "alice", "eth0", "ipv4.address"])?;
    ensure!(
        nat.trim() == "true" && addr.trim().starts_with("10.232.11."),
        "alice's SSH forward should be NAT to a static bridge address; nat={nat:?} ipv4.address={addr:?}"
    );
    let client = p.ssh_login("alice", &alice_key)?;
    let ssh = |cmd: &str| client.run(cmd);
    let nproc = ssh("nproc")?;
    ensure!(
        nproc.trim() == "2",
        "nproc inside is {nproc:?}, asked for 2"
    );
    let mem_kib: u64 = ssh("awk '/MemTotal/ {print $2}' /proc/meminfo")?
        .trim()
        .parse()?;
    ensure!(
        mem_kib == 1536 * 1024,
        "MemTotal inside is {mem_kib} KiB, asked for 1536MiB"
    );

    // 3. A file alice makes in the shared folder belongs to her host uid; bob's
    // container does not map her uid, so there it is nobody's (65534).
    p.ctl_ok(&["user", "add", "bob", "--ssh-key", &bob_pub])?;
    let users = p.ctl_json(&["user", "list"])?;
    let alice_uid = users
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == "alice"))
        .and_then(|u| u["uid"].as_u64())
        .context("alice's uid")?;
    ssh("echo hello > /shared/from-alice")?;
    let host_file = p.shared_root.join("team/from-alice");
    let meta = std::fs::metadata(&host_file)
        .with_context(|| format!("{} on the host", host_file.display()))?;
    use std::os::unix::fs::MetadataExt;
    ensure!(
        meta.uid() as u64 == alice_uid,
        "host owner uid {} != alice's uid {alice_uid}",
        meta.uid()
    );
    let in_bob = host.exec("bob", "stat -c '%u' /shared/from-alice")?;
    ensure!(
        in_bob.trim() == "65534",
        "bob sees owner {in_bob:?}, expected the overflow uid 65534 (alice's {alice_uid} is not mapped in his container)"
    );

    // 4. Restart coordinator and agent: same state, no container recreated.
    let ls_before = p.ls_placed()?;
    let uuids: Vec<(String, String)> = names(&ls_before)
        .into_iter()
        .map(|n| (host.uuid(&n).unwrap_or_default(), n))
        .collect();
    p.coordinator.restart()?;
    p.agents[0].restart()?;
    p.wait_registered("one")?;
    let ls_after = ssp_integration::wait_for(
        "ls after restart",
        std::time::Duration::from_secs(30),
        || {
            let v = p.ls_placed().ok()?;
            v.as_array()?
                .iter()
                .all(|i| i["state"] == "Running")
                .then_some(v)
        },
    )?;
    ensure!(
        ls_after == ls_before,
        "ls changed across restart:\n{ls_before}\n{ls_after}"
    );
    for (uuid, n) in uuids {
        ensure!(host.uuid(&n)? == uuid, "{n} was recreated");
    }

    // 5. Each rejected input leaves ssp's state and the daemon's instances as they were.
    let state_before = (p.ctl_json(&["user", "list"])?, p.ls_placed()?);
    let daemon_before = host.instance_names()?;
    let bad_key = dir.join("bad.pub");
    std::fs::write(&bad_key, "ssh-ed25519 not-base64!!\n")?;
    let outside = "/etc:/x".to_string();
    let dotdot = format!("{}/../../etc:/x", p.shared_root.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["user", "add", "Bad_Name", "--ssh-key", &bob_pub],
            "invalid user name",
        ),
        (
            vec!["user", "add", "alice", "--ssh-key", &bob_pub],
            "already exists",
        ),
        (
            vec!["user", "add", "dave", "--ssh-key", &bob_pub, "--gpus", "3"],
            "only 2 free",
        ),
        (
            vec![
                "user",
                "add",
                "dave",
                "--ssh-key",
                &bob_pub,
                "--share",
                &outside,
            ],
            "configured roots",
        ),
        (
            vec![
                "user",
                "add",
                "dave",
                "--ssh-key",
                &bob_pub,
                "--share",
                &dotdot,
            ],
            "'..'",
        ),
        (
            vec![
                "user",
                "add",
                "dave",
                "--ssh-key",
                bad_key.to_str().unwrap_or_default(),
            ],
            "invalid ssh key",
        ),
        (
            vec![
                "user",
                "add",
                "dave",
                "--ssh-key",
                &bob_pub,
                "--cpus",
                "4096",
            ],
            "CPUs asked",
        ),
        (
            vec![
                "user",
                "add",
                "dave",
                "--ssh-key",
                &bob_pub,
                "--memory",
                "64TiB",
            ],
            "memory asked",
        ),
    ];
    for (args, want) in cases {
        let out = p.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        ensure!(!out.status.success(), "{args:?} should fail");
        ensure!(
            err.contains(want),
            "{args:?}: error {err:?} should mention {want:?}"
        );
        ensure!(
            err.trim().lines().count() == 1,
            "{args:?}: not one line: {err:?}"
        );
        ensure!(
            (p.ctl_json(&["user", "list"])?, p.ls_placed()?) == state_before,
            "{args:?} changed ssp's state"
        );
        ensure!(
            host.instance_names()? == daemon_before,
            "{args:?} changed the daemon's instances"
        );
    }

    // A reader that goes away early (`sspctl gpus | head`) ends sspctl quietly.
    let sspctl = p.ssp.bin("sspctl");
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; \"$0\" --coordinator \"$1\" gpus | true",
        ])
        .arg(&sspctl)
        .arg(&p.addr)
        .env("SSP_BUNDLE", p.ssp.bundle.as_ref().context("admin bundle")?)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !err.contains("panicked"),
        "sspctl gpus | true: {:?} {err}",
        out.status
    );

    // Replacing bob's keys: the new key logs in and the old one no longer does; bad
    // input is refused by name and changes nothing.
    let bob_old = p.ssh_login("bob", &bob_key)?;
    let old_config = dir.join("ssh_config-bob-old");
    std::fs::copy(&bob_old.config, &old_config)?;
    let bob_old = ssp_integration::SshClient {
        config: old_config,
        alias: bob_old.alias,
    };
    let bob_key2 = ssh_keypair(&dir, "bob2")?;
    let bob_pub2 = format!("{}.pub", bob_key2.display());
    let err = p.ctl_err(&["user", "keys", "carol", "--ssh-key", &bob_pub2])?;
    ensure!(err.contains("user carol does not exist"), "{err}");
    let empty = dir.join("empty.pub");
    std::fs::write(&empty, "# no key here\n")?;
    let err = p.ctl_err(&["user", "keys", "bob", "--ssh-key", empty.to_str().unwrap()])?;
    ensure!(err.contains("give at least one public key"), "{err}");
    bob_old
        .run("true")
        .context("bob's key stopped working after refused changes")?;
    let set = p.ctl_json(&["user", "keys", "bob", "--ssh-key", &bob_pub2])?;
    ensure!(
        set["instances"] == serde_json::json!(["bob"]) && set["warning"] == "",
        "user keys printed {set}"
    );
    ensure!(
        bob_old.run("true").is_err(),
        "bob's replaced key still logs in"
    );
    p.ssh_login("bob", &bob_key2)?;

    // Removing a user deletes the container and frees the GPUs.
    p.ctl_ok(&["user", "remove", "alice"])?;
    ensure!(
        !host.instance_names()?.contains(&"alice".to_string()),
        "alice's container still exists"
    );
    let free = p
        .ctl_json(&["gpus"])?
        .as_array()
        .map(|a| a.iter().filter(|g| g["holder"].is_null()).count());
    ensure!(
        free == Some(4),
        "all 4 GPUs should be free again, got {free:?}"
    );
    drop(p);
    drop(host);
    Ok(())
}
