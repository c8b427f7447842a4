#!/usr/bin/env bash
# Assembles the whole filesystem of our minimal image in DIR: the three release binaries at /,
# exactly the shared libraries `ldd` says they load (libnftnl, libmnl, libc, libgcc_s, ... and
# the loader, for capture-proxy and the CNI plugin; istio-iptables, built by scripts/build.sh,
# is static and loads none) at the paths the loader looks for them, and a passwd/group naming
# the proxy's user. No shell, no iptables, no nft: `istio-iptables --native-nftables` and the
# CNI plugin need none. The Dockerfile's final stage is `FROM scratch` plus this directory, and
# tests/tests/image.rs runs the binaries chrooted into it, so what is tested is what ships.
#
# Usage: scripts/image-rootfs.sh DIR [RELEASE_DIR]   (RELEASE_DIR defaults to target/release)
set -euo pipefail
dir=${1:?usage: scripts/image-rootfs.sh DIR [RELEASE_DIR]}
release=${2:-"$(dirname "$0")/../target/release"}
binaries=(istio-iptables capture-proxy istio-capture-cni)

mkdir -p "$dir/etc" "$dir/proc"
for bin in "${binaries[@]}"; do
  install -m 0755 "$release/$bin" "$dir/$bin"
done
# `name => /path (addr)` lines are libraries, a bare `/path (addr)` line is the loader;
# linux-vdso has no file. cp -L: the image holds files, not symlinks into the build stage.
for bin in "${binaries[@]}"; do ldd "$release/$bin"; done |
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$dir$(dirname "$lib")"
    cp -L "$lib" "$dir$lib"
  done
printf 'root:x:0:0:root:/:/sbin/nologin\nistio-proxy:x:1337:1337:istio-proxy:/:/sbin/nologin\n' >"$dir/etc/passwd"
printf 'root:x:0:\nistio-proxy:x:1337:\n' >"$dir/etc/group"
