#!/usr/bin/env bash
# Builds the Debian packages of meshd (the daemon and its coordinator subcommand, with systemd
# units, man pages, shell completions and example configurations) and meshctl, staged by hand
# from packaging/ and built with `dpkg-deb --build --root-owner-group`.
#
#   scripts/package.sh [--profile release|debug] [--out DIR]
#
#   --profile  cargo profile of the binaries (default release). CI packages the debug
#              binaries its tests already built; they are stripped like the release ones.
#   --out      where the .deb files go (default target/packages).
#
# It installs the Debian tools it needs (scripts/need.sh) or stops naming them, and prints
# the packages' paths only once both are built; a failed run leaves no .deb of this version
# in DIR. See packaging/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/need.sh

die() {
    echo "package.sh: $*" >&2
    exit 1
}

profile=release
out=
while (($#)); do
    case $1 in
    --profile)
        (($# >= 2)) || die "--profile needs a value (release or debug)"
        profile=$2
        shift 2
        ;;
    --out)
        (($# >= 2)) || die "--out needs a directory"
        out=$2
        shift 2
        ;;
    -h | --help)
        sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done

target=${CARGO_TARGET_DIR:-target}
case $profile in
release) cargo_profile=(--release) dir=release ;;
debug | dev) cargo_profile=() dir=debug ;;
*) die "unknown profile $profile (release or debug)" ;;
esac
out=${out:-$target/packages}

need_tools package.sh dpkg-deb:dpkg strip:binutils objdump:binutils gzip:gzip \
    dpkg-shlibdeps:dpkg-dev md5sum:coreutils
command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH (install Rust: see README)"

# The version is the workspace's; packaging/changelog must have an entry for it.
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[[ -n $version ]] || die "no version in Cargo.toml's [workspace.package]"
top=$(sed -n '1s/^meshd (\([^)]*\)).*/\1/p' packaging/changelog)
[[ $top == "$version" ]] ||
    die "packaging/changelog's first entry is for ${top:-nothing}, Cargo.toml says $version: add an entry"
arch=$(dpkg --print-architecture)
# Every file's time: the changelog entry's date (reproducible packages).
epoch=$(date -d "$(sed -n 's/^ -- .*>  //p' packaging/changelog | head -n 1)" +%s) ||
    die "cannot read the date of packaging/changelog's first entry"

mkdir -p "$out"
out=$(cd "$out" && pwd)
debs=("$out/meshd_${version}_${arch}.deb" "$out/meshctl_${version}_${arch}.deb")
rm -f "${debs[@]}"

echo "package.sh: cargo build (${profile}) meshd, meshctl and their man-page generators" >&2
cargo build "${cargo_profile[@]}" -p meshd -p meshctl --bins \
    --example mangen-meshd --example mangen-meshctl
bindir=$target/$dir
for f in meshd meshctl examples/mangen-meshd examples/mangen-meshctl; do
    [[ -x $bindir/$f ]] || die "cargo did not produce $bindir/$f"
done

stage=$out/stage
rm -rf "$stage"
umask 022

