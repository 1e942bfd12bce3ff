#!/usr/bin/env bash
# End-to-end benchmark (issues 6 and 15): for one generated CT study, in one run,
#  (a) DCMTK storescu (TCP_NODELAY=1) straight into Orthanc (the best one machine can do), and
#  (b) storescu -> site A (cloudpdi serve) -> embedded repository -> site B -> Orthanc:
#      the durable ingest at site A plus the time from the batch taken by the outbound
#      pipeline to the last instance in Orthanc; the stable wait (route stable_after,
#      STABLE_AFTER seconds, default 1) is measured apart and excluded. Each step is
#      printed, and the peak memory (VmHWM) of both daemons during the transfer.
# Runs inside a private network namespace (Orthanc cannot bind loopback only): needs root.
# Usage: bench/e2e/run.sh            (500 slices)
#        SLICES=200 bench/e2e/run.sh
#        STABLE_AFTER=2 bench/e2e/run.sh
#        BENCH_LOGS=/tmp/e2e-logs bench/e2e/run.sh   # keep both daemons' logs
#        BENCH_PERF=/tmp/e2e.perf bench/e2e/run.sh   # perf record of both sites and Orthanc during the transfer
#        BENCH_BIN=/path/to/other/cloudpdi bench/e2e/run.sh   # another build, e.g. before a change
#        COMPRESS=true bench/e2e/run.sh   # the route compresses (the shipped default)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release --quiet
fi
work=$(mktemp -d /tmp/cloudpdi-bench-e2e.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 scripts/gen_ct.py "$work/study" --slices "${SLICES:-500}" >/dev/null
# Not `exec`: the trap must run to remove the 1.3 GB of a 500-slice run.
unshare --net bash bench/e2e/inner.sh "$work"
