#!/usr/bin/env bash
# Remove stale network namespaces left behind by killed benchmark or test runs.
#
# Handles three name prefixes, all of the form <prefix><owner-pid>-...:
#   mbench-<pid>-...       scripts/bench-tunnel.sh
#   mdemo-<pid>-...        scripts/demo.sh
#   mlab-<pid>-<seq>-...   the meshd test lab (crates/lab)
# A namespace is stale when its owner pid no longer exists. Namespaces of live owners are
# never touched, so this is safe to run while other benchmarks or tests are running.
#
# Processes still running inside a stale namespace are only reported, unless --kill is given
# (or NETNS_CLEAN_KILL=1): then they get SIGTERM, and SIGKILL after 2 s if still there.
#
# --only=PREFIX (e.g. --only=mdemo) limits it to that one prefix.
#
# Usage: sudo scripts/netns-clean.sh [--kill] [--dry-run] [--quiet] [--only=PREFIX]
set -euo pipefail

KILL=${NETNS_CLEAN_KILL:-0}
DRY=0
QUIET=0
PREFIXES='mbench|mdemo|mlab'
for arg in "$@"; do
    case $arg in
    --kill) KILL=1 ;;
    --dry-run | -n) DRY=1 ;;
    --quiet | -q) QUIET=1 ;;
    --only=mbench | --only=mdemo | --only=mlab) PREFIXES=${arg#--only=} ;;
    -h | --help)
        sed -n '2,16p' "$0"
        exit 0
        ;;
    *)
        echo "netns-clean: unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

say() { ((QUIET)) || printf 'netns-clean: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "netns-clean: must run as root" >&2
    exit 1
fi

removed=0
kept=0
# `ip netns list` prints "name" or "name (id: N)"
mapfile -t names < <(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^($PREFIXES)-[0-9]+-" || true)
for ns in "${names[@]}"; do
    owner=${ns#*-}
    owner=${owner%%-*}
    if [[ -d /proc/$owner ]]; then
        kept=$((kept + 1))
        continue
    fi
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
    if ((${#pids[@]})); then
        if ((KILL)) && ((!DRY)); then
            say "$ns: stopping leftover pids ${pids[*]}"
            kill -TERM "${pids[@]}" 2>/dev/null || true
            for _ in $(seq 1 20); do
                alive=0
                for p in "${pids[@]}"; do
                    if [[ -d /proc/$p ]]; then alive=1; fi
                done
                ((alive)) || break
                sleep 0.1
            done
            for p in "${pids[@]}"; do
                if [[ -d /proc/$p ]]; then kill -KILL "$p" 2>/dev/null || true; fi
            done
        else
            say "$ns: leftover pids ${pids[*]} still inside (use --kill to stop them)"
        fi
    fi
    if ((DRY)); then
        say "would remove $ns (owner pid $owner is gone)"
    elif ip netns delete "$ns" 2>/dev/null; then
        say "removed $ns (owner pid $owner is gone)"
        removed=$((removed + 1))
    else
        say "could not remove $ns"
    fi
done
say "removed $removed stale namespace(s), kept $kept of live owners"
