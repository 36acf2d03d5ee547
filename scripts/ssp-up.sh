#!/usr/bin/env bash
# One command for a fresh Debian 12 host (as root): installs what ssp needs, uses the
# Incus or LXD daemon already there (or installs, starts and initialises Incus),
# builds and installs ssp, starts a single-node coordinator and an agent, adds a
# demo user and prints the ssh command that logs in. Idempotent: run it again at will.
#
# Settings (environment):
#   SSP_ETC        config dir                       (/etc/ssp)
#   SSP_POOL_SIZE  size of a new btrfs pool          (30GiB)
#   SSP_SSH_HOST   address users ssh to              (first address of `hostname -I`)
#   SSP_DEMO_USER  name of the demo user             (demo)
#   SSP_SHARED     the lab's shared folder, /shared inside every container (/srv/ssp/shared)
#   SSP_BIN        where the binaries are installed (/usr/local/bin)
#   SSP_STATE      parent of the coordinator's and agent's state dirs (/var/lib)
#   SSP_LOG, SSP_RUN  logs and pid files            (/var/log/ssp, /run/ssp)
#   INCUS_DIR      use (or start) the Incus daemon of this state dir only
set -Eeuo pipefail
cd "$(dirname "$0")/.."
STEP="starting"
say() { printf 'ssp-up: %s\n' "$*"; }
step() { STEP="$*"; say "$* (at ${SECONDS}s)"; }
# Never fail silently: name the step that failed and how to retry.
trap 'rc=$?; say "FAILED (exit $rc) while $STEP, at scripts/ssp-up.sh line $LINENO." >&2
      say "fix the cause printed above, then run again: bash scripts/ssp-up.sh (it is idempotent)" >&2' ERR
ETC=${SSP_ETC:-/etc/ssp}
LOG=${SSP_LOG:-/var/log/ssp}
RUN=${SSP_RUN:-/run/ssp}
BIN=${SSP_BIN:-/usr/local/bin}
STATE=${SSP_STATE:-/var/lib}
SHARED=${SSP_SHARED:-/srv/ssp/shared}
DEMO=${SSP_DEMO_USER:-demo}
mkdir -p "$ETC" "$LOG" "$RUN" "$BIN"
export PATH="$BIN:$PATH"

step "checking for a Rust toolchain"
bash scripts/ensure-rust.sh
export PATH="$HOME/.cargo/bin:$PATH"
step "preparing the host (Debian packages, images, /etc/subuid, lxcfs)"
bash scripts/prepare-host.sh

systemd_pid1() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }

# --- the daemon: the one that is there, else Incus -------------------------------
step "finding the Incus or LXD daemon"
CLI=""; SOCKET=""
if [ -S "${INCUS_DIR:-/var/lib/incus}/unix.socket" ] && incus info >/dev/null 2>&1; then
  CLI=incus; SOCKET="${INCUS_DIR:-/var/lib/incus}/unix.socket"
elif [ -z "${INCUS_DIR:-}" ] && [ -S /var/snap/lxd/common/lxd/unix.socket ] && lxc info >/dev/null 2>&1; then
  CLI=lxc; SOCKET=/var/snap/lxd/common/lxd/unix.socket
elif [ -z "${INCUS_DIR:-}" ] && [ -S /var/lib/lxd/unix.socket ] && lxc info >/dev/null 2>&1; then
  CLI=lxc; SOCKET=/var/lib/lxd/unix.socket
else
  step "starting Incus"
  if systemd_pid1 && [ -z "${INCUS_DIR:-}" ]; then
    systemctl enable --now incus.socket incus.service
  else
    # incusd makes its own dir, but not the folders above it.
    mkdir -p "${INCUS_DIR:-/var/lib/incus}"
    # As many open files as Debian's incus.service gives it (LimitNOFILE), or as
    # many as this shell may give; the daemon holds some for every container.
    ulimit -Hn 1048576 2>/dev/null || true
    ulimit -n "$(ulimit -Hn)"
    setsid /usr/libexec/incus/incusd --group root --logfile "$LOG/incusd.log" \
      </dev/null >>"$LOG/incusd.out" 2>&1 &
    echo $! > "$RUN/incusd.pid"
  fi
  incus admin waitready --timeout 60 ||
    { say "Incus did not become ready; see $LOG/incusd.log"; false; }
  CLI=incus; SOCKET="${INCUS_DIR:-/var/lib/incus}/unix.socket"
fi
say "using $CLI at $SOCKET"

# Storage that clones rather than copies, a bridge without NAT, and a default profile.
step "setting up the storage pool, bridge and default profile"
if [ -z "$($CLI storage list -f csv | head -n1)" ]; then
  say "creating btrfs storage pool 'default' (${SSP_POOL_SIZE:-30GiB}, loop file)"
  $CLI storage create default btrfs "size=${SSP_POOL_SIZE:-30GiB}"
