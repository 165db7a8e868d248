#!/usr/bin/env bash
# Build every fuzz target once, then fuzz each for FUZZ_SECONDS (default 30)
# from its committed seed corpus. New inputs go to a temporary copy of the
# corpus, never into fuzz/corpus/. Exits non-zero if any target crashed (the
# input is then in fuzz/artifacts/<target>/).
#
#   fuzz/run.sh                      # every target, 30 s each
#   FUZZ_SECONDS=3600 fuzz/run.sh    # longer
#   fuzz/run.sh chunked path         # only these targets
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
targets=(request_head chunked path jwt config h2_head)
if [ $# -gt 0 ]; then
    targets=("$@")
fi

# cargo-fuzz needs a nightly compiler (sanitizer and coverage flags).
if ! cargo +nightly --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# The lock file is committed and current: a stale one fails here rather
# than being rewritten by every run.
(cd fuzz && cargo +nightly metadata --locked --format-version 1 >/dev/null)
cargo +nightly fuzz build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus" "$work/$target"
    cp -R "$corpus/." "$work/$target/"
    log="$work/$target.log"
    start=$(date +%s)
    status=0
    # libFuzzer writes new inputs into the first corpus directory only.
    cargo +nightly fuzz run "$target" "$work/$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    # libFuzzer's own fuzzing time; the wall time also counts cargo's build
    # check (which may wait for a lock held by another cargo).
    fuzzed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
    echo "fuzz $target: ${execs:-?} execs in ${fuzzed:-$elapsed} s ($elapsed s wall)"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        echo "fuzz $target: FAILED (exit $status):" >&2
        grep -E -A3 '^thread .* panicked at' "$log" | head -n 20 >&2 || true
        grep -E '^SUMMARY:|Test unit written to|^==[0-9]+==ERROR' "$log" >&2 || tail -n 40 "$log" >&2
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
