#!/usr/bin/env bash
# meshd demo: two hosts in network namespaces, joined by a veth "underlay" (198.18.0.0/24),
# talk over an encrypted meshd tunnel (overlay 100.64.0.0/24). Prints each side's status, a
# ping and a TCP transfer, then removes everything it created. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo.sh needs root: sudo scripts/demo.sh" >&2; exit 1; }
command -v ip >/dev/null || { echo "needs iproute2 (apt-get install -y iproute2)" >&2; exit 1; }

echo "== building meshd (release)"
cargo build --release -q -p meshd
MESHD=$PWD/target/release/meshd

P="mdemo-$$"
A="$P-a"; B="$P-b"
WORK=$(mktemp -d /tmp/meshd-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "== underlay: namespaces $A and $B joined by a veth pair"
ip netns add "$A"; ip netns add "$B"
ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
ip -n "$A" addr add 198.18.0.1/24 dev eth0; ip -n "$A" link set eth0 up; ip -n "$A" link set lo up
ip -n "$B" addr add 198.18.0.2/24 dev eth0; ip -n "$B" link set eth0 up; ip -n "$B" link set lo up

for h in a b; do
    (umask 077; "$MESHD" genkey > "$WORK/$h.key")
    "$MESHD" pubkey < "$WORK/$h.key" > "$WORK/$h.pub"
done
conf() { # self-letter self-index peer-letter peer-index
    cat > "$WORK/$1.toml" <<TOML
[interface]
name = "mesh0"
private_key_file = "$WORK/$1.key"
listen_port = 51820
address = "100.64.0.$2/24"

[[peer]]
name = "host-$3"
public_key = "$(cat "$WORK/$3.pub")"
endpoint = "198.18.0.$4:51820"
allowed_ips = ["100.64.0.$4/32"]
persistent_keepalive = 25
TOML
}
conf a 1 b 2; conf b 2 a 1

echo "== starting meshd on both hosts"
ip netns exec "$A" "$MESHD" up --config "$WORK/a.toml" --state-dir "$WORK/state-a" 2>"$WORK/a.log" & PIDS+=($!)
ip netns exec "$B" "$MESHD" up --config "$WORK/b.toml" --state-dir "$WORK/state-b" 2>"$WORK/b.log" & PIDS+=($!)
for _ in $(seq 50); do
    ip netns exec "$A" ping -c1 -W1 100.64.0.2 >/dev/null 2>&1 && break
    sleep 0.2
done

echo "== ping through the tunnel"
ip netns exec "$A" ping -c 3 -i 0.2 100.64.0.2

echo "== 64 MiB TCP transfer host-a -> host-b through the tunnel"
if command -v iperf3 >/dev/null; then
    ip netns exec "$B" iperf3 -s -1 -D -p 5201 >/dev/null
    sleep 0.3
    ip netns exec "$A" iperf3 -c 100.64.0.2 -p 5201 -n 64M | tail -4
else
    ip netns exec "$B" sh -c 'timeout 20 cat < /dev/tcp/0.0.0.0/5201' 2>/dev/null || true
    echo "(install iperf3 for a throughput figure)"
fi

echo "== meshd status on host-a"
ip netns exec "$A" "$MESHD" status
echo
echo "== meshd status on host-b"
ip netns exec "$B" "$MESHD" status
echo
echo "demo done; cleaning up"
