#!/usr/bin/env bash
# Installs the Debian packages ssp needs on a Debian 12 host. Idempotent.
# Incus 6.0 LTS comes from bookworm-backports, derived from the host's own apt source.
#   install-deps.sh           what a platform host needs
#   install-deps.sh --test    also what the test suite needs (LXD 5.0 for the LXD tests)
set -euo pipefail

# incus-base is Incus without virtual machines: the `incus` package would pull in
# qemu, swtpm and, through their recommendations, a desktop audio stack. Nothing is
# installed for its recommendations; what ssp needs is named here (dnsmasq-base runs
# the bridge's DHCP, recommended only by Incus and LXD).
need_pkgs=(incus-base incus-client dnsmasq-base iptables btrfs-progs debootstrap
           busybox-static openssh-client iproute2 lxcfs uidmap)
if [ "${1:-}" = "--test" ]; then
  # libprotobuf-dev: protoc's well-known .proto files (the etcd client's build needs them).
  # openssh-server: the relay the reverse-tunnel test runs in a namespace of its own
  # (its own sshd and config; the package's service is left as the package sets it).
  # xvfb, freerdp2-x11, imagemagick: an RDP client on a virtual screen logs in to a
  # desktop container, and a screenshot of its session is kept.
  need_pkgs+=(lxd etcd-server etcd-client protobuf-compiler libprotobuf-dev openssh-server
              xvfb freerdp2-x11 imagemagick)
fi

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "install-deps: all packages present"; exit 0; }

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/) {print u; exit} }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || { echo "install-deps: cannot find the Debian bookworm apt source to derive bookworm-backports from" >&2; exit 1; }
  cat > /etc/apt/sources.list.d/ssp-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -q
apt-get install -y -q --no-install-recommends -t bookworm-backports incus-base incus-client
apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
# etcd is only a benchmark baseline: the suite starts its own members on loopback.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled etcd >/dev/null 2>&1; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
