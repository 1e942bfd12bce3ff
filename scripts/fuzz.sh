#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (see docs/security.md, "Fuzzing").
#
#   scripts/fuzz.sh list                 the targets
#   scripts/fuzz.sh build                build every target (nightly, ASan, debug assertions)
#   scripts/fuzz.sh seeds                (re)build the seed corpus: scripts/fuzz-seeds.sh
#   scripts/fuzz.sh TARGET SECONDS       fuzz one target for SECONDS (one process)
#   scripts/fuzz.sh all SECONDS          fuzz each target in turn for SECONDS
#   scripts/fuzz.sh smoke                each target for 5 s (what CI may run)
#   scripts/fuzz.sh regressions          run every saved input of fuzz/regressions/TARGET/
#                                        once (fails while a found crash is not fixed)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Corpora grow in
# fuzz/corpus/TARGET (generated, gitignored); a crash is saved in fuzz/artifacts/TARGET/
# and ends that target's run. Each run prints executions, executions per second and
# crashes; the exit status is 1 when any target crashed. FUZZ_ARGS adds libFuzzer flags,
# e.g. FUZZ_ARGS=-malloc_limit_mb=100000 with ASAN_OPTIONS=allocator_may_return_null=1:
# max_allocation_size_mb=1024 to fuzz past a known oversized-allocation finding.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../fuzz"

TARGETS=(dimse_command dicom_pdu spool_identify pdi_element pdi_dicomdir pdi_zip pdi_manifest
    container_header container_decrypt token_text token_bytes watch_drop study_details repository_json http_range
    http_content_range sealed zip_stream transcode commitment)
# Debug assertions on: integer overflow in a parser is a crash, as it should be.
FUZZ=(cargo +nightly fuzz)
BUILD_FLAGS=(--debug-assertions)

max_len() {
    case $1 in
        spool_identify | pdi_element | pdi_dicomdir | pdi_zip) echo 65536 ;;
        *) echo 4096 ;;
    esac
}

build() {
    "${FUZZ[@]}" build "${BUILD_FLAGS[@]}" "$@"
}

binary() {
    echo "target/x86_64-unknown-linux-gnu/release/$1"
}

ensure_seeds() {
    if [ ! -d "corpus/$1" ] || [ -z "$(ls -A "corpus/$1")" ]; then
        ../scripts/fuzz-seeds.sh
    fi
}

# Removes the scratch folders (fuzz_targets/scratch.rs) of fuzzing processes that ended.
cleanup_scratch() {
    local dir
    for dir in /dev/shm/cloudpdi-fuzz-* "${TMPDIR:-/tmp}"/cloudpdi-fuzz-*; do
        [ -d "$dir" ] || continue
        kill -0 "${dir##*-}" 2>/dev/null || rm -rf "$dir"
    done
}

# fuzz TARGET SECONDS: one libFuzzer process; prints a summary line.
fuzz() {
    local target=$1 seconds=$2 log status
    ensure_seeds "$target"
    mkdir -p "artifacts/$target" "logs"
    log=logs/$target.log
    local before
    before=$(ls "artifacts/$target" | wc -l)
    set +e
    "$(binary "$target")" "corpus/$target" \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" ${FUZZ_ARGS:-} >"$log" 2>&1
    status=$?
    set -e
    cleanup_scratch
    local execs rate crashes
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    crashes=$(($(ls "artifacts/$target" | wc -l) - before))
    printf '%-20s %8ss %12s execs %8s exec/s %3s crashes %s\n' "$target" "$seconds" \
        "${execs:-?}" "${rate:-?}" "$crashes" "$([ "$status" -eq 0 ] || echo "(see fuzz/$log)")"
    [ "$status" -eq 0 ]
}

regressions() {
    local failed=0 target input log
    mkdir -p logs
    for target in "${TARGETS[@]}"; do
        [ -d "regressions/$target" ] || continue
        for input in "regressions/$target"/*; do
            [ -f "$input" ] || continue
            case $input in *.md | *.txt) continue ;; esac
            log=logs/regression-$target-$(basename "$input").log
            if "$(binary "$target")" "$input" >"$log" 2>&1; then
                echo "ok      $input"
            else
                echo "CRASHES $input (see fuzz/$log)"
                failed=1
            fi
            cleanup_scratch
        done
    done
    return $failed
}

case ${1:-} in
    list) printf '%s\n' "${TARGETS[@]}" ;;
    build) build ;;
    seeds) ../scripts/fuzz-seeds.sh ;;
    regressions) build && regressions ;;
    smoke)
        build
        failed=0
        for target in "${TARGETS[@]}"; do fuzz "$target" 5 || failed=1; done
        exit $failed
        ;;
    all)
        [ -n "${2:-}" ] || { echo "usage: $0 all SECONDS" >&2; exit 2; }
        build
        failed=0
        for target in "${TARGETS[@]}"; do fuzz "$target" "$2" || failed=1; done
        exit $failed
        ;;
    "" | -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$self" ;;
    *)
        [ -n "${2:-}" ] || { echo "usage: $0 TARGET SECONDS" >&2; exit 2; }
        printf '%s\n' "${TARGETS[@]}" | grep -qx "$1" || { echo "no target $1 (see: $0 list)" >&2; exit 2; }
        build "$1"
        fuzz "$1" "$2"
        ;;
esac
