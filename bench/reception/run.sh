#!/usr/bin/env bash
# Reception benchmark: DCMTK storescu -> `cloudpdi serve` (fsync + index per instance)
# against DCMTK storescu -> DCMTK storescp (writing to disk, no fsync), same study, same
# run, on loopback inside a private network namespace (storescp cannot bind loopback
# only). Prints instances/s for both and the ratio. Needs root (unshare --net).
#
#   bench/reception/run.sh            # 500 slices, 3 rounds
#   SLICES=200 ROUNDS=5 bench/reception/run.sh
#   BENCH_BIN=/path/to/other/cloudpdi bench/reception/run.sh   # another build, e.g. before a change
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -n "${BENCH_BIN:-}" ] || cargo build --release --locked --quiet
export BENCH_BIN="${BENCH_BIN:-}"
work=$(mktemp -d /var/tmp/cloudpdi-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 scripts/gen_ct.py "$work/study" --slices "${SLICES:-500}" >/dev/null
unshare --net bash bench/reception/inner.sh "$work" "${ROUNDS:-3}"
