//! The kernel and daemon limits that many containers on one host share, checked
//! against the number of containers the host is meant to hold (`max_containers`).
//!
//! The kernel charges every container's inotify instances and watches to the
//! host's root (a user namespace's use counts against the user that made it), so
//! with Debian's default of 128 inotify instances the 15th or so Debian container
//! fails to boot: systemd inside cannot start systemd-networkd or its `.path`
//! units, and sshd never answers. `scripts/host-limits.sh` sets these limits from
//! the same table (a test below keeps the two in step); the agent names any
//! shortfall with the number of containers the value allows, at every heartbeat,
//! and `sspctl hosts` shows it.

use std::path::Path;

/// How many containers a host is meant to hold unless its agent says otherwise.
pub const DEFAULT_CONTAINERS: u32 = 256;

/// One sysctl: what each container needs of it, and the least any host with
/// many containers should have (Incus's production-setup guide).
pub struct Sysctl {
    pub key: &'static str,
    /// Charged once per container, from one budget for the whole host (0: a
    /// per-process or per-user limit that does not add up).
    pub per_container: u64,
    pub at_least: u64,
    /// What runs short without it.
    pub what: &'static str,
}

/// The table `scripts/host-limits.sh` writes.
pub const SYSCTLS: &[Sysctl] = &[
    Sysctl {
        key: "fs.inotify.max_user_instances",
        per_container: 16,
        at_least: 1048576,
        what: "inotify instances, from one budget of root's for every container: a booted Debian container takes 8, logins and IDEs more; without them systemd inside fails units and SSH never answers",
    },
    Sysctl {
        key: "fs.inotify.max_user_watches",
        per_container: 4096,
        at_least: 1048576,
        what: "inotify watches, from the same budget: an IDE watching a project takes thousands",
    },
    Sysctl {
        key: "fs.inotify.max_queued_events",
        per_container: 0,
        at_least: 1048576,
        what: "events an inotify instance may queue before it loses some",
    },
    Sysctl {
        key: "kernel.keys.maxkeys",
        per_container: 0,
        at_least: 2000,
        what: "keys each container's users may hold, for session keyrings",
    },
    Sysctl {
        key: "kernel.keys.maxbytes",
        per_container: 0,
        at_least: 2000000,
        what: "bytes of keys each container's users may hold",
    },
    Sysctl {
        key: "net.ipv4.neigh.default.gc_thresh3",
        per_container: 2,
        at_least: 8192,
        what: "IPv4 neighbour entries, one or two a container; past it the host drops containers' addresses",
    },
    Sysctl {
        key: "net.ipv6.neigh.default.gc_thresh3",
        per_container: 2,
        at_least: 8192,
        what: "IPv6 neighbour entries, as for IPv4",
    },
    Sysctl {
        key: "vm.max_map_count",
        per_container: 0,
        at_least: 262144,
        what: "memory mappings a process may have: databases, JVMs and ML frameworks need many",
    },
];

/// Open files the daemon holds for itself, and for each container.
pub const DAEMON_FILES_OWN: u64 = 256;
pub const DAEMON_FILES_PER_CONTAINER: u64 = 4;

/// How many containers `value` of `s` is enough for, if it grows with them.
pub fn allows(s: &Sysctl, value: u64) -> Option<u64> {
    (s.per_container > 0).then(|| value / s.per_container)
}

/// The shortfalls of a host meant for `containers`, with `read` giving a sysctl's
/// value (None: not in this kernel or namespace, e.g. `net.*.neigh.default`
/// outside the first network namespace; not a shortfall).
pub fn shortfalls(containers: u32, read: impl Fn(&str) -> Option<u64>) -> Vec<String> {
    let n = u64::from(containers);
    let mut out = Vec::new();
    for s in SYSCTLS {
        let Some(v) = read(s.key) else { continue };
        match allows(s, v) {
            Some(fits) if fits < n => out.push(format!(
                "{} is {v}: enough for about {fits} containers ({} each: {}); this host is meant for {n} (the agent's max_containers): set it to at least {} in /etc/sysctl.d (scripts/prepare-host.sh does)",
                s.key,
                s.per_container,
                s.what,
                s.per_container * n
            )),
            None if v < s.at_least => out.push(format!(
                "{} is {v}, below the {} a host with many containers needs ({}): set it in /etc/sysctl.d (scripts/prepare-host.sh does)",
                s.key, s.at_least, s.what
            )),
            _ => {}
        }
    }
    out
}

