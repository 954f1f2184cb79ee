#!/usr/bin/env bash
# make fuzz: run every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each (default 60), bounded by
# libFuzzer's -max_total_time, starting from a scratch copy of the checked-in seed corpus.
# Prints one line per target (executions, corpus size) and fails if any target crashed (the
# crashing input is left in fuzz/artifacts/<target>/). See docs/FUZZING.md.
#
#   FUZZ_SECONDS=120 scripts/fuzz.sh            every target, 120 s each
#   scripts/fuzz.sh cron template               some targets only
#   FUZZ_SANITIZER=address scripts/fuzz.sh      with AddressSanitizer (default: none)
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
ALL_TARGETS=(options cron template mapping)

cd "$(dirname "$0")/../fuzz"

if [[ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# libFuzzer's instrumentation needs unstable compiler flags: a nightly toolchain, or else the
# stable one with RUSTC_BOOTSTRAP=1.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    FUZZ=(cargo +nightly fuzz)
else
    echo "no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    FUZZ=(cargo fuzz)
fi

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")

# Build every target first, so a build error fails before any fuzzing.
"${FUZZ[@]}" build --sanitizer "$SANITIZER"

failed=()
summary=()
for target in "${targets[@]}"; do
    corpus=target/fuzz-corpus/$target
    log=target/fuzz-logs/$target.log
    rm -rf "$corpus"
    mkdir -p "$corpus" target/fuzz-logs
    cp corpus/"$target"/* "$corpus"/
    echo "== $target: ${SECONDS_PER_TARGET}s"
    set +e
    "${FUZZ[@]}" run --sanitizer "$SANITIZER" "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 -dict=dicts/"$target".dict \
        -timeout=10 -rss_limit_mb=2048 -max_len=4096 >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -a 'stat::number_of_executed_units:' "$log" | tail -n 1 | awk '{print $2}')
    rate=$(grep -a 'stat::average_exec_per_sec:' "$log" | tail -n 1 | awk '{print $2}')
    cov=$(grep -a -E '^#[0-9]+' "$log" | tail -n 1 | grep -a -o 'cov: [0-9]*' | awk '{print $2}')
    line="$target: ${execs:-?} executions in ${SECONDS_PER_TARGET}s (${rate:-?}/s), corpus $(ls "$corpus" | wc -l) inputs (from $(ls corpus/"$target" | wc -l) seeds), cov ${cov:-?}"
    if [[ $rc -ne 0 ]]; then
        line="$line, FAILED (exit $rc): $(grep -a -m1 -E 'panicked at|ERROR: libFuzzer' "$log" || true)"
        grep -a -A4 'panicked at' "$log" | head -n 6 || true
        grep -a 'Test unit written to' "$log" || true
        failed+=("$target")
    fi
    summary+=("$line")
done

echo
echo "fuzz summary (log: fuzz/target/fuzz-logs/<target>.log, sanitizer $SANITIZER)"
printf '  %s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/; reproduce: cd fuzz && cargo +nightly fuzz run <target> <file>)"
    exit 1
fi
