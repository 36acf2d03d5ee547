//! `sspctl host evacuate`: the host is drained and every container on it moves
//! to where placement says (pack: the fullest host that fits first), with its
//! GPU count; the host ends empty and draining, and each container's files and
//! GPUs are where its record says.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use ssp_integration::{ssh_keypair, AgentSpec, Host, Kind, Platform};

#[test]
fn an_evacuated_host_ends_empty_and_draining() -> Result<()> {
    let mut h1 = Host::start("ev1", Kind::Incus, 109)?;
    let mut h2 = Host::start("ev2", Kind::Incus, 110)?;
    let mut h3 = Host::start("ev3", Kind::Incus, 111)?;
    let inv1 = h1.fake_gpus(&[64, 65, 66, 67, 68])?;
    let inv2 = h2.fake_gpus(&[70, 71])?;
    let inv3 = h3.fake_gpus(&[72, 73, 74, 75])?;
    let p = Platform::start(
        "evacuate",
        &[
            AgentSpec {
                gpu_inventory: Some(inv1),
                ..AgentSpec::new(&h1)
            },
            AgentSpec {
                gpu_inventory: Some(inv2),
                ..AgentSpec::new(&h2)
            },
            AgentSpec {
                gpu_inventory: Some(inv3),
                ..AgentSpec::new(&h3)
            },
        ],
    )?;
    let key = ssh_keypair(p.scratch.path(), "lab")?;
    let pubkey = format!("{}.pub", key.display());
    let users = ["ann", "bob", "cat", "dan", "eve"];
    for u in users {
        p.ctl_ok(&[
            "user",
            "add",
            u,
            "--ssh-key",
            &pubkey,
            "--gpus",
            "1",
            "--host",
            "ev1",
            "--image",
            "busybox",
            "--wait",
            "running",
        ])?;
        h1.exec(u, &format!("echo {u} > /root/mine"))?;
    }
    let out = p.ctl_json(&["host", "evacuate", "ev1"])?;
    println!("{out:#}");
    let moves = out.as_array().context("a list of moves")?;
    ensure!(moves.len() == 5, "{out}");
    let mut to: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in moves {
        ensure!(m["phase"] == "done", "{m}");
        ensure!(m["from"]["host"] == "ev1", "{m}");
        to.entry(m["to"]["host"].as_str().unwrap_or("?").to_string())
            .or_default()
            .push(m["instance"].as_str().unwrap_or("?").to_string());
        println!(
            "{} → {}: down {} ms",
            m["instance"], m["to"]["host"], m["downtime_ms"]
        );
    }
    // Pack: the fullest host that fits takes containers first (ev2 has 2 GPUs, ev3 4).
    ensure!(to.get("ev2").map(Vec::len) == Some(2), "{to:?}");
    ensure!(to.get("ev3").map(Vec::len) == Some(3), "{to:?}");
    // ev1 is empty and draining; each container runs where its record says, with
    // its files and one GPU there.
    ensure!(
        h1.instance_names()?.is_empty(),
        "{:?}",
        h1.instance_names()?
    );
    let hosts = p.ctl_json(&["hosts"])?;
    let ev1 = hosts
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["name"] == "ev1")
        .context("ev1 listed")?;
    ensure!(
        ev1["status"] == "draining" && ev1["instances"] == 0,
        "{ev1}"
    );
    ensure!(ev1["gpus_free"] == 5, "{ev1}");
    let gpus = p.ctl_json(&["gpus"])?;
    for (host, names) in &to {
        let h = if host == "ev2" { &h2 } else { &h3 };
        for n in names {
            ensure!(
                h.exec(n, "cat /root/mine")?.trim() == n,
                "{n}'s files on {host}"
            );
            let held: Vec<_> = gpus
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["holder"] == n.as_str())
                .collect();
            ensure!(
                held.len() == 1 && held[0]["host"] == host.as_str(),
                "{n} holds one GPU on {host}: {held:?}"
            );
        }
    }
    let ls = p.ctl_json(&["ls"])?;
    for i in ls.as_array().into_iter().flatten() {
        ensure!(i["state"] == "Running" && i["host"] != "ev1", "{i}");
    }
    // Evacuating again has nothing to move.
    let again = p.ctl_json(&["host", "evacuate", "ev1"])?;
    ensure!(again.as_array().is_some_and(|a| a.is_empty()), "{again}");
    Ok(())
}
