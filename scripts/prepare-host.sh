#!/usr/bin/env bash
# Host preparation shared by the setup and the test suite. Idempotent.
# Arguments go to install-deps.sh (--test adds the test suite's packages).
#  - the Debian packages (install-deps.sh) and offline images (build-images.sh)
#  - /etc/subuid and /etc/subgid entries: root may map ssp's user uid range 1:1 into
#    containers (shared-folder ownership), beside the large range for isolated idmaps
#  - lxcfs running, so free/top inside a container show its own limits
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/install-deps.sh" "$@"
bash "$here/build-images.sh" >/dev/null

SSP_UID_FIRST=${SSP_UID_FIRST:-10000}
SSP_UID_COUNT=${SSP_UID_COUNT:-10000}
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  grep -qx "root:1000000:1000000000" "$f" || echo "root:1000000:1000000000" >> "$f"
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
echo "prepare-host: ready"
