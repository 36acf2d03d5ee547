//! Nothing talks to ssp without a certificate the cluster CA issued, and a user acts
//! only on what is theirs: real TLS handshakes against a real coordinator and a
//! real agent (Incus in a network namespace), real sspctl with each person's
//! credential bundle, and the replicated audit log.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use ssp_integration::{ssh_keypair, wait_for, AgentSpec, Host, Kind, Platform, Proc};
use ssp_model::CertRole;
use ssp_net::{Bundle, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a TLS connection to `addr` (`http://IP:PORT`) trusting the cluster CA,
/// presenting `client` (or no certificate), sends the HTTP/2 preface and reads
/// the server's first bytes. Ok(n): the server accepted the client and spoke
/// HTTP/2; Err: the handshake (or the first read) failed, with why.
async fn probe(
    addr: &str,
    server_name: &'static str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> std::result::Result<usize, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).map_err(|e| e.to_string())?],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?,
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let hostport = addr.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(hostport)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let name = ServerName::try_from(server_name).map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // The client preface and an empty SETTINGS frame.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    tls.write_all(&hello)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed without a word".into()),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer in 5s".into()),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// sspctl as the holder of `bundle`.
fn ctl_as(p: &Platform, bundle: &Path, args: &[&str]) -> Output {
    let mut ssp = p.ssp.clone();
    ssp.bundle = Some(bundle.to_path_buf());
    ssp_integration::sspctl(&ssp, &p.addr, args)
}

#[test]
fn only_certificates_of_this_cluster_get_in_and_users_act_only_on_their_own() -> Result<()> {
    ssp_integration::preflight(Kind::Incus)?;
    let host = Host::start("tr", Kind::Incus, 85)?;
    let p = Platform::start("trust", &[AgentSpec::new(&host)])?;
    let dir = p.scratch.path().to_path_buf();
    let rt = tokio::runtime::Runtime::new()?;
    let coordinator = p.addr.clone();
    let agent = p.agent_addrs[0].clone();

    // The test holds the cluster CA's key (as a coordinator does), to make
    // certificates the platform never issued: expired ones, for instance.
    let node = Bundle::load(&dir.join("coordinator0/tls/node.bundle"))?;
    let ca = Ca::load(
        &node.ca_pem,
        &std::fs::read_to_string(dir.join("coordinator0/tls/ca.key"))?,
    )?;
    let admin = Bundle::load(p.ssp.bundle.as_ref().context("admin bundle")?)?;
    let ends = [
        (
            coordinator.as_str(),
            ssp_net::COORDINATOR_NAME,
            "coordinator",
        ),
        (agent.as_str(), ssp_net::AGENT_NAME, "agent"),
    ];
    let probe_all = |cert: Option<(&str, &str)>| -> Vec<std::result::Result<usize, String>> {
        ends.iter()
            .map(|(a, n, _)| rt.block_on(probe(a, n, &node.ca_pem, cert)))
            .collect()
    };

    // 1. The admin's certificate gets in (the control); no certificate, one from
    // another CA, an expired one and a revoked one are refused in the handshake,
    // on the coordinator's port and on the agent's.
    for (r, (_, _, what)) in probe_all(Some((&admin.cert_pem, &admin.key_pem)))
        .iter()
        .zip(&ends)
    {
        ensure!(r.is_ok(), "the admin's certificate at the {what}: {r:?}");
    }
    let other = Ca::generate("another cluster")?.issue(
        "root",
        CertRole::Admin,
        false,
        Duration::from_secs(3600),
    )?;
    let expired = ca.issue("late", CertRole::Admin, false, Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_secs(2));
    for (case, cert) in [
        ("no certificate", None),
        (
            "a certificate from another CA",
            Some((other.cert_pem.as_str(), other.key_pem.as_str())),
        ),
        (
            "an expired certificate",
            Some((expired.cert_pem.as_str(), expired.key_pem.as_str())),
        ),
    ] {
        for (r, (_, _, what)) in probe_all(cert).iter().zip(&ends) {
            ensure!(r.is_err(), "{case} got into the {what}: {r:?}");
        }
    }
    let carol = dir.join("carol.bundle");
    p.ctl_ok(&[
        "cert",
        "issue",
        "carol",
        "--out",
        carol.to_str().unwrap_or_default(),
    ])?;
    let carol_b = Bundle::load(&carol)?;
    for (r, (_, _, what)) in probe_all(Some((&carol_b.cert_pem, &carol_b.key_pem)))
        .iter()
        .zip(&ends)
    {
        ensure!(r.is_ok(), "carol's new certificate at the {what}: {r:?}");
    }
    p.ctl_ok(&["cert", "revoke", "carol"])?;
    for (addr, name, what) in &ends {
        wait_for(
            &format!("the {what} to refuse carol's revoked certificate"),
            Duration::from_secs(15),
            || {
                rt.block_on(probe(
                    addr,
                    name,
                    &node.ca_pem,
                    Some((&carol_b.cert_pem, &carol_b.key_pem)),
                ))
                .err()
            },
        )?;
    }
    let out = ctl_as(&p, &carol, &["gpus"]);
    ensure!(!out.status.success(), "sspctl with a revoked bundle worked");

    // 2. alice's credential cannot read bob's ssh-config, change bob's keys,
    // remove bob or give herself a GPU; each refusal is in the audit log.
    let key = ssh_keypair(&dir, "k")?;
    let pubkey = format!("{}.pub", key.display());
    let mut bundles = Vec::new();
    for who in ["alice", "bob"] {
        let b = dir.join(format!("{who}.bundle"));
        p.ctl_ok(&[
            "user",
            "add",
            who,
            "--ssh-key",
            &pubkey,
            "--image",
            "busybox",
            "--wait",
            "running",
            "--credentials-out",
            b.to_str().unwrap_or_default(),
        ])?;
        bundles.push(b);
    }
    let alice = &bundles[0];
    let ok = ctl_as(&p, alice, &["ssh-config", "alice"]);
    ensure!(
        ok.status.success(),
        "alice's own ssh-config: {}",
        stderr(&ok)
    );
    let ok = ctl_as(&p, alice, &["-o", "json", "gpus"]);
    ensure!(
        ok.status.success(),
        "alice reads GPU occupancy: {}",
        stderr(&ok)
    );
    let ls = ctl_as(&p, alice, &["-o", "json", "ls"]);
    let ls: serde_json::Value = serde_json::from_slice(&ls.stdout)?;
    let names: Vec<&str> = ls
        .as_array()
        .context("ls")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    ensure!(
        names == ["alice"],
        "alice sees only her container: {names:?}"
    );
    let before = p.ctl_ok(&["-o", "json", "user", "list"])?;
    for (what, args) in [
        ("read bob's ssh-config", vec!["ssh-config", "bob"]),
        (
            "change bob's keys",
            vec!["user", "keys", "bob", "--ssh-key", &pubkey],
        ),
        ("remove bob", vec!["user", "remove", "bob"]),
        (
            "give herself a GPU",
            vec![
                "user",
                "add",
                "alice2",
                "--ssh-key",
                &pubkey,
                "--gpus",
                "1",
                "--wait",
                "none",
            ],
        ),
    ] {
        let out = ctl_as(&p, alice, &args);
        let err = stderr(&out);
        ensure!(
            !out.status.success() && err.contains("user:alice may not"),
            "alice could {what}: {err}"
        );
    }
    ensure!(
        p.ctl_ok(&["-o", "json", "user", "list"])? == before,
        "alice's refused requests changed the users"
    );
    let audit = p.ctl_json(&["audit", "--user", "alice"])?;
    let denied: Vec<String> = audit
        .as_array()
        .context("audit")?
        .iter()
        .filter(|e| {
            e["actor"] == "user:alice"
                && e["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("permission denied"))
        })
        .map(|e| {
            format!(
                "{} {}",
                e["action"].as_str().unwrap_or(""),
                e["target"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "ssh-config bob",
        "set-ssh-keys bob",
        "remove-user bob",
        "add-user alice2",
    ] {
        ensure!(
            denied.iter().any(|d| d == want),
            "the audit log lacks alice's refused {want:?}: {audit}"
        );
    }
    // The admin's own acts are there too, with the certificate that made them.
    let all = p.ctl_json(&["audit"])?;
    let admin_serial = admin.identity()?.serial;
    ensure!(
        all.as_array()
            .context("audit")?
            .iter()
            .any(|e| e["actor"] == "admin:root"
                && e["action"] == "add-user"
                && e["target"] == "bob"
                && e["outcome"] == "ok"
                && e["serial"] == admin_serial.as_str()),
        "the audit log lacks the admin adding bob: {all}"
    );

    // 3. A join token works once, and not after its TTL.
    let t1 = dir.join("t1");
    p.ctl_ok(&[
        "token",
        "create",
        "--role",
        "agent",
        "--out",
        t1.to_str().unwrap_or_default(),
    ])?;
    let t1b = Bundle::load(&t1)?;
    let got = rt.block_on(ssp_net::join::enroll(
        &t1b,
        "tr-extra",
        std::slice::from_ref(&coordinator),
    ))?;
    ensure!(
        got.role == "agent" && got.name == "tr-extra",
        "enrolled as {got:?}"
    );
    let again = rt.block_on(ssp_net::join::enroll(
        &t1b,
        "tr-extra",
        std::slice::from_ref(&coordinator),
    ));
    let e = format!("{:#}", again.err().context("a token worked twice")?);
    ensure!(e.contains("used already"), "second use refused with: {e}");
    let t2 = dir.join("t2");
    p.ctl_ok(&[
        "token",
        "create",
        "--role",
        "agent",
        "--ttl",
        "2s",
        "--out",
        t2.to_str().unwrap_or_default(),
    ])?;
    std::thread::sleep(Duration::from_secs(3));
    let late = rt.block_on(ssp_net::join::enroll(
        &Bundle::load(&t2)?,
        "tr-late",
        std::slice::from_ref(&coordinator),
    ));
    ensure!(late.is_err(), "an expired token worked");

    // A coordinator without a token does not start; one that formed its own CA
    // (another cluster) cannot join this one, vote in it or receive its state.
    let port = ssp_integration::free_port();
    let lone = dir.join("lone.toml");
    std::fs::write(
        &lone,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n",
            dir.join("lone").display()
        ),
    )?;
    let out = std::process::Command::new(p.ssp.bin("ssp-coordinator"))
        .args(["--config", lone.to_str().unwrap_or_default()])
        .output()?;
    ensure!(
        !out.status.success() && stderr(&out).contains("--token"),
        "a coordinator without a token: {}",
        stderr(&out)
    );
    let rogue_cfg = dir.join("rogue.toml");
    std::fs::write(
        &rogue_cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nbootstrap = true\n",
            dir.join("rogue").display()
        ),
    )?;
    let _rogue = Proc::start(
        "rogue coordinator",
        None,
        &[
            p.ssp.bin("ssp-coordinator").to_str().unwrap_or_default(),
            "--config",
            rogue_cfg.to_str().unwrap_or_default(),
        ],
        &dir.join("rogue.log"),
    )?;
    wait_for(
        "the rogue coordinator's CA",
        Duration::from_secs(20),
        || dir.join("rogue/tls/admin.bundle").exists().then_some(()),
    )?;
    let out = p.ctl(&["cluster", "join", &format!("http://127.0.0.1:{port}")]);
    ensure!(!out.status.success(), "a coordinator of another CA joined");
    let st = p.ctl_json(&["cluster", "status"])?;
    ensure!(
        st["members"].as_array().map(Vec::len) == Some(1),
        "membership changed: {st}"
    );

    // Roles at the RPC: an admin may not drive an agent or send raft messages; an
    // agent registers only its own host; bad registration values are refused.
    let admin_tls = admin.tls()?;
    let agent_tls = {
        let i = ca.issue("tr", CertRole::Agent, false, Duration::from_secs(600))?;
        Bundle {
            coordinators: vec![],
            cert_pem: i.cert_pem,
            key_pem: i.key_pem,
            ca_pem: node.ca_pem.clone(),
        }
        .tls()?
    };
    rt.block_on(async {
        let ch = ssp_net::connect(&agent, &admin_tls, ssp_net::AGENT_NAME).await?;
        let r = ssp_proto::agent_client::AgentClient::new(ch)
            .list_instances(ssp_proto::ListInstancesRequest {
                managed_only: true,
                with_usage: false,
                name: String::new(),
            })
            .await;
        ensure!(
            r.as_ref().err().map(|s| s.code()) == Some(tonic::Code::PermissionDenied),
            "an admin drove the agent: {r:?}"
        );
        let ch = ssp_net::connect(&coordinator, &admin_tls, ssp_net::COORDINATOR_NAME).await?;
        let r = ssp_proto::raft_client::RaftClient::new(ch)
            .vote(ssp_proto::RaftMessage {
                target: 1,
                payload: b"{}".to_vec(),
            })
            .await;
        ensure!(
            r.as_ref().err().map(|s| s.code()) == Some(tonic::Code::PermissionDenied),
            "an admin sent a raft vote: {r:?}"
        );
        let ch = ssp_net::connect(&coordinator, &agent_tls, ssp_net::COORDINATOR_NAME).await?;
        let mut c = ssp_proto::coordinator_client::CoordinatorClient::new(ch);
        let other = ssp_proto::RegisterHostRequest {
            name: "not-tr".into(),
            agent_address: "http://10.9.9.9:7401".into(),
            ssh_host: "10.9.9.9".into(),
            ssh_port_first: 22000,
            ssh_port_last: 22099,
            ..Default::default()
        };
        let r = c.register_host(other.clone()).await;
        ensure!(
            r.as_ref().err().map(|s| s.code()) == Some(tonic::Code::PermissionDenied),
            "agent tr registered another host: {r:?}"
        );
        let ch = ssp_net::connect(&coordinator, &admin_tls, ssp_net::COORDINATOR_NAME).await?;
        let mut c = ssp_proto::coordinator_client::CoordinatorClient::new(ch);
        for bad in ["10.9.9.9\n  ProxyCommand touch /tmp/pwned", "10.9.9.9 x"] {
            let r = c
                .register_host(ssp_proto::RegisterHostRequest {
                    ssh_host: bad.into(),
                    ..other.clone()
                })
                .await;
            ensure!(
                r.as_ref().err().map(|s| s.code()) == Some(tonic::Code::InvalidArgument),
                "ssh_host {bad:?} was taken: {r:?}"
            );
        }
        anyhow::Ok(())
    })?;
    let hosts = p.ctl_json(&["hosts"])?;
    if hosts
        .as_array()
        .is_some_and(|h| h.iter().any(|x| x["name"] == "not-tr"))
    {
        bail!("a refused registration left a host behind: {hosts}");
    }
    Ok(())
}
