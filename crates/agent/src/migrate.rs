//! Moving a container between hosts, as the daemons do it: the source daemon
//! opens a migration operation and the target daemon pulls the container from it
//! over the hosts' network (its websocket secrets authorize the pull; the daemons
//! need no trust of each other). No container data passes through ssp.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ssp_lxd::Client;
use ssp_proto::{InstanceSpec, MigrateOutReply, MigrateProgress};
use tokio::io::AsyncReadExt;

use crate::ensure::EnsureError;
use crate::render::{self, merge_config, merge_devices, HostContext};

/// Whether the daemon can migrate `name` live (with CRIU): it is asked to open a
/// live migration operation, which is cancelled at once. `Err` carries the
/// daemon's words when it cannot.
pub async fn check_live(client: &Client, name: &str) -> Result<(), String> {
    match client
        .post_async(
            &format!("/1.0/instances/{name}"),
            json!({"migration": true, "live": true, "instance_only": false}),
        )
        .await
    {
        Ok((op, _)) => {
            let _ = client.delete(&format!("/1.0/operations/{op}")).await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Where the daemon listens on the hosts' network, and its certificate (PEM).
/// Makes it listen on `address` first when it listens nowhere yet; other daemons
/// pull containers and images from there.
pub async fn listen(client: &Client, address: &str) -> Result<(String, String), EnsureError> {
    let server = client.get("/1.0").await?;
    let mut listening = server["config"]["core.https_address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if listening.is_empty() {
        client
            .patch("/1.0", json!({"config": {"core.https_address": address}}))
            .await?;
        tracing::info!(%address, "the daemon now listens for moves between hosts");
        listening = address.to_string();
    }
    let certificate = server["environment"]["certificate"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((listening, certificate))
}

/// Opens the operation the target daemon pulls `name` from. Makes the daemon
/// listen on `address` first when it listens nowhere yet.
pub async fn migrate_out(
    client: &Client,
    address: &str,
    url_host: &str,
    name: &str,
    snapshot: &str,
) -> Result<MigrateOutReply, EnsureError> {
    let Some((inst, _)) = client.instance(name).await? else {
        return Err(EnsureError::Daemon(ssp_lxd::Error::Api {
            method: "GET".into(),
            path: format!("/1.0/instances/{name}"),
            code: 404,
            message: format!("instance {name} does not exist on this host"),
        }));
    };
    if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
        return Err(EnsureError::Foreign(name.into()));
    }
    if !snapshot.is_empty() {
        let path = format!("/1.0/instances/{name}/snapshots/{snapshot}");
        if let Err(e) = client.get(&path).await {
            if !e.is_not_found() {
                return Err(e.into());
            }
            client
                .post(
                    &format!("/1.0/instances/{name}/snapshots"),
                    json!({"name": snapshot, "stateful": false}),
                )
                .await?;
        }
    }
    let (listening, certificate) = listen(client, address).await?;
    let (op, md) = client
        .post_async(
            &format!("/1.0/instances/{name}"),
            json!({"migration": true, "live": false, "instance_only": false}),
        )
        .await?;
    let secrets: std::collections::HashMap<String, String> = md["metadata"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    // Of the daemon's own keys only the uuid travels (the target then knows it as the
    // same container); the idmap and NIC keys are the target daemon's to choose.
    let config: BTreeMap<&String, &String> = inst
        .config
        .iter()
        .filter(|(k, _)| {
            (!k.starts_with("volatile.") || k.as_str() == "volatile.uuid")
                && k.as_str() != crate::freeze::MARK
        })
        .collect();
    Ok(MigrateOutReply {
        operation: format!(
            "https://{}/1.0/operations/{op}",
            url_address(&listening, url_host)
        ),
        certificate,
        secrets,
        architecture: inst.architecture.clone(),
        config_json: serde_json::to_string(&config).unwrap_or_default(),
        devices_json: serde_json::to_string(&inst.devices).unwrap_or_default(),
        profiles: inst.profiles.clone(),
        running: inst.is_running(),
        ..Default::default()
    })
}

/// Deletes snapshot `snapshot` of ssp container `name`; `Ok(false)` when there was none.
pub async fn delete_snapshot(
    client: &Client,
    name: &str,
    snapshot: &str,
) -> Result<bool, EnsureError> {
    let Some((inst, _)) = client.instance(name).await? else {
        return Ok(false);
    };
    if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
        return Err(EnsureError::Foreign(name.into()));
    }
    match client
        .delete(&format!("/1.0/instances/{name}/snapshots/{snapshot}"))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The address the target dials for a daemon listening on `listening`: itself, or
/// `host` with its port when it listens on every address.
pub fn url_address(listening: &str, host: &str) -> String {
    let (addr, port) = match listening.rsplit_once(':') {
        Some((a, p)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => (a, p),
        _ => (listening, "8443"),
    };
    let wildcard = addr.is_empty() || addr == "0.0.0.0" || addr == "[::]" || addr == "::";
    if !wildcard {
        return format!("{addr}:{port}");
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// Creates `spec`'s container from the source's operation, or (when it is here
/// already, from an earlier pass) takes only what changed since. Its config and
/// devices are the source's with ssp's rendered for this host (GPUs, SSH port,
/// address, shares), so it can start here as it is. `progress` gets the
/// daemon's progress as it goes.
pub async fn migrate_in(
    client: &Client,
    host: &HostContext,
    addrs: &crate::forward::Addrs,
    spec: &InstanceSpec,
    source: &MigrateOutReply,
    progress: &tokio::sync::mpsc::Sender<MigrateProgress>,
) -> Result<bool, EnsureError> {
    let t0 = Instant::now();
    let current = client.instance(&spec.name).await?;
    if let Some((inst, _)) = &current {
        if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
            return Err(EnsureError::Foreign(spec.name.clone()));
        }
    }
    let refresh = current.is_some();
    let (addr, _reserved) =
        crate::ensure::nat_address(client, host, addrs, current.as_ref().map(|(i, _)| i), spec)
            .await?;
    let r = render::render(spec, host, addr).map_err(|reason| EnsureError::Render {
        name: spec.name.clone(),
        reason,
    })?;
    crate::ensure::ensure_shares(spec)?;
    let bad = |what: &str, e: serde_json::Error| EnsureError::Render {
        name: spec.name.clone(),
        reason: format!("the source's {what}: {e}"),
    };
    let src_config: BTreeMap<String, String> =
        serde_json::from_str(&source.config_json).map_err(|e| bad("config", e))?;
    let src_devices: BTreeMap<String, render::Device> =
        serde_json::from_str(&source.devices_json).map_err(|e| bad("devices", e))?;
    let config = merge_config(&src_config, &r);
    let devices = merge_devices(&src_devices, &r);
    let profiles = if source.profiles.is_empty() {
        vec!["default".to_string()]
    } else {
        source.profiles.clone()
    };
    let body = json!({
        "name": spec.name,
        "type": "container",
        "architecture": source.architecture,
        "config": config,
        "devices": devices,
        "profiles": profiles,
        "source": {
            "type": "migration",
            "mode": "pull",
            "operation": source.operation,
            "certificate": source.certificate,
            "secrets": source.secrets,
            "instance_only": false,
            "refresh": refresh,
        },
    });
    let prepared = t0.elapsed();
    let (op, _) = client.post_async("/1.0/instances", body).await?;
    let posted = t0.elapsed();
    follow(client, &op, refresh, progress).await?;
    tracing::debug!(instance = %spec.name, refresh, prepare_ms = prepared.as_millis() as u64, post_ms = posted.as_millis() as u64, ms = t0.elapsed().as_millis() as u64, "pulled");
    Ok(refresh)
}

/// Polls operation `op` until it ends, sending progress whenever it changes.
async fn follow(
    client: &Client,
    op: &str,
    refresh: bool,
    progress: &tokio::sync::mpsc::Sender<MigrateProgress>,
) -> Result<(), EnsureError> {
    let mut last = String::new();
    loop {
        let Some(state) = client.operation(op).await? else {
            // Finished operations vanish after a few seconds: ask the waiter.
            client.wait_operation(op).await?;
            return Ok(());
        };
        match state["status"].as_str().unwrap_or_default() {
            "Success" => return Ok(()),
            "Failure" | "Cancelled" => {
                return Err(EnsureError::Daemon(ssp_lxd::Error::Operation {
                    id: op.to_string(),
                    message: state["err"].as_str().unwrap_or("unknown").to_string(),
                }))
            }
            _ => {}
        }
        if let Some(mut p) = parse_progress(&state["metadata"]) {
            if p.text != last {
                last = p.text.clone();
                p.refresh = refresh;
                // The coordinator may have gone; the transfer goes on regardless.
                let _ = progress.try_send(p);
            }
        }
        // Wait on the operation for a quarter second, then look at its progress again.
        let _ = tokio::time::timeout(
            Duration::from_millis(250),
            client.get(&format!("/1.0/operations/{op}/wait?timeout=1")),
        )
        .await;
    }
}

/// The daemon's progress words (`fs_progress`: "rootfs: 512.00MB (150.12MB/s)"
/// and the like) with the bytes and rate read from them.
pub fn parse_progress(md: &Value) -> Option<MigrateProgress> {
    let obj = md.as_object()?;
    let (stage, text) = obj
        .iter()
        .filter(|(k, _)| k.ends_with("_progress"))
        .find_map(|(k, v)| v.as_str().map(|t| (k.clone(), t.to_string())))?;
    let after = text.rsplit_once(": ").map(|(_, t)| t).unwrap_or(&text);
    let (amount, rate) = match after.split_once(" (") {
        Some((a, r)) => (a, r.trim_end_matches(')').trim_end_matches("/s")),
        None => (after, ""),
    };
    Some(MigrateProgress {
        stage,
        bytes: parse_size(amount).unwrap_or(0),
        bytes_per_sec: parse_size(rate).unwrap_or(0),
        text,
        refresh: false,
        done: false,
    })
}

/// "512.00MB", "1.5GB", "900B", "12.3MiB" → bytes (decimal units as the daemons print them).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * mult) as u64)
}

/// Waits up to `timeout` for the SSH server of `name` to greet (`SSH-`), at the
/// container's own addresses on the host's bridges: its static one (from its
/// NIC's config) from the start, and those the daemon reports, read again every
/// quarter second. Each try is a connect given 20 ms (these are local links: one
/// that hangs is to an address not up yet), then tried again 10 ms later.
pub async fn probe_ssh(client: &Client, name: &str, timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no address yet");
    let mut ips = match client.instance(name).await {
        Ok(Some((inst, _))) => static_addresses(&inst),
        _ => Vec::new(),
    };
    // With a static address the daemon's report (which costs it a helper process)
    // waits its quarter second.
    let mut read_at = (!ips.is_empty()).then(Instant::now);
    loop {
        if read_at.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
            read_at = Some(Instant::now());
            match client.get(&format!("/1.0/instances/{name}/state")).await {
                Ok(state) => {
                    for ip in addresses(&state) {
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        for ip in &ips {
            match greet(*ip, deadline).await {
                Ok(banner) => return (true, format!("{ip}: {banner}")),
                Err(e) => last = format!("{ip}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return (false, last);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The static IPv4 addresses of the instance's NICs (`ipv4.address`).
fn static_addresses(inst: &ssp_lxd::Instance) -> Vec<std::net::IpAddr> {
    let devices = if inst.expanded_devices.is_empty() {
        &inst.devices
    } else {
        &inst.expanded_devices
    };
    devices
        .values()
        .filter(|d| d.get("type").map(String::as_str) == Some("nic"))
        .filter_map(|d| d.get("ipv4.address")?.parse().ok())
        .collect()
}

fn addresses(state: &Value) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    if let Some(nics) = state["network"].as_object() {
        for (nic, v) in nics {
            if nic == "lo" {
                continue;
            }
            for a in v["addresses"].as_array().into_iter().flatten() {
                if a["scope"] == "global" {
                    if let Some(ip) = a["address"].as_str().and_then(|s| s.parse().ok()) {
                        out.push(ip);
                    }
                }
            }
        }
    }
    out
}

async fn greet(ip: std::net::IpAddr, deadline: Instant) -> Result<String, String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(200));
    let mut s = tokio::time::timeout(
        Duration::from_millis(20),
        tokio::net::TcpStream::connect((ip, 22)),
    )
    .await
    .map_err(|_| "no answer to the connect yet".to_string())?
    .map_err(|e| e.to_string())?;
    let read = async {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        match text.starts_with("SSH-") {
            true => Ok(text.lines().next().unwrap_or_default().to_string()),
            false => Err(format!("no SSH greeting ({:?})", text)),
        }
    };
    tokio::time::timeout(left.min(Duration::from_secs(2)), read)
        .await
        .map_err(|_| "no greeting in time".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_words_become_bytes_and_rates() {
        let p = parse_progress(&json!({"fs_progress": "rootfs: 512.00MB (150.12MB/s)"})).unwrap();
        assert_eq!(p.stage, "fs_progress");
        assert_eq!(p.bytes, 512_000_000);
        assert_eq!(p.bytes_per_sec, 150_120_000);
        let p = parse_progress(&json!({"fs_progress": "snap0: 1.5GB"})).unwrap();
        assert_eq!(p.bytes, 1_500_000_000);
        assert_eq!(p.bytes_per_sec, 0);
        let p = parse_progress(&json!({"fs_progress": "rootfs: lots"})).unwrap();
        assert_eq!((p.bytes, p.text.as_str()), (0, "rootfs: lots"));
        assert!(parse_progress(&json!({"control": "x"})).is_none());
        assert!(parse_progress(&Value::Null).is_none());
    }

    #[test]
    fn the_url_names_the_listening_address_or_the_host() {
        assert_eq!(url_address("10.0.0.5:8443", "h"), "10.0.0.5:8443");
        assert_eq!(url_address(":8443", "10.0.0.7"), "10.0.0.7:8443");
        assert_eq!(url_address("[::]:9000", "fd00::1"), "[fd00::1]:9000");
        assert_eq!(url_address("0.0.0.0", "gpu1.lab"), "gpu1.lab:8443");
    }
}
