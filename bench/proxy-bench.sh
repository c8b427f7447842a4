#!/usr/bin/env bash
# Benchmark of the captured inbound path, side by side in one run:
#   direct        client -> app, no capture rules in the pod
#   capture-proxy client -> [REDIRECT 15006] capture-proxy (uid 1337, from 127.0.0.6) -> app,
#                 once with the splice relay and once with the userspace copy relay
#   haproxy       the same rules, HAProxy in capture-proxy's place (uid 1337, 0.0.0.0:0 =
#                 original destination, source 127.0.0.6, option splice-auto)
# Each path has its own pod namespace (all with the same istio-iptables rules except direct),
# linked to one client namespace. Measures iperf3 throughput, 1-byte request/response latency
# (p50/p99), the proxy's system calls per round trip (perf), new connections per second with the
# proxy's CPU per connection, and the proxy's RSS per idle relayed connection at two counts; writes
# the tables, with capture-proxy/HAProxy ratios taken within each round, to BENCHMARKS-proxy.md.
# The latency and connection probes take turns over the paths within one run (loadgen), so that
# the machine's background load falls on every path alike.
#
# Latency is measured twice per round. Pinned (the controlled experiment, and the one the target is
# judged on): a second pod per path, whose application and proxy (capture-proxy with one worker
# thread, HAProxy with nbthread 1) run, like the client, on CPU LATENCY_PIN only and under
# SCHED_FIFO priority LATENCY_FIFO, so that client, proxy and application take turns on one CPU and
# nothing else on the machine preempts them: every hop is then one wake-up and one context switch
# on that CPU, and the figure is the proxy's own work. Unpinned: the usual pods, every process free
# to run on any CPU among the machine's other work, as in a pod; there a wake-up that lands on the
# other CPU costs tens of µs more in a VM (the host must wake an idle vCPU or preempt a busy one),
# and which hops do is the scheduler's choice, so that figure is reported beside the pinned one
# but decided by the scheduler (BENCHMARKS-proxy.md: the placements tried).
#
# Run as root from the repository root, after scripts/build.sh:
#   bench/proxy-bench.sh     (ROUNDS=5 SECONDS_PER_TEST=5 LATENCY_COUNT=20000 RATE_THREADS=4
#                             SYSCALL_COUNT=5000 IDLE_COUNTS="1000 10000" LATENCY_PIN=1
#                             LATENCY_FIFO=50 by default; LATENCY_PIN=off measures latency unpinned
#                             only, LATENCY_FIFO=off pins without SCHED_FIFO)
# Idle connections take two descriptors in the proxy: the larger count is cut to what the
# RLIMIT_NOFILE hard limit allows (raising it needs CAP_SYS_RESOURCE), and the table says so.
# Everything stays inside the namespaces this script creates; it removes them on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SECONDS_PER_TEST:-5}
latency_count=${LATENCY_COUNT:-20000}
rounds=${ROUNDS:-5}
rate_threads=${RATE_THREADS:-4}
syscall_count=${SYSCALL_COUNT:-5000}
pin_cpu=${LATENCY_PIN:-1}
pin_fifo=${LATENCY_FIFO:-50}
# What runs a process of the pinned latency probe: on CPU LATENCY_PIN, under SCHED_FIFO unless off.
pinned=()
if [ "$pin_cpu" != off ]; then
  pinned=(taskset -c "$pin_cpu")
  [ "$pin_fifo" = off ] || pinned+=(chrt -f "$pin_fifo")
fi
# Each idle relayed connection holds two of the proxy's descriptors; keep 400 for the rest.
fd_limit=$(ulimit -Hn)
idle_counts=""
for n in ${IDLE_COUNTS:-1000 10000}; do
  idle_counts+=" $(( n < (fd_limit - 400) / 2 ? n : (fd_limit - 400) / 2 ))"
