//! The agent's own host policy, checked on every spec before it is stored or acted
//! on, whoever sent it: a coordinator's bug or a forged request must not be able to
//! bind-mount the host's root, take the host's sshd port, give one GPU to two
//! containers or map uids the host did not set aside. The lab's member list is
//! checked the same way before it reaches the members files. Pure: table-tested.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use ssp_model::ShareMode;
use ssp_proto::{InstanceSpec, LabMembers};

/// What this host allows, from the agent's config.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Shared folders must lie under one of these.
    pub shared_roots: Vec<PathBuf>,
    /// SSH ports containers may be forwarded from.
    pub ssh_ports: (u16, u16),
    /// RDP ports desktop containers may be forwarded from.
    pub rdp_ports: (u16, u16),
    /// The lab's uid range: a container maps its owner's uid and the lab gid of
    /// it 1:1, never another id of the host.
    pub uid_range: (u32, u32),
}

/// Container paths a share may not cover.
const SYSTEM_PATHS: &[&str] = &[
    "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/boot", "/run",
];

fn clean_absolute(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains(['\n', '\0', ','])
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// `path` with its existing part resolved (symbolic links followed), the rest as
/// written: where a bind mount of it would really point.
fn resolved(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Refuses `spec` with a reason unless it keeps to `policy`. `gpus` are the PCI
/// addresses of this host's inventory; `others` are the other specs this agent
/// holds (a spec of the same name is the one being replaced).
pub fn check<'a>(
    spec: &InstanceSpec,
    policy: &Policy,
    gpus: &[String],
    others: impl IntoIterator<Item = &'a InstanceSpec>,
) -> Result<(), String> {
    let (first, last) = policy.ssh_ports;
    if spec.ssh_port < u32::from(first) || spec.ssh_port > u32::from(last) {
        return Err(format!(
            "ssh port {} is outside this host's ssh_ports {first}-{last}",
            spec.ssh_port
        ));
    }
    let (rfirst, rlast) = policy.rdp_ports;
    if spec.rdp_port != 0 && (spec.rdp_port < u32::from(rfirst) || spec.rdp_port > u32::from(rlast))
    {
        return Err(format!(
            "RDP port {} is outside this host's rdp_ports {rfirst}-{rlast}",
            spec.rdp_port
        ));
    }
    ssp_model::parse_image(&spec.image).map_err(|e| e.to_string())?;
    let mut mine = BTreeSet::new();
    for pci in &spec.gpu_pci {
        if !gpus.contains(pci) {
            return Err(format!("GPU {pci} is not in this host's inventory"));
        }
        if !mine.insert(pci) {
            return Err(format!("GPU {pci} is given twice"));
        }
    }
    for o in others.into_iter().filter(|o| o.name != spec.name) {
        if let Some(pci) = o.gpu_pci.iter().find(|p| mine.contains(p)) {
            return Err(format!("GPU {pci} is held by {}", o.name));
        }
        if o.ssh_port == spec.ssh_port {
            return Err(format!("ssh port {} is held by {}", spec.ssh_port, o.name));
        }
        if spec.rdp_port != 0 && o.rdp_port == spec.rdp_port {
            return Err(format!("RDP port {} is held by {}", spec.rdp_port, o.name));
        }
    }
    let (ufirst, ulast) = policy.uid_range;
    if !spec.uid_range.is_empty() && spec.uid_range != format!("{ufirst}-{ulast}") {
        return Err(format!(
            "uid range {} is not this host's {ufirst}-{ulast}",
            spec.uid_range
        ));
    }
    for (what, id) in [("owner uid", spec.owner_uid), ("lab gid", spec.lab_gid)] {
        if !spec.uid_range.is_empty() && id != 0 && !(ufirst..=ulast).contains(&id) {
            return Err(format!(
                "{what} {id} is outside this host's uid range {ufirst}-{ulast}"
            ));
        }
    }
    if spec.owner_uid != 0 && spec.owner_uid == spec.lab_gid {
        return Err(format!(
            "owner uid {} is the lab gid, which is never a user's",
            spec.owner_uid
        ));
    }
    if !spec.accounts.is_empty() && !spec.common {
        return Err("accounts are only for a Common-Server".into());
    }
    let (mut names, mut uids) = (BTreeSet::new(), BTreeSet::new());
    for a in &spec.accounts {
        ssp_model::Username::parse(&a.name).map_err(|e| format!("account: {e}"))?;
        if !(ufirst..=ulast).contains(&a.uid) || a.uid == spec.lab_gid {
            return Err(format!(
                "account {} has uid {}, not one of this host's uid range {ufirst}-{ulast} (less the lab gid)",
                a.name, a.uid
            ));
        }
        if !names.insert(a.name.as_str()) || !uids.insert(a.uid) {
            return Err(format!(
                "account {} or uid {} is given twice",
                a.name, a.uid
            ));
        }
    }
    for s in &spec.shares {
        ShareMode::parse(&s.mode).map_err(|e| e.to_string())?;
        for (p, which) in [(&s.host_path, "host"), (&s.container_path, "container")] {
            if !clean_absolute(p) {
                return Err(format!(
                    "shared folder {which} path {p:?} must be absolute, without '..' or ','"
                ));
            }
        }
        let c = s.container_path.trim_end_matches('/');
        if c.is_empty()
            || SYSTEM_PATHS
                .iter()
                .any(|sys| c == *sys || c.starts_with(&format!("{sys}/")))
        {
            return Err(format!(
                "shared folder container path {} is / or a system folder",
                s.container_path
            ));
        }
        let host = resolved(Path::new(&s.host_path));
        let under = policy.shared_roots.iter().any(|r| {
            let root = resolved(r);
            host.starts_with(&root) && Path::new(&s.host_path).starts_with(r)
        });
        if !under {
            return Err(format!(
                "shared folder {} is not under this host's shared_roots ({}), or leads out of them",
                s.host_path,
                policy
                    .shared_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

/// Refuses a member list unless every name is a valid user name (they become lines
/// of passwd and group files), names and uids are unique, every uid lies in the
/// host's uid range and is not the lab gid, and the lab gid lies in it too.
pub fn check_members(m: &LabMembers, policy: &Policy) -> Result<(), String> {
    let (first, last) = policy.uid_range;
    let range = first..=last;
    if !range.contains(&m.lab_gid) {
        return Err(format!(
            "lab gid {} is outside this host's uid range {first}-{last}",
            m.lab_gid
        ));
    }
    let (mut names, mut uids) = (BTreeSet::new(), BTreeSet::new());
    for u in &m.members {
        ssp_model::Username::parse(&u.name).map_err(|e| e.to_string())?;
        if !range.contains(&u.uid) || u.uid == m.lab_gid {
            return Err(format!(
                "member {} has uid {}, outside this host's uid range {first}-{last} or the lab gid",
                u.name, u.uid
            ));
        }
        if !names.insert(&u.name) {
            return Err(format!("member {} is listed twice", u.name));
        }
        if !uids.insert(u.uid) {
            return Err(format!("uid {} is given to two members", u.uid));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssp_proto::SharedFolder;

    fn policy(root: &Path) -> Policy {
        Policy {
            shared_roots: vec![root.to_path_buf()],
            ssh_ports: (22000, 22099),
            rdp_ports: (23000, 23099),
            uid_range: (10000, 19999),
        }
    }

    fn spec(root: &Path) -> InstanceSpec {
        InstanceSpec {
            name: "alice".into(),
            owner: "alice".into(),
            owner_uid: 10000,
            image: "debian-ssh".into(),
            gpu_pci: vec!["0000:17:00.0".into()],
            ssh_port: 22000,
            shares: vec![SharedFolder {
                host_path: root.join("team").display().to_string(),
                container_path: "/shared".into(),
                mode: "rw".into(),
            }],
            uid_range: "10000-19999".into(),
            lab_gid: 19999,
            ..Default::default()
        }
    }

    fn account(name: &str, uid: u32) -> ssp_proto::Account {
        ssp_proto::Account {
            name: name.into(),
            uid,
            ssh_keys: vec![],
        }
    }

    #[test]
    fn a_spec_that_keeps_to_the_policy_passes_and_each_breach_is_named() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("shared");
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
        let p = policy(&root);
        let gpus = vec!["0000:17:00.0".to_string(), "0000:18:00.0".to_string()];
        let good = spec(&root);
        assert_eq!(check(&good, &p, &gpus, []), Ok(()));
        // The same name is the spec being replaced, not another holder.
        assert_eq!(check(&good, &p, &gpus, [&good]), Ok(()));

        let bob = InstanceSpec {
            name: "bob".into(),
            ssh_port: 22001,
            gpu_pci: vec!["0000:17:00.0".into()],
            ..good.clone()
        };
        let cases: Vec<(InstanceSpec, Vec<InstanceSpec>, &str)> = vec![
            (
                InstanceSpec {
                    ssh_port: 22,
                    ..good.clone()
                },
                vec![],
                "outside this host's ssh_ports",
            ),
            (
                InstanceSpec {
                    ssh_port: 7400,
                    ..good.clone()
                },
                vec![],
                "outside this host's ssh_ports",
            ),
            (
                InstanceSpec {
                    gpu_pci: vec!["0000:99:00.0".into()],
                    ..good.clone()
                },
                vec![],
                "not in this host's inventory",
            ),
            (
                InstanceSpec {
                    gpu_pci: vec!["0000:18:00.0".into(), "0000:18:00.0".into()],
                    ..good.clone()
                },
                vec![],
                "given twice",
            ),
            (good.clone(), vec![bob.clone()], "held by bob"),
            (
                InstanceSpec {
                    gpu_pci: vec![],
                    ..good.clone()
                },
                vec![InstanceSpec {
                    ssh_port: 22000,
                    ..bob.clone()
                }],
                "ssh port 22000 is held by bob",
            ),
            (
                InstanceSpec {
                    uid_range: "0-65535".into(),
                    ..good.clone()
                },
                vec![],
                "not this host's",
            ),
            (
                InstanceSpec {
                    owner_uid: 0,
                    lab_gid: 5,
                    ..good.clone()
                },
                vec![],
                "lab gid 5 is outside",
            ),
            (
                InstanceSpec {
                    owner_uid: 19999,
                    ..good.clone()
                },
                vec![],
                "is the lab gid",
            ),
            (
                InstanceSpec {
                    image: "../x".into(),
                    ..good.clone()
                },
                vec![],
                "invalid image alias",
            ),
            (
                InstanceSpec {
                    accounts: vec![account("alice", 10001)],
                    ..good.clone()
                },
                vec![],
                "only for a Common-Server",
            ),
            (
                InstanceSpec {
                    common: true,
                    accounts: vec![account("carol", 0)],
                    ..good.clone()
                },
                vec![],
                "has uid 0, not one of this host's uid range",
            ),
            (
                InstanceSpec {
                    common: true,
                    accounts: vec![account("alice", 19999)],
                    ..good.clone()
                },
                vec![],
                "less the lab gid",
            ),
            (
                InstanceSpec {
                    common: true,
                    accounts: vec![account("alice", 10001), account("bob", 10001)],
                    ..good.clone()
                },
                vec![],
                "given twice",
            ),
            (
                InstanceSpec {
                    common: true,
                    accounts: vec![account("a;b", 10001)],
                    ..good.clone()
                },
                vec![],
                "account: ",
            ),
        ];
        let common = InstanceSpec {
            common: true,
            accounts: vec![account("alice", 10001), account("bob", 10002)],
            ..good.clone()
        };
        assert_eq!(check(&common, &p, &gpus, []), Ok(()));
        for (s, others, want) in &cases {
            let e = check(s, &p, &gpus, others).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let share = |host: &str, cont: &str, mode: &str| InstanceSpec {
            shares: vec![SharedFolder {
                host_path: host.into(),
                container_path: cont.into(),
                mode: mode.into(),
            }],
            ..good.clone()
        };
        let r = root.display().to_string();
        for (s, want) in [
            (
                share("/", "/host", "rw"),
                "not under this host's shared_roots",
            ),
            (share("/etc", "/x", "rw"), "not under"),
            (share(&format!("{r}/../etc"), "/x", "rw"), "without '..'"),
            (
                share(&format!("{r}/escape/etc"), "/x", "rw"),
                "leads out of them",
            ),
            (share(&format!("{r}/x"), "/etc/x", "rw"), "system folder"),
            (share(&format!("{r}/x"), "/", "rw"), "system folder"),
            (share(&format!("{r}/x"), "rel", "rw"), "must be absolute"),
            (share(&format!("{r}/x"), "/x", "write"), "allowed modes"),
        ] {
            let e = check(&s, &p, &gpus, []).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        // A folder that does not exist yet under a root is fine.
        assert_eq!(
            check(
                &share(&format!("{r}/new/deeper"), "/x", "ro"),
                &p,
                &gpus,
                []
            ),
            Ok(())
        );
    }

    #[test]
    fn member_lists_keep_to_the_uid_range_and_valid_names() {
        use ssp_proto::LabMember;
        let p = policy(Path::new("/srv/ssp/shared"));
        let m = |names: &[(&str, u32)], gid: u32| LabMembers {
            members: names
                .iter()
                .map(|(n, u)| LabMember {
                    name: n.to_string(),
                    uid: *u,
                })
                .collect(),
            lab_gid: gid,
        };
        assert_eq!(
            check_members(&m(&[("ann", 10000), ("bob", 10001)], 19999), &p),
            Ok(())
        );
        assert_eq!(check_members(&m(&[], 19999), &p), Ok(()));
        for (bad, want) in [
            (m(&[("ann", 10000)], 0), "lab gid 0 is outside"),
            (m(&[("ann", 0)], 19999), "member ann has uid 0"),
            (m(&[("ann", 19999)], 19999), "or the lab gid"),
            (m(&[("ann", 20000)], 19999), "outside this host's uid range"),
            (m(&[("x:0:0", 10000)], 19999), "invalid user name"),
            (m(&[("ann\nroot", 10000)], 19999), "invalid user name"),
            (m(&[("ann", 10000), ("ann", 10001)], 19999), "listed twice"),
            (m(&[("ann", 10000), ("bob", 10000)], 19999), "two members"),
        ] {
            let e = check_members(&bad, &p).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
