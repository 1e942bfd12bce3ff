#!/usr/bin/env bash
# PDI ZIP of a generated CT study: `cloudpdi pdi build --out set.zip` against DCMTK
# `dcmmkdir` on the same files (already copied to conformant File IDs, which is not timed)
# plus `zip -0 -r`, in one run. ROUNDS rounds alternate the two; the median of each is
# reported with the ratio. Then peak memory (max RSS, GNU time) of `cloudpdi pdi build`
# for SLICES and BIG_SLICES, to show it does not grow with the study, and for MANY small
# (32x32) instances, to show what is left per instance.
#
#   bench/pdi/run.sh                          # 500 and 2000 slices, 20 000 small, 3 rounds
#   SLICES=200 BIG_SLICES=800 MANY=5000 ROUNDS=5 bench/pdi/run.sh
#   BENCH_BIN=/path/to/other/cloudpdi bench/pdi/run.sh   # another build, e.g. before a change
set -euo pipefail
cd "$(dirname "$0")/../.."
slices=${SLICES:-500}
big=${BIG_SLICES:-2000}
many=${MANY:-20000}
rounds=${ROUNDS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  cargo build --release --locked --quiet
  bin=$PWD/target/release/cloudpdi
  [ -n "${CARGO_TARGET_DIR:-}" ] && bin=$CARGO_TARGET_DIR/release/cloudpdi
fi
for tool in /usr/bin/dcmmkdir /usr/bin/zip /usr/bin/time; do
  [ -x "$tool" ] || { echo "missing $tool: run scripts/test.sh" >&2; exit 1; }
done

python3 scripts/gen_ct.py "$work/ct" --slices "$slices" >/dev/null
mkdir -p "$work/disc/DICOM"
i=0
for f in "$work"/ct/*.dcm; do i=$((i + 1)); cp "$f" "$work/disc/DICOM/IM$i"; done
sync

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }
: >"$work/ours"; : >"$work/dcmtk"
for _ in $(seq "$rounds"); do
  rm -f "$work/set.zip"
  t0=$(now); "$bin" pdi build "$work/ct" --out "$work/set.zip" >/dev/null; t1=$(now)
  python3 -c "print($t1 - $t0)" >>"$work/ours"
  rm -f "$work/disc/DICOMDIR" "$work/dcmtk.zip"
  t0=$(now)
  (cd "$work/disc" && /usr/bin/dcmmkdir -q +r DICOM && /usr/bin/zip -q -0 -r "$work/dcmtk.zip" DICOMDIR DICOM)
  t1=$(now)
  python3 -c "print($t1 - $t0)" >>"$work/dcmtk"
done
ours=$(median <"$work/ours")
dcmtk=$(median <"$work/dcmtk")
size=$(du -m "$work/set.zip" | cut -f1)
echo "study: $slices slices, ZIP ${size} MB, $rounds rounds (median)"
echo "cloudpdi pdi build --out set.zip: ${ours} s"
echo "dcmmkdir + zip -0:                 ${dcmtk} s"
echo "speed-up (dcmtk / cloudpdi):       $(python3 -c "print(round($dcmtk / $ours, 2))")x"

rss() { # max RSS in MiB of cloudpdi pdi build on a study of $1 slices (gen_ct options after)
  rm -rf "$work/rss" "$work/rss.zip"
  python3 scripts/gen_ct.py "$work/rss" --slices "$@" >/dev/null
  /usr/bin/time -f %M "$bin" pdi build "$work/rss" --out "$work/rss.zip" 2>&1 >/dev/null \
    | tail -1 | awk '{printf "%.1f", $1 / 1024}'
}
echo "max RSS, $slices slices:  $(rss "$slices") MiB"
echo "max RSS, $big slices: $(rss "$big") MiB"
echo "max RSS, $many small (32x32) instances: $(rss "$many" --matrix 32) MiB"
