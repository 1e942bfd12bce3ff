#!/usr/bin/env bash
# Compression of the outbound container (issue 15, item 1): is zstd the bottleneck?
# The PDI ZIP of a generated CT (`cloudpdi pdi build`) is compressed in memory by the zstd
# CLI's benchmark mode (`zstd -b`, same libzstd family as the zstd crate) at each level
# of LEVELS, with 1 and 2 worker threads (-T1, -T2), giving speed and ratio; then, for
# reference, `cloudpdi encrypt` (AES-256-GCM container, all cores) of the same ZIP
# without and with --zstd (the container's default level), page cache warm, output in
# the same folder.
#
#   bench/compression/run.sh                       # 500 slices, levels 1..3
#   SLICES=200 LEVELS="1 3" bench/compression/run.sh
#   BENCH_BIN=/path/to/cloudpdi bench/compression/run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
command -v zstd >/dev/null || apt-get install -y -q zstd >/dev/null
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release --locked --quiet --manifest-path "$ROOT/Cargo.toml"
  BENCH_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/cloudpdi"
fi
work=$(mktemp -d "${TMPDIR:-/var/tmp}/cloudpdi-bench-zstd.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 "$ROOT/scripts/gen_ct.py" "$work/ct" --slices "${SLICES:-500}" >/dev/null
"$BENCH_BIN" pdi build "$work/ct" --out "$work/set.zip" >/dev/null
bytes=$(stat -c %s "$work/set.zip")
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; $("$BENCH_BIN" --version); $(zstd --version)"
echo "PDI ZIP of ${SLICES:-500} generated CT slices: $bytes bytes"
echo
echo "| zstd level | threads | ratio | compress MB/s | decompress MB/s |"
echo "|---|---|---|---|---|"
for level in ${LEVELS:-1 2 3}; do
  for threads in 1 2; do
    # zstd -q -b prints e.g. "-1    150659950 (1.748) 229.90 MB/s 1165.4 MB/s  set.zip"
    zstd -q -b"$level" -T"$threads" -i3 "$work/set.zip" 2>&1 | tr '\r' '\n' \
      | awk -v l="$level" -v t="$threads" '$1 == "-" l {gsub(/[()]/, "", $3); r = "| " l " | " t " | " $3 " | " $4 " | " $6 " |"} END {print r}'
  done
done

"$BENCH_BIN" token new --repository https://repository.invalid --document-id 00000000000000000000 \
  --expires-in-days 1 --out "$work/token" >/dev/null
cat "$work/set.zip" >/dev/null
now() { date +%s.%N; }
seal() { # $@: extra options of cloudpdi encrypt
  rm -f "$work/out"
  local t0 t1
  t0=$(now)
  "$BENCH_BIN" encrypt --token "@$work/token" "$@" "$work/set.zip" "$work/out" >/dev/null
  t1=$(now)
  python3 -c "b=$bytes; o=$(stat -c %s "$work/out"); t=$t1-$t0; print(f'{t:.2f} s, {b/t/1e6:.0f} MB/s of ZIP, container {o} bytes (ratio {b/o:.2f})')"
}
echo
echo "cloudpdi encrypt (seal only, all cores):       $(seal)"
echo "cloudpdi encrypt --zstd (zstd + seal, all cores): $(seal --zstd)"
