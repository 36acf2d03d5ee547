//! The agent enforces its own host policy on every spec, whoever sends it: specs
//! sent straight to a real agent (as a forged or buggy coordinator would) with the
//! host's root as a shared folder, the host's sshd port, a GPU it does not have or
//! one another container holds are refused with the reason, never stored, and
//! nothing is made on the daemon.

use anyhow::{ensure, Context, Result};
use ssp_integration::{AgentSpec, Host, Kind, Platform};
use ssp_proto::agent_client::AgentClient;
use ssp_proto::{InstanceSpec, SharedFolder};

#[test]
fn the_agent_refuses_specs_that_break_its_host_policy() -> Result<()> {
    let mut host = Host::start("ap", Kind::Incus, 83)?;
    let inv = host.fake_gpus(&[83])?;
    let p = Platform::start(
        "agent-policy",
        &[AgentSpec {
            gpu_inventory: Some(inv),
            ..AgentSpec::new(&host)
        }],
    )?;
    let addr = p.agent_addrs[0].clone();
    let specs_dir = p.scratch.path().join("agent-ap/specs");
    let gpu = "0000:6a:00.0".to_string(); // fake_gpus: bus 0x17 + minor 83
    let good = InstanceSpec {
        name: "okay".into(),
        owner: "okay".into(),
        owner_uid: 10000,
        image: "busybox".into(),
        cpus: 1,
        memory_bytes: 256 << 20,
        disk_bytes: 1 << 30,
        processes: 100,
        gpu_pci: vec![gpu.clone()],
        ssh_port: 22050,
        shares: vec![SharedFolder {
            host_path: p.shared_root.join("team").display().to_string(),
            container_path: "/shared".into(),
            mode: "rw".into(),
        }],
        running: true,
        uid_range: "10000-19999".into(),
        lab_gid: 19999,
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    // Sent as a coordinator would: with a valid coordinator certificate.
    let tls = p.coordinator_tls()?;
    let send = |spec: InstanceSpec| {
        rt.block_on(async {
            let ch = ssp_net::connect(&addr, &tls, ssp_net::AGENT_NAME).await?;
            let mut c = AgentClient::new(ch);
            anyhow::Ok(c.ensure_instance(spec).await)
        })
    };
    // A spec within the policy is taken.
    send(good.clone())?.context("a spec within the host's policy")?;
    ensure!(
        specs_dir.join("okay.spec").exists(),
        "okay's spec is stored"
    );

    let bad = |name: &str| InstanceSpec {
        name: name.into(),
        gpu_pci: vec![],
        ssh_port: 22051,
        ..good.clone()
    };
    // A link a member could have made in the shared folder, leading out of it.
    let escape = p.shared_root.join("team-escape");
    std::os::unix::fs::symlink("/etc", &escape)?;
    let cases = [
        (
            InstanceSpec {
                shares: vec![SharedFolder {
                    host_path: escape.join("ssp-made-this").display().to_string(),
                    container_path: "/x".into(),
                    mode: "rw".into(),
                }],
                ..bad("throughlink")
            },
            "leads out of them",
        ),
        (
            InstanceSpec {
                shares: vec![SharedFolder {
                    host_path: "/".into(),
                    container_path: "/host".into(),
                    mode: "rw".into(),
                }],
                ..bad("rootfs")
            },
            "not under this host's shared_roots",
        ),
        (
            InstanceSpec {
                ssh_port: 22,
                ..bad("lowport")
            },
            "outside this host's ssh_ports",
        ),
        (
            InstanceSpec {
                gpu_pci: vec!["0000:99:00.0".into()],
                ..bad("nogpu")
            },
            "not in this host's inventory",
        ),
        (
            InstanceSpec {
                gpu_pci: vec![gpu.clone()],
                ..bad("twice")
            },
            "is held by okay",
        ),
        (
            InstanceSpec {
                uid_range: "0-65535".into(),
                ..bad("uids")
            },
            "not this host's",
        ),
    ];
    let before = host.instance_names()?;
    let stat = |p: &str| -> Result<(u32, u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p)?;
        Ok((m.mode(), m.uid(), m.gid()))
    };
    let host_before = (stat("/")?, stat("/etc")?);
    for (spec, want) in cases {
        let name = spec.name.clone();
        let status = match send(spec)? {
            Ok(_) => anyhow::bail!("the agent took the spec of {name}; it should refuse: {want}"),
            Err(s) => s,
        };
        ensure!(
            status.code() == tonic::Code::InvalidArgument && status.message().contains(want),
            "{name}: expected a refusal naming {want:?}, got {status:?}"
        );
        ensure!(
            !specs_dir.join(format!("{name}.spec")).exists(),
            "the refused spec of {name} was stored"
        );
    }
    ensure!(
        (stat("/")?, stat("/etc")?) == host_before,
        "refused specs changed the owner or mode of / or /etc"
    );
    ensure!(
        !std::path::Path::new("/etc/ssp-made-this").exists(),
        "a share through a link made a folder outside the shared roots"
    );
    ensure!(
        host.instance_names()? == before,
        "refused specs made instances: {:?} (before: {before:?})",
        host.instance_names()?
    );
    Ok(())
}
