#!/usr/bin/env bash
# Benchmark of the captured inbound path, side by side in one run:
#   direct        client -> app, no capture rules in the pod
#   capture-proxy client -> [REDIRECT 15006] capture-proxy (uid 1337, from 127.0.0.6) -> app,
#                 once with the splice relay and once with the userspace copy relay
#   haproxy       the same rules, HAProxy in capture-proxy's place (uid 1337, 0.0.0.0:0 =
#                 original destination, source 127.0.0.6, option splice-auto)
# Each path has its own pod namespace (all with the same istio-iptables rules except direct),
# linked to one client namespace. Measures iperf3 throughput, 1-byte request/response latency
# (p50/p99) and new connections per second, and writes the table to BENCHMARKS-proxy.md.
#
# Run as root from the repository root, after scripts/build.sh:
#   bench/proxy-bench.sh     (ROUNDS=3 SECONDS_PER_TEST=5 LATENCY_COUNT=20000 RATE_THREADS=4 by default)
# Everything stays inside the namespaces this script creates; it removes them on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SECONDS_PER_TEST:-5}
latency_count=${LATENCY_COUNT:-20000}
rounds=${ROUNDS:-3}
rate_threads=${RATE_THREADS:-4}
out=${OUT:-BENCHMARKS-proxy.md}
release=target/release

for tool in haproxy iperf3; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy iperf3 >/dev/null; }
done
scripts/build.sh -q istio-iptables capture-proxy
cargo build --release -q -p capture-proxy --example loadgen
loadgen=$(realpath "$release/examples/loadgen")
capture_proxy=$(realpath "$release/capture-proxy")
istio_iptables=$(realpath "$release/istio-iptables")

tag=pb$$
client=${tag}c
paths=(direct splice copy haproxy)
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  for ns in "$client" "${paths[@]/#/$tag}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$client"
ip -n "$client" link set lo up
ip netns exec "$client" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
i=0
for path in "${paths[@]}"; do
  i=$((i + 1))
  pod=$tag$path
  ip netns add "$pod"
  ip -n "$pod" link set lo up
  ip link add "${tag}a$i" type veth peer name "${tag}b$i"
  ip link set "${tag}a$i" netns "$client"
  ip link set "${tag}b$i" netns "$pod"
  ip -n "$client" addr add "10.55.$i.1/24" dev "${tag}a$i"
  ip -n "$client" link set "${tag}a$i" up
  ip -n "$pod" addr add "10.55.$i.2/24" dev "${tag}b$i"
  ip -n "$pod" link set "${tag}b$i" up
  ip netns exec "$pod" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
  # The application: an iperf3 server and the 1-byte echo server.
  ip netns exec "$pod" iperf3 -s -p 5201 -D --logfile "$work/iperf3-$path.log"
  ip netns exec "$pod" "$loadgen" serve 8080 &
  [ "$path" = direct ] && continue
  ip netns exec "$pod" "$istio_iptables" -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' \
    -d 15090,15021,15020 >/dev/null
  case $path in
    splice | copy)
      ip netns exec "$pod" env RUST_LOG=warn setpriv --reuid=1337 --regid=1337 --clear-groups \
        "$capture_proxy" --relay "$path" 2>"$work/proxy-$path.log" &
      ;;
    haproxy)
      cat >"$work/haproxy.cfg" <<'CFG'
global
    maxconn 7000
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    option splice-auto
frontend virtual_inbound
    bind 0.0.0.0:15006
    default_backend original_destination
backend original_destination
    server s 0.0.0.0:0 source 127.0.0.6
CFG
      ip netns exec "$pod" setpriv --reuid=1337 --regid=1337 --clear-groups \
        haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
      ;;
  esac
done
sleep 1

# CPU time (user + system, in clock ticks) the proxy in pod $1 has used so far; 0 on the
# direct path.
proxy_cpu_ticks() {
  local pid
  for pid in $(ip netns pids "$tag$1"); do
    case $(cat "/proc/$pid/comm") in
      capture-proxy | haproxy) awk '{ print $14 + $15 }' "/proc/$pid/stat" && return ;;
    esac
  done
  echo 0
}

