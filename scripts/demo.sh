#!/usr/bin/env bash
# Sets up, builds, and runs the standard sidecar capture in a throw-away demo pod namespace,
# then prints the rules the kernel holds. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/provision.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/build.sh -q istio-iptables

ns=demo-pod-$$
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add eth0 type veth peer name eth0peer
ip -n "$ns" link set eth0 up
ip -n "$ns" addr add 10.44.0.5/24 dev eth0

set -x
ip netns exec "$ns" target/release/istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020
# In a fresh namespace the tool picks iptables-nft (as Istio does), whatever plain iptables is.
ip netns exec "$ns" iptables-nft-save -t nat
