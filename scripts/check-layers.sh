#!/usr/bin/env bash
# Layers that stay layers: the pure crates (protocol, policy, conntrack, coordinator state)
# (and the time vocabulary) must never depend on an async runtime, a database, QUIC or a socket/TUN/netlink crate.
# Fails naming the crate and the dependency. Run by .ci/run; needs only cargo (no build).
set -euo pipefail
cd "$(dirname "$0")/.."
pure=(meshd-tunnel meshd-policy meshd-firewall meshd-control meshd-time)
forbidden='^(tokio|async-std|mio|rusqlite|tokio-postgres|sqlx|quinn|quinn-proto|quinn-udp|socket2|tun-rs|rtnetlink|netlink-sys|axum|hyper)$'
bad=0
for crate in "${pure[@]}"; do
    deps=$(cargo tree -p "$crate" -e normal --prefix none --offline 2>/dev/null || cargo tree -p "$crate" -e normal --prefix none)
    hits=$(printf '%s\n' "$deps" | awk '{print $1}' | sort -u | grep -E "$forbidden" || true)
    if [ -n "$hits" ]; then
        echo "check-layers: $crate must stay free of IO crates but depends on: $(echo $hits)" >&2
        bad=1
    fi
done
# The time vocabulary (meshd-time) is std only: no dependency at all.
deps=$(cargo tree -p meshd-time -e normal --prefix none --offline 2>/dev/null || cargo tree -p meshd-time -e normal --prefix none)
time_deps=$(printf '%s\n' "$deps" | awk '{print $1}' | sort -u | grep -v '^meshd-time$' || true)
if [ -n "$time_deps" ]; then
    echo "check-layers: meshd-time must depend on std only but depends on: $(echo $time_deps)" >&2
    bad=1
fi
# The agent side never links the coordinator's server: meshd-agent and meshd-channel do not
# depend on meshd-coordinator (nor on a database or the admin HTTP stack), and in the meshd
# package only the CLI (main.rs, for the `meshd coordinator` subcommand) names it; the host
# library does not.
for crate in meshd-agent meshd-channel; do
    deps=$(cargo tree -p "$crate" -e normal --prefix none --offline 2>/dev/null || cargo tree -p "$crate" -e normal --prefix none)
    hits=$(printf '%s\n' "$deps" | awk '{print $1}' | sort -u | grep -E '^(meshd-coordinator|meshd-store|rusqlite|axum|hyper)$' || true)
    if [ -n "$hits" ]; then
        echo "check-layers: $crate is the agent's side and must not depend on: $(echo $hits)" >&2
        bad=1
    fi
done
if grep -rln 'meshd_coordinator' meshd/src --include='*.rs' | grep -v '^meshd/src/main\.rs$'; then
    echo "check-layers: the meshd host library names meshd_coordinator (only main.rs may, for the subcommand)" >&2
    bad=1
fi
[ "$bad" -eq 0 ] && echo "check-layers: ${pure[*]} depend on no runtime, database, QUIC or socket crate; the agent side does not link the coordinator"
exit "$bad"
