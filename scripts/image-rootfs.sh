#!/usr/bin/env bash
# Assembles the filesystem of our images in DIR (the Dockerfile's final stages are `FROM scratch`
# plus these directories; scripts/image-build.sh builds them offline; tests/tests/image.rs runs
# the binaries chrooted into them), so what is tested is what ships.
#
#   scripts/image-rootfs.sh DIR [RELEASE_DIR]             the minimal image (`capture`)
#   scripts/image-rootfs.sh --iptables DIR [RELEASE_DIR]  what the iptables image adds on top of it
#
# The minimal image: the three release binaries in /usr/local/bin, exactly the shared libraries
# `ldd` says they load (libc, libm, libgcc_s and the loader, for capture-proxy; istio-iptables and
# the CNI plugin, built by scripts/build.sh, are static and load none), and a passwd/group naming
# the proxy's user. No shell, no iptables, no nft: `istio-iptables
# --native-nftables` and the CNI plugin need none.
#
# The iptables image (`capture-iptables`, for Istio's default iptables mode) adds Debian's
# xtables-nft-multi and xtables-legacy-multi under the names capture-lib runs (iptables-nft-save,
# ip6tables-legacy-restore, ...; plain iptables-save etc. are the nft variant, as on Debian), the
# libraries they load that the minimal image lacks (libxtables, libip4tc, libip6tc, libnftnl,
# libmnl), the xtables extensions Istio's rulesets use (found with strace over every ruleset: REDIRECT, TPROXY, owner
# matches, DNS conntrack zones, INVALID drop, for both families and both variants), and an empty
# /run/xtables.lock: iptables-legacy opens its lock with O_CREAT, which fails on a read-only root
# unless the file already exists (the lock only ever serialised iptables runs inside this
# container, as in Istio's image).
set -euo pipefail
usage="usage: scripts/image-rootfs.sh [--iptables] DIR [RELEASE_DIR]"
iptables=false
if [ "${1:-}" = --iptables ]; then
  iptables=true
  shift
fi
dir=${1:?$usage}
release=${2:-"$(dirname "$0")/../target/release"}
binaries=("$release/istio-iptables" "$release/capture-proxy" "$release/istio-capture-cni")
extensions=(standard tcp udp mark connmark conntrack multiport owner MARK CONNMARK CT REDIRECT TPROXY)

# The files FILE... load: `name => /path (addr)` lines are libraries, a bare `/path (addr)` line
# is the loader; linux-vdso has no file.
libraries() {
  for file in "$@"; do ldd "$file"; done | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u
}

# cp -L: the image holds files, not symlinks into the build stage.
copy_at_same_path() {
  while read -r file; do
    mkdir -p "$dir$(dirname "$file")"
    cp -L "$file" "$dir$file"
  done
}

if ! $iptables; then
  mkdir -p "$dir/usr/local/bin" "$dir/etc" "$dir/proc"
  install -m 0755 "${binaries[@]}" "$dir/usr/local/bin/"
  libraries "${binaries[@]}" | copy_at_same_path
  printf 'root:x:0:0:root:/:/sbin/nologin\nistio-proxy:x:1337:1337:istio-proxy:/:/sbin/nologin\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nistio-proxy:x:1337:\n' >"$dir/etc/group"
  exit 0
fi

xtables_dir=$(dirname "$(ls /usr/lib/*/xtables/libxt_standard.so /usr/lib/xtables/libxt_standard.so 2>/dev/null | head -1)")
[ "$xtables_dir" != . ] || { echo "image-rootfs: no xtables extensions found: install iptables" >&2; exit 1; }
multis=(/usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi)
plugins=("${extensions[@]/#/$xtables_dir/libxt_}")
plugins=("${plugins[@]/%/.so}")

mkdir -p "$dir/usr/sbin" "$dir/run"
install -m 0755 "${multis[@]}" "$dir/usr/sbin/"
for family in iptables ip6tables; do
  for variant in nft legacy; do
    for op in "" -save -restore; do
      ln -sf "xtables-$variant-multi" "$dir/usr/sbin/$family-$variant$op"
    done
  done
  for op in "" -save -restore; do
    ln -sf xtables-nft-multi "$dir/usr/sbin/$family$op"
  done
done
printf '%s\n' "${plugins[@]}" | copy_at_same_path
# Only what the minimal image does not hold already.
comm -13 <(libraries "${binaries[@]}") <(libraries "${multis[@]}" "${plugins[@]}") | copy_at_same_path
: >"$dir/run/xtables.lock"
chmod 0600 "$dir/run/xtables.lock"