fi
POOL=$($CLI profile device get default root pool 2>/dev/null || true)
if [ -z "$POOL" ]; then
  POOL=$($CLI storage list -f csv | head -n1 | cut -d, -f1)
  $CLI profile device add default root disk path=/ "pool=$POOL"
fi
if ! $CLI profile device show default | grep -q '^eth0:'; then
  net=$($CLI network show sspbr0 2>/dev/null || true)
  if [ -n "$net" ] && ! grep -q '^managed: true' <<<"$net"; then
    # An interface of that name the daemon does not manage: a bridge left behind by
    # an earlier daemon (its state was removed, the kernel bridge was not) goes when
    # nothing is attached to it; anything else is the admin's, and ssp stops.
    if [ -d /sys/class/net/sspbr0/bridge ] && [ -z "$(ls /sys/class/net/sspbr0/brif 2>/dev/null)" ]; then
      say "removing the unused bridge sspbr0 that $CLI does not manage (left by an earlier daemon)"
      ip link delete sspbr0
      net=""
    else
      say "an interface named sspbr0 exists that $CLI does not manage; remove it or free the name, then run ssp-up again" >&2
      false
    fi
  fi
  if [ -z "$net" ]; then
    # An explicit subnet (no auto-detection) and no NAT: containers reach this host only.
    # ssp gives its containers static addresses from the top of the subnet; dynamic
    # leases for other containers stay in the lower half.
    $CLI network create sspbr0 ipv4.address=10.211.0.1/24 ipv4.nat=false ipv6.address=none \
      ipv4.dhcp.ranges=10.211.0.2-10.211.0.127
  fi
  $CLI profile device add default eth0 nic network=sspbr0 name=eth0
fi
step "importing the images"
CACHE=${SSP_IMAGE_CACHE:-/var/cache/ssp/images}
# The alias follows the cached image: after build-images.sh changed an image, new
# containers start from the new one (containers of the old one keep it).
for img in busybox debian-ssh; do
  want=$(sha256sum "$CACHE/$img.tar.gz" | cut -d' ' -f1)
  # A daemon that has no image of that alias yet answers with an error: have stays empty.
  have=$($CLI image info "$img" 2>/dev/null | awk '/^Fingerprint:/ {print $2}' || true)
  if [ "$have" != "$want" ]; then
    [ -z "$have" ] || $CLI image alias delete "$img"
    $CLI image import "$CACHE/$img.tar.gz" --alias "$img" 2>/dev/null ||
      $CLI image alias create "$img" "$want"
  fi
done

# --- ssp itself --------------------------------------------------------------------
step "building ssp (release)"
cargo build --release --locked --bins -q
# A coordinator or agent still running an older build (its executable was replaced,
# so /proc/PID/exe no longer names the installed file) is restarted below.
stale() { [ -n "$1" ] && [ "$1" != 0 ] && [ "$(readlink "/proc/$1/exe")" != "$BIN/$2" ]; }
for b in ssp-agent ssp-coordinator sspctl; do
  cmp -s "target/release/$b" "$BIN/$b" || install -m 0755 "target/release/$b" "$BIN/"
done

