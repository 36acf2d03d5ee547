//! Host check at agent start: the cgroup controllers that ssp's limits need.
//! Without them the daemon still creates containers, and they fail at start with
//! an error that does not name the cause (on a cgroup2-only GPU machine,
//! `limits.memory` failed with "forkstart ... exit status 1" because lxc could not
//! enable the memory controller). The agent names the cause at start instead.

use std::path::Path;

/// Where the host's cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The controllers ssp's limits use and what breaks without each.
const CONTROLLERS: &[(&str, &str)] = &[
    (
        "memory",
        "containers with limits.memory will fail to start ('forkstart ... exit status 1')",
    ),
    (
        "pids",
        "containers with limits.processes will fail to start",
    ),
    (
        "cpuset",
        "limits.cpu (which CPUs a container may use) is not applied",
    ),
    ("cpu", "CPU time limits and priorities are not applied"),
];
/// On cgroup v1 device access is a controller too (cgroup2 uses eBPF instead).
const V1_ONLY: &[(&str, &str)] = &[(
    "devices",
    "device rules (the GPU nodes a container may open) cannot be applied: containers will fail to start",
)];

/// Problems with the cgroup controllers under `root`, each naming the controller,
/// the cause and its effect; empty when all is well. On a cgroup2-only host a
/// controller missing from the root's `cgroup.subtree_control` is enabled there,
/// as the daemon would try to.
pub fn cgroups(root: &Path) -> Vec<String> {
    check(root, |path, value| std::fs::write(path, value))
}

/// [`cgroups`] with the write to `cgroup.subtree_control` given, so tests never
/// write to the real /sys.
pub fn check(root: &Path, enable: impl Fn(&Path, &str) -> std::io::Result<()>) -> Vec<String> {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let words =
        |p: &Path| -> Vec<String> { read(p).split_whitespace().map(String::from).collect() };
    let v1 = |c: &str| root.join(c).join("cgroup.procs").is_file();
    let mut problems = Vec::new();
    let unified = root.join("cgroup.controllers");
    let any_v1 = CONTROLLERS.iter().chain(V1_ONLY).any(|(c, _)| v1(c));
    if unified.is_file() && !any_v1 {
        let available = words(&unified);
        let subtree = root.join("cgroup.subtree_control");
        let enabled = words(&subtree);
        for (c, effect) in CONTROLLERS {
            if !available.iter().any(|a| a == c) {
                problems.push(format!(
                    "cgroup controller {c} is not available (not in {}): {effect}",
                    unified.display()
                ));
            } else if !enabled.iter().any(|a| a == c) {
                if let Err(e) = enable(&subtree, &format!("+{c}")) {
                    problems.push(format!(
                        "cgroup controller {c} cannot be enabled in {} ({}): {effect}",
                        subtree.display(),
                        strip_os_error(&e)
                    ));
                }
            }
        }
        return problems;
    }
    if !root.is_dir() {
        return vec![format!(
            "no cgroup hierarchy at {}: containers with limits will fail to start",
            root.display()
        )];
    }
    // cgroup v1 or hybrid: each controller on its own v1 hierarchy, or else on
    // the cgroup2 hierarchy at unified/.
    let hybrid = words(&root.join("unified/cgroup.controllers"));
    for (c, effect) in CONTROLLERS.iter().chain(V1_ONLY) {
        if !v1(c) && !hybrid.iter().any(|a| a == c) {
            problems.push(format!(
                "cgroup v1 hierarchy {c} is not mounted at {}: {effect}",
                root.join(c).display()
            ));
        }
    }
    problems
}

/// "Device or resource busy (os error 16)" → "Device or resource busy".
fn strip_os_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn busy(_: &Path, _: &str) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    }

    #[test]
    fn cgroup2_names_missing_and_unenablable_controllers() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write(root, "cgroup.controllers", "cpuset cpu io memory hugetlb\n");
        write(root, "cgroup.subtree_control", "cpu\n");
        write(root, "cgroup.procs", "1\n");
        let p = check(root, busy);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with(&format!(
            "cgroup controller memory cannot be enabled in {}/cgroup.subtree_control (Device or resource busy): containers with limits.memory will fail to start",
            root.display()
        )), "{p:?}");
        assert!(
            p[1].starts_with("cgroup controller pids is not available"),
            "{p:?}"
        );
        assert!(p[1].contains("limits.processes"), "{p:?}");
        assert!(
            p[2].starts_with("cgroup controller cpuset cannot be enabled"),
            "{p:?}"
        );
    }

    #[test]
    fn cgroup2_enables_what_it_can_and_then_is_quiet() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write(root, "cgroup.controllers", "cpuset cpu io memory pids\n");
        write(root, "cgroup.subtree_control", "cpu\n");
        let asked = std::sync::Mutex::new(Vec::new());
        let p = check(root, |path, v| {
            assert_eq!(path, root.join("cgroup.subtree_control"));
            asked.lock().unwrap().push(v.to_string());
            Ok(())
        });
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(*asked.lock().unwrap(), ["+memory", "+pids", "+cpuset"]);
    }

    #[test]
    fn hybrid_checks_the_v1_hierarchies() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for c in ["cpu", "cpuset", "memory", "devices"] {
            write(root, &format!("{c}/cgroup.procs"), "");
        }
        write(root, "unified/cgroup.controllers", "");
        write(root, "unified/cgroup.procs", "");
        let p = check(root, busy);
        assert_eq!(
            p,
            [format!(
                "cgroup v1 hierarchy pids is not mounted at {}/pids: containers with limits.processes will fail to start",
                root.display()
            )]
        );
        write(root, "pids/cgroup.procs", "");
        assert!(check(root, busy).is_empty());
        // A controller on the cgroup2 side of a hybrid host is fine too.
        std::fs::remove_file(root.join("pids/cgroup.procs")).unwrap();
        write(root, "unified/cgroup.controllers", "pids\n");
        assert!(check(root, busy).is_empty());
    }

    #[test]
    fn no_hierarchy_at_all() {
        let t = tempfile::tempdir().unwrap();
        let p = check(&t.path().join("absent"), busy);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("no cgroup hierarchy at"), "{p:?}");
    }
}