/// A sysctl's value from `/proc/sys` (the first number in the file).
pub fn read_proc_sys(key: &str) -> Option<u64> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The soft "Max open files" of a `/proc/PID/limits` text ("unlimited": u64::MAX).
pub fn open_files(limits: &str) -> Option<u64> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    match rest.split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// The shortfall of a daemon that may open `soft` files, for `containers`.
pub fn daemon_shortfall(pid: u32, soft: u64, containers: u32) -> Option<String> {
    let fits = soft.saturating_sub(DAEMON_FILES_OWN) / DAEMON_FILES_PER_CONTAINER;
    (fits < u64::from(containers)).then(|| {
        format!(
            "the daemon (pid {pid}) may open {soft} files: enough for about {fits} containers ({DAEMON_FILES_PER_CONTAINER} each, after {DAEMON_FILES_OWN} of its own); this host is meant for {containers} (the agent's max_containers): raise its open-files limit (LimitNOFILE in its systemd unit, or ulimit -n where it is started by hand) to at least {}",
            DAEMON_FILES_OWN + DAEMON_FILES_PER_CONTAINER * u64::from(containers)
        )
    })
}

/// The pid of the daemon behind `client`: the `environment.server_pid` it reports
/// (Incus, and LXD since 3.x), else the peer of a connection to its socket. None
/// where neither names an Incus or LXD process (a socket that systemd's socket
/// activation holds as pid 1: Debian's units set LimitNOFILE=1048576 themselves).
pub async fn daemon_pid(client: &ssp_lxd::Client) -> Option<u32> {
    let reported = client
        .get("/1.0")
        .await
        .ok()
        .and_then(|v| v["environment"]["server_pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok());
    let pid = match reported {
        Some(p) => p,
        None => {
            let conn = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::UnixStream::connect(client.socket()),
            )
            .await
            .ok()?
            .ok()?;
            u32::try_from(conn.peer_cred().ok()?.pid()?).ok()?
        }
    };
    is_daemon(pid).then_some(pid)
}

/// True when `pid` is an Incus or LXD daemon process (a pid read earlier may be
/// gone, or taken by another process, after the daemon restarted).
pub fn is_daemon(pid: u32) -> bool {
    pid > 1
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| matches!(c.trim(), "incusd" | "lxd"))
}

