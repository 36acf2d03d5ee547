#!/usr/bin/env bash
# Kernel limits that many system containers on one host need, set now and kept in
# /etc/sysctl.d so that they hold after a reboot. Idempotent; never lowers a value.
#
# Every container's inotify instances and watches count against the host's root
# (the kernel charges a user namespace's use to the user that made it), so with
# Debian's default of 128 inotify instances the 15th or so Debian container fails
# to boot: systemd inside cannot start systemd-networkd and its .path units, and
# sshd never answers. The keys are the ones Incus's production-setup guide lists;
# those that grow with the number of containers are sized for SSP_MAX_CONTAINERS,
# never below the guide's value. A value set higher (by the admin, in a file or at
# run time) is kept: the file records the highest of ssp's, the running value and
# any other sysctl file's. ssp-agent checks the same table at every heartbeat and
# names a shortfall (`sspctl hosts`); keep the two in step (a unit test compares them).
#
#   SSP_MAX_CONTAINERS  how many containers this host is meant to hold (256)
#   SSP_SYSCTL_FILE     where the values are kept (/etc/sysctl.d/90-ssp.conf; it sorts
#                       after the daemons' packages' own, e.g. 10-incus-inotify.conf)
set -euo pipefail
N=${SSP_MAX_CONTAINERS:-256}
FILE=${SSP_SYSCTL_FILE:-/etc/sysctl.d/90-ssp.conf}
case "$N" in '' | *[!0-9]*) echo "host-limits: SSP_MAX_CONTAINERS=$N: expected a whole number of containers, e.g. 256" >&2; exit 2 ;; esac

# key                                per container   at least (Incus's guide)
LIMITS='
fs.inotify.max_user_instances        16              1048576
fs.inotify.max_user_watches          4096            1048576
fs.inotify.max_queued_events         0               1048576
kernel.keys.maxkeys                  0               2000
kernel.keys.maxbytes                 0               2000000
net.ipv4.neigh.default.gc_thresh3    2               8192
net.ipv6.neigh.default.gc_thresh3    2               8192
vm.max_map_count                     0               262144
'

# The highest value any other sysctl file gives KEY (what a boot would otherwise
# apply in some order), or nothing.
in_files() {
  local key=$1 f
  for f in /etc/sysctl.conf /etc/sysctl.d/*.conf /run/sysctl.d/*.conf /usr/local/lib/sysctl.d/*.conf \
           /usr/lib/sysctl.d/*.conf /lib/sysctl.d/*.conf; do
    [ -f "$f" ] && [ "$f" != "$FILE" ] || continue
    # "key = value" or "key=value"; the key may be written with / for .
    sed -n "s|^[[:space:]]*-\{0,1\}$(sed 's/[./]/[.\/]/g' <<<"$key")[[:space:]]*=[[:space:]]*\([0-9][0-9]*\)[[:space:]]*$|\1|p" "$f"
  done | sort -n | tail -n1
}

body="# Kernel limits for up to $N system containers on this host, from ssp
# (scripts/host-limits.sh). Values set higher elsewhere were kept as they were.
"
changed=()
while read -r key per least; do
  [ -n "$key" ] || continue
  path=/proc/sys/${key//.//}
  if [ ! -r "$path" ]; then
    # net.*.neigh.default lives only in the first network namespace.
    echo "host-limits: $key is not in this kernel or namespace; left alone" >&2
    continue
  fi
  now=$(cat "$path")
  want=$least
  [ $((per * N)) -le "$want" ] || want=$((per * N))
  [ "$now" -le "$want" ] || want=$now
  other=$(in_files "$key")
  [ -z "$other" ] || [ "$other" -le "$want" ] || want=$other
  body+="$key = $want
"
  if [ "$now" -lt "$want" ]; then
    if echo "$want" 2>/dev/null >"$path"; then
      changed+=("$key $now -> $want")
    else
      echo "host-limits: cannot set $key to $want (it stays $now until the next boot applies $FILE)" >&2
    fi
  fi
done <<<"$LIMITS"

if [ "$(cat "$FILE" 2>/dev/null)" != "${body%$'\n'}" ]; then
  mkdir -p "$(dirname "$FILE")"
  printf '%s' "$body" >"$FILE.ssp-new" && mv "$FILE.ssp-new" "$FILE"
  changed+=("wrote $FILE")
fi
if [ ${#changed[@]} -eq 0 ]; then
  echo "host-limits: kernel limits for $N containers: unchanged"
else
  printf 'host-limits: %s\n' "${changed[@]}"
fi
