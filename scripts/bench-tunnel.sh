#!/usr/bin/env bash
# Throughput benchmark: meshd against plain veth and other userspace tunnels ("anchors").
#
# For each implementation a fresh two-host lab is built: network namespaces A and B joined by a
# veth pair (underlay 198.18.0.1/24 and 198.18.0.2/24), a tunnel between them (overlay
# 100.64.0.1/10 and 100.64.0.2, MTU 1420), and an iperf3 server in B. Then, from A:
#   tcp1   iperf3 TCP, one stream                 Gbit/s received
#   tcp4   iperf3 TCP, 4 streams (-P 4)           Gbit/s received
#   udp    iperf3 UDP at max rate (-u -b 0)       Mbit/s delivered, and loss %
#   rtt    ping, PING_COUNT (50) x 10 ms apart     avg, p50 and min ms, each over plain veth
#   cpu    utime+stime of both tunnel daemons during the tcp1 run, seconds per Gbit carried
#   rss    VmRSS of each daemon after the tunnel is up and idle for 2 s (the larger of the two)
#   rr1    TCP request/response (netperf TCP_RR style, crates/lab/examples/rr_probe.rs): one
#          connection, RR_SIZE (1) byte request -> RR_SIZE byte response, one outstanding, for
#          RR_SECS (10) s: transactions/s, p50 and p99 latency us, daemon CPU us per transaction
#   rr16   the same with 16 concurrent connections: transactions/s (sum), p99 us, CPU us/txn
#   pgbench  PostgreSQL (Debian's, PG_BINDIR or the newest /usr/lib/postgresql/*/bin) in B,
#          `pgbench -n -c 4 -j 2 -T PGBENCH_SECS` (10; TPC-B-like, scale 1) from A: tps, average
#          latency ms, daemon CPU us per transaction (utime+stime of both daemons / transactions).
#          The server is throwaway: initdb (as nobody: postgres refuses root) into a temporary
#          directory once per run, `pgbench -i` over its Unix socket only, then per lab a copy of
#          that directory served in B (listen '*', port 5432, trust, fsync, synchronous_commit
#          and full_page_writes off so that the disk does not hide the network), stopped with
#          the lab; the directories are removed on exit. Never a system service.
#   The servers (iperf3, rr_probe, postgres) run in B; clients in A; neither is pinned.
# Implementations run interleaved in ROUNDS rounds (order rotated every round); the figures are
# the median over rounds. A table gives each figure and its ratio to meshd's (or, if meshd is
# n/a, to the best anchor's). Raw and summary results go to $RESULTS as JSON.
#
# Implementations: veth (no tunnel: the limit), meshd, wg-go (bookworm wireguard-go), wg-go-bpo
# (bookworm-backports wireguard-go v0.0.20230223, TUN offload), boringtun (boringtun-cli),
# nebula; meshd-policy (a 1,000-rule label policy) and meshd-transparent (transparent mode:
# iperf3 runs against B's underlay address 198.18.0.2, encrypted by meshd) and meshd-busypoll
# (--busy-poll-us BUSY_POLL_US, default 300: the opt-in latency trade-off); meshd-noflows
# (flow_records = false: no per-flow counting, the cost of flow records); meshd-before
# (the binary MESHD_BEFORE, run exactly like meshd: before/after rows of a change in one run);
# meshd-1cpu and wg-go-bpo-1cpu (both tunnel daemons, A's and B's, started under `taskset -c 0`:
# together they get one core, CPU 0, for all their threads; iperf3, rr_probe, pgbench and
# postgres stay unpinned): 1 core against 2 for meshd and wireguard-go side by side.
# Anchors come from scripts/install-anchors.sh; missing ones are skipped.
#
# Environment:
#   ONLY="meshd wg-go-bpo"   run only these implementations
#   DURATION=10              seconds per iperf3 test
#   ROUNDS=1                 interleaved rounds
#   RESULTS=target/bench-tunnel.json
#   ANCHOR_DIR=/var/cache/meshd-bench
#   MESHD=/path/to/meshd     use this binary instead of building (implies SKIP_BUILD=1)
#   MESHD_BEFORE=/path/to/meshd  also run this binary as implementation meshd-before (added
#                            after meshd when ONLY is unset)
#   SKIP_BUILD=1             do not run cargo build; use target/release/meshd as it is
#   RTT_ONLY=1 PING_COUNT=500  only the ping figures (quick latency experiments)
#   RTT_DUMP=DIR             keep each ping run's output there (IMPL-EPOCH.txt) for histograms
#   RR_SECS=10 RR_SIZE=1     rr1/rr16 seconds (0: skip both) and request/response bytes
#   RR_PROBE=/path/to/rr_probe  use this probe instead of building it (cargo build --release
#                            -p meshd-lab --example rr_probe; SKIP_BUILD=1 uses the one in target/)
#   PGBENCH_SECS=10          pgbench seconds (0: skip); PG_BINDIR=DIR holds initdb/postgres/pgbench
#
# Usage (root; ~75 s per implementation per round at DURATION=10, RR_SECS=10, PGBENCH_SECS=10):
#   sudo scripts/bench-tunnel.sh
#   sudo ONLY="veth meshd wg-go-bpo" ROUNDS=3 scripts/bench-tunnel.sh
#   scripts/bench-tunnel.sh --table [FILE]     re-print the table of an earlier run
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
ONLY=${ONLY:-}
RESULTS=${RESULTS:-$REPO/target/bench-tunnel.json}
ANCHOR_DIR=${ANCHOR_DIR:-/var/cache/meshd-bench}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1800}
SKIP_BUILD=${SKIP_BUILD:-0}

ALL_IMPLS=(veth meshd meshd-before meshd-noflows meshd-policy meshd-transparent meshd-busypoll meshd-1cpu wg-go wg-go-bpo wg-go-bpo-1cpu boringtun nebula)
MESHD_BEFORE=${MESHD_BEFORE:-}

PREFIX="mbench-$$"
UA=198.18.0.1 UB=198.18.0.2 OA=100.64.0.1 OB=100.64.0.2
MTU=1420
WG_PORT=51820
UDP_LEN=$((MTU - 28)) # one datagram fills one tunnel packet, no fragmentation
PING_COUNT=${PING_COUNT:-50}
PING_INTERVAL=0.01
RTT_ONLY=${RTT_ONLY:-0}
RR_SECS=${RR_SECS:-10}
RR_SIZE=${RR_SIZE:-1}
RR_PORT=5202
PGBENCH_SECS=${PGBENCH_SECS:-10}
PG_PORT=5432

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- table -------------------------------------------------------------------------------

