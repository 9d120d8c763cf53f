#!/usr/bin/env bash
# Runs meshd's whole test suite: unit, property and end-to-end tests. End-to-end tests build
# hosts in network namespaces, so this needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the end-to-end tests need root (they create network namespaces); run: sudo scripts/test.sh" >&2
    exit 1
fi
missing=()
for tool in ip tcpdump wireguard-go wg; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "scripts/test.sh: missing ${missing[*]}: apt-get install -y iproute2 tcpdump wireguard-go wireguard-tools" >&2
    exit 1
fi
# Namespaces left by a killed earlier run are removed by the lab itself at start.
exec cargo test --workspace "$@"
