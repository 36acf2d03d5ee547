//! Containers made by hand, taken under ssp's management (`sspctl adopt`): what
//! one uses is read from its config and devices ([`survey`], pure), and taking it
//! over only marks it as ssp's; the next ensure gives it ssp's config and devices
//! (its hand-made GPU and SSH proxy devices give way to ssp's, see
//! [`crate::render::merge_devices`]). Nothing is recreated: same volatile.uuid.

use ssp_lxd::{Client, Instance};
use ssp_proto::{Gpu, SurveyReply};

/// The minor of a `/dev/nvidiaN` path (not nvidiactl, nvidia-uvm, ...).
fn nvidia_minor(path: &str) -> Option<u32> {
    path.strip_prefix("/dev/nvidia")?.parse().ok()
}

/// True for a device that passes a GPU: `gpu`, or a `unix-char` /dev/nvidiaN.
pub fn is_gpu_device(d: &crate::render::Device) -> bool {
    match d.get("type").map(String::as_str) {
        Some("gpu") => true,
        Some("unix-char") => d
            .get("source")
            .or_else(|| d.get("path"))
            .and_then(|p| nvidia_minor(p))
            .is_some(),
        _ => false,
    }
}

/// The host port of a `proxy` device that forwards to port 22 inside.
pub fn ssh_proxy_port(d: &crate::render::Device) -> Option<u16> {
    if d.get("type").map(String::as_str) != Some("proxy") {
        return None;
    }
    d.get("connect")?
        .rsplit_once(':')
        .filter(|(_, p)| *p == "22")?;
    d.get("listen")?.rsplit_once(':')?.1.parse().ok()
}

/// The PCI address in `gpus` that `pci` (as a hand-made device writes it, maybe
/// without its domain or in upper case) names.
fn find_pci<'a>(gpus: &'a [Gpu], pci: &str) -> Option<&'a Gpu> {
    let pci = pci.to_ascii_lowercase();
    gpus.iter()
        .find(|g| g.pci_address == pci || g.pci_address.strip_prefix("0000:") == Some(pci.as_str()))
}

/// What `inst` uses that ssp takes over, and what stops it.
pub fn survey(inst: &Instance, gpus: &[Gpu]) -> SurveyReply {
    let mut r = SurveyReply {
        exists: true,
        managed: inst.config.get("user.ssp.managed").map(String::as_str) == Some("true"),
        uuid: inst
            .config
            .get("volatile.uuid")
            .cloned()
            .unwrap_or_default(),
        status: inst.status.clone(),
        image: inst
            .config
            .get("volatile.base_image")
            .cloned()
            .unwrap_or_default(),
        ..Default::default()
    };
    if inst.kind != "container" && !inst.kind.is_empty() {
        r.problems
            .push(format!("it is a {}, not a container", inst.kind));
    }
    for (name, d) in &inst.devices {
        if is_gpu_device(d) {
            let gpu = match d.get("type").map(String::as_str) {
                Some("gpu") => match (d.get("pci"), d.get("id")) {
                    (Some(pci), _) => find_pci(gpus, pci).ok_or(format!("its device {name} passes GPU {pci}, which is not in this host's inventory")),
                    (None, Some(id)) => id
                        .parse::<u32>()
                        .ok()
                        .and_then(|i| gpus.iter().find(|g| g.index == i))
                        .ok_or(format!("its device {name} passes GPU id {id}, which is not in this host's inventory")),
                    (None, None) => Err(format!(
                        "its device {name} passes every GPU of the host; give it pci=ADDRESS first"
                    )),
                },
                _ => {
                    let node = d.get("source").or_else(|| d.get("path")).cloned().unwrap_or_default();
                    nvidia_minor(&node)
                        .and_then(|m| gpus.iter().find(|g| g.minor == m))
                        .ok_or(format!("its device {name} passes {node}, which is no GPU of this host's inventory"))
                }
            };
            match gpu {
                Ok(g) => r.gpu_pci.push(g.pci_address.clone()),
                Err(e) => r.problems.push(e),
            }
        }
        if let Some(p) = ssh_proxy_port(d) {
            r.ssh_ports.push(p.into());
        }
    }
    // GPUs and SSH from a profile are shared with every container of that profile.
    for (name, d) in &inst.expanded_devices {
        if !inst.devices.contains_key(name) && (is_gpu_device(d) || ssh_proxy_port(d).is_some()) {
            r.problems.push(format!(
                "its device {name} comes from a profile; move it into the container first"
            ));
        }
    }
    r.cpus = inst
        .config
        .get("limits.cpu")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    r.memory_bytes = inst
        .config
        .get("limits.memory")
        .and_then(|m| ssp_model::ByteSize::parse(m).ok())
        .map(|b| b.0)
        .unwrap_or(0);
    r.disk_bytes = inst
        .expanded_devices
        .get("root")
        .and_then(|d| d.get("size"))
        .and_then(|s| ssp_model::ByteSize::parse(s).ok())
        .map(|b| b.0)
        .unwrap_or(0);
    r
}

