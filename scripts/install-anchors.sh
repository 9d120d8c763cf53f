#!/usr/bin/env bash
# Install the comparison implementations ("anchors") used by scripts/bench-tunnel.sh.
#
# Idempotent: anything already present is left alone. Missing or failing anchors are
# reported and skipped; the bench script skips whatever is not installed.
#
#   wireguard-go, wireguard-tools, iperf3, nebula   Debian bookworm packages (apt-get install),
#                     plus iputils-ping, jq and postgresql (initdb, postgres, pgbench: the bench's
#                     pgbench row runs its own throwaway server, never the packaged cluster)
#   wireguard-go-bpo  wireguard-go from bookworm-backports (reports v0.0.20230223, has TUN
#                     offload). Fetched with `apt-get download` against a temporary sources list
#                     and lists directory (the system's apt configuration is not changed) and
#                     unpacked with `dpkg-deb -x` into $ANCHOR_DIR/wg-go-bpo, so the system
#                     wireguard-go is not replaced.
#   boringtun-cli     `cargo install boringtun-cli --root $ANCHOR_DIR/boringtun`
#
# Result: $ANCHOR_DIR/bin/ holds a symlink per installed anchor:
#   wireguard-go  wireguard-go-bpo  boringtun-cli  nebula  nebula-cert  wg  iperf3
#
# Usage: sudo scripts/install-anchors.sh        (ANCHOR_DIR=/var/cache/meshd-bench by default)
set -euo pipefail

ANCHOR_DIR=${ANCHOR_DIR:-/var/cache/meshd-bench}
BIN="$ANCHOR_DIR/bin"
APT_TIMEOUT=${APT_TIMEOUT:-300}
CARGO_TIMEOUT=${CARGO_TIMEOUT:-1200}

declare -A STATUS=()
ORDER=(apt-packages wireguard-go wg iperf3 nebula wireguard-go-bpo boringtun-cli)

log() { printf '[install-anchors] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get, $ANCHOR_DIR)"
    exit 1
fi

mkdir -p "$BIN"

TMP=$(mktemp -d /tmp/meshd-anchors.XXXXXX)
trap 'rm -rf "$TMP"' EXIT INT TERM

link() { # link NAME TARGET
    ln -sfn "$2" "$BIN/$1"
}

# --- 1. bookworm packages ----------------------------------------------------------
missing=()
for p in wireguard-go wireguard-tools iperf3 nebula iputils-ping jq postgresql; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    if timeout "$APT_TIMEOUT" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}" >"$TMP/apt.log" 2>&1 ||
        { timeout "$APT_TIMEOUT" apt-get update >>"$TMP/apt.log" 2>&1 &&
            timeout "$APT_TIMEOUT" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y --no-install-recommends "${missing[@]}" >>"$TMP/apt.log" 2>&1; }; then
        STATUS[apt-packages]="ok (installed ${missing[*]})"
    else
        STATUS[apt-packages]="partly failed: $(tail -n1 "$TMP/apt.log")"
    fi
else
    STATUS[apt-packages]="ok (already installed)"
fi

check_bin() { # check_bin NAME PATH VERSION-CMD...
    local name=$1 path=$2
    shift 2
    if [[ -x $path ]]; then
        link "$name" "$path"
        STATUS[$name]="ok $path ($("$@" 2>&1 | grep -m1 -oE 'v?[0-9]+\.[0-9]+(\.[0-9]+)*' | head -n1 || true))"
    else
        rm -f "$BIN/$name"
        STATUS[$name]="MISSING ($path)"
    fi
}
check_bin wireguard-go /usr/bin/wireguard-go /usr/bin/wireguard-go --version
check_bin wg /usr/bin/wg /usr/bin/wg --version
check_bin iperf3 /usr/bin/iperf3 /usr/bin/iperf3 --version
check_bin nebula /usr/bin/nebula /usr/bin/nebula -version
if [[ -x /usr/bin/nebula-cert ]]; then link nebula-cert /usr/bin/nebula-cert; fi

# --- 2. wireguard-go from bookworm-backports, unpacked into the cache ----------------
BPO_ROOT="$ANCHOR_DIR/wg-go-bpo"
BPO_BIN="$BPO_ROOT/root/usr/bin/wireguard-go"

