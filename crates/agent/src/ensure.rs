//! Makes one instance match its spec: create it, or change only what differs.

use std::time::Duration;

use serde_json::json;
use ssp_lxd::{Client, Instance};
use ssp_proto::{InstanceSpec, InstanceStatus};

use crate::account;
use crate::forward::{self, Addrs};
use crate::render::{self, merge_config, merge_devices, HostContext, SshForward};

/// Why an ensure failed.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    #[error(transparent)]
    Daemon(#[from] ssp_lxd::Error),
    #[error("instance {0} exists but was not created by ssp; it is left alone")]
    Foreign(String),
    #[error("cannot render {name}: {reason}")]
    Render { name: String, reason: String },
    #[error("this host is not set up for ssp: {0}")]
    Host(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot forward SSH to {name}: {reason}")]
    Address { name: String, reason: String },
    #[error("shared folder {path}: {source}")]
    Share {
        path: String,
        source: std::io::Error,
    },
    #[error("setting up the account of {user} in {name}: {reason}")]
    Account {
        user: String,
        name: String,
        reason: String,
    },
}

/// Lets the caller hold back a start (crash-loop backoff) and count those made.
pub trait Starts: Sync {
    /// False while `name` must wait before it is started again.
    fn may_start(&self, name: &str) -> bool;
    /// Called as soon as the daemon has accepted a start of `name`, so a start is
    /// counted even when a later step fails.
    fn started(&self, name: &str);
}

/// Starts without a backoff, counted nowhere (tools and benchmarks).
pub struct Unlimited;

impl Starts for Unlimited {
    fn may_start(&self, _: &str) -> bool {
        true
    }
    fn started(&self, _: &str) {}
}

/// Creates or updates `spec`'s instance, then starts it and sets up the owner's
/// account. A container that should run but is held back by `starts` is left
/// stopped (its status says so).
pub async fn ensure(
    client: &Client,
    host: &HostContext,
    addrs: &Addrs,
    spec: &InstanceSpec,
    starts: &dyn Starts,
) -> Result<InstanceStatus, EnsureError> {
    let current = client.instance(&spec.name).await?;
    // Held until the instance has its address, so no other ensure picks it.
    let (addr, _reserved) =
        nat_address(client, host, addrs, current.as_ref().map(|(i, _)| i), spec).await?;
    let r = render::render(spec, host, addr).map_err(|reason| EnsureError::Render {
        name: spec.name.clone(),
        reason,
    })?;
    if !spec.uid_range.is_empty() {
        crate::subid::check(&spec.uid_range).map_err(EnsureError::Host)?;
    }
    ensure_shares(spec)?;
    let mut changed = Vec::new();
    // The driver files of a running container changed (a driver upgrade, or
    // bind mode newly on): its loader must learn of them.
    let mut nvidia_changed = false;
    // Its NIC changed while it runs (forward to LAN or back): the daemon
    // plugged in a new eth0, which the container's network manager must set up.
    let mut nic_changed = false;
    let t0 = std::time::Instant::now();
    let step = |what: &str| tracing::debug!(instance = %spec.name, step = what, ms = t0.elapsed().as_millis() as u64, "ensure step");
    let inst = match current {
        None => {
            let source = image_source(client, &spec.image).await?;
            client
                .post(
                    "/1.0/instances",
                    json!({
                        "name": spec.name,
                        "type": "container",
                        "source": source,
                        "config": r.config,
                        "devices": r.devices,
                        "profiles": ["default"],
                    }),
                )
                .await?;
            changed.push("created".to_string());
            step("created");
            client
                .instance(&spec.name)
                .await?
                .map(|(i, _)| i)
                .unwrap_or_default()
        }
        Some((inst, etag)) => {
            if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
                return Err(EnsureError::Foreign(spec.name.clone()));
            }
            let config = merge_config(&inst.config, &r);
            let devices = merge_devices(&inst.devices, &r);
            if config != inst.config || devices != inst.devices {
                if config != inst.config {
                    changed.push("config".into());
                }
                if devices != inst.devices {
                    changed.push("devices".into());
                }
                nvidia_changed = inst.is_running()
                    && inst.devices.get(crate::nvidia::DEVICE)
                        != devices.get(crate::nvidia::DEVICE);
                nic_changed = inst.is_running() && nics(&inst.devices) != nics(&devices);
                client
                    .put_instance(
                        &spec.name,
                        json!({
                            "architecture": inst.architecture,
                            "config": config,
                            "devices": devices,
                            "profiles": inst.profiles,
                            "ephemeral": inst.ephemeral,
                            "description": inst.description,
                        }),
                        &etag,
                    )
                    .await?;
                client
                    .instance(&spec.name)
                    .await?
                    .map(|(i, _)| i)
                    .unwrap_or_default()
            } else {
                inst
            }
        }
    };
    let mut inst = inst;
    // A running container keeps the idmap it started with: a new raw.idmap (such as
    // the owner-only map replacing the whole lab range) takes effect at a restart,
    // and until then root inside could still act as other members on shared
    // folders. So the container is restarted (cleanly) once, now.
    // Counted as a start, so a daemon that never settled the idmap would meet the
    // crash-loop backoff rather than a restart at every resync.
    if spec.running && inst.is_running() && idmap_pending(&inst) && starts.may_start(&spec.name) {
        tracing::warn!(instance = %spec.name, "restarting: the container runs with an older idmap than its config asks for");
        client.set_state(&spec.name, "restart", false).await?;
        starts.started(&spec.name);
        changed.push("restarted (idmap)".into());
        step("restarted for the idmap");
        if let Some((i, _)) = client.instance(&spec.name).await? {
            inst = i;
        }
    }
    // Frozen by a move (the daemon counts it as running): while the spec says
    // stopped it stays so, to be killed or thawed, and nothing runs inside; a spec
    // that runs thaws it (the move went back: it goes on where it was).
    let mut held_frozen = crate::freeze::marked(&inst.config);
    if held_frozen && spec.running {
        crate::freeze::thaw(client, &spec.name).await?;
        inst.config.remove(crate::freeze::MARK);
        changed.push("thawed".into());
        held_frozen = false;
    } else if held_frozen && inst.is_running() && !crate::freeze::frozen(client, &spec.name).await?
    {
        // Marked, yet running on: started again since (the daemon starts its
        // containers when the host boots). Stopped, as any whose spec says so.
        held_frozen = false;
    }
    let want = account::hash(spec);
    let account_done = inst.config.get(account::CONFIG_KEY) == Some(&want);
    // A move froze it, then went back: it thaws (its processes go on where they were).
    let frozen = inst.status.eq_ignore_ascii_case("frozen");
    let to_start = spec.running && !inst.is_running();
    let held_back = to_start && !starts.may_start(&spec.name);
    if to_start && frozen {
        client.set_state(&spec.name, "unfreeze", false).await?;
        changed.push("unfrozen".into());
        inst.status = "Running".into();
        inst.status_code = 103;
    } else if to_start && !held_back {
        // Images that carry ssp's boot unit create the account before sshd from
        // the script in the instance config: nothing has to run inside afterwards.
        let at_boot = !account_done && account::created_at_boot(&inst);
        client.set_state(&spec.name, "start", false).await?;
        starts.started(&spec.name);
        changed.push("started".into());
        step("started");
        inst.status = "Running".into();
        inst.status_code = 103;
        if at_boot {
            mark_account(client, spec, &mut inst, &want).await?;
            changed.push("account".into());
        }
    } else if !spec.running && inst.is_running() && !held_frozen {
        client.set_state(&spec.name, "stop", true).await?;
        changed.push("stopped".into());
        inst.status = "Stopped".into();
        inst.status_code = 102;
    }
    if spec.running && !held_back && inst.config.get(account::CONFIG_KEY) != Some(&want) {
        account::exec(client, spec)
            .await
            .map_err(|e| account_error(spec, e))?;
        mark_account(client, spec, &mut inst, &want).await?;
        changed.push("account".into());
        step("account");
    } else if nvidia_changed && spec.running && inst.is_running() {
        // The account script ends with the driver setup (loader config, ldconfig,
        // links on PATH); it is idempotent. Best effort: the container runs either way.
        match account::exec(client, spec).await {
            Ok(()) => changed.push("nvidia".into()),
            Err(e) => {
                tracing::warn!(instance = %spec.name, "ldconfig after the NVIDIA driver files changed: {e}")
            }
        }
    }
    if nic_changed && inst.is_running() && !held_frozen {
        match bring_up_nic(client, &spec.name).await {
            Ok(()) => changed.push("network".into()),
            Err(e) => {
                tracing::warn!(instance = %spec.name, "setting up its new network interface inside: {e}")
            }
        }
    }
    let mut st = status_of(&inst);
    if render::on_lan(spec) && inst.is_running() {
        // Just started, or its NIC just changed: its address comes from the LAN's
        // DHCP server within seconds, and the one who asked wants to know it.
        let wait = if st_changed_start(&changed) {
            LAN_ADDRESS_WAIT
        } else {
            Duration::ZERO
        };
        st.lan_address = wait_lan_address(client, &spec.name, wait).await;
    }
    st.changed = changed;
    Ok(st)
}