# One measurement of each kind against the pod of path $2 (number $1, at 10.55.$1.2):
# "gbps p50_us p99_us connections_per_s failed proxy_cpu_us_per_connection".
measure() {
  local addr=10.55.$1.2 gbps latency rate cpu_before cpu_after
  gbps=$(ip netns exec "$client" iperf3 -c "$addr" -p 5201 -t "$seconds" -J |
    python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))')
  latency=$(ip netns exec "$client" "$loadgen" latency "$addr:8080" "$latency_count")
  cpu_before=$(proxy_cpu_ticks "$2")
  rate=$(ip netns exec "$client" "$loadgen" rate "$addr:8080" "$seconds" "$rate_threads")
  cpu_after=$(proxy_cpu_ticks "$2")
  echo "$gbps $latency $rate $(python3 -c "print('%.1f' % (($cpu_after - $cpu_before) * 1e6 / $(getconf CLK_TCK) / ($(echo "$rate" | cut -d' ' -f1) * $seconds)))")"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# Rounds alternate the paths so that background load spreads over all of them; the table
# shows each path's median.
for round in $(seq "$rounds"); do
  i=0
  for path in "${paths[@]}"; do
    i=$((i + 1))
    measure "$i" "$path" | tee -a "$work/results-$path" | sed "s/^/round $round $path: /" >&2
  done
done

# A path's rounds, column by column: "median (min–max)" for each of gbps p50 p99 rate, and
# the total of failed connections.
summary() {
  python3 - "$work/results-$1" "${2:-}" <<'PY'
import statistics, sys
rows = [list(map(float, line.split())) for line in open(sys.argv[1])]
cols = list(zip(*rows))
def cell(col, fmt):
    med = fmt % statistics.median(col)
    return "%s (%s–%s)" % (med, fmt % min(col), fmt % max(col)) if len(col) > 1 else med
if sys.argv[2] == "p50":
    print(statistics.median(cols[1]))
else:
    cells = [cell(c, fmt) for c, fmt in zip(cols, ["%.2f", "%.1f", "%.1f", "%.0f"])]
    cpu = cell(cols[5], "%.1f") if max(cols[5]) > 0 else "–"
    print(" | ".join(cells + ["%d" % sum(cols[4]), cpu]))
PY
}
direct_p50=$(summary direct p50)
row() {
  local p50 added
  p50=$(summary "$2" p50)
  added=$(python3 -c "print('%+.1f' % ($p50 - $direct_p50))")
  summary "$2" | awk -F' [|] ' -v label="$1" -v added="$added" '{ print "| " label " | " $1 " | " $2 " | " $3 " | " added " | " $4 " | " $5 " | " $6 " |" }'
}

{
  echo "# capture-proxy benchmark: captured inbound path"
  echo
  echo "Measured by \`bench/proxy-bench.sh\` on $(date -u +%Y-%m-%d): $(nproc) CPUs"
  echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r),"
  echo "$(haproxy -v | head -1 | cut -d' ' -f1-3), iperf3 $(iperf3 -v | head -1 | cut -d' ' -f2)."
  echo "Load average when the run started: $load_before (other work shared the machine: expect noise,"
  echo "hence the ranges)."
  echo "Client and pod are network namespaces joined by a veth pair; every process shares the same CPUs."
  echo "The pod holds our \`istio-iptables\` REDIRECT rules (\`-b '*'\`), except on the direct path; the"
  echo "proxy under test runs as uid 1337 and dials the application from 127.0.0.6."
  echo
  echo "| path | throughput (Gbit/s, iperf3 ${seconds}s, 1 stream) | 1-byte RTT p50 (µs) | p99 (µs) | added p50 vs direct (µs) | new connections/s (${rate_threads} clients, ${seconds}s) | failed | proxy CPU per connection (µs) |"
  echo "|---|---|---|---|---|---|---|---|"
  row "direct (no capture)" direct
  row "capture-proxy, splice relay (default)" splice
  row "capture-proxy, copy relay (\`--relay copy\`)" copy
  row "HAProxy 2.6 (\`option splice-auto\`)" haproxy
  echo
  echo "Each cell is the median of ${rounds} rounds, with the lowest and highest in brackets; the rounds"
  echo "alternate the paths. \"failed\" counts connections that did not complete, over all rounds."
  echo "Latency: ${latency_count} sequential 1-byte round trips on one connection after $((latency_count / 10)) warm-up"
  echo "trips. Connections: each one connects, sends one byte, reads the echo and the server's close."
  echo "Proxy CPU per connection: user + system time the proxy process used during the connection-rate"
  echo "test, divided by the connections made; unlike the rates, it hardly depends on the machine's other load."
  echo "The two capture-proxy rows run the same code in the latency and connection tests (splice starts"
  echo "only after a 64 KiB read), so their difference in those columns shows this run's noise."
} >"$out"
cat "$out"