/// Every shortfall of this host for `containers`: the sysctls, and the open
/// files of the daemon process `daemon` (see [`daemon_pid`]).
pub fn check(containers: u32, daemon: Option<u32>) -> Vec<String> {
    let mut out = shortfalls(containers, read_proc_sys);
    if let Some(pid) = daemon {
        let soft = std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()
            .and_then(|l| open_files(&l));
        if let Some(p) = soft.and_then(|s| daemon_shortfall(pid, s, containers)) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn values(pairs: &[(&str, u64)]) -> impl Fn(&str) -> Option<u64> {
        let m: HashMap<String, u64> = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        move |k: &str| m.get(k).copied()
    }

    /// Incus's guide values: no shortfall for the default number of containers.
    fn guide() -> Vec<(&'static str, u64)> {
        SYSCTLS.iter().map(|s| (s.key, s.at_least)).collect()
    }

    #[test]
    fn the_guide_values_are_enough_for_the_default_number_of_containers() {
        assert_eq!(
            shortfalls(DEFAULT_CONTAINERS, values(&guide())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn debians_defaults_are_named_with_the_containers_they_allow() {
        let debian = [
            ("fs.inotify.max_user_instances", 128),
            ("fs.inotify.max_user_watches", 192540),
            ("fs.inotify.max_queued_events", 16384),
            ("kernel.keys.maxkeys", 200),
            ("kernel.keys.maxbytes", 20000),
            ("net.ipv4.neigh.default.gc_thresh3", 1024),
            ("net.ipv6.neigh.default.gc_thresh3", 1024),
            ("vm.max_map_count", 65530),
        ];
        let p = shortfalls(60, values(&debian));
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(
            p[0].starts_with(
                "fs.inotify.max_user_instances is 128: enough for about 8 containers (16 each: "
            ),
            "{}",
            p[0]
        );
        assert!(
            p[0].ends_with("this host is meant for 60 (the agent's max_containers): set it to at least 960 in /etc/sysctl.d (scripts/prepare-host.sh does)"),
            "{}",
            p[0]
        );
        assert!(p[1].starts_with(
            "fs.inotify.max_user_watches is 192540: enough for about 47 containers (4096 each: "
        ));
        assert!(p[2].starts_with("fs.inotify.max_queued_events is 16384, below the 1048576 "));
        assert!(p[3].starts_with("kernel.keys.maxkeys is 200, below the 2000 "));
        assert!(p[4].starts_with("kernel.keys.maxbytes is 20000, below "));
        assert!(p[5].starts_with("vm.max_map_count is 65530, below the 262144 "));
        // 192540 watches are enough for 47 containers, 1024 neighbours for 512.
        assert_eq!(
            shortfalls(47, values(&[("fs.inotify.max_user_watches", 192540)])).len(),
            0
        );
        assert_eq!(
            shortfalls(48, values(&[("fs.inotify.max_user_watches", 192540)])).len(),
            1
        );
    }

    #[test]
    fn a_key_this_kernel_or_namespace_lacks_is_no_shortfall() {
        let mut v = guide();
        v.retain(|(k, _)| !k.contains("neigh"));
        assert_eq!(
            shortfalls(DEFAULT_CONTAINERS, values(&v)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_daemons_open_files_are_counted_after_its_own() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";
        assert_eq!(open_files(limits), Some(1024));
        assert_eq!(
            open_files("Max open files            unlimited            unlimited            files"),
            Some(u64::MAX)
        );
        assert_eq!(open_files("Max processes 10 10 processes"), None);
        let p = daemon_shortfall(77, 1024, 256).expect("1024 files are too few for 256");
        assert!(
            p.starts_with(
                "the daemon (pid 77) may open 1024 files: enough for about 192 containers"
            ),
            "{p}"
        );
        assert!(p.ends_with("to at least 1280"), "{p}");
        assert_eq!(daemon_shortfall(77, 1280, 256), None);
        // Fewer files than the daemon's own: room for no container at all.
        assert!(daemon_shortfall(77, 100, 1)
            .unwrap()
            .contains("enough for about 0 containers"));
    }

    /// scripts/host-limits.sh writes what the agent checks: the same keys, in the
    /// same order, with the same figures.
    #[test]
    fn the_setup_script_has_the_same_table() {
        let script = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/host-limits.sh"),
        )
        .expect("scripts/host-limits.sh");
        let table = script
            .split("LIMITS='")
            .nth(1)
            .and_then(|t| t.split('\'').next())
            .expect("the LIMITS table in scripts/host-limits.sh");
        let rows: Vec<(String, u64, u64)> = table
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].to_string(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        let ours: Vec<(String, u64, u64)> = SYSCTLS
            .iter()
            .map(|s| (s.key.to_string(), s.per_container, s.at_least))
            .collect();
        assert_eq!(rows, ours);
        assert!(script.contains(&format!("SSP_MAX_CONTAINERS:-{DEFAULT_CONTAINERS}")));
    }
}