step "starting the coordinator and the agent"
HOST=$(hostname -s | tr 'A-Z_.' 'a-z--' | cut -c1-63)
SSH_HOST=${SSP_SSH_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}
SSH_HOST=${SSH_HOST:-127.0.0.1}
[ -f "$ETC/coordinator.toml" ] || cat > "$ETC/coordinator.toml" <<CFG
listen = "0.0.0.0:7400"
# This host's first coordinator forms a one-node cluster; more join with: sspctl cluster join ADDRESS
bootstrap = true
data_dir = "$STATE/ssp-coordinator"
shared_roots = ["$SHARED"]
# Every user gets the lab's shared folder, writable by every member (files keep
# their writer as owner, and only they rename or remove them); ":ro" after a
# share makes it read-only.
default_shares = ["$SHARED:/shared"]
CFG
[ -f "$ETC/agent.toml" ] || cat > "$ETC/agent.toml" <<CFG
name = "$HOST"
listen = "0.0.0.0:7401"
advertise = "http://127.0.0.1:7401"
coordinators = ["http://127.0.0.1:7400"]
socket = "$SOCKET"
ssh_host = "$SSH_HOST"
storage_pool = "$POOL"
state_dir = "$STATE/ssp-agent"
shared_roots = ["$SHARED"]
# Used once, at the agent's first start, to get its certificate from the coordinator.
token_file = "$ETC/agent.token"
CFG
grep -q '^token_file' "$ETC/agent.toml" || echo "token_file = \"$ETC/agent.token\"" >> "$ETC/agent.toml"
# sspctl presents the first admin's certificate (made when the cluster formed).
export SSP_BUNDLE=${SSP_BUNDLE:-$HOME/.config/ssp/bundle.pem}
ADMIN_BUNDLE=$STATE/ssp-coordinator/tls/admin.bundle
login_admin() {
  for _ in $(seq 1 100); do [ -f "$ADMIN_BUNDLE" ] && break; sleep 0.2; done
  [ -f "$ADMIN_BUNDLE" ] || { say "the coordinator made no admin credentials; see $LOG"; exit 1; }
  if ! cmp -s <(sed -n '/BEGIN CERTIFICATE/,$p' "$ADMIN_BUNDLE") <(sed -n '/BEGIN CERTIFICATE/,$p' "$SSP_BUNDLE" 2>/dev/null); then
    sspctl login "$ADMIN_BUNDLE" >/dev/null
    say "sspctl logs in with $SSP_BUNDLE (the cluster's first admin)"
  fi
}
# The agent's join token: made only while the agent has no certificate yet.
agent_token() {
  [ -f "$STATE/ssp-agent/tls/node.bundle" ] && return 0
  sspctl token create --role agent --ttl 1h --out "$ETC/agent.token"
}

# systemd units name the default paths; other paths run as plain processes.
if systemd_pid1 && [ "$BIN" = /usr/local/bin ] && [ "$ETC" = /etc/ssp ] && [ "$STATE" = /var/lib ]; then
  install -m 0644 deploy/systemd/ssp-coordinator.service deploy/systemd/ssp-agent.service /etc/systemd/system/
  systemctl daemon-reload
  systemctl enable --now ssp-coordinator.service
  login_admin
  agent_token
  systemctl enable --now ssp-agent.service
  for b in ssp-coordinator ssp-agent; do
    if stale "$(systemctl show -p MainPID --value "$b.service")" "$b"; then
      say "restarting $b (new build)"
      systemctl restart "$b.service"
    fi
  done
else
  start() { # name, binary, config
    if [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; then
      pid=$(cat "$RUN/$1.pid")
      stale "$pid" "$1" || return 0
      say "restarting $1 (new build)"
      kill "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    setsid "$2" --config "$3" </dev/null >>"$LOG/$1.log" 2>&1 &
    echo $! > "$RUN/$1.pid"
  }
  start ssp-coordinator "$BIN/ssp-coordinator" "$ETC/coordinator.toml"
  login_admin
  agent_token
  start ssp-agent "$BIN/ssp-agent" "$ETC/agent.toml"
fi

for _ in $(seq 1 100); do
  sspctl -o json hosts 2>/dev/null | grep -q "\"name\": \"$HOST\"" && break
  sleep 0.3
done
sspctl -o json hosts | grep -q "\"name\": \"$HOST\"" || { say "the agent did not register; see $LOG"; exit 1; }

# --- a demo user you can ssh into -----------------------------------------------------
step "adding the demo user $DEMO and logging in"
KEY=$HOME/.ssh/ssp-$DEMO
mkdir -p "$HOME/.ssh"
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -C "ssp-$DEMO" -f "$KEY"
USERS=$(sspctl -o json user list)
if ! grep -q "\"name\": \"$DEMO\"" <<<"$USERS"; then
  sspctl user add "$DEMO" --ssh-key "$KEY.pub" --credentials-out "$ETC/credentials/$DEMO.bundle"
elif ! grep -qF "$(cut -d' ' -f2 "$KEY.pub")" <<<"$USERS"; then
  # The demo user is there from an earlier run, but this key file is new.
  say "giving $DEMO the key $KEY.pub"
  sspctl user keys "$DEMO" --ssh-key "$KEY.pub"
fi
sspctl ssh-config "$DEMO" --identity "$KEY" > "$HOME/.ssh/ssp-$DEMO.conf"
# The check is of the login path and key; the container's host key is the user's to
# accept (a stale known_hosts entry from an earlier demo container must not fail it).
login() { ssh -F "$HOME/.ssh/ssp-$DEMO.conf" -o BatchMode=yes -o ConnectTimeout=3 \
  -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "ssp-$DEMO" true; }
for _ in $(seq 1 60); do
  login 2>/dev/null && break
  sleep 1
done
login || { say "cannot log in as $DEMO (ssh output above); see $LOG"; exit 1; }
sspctl ls
say "ready (${SECONDS}s). Log in with:"
echo "  ssh -F $HOME/.ssh/ssp-$DEMO.conf ssp-$DEMO"
