#!/usr/bin/env bash
# Runs meshd's whole test suite: unit, property and end-to-end tests. End-to-end tests build
# hosts in network namespaces, so this needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
#
# On a Debian/Ubuntu machine it installs, with apt-get, the commands the tests call and that
# are missing (see scripts/need.sh; MESHD_NO_INSTALL=1 only checks): ip (iproute2), nft
# (nftables), tcpdump, wireguard-go, wg (wireguard-tools), socat, ping (iputils-ping),
# sysctl (procps), chromium + chromedriver (chromium-driver) for the /ui browser test,
# sqlite3 (the signed-policy test edits the coordinator database by hand), and initdb +
# postgres (postgresql: the store suite and the coordinator run on a throwaway server too).
# Arguments go to `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the end-to-end tests need root (they create network namespaces); run it as root (e.g. sudo scripts/test.sh)" >&2
    exit 1
fi
. scripts/need.sh
need_tools scripts/test.sh ip:iproute2 nft:nftables tcpdump:tcpdump wireguard-go:wireguard-go \
    wg:wireguard-tools socat:socat ping:iputils-ping sysctl:procps \
    chromium:chromium chromedriver:chromium-driver sqlite3:sqlite3 \
    initdb:postgresql postgres:postgresql
if ! command -v cargo >/dev/null; then
    echo "scripts/test.sh: cargo is not on root's PATH ($PATH): install Rust for root (https://rustup.rs), or use yours: sudo env \"PATH=\$PATH\" \"RUSTUP_HOME=\$HOME/.rustup\" \"CARGO_HOME=\$HOME/.cargo\" scripts/test.sh" >&2
    exit 1
fi
# Namespaces left by a killed earlier run are removed by the lab itself at start.
# Under root no test may skip itself (meshd_lab::require_root! prints "SKIP …: needs root").
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace "$@" 2>&1 | tee "$log" || rc=$?
if grep -q 'SKIP .*needs root' "$log"; then
    echo "scripts/test.sh: tests skipped themselves although this runs as root:" >&2
    grep -o 'SKIP [^;]*' "$log" >&2
    exit 1
fi
# The churn soak, short (issue 18: scripts/soak.sh runs the 10-minute one), on the example
# `cargo test` just built. Only with the whole suite (no arguments).
if [ "$rc" -eq 0 ] && [ "$#" -eq 0 ]; then
    echo "== churn soak: 45 s, two replicas on PostgreSQL, each SIGKILLed once"
    MESHD_SOAK_BIN=${CARGO_TARGET_DIR:-target}/debug/examples/soak timeout 600 scripts/soak.sh 45 30 || rc=$?
elif [ "$#" -ne 0 ]; then
    echo "scripts/test.sh: arguments given, so the churn soak was not run (scripts/soak.sh runs it)"
fi
exit "$rc"
