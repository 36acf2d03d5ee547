#!/usr/bin/env bash
# Builds ssp's offline images as unified tarballs (rootfs/ + metadata.yaml). Idempotent:
# a tarball already in the cache is kept.
#   busybox.tar.gz        ~1 MB, boots in well under a second (tests, resync benchmarks)
#   debian-ssh.tar.gz     Debian 12 minbase with systemd and openssh-server (user containers)
#   debian-desktop.tar.gz the same with xrdp and Xfce (--desktop; only with SSP_DESKTOP_IMAGE=1)
set -euo pipefail
CACHE=${SSP_IMAGE_CACHE:-/var/cache/ssp/images}
mkdir -p "$CACHE"
# Images are rebuilt whenever this recipe changes.
recipe=$(sha256sum "$0" | cut -c1-16)
if [ "$(cat "$CACHE/recipe" 2>/dev/null)" != "$recipe" ]; then
  rm -f "$CACHE/busybox.tar.gz" "$CACHE/debian-ssh.tar.gz" "$CACHE/debian-desktop.tar.gz"
fi

metadata() { # $1 dir, $2 description
  cat > "$1/metadata.yaml" <<META
architecture: x86_64
creation_date: $(date +%s)
properties:
  architecture: x86_64
  description: $2
  os: $3
  release: "$4"
META
  # Extra properties, e.g. ssp.account: boot (the image creates the owner's account at boot).
  [ -z "${5:-}" ] || printf '  %s\n' "$5" >> "$1/metadata.yaml"
}

