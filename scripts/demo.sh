#!/usr/bin/env bash
# meshd demo: a coordinator and three labelled hosts, each in its own network namespace on a
# bridged underlay (198.18.0.0/24). Hosts enrol with one-time join tokens, receive overlay
# addresses (100.64.0.0/10), and talk over encrypted tunnels only as a label policy allows
# (default deny). Shows `meshctl hosts list`, pings before and after a policy is applied, a
# TCP transfer, a denied connection in `meshctl blocks` and `meshd status`, then removes
# everything it created. Needs root.
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
        ip netns exec "$P-$h" "$MESHD" status >/dev/null 2>&1 && break
        sleep 0.1
    done
done
sleep 0.5

echo
echo "== meshctl hosts list"
ctl hosts list
echo
overlay() { ip netns exec "$P-$1" "$MESHD" status | awk '/addresses:/ { split($2, a, "/"); print a[1]; exit }'; }
declare -A OV
for h in "${HOSTS[@]}"; do OV[$h]=$(overlay "$h"); done

pings() {
    for a in "${HOSTS[@]}"; do
        for b in "${HOSTS[@]}"; do
            [ "$a" = "$b" ] && continue
            if ip netns exec "$P-$a" ping -c 1 -W 1 "${OV[$b]}" >/dev/null 2>&1; then
                echo "   $a -> $b (${OV[$b]}): allowed"
            else
                echo "   $a -> $b (${OV[$b]}): denied"
            fi
        done
    done
}

echo "== no policy yet: default deny, every host pair is denied"
ctl status | grep -i policy || true
pings

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
echo "== pings under the policy (replies of allowed flows pass; web never learns db1's key)"
pings

if command -v iperf3 >/dev/null; then
    echo
    echo "== 64 MiB TCP transfer app1 -> db1 on the allowed port"
    ip netns exec "$P-db1" iperf3 -s -1 -D -p 5201 >/dev/null
    sleep 0.3
    ip netns exec "$P-app1" iperf3 -c "${OV[db1]}" -p 5201 -n 64M | tail -4
fi

echo
echo "== app1 -> db1 on a port the policy does not grant (tcp/22): denied and logged"
ip netns exec "$P-app1" timeout 2 bash -c "exec 3<>/dev/tcp/${OV[db1]}/22" 2>/dev/null && echo "   connected?!" || echo "   refused by policy"
sleep 1.5
ctl policy explain --from app1 --to db1 --port tcp/22 || true
echo
echo "== meshctl blocks"
ctl blocks || true

echo
echo "== meshd status on app1"
ip netns exec "$P-app1" "$MESHD" status
echo
echo "demo done; cleaning up"
