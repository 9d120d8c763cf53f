#!/usr/bin/env bash
# Runs the already-built test binaries as an unprivileged user (nobody) and fails if any test
# fails: a test that needs root must skip itself with a notice (meshd_lab::require_root!),
# everything else must pass without root. Run by .ci/run after scripts/test.sh (as root);
# builds nothing new if the tests are built.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test-unprivileged.sh: run it as root (it drops to the user nobody itself)" >&2
    exit 1
fi
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
chmod 0777 "$home"
list=$(cargo test --workspace --no-run --message-format=json 2>/dev/null |
    jq -r 'select(.profile.test == true and .executable != null) |
        "\(.executable)\t\(.manifest_path)"')
failed=0 ran=0 skipped=0
while IFS=$'\t' read -r bin manifest; do
    dir=$(dirname "$manifest")
    out=$home/$(basename "$bin").log
    ran=$((ran + 1))
    if ! (cd "$dir" && timeout 600 setpriv --reuid=65534 --regid=65534 --clear-groups \
        env HOME="$home" TMPDIR="$home" MESHD_UI_ARTEFACTS="$home/ui-artefacts" "$bin" >"$out" 2>&1); then
        echo "FAILED as nobody: $bin (in $dir)"
        grep -E '^test .* FAILED|panicked' "$out" | head -20 || true
        failed=$((failed + 1))
    fi
    skipped=$((skipped + $(grep -c 'SKIP .*needs root' "$out" || true)))
done <<<"$list"
echo "unprivileged: $ran test binaries, $failed failed, $skipped tests skipped (they need root)"
[ "$failed" -eq 0 ]