if [ ! -s "$CACHE/busybox.tar.gz" ]; then
  d=$(mktemp -d); r="$d/rootfs"
  mkdir -p "$r"/{bin,sbin,etc,proc,sys,dev,tmp,root,run,var/log,home,usr/bin,usr/sbin}
  cp /bin/busybox "$r/bin/busybox"
  for a in $("$r/bin/busybox" --list); do
    [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
  done
  ln -sf ../bin/busybox "$r/sbin/init"
  cat > "$r/etc/inittab" <<'TAB'
::sysinit:/bin/mount -t tmpfs tmpfs /tmp
::respawn:/bin/sleep 2147483647
::ctrlaltdel:/bin/true
::shutdown:/bin/true
TAB
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$r/etc/passwd"
  printf 'root:x:0:\n' > "$r/etc/group"
  chmod 1777 "$r/tmp"
  metadata "$d" "busybox (ssp test image)" busybox 1
  tar -C "$d" -czf "$CACHE/busybox.tar.gz.tmp" rootfs metadata.yaml
  mv "$CACHE/busybox.tar.gz.tmp" "$CACHE/busybox.tar.gz"
  rm -rf "$d"
  echo "build-images: busybox image built"
fi

# debian_image NAME EXTRA_PACKAGES DESCRIPTION [HOOK]: Debian 12 minbase with systemd,
# openssh-server and ssp's boot units, plus ",pkg,pkg" EXTRA_PACKAGES; HOOK is
# called with the root file system before it is packed.
debian_image() {
  mirror=${SSP_DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then
    mirror=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/) {print u; exit} }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  fi
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$mirror" ] || { echo "build-images: no Debian bookworm apt source found; set SSP_DEBIAN_MIRROR" >&2; exit 1; }
  d=$(mktemp -d); r="$d/rootfs"
  # libnss-extrausers: the lab's member list, which the agent keeps in one host
  # folder mounted read-only at /var/lib/extrausers in every container.
  debootstrap --variant=minbase \
    --include=openssh-server,sudo,python3,iproute2,systemd-sysv,dbus,passwd,procps,libnss-extrausers$2 \
    bookworm "$r" "$mirror"
  # Every container gets its own host keys on first boot, not the image's.
  rm -f "$r"/etc/ssh/ssh_host_*
  cat > "$r/etc/systemd/system/ssp-hostkeys.service" <<'UNIT'
[Unit]
Description=Generate this container's SSH host keys
# Early (beside sysinit, not after basic.target): sshd waits for this unit.
DefaultDependencies=no
After=local-fs.target
Before=ssh.service shutdown.target
Conflicts=shutdown.target
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# ed25519 and ECDSA only: RSA key generation takes seconds, at random, on every first boot.
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N "" -f /etc/ssh/ssh_host_ecdsa_key

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/ssp-hostkeys.service "$r/etc/systemd/system/multi-user.target.wants/ssp-hostkeys.service"
  # The owner's account is made at boot, before sshd, by the script ssp puts in the
  # instance config (user.ssp.account-script), read through the guest API socket.
  mkdir -p "$r/usr/local/lib/ssp"
  cat > "$r/usr/local/lib/ssp/account.py" <<'PY'
import os, socket, sys
# A plain HTTP/1.0 GET over the guest API socket: importing http.client costs
# more than the whole request, and this runs on every boot, before sshd.
KEY = "user.ssp.account-script"
# The script as it last ran to the end: when it is the same script again (a
# restart, a move to another host), the account is there already and sshd need
# not wait for it to run again.
DONE = "/var/lib/ssp/account.done"

def ready():
    addr = os.environ.pop("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        n.connect(addr)
        n.sendall(b"READY=1")
    except OSError:
        pass
    finally:
        n.close()

path = next((p for p in ("/dev/incus/sock", "/dev/lxd/sock") if os.path.exists(p)), None)
if path is None:
    ready()
    sys.exit(0)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(path)
s.sendall(b"GET /1.0/config/" + KEY.encode() + b" HTTP/1.0\r\nHost: localhost\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
if status != b"200" or not body.strip():
    ready()
    sys.exit(0)
try:
    with open(DONE, "rb") as f:
        if f.read() == body:
            ready()
except OSError:
    pass
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["/bin/sh", "-c", body.decode()])
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
if code == 0:
    os.makedirs(os.path.dirname(DONE), exist_ok=True)
    with open(DONE + ".new", "wb") as f:
        f.write(body)
    os.replace(DONE + ".new", DONE)
ready()
sys.exit(code)
PY
  cat > "$r/etc/systemd/system/ssp-account.service" <<'UNIT'
[Unit]
Description=Create the container owner's account (script from ssp)
# Early (beside sysinit, not after basic.target): sshd waits for this unit (until
# it says it is ready: at once when the account was made by the same script
# before), and it needs only the root file system and the guest API socket.
DefaultDependencies=no
After=local-fs.target
Before=ssh.service shutdown.target
Conflicts=shutdown.target

[Service]
Type=notify
ExecStart=/usr/bin/python3 /usr/local/lib/ssp/account.py

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/ssp-account.service "$r/etc/systemd/system/multi-user.target.wants/ssp-account.service"
  # Nothing for a container to reap at boot (no LVM snapshots inside).
  ln -sf /dev/null "$r/etc/systemd/system/e2scrub_reap.service"
  # eth0 by DHCP: the bridge hands ssp's containers their static addresses, which
  # SSH is forwarded to by NAT.
  mkdir -p "$r/etc/systemd/network" "$r/etc/systemd/system/sockets.target.wants"
  printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' > "$r/etc/systemd/network/eth0.network"
  ln -sf /lib/systemd/system/systemd-networkd.service "$r/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  ln -sf /lib/systemd/system/systemd-networkd.socket "$r/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
  # With nesting the container's /sys is writable, and networkd then waits forever
  # for a udev that containers do not run. A read-only /sys tells it not to wait.
  mkdir -p "$r/etc/systemd/system/systemd-networkd.service.d"
  printf '[Service]\nReadOnlyPaths=/sys\n' > "$r/etc/systemd/system/systemd-networkd.service.d/ssp.conf"
  # Key-only SSH; no DNS lookups so logins are quick without a resolver.
  printf 'PasswordAuthentication no\nUseDNS no\nHostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n' > "$r/etc/ssh/sshd_config.d/ssp.conf"
  echo "ssp" > "$r/etc/hostname"
  # The variant's own steps (e.g. the desktop's).
  [ -z "${4:-}" ] || "$4" "$r"
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*
  metadata "$d" "$3" debian 12 "ssp.account: boot"
  tar -C "$d" --numeric-owner -czf "$CACHE/$1.tar.gz.tmp" rootfs metadata.yaml
  mv "$CACHE/$1.tar.gz.tmp" "$CACHE/$1.tar.gz"
  rm -rf "$d"
  echo "build-images: $1 image built"
}

# The desktop variant: xrdp with Xfce. Every container makes its own xrdp keys
# and certificate at first boot, as it does its SSH host keys.
desktop_extras() {
  local r=$1
  rm -f "$r/etc/xrdp/rsakeys.ini"
  cat > "$r/etc/systemd/system/ssp-desktopkeys.service" <<'UNIT'
[Unit]
Description=Generate this container's xrdp keys and certificate
DefaultDependencies=no
After=local-fs.target
Before=xrdp.service xrdp-sesman.service shutdown.target
Conflicts=shutdown.target
ConditionPathExists=!/etc/xrdp/rsakeys.ini

[Service]
Type=oneshot
ExecStart=/usr/sbin/make-ssl-cert generate-default-snakeoil --force-overwrite
ExecStart=/usr/bin/xrdp-keygen xrdp /etc/xrdp/rsakeys.ini
# xrdp runs as its own user and reads its keys.
ExecStart=/bin/chown xrdp:xrdp /etc/xrdp/rsakeys.ini

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/ssp-desktopkeys.service "$r/etc/systemd/system/multi-user.target.wants/ssp-desktopkeys.service"
  # Xfce is the session xrdp starts (Xsession's x-session-manager).
  printf '%s\n' xfce4-session > "$r/etc/skel/.xsession"
}

if [ ! -s "$CACHE/debian-ssh.tar.gz" ]; then
  debian_image debian-ssh "" "Debian 12 with openssh-server (ssp)"
fi
# The desktop image is large (Xfce): built when asked (SSP_DESKTOP_IMAGE=1), as the
# test suite does.
if [ "${SSP_DESKTOP_IMAGE:-}" = 1 ] && [ ! -s "$CACHE/debian-desktop.tar.gz" ]; then
  debian_image debian-desktop ",xrdp,xorgxrdp,xfce4-session,xfwm4,xfce4-panel,xfdesktop4,xfce4-terminal,dbus-x11,xauth" \
    "Debian 12 with openssh-server, xrdp and Xfce (ssp)" desktop_extras
fi
echo "$recipe" > "$CACHE/recipe"
ls -la "$CACHE"