# stage_common PKG BIN SECTION: the binary (stripped), its man pages, completions, copyright
# and changelog in $stage/PKG.
stage_common() {
    local pkg=$1 bin=$2 section=$3 root=$stage/$1
    install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/doc/$pkg" \
        "$root/usr/share/man/man$section" "$root/usr/share/bash-completion/completions" \
        "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
    # As dh_strip does: no symbols, no .comment/.note sections.
    strip --strip-unneeded --remove-section=.comment --remove-section=.note \
        -o "$root/usr/bin/$bin" "$bindir/$bin"
    chmod 755 "$root/usr/bin/$bin"
    "$bindir/examples/mangen-$bin" "$root/usr/share/man/man$section" >/dev/null
    gzip -9n "$root/usr/share/man/man$section"/*."$section"
    "$root/usr/bin/$bin" completions bash >"$root/usr/share/bash-completion/completions/$bin"
    "$root/usr/bin/$bin" completions zsh >"$root/usr/share/zsh/vendor-completions/_$bin"
    "$root/usr/bin/$bin" completions fish >"$root/usr/share/fish/vendor_completions.d/$bin.fish"
    install -m 644 packaging/copyright "$root/usr/share/doc/$pkg/copyright"
    gzip -9nc packaging/changelog >"$root/usr/share/doc/$pkg/changelog.gz"
    install -D -m 644 "packaging/$pkg/lintian-overrides" "$root/usr/share/lintian/overrides/$pkg"
}

# depends BINARY: the shared-library dependencies dpkg-shlibdeps finds (libc6, libgcc-s1).
depends() {
    local tmp
    tmp=$(mktemp -d)
    mkdir "$tmp/debian"
    printf 'Source: meshd\n\nPackage: meshd\nArchitecture: any\n' >"$tmp/debian/control"
    (cd "$tmp" && dpkg-shlibdeps -O "$1" 2>/dev/null) | sed -n 's/^shlibs:Depends=//p'
    rm -rf "$tmp"
}

# finish PKG DESCRIPTION-FILE FIELDS...: control, md5sums, times, then the .deb.
finish() {
    local pkg=$1 desc=$2 root=$stage/$1 deps
    shift 2
    deps=$(depends "$root/usr/bin/$pkg")
    [[ -n $deps ]] || die "dpkg-shlibdeps found no dependencies for $pkg"
    {
        echo "Package: $pkg"
        echo "Version: $version"
        echo "Architecture: $arch"
        echo "Maintainer: meshd developers <meshd@packages.invalid>"
        echo "Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)"
        echo "Depends: $deps"
        printf '%s\n' "$@"
        echo "Section: net"
        echo "Priority: optional"
        cat "$desc"
    } >"$root/DEBIAN/control"
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
        xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
    find "$root" -exec touch -h -d "@$epoch" {} +
    dpkg-deb --build --root-owner-group -Zxz "$root" "$out/${pkg}_${version}_${arch}.deb" >/dev/null
}

# meshd: the daemon, its units, the agent's start helper, configs and maintainer scripts.
stage_common meshd meshd 8
r=$stage/meshd
unitdir=$(sed -n 's/^systemd_system_unit_dir=\${rootprefix}//p' /usr/share/pkgconfig/systemd.pc 2>/dev/null)
unitdir=${unitdir:-/usr/lib/systemd/system}
install -d "$r$unitdir" "$r/usr/libexec/meshd" "$r/etc/meshd" "$r/etc/default"
install -m 644 packaging/meshd/meshd.service packaging/meshd/meshd-coordinator.service "$r$unitdir/"
install -m 755 packaging/meshd/meshd-agent "$r/usr/libexec/meshd/meshd-agent"
install -m 644 packaging/meshd/meshd.toml.example packaging/meshd/coordinator.toml.example "$r/etc/meshd/"
install -m 644 packaging/meshd/default "$r/etc/default/meshd"
install -m 644 packaging/meshd/default-coordinator "$r/etc/default/meshd-coordinator"
install -m 644 packaging/meshd/README.Debian "$r/usr/share/doc/meshd/README.Debian"
install -m 755 packaging/meshd/postinst packaging/meshd/prerm packaging/meshd/postrm "$r/DEBIAN/"
printf '%s\n' /etc/default/meshd /etc/default/meshd-coordinator \
    /etc/meshd/coordinator.toml.example /etc/meshd/meshd.toml.example >"$r/DEBIAN/conffiles"
chmod 644 "$r/DEBIAN/conffiles"
finish meshd packaging/meshd/description \
    "Recommends: nftables" "Suggests: meshctl, wireguard-tools"

stage_common meshctl meshctl 1
finish meshctl packaging/meshctl/description "Recommends: ca-certificates"

rm -rf "$stage"
for deb in "${debs[@]}"; do
    [[ -s $deb ]] || die "$deb was not built"
done
printf '%s\n' "${debs[@]}"