# The Debian mirror the system already uses (deb822 .sources or one-line .list format).
debian_mirror() {
    local f line uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # deb822: take the URIs of a stanza whose Suites include plain "bookworm"
        uri=$(awk '
            /^[[:space:]]*$/ { if (u != "" && s) { print u; exit } u=""; s=0; next }
            /^URIs:/   { u=$2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") s=1 }
            END { if (u != "" && s) print u }' "$f" | head -n1)
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        while read -r line; do
            # deb [opts] URI bookworm main
            if [[ $line =~ ^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm[[:space:]] ]]; then
                echo "${BASH_REMATCH[2]}"
                return
            fi
        done <"$f"
    done
    echo "http://deb.debian.org/debian"
}

if [[ -x $BPO_BIN ]] && "$BPO_BIN" --version >/dev/null 2>&1; then
    link wireguard-go-bpo "$BPO_BIN"
    STATUS[wireguard-go-bpo]="ok (cached) $BPO_BIN ($("$BPO_BIN" --version | grep -m1 -oE 'v[0-9.]+'))"
else
    MIRROR=$(debian_mirror)
    log "fetching wireguard-go from $MIRROR bookworm-backports"
    mkdir -p "$TMP/lists/partial" "$TMP/parts" "$TMP/dl" "$BPO_ROOT"
    echo "deb $MIRROR bookworm-backports main" >"$TMP/bpo.list"
    chmod -R a+rX "$TMP" # lets apt's _apt sandbox user write the download
    chown -R _apt "$TMP/dl" "$TMP/lists" 2>/dev/null || true
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$TMP/bpo.list"
        -o "Dir::Etc::SourceParts=$TMP/parts"
        -o "Dir::State::Lists=$TMP/lists"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
    )
    if timeout "$APT_TIMEOUT" apt-get "${APT_OPTS[@]}" update >"$TMP/bpo.log" 2>&1 &&
        (cd "$TMP/dl" && timeout "$APT_TIMEOUT" apt-get "${APT_OPTS[@]}" \
            download wireguard-go/bookworm-backports) >>"$TMP/bpo.log" 2>&1; then
        deb=$(find "$TMP/dl" -name 'wireguard-go_*.deb' | head -n1)
        rm -rf "$BPO_ROOT/root"
        dpkg-deb -x "$deb" "$BPO_ROOT/root"
        cp "$deb" "$BPO_ROOT/"
        if "$BPO_BIN" --version >/dev/null 2>&1; then
            link wireguard-go-bpo "$BPO_BIN"
            STATUS[wireguard-go-bpo]="ok $(basename "$deb") -> $BPO_BIN ($("$BPO_BIN" --version | grep -m1 -oE 'v[0-9.]+'))"
        else
            STATUS[wireguard-go-bpo]="FAILED: unpacked binary does not run"
        fi
    else
        STATUS[wireguard-go-bpo]="FAILED: $(grep -E '^(E|W):' "$TMP/bpo.log" | head -n1 || tail -n1 "$TMP/bpo.log")"
    fi
fi

# --- 3. boringtun-cli via cargo ------------------------------------------------------
BT_BIN="$ANCHOR_DIR/boringtun/bin/boringtun-cli"
if [[ ! -x $BT_BIN ]]; then
    if command -v cargo >/dev/null 2>&1; then
        log "cargo install boringtun-cli (takes a few minutes)"
        if ! timeout "$CARGO_TIMEOUT" cargo install --locked boringtun-cli \
            --root "$ANCHOR_DIR/boringtun" >"$TMP/cargo.log" 2>&1; then
            # --locked can fail if the published lock file is stale; retry without it
            timeout "$CARGO_TIMEOUT" cargo install boringtun-cli \
                --root "$ANCHOR_DIR/boringtun" >>"$TMP/cargo.log" 2>&1 || true
        fi
    fi
fi
if [[ -x $BT_BIN ]] && "$BT_BIN" --help 2>&1 | grep -q -- '--foreground'; then
    link boringtun-cli "$BT_BIN"
    STATUS[boringtun-cli]="ok $BT_BIN ($("$BT_BIN" --version 2>&1 | head -n1))"
elif [[ -x $BT_BIN ]]; then
    STATUS[boringtun-cli]="FAILED: $BT_BIN has no --foreground option"
elif ! command -v cargo >/dev/null 2>&1; then
    STATUS[boringtun-cli]="SKIPPED: cargo not found"
else
    STATUS[boringtun-cli]="FAILED: $(grep -m1 -E '^error' "$TMP/cargo.log" || tail -n1 "$TMP/cargo.log")"
fi

# --- report --------------------------------------------------------------------------
echo "anchors in $BIN:"
for k in "${ORDER[@]}"; do
    printf '  %-17s %s\n' "$k" "${STATUS[$k]:-?}"
done
