//! lxcfs's post-stop hook, run by LXC at every container stop, sleeps 0.5 s so a
//! rebooting container does not see its old cgroup in lxcfs's cgroup view. Containers
//! with a cgroup namespace never mount that view, yet the sleep delays every restart
//! of a crashed container. `scripts/prepare-host.sh` replaces the hook with one that
//! sleeps only where the view is mounted; the agent warns where that was not done.

use std::path::Path;

/// Where Debian's lxcfs package puts the hook.
pub const REBOOT_HOOK: &str = "/usr/share/lxcfs/lxc.reboot.hook";

/// True when the hook at `path` sleeps unconditionally, as lxcfs's own does.
pub fn hook_sleeps_at_every_stop(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|text| text.lines().any(|l| l.trim_start().starts_with("sleep")))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_lxcfs_hook_from_the_replacement_and_from_none() {
        let dir = tempfile::tempdir().unwrap();
        let stock = dir.path().join("stock");
        std::fs::write(&stock, "#!/bin/sh -eu\n\nsleep 0.5s\n").unwrap();
        assert!(hook_sleeps_at_every_stop(&stock));
        let ours = dir.path().join("ours");
        std::fs::write(
            &ours,
            "#!/bin/sh -eu\n# the sleep is skipped\n[ -n \"${LXC_CGNS_AWARE:-}\" ] && exit 0\nexec /usr/share/lxcfs/lxc.reboot.hook.distrib\n",
        )
        .unwrap();
        assert!(!hook_sleeps_at_every_stop(&ours));
        assert!(!hook_sleeps_at_every_stop(&dir.path().join("absent")));
    }
}
