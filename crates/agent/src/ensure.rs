//! Makes one instance match its spec: create it, or change only what differs.

use std::path::Path;

use serde_json::json;
use ssp_lxd::{Client, Instance};
use ssp_proto::{InstanceSpec, InstanceStatus};

use crate::render::{self, merge_config, merge_devices, HostContext};

/// Why an ensure failed.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    #[error(transparent)]
    Daemon(#[from] ssp_lxd::Error),
    #[error("instance {0} exists but was not created by ssp; it is left alone")]
    Foreign(String),
    #[error("cannot render {name}: {reason}")]
    Render { name: String, reason: String },
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

/// The config key recording which account setup was done inside.
const ACCOUNT_KEY: &str = "user.ssp.account";

/// Creates or updates `spec`'s instance, then starts it and sets up the owner's account.
pub async fn ensure(
    client: &Client,
    host: &HostContext,
    spec: &InstanceSpec,
) -> Result<InstanceStatus, EnsureError> {
    let r = render::render(spec, host).map_err(|reason| EnsureError::Render {
        name: spec.name.clone(),
        reason,
    })?;
    for s in &spec.shares {
        ensure_share_dir(Path::new(&s.host_path))?;
    }
    let mut changed = Vec::new();
    let t0 = std::time::Instant::now();
    let step = |what: &str| tracing::debug!(instance = %spec.name, step = what, ms = t0.elapsed().as_millis() as u64, "ensure step");
    let current = client.instance(&spec.name).await?;
    let inst = match current {
        None => {
            client
                .post(
                    "/1.0/instances",
                    json!({
                        "name": spec.name,
                        "type": "container",
                        "source": {"type": "image", "alias": spec.image},
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
    if spec.running && !inst.is_running() {
        client.set_state(&spec.name, "start", false).await?;
        changed.push("started".into());
        step("started");
        inst.status = "Running".into();
        inst.status_code = 103;
    } else if !spec.running && inst.is_running() {
        client.set_state(&spec.name, "stop", true).await?;
        changed.push("stopped".into());
        inst.status = "Stopped".into();
        inst.status_code = 102;
    }
    if spec.running {
        let want = account_hash(spec);
        if inst.config.get(ACCOUNT_KEY) != Some(&want) {
            setup_account(client, spec).await?;
            client
                .patch(
                    &format!("/1.0/instances/{}", spec.name),
                    json!({"config": {ACCOUNT_KEY: want}}),
                )
                .await?;
            inst.config.insert(ACCOUNT_KEY.into(), want);
            changed.push("account".into());
            step("account");
        }
    }
    let mut st = status_of(&inst);
    st.changed = changed;
    Ok(st)
}

/// Maps a daemon instance to the wire status.
pub fn status_of(inst: &Instance) -> InstanceStatus {
    InstanceStatus {
        name: inst.name.clone(),
        owner: inst
            .config
            .get("user.ssp.owner")
            .cloned()
            .unwrap_or_default(),
        status: inst.status.clone(),
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
    }
}

fn account_hash(spec: &InstanceSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "{}:{}:{}",
        spec.owner,
        spec.owner_uid,
        spec.ssh_keys.join("\n")
    ));
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates the owner's account (same uid as on the host) with their keys and sudo.
/// Works on full distributions (useradd) and on busybox (adduser).
const ACCOUNT_SCRIPT: &str = r#"
set -e
u="$SSP_USER"; uid="$SSP_UID"
if ! id -u "$u" >/dev/null 2>&1; then
  if command -v useradd >/dev/null 2>&1; then
    getent group "$uid" >/dev/null 2>&1 || groupadd -g "$uid" "$u"
    useradd -m -u "$uid" -g "$uid" -s /bin/bash "$u"
  else
    addgroup -g "$uid" "$u" 2>/dev/null || true
    adduser -D -u "$uid" -G "$u" -s /bin/sh "$u"
  fi
fi
# A locked account refuses even key logins in OpenSSH; mark it key-only instead.
if command -v usermod >/dev/null 2>&1; then usermod -p '*' "$u"; fi
if [ -d /etc/sudoers.d ]; then
  printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$u" > "/etc/sudoers.d/ssp-$u"
  chmod 0440 "/etc/sudoers.d/ssp-$u"
fi
home=$(getent passwd "$u" 2>/dev/null | cut -d: -f6)
[ -n "$home" ] || home="/home/$u"
mkdir -p "$home/.ssh"
printf '%s\n' "$SSP_KEYS" > "$home/.ssh/authorized_keys.new"
mv "$home/.ssh/authorized_keys.new" "$home/.ssh/authorized_keys"
chmod 700 "$home/.ssh"; chmod 600 "$home/.ssh/authorized_keys"
chown -R "$uid:$(id -g "$u")" "$home/.ssh"
"#;

async fn setup_account(client: &Client, spec: &InstanceSpec) -> Result<(), EnsureError> {
    let uid = spec.owner_uid.to_string();
    let keys = spec.ssh_keys.join("\n");
    let out = client
        .exec(
            &spec.name,
            &["/bin/sh", "-c", ACCOUNT_SCRIPT],
            &[
                ("SSP_USER", &spec.owner),
                ("SSP_UID", &uid),
                ("SSP_KEYS", &keys),
                ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            ],
        )
        .await?;
    if out.code != 0 {
        return Err(EnsureError::Account {
            user: spec.owner.clone(),
            name: spec.name.clone(),
            reason: format!("exit {}: {}", out.code, out.stderr.trim()),
        });
    }
    Ok(())
}

/// A shared folder that does not exist yet is made world-writable with the sticky bit,
/// like /tmp: everyone may add files, only owners may remove them.
fn ensure_share_dir(path: &Path) -> Result<(), EnsureError> {
    use std::os::unix::fs::PermissionsExt;
    if path.is_dir() {
        return Ok(());
    }
    let err = |source| EnsureError::Share {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o1777)).map_err(err)?;
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
    if inst.is_running() {
        client.set_state(name, "stop", true).await?;
    }
    client.delete(&format!("/1.0/instances/{name}")).await?;
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