/// The container's NICs, by device name.
fn nics(
    devices: &std::collections::BTreeMap<String, render::Device>,
) -> Vec<(&String, &render::Device)> {
    devices
        .iter()
        .filter(|(_, d)| d.get("type").map(String::as_str) == Some("nic"))
        .collect()
}

/// Has the container's network manager configure a newly plugged eth0 (by DHCP,
/// as at boot): systemd-networkd leaves a link that appears later unmanaged.
const NIC_UP: &str = r#"
if command -v networkctl >/dev/null 2>&1 && networkctl status eth0 >/dev/null 2>&1; then
  exec networkctl reconfigure eth0
elif command -v dhclient >/dev/null 2>&1; then
  dhclient -r eth0 2>/dev/null; exec dhclient eth0
elif command -v udhcpc >/dev/null 2>&1; then
  exec udhcpc -n -q -i eth0
fi
ip link set eth0 up
"#;

async fn bring_up_nic(client: &Client, name: &str) -> Result<(), String> {
    let out = client
        .exec(name, &["/bin/sh", "-c", NIC_UP], &[])
        .await
        .map_err(|e| e.to_string())?;
    if out.code != 0 {
        return Err(format!("exit {}: {}", out.code, out.stderr.trim()));
    }
    Ok(())
}

/// How long an ensure that started a LAN container waits for its address.
const LAN_ADDRESS_WAIT: Duration = Duration::from_secs(20);

