//! Images made from a user's container, and images passed between daemons.
//!
//! Publishing never touches the user's container beyond a snapshot: a temporary
//! copy of the snapshot, without devices or network, is started, stripped of the
//! owner's account, every home, SSH keys (the host's too: each container made
//! from the image makes its own at first boot), shell histories and the machine id,
//! stopped, and published; then the copy and the snapshot go.
//!
//! Between hosts an image goes the daemons' own way: the source daemon hands out a
//! one-time secret for it, and the target daemon pulls it from the source's
//! address (the one moves use); ssp passes only the secret and the certificate.

use serde_json::{json, Value};
use ssp_lxd::Client;
use ssp_proto::{FetchImageRequest, ImageReply, ShareImageReply};

use crate::ensure::EnsureError;

/// Names of the temporary copies and snapshots a publication makes.
const PREFIX: &str = "ssp-publish-";

/// What the image must not carry. POSIX sh, for full distributions and busybox.
const CLEAN: &str = r#"set -u
PATH=/usr/sbin:/usr/bin:/sbin:/bin
has() { command -v "$1" >/dev/null 2>&1; }
# Every account with a home under /home (the owner, and anyone they added).
for u in $(awk -F: '$6 ~ /^\/home\// {print $1}' /etc/passwd); do
  if has userdel; then userdel "$u" 2>/dev/null
  elif has deluser; then deluser "$u" 2>/dev/null
  else sed -i "/^$u:/d" /etc/passwd; fi
  sed -i "/^$u:/d" /etc/group /etc/shadow /etc/gshadow 2>/dev/null
  rm -f "/etc/sudoers.d/ssp-$u" "/var/spool/cron/crontabs/$u" "/var/mail/$u"
