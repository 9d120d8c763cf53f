#!/usr/bin/env bash
# meshd demo: a coordinator and three labelled hosts (web1, app1, db1), each in its own network
# namespace on a bridged underlay (198.18.0.0/24). Hosts enrol with one-time join tokens,
# receive overlay addresses (100.64.0.0/10), and talk over encrypted tunnels only as a label
# policy allows (default deny). Shows `meshctl hosts list`, pings between every pair before and
# after a policy is applied, a TCP transfer on an allowed port, a connection to a port the policy
# does not grant, `meshctl blocks` and `meshd status`, then removes everything it created (also
# when interrupted).
#
# Every probe's outcome is classified: "allowed" (a reply, a completed transfer), "denied" (no
# reply before the deadline, a connection that times out: the tunnel dropped it) or "could not
# test" (the probe itself failed: a missing tool, an error other than a timeout, a refusal that
# shows the packet reached the host). The end is a summary, one line per check:
#   CHECK <phase> <from>-><to> <port> expect=<allowed|denied> seen=<allowed|denied|untested> <ok|MISMATCH|UNTESTED>
#   RESULT ok: N checks as the policy says             (exit 0)
#   RESULT FAILED: ...                                  (exit 1)
#
# Needs root. Installs what it calls and is missing (ip: iproute2, ping: iputils-ping, iperf3)
# with apt-get, or stops naming the package (scripts/need.sh). Environment:
#   DEMO_PROFILE=release     cargo profile meshd and meshctl are built with (dev: faster build)
#   MESHD_BIN_DIR=DIR        use DIR/meshd and DIR/meshctl as they are, no build (CI: target/debug)
#   MESHD_NO_INSTALL=1       never run apt-get; stop naming what is missing
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: needs root (network namespaces, TUN devices); run it as root (e.g. sudo scripts/demo.sh)" >&2
    exit 1
fi
. scripts/need.sh
need_tools scripts/demo.sh ip:iproute2 ping:iputils-ping iperf3:iperf3

if [ -n "${MESHD_BIN_DIR:-}" ]; then
    MESHD=$(cd "$MESHD_BIN_DIR" && pwd)/meshd
    MESHCTL=$(dirname "$MESHD")/meshctl
    echo "== using $MESHD and $MESHCTL (MESHD_BIN_DIR; not building)"
else
    PROFILE=${DEMO_PROFILE:-release}
    if ! command -v cargo >/dev/null; then
        echo "scripts/demo.sh: cargo is not on root's PATH ($PATH): install Rust for root (https://rustup.rs), or build as yourself and pass the binaries: cargo build --release -p meshd -p meshctl && sudo MESHD_BIN_DIR=target/release scripts/demo.sh" >&2
        exit 1
    fi
    echo "== building meshd and meshctl (cargo profile $PROFILE; the first build takes minutes)"
    cargo build --profile "$PROFILE" -q -p meshd -p meshctl
    dir=$PROFILE
    [ "$PROFILE" = dev ] && dir=debug
    MESHD=$PWD/target/$dir/meshd
    MESHCTL=$PWD/target/$dir/meshctl
fi
for b in "$MESHD" "$MESHCTL"; do
    [ -x "$b" ] || { echo "scripts/demo.sh: $b: not found or not executable" >&2; exit 1; }
done

# Namespaces of an earlier demo that was killed (its pid is gone) are removed first.
scripts/netns-clean.sh --quiet --kill --only=mdemo || true

P="mdemo-$$"
SW="$P-sw"; C="$P-coord"
HOSTS=(web1 app1 db1)
LABELS=("app=web,env=prod" "app=app1,env=prod" "app=db1,env=prod")
WORK=$(mktemp -d /tmp/meshd-demo.XXXXXX)
PIDS=()    # processes to stop at the end; the first ones are the daemons:
DAEMONS=() # DAEMONS[i] names PIDS[i]
declare -A UL OV # underlay and overlay address of each host
NSS=("$SW" "$C")
for h in "${HOSTS[@]}"; do NSS+=("$P-$h"); done
PROBE_WAIT=3 # seconds a probe waits for an answer
SHOW_LOGS=1  # on failure, show the end of each daemon's log
export NO_COLOR=1 # plain logs in $WORK/*.log

