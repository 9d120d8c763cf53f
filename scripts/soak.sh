#!/usr/bin/env bash
# The churn soak (issue 18, point 4): two coordinator replicas on a throwaway PostgreSQL
# server, simulated agents joining, leaving, moving, changing labels, policy changes, each
# replica SIGKILLed once and restarted. It ends with no lost host, no stale peer and no missed
# change on any agent, and each replica's RSS under SOAK_RSS_MB (default 160); it prints the
# figures and exits non-zero on any failure. See crates/coordinator/examples/soak.rs.
#
#   scripts/soak.sh [SECONDS] [AGENTS]      (default 600 s, 60 agents to start)
#
# Builds the example in release mode (MESHD_SOAK_BIN=PATH runs a built one instead). Needs
# PostgreSQL's server programs (Debian: postgresql; installed when missing and root). As root
# the server runs as nobody. Only loopback is used.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need.sh
need_tools scripts/soak.sh initdb:postgresql postgres:postgresql
bin=${MESHD_SOAK_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -p meshd-coordinator --example soak
    bin=${CARGO_TARGET_DIR:-target}/release/examples/soak
fi
exec "$bin" "${1:-600}" "${2:-60}"
