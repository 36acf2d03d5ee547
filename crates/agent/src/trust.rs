//! The agent's certificate: loaded from `state_dir/tls/node.bundle`, or got once
//! with a join token; renewed before it ends; and the revoked serials the
//! coordinators hand out with every heartbeat, kept across restarts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ssp_net::{Bundle, Tls};

use crate::config::AgentConfig;

fn dir(cfg: &AgentConfig) -> PathBuf {
    cfg.state_dir.join("tls")
}

/// This agent's trust: its certificate, or one got with the join token.
pub async fn establish(cfg: &AgentConfig) -> anyhow::Result<Tls> {
    let node = dir(cfg).join("node.bundle");
    let bundle = if node.exists() {
        Bundle::load(&node)?
    } else {
        let token = cfg.token_file.as_ref().with_context(|| {
            format!(
                "no certificate in {}: start the agent with `--token FILE` (from `sspctl token create --role agent` on the cluster) or set token_file",
                dir(cfg).display()
            )
        })?;
        let t = Bundle::load(token)?;
        let creds = ssp_net::join::enroll(&t, &cfg.name, &cfg.coordinators)
            .await
            .with_context(|| format!("joining with the token {}", token.display()))?;
        let b = ssp_net::join::bundle_of(&creds);
        b.save(&node)?;
        tracing::info!(name = %cfg.name, serial = %creds.serial, "got a certificate with the join token");
        b
    };
    let tls = bundle.tls()?;
    if tls.identity().role != ssp_model::CertRole::Agent || tls.identity().token {
        anyhow::bail!(
            "{} holds a certificate of {}, not of an agent",
            node.display(),
            tls.identity().label()
        );
    }
    if let Ok(text) = std::fs::read_to_string(dir(cfg).join("revoked")) {
        tls.set_revoked(text.lines().map(str::to_string));
    }
    Ok(tls)
}

/// Keeps the revoked serials for the next start.
pub fn save_revoked(cfg: &AgentConfig, serials: &[String]) {
    let path = dir(cfg).join("revoked");
    if let Err(e) = ssp_net::ca::write_private(&path, &serials.join("\n")) {
        tracing::warn!("saving the revoked serials: {e}");
    }
}

/// Renews the certificate when two thirds of its life are gone.
pub async fn renew_loop(cfg: AgentConfig, tls: Tls) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let id = tls.identity();
        if !ssp_net::join::due(&id) {
            continue;
        }
        match ssp_net::join::renew(&tls, &cfg.coordinators).await {
            Ok(c) => {
                let b = ssp_net::join::bundle_of(&c);
                let saved = b
                    .save(&dir(&cfg).join("node.bundle"))
                    .map_err(anyhow::Error::from)
                    .and_then(|_| Ok(tls.replace_own(&b.cert_pem, &b.key_pem)?));
                match saved {
                    Ok(()) => {
                        tracing::info!(old = %id.serial, new = %c.serial, "certificate renewed")
                    }
                    Err(e) => tracing::warn!("renewed certificate not taken: {e:#}"),
                }
            }
            Err(e) => tracing::warn!("renewing the certificate failed: {e:#}"),
        }
    }
}
