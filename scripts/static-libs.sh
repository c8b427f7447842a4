#!/usr/bin/env bash
# The static archives istio-iptables and istio-capture-cni link (scripts/build.sh): prints the
# directory holding libmnl.a, fetching it first if needed. libnftnl.a comes with libnftnl-dev, but
# libmnl-dev ships libmnl.a only from Debian 13 (trixie) on; on older releases this takes that
# one file out of trixie's libmnl-dev package, fetched from the machine's configured Debian
# source and checked against the SHA-256 of Debian's signed package index, without installing
# the package (its libmnl0 dependency is not needed: the archive is linked in). No host is named
# here: apt says where its source's pool is.
#
# Usage: scripts/static-libs.sh          fetch if missing, print the directory
#        scripts/static-libs.sh --find   print the directory, or fail if there is none
set -euo pipefail
dir=${CAPTURE_STATIC_LIBS:-/usr/local/lib/capture-static}

find_libmnl() {
  local system
  system=$(gcc -print-file-name=libmnl.a)
  if [ -f "$system" ]; then
    dirname "$system"
  elif [ -f "$dir/libmnl.a" ]; then
    echo "$dir"
  else
    return 1
  fi
}

if find_libmnl; then
  exit 0
fi
if [ "${1:-}" = "--find" ]; then
  echo "static-libs: no libmnl.a (run scripts/static-libs.sh to fetch it)" >&2
  exit 1
fi

# Debian 13's libmnl-dev 1.0.5-3, per architecture: its SHA-256 (from
# dists/trixie/main/binary-ARCH/Packages).
arch=$(dpkg --print-architecture)
case "$arch" in
  amd64) sha=7f9a7c3f470ec400171981816df189ec86b11083c3f8d391d0800ed09a87bfc3 ;;
  arm64) sha=046ecea98bfb827fffdc9a19c3efd75b9862995e3532987a9272787e70a3a9b6 ;;
  *)
    echo "static-libs: no pinned libmnl-dev for $arch; istio-iptables will link dynamically" >&2
    exit 1
    ;;
esac
deb=libmnl-dev_1.0.5-3_$arch.deb
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The machine's own configured Debian source: the pool directory of its libmnl-dev (the same
# directory holds every release's build), fetched with apt's own transport and configuration.
pool_uri() {
  apt-get download --print-uris libmnl-dev 2>/dev/null | awk 'NR == 1 { gsub("\047", "", $1); print $1 }'
}
uri=$(pool_uri)
if [ -z "$uri" ]; then
  apt-get update -qq >/dev/null
  uri=$(pool_uri)
fi
if [ -z "$uri" ]; then
  echo "static-libs: no configured apt source has libmnl-dev; istio-iptables will link dynamically" >&2
  exit 1
fi
/usr/lib/apt/apt-helper -o APT::Sandbox::User=root download-file "${uri%/*}/$deb" "$work/$deb" "SHA256:$sha" >/dev/null
dpkg-deb -x "$work/$deb" "$work/root"
install -D -m 0644 "$work/root/usr/lib/$(gcc -print-multiarch)/libmnl.a" "$dir/libmnl.a"
echo "$dir"
