//! Three hosts with 4, 4 and 8 GPUs (static inventories, real Incus daemons, each
//! host in its own network namespace): a scripted sequence of user additions lands
//! exactly where the pack policy says, `--spread` and `--host` do what they say,
//! and a request that fits nowhere is refused with every host's reason.

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, AgentSpec, Host, Kind, Platform};

#[test]
fn placement_follows_the_pack_policy_across_three_hosts() -> Result<()> {
    let mut pa = Host::start("pa", Kind::Incus, 61)?;
    let mut pb = Host::start("pb", Kind::Incus, 62)?;
    let mut pc = Host::start("pc", Kind::Incus, 63)?;
    let inv_a = pa.fake_gpus(&[0, 1, 2, 3])?;
    let inv_b = pb.fake_gpus(&[0, 1, 2, 3])?;
    let inv_c = pc.fake_gpus(&[0, 1, 2, 3, 4, 5, 6, 7])?;
    let p = Platform::start(
        "placement",
        &[
            AgentSpec {
                gpu_inventory: Some(inv_a),
                ..AgentSpec::new(&pa)
            },
            AgentSpec {
                gpu_inventory: Some(inv_b),
                labels: &["ib"],
                ..AgentSpec::new(&pb)
            },
            AgentSpec {
                gpu_inventory: Some(inv_c),
                ..AgentSpec::new(&pc)
            },
        ],
    )?;
    let key = ssh_keypair(p.scratch.path(), "k")?;
    let pubkey = format!("{}.pub", key.display());
    let add = |name: &str, extra: &[&str]| -> Result<()> {
        let mut args = vec![
            "user",
            "add",
            name,
            "--ssh-key",
            &pubkey,
            "--image",
            "busybox",
            "--wait",
            "running",
        ];
        args.extend_from_slice(extra);
        p.ctl_ok(&args).map(|_| ())
    };
    // (user, GPUs, extra flags, expected host): pack fills the fullest host that fits;
    // ties go to the first host by name.
    let script: &[(&str, &str, &[&str], &str)] = &[
        ("u1", "2", &[], "pa"),
        ("u2", "2", &[], "pa"),
        ("u3", "4", &[], "pb"),
        ("u4", "1", &[], "pc"),
        ("u5", "2", &["--spread"], "pc"),
        ("u6", "0", &["--host", "pb"], "pb"),
        // pa is full, so pack would take it for a container without GPUs; only pb has ib.
        ("u6l", "0", &["--label", "ib"], "pb"),
    ];
    for (user, gpus, extra, _) in script {
        let mut flags = vec!["--gpus", gpus];
        flags.extend_from_slice(extra);
        add(user, &flags)?;
    }
    let ls = p.ctl_json(&["ls"])?;
    for (user, gpus, _, want) in script {
        let row = ls
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == *user))
            .with_context(|| format!("{user} missing from ls: {ls}"))?;
        ensure!(row["host"] == *want, "{user} should be on {want}: {row}");
        let n = row["gpus"].as_array().map(|g| g.len()).unwrap_or(0);
        ensure!(
            n.to_string() == *gpus,
            "{user} should hold {gpus} GPUs: {row}"
        );
        let host = [&pa, &pb, &pc]
            .into_iter()
            .find(|h| h.name == *want)
            .context("host")?;
        ensure!(
            host.instance_names()?.contains(&user.to_string()),
            "{user}'s container should exist on {want}'s daemon"
        );
    }
    // 7 GPUs are free (all on pc): 8 fit nowhere, and the refusal says why per host.
    let before = p.ls_placed()?;
    let err = p.ctl_err(&["user", "add", "u7", "--ssh-key", &pubkey, "--gpus", "8"])?;
    ensure!(
        err.contains("8 GPUs asked but only 5 free")
            && err.contains("pa: 0 free GPUs of 8 asked")
            && err.contains("pb: 0 free GPUs of 8 asked")
            && err.contains("pc: 5 free GPUs of 8 asked"),
        "{err}"
    );
    let err = p.ctl_err(&[
        "user",
        "add",
        "u8",
        "--ssh-key",
        &pubkey,
        "--gpus",
        "1",
        "--host",
        "pa",
    ])?;
    ensure!(err.contains("pa: 0 free GPUs of 1 asked"), "{err}");
    let err = p.ctl_err(&[
        "user",
        "add",
        "u9",
        "--ssh-key",
        &pubkey,
        "--label",
        "nvlink",
    ])?;
    ensure!(
        err.contains("pa: no label nvlink") && err.contains("pb: no label nvlink"),
        "{err}"
    );
    ensure!(p.ls_placed()? == before, "refusals changed nothing");
    let hosts = p.ctl_json(&["hosts"])?;
    for h in hosts.as_array().context("hosts")? {
        ensure!(
            h["status"] == "ready" && h["driver_version"] == "550.54.15",
            "{h}"
        );
        let labels = if h["name"] == "pb" {
            serde_json::json!(["ib"])
        } else {
            serde_json::json!([])
        };
        ensure!(h["labels"] == labels, "{h}");
    }
    Ok(())
}
