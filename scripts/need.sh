# Sourced by scripts/demo.sh and scripts/test.sh (bash): make sure the commands a script calls
# exist, installing their Debian packages with apt-get when they do not.
#
#   need_tools WHO TOOL:PACKAGE...
#
# Tools already on PATH are left alone (idempotent). For the missing ones it says which
# packages it installs and runs `apt-get install -y` (then `apt-get update` and once more if
# that fails). It stops, naming the packages to install, when it cannot: not root, no apt-get,
# MESHD_NO_INSTALL=1 (never install; only check), or apt-get failing (its last lines are
# shown). It never goes on without a tool. Does not use sudo.
#
# Debian keeps PostgreSQL's server programs (initdb, postgres) off PATH, in
# /usr/lib/postgresql/VERSION/bin: the newest such directory is added to PATH before looking
# and again after installing (so `initdb:postgresql` works as a spec).

need_tools() {
    local who=$1
    shift
    local spec tool pkg missing=() pkgs=()
    need_pg_path
    for spec in "$@"; do
        tool=${spec%%:*}
        pkg=${spec#*:}
        if ! command -v "$tool" >/dev/null 2>&1; then
            missing+=("$tool")
            [[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
        fi
    done
    ((${#missing[@]})) || return 0

    local what="missing ${missing[*]} (Debian/Ubuntu packages: ${pkgs[*]})"
    local how="install them with: apt-get install -y ${pkgs[*]}"
    if [[ ${MESHD_NO_INSTALL:-0} == 1 ]]; then
        echo "$who: $what; MESHD_NO_INSTALL=1, so not installing; $how" >&2
        return 1
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "$who: $what; run as root to have them installed, or $how" >&2
        return 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: $what; there is no apt-get here: install those packages (or their equivalents) by hand" >&2
        return 1
    fi

    echo "$who: installing ${pkgs[*]} with apt-get (for ${missing[*]})" >&2
    local log
    log=$(mktemp /tmp/meshd-apt.XXXXXX)
    if ! apt_install "${pkgs[@]}" >"$log" 2>&1; then
        echo "$who: apt-get update, then installing again" >&2
        if ! { apt_get update && apt_install "${pkgs[@]}"; } >>"$log" 2>&1; then
            echo "$who: could not install ${pkgs[*]}; apt-get said:" >&2
            tail -n 5 "$log" | sed 's/^/    /' >&2
            echo "$who: $what; $how" >&2
            rm -f "$log"
            return 1
        fi
    fi
    rm -f "$log"
    need_pg_path
    hash -r
    local still=()
    for tool in "${missing[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || still+=("$tool")
    done
    if ((${#still[@]})); then
        echo "$who: installed ${pkgs[*]}, but ${still[*]} is still not on PATH ($PATH)" >&2
        return 1
    fi
    echo "$who: installed ${pkgs[*]}" >&2
}

need_pg_path() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $d && ":$PATH:" != *":$d:"* ]]; then
        export PATH=$PATH:$d
    fi
}

apt_get() {
    timeout "${APT_TIMEOUT:-600}" env DEBIAN_FRONTEND=noninteractive apt-get -q "$@"
}

apt_install() {
    apt_get install -y --no-install-recommends "$@"
}