done
idle_counts=${idle_counts# }
idle_max=${idle_counts##* }
out=${OUT:-BENCHMARKS-proxy.md}
release=target/release

for tool in haproxy iperf3 perf; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy iperf3 linux-perf >/dev/null; }
done
scripts/build.sh -q istio-iptables capture-proxy
cargo build --release -q -p capture-proxy --example loadgen
loadgen=$(realpath "$release/examples/loadgen")
capture_proxy=$(realpath "$release/capture-proxy")
istio_iptables=$(realpath "$release/istio-iptables")

tag=pb$$
client=${tag}c
paths=(direct splice copy haproxy)
# A pod per path, and a second one per path for the pinned latency probe.
pods=("${paths[@]}")
[ "$pin_cpu" = off ] || pods+=("${paths[@]/#/pinned-}")
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  for ns in "$client" "${pods[@]/#/$tag}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

cat >"$work/haproxy.cfg" <<CFG
global
    maxconn $((idle_max + 50))
    maxpipes 64
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
sed 's/^global$/global\n    nbthread 1/' "$work/haproxy.cfg" >"$work/haproxy-pinned.cfg"

# Starts the proxy of pod $1 (splice, copy or haproxy; pinned-splice... for the pinned latency
# probe, with one thread) in that pod, as uid 1337. Its stdout is not the caller's: a
# measurement's output pipe must close when the measurement ends.
start_proxy() {
  local as_proxy=(ip netns exec "$tag$1" setpriv --reuid=1337 --regid=1337 --clear-groups) threads=() config=haproxy
  if [[ $1 == pinned-* ]]; then
    as_proxy=("${pinned[@]}" "${as_proxy[@]}") threads=(--worker-threads 1) config=haproxy-pinned
  fi
  case ${1#pinned-} in
    splice | copy)
      RUST_LOG=warn "${as_proxy[@]}" "$capture_proxy" --relay "${1#pinned-}" "${threads[@]}" >/dev/null 2>>"$work/proxy-$1.log" &
      ;;
    haproxy) "${as_proxy[@]}" haproxy -f "$work/$config.cfg" -db >/dev/null 2>>"$work/$1.log" & ;;
  esac
}

# Starts the proxy of path $1 afresh (its RSS then holds no memory freed by earlier tests) and
# waits until it accepts connections: until the new process, not the killed one, holds the
# listening socket (a killed process may hold it for a moment).
restart_proxy() {
  local pid tries=0
  pid=$(proxy_pid "$1")
  kill -KILL "$pid"
  start_proxy "$1"
  pid=$!
  until ip netns exec "$tag$1" ss -Hltnp 'sport = :15006' | grep -q "pid=$pid,"; do
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] || { echo "the $1 proxy did not restart" >&2; exit 1; }
    sleep 0.05
  done
}

ip netns add "$client"
ip -n "$client" link set lo up
ip netns exec "$client" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
# Pod number i (in the order of pods) is at 10.55.i.2.
i=0
for pod in "${pods[@]}"; do
  i=$((i + 1))
  ns=$tag$pod
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "${tag}a$i" type veth peer name "${tag}b$i"
  ip link set "${tag}a$i" netns "$client"
  ip link set "${tag}b$i" netns "$ns"
  ip -n "$client" addr add "10.55.$i.1/24" dev "${tag}a$i"
  ip -n "$client" link set "${tag}a$i" up
  ip -n "$ns" addr add "10.55.$i.2/24" dev "${tag}b$i"
  ip -n "$ns" link set "${tag}b$i" up
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
  # The application: the 1-byte echo server (pinned like the proxy in a pinned pod), and an
  # iperf3 server.
  if [[ $pod == pinned-* ]]; then
    "${pinned[@]}" ip netns exec "$ns" "$loadgen" serve 8080 &
  else
    ip netns exec "$ns" "$loadgen" serve 8080 &
    ip netns exec "$ns" iperf3 -s -p 5201 -D --logfile "$work/iperf3-$pod.log"
  fi
  [ "${pod#pinned-}" = direct ] && continue
  ip netns exec "$ns" "$istio_iptables" -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' \
    -d 15090,15021,15020 >/dev/null
  start_proxy "$pod"
