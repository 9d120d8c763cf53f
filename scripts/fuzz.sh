#!/usr/bin/env bash
# Runs libFuzzer (cargo-fuzz) on every target in fuzz/fuzz_targets/ for SECONDS each, one at a
# time, starting from the committed corpus (fuzz/corpus/<target>/, never modified: new inputs
# go to fuzz/target/corpus-work/<target>/). Crashes land in fuzz/artifacts/<target>/ and make
# the script exit non-zero. Builds in fuzz/target (its own target dir), never in target/.
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# Toolchain: a nightly toolchain if one is installed (cargo +nightly), else stable with
# RUSTC_BOOTSTRAP=1 (said so, loudly; MESHD_FUZZ_TOOLCHAIN=stable forces that). Sanitizer: address when the toolchain ships the ASan
# runtime, else none (MESHD_FUZZ_SANITIZER overrides). Needs cargo-fuzz (`cargo install
# cargo-fuzz`). Set MESHD_FUZZ_LOCK=/path to hold that flock while building and fuzzing.
# Not run by CI: CI replays the corpus (`cargo test -p meshd-fuzz-targets`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh SECONDS [TARGET...]" >&2
    exit 2
fi
secs=$1
shift

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz); nothing was fuzzed" >&2
    exit 1
fi

toolchain=()
if [ "${MESHD_FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
    echo "fuzz.sh: using the nightly toolchain"
else
    export RUSTC_BOOTSTRAP=1
    echo "fuzz.sh: NOTICE: no nightly toolchain; using stable $(rustc --version | awk '{print $2}') with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly flags)"
fi

sysroot=$(rustc "${toolchain[@]}" --print sysroot)
host=$(rustc "${toolchain[@]}" -vV | awk '/^host:/ {print $2}')
sanitizer=${MESHD_FUZZ_SANITIZER:-}
if [ -z "$sanitizer" ]; then
    if ls "$sysroot/lib/rustlib/$host/lib/"*asan* >/dev/null 2>&1; then
        sanitizer=address
    else
        sanitizer=none
        echo "fuzz.sh: NOTICE: no ASan runtime in $sysroot; fuzzing with --sanitizer none"
    fi
fi

if [ $# -gt 0 ]; then
    targets=("$@")
    set -- "${targets[@]}"
else
    mapfile -t targets < <(ls fuzz/fuzz_targets/ | sed -n 's/\.rs$//p' | sort)
fi

locked() {
    if [ -n "${MESHD_FUZZ_LOCK:-}" ]; then
        CARGO_INCREMENTAL=0 flock "$MESHD_FUZZ_LOCK" "$@"
    else
        CARGO_INCREMENTAL=0 "$@"
    fi
}

fuzz_args=(--fuzz-dir fuzz --sanitizer "$sanitizer")
echo "fuzz.sh: building ${#targets[@]} targets (sanitizer $sanitizer)"
# cargo-fuzz's own target dir is fuzz/target (fuzz/ is a workspace of its own).
build_one=()
[ $# -eq 1 ] && build_one=("$1")
if ! locked cargo "${toolchain[@]}" fuzz build "${fuzz_args[@]}" "${build_one[@]}" 2>&1 | tail -n 20; then
    echo "fuzz.sh: the fuzz build failed (see above); nothing was fuzzed" >&2
    exit 1
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    work=fuzz/target/corpus-work/$t
    mkdir -p "$work" "fuzz/artifacts/$t"
    log=fuzz/target/fuzz-$t.log
    echo "fuzz.sh: $t for ${secs}s (log $log)"
    set +e
    locked cargo "${toolchain[@]}" fuzz run "${fuzz_args[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
    rc=$?
    set -e
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}' | tail -n1)
    per=$(grep -o 'exec/s: [0-9]*' "$log" | tail -n1 | awk '{print $2}')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | awk '{print $2}')
    line="$t: ${secs}s, ${runs:-?} runs, ${per:-?} exec/s, cov ${cov:-?}"
    if [ "$rc" -ne 0 ]; then
        line="$line, FAILED (exit $rc): $(ls "fuzz/artifacts/$t" | head -n3 | tr '\n' ' ')"
        failed+=("$t")
        grep -m1 -A12 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" >&2 || true
    fi
    echo "fuzz.sh: $line"
    summary+=("$line")
done

echo "fuzz.sh: summary"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
