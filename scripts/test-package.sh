#!/usr/bin/env bash
# Builds the .deb packages (scripts/package.sh; --profile as there, default debug: CI packages
# the binaries its tests built) and checks them: control fields; every file (binaries run
# and are stripped, the systemd units pass `systemd-analyze verify` against the unpacked tree,
# one man page per visible subcommand that man(1) renders without a warning, completions for
# bash/zsh/fish, the example config passes `meshd check-config`, conffiles); the agent's
# start helper picks the right mode; lintian finds no error and no warning that
# packaging/README.md does not list; and (as root) the packaged meshd runs in transparent mode
# with CAP_NET_ADMIN alone and keeps its guard when killed as the unit stops it (SIGKILL).
#
#   scripts/test-package.sh [--profile release|debug]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/need.sh
export LC_ALL=C.UTF-8

profile=debug
if (($#)); then
    [[ $1 == --profile && $# == 2 ]] || { echo "usage: $0 [--profile release|debug]" >&2; exit 2; }
    profile=$2
fi
need_tools test-package.sh dpkg-deb:dpkg lintian:lintian systemd-analyze:systemd man:man-db \
    groff:groff-base readelf:binutils setpriv:util-linux nft:nftables ip:iproute2

work=$(mktemp -d /tmp/meshd-test-package.XXXXXX)
ns=
cleanup() {
    [[ -z $ns ]] || ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
ok() {
    passed=$((passed + 1))
    echo "ok: $*"
}
fail() {
    failed=$((failed + 1))
    echo "FAIL: $*"
}
# check DESCRIPTION COMMAND...: the command must succeed.
check() {
    local what=$1
    shift
    if "$@" >"$work/out" 2>&1; then ok "$what"; else fail "$what: $(tail -n 5 "$work/out")"; fi
}

mapfile -t debs < <(scripts/package.sh --profile "$profile" --out "$work/debs")
((${#debs[@]} == 2)) || { echo "test-package.sh: package.sh gave ${#debs[@]} packages" >&2; exit 1; }
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)

for deb in "${debs[@]}"; do
    pkg=$(dpkg-deb -f "$deb" Package)
    root=$work/root-$pkg
    dpkg-deb -x "$deb" "$root"
    dpkg-deb -e "$deb" "$root/DEBIAN"
    [[ $(dpkg-deb -f "$deb" Version) == "$version" ]] && ok "$pkg: Version $version" ||
        fail "$pkg: Version is $(dpkg-deb -f "$deb" Version), Cargo.toml says $version"
    [[ $(dpkg-deb -f "$deb" Depends) == *libc6* ]] && ok "$pkg: Depends on libc6" ||
        fail "$pkg: Depends: $(dpkg-deb -f "$deb" Depends)"
    check "$pkg: dpkg-deb -I" dpkg-deb -I "$deb"

    # The binary runs, and carries no symbols.
    bin=$root/usr/bin/$pkg
    if out=$("$bin" --version) && [[ $out == "$pkg $version"* ]]; then ok "$pkg --version: $out"; else
        fail "$pkg --version: ${out:-nothing}"; fi
    check "$pkg --help" "$bin" --help
    if readelf -S "$bin" | grep -qE '\.(symtab|debug_info)'; then fail "$pkg: not stripped"; else
        ok "$pkg: stripped"; fi

    # One page per command and visible subcommand (as --help lists them), rendered without a
    # warning, with a NAME section.
    section=$([[ $pkg == meshd ]] && echo 8 || echo 1)
    pages() { # pages NAME ARGS...: the page of `pkg ARGS...` and of its subcommands
        local name=$1
        shift
        local page=$root/usr/share/man/man$section/$name.$section.gz
        if [[ -f $page ]] && man --warnings -E UTF-8 -l "$page" 2>"$work/man.err" |
            grep -q '^NAME' && [[ ! -s $work/man.err ]]; then
            ok "man page $name($section)"
        else
            fail "man page $name($section): ${page#"$root"} missing or not clean: $(head -n 3 "$work/man.err" 2>/dev/null)"
        fi
        local sub
        for sub in $("$bin" "$@" --help | sed -n '/^Commands:/,/^$/s/^  \([a-z][a-z0-9-]*\) .*/\1/p'); do
            [[ $sub == help ]] || pages "$name-$sub" "$@" "$sub"
        done
    }
    pages "$pkg"

    # Completions, in the places bash-completion, zsh and fish look.
    c=$root/usr/share
    [[ -s $c/bash-completion/completions/$pkg ]] && bash -n "$c/bash-completion/completions/$pkg" &&
        grep -q "complete .*$pkg" "$c/bash-completion/completions/$pkg" &&
        ok "$pkg: bash completion" || fail "$pkg: bash completion"
    [[ $(head -n 1 "$c/zsh/vendor-completions/_$pkg" 2>/dev/null) == "#compdef $pkg" ]] &&
        ok "$pkg: zsh completion" || fail "$pkg: zsh completion"
    grep -q "^complete -c $pkg " "$c/fish/vendor_completions.d/$pkg.fish" 2>/dev/null &&
        ok "$pkg: fish completion" || fail "$pkg: fish completion"

    for f in copyright changelog.gz; do
        [[ -s $root/usr/share/doc/$pkg/$f ]] && ok "$pkg: /usr/share/doc/$pkg/$f" ||
            fail "$pkg: no /usr/share/doc/$pkg/$f"
    done
done

# meshd: units, configs, conffiles, the start helper.
root=$work/root-meshd
unitdir=$(cd "$root" && find . -name meshd.service -printf '%h\n' | sed 's/^\.//')
for u in meshd.service meshd-coordinator.service; do
    [[ -f $root$unitdir/$u ]] && ok "unit $unitdir/$u" || fail "no unit $u"
done
# verify against the unpacked tree (ExecStart's programs, Documentation's man pages) with
# the host's own units beside ours (the targets they name); any message is a failure.
vroot=$work/verify
cp -a "$root" "$vroot"
for d in /lib/systemd/system /usr/lib/systemd/system; do
    if [[ -d $d && ! -L $d ]]; then mkdir -p "$vroot$d" && cp -an "$d/." "$vroot$d/"; fi
done
if MANPATH=$vroot/usr/share/man systemd-analyze verify --root="$vroot" \
    "$unitdir/meshd.service" "$unitdir/meshd-coordinator.service" >"$work/verify.out" 2>&1 &&
    [[ ! -s $work/verify.out ]]; then
    ok "systemd-analyze verify (both units)"
else
    fail "systemd-analyze verify: $(cat "$work/verify.out")"
fi
grep -q '^KillSignal=SIGKILL$' "$root$unitdir/meshd.service" && ok "meshd.service stops with SIGKILL" ||
    fail "meshd.service does not stop with SIGKILL (the guard would not survive a restart)"

for f in /etc/meshd/meshd.toml.example /etc/meshd/coordinator.toml.example /etc/default/meshd \
    /etc/default/meshd-coordinator; do
    [[ -s $root$f ]] && grep -qxF "$f" "$root/DEBIAN/conffiles" && ok "conffile $f" ||
        fail "$f missing or not a conffile"
done
(cd "$root" && find etc -type f -printf '/%p\n') | sort >"$work/etc"
sort "$root/DEBIAN/conffiles" | cmp -s - "$work/etc" && ok "every file in /etc is a conffile" ||
    fail "files in /etc and conffiles differ: $(sort "$root/DEBIAN/conffiles" | diff - "$work/etc" | tr '\n' ' ')"
[[ ! -e $root/etc/meshd/meshd.toml ]] && ok "no /etc/meshd/meshd.toml (a fresh install stays unconfigured)" ||
    fail "the package ships /etc/meshd/meshd.toml"

# The example config is valid once its key exists.
cfgdir=$work/cfg
mkdir -m 700 "$cfgdir"
"$root/usr/bin/meshd" genkey >"$cfgdir/host.key"
chmod 600 "$cfgdir/host.key"
peer=$("$root/usr/bin/meshd" genkey | "$root/usr/bin/meshd" pubkey)
sed -e "s|/etc/meshd/host.key|$cfgdir/host.key|" \
    -e "s|AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=|$peer|" \
    "$root/etc/meshd/meshd.toml.example" >"$cfgdir/meshd.toml"
check "meshd check-config meshd.toml.example" "$root/usr/bin/meshd" check-config "$cfgdir/meshd.toml"

# The start helper: which `meshd up` each state gives (a fake meshd prints its arguments).
agent=$root/usr/libexec/meshd/meshd-agent
fake=$work/fake-meshd
printf '#!/bin/sh\necho "args=$*" "token=${MESHD_JOIN_TOKEN:-}"\n' >"$fake"
chmod 755 "$fake"
st=$work/state etc=$work/etc-meshd
mkdir -p "$st" "$etc"
helper() { MESHD_BIN=$fake MESHD_STATE_DIR=$st MESHD_ETC=$etc MESHD_JOIN_TOKEN=${tok:-} "$agent" "$@" 2>&1; }
expect() { # expect WHAT WANT GOT
    [[ $3 == "$2" ]] && ok "meshd-agent: $1" || fail "meshd-agent: $1: got '$3', want '$2'"
}
got=$(helper start || true)
[[ $got == *"nothing to run"* ]] && ok "meshd-agent: refuses with nothing configured" ||
    fail "meshd-agent with nothing configured: $got"
touch "$etc/meshd.toml"
expect "static mode" "args=up --config $etc/meshd.toml --state-dir $st -v token=" "$(helper start -v)"
echo " T0K " >"$etc/join.token"
chmod 644 "$etc/join.token"
got=$(helper start || true)
[[ $got == *"chmod 600"* ]] && ok "meshd-agent: refuses a readable join token" ||
    fail "meshd-agent with a readable join token: $got"
chmod 600 "$etc/join.token"
expect "enrols with the token file (in the environment)" "args=up --state-dir $st token= T0K " "$(helper start)"
touch "$st/agent.json"
expect "resumes once enrolled, dropping a token" "args=up --state-dir $st token=" "$(tok=X helper start)"
got=$(helper reload 1 || true)
[[ $got == *"coordinator mode"* ]] && ok "meshd-agent: reload refused in coordinator mode" ||
    fail "meshd-agent reload in coordinator mode: $got"

# lintian: no error; each warning listed in packaging/README.md.
# (lintian exits 0, or 2 when it found an error; anything else: it did not run.)
rc=0
lintian --allow-root --fail-on error "${debs[@]}" >"$work/lintian" 2>&1 || rc=$?
cat "$work/lintian"
if ((rc == 0)) && ! grep -q '^E: ' "$work/lintian"; then ok "lintian: no errors"
elif ((rc == 2)); then fail "lintian errors"
else fail "lintian did not run (exit $rc)"; fi
while read -r tag; do
    grep -q "\`$tag\`" packaging/README.md && ok "lintian warning $tag is listed in packaging/README.md" ||
        fail "lintian warning $tag is not listed (with why) in packaging/README.md"
done < <(sed -n 's/^W: [^:]*: \([a-z0-9-]*\).*/\1/p' "$work/lintian" | sort -u)

# As root: the packaged meshd in a namespace, transparent mode, CAP_NET_ADMIN only (the
# unit's bounding set, no new privileges); killed with SIGKILL as the unit stops it, its
# guard (the nft table) stays; `meshd down` then removes it.
if [[ $(id -u) -ne 0 ]]; then
    echo "test-package.sh: not root: skipping the CAP_NET_ADMIN-only run of the packaged meshd"
else
    ns=meshd-pkg-$$
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    m=$root/usr/bin/meshd
    cat >"$cfgdir/t.toml" <<TOML
[interface]
name = "pkg0"
private_key_file = "$cfgdir/host.key"
listen_port = 51820
address = "100.64.77.1/24"
mode = "transparent"

[[peer]]
name = "b"
public_key = "$peer"
endpoint = "198.18.77.2:51820"
allowed_ips = ["100.64.77.2/32"]
TOML
    mkdir -m 700 "$work/st-ns"
    ip netns exec "$ns" setpriv --bounding-set=-all,+net_admin --no-new-privs \
        "$m" up --config "$cfgdir/t.toml" --state-dir "$work/st-ns" >"$work/meshd.log" 2>&1 &
    pid=$!
    # Up: it answers `meshd status` and its nft table is there.
    up=0
    for _ in $(seq 100); do
        if ip netns exec "$ns" "$m" status --interface pkg0 >/dev/null 2>&1 &&
            ip netns exec "$ns" nft list table inet meshd_pkg0 >/dev/null 2>&1; then
            up=1
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if ((up)); then ok "packaged meshd runs with CAP_NET_ADMIN alone (transparent mode)"; else
        fail "packaged meshd with CAP_NET_ADMIN alone: $(tail -n 5 "$work/meshd.log")"; fi
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    ip netns exec "$ns" nft list table inet meshd_pkg0 >/dev/null 2>&1 &&
        ok "after SIGKILL the guard (nft table inet meshd_pkg0) stays" ||
        fail "after SIGKILL the nft table inet meshd_pkg0 is gone"
    check "meshd down after SIGKILL" ip netns exec "$ns" "$m" down --interface pkg0
    ip netns exec "$ns" nft list table inet meshd_pkg0 >/dev/null 2>&1 &&
        fail "meshd down left the nft table" || ok "meshd down removed the guard"
fi

echo "test-package.sh: $passed passed, $failed failed"
((failed == 0))
