#!/usr/bin/env bash
# Host preparation shared by the setup and the test suite. Idempotent.
# Arguments go to install-deps.sh (--test adds the test suite's packages).
#  - the Debian packages (install-deps.sh) and offline images (build-images.sh)
#  - /etc/subuid and /etc/subgid entries: root may map ssp's user uid range (each
#    container maps its owner's uid and the lab gid of it 1:1, for shared-folder
#    ownership), and has one large range for isolated idmaps
#  - lxcfs running, so free/top inside a container show its own limits
#  - the kernel limits that many containers need, now and after a reboot
#    (host-limits.sh; SSP_MAX_CONTAINERS sizes them)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/install-deps.sh" "$@"
if [ "${1:-}" = "--test" ]; then
  bash "$here/install-frp.sh"
  # The test suite logs in to a desktop container over RDP.
  SSP_DESKTOP_IMAGE=1 bash "$here/build-images.sh" >/dev/null
else
  bash "$here/build-images.sh" >/dev/null
fi

# Root needs one large range for isolated containers (each takes 65536 ids from it)
# and the lab's uid range, whose ids ssp maps 1:1 into containers (a container its
# owner's uid and the lab gid). Incus and LXD map every range of root's of 65536
# ids or more at id 0 of a container with the default idmap, so two large ranges
# make a plain `incus launch` fail (newuidmap: "Invalid argument"). ssp therefore adds a large range only where root has none, after every
# range already in the file, and records it; where a package added another large
# range for root later (Debian's lxd does at install), ssp's own goes again. Ranges
# the admin or other packages wrote are never changed.
SSP_UID_FIRST=${SSP_UID_FIRST:-10000}
SSP_UID_COUNT=${SSP_UID_COUNT:-10000}
mkdir -p /var/lib/ssp
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  rec=/var/lib/ssp/$(basename "$f")-added
  ours=$(cat "$rec" 2>/dev/null || true)
  large=$(awk -F: -v f="$SSP_UID_FIRST" -v c="$SSP_UID_COUNT" \
    '$1 == "root" && $3 >= 65536 && !($2 == f && $3 == c)' "$f")
  if [ -z "$large" ]; then
    next=$(awk -F: 'BEGIN { n = 1000000 } NF >= 3 && $2 + $3 > n { n = $2 + $3 } END { print n }' "$f")
    echo "root:$next:1000000000" >> "$f"
    echo "root:$next:1000000000" > "$rec"
  elif [ -n "$ours" ] && [ "$(grep -c . <<<"$large")" -gt 1 ] && grep -qx "$ours" <<<"$large"; then
    echo "prepare-host: root has another large range in $f; removing ssp's $ours" >&2
    grep -vx "$ours" "$f" > "$f.ssp-new" && cat "$f.ssp-new" > "$f" && rm -f "$f.ssp-new" "$rec"
  fi
  grep -qx "root:$SSP_UID_FIRST:$SSP_UID_COUNT" "$f" || echo "root:$SSP_UID_FIRST:$SSP_UID_COUNT" >> "$f"
done

# A live lxcfs answers under /var/lib/lxcfs/proc. After lxcfs dies its FUSE mount stays
# behind and every stat of it fails ("Transport endpoint is not connected"): detach
# that stale mount before starting a new lxcfs.
lxcfs_live() { [ -r /var/lib/lxcfs/proc/meminfo ] 2>/dev/null; }
if ! lxcfs_live; then
  if grep -q ' /var/lib/lxcfs ' /proc/mounts; then
    echo "prepare-host: detaching a stale lxcfs mount" >&2
    umount -l /var/lib/lxcfs 2>/dev/null || fusermount -uz /var/lib/lxcfs 2>/dev/null || true
  fi
  pkill -x lxcfs 2>/dev/null || true
  mkdir -p /var/lib/lxcfs /var/log/ssp
  setsid lxcfs /var/lib/lxcfs >/var/log/ssp/lxcfs.log 2>&1 < /dev/null &
  for _ in $(seq 1 50); do lxcfs_live && break; sleep 0.1; done
  lxcfs_live || { echo "prepare-host: lxcfs did not start; see /var/log/ssp/lxcfs.log" >&2; exit 1; }
fi

# lxcfs adds a post-stop hook to every LXC container (Incus and LXD alike) that sleeps
# 0.5 s, so that a rebooting container does not see its old cgroup in lxcfs's cgroup
# view. A container with a cgroup namespace never mounts that view (lxc.mount.hook
# exits first), yet the sleep delays every stop, and with it every restart of a
# crashed container, by half a second. The hook ssp puts in its place sleeps only
# where the view is mounted. dpkg-divert keeps lxcfs upgrades from undoing it;
# `dpkg-divert --local --rename --remove /usr/share/lxcfs/lxc.reboot.hook` reverts it.
HOOK=/usr/share/lxcfs/lxc.reboot.hook
if [ -e "$HOOK" ] && command -v dpkg-divert >/dev/null; then
  if [ "$(dpkg-divert --truename "$HOOK")" = "$HOOK" ]; then
    dpkg-divert --local --rename --divert "$HOOK.distrib" --add "$HOOK" >/dev/null
  fi
  want='#!/bin/sh -eu
# Put here by ssp (scripts/prepare-host.sh) in place of lxcfs'"'"'s hook, kept as
# lxc.reboot.hook.distrib. That hook sleeps 0.5 s so a rebooting container does not
# see its old cgroup in lxcfs'"'"'s cgroup view; containers with a cgroup namespace
# never mount that view (see lxc.mount.hook), so they stop without the sleep.
[ -n "${LXC_CGNS_AWARE:-}" ] && [ -f /proc/self/ns/cgroup ] && exit 0
exec /usr/share/lxcfs/lxc.reboot.hook.distrib'
  if [ "$(cat "$HOOK" 2>/dev/null)" != "$want" ]; then
    printf '%s\n' "$want" > "$HOOK.ssp-new" && chmod 755 "$HOOK.ssp-new" && mv "$HOOK.ssp-new" "$HOOK"
  fi
fi
bash "$here/host-limits.sh"
echo "prepare-host: ready"