done
sleep 1

# The pid of the proxy under test in pod $1; empty on a direct path.
proxy_pid() {
  local pid
  for pid in $(ip netns pids "$tag$1"); do
    case $(cat "/proc/$pid/comm") in
      capture-proxy | haproxy) echo "$pid" && return ;;
    esac
  done
}

# CPU time (user + system, in clock ticks) process $1 has used so far.
cpu_ticks() {
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# Nanoseconds process $1 has spent on a CPU so far, all its threads.
cpu_ns() {
  cat /proc/"$1"/task/*/schedstat | awk '{ ns += $1 } END { printf "%.0f\n", ns }'
}

rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# System calls the proxy (pid $2) makes per 1-byte round trip, over SYSCALL_COUNT trips to
# 10.55.$1.2 (and their tenth as warm-up), counted by perf on the syscall-entry tracepoint.
syscalls_per_round_trip() {
  local perf_pid count
  perf stat -x, -e raw_syscalls:sys_enter -p "$2" -o "$work/perf.csv" &
  perf_pid=$!
  sleep 0.5
  ip netns exec "$client" "$loadgen" latency "10.55.$1.2:8080" "$syscall_count" >/dev/null
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  count=$(awk -F, '/raw_syscalls:sys_enter/ { print $1 }' "$work/perf.csv")
  python3 -c "print('%.2f' % ($count / ($syscall_count + $syscall_count // 10)))"
}

# The proxy's (pid $2) RSS growth per connection while IDLE_COUNTS idle connections to the
# holding server at 10.55.$1.2:8081 are relayed: one figure per count, in bytes.
idle_bytes_per_connection() {
  local rss_before line n figures=()
  rss_before=$(rss_kib "$2")
  coproc holder { ip netns exec "$client" "$loadgen" hold "10.55.$1.2:8081" $idle_counts; }
  for n in $idle_counts; do
    read -r line <&"${holder[0]}"
    [ "$line" = "held $n" ] || { echo "holding $n connections failed: $line" >&2; exit 1; }
    sleep 0.5
    figures+=("$(( ($(rss_kib "$2") - rss_before) * 1024 / n ))")
    echo >&"${holder[1]}"
  done
  wait "$holder_PID"
  echo "${figures[@]}"
}

# The pinned latency probe over every path's pinned pod (pinned pod i at 10.55.(i + paths).2):
# one line per path, "p50_us p99_us proxy_cpu_us_per_round_trip" (the last 0 on the direct path);
# "0 0 0" lines with LATENCY_PIN=off.
pinned_latency() {
  local i addrs="" pids=() cpu_before=() latency
  if [ "$pin_cpu" = off ]; then
    printf '0 0 0\n%.0s' "${paths[@]}"
    return
  fi
  for i in "${!paths[@]}"; do
    addrs+="${addrs:+,}10.55.$((i + 1 + ${#paths[@]})).2:8080"
    pids+=("$(proxy_pid "pinned-${paths[$i]}")")
    cpu_before+=("$(if [ -n "${pids[$i]}" ]; then cpu_ns "${pids[$i]}"; fi)")
  done
  mapfile -t latency < <("${pinned[@]}" ip netns exec "$client" "$loadgen" latency "$addrs" "$latency_count")
  for i in "${!paths[@]}"; do
    if [ -n "${pids[$i]}" ]; then
      echo "${latency[$i]} $(python3 -c "print('%.2f' % (($(cpu_ns "${pids[$i]}") - ${cpu_before[$i]}) / 1e3 / $((latency_count + latency_count / 10))))")"
    else
      echo "${latency[$i]} 0"
    fi
  done
}

# One round: a measurement of each kind against every path, appended to $work/results-PATH as
# "gbps p50_us p99_us connections_per_s failed cpu_us_per_connection syscalls_per_rtt idle_bytes...
# pinned_p50_us pinned_p99_us pinned_cpu_us_per_round_trip" (the proxy's figures 0 on the direct
# path; p50_us and p99_us are the unpinned probe's). Path number i is at 10.55.i.2. The latency
# and connection probes take turns over all paths in one run (loadgen), so that a burst of
# background load falls on each path alike and the figures of one round compare; throughput,
# syscalls and idle memory are measured one path after the other.
measure_round() {
  local i path addrs="" pids=() gbps=() latency pinned_figures rate cpu_before=() proxy_figures
  cut -d' ' -f1 /proc/loadavg >>"$work/load"
  i=0
  for path in "${paths[@]}"; do
    i=$((i + 1))
    addrs+="${addrs:+,}10.55.$i.2:8080"
    pids+=("$(proxy_pid "$path")")
    gbps+=("$(ip netns exec "$client" iperf3 -c "10.55.$i.2" -p 5201 -t "$seconds" -J |
      python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))')")
  done
  mapfile -t pinned_figures < <(pinned_latency)
  mapfile -t latency < <(ip netns exec "$client" "$loadgen" latency "$addrs" "$latency_count")
  for i in "${!paths[@]}"; do cpu_before+=("$(if [ -n "${pids[$i]}" ]; then cpu_ticks "${pids[$i]}"; fi)"); done
  mapfile -t rate < <(ip netns exec "$client" "$loadgen" rate "$addrs" "$seconds" "$rate_threads")
  for i in "${!paths[@]}"; do
    path=${paths[$i]}
    if [ -n "${pids[$i]}" ]; then
      proxy_figures=$(python3 -c "print('%.1f' % (($(cpu_ticks "${pids[$i]}") - ${cpu_before[$i]}) * 1e6 / $(getconf CLK_TCK) / (${rate[$i]%% *} * $seconds)))")
      proxy_figures+=" $(syscalls_per_round_trip "$((i + 1))" "${pids[$i]}")"
      restart_proxy "$path"
      proxy_figures+=" $(idle_bytes_per_connection "$((i + 1))" "$(proxy_pid "$path")")"
    else
      proxy_figures="0 0 $(echo "$idle_counts" | sed 's/[0-9]*/0/g')"
    fi
    echo "${gbps[$i]} ${latency[$i]} ${rate[$i]} $proxy_figures ${pinned_figures[$i]}" | tee -a "$work/results-$path" | sed "s/^/round $1 $path: /" >&2
  done
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$rounds"); do
  measure_round "$round"
done

# The tables: each path's median (lowest–highest) over the rounds, and the ratios of
# capture-proxy (default relay) to HAProxy, taken within each round.
report() {
  WORK=$work IDLE_COUNTS=$idle_counts PINNED=$([ "$pin_cpu" = off ] && echo no || echo yes) python3 - <<'PY'
import os, statistics
env = os.environ
work, idle_counts, pinned = env["WORK"], env["IDLE_COUNTS"].split(), env["PINNED"] == "yes"
def rows(path):
    return [list(map(float, line.split())) for line in open(f"{work}/results-{path}")]
results = {p: rows(p) for p in ["direct", "splice", "copy", "haproxy"]}
direct = results["direct"]
# Where each figure is in a results line.
GBPS, P50, P99, RATE, FAILED, CPU_CONN, SYSCALLS, IDLE = range(8)
PIN_P50, PIN_P99, PIN_CPU_RTT = (IDLE + len(idle_counts) + k for k in range(3))
def cell(values, fmt):
    med = fmt % statistics.median(values)
    return f"{med} ({fmt % min(values)}–{fmt % max(values)})" if len(values) > 1 else med
def column(path, i):
    return [row[i] for row in results[path]]
def added(path, i):
    return [row[i] - d[i] for row, d in zip(results[path], direct)]
def table(heads, cells_of):
    print("| path | " + " | ".join(heads) + " |")
    print("|---" * (1 + len(heads)) + "|")
    for label, path in labels:
        print(f"| {label} | " + " | ".join(cells_of(path, path != "direct")) + " |")
    print()
labels = [("direct (no capture)", "direct"), ("capture-proxy, splice relay (default)", "splice"),
          ("capture-proxy, copy relay (`--relay copy`)", "copy"), ("HAProxy 2.6 (`option splice-auto`)", "haproxy")]
def latency_cells(path, proxied, p50, p99):
    return [cell(column(path, p50), "%.1f"), cell(column(path, p99), "%.1f"),
            cell(added(path, p50), "%+.1f") if proxied else "–", cell(added(path, p99), "%+.1f") if proxied else "–"]
heads = ["RTT p50 (µs)", "RTT p99 (µs)", "added p50 (µs)", "added p99 (µs)"]
if pinned:
    table([f"pinned: {h}" for h in heads] + ["pinned: proxy CPU per round trip (µs)"] + [f"unpinned: {h}" for h in heads],
          lambda path, proxied: latency_cells(path, proxied, PIN_P50, PIN_P99)
          + [cell(column(path, PIN_CPU_RTT), "%.2f") if proxied else "–"] + latency_cells(path, proxied, P50, P99))
else:
    table([f"unpinned: {h}" for h in heads], lambda path, proxied: latency_cells(path, proxied, P50, P99))
table(["throughput (Gbit/s)", "new connections/s", "failed", "proxy CPU per connection (µs)", "proxy syscalls per round trip"]
      + [f"idle RSS per connection at {n} (bytes)" for n in idle_counts],
      lambda path, proxied: [cell(column(path, GBPS), "%.2f"), cell(column(path, RATE), "%.0f"), "%d" % sum(column(path, FAILED)),
                             cell(column(path, CPU_CONN), "%.1f") if proxied else "–",
                             cell(column(path, SYSCALLS), "%.2f") if proxied else "–"]
      + [cell(column(path, IDLE + k), "%.0f") if proxied else "–" for k in range(len(idle_counts))])
def ratio(values_ours, values_theirs):
    return [a / b for a, b in zip(values_ours, values_theirs)]
def of(i, figures=column):
    return ratio(figures("splice", i), figures("haproxy", i))
at_most_0_8 = ("≤ 0.8", lambda r: r <= 0.8)
measures = []
if pinned:
    measures += [("added p50 latency, pinned", of(PIN_P50, added), *at_most_0_8),
                 ("added p99 latency, pinned", of(PIN_P99, added), *at_most_0_8),
                 ("proxy CPU per round trip, pinned", of(PIN_CPU_RTT), "(reported)", None)]
measures += [
    ("added p50 latency, unpinned", of(P50, added), *at_most_0_8),
    ("added p99 latency, unpinned", of(P99, added), *at_most_0_8),
    ("throughput", of(GBPS), "≥ 1", lambda r: r >= 1),
    ("new connections/s", of(RATE), "≥ 1", lambda r: r >= 1),
    ("CPU per connection", of(CPU_CONN), "(reported)", None),
    ("syscalls per round trip", of(SYSCALLS), "(reported)", None),
] + [(f"idle RSS per connection at {n}", of(IDLE + k), "≤ 1", lambda r: r <= 1) for k, n in enumerate(idle_counts)]
print("| capture-proxy (default) ÷ HAProxy | median ratio (lowest–highest) | target | met by the median | met in every round |")
print("|---|---|---|---|---|")
for name, values, target, ok in measures:
    met = ("yes" if ok(statistics.median(values)) else "no") if ok else "–"
    every = ("yes" if all(map(ok, values)) else "no") if ok else "–"
    print(f"| {name} | {cell(values, '%.2f')} | {target} | {met} | {every} |")
PY
}

{
  echo "Measured by \`bench/proxy-bench.sh\` on $(date -u +%Y-%m-%d): $(nproc) CPUs"
  echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r),"
  echo "$(haproxy -v | head -1 | cut -d' ' -f1-3), iperf3 $(iperf3 -v | head -1 | cut -d' ' -f2)."
  echo "Load average when the run started: $load_before; when it ended: $(cut -d' ' -f1-3 /proc/loadavg);"
  echo "over the last minute at each round's start: $(paste -sd' ' "$work/load" | sed 's/ /, /g')."
  echo "Client and pod are network namespaces joined by a veth pair. Every process shares the same CPUs,"
  if [ "$pin_cpu" = off ]; then
    echo "in every test."
  else
    echo "except in the pinned latency probe: there the client, and in a second pod per path the application"
    echo "and the proxy (capture-proxy \`--worker-threads 1\`, HAProxy \`nbthread 1\`), run on CPU $pin_cpu only$(
      [ "$pin_fifo" = off ] && echo "." || echo ", under")"
    [ "$pin_fifo" = off ] || echo "SCHED_FIFO priority $pin_fifo, so that no other work on the machine preempts them."
  fi
  echo "The pod holds our \`istio-iptables\` REDIRECT rules (\`-b '*'\`), except on the direct path; the"
  echo "proxy under test runs as uid 1337 and dials the application from 127.0.0.6."
  echo
  report
  echo
  echo "Each cell is the median of ${rounds} rounds, with the lowest and highest in brackets; each ratio is"
  echo "taken within a round. \"failed\" counts connections that did not complete, over all rounds."
  echo "Throughput: iperf3, ${seconds} s, one stream, one path after the other."
  echo "Latency: ${latency_count} sequential 1-byte round trips on one connection per path after $((latency_count / 10))"
  echo "warm-up trips, the paths taking turns in batches of 100 within one run; \"added\" is the path's figure"
  echo "minus the direct path's in that run. The pinned probe runs first, then the unpinned one; proxy CPU per"
  echo "round trip is the CPU time of the pinned proxy's threads (schedstat) during the pinned run, divided by"
  echo "its round trips, warm-up included. Connections: ${rate_threads} client threads, ${seconds} s per path, the"
  echo "paths taking turns every 200 ms within one run; each connection sends one byte, reads the echo and"
  echo "the server's close. Proxy CPU per connection: user + system time of the proxy process during that"
  echo "run, divided by its connections. Syscalls: every system call the proxy process entered"
  echo "(perf, \`raw_syscalls:sys_enter\`) during $((syscall_count + syscall_count / 10)) round trips, divided by them."
  echo "Idle RSS: the resident memory growth of a freshly started proxy while ${idle_counts// / and then } connections,"
  echo "each after one 1-byte exchange, sit idle, divided by their number; kernel socket buffers are not in RSS."
  echo "The larger count is what RLIMIT_NOFILE allows here (hard limit ${fd_limit}, two descriptors per"
  echo "connection, which this machine does not let us raise), not 10,000. For the same reason HAProxy runs"
  echo "with \`maxconn $((idle_max + 50))\` and \`maxpipes 64\` (its default, a quarter of maxconn, would reserve"
  echo "descriptors beyond the limit)."
  echo "The two capture-proxy rows run the same code in the latency and connection tests (splice starts"
  echo "only after a 64 KiB read), so their difference in those columns shows this run's noise."
} >"$work/measured.md"
# The measured part replaces the one between the markers in $out; the analysis around it stays.
python3 - "$out" "$work/measured.md" <<'PY'
import os, sys
out, measured = sys.argv[1], open(sys.argv[2]).read()
begin, end = "<!-- measured by bench/proxy-bench.sh -->\n", "<!-- end of measurement -->\n"
text = open(out).read() if os.path.exists(out) else f"# capture-proxy benchmark: captured inbound path\n\n{begin}{end}"
head, rest = text.split(begin, 1)
open(out, "w").write(head + begin + measured + end + rest.split(end, 1)[1])
PY
cat "$work/measured.md"
