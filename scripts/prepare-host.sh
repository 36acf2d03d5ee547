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
echo "prepare-host: ready"