stop_pid() { # SIGTERM, then SIGKILL after 5 s
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid ns f
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ "$SHOW_LOGS" = 1 ] && [ -d "$WORK" ]; then
        for f in "$WORK"/*.log; do
            [ -s "$f" ] || continue
            echo "-- last lines of $(basename "$f"):" >&2
            tail -n 5 "$f" | sed 's/^/   /' >&2
        done
    fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    # Anything else still running in our namespaces (a probe, iperf3) was started by us.
    for ns in "${NSS[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do stop_pid "$pid"; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'SHOW_LOGS=0; echo; echo "demo interrupted; cleaning up" >&2; exit 130' INT
trap 'SHOW_LOGS=0; echo "demo terminated; cleaning up" >&2; exit 143' TERM
trap 'echo "scripts/demo.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

die() { echo "scripts/demo.sh: $*" >&2; exit 1; }

echo "== underlay: a bridge and four namespaces"
ip netns add "$SW"
ip -n "$SW" link add br0 type bridge; ip -n "$SW" link set br0 up
i=1
for ns in "$C" "${NSS[@]:2}"; do
    ip netns add "$ns"
    ip -n "$SW" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "$SW" link set "p$i" master br0 up
    ip -n "$ns" addr add "198.18.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up
    [ "$ns" = "$C" ] || UL[${ns#"$P-"}]=198.18.0.$i
    i=$((i + 1))
done

echo "== coordinator on 198.18.0.1:7443 (state in $WORK/coord, SQLite)"
ip netns exec "$C" "$MESHD" coordinator --listen 198.18.0.1:7443 --state-dir "$WORK/coord" 2>"$WORK/coord.log" & PIDS+=($!)
DAEMONS+=("the coordinator")
ctl() { ip netns exec "$C" "$MESHCTL" --state-dir "$WORK/coord" "$@"; }
up=0
for _ in $(seq 100); do
    if [ -s "$WORK/coord/admin.token" ] && ctl status >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
done
[ "$up" = 1 ] || die "the coordinator did not start within 10 s"

echo "== enrolling hosts with one-time join tokens"
for idx in "${!HOSTS[@]}"; do
    h=${HOSTS[$idx]}
    token=$(ctl token create --labels "${LABELS[$idx]}" --ttl 10m --uses 1)
    echo "   $h: ${LABELS[$idx]}"
    ip netns exec "$P-$h" "$MESHD" up --join "$token" --name "$h" --state-dir "$WORK/$h" --uapi-dir "$WORK/$h-uapi" 2>"$WORK/$h.log" & PIDS+=($!)
    DAEMONS+=("meshd on $h")
done
for h in "${HOSTS[@]}"; do
    up=0
    for _ in $(seq 100); do
        if ip netns exec "$P-$h" "$MESHD" status >/dev/null 2>&1; then up=1; break; fi
        sleep 0.1
    done
    [ "$up" = 1 ] || die "meshd on $h did not come up within 10 s"
done
sleep 0.5

echo
echo "== meshctl hosts list"
ctl hosts list
echo
overlay() { ip netns exec "$P-$1" "$MESHD" status | awk '/addresses:/ && !done { split($2, a, "/"); print a[1]; done = 1 }'; }
for h in "${HOSTS[@]}"; do
    OV[$h]=$(overlay "$h")
    [ -n "${OV[$h]}" ] || die "meshd on $h shows no overlay address"
done

# --- probes and checks ------------------------------------------------------------------
CHECKS=()
# check PHASE FROM TO PORT EXPECT SEEN DETAIL [OV|UL]: prints the outcome and records it.
check() {
    local phase=$1 from=$2 to=$3 port=$4 expect=$5 seen=$6 detail=$7 word verdict note addr
    if [ "${8:-OV}" = UL ]; then addr=${UL[$to]}; else addr=${OV[$to]}; fi
    case $seen in
        allowed) word=allowed ;;
        denied) word="denied by policy" ;;
        *) word="could not test" ;;
    esac
    [ "${8:-OV}" = UL ] && [ "$seen" = denied ] && word="no reply"
    if [ "$seen" = untested ]; then verdict=UNTESTED
    elif [ "$seen" = "$expect" ]; then verdict=ok
    else verdict=MISMATCH; fi
    note=""
    [ "$verdict" = ok ] || note="  <-- expected: $expect"
    printf '   %s -> %s (%s) %s: %s (%s)%s\n' "$from" "$to" "$addr" "$port" "$word" "$detail" "$note"
    CHECKS+=("CHECK $phase $from->$to $port expect=$expect seen=$seen $verdict")
}

# probe_icmp FROM TO [OV|UL]: prints "SEEN DETAIL". A reply is "allowed"; no reply before the
# deadline (ping's exit 1) is "denied"; any other failure of ping is "untested".
probe_icmp() {
    local out rc=0 dst
    if [ "${3:-OV}" = UL ]; then dst=${UL[$2]}; else dst=${OV[$2]}; fi
    command -v ping >/dev/null || { echo "untested ping is not installed"; return; }
    out=$(ip netns exec "$P-$1" ping -n -c 1 -i 0.2 -w "$PROBE_WAIT" "$dst" 2>&1) || rc=$?
    case $rc in
        0) echo "allowed echo reply" ;;
        1)
            if grep -qiE 'unreachable|prohibited|filtered' <<<"$out"; then
                echo "denied $(grep -m1 -iE 'unreachable|prohibited|filtered' <<<"$out" | sed 's/.*: //')"
            else
                echo "denied no reply within ${PROBE_WAIT} s"
            fi ;;
        *) echo "untested ping failed (exit $rc): $(tail -n 1 <<<"$out")" ;;
    esac
}

# probe_tcp FROM TO PORT: connects from FROM to TO's overlay address. Connected is "allowed"; a
# timeout (no answer at all: dropped) is "denied"; a refusal means the SYN reached TO (so the
# tunnel did not drop it) and anything else is a failed probe: both "untested".
probe_tcp() {
    local out rc=0
    out=$(ip netns exec "$P-$1" timeout "$PROBE_WAIT" bash -c "exec 3<>/dev/tcp/${OV[$2]}/$3" 2>&1) || rc=$?
    case $rc in
        0) echo "allowed connected" ;;
        124) echo "denied no answer within ${PROBE_WAIT} s" ;;
        *)
            if grep -q 'Connection refused' <<<"$out"; then
                echo "untested refused: the SYN reached $2, nothing listens on $3"
            else
                echo "untested connect failed (exit $rc): $(tail -n 1 <<<"$out" | sed 's/^.*: //')"
            fi ;;
    esac
}

# icmp_round PHASE EXPECT-FUNCTION [ADDRESSES]: pings every ordered pair at once (the overlay
# addresses, or the underlay ones with ADDRESSES=UL), then reports in order.
icmp_round() {
    local phase=$1 expect=$2 addrs=${3:-OV} a b seen detail pp=()
    for a in "${HOSTS[@]}"; do
        for b in "${HOSTS[@]}"; do
            [ "$a" = "$b" ] && continue
            probe_icmp "$a" "$b" "$addrs" >"$WORK/probe.$a.$b" & pp+=($!)
        done
    done
    wait "${pp[@]}" || true
    for a in "${HOSTS[@]}"; do
        for b in "${HOSTS[@]}"; do
            [ "$a" = "$b" ] && continue
            read -r seen detail <"$WORK/probe.$a.$b" || { seen=untested; detail="the probe wrote nothing"; }
            check "$phase" "$a" "$b" icmp "$($expect "$a" "$b")" "$seen" "$detail" "$addrs"
        done
    done
    alive
}

# Every daemon still runs (otherwise a missing reply would say nothing about the policy).
alive() {
    local i
    for i in "${!DAEMONS[@]}"; do
        kill -0 "${PIDS[$i]}" 2>/dev/null || die "${DAEMONS[$i]} exited: its probes cannot tell anything (log below)"
    done
}

allow_all() { echo allowed; }
deny_all() { echo denied; }
# What the policy below grants for ping (replies of an allowed flow pass, but are not a grant).
policy_icmp() {
    case "$1->$2" in
        web1-\>app1 | app1-\>db1) echo allowed ;;
        *) echo denied ;;
    esac
}

echo "== underlay, without meshd: every host answers ping (so the probes work, and a missing"
echo "   answer on the overlay below is meshd's doing)"
icmp_round underlay allow_all UL
for c in "${CHECKS[@]}"; do
    case $c in
        *" ok") ;;
        *) SHOW_LOGS=0; die "ping does not get through the plain underlay (above), so it cannot tell what the policy allows: not testing the overlay" ;;
    esac
done

echo
echo "== no policy yet: default deny, every host pair is denied"
ctl status | grep -i policy || true
icmp_round no-policy deny_all

cat > "$WORK/policy.yaml" <<'YAML'
rules:
  - name: web-to-app1
    from: { app: web }
    to:   { app: app1 }
    ports: [tcp/8080, icmp]
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1, env: prod }
    ports: [tcp/5201, icmp]
tests:
  - { from: { app: app1 }, to: { app: db1, env: prod }, port: tcp/5201, expect: allow }
  - { from: { app: web }, to: { app: db1 }, port: tcp/5201, expect: deny }
YAML
echo
echo "== policy: web -> app1 on tcp/8080, app1 -> db1 on tcp/5201 (plus ping)"
cat "$WORK/policy.yaml"
ctl policy check "$WORK/policy.yaml"
ctl policy apply "$WORK/policy.yaml"
sleep 1
echo
echo "== pings under the policy (replies of allowed flows pass; web1 never learns db1's key)"
icmp_round policy policy_icmp

echo
echo "== 64 MiB TCP transfer app1 -> db1 on the allowed port (iperf3, tcp/5201)"
ip netns exec "$P-db1" iperf3 -s -1 -p 5201 >"$WORK/iperf3-server.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do
    ip netns exec "$P-db1" ss -Htln 'sport = :5201' 2>/dev/null | grep -q . && break
    sleep 0.1
done
rc=0
out=$(ip netns exec "$P-app1" timeout 60 iperf3 -c "${OV[db1]}" -p 5201 -n 64M --connect-timeout $((PROBE_WAIT * 1000)) 2>&1) || rc=$?
if [ "$rc" -eq 0 ]; then
    tail -n 4 <<<"$out"
    check policy app1 db1 tcp/5201 allowed allowed "64 MiB sent and received"
elif grep -qiE 'timed out|timeout' <<<"$out"; then
    check policy app1 db1 tcp/5201 allowed denied "iperf3: $(grep -m1 -iE 'timed out|timeout' <<<"$out")"
else
    check policy app1 db1 tcp/5201 allowed untested "iperf3 failed (exit $rc): $(tail -n 1 <<<"$out")"
fi

echo
echo "== ports the policy does not grant: denied, and logged"
read -r seen detail <<<"$(probe_tcp web1 db1 5201)"
check policy web1 db1 tcp/5201 denied "$seen" "$detail"
read -r seen detail <<<"$(probe_tcp app1 db1 22)"
check policy app1 db1 tcp/22 denied "$seen" "$detail"
sleep 1.5
ctl policy explain --from app1 --to db1 --port tcp/22 || true
echo
echo "== meshctl blocks"
ctl blocks || true

echo
echo "== meshd status on app1"
ip netns exec "$P-app1" "$MESHD" status

alive

echo
echo "== summary: what the policy says against what the probes saw"
bad=0 untested=0
for c in "${CHECKS[@]}"; do
    echo "$c"
    case $c in
        *" MISMATCH") bad=$((bad + 1)) ;;
        *" UNTESTED") untested=$((untested + 1)) ;;
    esac
done
if [ "$bad" -eq 0 ] && [ "$untested" -eq 0 ]; then
    echo "RESULT ok: ${#CHECKS[@]} checks as the policy says"
    echo "demo done; cleaning up"
else
    echo "RESULT FAILED: $bad of ${#CHECKS[@]} checks differ from the policy, $untested could not be tested"
    echo "demo done (with failures); cleaning up"
    exit 1
fi
