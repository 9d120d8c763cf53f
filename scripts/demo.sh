#!/usr/bin/env bash
# meshd demo: a coordinator and three labelled hosts, each in its own network namespace on a
# bridged underlay (198.18.0.0/24). Hosts enrol with one-time join tokens, receive overlay
# addresses (100.64.0.0/10) and each other's keys, and talk over encrypted tunnels. Shows
# `meshctl hosts list`, pings between every pair, a TCP transfer and `meshd status`, then
# removes everything it created. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo.sh needs root: sudo scripts/demo.sh" >&2; exit 1; }
command -v ip >/dev/null || { echo "needs iproute2 (apt-get install -y iproute2)" >&2; exit 1; }

echo "== building meshd and meshctl (release)"
cargo build --release -q -p meshd -p meshctl
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl

P="mdemo-$$"
SW="$P-sw"; C="$P-coord"
HOSTS=(web1 app1 db1)
LABELS=("app=web,env=prod" "app=app1,env=prod" "app=db1,env=prod")
WORK=$(mktemp -d /tmp/meshd-demo.XXXXXX)
PIDS=()
NSS=("$SW" "$C")
for h in "${HOSTS[@]}"; do NSS+=("$P-$h"); done

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${NSS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

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
    i=$((i + 1))
done

echo "== coordinator on 198.18.0.1:7443 (state in $WORK/coord, SQLite)"
ip netns exec "$C" "$MESHD" coordinator --listen 198.18.0.1:7443 --state-dir "$WORK/coord" 2>"$WORK/coord.log" & PIDS+=($!)
ctl() { ip netns exec "$C" "$MESHCTL" --state-dir "$WORK/coord" "$@"; }
for _ in $(seq 100); do [ -s "$WORK/coord/admin.token" ] && ctl status >/dev/null 2>&1 && break; sleep 0.1; done

echo "== enrolling hosts with one-time join tokens"
for idx in "${!HOSTS[@]}"; do
    h=${HOSTS[$idx]}
    token=$(ctl token create --labels "${LABELS[$idx]}" --ttl 10m --uses 1)
    echo "   $h: ${LABELS[$idx]}"
    ip netns exec "$P-$h" "$MESHD" up --join "$token" --name "$h" --state-dir "$WORK/$h" 2>"$WORK/$h.log" & PIDS+=($!)
done
for h in "${HOSTS[@]}"; do
    for _ in $(seq 100); do
        n=$(ip netns exec "$P-$h" "$MESHD" status --json 2>/dev/null | grep -c '"name"' || true)
        [ "${n:-0}" -ge 2 ] && break
        sleep 0.1
    done
done

echo
echo "== meshctl hosts list"
ctl hosts list
echo
overlay() { ip netns exec "$P-$1" "$MESHD" status | awk '/addresses:/ { split($2, a, "/"); print a[1]; exit }'; }
declare -A OV
for h in "${HOSTS[@]}"; do OV[$h]=$(overlay "$h"); done

echo "== ping between every pair of hosts (through the tunnels)"
for a in "${HOSTS[@]}"; do
    for b in "${HOSTS[@]}"; do
        [ "$a" = "$b" ] && continue
        if ip netns exec "$P-$a" ping -c 2 -i 0.2 -W 2 "${OV[$b]}" >/dev/null; then
            echo "   $a -> $b (${OV[$b]}): ok"
        else
            echo "   $a -> $b (${OV[$b]}): FAILED"
        fi
    done
done

if command -v iperf3 >/dev/null; then
    echo
    echo "== 64 MiB TCP transfer app1 -> db1"
    ip netns exec "$P-db1" iperf3 -s -1 -D -p 5201 >/dev/null
    sleep 0.3
    ip netns exec "$P-app1" iperf3 -c "${OV[db1]}" -p 5201 -n 64M | tail -4
fi

echo
echo "== meshd status on app1"
ip netns exec "$P-app1" "$MESHD" status
echo
echo "demo done; cleaning up"