fn st_changed_start(changed: &[String]) -> bool {
    changed
        .iter()
        .any(|c| c == "started" || c == "created" || c == "devices")
}

/// A LAN container's IPv4 address on its LAN NIC, waiting up to `wait` for one;
/// empty when it has none (yet).
pub async fn wait_lan_address(client: &Client, name: &str, wait: Duration) -> String {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(state) = client.get(&format!("/1.0/instances/{name}/state")).await {
            if let Some(a) = lan_address(&state) {
                return a.to_string();
            }
        }
        if std::time::Instant::now() >= deadline {
            return String::new();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The global IPv4 address of the LAN NIC in an instance's `/state`.
pub fn lan_address(state: &serde_json::Value) -> Option<std::net::Ipv4Addr> {
    state["network"][render::LAN_NIC]["addresses"]
        .as_array()?
        .iter()
        .filter(|a| a["family"] == "inet" && a["scope"] == "global")
        .find_map(|a| a["address"].as_str()?.parse().ok())
}

/// Makes `spec`'s shared folders on the host (owner, group, mode).
pub fn ensure_shares(spec: &InstanceSpec) -> Result<(), EnsureError> {
    for s in &spec.shares {
        crate::share::ensure(s, spec.lab_gid).map_err(|source| EnsureError::Share {
            path: s.host_path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The bridge address `name` gets for NAT-forwarded SSH: the one `current` holds,
/// or a free one, kept from other ensures until the returned guard is dropped
/// (once the instance holds it). `None` with the forwarding process.
pub async fn nat_address(
    client: &Client,
    host: &HostContext,
    addrs: &Addrs,
    current: Option<&Instance>,
    spec: &InstanceSpec,
) -> Result<(Option<std::net::Ipv4Addr>, Option<forward::Reserved>), EnsureError> {
    let name = spec.name.as_str();
    if render::on_lan(spec) {
        return Ok((None, None));
    }
    let SshForward::Nat {
        nic_name,
        nic,
        subnet,
        ..
    } = &host.ssh
    else {
        return Ok((None, None));
    };
    if let Some(a) = current.and_then(|i| forward::current(i, nic_name, subnet)) {
        return Ok((Some(a), None));
    }
    let network = nic.get("network").map(String::as_str).unwrap_or_default();
    let r = addrs
        .reserve(client, network, subnet)
        .await
        .map_err(|reason| EnsureError::Address {
            name: name.to_string(),
            reason,
        })?;
    Ok((Some(r.addr), Some(r)))
}

/// True when `inst` already matches `spec`, judged from a listing alone: what a
/// resync checks for every container without a request per container. Anything
/// that does not match goes through [`ensure`].
pub fn in_sync(inst: &Instance, host: &HostContext, spec: &InstanceSpec) -> bool {
    if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
        return false;
    }
    let addr = match &host.ssh {
        _ if render::on_lan(spec) => None,
        SshForward::Nat {
            nic_name, subnet, ..
        } => match forward::current(inst, nic_name, subnet) {
            Some(a) => Some(a),
            None => return false,
        },
        SshForward::Proxy { .. } => None,
    };
    let Ok(r) = render::render(spec, host, addr) else {
        return false;
    };
    merge_config(&inst.config, &r) == inst.config
        && merge_devices(&inst.devices, &r) == inst.devices
        && spec.running == inst.is_running()
        && !(inst.is_running() && idmap_pending(inst))
        && (!spec.running || inst.config.get(account::CONFIG_KEY) == Some(&account::hash(spec)))
        && spec
            .shares
            .iter()
            .all(|s| crate::share::ok(s, spec.lab_gid))
}

/// The daemon's status word, typed.
pub fn run_state(status: &str) -> ssp_proto::RunState {
    match status {
        "Running" => ssp_proto::RunState::Running,
        "Stopped" => ssp_proto::RunState::Stopped,
        "" => ssp_proto::RunState::Unknown,
        _ => ssp_proto::RunState::Other,
    }
}

/// True when the idmap the container runs with is not the one its config now
/// asks for (the daemon applies a changed idmap at the next start).
pub fn idmap_pending(inst: &Instance) -> bool {
    match (
        inst.config.get("volatile.idmap.current"),
        inst.config.get("volatile.idmap.next"),
    ) {
        (Some(current), Some(next)) => current != next,
        _ => false,
    }
}

/// Maps a daemon instance to the wire status.
pub fn status_of(inst: &Instance) -> InstanceStatus {
    // The daemon counts a container a move froze as running; ssp says frozen.
    let status = if inst.is_running() && crate::freeze::marked(&inst.config) {
        "Frozen".to_string()
    } else {
        inst.status.clone()
    };
    InstanceStatus {
        name: inst.name.clone(),
        owner: inst
            .config
            .get("user.ssp.owner")
            .cloned()
            .unwrap_or_default(),
        state: run_state(&status) as i32,
        status,
        uuid: inst
            .config
            .get("volatile.uuid")
            .cloned()
            .unwrap_or_default(),
        managed: inst.config.get("user.ssp.managed").map(String::as_str) == Some("true"),
        spec_hash: inst
            .config
            .get("user.ssp.spec-hash")
            .cloned()
            .unwrap_or_default(),
        changed: vec![],
        failing: String::new(),
        disk_used_bytes: 0,
        lan_address: String::new(),
        problem: String::new(),
    }
}

fn account_error(spec: &InstanceSpec, reason: String) -> EnsureError {
    EnsureError::Account {
        user: spec.owner.clone(),
        name: spec.name.clone(),
        reason,
    }
}

async fn mark_account(
    client: &Client,
    spec: &InstanceSpec,
    inst: &mut Instance,
    want: &str,
) -> Result<(), EnsureError> {
    client
        .patch(
            &format!("/1.0/instances/{}", spec.name),
            json!({"config": {account::CONFIG_KEY: want}}),
        )
        .await?;
    inst.config
        .insert(account::CONFIG_KEY.into(), want.to_string());
    Ok(())
}

/// Deletes an ssp instance (stopping it first). `Ok(false)` when it did not exist.
pub async fn delete(client: &Client, name: &str) -> Result<bool, EnsureError> {
    let Some((inst, _)) = client.instance(name).await? else {
        return Ok(false);
    };
    if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
        return Err(EnsureError::Foreign(name.into()));
    }
    if crate::freeze::marked(&inst.config) {
        crate::freeze::kill(client, name, false).await?;
    } else if inst.is_running() || inst.status.eq_ignore_ascii_case("frozen") {
        client.set_state(name, "stop", true).await?;
    }
    let path = format!("/1.0/instances/{name}");
    crate::freeze::when_not_busy(|| async { Ok(client.delete(&path).await?) }).await?;
    Ok(true)
}

/// Lists instances; with `managed_only`, just ssp's.
pub async fn list(client: &Client, managed_only: bool) -> Result<Vec<InstanceStatus>, EnsureError> {
    Ok(client
        .instances()
        .await?
        .iter()
        .map(status_of)
        .filter(|s| s.managed || !managed_only)
        .collect())
}
/// The image source for a new container: by alias, or by full fingerprint when the
/// spec names the image by its fingerprint (or a prefix of it, as placement allows).
async fn image_source(client: &Client, image: &str) -> Result<serde_json::Value, EnsureError> {
    // Only a name that could be a fingerprint costs a listing of the images.
    if image.len() < 12 || !image.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(json!({"type": "image", "alias": image}));
    }
    let images = client.images().await?;
    if images
        .iter()
        .any(|i| i.alias_names().iter().any(|a| a == image))
    {
        return Ok(json!({"type": "image", "alias": image}));
    }
    let by_print = images.iter().find(|i| {
        ssp_model::Image {
            fingerprint: i.fingerprint.clone(),
            aliases: vec![],
        }
        .matches(image)
    });
    Ok(match by_print {
        Some(i) => json!({"type": "image", "fingerprint": i.fingerprint}),
        // The daemon's error names the missing image.
        None => json!({"type": "image", "alias": image}),
    })
}

#[cfg(test)]
mod lan_tests {
    use super::lan_address;

    #[test]
    fn the_lan_address_is_eth0s_global_ipv4() {
        let state = serde_json::json!({"network": {
            "lo": {"addresses": [{"family": "inet", "address": "127.0.0.1", "scope": "local"}]},
            "eth0": {"addresses": [
                {"family": "inet6", "address": "fe80::73:ff:fe00:2710", "scope": "link"},
                {"family": "inet6", "address": "2001:db8::5", "scope": "global"},
                {"family": "inet", "address": "192.168.31.90", "scope": "global"}
            ]},
            "eth1": {"addresses": [{"family": "inet", "address": "10.0.0.9", "scope": "global"}]}
        }});
        assert_eq!(lan_address(&state), Some("192.168.31.90".parse().unwrap()));
        let none = serde_json::json!({"network": {"eth0": {"addresses": [
            {"family": "inet6", "address": "fe80::1", "scope": "link"}
        ]}}});
        assert_eq!(lan_address(&none), None);
        assert_eq!(lan_address(&serde_json::json!({"network": null})), None);
    }
}