done
rm -rf /home/* /root/.ssh /root/.*history /root/.cache /root/.local/share/*history* \
       /etc/ssh/ssh_host_* /tmp/* /var/tmp/* /var/lib/extrausers/*
[ -f /etc/machine-id ] && : > /etc/machine-id
rm -f /var/lib/dbus/machine-id
exit 0
"#;

fn op_failed(what: &str, e: impl std::fmt::Display) -> EnsureError {
    EnsureError::Refused(format!("{what}: {e}"))
}

/// Publishes `name` (or its snapshot `snapshot`) as image `alias`, without its
/// owner's files. Returns the image's fingerprint.
pub async fn publish(
    client: &Client,
    name: &str,
    snapshot: &str,
    alias: &str,
    stamp: &str,
) -> Result<String, EnsureError> {
    let Some((inst, _)) = client.instance(name).await? else {
        return Err(op_failed(
            "publishing",
            format!("{name} does not exist on this host"),
        ));
    };
    if inst.config.get("user.ssp.managed").map(String::as_str) != Some("true") {
        return Err(EnsureError::Foreign(name.into()));
    }
    let temp = format!("{PREFIX}{stamp}");
    let own_snapshot = snapshot.is_empty();
    if !own_snapshot {
        let path = format!("/1.0/instances/{name}/snapshots/{snapshot}");
        if let Err(e) = client.get(&path).await {
            return Err(if e.is_not_found() {
                op_failed("publishing", format!("{name} has no snapshot {snapshot}"))
            } else {
                e.into()
            });
        }
    }
    let snap = if own_snapshot {
        temp.clone()
    } else {
        snapshot.to_string()
    };
    if own_snapshot {
        client
            .post(
                &format!("/1.0/instances/{name}/snapshots"),
                json!({"name": snap, "stateful": false}),
            )
            .await?;
    }
    let result = publish_from(client, &inst, name, &snap, &temp, alias).await;
    // The copy and the snapshot go, whatever happened.
    let _ = client.set_state(&temp, "stop", true).await;
    if let Err(e) = client.delete(&format!("/1.0/instances/{temp}")).await {
        if !e.is_not_found() {
            tracing::warn!(instance = %temp, "removing the publication's copy: {e}");
        }
    }
    if own_snapshot {
        if let Err(e) = client
            .delete(&format!("/1.0/instances/{name}/snapshots/{snap}"))
            .await
        {
            tracing::warn!(instance = %name, snapshot = %snap, "removing the publication's snapshot: {e}");
        }
    }
    result
}

async fn publish_from(
    client: &Client,
    inst: &ssp_lxd::Instance,
    name: &str,
    snap: &str,
    temp: &str,
    alias: &str,
) -> Result<String, EnsureError> {
    // A copy, then without GPUs, address, shared folders or ssp's keys.
    client
        .post(
            "/1.0/instances",
            json!({
                "name": temp,
                "type": "container",
                "source": {"type": "copy", "source": format!("{name}/{snap}"), "instance_only": true},
                "profiles": [],
            }),
        )
        .await?;
    // What the copy carried over of ssp and of the host goes before it starts:
    // ssp's keys are emptied (which unsets them), every device but the root disk
    // is shadowed by a `none` device. A PATCH leaves the daemon's own keys be.
    let (copy, _) = client
        .instance(temp)
        .await?
        .ok_or_else(|| op_failed("publishing", "the copy vanished"))?;
    let config: serde_json::Map<String, Value> = copy
        .config
        .keys()
        .filter(|k| k.starts_with("user."))
        .map(|k| (k.clone(), json!("")))
        .collect();
    let mut devices = serde_json::Map::new();
    for (k, d) in &copy.expanded_devices {
        let root = d.get("type").map(String::as_str) == Some("disk")
            && d.get("path").map(String::as_str) == Some("/");
        if !root {
            devices.insert(k.clone(), json!({"type": "none"}));
        }
    }
    client
        .patch(
            &format!("/1.0/instances/{temp}"),
            json!({"config": config, "devices": devices}),
        )
        .await?;
    client.set_state(temp, "start", false).await?;
    let out = client.exec(temp, &["/bin/sh", "-c", CLEAN], &[]).await?;
    if out.code != 0 {
        return Err(op_failed(
            "cleaning the copy",
            format!("exit {}: {}", out.code, out.stderr.trim()),
        ));
    }
    client.set_state(temp, "stop", true).await?;
    // The image keeps what says how ssp's images make the account (at boot).
    let mut properties = serde_json::Map::new();
    for (k, v) in &inst.config {
        if let Some(p) = k.strip_prefix("image.") {
            properties.insert(p.to_string(), json!(v));
        }
    }
    properties.insert(
        "description".into(),
        json!(format!("{alias}: made by ssp from {name}")),
    );
    let md = client
        .post(
            "/1.0/images",
            json!({
                "source": {"type": "instance", "name": temp},
                "properties": properties,
                "aliases": [{"name": alias}],
                "public": false,
            }),
        )
        .await?;
    let fingerprint = md["metadata"]["fingerprint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    tracing::info!(instance = %name, %alias, %fingerprint, "published");
    Ok(fingerprint)
}

/// The image `alias_or_fingerprint` as this daemon knows it: its full fingerprint.
async fn fingerprint_of(
    client: &Client,
    alias_or_fingerprint: &str,
) -> Result<Option<String>, EnsureError> {
    let images = client.images().await?;
    Ok(images
        .iter()
        .find(|i| {
            i.alias_names().iter().any(|a| a == alias_or_fingerprint)
                || i.fingerprint == alias_or_fingerprint
        })
        .map(|i| i.fingerprint.clone()))
}

/// Lets another daemon pull image `alias_or_fingerprint` once: the daemon listens
/// on `address` (when it listens nowhere yet) and hands out a one-time secret.
pub async fn share(
    client: &Client,
    address: &str,
    url_host: &str,
    alias_or_fingerprint: &str,
) -> Result<ShareImageReply, EnsureError> {
    let fingerprint = fingerprint_of(client, alias_or_fingerprint)
        .await?
        .ok_or_else(|| op_failed("sharing", format!("no image {alias_or_fingerprint} here")))?;
    let (listening, certificate) = crate::migrate::listen(client, address).await?;
    let (_, md) = client
        .post_async(&format!("/1.0/images/{fingerprint}/secret"), json!({}))
        .await?;
    let secret = md["metadata"]["secret"]
        .as_str()
        .ok_or_else(|| op_failed("sharing", "the daemon gave no secret"))?
        .to_string();
    Ok(ShareImageReply {
        server: format!(
            "https://{}",
            crate::migrate::url_address(&listening, url_host)
        ),
        certificate,
        secret,
        fingerprint,
    })
}

/// Has this daemon pull an image from another (see [`share`]), under `aliases`.
pub async fn fetch(client: &Client, req: &FetchImageRequest) -> Result<ImageReply, EnsureError> {
    let protocol = match client.kind() {
        ssp_lxd::DaemonKind::Incus => "incus",
        _ => "lxd",
    };
    if fingerprint_of(client, &req.fingerprint).await?.is_none() {
        client
            .post(
                "/1.0/images",
                json!({
                    "source": {
                        "type": "image",
                        "mode": "pull",
                        "server": req.server,
                        "protocol": protocol,
                        "certificate": req.certificate,
                        "secret": req.secret,
                        "fingerprint": req.fingerprint,
                    },
                    "public": false,
                }),
            )
            .await?;
    }
    for alias in &req.aliases {
        let body = json!({"name": alias, "target": req.fingerprint});
        if let Err(e) = client.post("/1.0/images/aliases", body).await {
            // Already there (a retry): point it at this image.
            if e.to_string().contains("already exists") {
                client
                    .put(
                        &format!("/1.0/images/aliases/{alias}"),
                        json!({"target": req.fingerprint, "description": ""}),
                    )
                    .await?;
            } else {
                return Err(e.into());
            }
        }
    }
    Ok(ImageReply {
        fingerprint: req.fingerprint.clone(),
        done: format!("has image {}", req.fingerprint),
    })
}

/// Deletes image `alias_or_fingerprint` (containers made from it keep running);
/// false when this daemon has no such image.
pub async fn delete(client: &Client, alias_or_fingerprint: &str) -> Result<bool, EnsureError> {
    let Some(fingerprint) = fingerprint_of(client, alias_or_fingerprint).await? else {
        return Ok(false);
    };
    client.delete(&format!("/1.0/images/{fingerprint}")).await?;
    Ok(true)
}