/// `user`'s authorized_keys inside the running container (none when it is not
/// running or has no such file).
pub async fn keys_inside(client: &Client, name: &str, user: &str) -> Vec<String> {
    if ssp_model::Username::parse(user).is_err() {
        return vec![];
    }
    let script = format!(
        "h=$(getent passwd '{user}' 2>/dev/null | cut -d: -f6); [ -n \"$h\" ] || h=/home/{user}; cat \"$h/.ssh/authorized_keys\" 2>/dev/null || true"
    );
    match client.exec(name, &["/bin/sh", "-c", &script], &[]).await {
        Ok(out) if out.code == 0 => out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn dev(pairs: &[(&str, &str)]) -> crate::render::Device {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn gpus() -> Vec<Gpu> {
        (0..4)
            .map(|i| Gpu {
                index: i,
                pci_address: format!("0000:{:02x}:00.0", 0x17 + i),
                minor: 80 + i,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_hand_made_container_is_read_for_gpus_its_ssh_port_and_limits() {
        let mut inst = Instance {
            name: "gdw".into(),
            kind: "container".into(),
            status: "Running".into(),
            ..Default::default()
        };
        inst.config = BTreeMap::from([
            ("volatile.uuid".to_string(), "u-1".to_string()),
            ("volatile.base_image".to_string(), "abc".to_string()),
            ("limits.cpu".to_string(), "4".to_string()),
            ("limits.memory".to_string(), "8GiB".to_string()),
        ]);
        inst.devices = BTreeMap::from([
            (
                "gpu0".to_string(),
                dev(&[("type", "gpu"), ("pci", "18:00.0")]),
            ),
            (
                "card".to_string(),
                dev(&[
                    ("type", "unix-char"),
                    ("source", "/dev/nvidia82"),
                    ("path", "/dev/nvidia1"),
                ]),
            ),
            (
                "ctl".to_string(),
                dev(&[("type", "unix-char"), ("path", "/dev/nvidiactl")]),
            ),
            (
                "ssh".to_string(),
                dev(&[
                    ("type", "proxy"),
                    ("listen", "tcp:0.0.0.0:22050"),
                    ("connect", "tcp:127.0.0.1:22"),
                ]),
            ),
            (
                "web".to_string(),
                dev(&[
                    ("type", "proxy"),
                    ("listen", "tcp:0.0.0.0:8080"),
                    ("connect", "tcp:127.0.0.1:80"),
                ]),
            ),
        ]);
        inst.expanded_devices = inst.devices.clone();
        inst.expanded_devices.insert(
            "root".into(),
            dev(&[("type", "disk"), ("path", "/"), ("size", "50GiB")]),
        );
        let s = survey(&inst, &gpus());
        assert!(s.exists && !s.managed && s.problems.is_empty(), "{s:?}");
        assert_eq!((s.uuid.as_str(), s.image.as_str()), ("u-1", "abc"));
        // Devices in name order: "card" (/dev/nvidia82 → minor 82), then "gpu0".
        assert_eq!(s.gpu_pci, ["0000:19:00.0", "0000:18:00.0"]);
        assert_eq!(s.ssh_ports, [22050]);
        assert_eq!(
            (s.cpus, s.memory_bytes, s.disk_bytes),
            (4, 8 << 30, 50 << 30)
        );

        // What ssp cannot take over is named.
        inst.devices.insert("all".into(), dev(&[("type", "gpu")]));
        inst.devices.insert(
            "far".into(),
            dev(&[("type", "gpu"), ("pci", "0000:99:00.0")]),
        );
        inst.expanded_devices.insert(
            "shared-gpu".into(),
            dev(&[("type", "unix-char"), ("source", "/dev/nvidia80")]),
        );
        let s = survey(&inst, &gpus());
        let all = s.problems.join("\n");
        assert!(all.contains("its device all passes every GPU"), "{all}");
        assert!(
            all.contains("GPU 0000:99:00.0, which is not in this host's inventory"),
            "{all}"
        );
        assert!(
            all.contains("its device shared-gpu comes from a profile"),
            "{all}"
        );
    }
}