print_table() { # print_table RESULTS.json
    local json=$1
    # jq emits: title, ref, format, then value and ratio per implementation ("-" if none)
    jq -r '
      def rows: [["tcp1_gbps", "TCP 1 stream Gbit/s", "%.2f"], ["tcp4_gbps", "TCP 4 streams Gbit/s", "%.2f"],
                 ["udp_mbps", "UDP delivered Mbit/s", "%.0f"], ["udp_loss_pct", "UDP loss %", "%.1f"],
                 ["rtt_ms", "ping RTT avg ms", "%.3f"], ["rtt_added_ms", "RTT over veth ms", "%.3f"],
                 ["rtt_p50_ms", "ping RTT p50 ms", "%.3f"], ["rtt_p50_added_ms", "p50 RTT over veth", "%.3f"],
                 ["rtt_min_ms", "ping RTT min ms", "%.3f"], ["rtt_min_added_ms", "min RTT over veth", "%.3f"],
                 ["cpu_s_per_gbit", "CPU s/Gbit", "%.2f"], ["rss_mib", "idle RSS MiB", "%.1f"],
                 ["rr1_tps", "RR 1 flow txn/s", "%.0f"], ["rr1_p50_us", "RR 1 flow p50 us", "%.1f"],
                 ["rr1_p99_us", "RR 1 flow p99 us", "%.1f"], ["cpu_us_per_rr1", "CPU us/RR txn (1)", "%.1f"],
                 ["rr16_tps", "RR 16 flows txn/s", "%.0f"], ["rr16_p99_us", "RR 16 flows p99 us", "%.1f"],
                 ["cpu_us_per_rr16", "CPU us/RR txn (16)", "%.1f"],
                 ["pgbench_tps", "pgbench tps", "%.0f"], ["pgbench_lat_ms", "pgbench latency ms", "%.3f"],
                 ["cpu_us_per_pgtxn", "CPU us/pgbench txn", "%.1f"]];
      . as $d
      | (["figure", "ratio to", "-"] + [.implementations[] | (., "-")] | @tsv),
        (rows[] as [$m, $title, $fmt]
         | [$title, (if $m == "udp_loss_pct" then "-" else $d.reference[$m].ref // "-" end), $fmt]
           + [$d.implementations[] as $i
              | ($d.summary[$i][$m] // "-"),
                (if $m == "udp_loss_pct" then "-" else $d.ratios[$i][$m] // "-" end)]
         | map(tostring) | @tsv)' "$json" |
        awk -F'\t' -v OFS='\t' '
          NR == 1 { printf "%s\t%s", $1, $2; for (i = 4; i <= NF; i += 2) printf "\t%s", $i; print ""; next }
          {
            printf "%s\t%s", $1, $2
            for (i = 4; i <= NF; i += 2) {
              v = ($i == "-") ? "n/a" : sprintf($3, $i)
              if ($(i + 1) != "-") v = v sprintf(" (%.2fx)", $(i + 1))
              printf "\t%s", v
            }
            print ""
          }' | column -t -s $'\t'
}

report() { # report RESULTS.json: the table and the issue-2 targets
    echo
    jq -r '.meta | "meshd bench-tunnel \(.date): \(.cpus) cpus, kernel \(.kernel), DURATION=\(.duration_s)s, ROUNDS=\(.rounds) (medians), MTU \(.mtu), took \(.elapsed_s)s"' "$1"
    print_table "$1"
    jq -r '.not_available | to_entries[] | "n/a: \(.key): \(.value)"' "$1"

    # Targets from issue 2 (only when meshd was measured).
    jq -r '
      . as $d | $d.summary.meshd as $m
      | if ($m | length) == 0 then empty else
        ([$d.implementations[] | select(. != "veth" and (startswith("meshd") | not) and (endswith("-1cpu") | not))]) as $anchors
        | ([$anchors[] | $d.summary[.].tcp1_gbps // empty] | max) as $best_tcp
        | ([$anchors[] | $d.summary[.].udp_mbps // empty] | max) as $best_udp
        | "targets (issue 2):",
          "  TCP 1 stream >= 1.5x best anchor: \(if $m.tcp1_gbps == null or $best_tcp == null then "n/a"
              else "\($m.tcp1_gbps / $best_tcp * 100 | round / 100)x " + (if $m.tcp1_gbps >= 1.5 * $best_tcp then "PASS" else "FAIL" end) end)",
          "  UDP delivered above every anchor: \(if $m.udp_mbps == null or $best_udp == null then "n/a"
              elif $m.udp_mbps > $best_udp then "PASS" else "FAIL" end)",
          "  RTT added below boringtun (avg): \(if $m.rtt_added_ms == null or ($d.summary.boringtun.rtt_added_ms // null) == null then "n/a"
              elif $m.rtt_added_ms < $d.summary.boringtun.rtt_added_ms then "PASS" else "FAIL" end)",
          "  RTT added below boringtun (p50): \(if $m.rtt_p50_added_ms == null or ($d.summary.boringtun.rtt_p50_added_ms // null) == null then "n/a"
              elif $m.rtt_p50_added_ms < $d.summary.boringtun.rtt_p50_added_ms then "PASS" else "FAIL" end)",
          "  RTT added below boringtun (min): \(if $m.rtt_min_added_ms == null or ($d.summary.boringtun.rtt_min_added_ms // null) == null then "n/a"
              elif $m.rtt_min_added_ms < $d.summary.boringtun.rtt_min_added_ms then "PASS" else "FAIL" end)",
          "  idle RSS < 8 MiB per daemon: \(if $m.rss_mib == null then "n/a" elif $m.rss_mib < 8 then "PASS" else "FAIL" end)",
          (($d.summary["meshd-policy"].tcp1_gbps // null) as $p
           | if $p == null or $m.tcp1_gbps == null then empty else
             "target (issue 4): TCP 1 stream with a 1,000-rule policy within 5% of none: \($p / $m.tcp1_gbps * 100 | round)% " + (if $p >= 0.95 * $m.tcp1_gbps then "PASS" else "FAIL" end) end),
          (($d.summary["meshd-noflows"] // null) as $n
           | if $n == null or $m.tcp1_gbps == null or $n.tcp1_gbps == null then empty else
             "target (issue 16): flow records on within 3% of off: TCP 1 stream \($m.tcp1_gbps / $n.tcp1_gbps * 100 | round)% " + (if $m.tcp1_gbps >= 0.97 * $n.tcp1_gbps then "PASS" else "FAIL" end)
             + (if $n.udp_mbps == null or $m.udp_mbps == null then "" else ", UDP \($m.udp_mbps / $n.udp_mbps * 100 | round)% " + (if $m.udp_mbps >= 0.97 * $n.udp_mbps then "PASS" else "FAIL" end) end) end),
          (($d.summary["meshd-transparent"].tcp1_gbps // null) as $t
           | if $t == null or $m.tcp1_gbps == null then empty else
             "target (issue 5): TCP 1 stream in transparent mode within 5% of overlay mode: \($t / $m.tcp1_gbps * 100 | round)% " + (if $t >= 0.95 * $m.tcp1_gbps then "PASS" else "FAIL" end) end),
          (([$anchors[] | $d.summary[.].pgbench_tps // empty] | max) as $best_pg
           | ($d.summary.veth.pgbench_tps // null) as $veth_pg
           | ($d.summary.boringtun.cpu_us_per_pgtxn // null) as $bt_cpu
           | if $m.pgbench_tps == null then empty else
             "targets (issue 19):",
             "  pgbench tps >= 1.5x best anchor: \(if $best_pg == null then "n/a"
                 else "\($m.pgbench_tps / $best_pg * 100 | round / 100)x " + (if $m.pgbench_tps >= 1.5 * $best_pg then "PASS" else "FAIL" end) end)",
             "  pgbench tps >= 60% of veth: \(if $veth_pg == null then "n/a"
                 else "\($m.pgbench_tps / $veth_pg * 100 | round)% " + (if $m.pgbench_tps >= 0.6 * $veth_pg then "PASS" else "FAIL" end) end)",
             "  CPU per pgbench transaction <= boringtun: \(if $m.cpu_us_per_pgtxn == null or $bt_cpu == null then "n/a"
                 else "\($m.cpu_us_per_pgtxn / $bt_cpu * 100 | round / 100)x " + (if $m.cpu_us_per_pgtxn <= $bt_cpu then "PASS" else "FAIL" end) end)" end),
          ([["meshd", "meshd-1cpu"], ["wg-go-bpo", "wg-go-bpo-1cpu"]][] as [$u, $p]
           | ($d.summary[$u] // {}) as $su | ($d.summary[$p] // {}) as $sp
           | if ($sp | length) == 0 or ($su | length) == 0 then empty else
             "1 core / 2 cores (\($p) / \($u)): " +
             ([[["tcp1_gbps", "TCP 1 stream"], ["rr1_tps", "RR 1"], ["rr16_tps", "RR 16"], ["pgbench_tps", "pgbench"]][] as [$k, $t]
               | select($su[$k] != null and $sp[$k] != null and $su[$k] != 0)
               | "\($t) \($sp[$k] / $su[$k] * 100 | round)%"] | join(", ")) end)
        end' "$1"
    echo "results: $RESULTS"
}

if [[ ${1:-} == --table ]]; then # re-print the table of an earlier run
    report "${2:-$RESULTS}"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 && $DURATION -le 600 ]] || die "DURATION must be 1..600"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 && $ROUNDS -le 50 ]] || die "ROUNDS must be 1..50"
[[ $RR_SECS =~ ^[0-9]+$ && $RR_SECS -le 600 ]] || die "RR_SECS must be 0..600"
[[ $RR_SIZE =~ ^[0-9]+$ && $RR_SIZE -ge 1 && $RR_SIZE -le 65536 ]] || die "RR_SIZE must be 1..65536"
[[ $PGBENCH_SECS =~ ^[0-9]+$ && $PGBENCH_SECS -le 600 ]] || die "PGBENCH_SECS must be 0..600"
for tool in ip iperf3 ping jq awk timeout; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/install-anchors.sh installs it)"
done
CLK_TCK=$(getconf CLK_TCK)

TMP=$(mktemp -d /tmp/mbench.XXXXXX)
RAW="$TMP/raw.tsv" # round impl key value
: >"$RAW"
BG_PIDS=()  # every background process this script started
LAB_PIDS=() # those of the current lab
NSA="" NSB="" SEQ=0
PGTMP="" # PostgreSQL's directories (owned by nobody, so not under $TMP)

# --- process and namespace housekeeping ------------------------------------------------

stop_pids() { # TERM the given pids, wait up to 3 s, then KILL
    local p alive i
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        alive=0
        for p in "$@"; do
            if kill -0 "$p" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for p in "$@"; do
        if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
    done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

cleanup() {
    local rc=$? ns
    trap - EXIT INT TERM
    if ((${#BG_PIDS[@]})); then stop_pids "${BG_PIDS[@]}"; fi
    while read -r ns _; do
        if [[ $ns == "$PREFIX"-* ]]; then ip netns delete "$ns" 2>/dev/null || true; fi
    done < <(ip netns list 2>/dev/null)
    rm -rf "$TMP"
    if [[ -n $PGTMP ]]; then rm -rf "$PGTMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Start "$@" in namespace $1 in the background, output to log file $2. Sets BGPID.
# `ip netns exec` and `env` exec, so BGPID is the daemon's own pid.
start_in() {
    local ns=$1 logf=$2
    shift 2
    ip netns exec "$ns" "$@" >"$logf" 2>&1 </dev/null &
    BGPID=$!
    BG_PIDS+=("$BGPID")
    LAB_PIDS+=("$BGPID")
}

lab_up() {
    SEQ=$((SEQ + 1))
    NSA="$PREFIX-$SEQ-a"
    NSB="$PREFIX-$SEQ-b"
    LAB_PIDS=()
    ip netns add "$NSA"
    ip netns add "$NSB"
    ip link add veth0 netns "$NSA" type veth peer name veth0 netns "$NSB"
    ip -n "$NSA" addr add "$UA/24" dev veth0
    ip -n "$NSB" addr add "$UB/24" dev veth0
    local ns
    for ns in "$NSA" "$NSB"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set veth0 up
    done
    LABDIR="$TMP/lab$SEQ"
    mkdir -p "$LABDIR"
}

lab_down() {
    pg_stop
    if ((${#LAB_PIDS[@]})); then stop_pids "${LAB_PIDS[@]}"; fi
    local p keep=()
    for p in "${BG_PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then keep+=("$p"); fi
    done
    BG_PIDS=("${keep[@]}")
    LAB_PIDS=()
    ip netns delete "$NSA" 2>/dev/null || true
    ip netns delete "$NSB" 2>/dev/null || true
}

# wait_for TRIES SLEEP cmd...: retry a command, bounded
wait_for() {
    local tries=$1 pause=$2 i
    shift 2
    for ((i = 0; i < tries; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep "$pause"
    done
    return 1
}

all_alive() {
    local p
    for p in "${DAEMONS[@]}"; do kill -0 "$p" 2>/dev/null || return 1; done
}

# Ping through the tunnel until it answers: up to ~15 s, giving up early if a daemon died.
wait_tunnel() {
    local i
    for ((i = 0; i < 30; i++)); do
        all_alive || {
            NA_REASON="daemon exited"
            return 1
        }
        if ip netns exec "$NSA" ping -q -c 1 -W 0.5 "$OB" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    NA_REASON="no ping through the tunnel within 15 s"
    return 1
}

# --- implementations -------------------------------------------------------------------
# setup_<impl>: brings the tunnel up in the current lab; sets TARGET (address to measure
# against) and DAEMONS (pids whose CPU and RSS count). Returns non-zero with NA_REASON set.

declare -A BIN=()
MESHD_EXTRA_ARGS=()
DAEMON_WRAP=() # prefix for the tunnel daemons' command lines (the -1cpu variants: taskset)
find_bins() {
    local b
    BIN[wg]=$(command -v wg || true)
    BIN[wg-go]=/usr/bin/wireguard-go
    BIN[wg-go-bpo]=$ANCHOR_DIR/wg-go-bpo/root/usr/bin/wireguard-go
    BIN[boringtun]=$ANCHOR_DIR/boringtun/bin/boringtun-cli
    b=$(command -v boringtun-cli || true)
    [[ -x ${BIN[boringtun]} || -z $b ]] || BIN[boringtun]=$b
    BIN[nebula]=$(command -v nebula || true)
    BIN[nebula-cert]=$(command -v nebula-cert || true)
}

available() { # available IMPL -> 0, or 1 with NA_REASON
    case $1 in
    veth) return 0 ;;
    meshd-before)
        [[ -n $MESHD_BEFORE ]] || {
            NA_REASON="MESHD_BEFORE is not set"
            return 1
        }
        [[ -x $MESHD_BEFORE ]] || {
            NA_REASON="MESHD_BEFORE=$MESHD_BEFORE is not executable"
            return 1
        }
        ;;
    meshd | meshd-noflows | meshd-policy | meshd-transparent | meshd-busypoll | meshd-1cpu)
        [[ -n ${MESHD_BIN:-} ]] || {
            NA_REASON=${MESHD_NA:-"meshd not built"}
            return 1
        }
        ;;
    wg-go | wg-go-bpo | wg-go-bpo-1cpu | boringtun)
        [[ -x ${BIN[${1%-1cpu}]} ]] || {
            NA_REASON="${BIN[${1%-1cpu}]} not installed (scripts/install-anchors.sh)"
            return 1
        }
        [[ -n ${BIN[wg]} ]] || {
            NA_REASON="wg (wireguard-tools) not installed"
            return 1
        }
        ;;
    nebula)
        [[ -n ${BIN[nebula]} && -n ${BIN[nebula-cert]} ]] || {
            NA_REASON="nebula not installed"
            return 1
        }
        ;;
    *)
        NA_REASON="unknown implementation"
        return 1
        ;;
    esac
}

setup_veth() {
    TARGET=$UB
    DAEMONS=()
}

wg_keys() { # writes $LABDIR/{a,b}.key and sets PUBA PUBB, using wg
    (umask 077 && wg genkey >"$LABDIR/a.key" && wg genkey >"$LABDIR/b.key")
    PUBA=$(wg pubkey <"$LABDIR/a.key")
    PUBB=$(wg pubkey <"$LABDIR/b.key")
}

# A userspace WireGuard daemon configured over its UAPI socket with wg(8).
# The interface names are unique per run and lab: the UAPI sockets live in the shared
# /var/run/wireguard/<ifname>.sock, and other runs or tests may use wg0 at the same time.
setup_uapi() { # setup_uapi IMPL
    local impl=$1 side ns ifname key peer_pub peer_ep peer_ip addr
    wg_keys
    DAEMONS=()
    for side in a b; do
        if [[ $side == a ]]; then
            ns=$NSA key=$LABDIR/a.key peer_pub=$PUBB peer_ep=$UB peer_ip=$OB addr=$OA
        else
            ns=$NSB key=$LABDIR/b.key peer_pub=$PUBA peer_ep=$UA peer_ip=$OA addr=$OB
        fi
        ifname="w$$s${SEQ}$side"
        case $impl in
        wg-go | wg-go-bpo)
            start_in "$ns" "$LABDIR/$side.log" env LOG_LEVEL=error "${DAEMON_WRAP[@]}" "${BIN[$impl]}" -f "$ifname"
            ;;
        boringtun)
            start_in "$ns" "$LABDIR/$side.log" env WG_LOG_LEVEL=error "${DAEMON_WRAP[@]}" "${BIN[$impl]}" \
                --foreground --disable-drop-privileges --log "$LABDIR/$side.bt.log" "$ifname"
            ;;
        esac
        DAEMONS+=("$BGPID")
        if ! wait_for 50 0.1 test -S "/var/run/wireguard/$ifname.sock"; then
            NA_REASON="no UAPI socket /var/run/wireguard/$ifname.sock: $(tail -n2 "$LABDIR/$side.log" | tr '\n' ' ')"
            return 1
        fi
        ip netns exec "$ns" wg set "$ifname" private-key "$key" listen-port "$WG_PORT" \
            peer "$peer_pub" endpoint "$peer_ep:$WG_PORT" allowed-ips "$peer_ip/32"
        ip -n "$ns" addr add "$addr/10" dev "$ifname"
        ip -n "$ns" link set "$ifname" mtu "$MTU" up
    done
    TARGET=$OB
    wait_tunnel
}
setup_wg-go() { setup_uapi wg-go; }
setup_wg-go-bpo() { setup_uapi wg-go-bpo; }
# The -1cpu variants: both daemons (and every thread they start) on CPU 0 only.
setup_wg-go-bpo-1cpu() {
    DAEMON_WRAP=(taskset -c 0)
    local rc=0
    setup_uapi wg-go-bpo || rc=$?
    DAEMON_WRAP=()
    return $rc
}
setup_boringtun() { setup_uapi boringtun; }

NEBULA_PKI=""
nebula_pki() { # CA and two host certs, once per run
    [[ -n $NEBULA_PKI ]] && return 0
    NEBULA_PKI="$TMP/nebula-pki"
    mkdir -p "$NEBULA_PKI"
    (
        cd "$NEBULA_PKI"
        nebula-cert ca -name "meshd-bench" -duration 24h -out-crt ca.crt -out-key ca.key
        nebula-cert sign -name a -ip "$OA/10" -ca-crt ca.crt -ca-key ca.key -out-crt a.crt -out-key a.key
        nebula-cert sign -name b -ip "$OB/10" -ca-crt ca.crt -ca-key ca.key -out-crt b.crt -out-key b.key
    ) >"$TMP/nebula-cert.log" 2>&1
}

setup_nebula() {
    local side ns peer_o peer_u
    nebula_pki || {
        NA_REASON="nebula-cert failed: $(tail -n1 "$TMP/nebula-cert.log")"
        return 1
    }
    DAEMONS=()
    for side in a b; do
        if [[ $side == a ]]; then ns=$NSA peer_o=$OB peer_u=$UB; else ns=$NSB peer_o=$OA peer_u=$UA; fi
        cat >"$LABDIR/nebula-$side.yml" <<EOF
pki:
  ca: $NEBULA_PKI/ca.crt
  cert: $NEBULA_PKI/$side.crt
  key: $NEBULA_PKI/$side.key
static_host_map:
  "$peer_o": ["$peer_u:4242"]
lighthouse:
  am_lighthouse: false
  hosts: []
listen:
  host: 0.0.0.0
  port: 4242
punchy:
  punch: false
relay:
  use_relays: false
tun:
  disabled: false
  dev: nebula0
  mtu: $MTU
logging:
  level: warning
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
EOF
        start_in "$ns" "$LABDIR/$side.log" "${BIN[nebula]}" -config "$LABDIR/nebula-$side.yml"
        DAEMONS+=("$BGPID")
    done
    if ! wait_for 50 0.1 ip -n "$NSA" link show nebula0 || ! wait_for 50 0.1 ip -n "$NSB" link show nebula0; then
        NA_REASON="nebula0 did not appear: $(tail -n2 "$LABDIR/a.log" | tr '\n' ' ')"
        return 1
    fi
    TARGET=$OB
    wait_tunnel
}

MESHD_BIN="" MESHD_NA=""
build_meshd() {
    if [[ -n ${MESHD:-} ]]; then
        [[ -x $MESHD ]] && MESHD_BIN=$MESHD || MESHD_NA="MESHD=$MESHD is not executable"
        return 0
    fi
    local target_dir=${CARGO_TARGET_DIR:-$REPO/target}
    if [[ $SKIP_BUILD != 1 ]]; then
        log "building meshd (cargo build --release -p meshd)"
        if ! (cd "$REPO" && timeout "$BUILD_TIMEOUT" cargo build --release -p meshd) >"$TMP/build.log" 2>&1; then
            MESHD_NA="build failed: $(grep -m1 -E '^error' "$TMP/build.log" || tail -n1 "$TMP/build.log")"
            log "meshd: $MESHD_NA"
            return 0
        fi
    fi
    if [[ ! -x $target_dir/release/meshd ]]; then
        MESHD_NA="no $target_dir/release/meshd"
        return 0
    fi
    MESHD_BIN=$target_dir/release/meshd
    local k
    if ! k=$(timeout 5 "$MESHD_BIN" genkey 2>/dev/null) || [[ -z $k ]] ||
        ! timeout 5 "$MESHD_BIN" pubkey <<<"$k" >/dev/null 2>&1; then
        MESHD_NA="meshd genkey/pubkey does not work yet"
        MESHD_BIN=""
        log "meshd: $MESHD_NA"
    fi
}

# meshd with a 1,000-rule label policy (999 rules for other labels, one that admits the
# benchmark's traffic): issue 4 wants throughput within 5% of meshd without policy.
setup_meshd-policy() {
    local i
    {
        echo "rules:"
        for ((i = 0; i < 999; i++)); do
            printf '  - name: other-%d\n    from: { app: svc%d }\n    to: { app: db%d }\n    ports: [tcp/%d]\n' \
                "$i" "$i" "$i" $((10000 + i))
        done
        printf '  - name: bench\n    from: { role: bench }\n    to: { role: bench }\n    ports: [tcp/5201, udp/5201, tcp/%d, tcp/%d, icmp]\n' \
            "$RR_PORT" "$PG_PORT"
    } >"$LABDIR/policy.yaml"
    MESHD_EXTRA_IFACE=$'labels = { role = "bench" }\npolicy_file = "'"$LABDIR"'/policy.yaml"'
    MESHD_EXTRA_PEER='labels = { role = "bench" }'
    local rc=0
    setup_meshd || rc=$?
    MESHD_EXTRA_IFACE='' MESHD_EXTRA_PEER=''
    return $rc
}

# meshd in transparent mode: the same tunnel, but iperf3 talks to B's ordinary address; issue 5
# wants throughput within 5% of overlay mode.
setup_meshd-transparent() {
    MESHD_EXTRA_IFACE='mode = "transparent"'
    local rc=0 i
    setup_meshd || rc=$?
    MESHD_EXTRA_IFACE=''
    ((rc == 0)) || return $rc
    # Wait until A routes B's address into the tunnel, then measure against it.
    for ((i = 0; i < 50; i++)); do
        if ip -n "$NSA" route show table all 2>/dev/null | grep -q "^$UB dev mesh0"; then
            TARGET=$UB
            return 0
        fi
        sleep 0.1
    done
    NA_REASON="no transparent route to $UB within 5 s"
    return 1
}

# meshd without flow records (`flow_records = false`: no per-packet counting, no collection):
# issue 16 wants meshd (flow records on, the default) within 3% of it on TCP and UDP.
setup_meshd-noflows() {
    MESHD_EXTRA_IFACE='flow_records = false'
    local rc=0
    setup_meshd || rc=$?
    MESHD_EXTRA_IFACE=''
    return $rc
}

# meshd with opt-in busy polling (--busy-poll-us): the latency trade-off, for comparison
# with the default (which sleeps).
setup_meshd-busypoll() {
    MESHD_EXTRA_ARGS=(--busy-poll-us "${BUSY_POLL_US:-300}")
    local rc=0
    setup_meshd || rc=$?
    MESHD_EXTRA_ARGS=()
    return $rc
}

# meshd with both daemons on CPU 0 only (taskset -c 0): 1 core against meshd's 2.
setup_meshd-1cpu() {
    DAEMON_WRAP=(taskset -c 0)
    local rc=0
    setup_meshd || rc=$?
    DAEMON_WRAP=()
    return $rc
}

# The binary of MESHD_BEFORE, run exactly like meshd (same config, same arguments).
setup_meshd-before() {
    local rc=0 after=$MESHD_BIN
    MESHD_BIN=$MESHD_BEFORE
    setup_meshd || rc=$?
    MESHD_BIN=$after
    return $rc
}

setup_meshd() {
    local side ns peer_pub peer_ep peer_ip addr
    (umask 077 && "$MESHD_BIN" genkey >"$LABDIR/a.key" && "$MESHD_BIN" genkey >"$LABDIR/b.key")
    chmod 600 "$LABDIR/a.key" "$LABDIR/b.key"
    PUBA=$("$MESHD_BIN" pubkey <"$LABDIR/a.key")
    PUBB=$("$MESHD_BIN" pubkey <"$LABDIR/b.key")
    DAEMONS=()
    for side in a b; do
        if [[ $side == a ]]; then
            ns=$NSA peer_pub=$PUBB peer_ep=$UB peer_ip=$OB addr=$OA
        else
            ns=$NSB peer_pub=$PUBA peer_ep=$UA peer_ip=$OA addr=$OB
        fi
        mkdir -m 700 "$LABDIR/state-$side" # meshd refuses a state dir others can read
        cat >"$LABDIR/meshd-$side.toml" <<EOF
[interface]
name = "mesh0"
private_key_file = "$LABDIR/$side.key"
listen_port = $WG_PORT
address = "$addr/10"
mtu = $MTU
uapi_dir = "$LABDIR/$side-uapi"
${MESHD_EXTRA_IFACE:-}

[[peer]]
name = "peer"
public_key = "$peer_pub"
endpoint = "$peer_ep:$WG_PORT"
allowed_ips = ["$peer_ip/32"]
${MESHD_EXTRA_PEER:-}
EOF
        start_in "$ns" "$LABDIR/$side.log" "${DAEMON_WRAP[@]}" "$MESHD_BIN" up \
            --config "$LABDIR/meshd-$side.toml" --state-dir "$LABDIR/state-$side" "${MESHD_EXTRA_ARGS[@]}"
        DAEMONS+=("$BGPID")
    done
    local i
    for ((i = 0; i < 100; i++)); do
        if ip -n "$NSA" link show mesh0 >/dev/null 2>&1 && ip -n "$NSB" link show mesh0 >/dev/null 2>&1; then
            break
        fi
        if ! all_alive; then
            NA_REASON="meshd exited: $(tail -n2 "$LABDIR/a.log" "$LABDIR/b.log" 2>/dev/null | grep -v '^==>' | grep . | tail -n1)"
            return 1
        fi
        sleep 0.1
    done
    if ((i == 100)); then
        NA_REASON="mesh0 did not appear within 10 s"
        return 1
    fi
    TARGET=$OB
    wait_tunnel || {
        NA_REASON="$NA_REASON: $(tail -n1 "$LABDIR/a.log" 2>/dev/null)"
        return 1
    }
}

# --- the request/response probe and PostgreSQL ---------------------------------------

RR_BIN="" RR_NA=""
build_rr_probe() { # sets RR_BIN, or RR_NA
    ((RR_SECS > 0)) || {
        RR_NA="RR_SECS=0"
        return 0
    }
    if [[ -n ${RR_PROBE:-} ]]; then
        [[ -x $RR_PROBE ]] && RR_BIN=$RR_PROBE || RR_NA="RR_PROBE=$RR_PROBE is not executable"
        return 0
    fi
    local target_dir=${CARGO_TARGET_DIR:-$REPO/target}
    if [[ $SKIP_BUILD != 1 ]]; then
        log "building rr_probe (cargo build --release -p meshd-lab --example rr_probe)"
        if ! (cd "$REPO" && timeout "$BUILD_TIMEOUT" cargo build --release -p meshd-lab --example rr_probe) \
            >"$TMP/build-rr.log" 2>&1; then
            RR_NA="rr_probe build failed: $(grep -m1 -E '^error' "$TMP/build-rr.log" || tail -n1 "$TMP/build-rr.log")"
            return 0
        fi
    fi
    if [[ -x $target_dir/release/examples/rr_probe ]]; then
        RR_BIN=$target_dir/release/examples/rr_probe
    else
        RR_NA="no $target_dir/release/examples/rr_probe"
    fi
}

PG_BIN="" PG_NA="" PG_TEMPLATE=""
pg_bindir() { # the directory with initdb, postgres and pgbench, or nothing
    local d
    local debian=()
    mapfile -t debian < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    for d in "${PG_BINDIR:-}" "${debian[@]}" "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")"; do
        if [[ -n $d && -x $d/initdb && -x $d/postgres && -x $d/pgbench && -x $d/pg_isready ]]; then
            echo "$d"
            return 0
        fi
    done
}

AS_NOBODY=(setpriv --reuid=nobody --regid=nogroup --clear-groups --reset-env) # postgres refuses root

# Once per run: a cluster initialised by `pgbench -i` (scale 1), the template each lab copies.
# The server for this step listens on its Unix socket only (no TCP at all).
pg_prepare() {
    ((PGBENCH_SECS > 0)) || {
        PG_NA="PGBENCH_SECS=0"
        return 0
    }
    PG_BIN=$(pg_bindir)
    [[ -n $PG_BIN ]] || {
        PG_NA="PostgreSQL not installed (apt-get install postgresql, or PG_BINDIR)"
        return 0
    }
    command -v setpriv >/dev/null || {
        PG_NA="setpriv not found"
        PG_BIN=""
        return 0
    }
    PGTMP=$(mktemp -d /tmp/mbench-pg.XXXXXX)
    chown nobody:nogroup "$PGTMP"
    PG_TEMPLATE=$PGTMP/template
    local log=$PGTMP/prepare.log pid ok=0
    log "preparing the pgbench database (initdb, pgbench -i)"
    if timeout 120 "${AS_NOBODY[@]}" env LC_ALL=C TZ=UTC "$PG_BIN/initdb" -D "$PG_TEMPLATE" -A trust -U bench \
        -E UTF8 --no-instructions --no-sync >"$log" 2>&1; then
        # Trust from anywhere: the server only ever listens inside a lab's namespace B.
        echo "host all all 0.0.0.0/0 trust" >>"$PG_TEMPLATE/pg_hba.conf"
        "${AS_NOBODY[@]}" env LC_ALL=C TZ=UTC "$PG_BIN/postgres" -D "$PG_TEMPLATE" -k "$PGTMP" -p "$PG_PORT" \
            -c listen_addresses= -c fsync=off >>"$log" 2>&1 </dev/null &
        pid=$!
        BG_PIDS+=("$pid")
        if wait_for 100 0.1 "$PG_BIN/pg_isready" -q -h "$PGTMP" -p "$PG_PORT" &&
            timeout 120 "$PG_BIN/pgbench" -i -q -s 1 -h "$PGTMP" -p "$PG_PORT" -U bench postgres >>"$log" 2>&1; then
            ok=1
        fi
        kill -INT "$pid" 2>/dev/null || true # fast shutdown (a checkpoint), then stop_pids' KILL
        wait_for 100 0.1 bash -c "! kill -0 $pid" || true
        stop_pids "$pid"
    fi
    if ((!ok)); then
        PG_NA="preparing the database failed: $(grep -E 'FATAL|ERROR|error' "$log" | head -n1 || tail -n1 "$log")"
        PG_BIN=""
        return 0
    fi
    rm -f "$PG_TEMPLATE/postmaster.pid"
}

PG_PID="" PG_DIR=""
pg_start() { # pg_start: a copy of the template served in B on port PG_PORT; 0 when ready
    PG_PID=""
    [[ -n $PG_BIN ]] || return 1
    PG_DIR=$PGTMP/lab$SEQ
    cp -a "$PG_TEMPLATE" "$PG_DIR"
    start_in "$NSB" "$LABDIR/postgres.log" "${AS_NOBODY[@]}" env LC_ALL=C TZ=UTC "$PG_BIN/postgres" -D "$PG_DIR" -k "$PG_DIR" -p "$PG_PORT" \
        -c "listen_addresses=*" -c max_connections=20 -c fsync=off -c synchronous_commit=off \
        -c full_page_writes=off
    PG_PID=$BGPID
    wait_for 100 0.1 ip netns exec "$NSB" "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
}

pg_stop() { # fast shutdown of the lab's server, then its directory goes
    [[ -n $PG_PID ]] || return 0
    kill -INT "$PG_PID" 2>/dev/null || true
    wait_for 100 0.1 bash -c "! kill -0 $PG_PID" || true
    stop_pids "$PG_PID"
    PG_PID=""
    rm -rf "$PG_DIR"
}

# --- measurements ----------------------------------------------------------------------

record() { printf '%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" >>"$RAW"; }

cpu_ticks() { # utime+stime summed over the given pids
    local p s rest f total=0
    for p in "$@"; do
        s=$(<"/proc/$p/stat") || return 1
        rest=${s##*) }
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

cpu_ns() { # on-CPU nanoseconds summed over every thread of the given pids
    local p t total=0 v
    for p in "$@"; do
        for t in /proc/"$p"/task/*/schedstat; do
            read -r v _ <"$t" 2>/dev/null || continue
            total=$((total + v))
        done
    done
    echo "$total"
}

# rtt_percentile P < ping output: the P-th percentile of the per-reply "time=" values.
rtt_percentile() {
    grep -oE 'time=[0-9.]+' | cut -d= -f2 | sort -g |
        awk -v p="$1" '{v[NR] = $1} END {if (NR) {i = int((NR - 1) * p / 100) + 1; print v[i]}}'
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# iperf3 from A to TARGET; prints the JSON. Bounded in time.
iperf() {
    timeout $((DURATION + 30)) ip netns exec "$NSA" iperf3 -c "$TARGET" -t "$DURATION" -J "$@"
}

measure() { # measure IMPL
    local impl=$1 out t0 t1 i r bytes rss max_rss=0
    # idle RSS
    if ((${#DAEMONS[@]})); then
        sleep 2
        for i in "${!DAEMONS[@]}"; do
            rss=$(rss_kib "${DAEMONS[$i]}")
            record "$impl" "rss_kib_daemon$i" "$rss"
            if ((rss > max_rss)); then max_rss=$rss; fi
        done
        record "$impl" rss_mib "$(awk -v k="$max_rss" 'BEGIN {printf "%.2f", k / 1024}')"
    fi
    # ping RTT (and, in RTT_ONLY mode, the daemons' CPU time per ping from schedstat)
    local ns0=0 ns1=0
    if ((RTT_ONLY && ${#DAEMONS[@]})); then ns0=$(cpu_ns "${DAEMONS[@]}"); fi
    if out=$(timeout 60 ip netns exec "$NSA" ping -c "$PING_COUNT" -i "$PING_INTERVAL" -W 1 "$TARGET" 2>&1); then
        # "rtt min/avg/max/mdev = 0.036/0.061/0.266/0.020 ms": fields 7, 8, 9
        if [[ -n ${RTT_DUMP:-} ]]; then
            mkdir -p "$RTT_DUMP" && printf '%s\n' "$out" >"$RTT_DUMP/$impl-$(date +%s).txt"
        fi
        r=$(awk -F'[/ ]+' '/^rtt|^round-trip/ {print $8}' <<<"$out")
        if [[ -n $r ]]; then record "$impl" rtt_ms "$r"; fi
        r=$(awk -F'[/ ]+' '/^rtt|^round-trip/ {print $7}' <<<"$out")
        if [[ -n $r ]]; then record "$impl" rtt_min_ms "$r"; fi
        r=$(rtt_percentile 50 <<<"$out")
        if [[ -n $r ]]; then record "$impl" rtt_p50_ms "$r"; fi
        r=$(grep -oE '[0-9.]+% packet loss' <<<"$out" | grep -oE '^[0-9.]+' || true)
        if [[ -n $r ]]; then record "$impl" ping_loss_pct "$r"; fi
    else
        log "  $impl: ping failed"
    fi
    if ((RTT_ONLY)); then
        if ((${#DAEMONS[@]})); then
            ns1=$(cpu_ns "${DAEMONS[@]}")
            log "  $impl: daemon CPU per ping: $(((ns1 - ns0) / PING_COUNT / 1000)) us"
        fi
        log "  $impl: rtt $(awk -F'[/ ]+' '/^rtt|^round-trip/ {print $7 "/" $8 "/" $9}' <<<"$out") ms (min/avg/max)," \
            "p10/p50/p90 $(rtt_percentile 10 <<<"$out")/$(rtt_percentile 50 <<<"$out")/$(rtt_percentile 90 <<<"$out") ms"
        return 0
    fi
    # TCP single stream, with daemon CPU
    if ((${#DAEMONS[@]})); then t0=$(cpu_ticks "${DAEMONS[@]}") || t0=""; fi
    if out=$(iperf 2>"$LABDIR/iperf.err"); then
        r=$(jq -r '.end.sum_received.bits_per_second / 1e9' <<<"$out")
        bytes=$(jq -r '.end.sum_received.bytes' <<<"$out")
        record "$impl" tcp1_gbps "$r"
        record "$impl" tcp1_retransmits "$(jq -r '.end.sum_sent.retransmits // 0' <<<"$out")"
        if ((${#DAEMONS[@]})) && [[ -n $t0 ]] && t1=$(cpu_ticks "${DAEMONS[@]}"); then
            record "$impl" cpu_s "$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", d / hz}')"
            record "$impl" cpu_s_per_gbit "$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v b="$bytes" \
                'BEGIN {if (b > 0) printf "%.4f", (d / hz) / (b * 8 / 1e9)}')"
        fi
        log "  $impl: tcp1 $(printf '%.2f' "$r") Gbit/s"
    else
        log "  $impl: iperf3 tcp1 failed: $(jq -r '.error // empty' <<<"$out" 2>/dev/null | head -n1)"
    fi
    # TCP 4 streams
    if out=$(iperf -P 4 2>"$LABDIR/iperf.err"); then
        record "$impl" tcp4_gbps "$(jq -r '.end.sum_received.bits_per_second / 1e9' <<<"$out")"
    else
        log "  $impl: iperf3 tcp4 failed"
    fi
    # UDP at max rate
    if out=$(iperf -u -b 0 -l "$UDP_LEN" 2>"$LABDIR/iperf.err"); then
        record "$impl" udp_mbps "$(jq -r '(.end.sum_received // .end.sum).bits_per_second / 1e6' <<<"$out")"
        record "$impl" udp_sent_mbps "$(jq -r '(.end.sum_sent // .end.sum).bits_per_second / 1e6' <<<"$out")"
        record "$impl" udp_loss_pct "$(jq -r '(.end.sum_received // .end.sum).lost_percent' <<<"$out")"
    else
        log "  $impl: iperf3 udp failed"
    fi
    # request/response (TCP_RR style), 1 and 16 connections
    if ((RR_READY)); then
        rr_run "$impl" 1 rr1
        rr_run "$impl" 16 rr16
    fi
    # pgbench
    if [[ -n $PG_PID ]]; then pgbench_run "$impl"; fi
    return 0
}

# CPU microseconds of the daemons per transaction: cpu_per_txn TICKS0 TICKS1 TRANSACTIONS
cpu_per_txn() {
    awk -v d=$(($2 - $1)) -v hz="$CLK_TCK" -v n="$3" 'BEGIN {if (n > 0) printf "%.2f", (d / hz) * 1e6 / n}'
}

rr_run() { # rr_run IMPL FLOWS KEY: rr_probe client from A, FLOWS connections for RR_SECS
    local impl=$1 flows=$2 key=$3 out t0="" t1 n
    if ((${#DAEMONS[@]})); then t0=$(cpu_ticks "${DAEMONS[@]}") || t0=""; fi
    if out=$(timeout $((RR_SECS + 30)) ip netns exec "$NSA" "$RR_BIN" client --connect "$TARGET:$RR_PORT" \
        --flows "$flows" --secs "$RR_SECS" --size "$RR_SIZE" 2>"$LABDIR/rr.err"); then
        n=$(jq -r .transactions <<<"$out")
        record "$impl" "${key}_tps" "$(jq -r .tps <<<"$out")"
        record "$impl" "${key}_p50_us" "$(jq -r .p50_us <<<"$out")"
        record "$impl" "${key}_p99_us" "$(jq -r .p99_us <<<"$out")"
        record "$impl" "${key}_mean_us" "$(jq -r .mean_us <<<"$out")"
        if [[ -n $t0 ]] && t1=$(cpu_ticks "${DAEMONS[@]}"); then
            record "$impl" "cpu_us_per_$key" "$(cpu_per_txn "$t0" "$t1" "$n")"
        fi
        log "  $impl: $key $(jq -r '"\(.tps | round) txn/s, p50 \(.p50_us) us, p99 \(.p99_us) us"' <<<"$out")"
    else
        log "  $impl: $key failed: $(tail -n1 "$LABDIR/rr.err")"
    fi
}

pgbench_run() { # pgbench_run IMPL: pgbench from A against the server in B
    local impl=$1 out t0="" t1 n r
    if ((${#DAEMONS[@]})); then t0=$(cpu_ticks "${DAEMONS[@]}") || t0=""; fi
    if out=$(timeout $((PGBENCH_SECS + 60)) ip netns exec "$NSA" "$PG_BIN/pgbench" -h "$TARGET" -p "$PG_PORT" \
        -U bench -n -c 4 -j 2 -T "$PGBENCH_SECS" postgres 2>"$LABDIR/pgbench.err"); then
        # "number of transactions actually processed: 12345", "latency average = 1.234 ms",
        # "tps = 1234.567890 (without initial connection time)"
        n=$(awk -F': ' '/^number of transactions actually processed/ {print $2; exit}' <<<"$out" | grep -oE '^[0-9]+')
        r=$(awk '/^tps = / {print $3; exit}' <<<"$out")
        [[ -n $n && -n $r ]] || {
            log "  $impl: pgbench output not understood: $(tail -n1 <<<"$out")"
            return 0
        }
        record "$impl" pgbench_tps "$r"
        record "$impl" pgbench_txns "$n"
        r=$(awk '/^latency average = / {print $4; exit}' <<<"$out")
        if [[ -n $r ]]; then record "$impl" pgbench_lat_ms "$r"; fi
        if [[ -n $t0 ]] && t1=$(cpu_ticks "${DAEMONS[@]}"); then
            record "$impl" cpu_us_per_pgtxn "$(cpu_per_txn "$t0" "$t1" "$n")"
        fi
        log "  $impl: pgbench $(awk '/^tps = / {printf "%.0f", $3}' <<<"$out") tps, latency $r ms"
    else
        log "  $impl: pgbench failed: $(grep -v '^$' "$LABDIR/pgbench.err" | tail -n1)"
    fi
}

run_one() { # run_one IMPL
    local impl=$1 t0=$SECONDS
    NA_REASON=""
    if ! available "$impl"; then
        record "$impl" na "$NA_REASON"
        log "$impl: n/a ($NA_REASON)"
        return 0
    fi
    lab_up
    # iperf3 server in B
    start_in "$NSB" "$LABDIR/iperf3-server.log" iperf3 -s
    if ! wait_for 50 0.1 bash -c "ip netns exec '$NSB' ss -ltnH 'sport = :5201' | grep -q ."; then
        record "$impl" na "iperf3 server did not start"
        lab_down
        return 0
    fi
    # rr_probe and PostgreSQL servers in B (not in RTT_ONLY mode)
    RR_READY=0 PG_PID=""
    if ((!RTT_ONLY)) && [[ -n $RR_BIN ]]; then
        start_in "$NSB" "$LABDIR/rr-server.log" "$RR_BIN" server --listen "0.0.0.0:$RR_PORT" \
            --size "$RR_SIZE" --lifetime-secs 3600
        if wait_for 50 0.1 bash -c "ip netns exec '$NSB' ss -ltnH 'sport = :$RR_PORT' | grep -q ."; then
            RR_READY=1
        else
            log "  $impl: rr_probe server did not start: $(tail -n1 "$LABDIR/rr-server.log")"
        fi
    fi
    if ((!RTT_ONLY)) && [[ -n $PG_BIN ]] && ! pg_start; then
        log "  $impl: postgres did not start: $(tail -n1 "$LABDIR/postgres.log")"
        pg_stop
    fi
    log "$impl: setting up"
    if "setup_$impl"; then
        log "$impl: up, measuring"
        measure "$impl"
    else
        record "$impl" na "$NA_REASON"
        log "$impl: n/a ($NA_REASON)"
    fi
    lab_down
    log "$impl: done in $((SECONDS - t0)) s"
}

# --- main --------------------------------------------------------------------------------

if [[ -x $SCRIPT_DIR/netns-clean.sh ]]; then "$SCRIPT_DIR/netns-clean.sh" --quiet || true; fi

if [[ -n $ONLY ]]; then
    read -r -a IMPLS <<<"$ONLY"
    for i in "${IMPLS[@]}"; do
        [[ " ${ALL_IMPLS[*]} " == *" $i "* ]] || die "unknown implementation '$i' (known: ${ALL_IMPLS[*]})"
    done
else
    IMPLS=()
    for i in "${ALL_IMPLS[@]}"; do
        [[ $i != meshd-before || -n $MESHD_BEFORE ]] && IMPLS+=("$i")
    done
fi

find_bins
if [[ " ${IMPLS[*]} " == *" meshd"* ]]; then build_meshd; fi
if ((!RTT_ONLY)); then
    build_rr_probe
    if [[ -n $RR_NA ]]; then log "rr1/rr16: skipped ($RR_NA)"; fi
    pg_prepare
    if [[ -n $PG_NA ]]; then log "pgbench: skipped ($PG_NA)"; fi
fi

log "implementations: ${IMPLS[*]}; DURATION=$DURATION s, ROUNDS=$ROUNDS"
START=$SECONDS
n=${#IMPLS[@]}
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    log "round $ROUND/$ROUNDS"
    for ((k = 0; k < n; k++)); do
        run_one "${IMPLS[$(((k + ROUND - 1) % n))]}"
    done
done
ELAPSED=$((SECONDS - START))

# --- summary: medians over rounds, derived figures, ratios ---------------------------------

mkdir -p "$(dirname "$RESULTS")"
impls_json=$(printf '%s\n' "${IMPLS[@]}" | jq -R . | jq -s .)
jq -Rn \
    --argjson impls "$impls_json" \
    --argjson duration "$DURATION" --argjson rounds "$ROUNDS" --argjson elapsed "$ELAPSED" \
    --arg host "$(uname -n)" --arg kernel "$(uname -r)" --arg cpus "$(nproc)" \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg udp_len "$UDP_LEN" --arg mtu "$MTU" --arg ping_count "$PING_COUNT" \
    --arg rr_secs "$RR_SECS" --arg rr_size "$RR_SIZE" --arg pgbench_secs "$PGBENCH_SECS" '
    def median: sort | if length == 0 then null
        elif length % 2 == 1 then .[length / 2 | floor]
        else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def r3: if . == null then null else (. * 1000 | round) / 1000 end;
    # direction: 1 = higher is better, -1 = lower is better
    def metrics: {tcp1_gbps: 1, tcp4_gbps: 1, udp_mbps: 1, udp_loss_pct: -1, rtt_ms: -1,
                  rtt_added_ms: -1, rtt_p50_ms: -1, rtt_p50_added_ms: -1, rtt_min_ms: -1, rtt_min_added_ms: -1, cpu_s_per_gbit: -1, rss_mib: -1,
                  rr1_tps: 1, rr1_p50_us: -1, rr1_p99_us: -1, cpu_us_per_rr1: -1, rr16_tps: 1, rr16_p99_us: -1,
                  cpu_us_per_rr16: -1, pgbench_tps: 1, pgbench_lat_ms: -1, cpu_us_per_pgtxn: -1};
    [inputs | split("\t") | {round: (.[0] | tonumber), impl: .[1], key: .[2],
        value: (.[3] as $v | try ($v | tonumber) catch $v)}] as $raw
    | ($raw | map(select(.key == "na")) | group_by(.impl)
        | map({key: .[0].impl, value: (map(.value) | unique | join("; "))}) | from_entries) as $na
    | (reduce $impls[] as $i ({}; .[$i] = (
        [$raw[] | select(.impl == $i and .key != "na" and (.value | type) == "number")]
        | group_by(.key) | map({key: .[0].key, value: (map(.value) | median)}) | from_entries)))
    | (.veth.rtt_ms // null) as $veth_rtt
    | with_entries(if $veth_rtt != null and .value.rtt_ms != null
        then .value.rtt_added_ms = (.value.rtt_ms - $veth_rtt) else . end)
    | (.veth.rtt_p50_ms // null) as $veth_p50
    | with_entries(if $veth_p50 != null and .value.rtt_p50_ms != null
        then .value.rtt_p50_added_ms = (.value.rtt_p50_ms - $veth_p50) else . end)
    | (.veth.rtt_min_ms // null) as $veth_min
    | with_entries(if $veth_min != null and .value.rtt_min_ms != null
        then .value.rtt_min_added_ms = (.value.rtt_min_ms - $veth_min) else . end)
    | . as $sum
    | (reduce (metrics | keys[]) as $m ({}; .[$m] = (
        if ($sum.meshd[$m] // null) != null then {ref: "meshd", value: $sum.meshd[$m]}
        else ([$impls[] | select(. != "veth" and (startswith("meshd") | not) and (endswith("-1cpu") | not))
               | {ref: ., value: $sum[.][$m]}
               | select(.value != null)]
              | if length == 0 then null
                elif (metrics | .[$m]) == 1 then max_by(.value) else min_by(.value) end)
        end))) as $ref
    | {
        meta: {date: $date, host: $host, kernel: $kernel, cpus: ($cpus | tonumber),
               duration_s: $duration, rounds: $rounds, elapsed_s: $elapsed,
               mtu: ($mtu | tonumber), udp_datagram_bytes: ($udp_len | tonumber),
               iperf3: "tcp1: -t D; tcp4: -t D -P 4; udp: -t D -u -b 0 -l \($udp_len)",
               ping: "-c \($ping_count) -i 0.01 (avg, median and min)", cpu: "utime+stime of both daemons during tcp1, per Gbit received",
               rss: "max VmRSS of the two daemons after 2 s idle",
               rr: "rr_probe client --flows 1 and 16 --secs \($rr_secs) --size \($rr_size) (one request outstanding per connection, TCP_NODELAY); cpu per transaction",
               pgbench: "pgbench -n -c 4 -j 2 -T \($pgbench_secs), scale 1, fsync/synchronous_commit/full_page_writes off; cpu per transaction",
               pinned: "-1cpu: both tunnel daemons under taskset -c 0"},
        implementations: $impls,
        not_available: $na,
        summary: ($sum | map_values(map_values(r3))),
        reference: $ref,
        ratios: ($sum | with_entries(.key as $i | .value = (reduce (metrics | keys[]) as $m ({};
            if ($ref[$m] != null) and ($sum[$i][$m] // null) != null and $ref[$m].value != 0
            then .[$m] = ($sum[$i][$m] / $ref[$m].value | (. * 100 | round) / 100) else . end)))),
        raw: $raw
      }' <"$RAW" >"$RESULTS"


report "$RESULTS"
