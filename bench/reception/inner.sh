#!/usr/bin/env bash
# Runs inside `unshare --net` (only `lo`): see run.sh.
set -euo pipefail
work=$1 rounds=$2
ip link set lo up
files=("$work"/study/*.dcm)
n=${#files[@]}
bin=${BENCH_BIN:-target/release/cloudpdi}

source "$(dirname "$0")/../lib.sh"

# DCMTK on Debian leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment;
# $1 is "nagle" (Debian default) or "nodelay" for both DCMTK tools.
dcmtk_env() { if [ "$1" = nodelay ]; then echo TCP_NODELAY=1; else echo TCP_NODELAY_UNSET=1; fi; }

storescp_round() {
  rm -rf "$work/scp" && mkdir -p "$work/scp"
  env "$(dcmtk_env "$1")" /usr/bin/storescp -od "$work/scp" 11113 & local pid=$!
  sleep 0.3
  local t0; t0=$(now)
  env "$(dcmtk_env "$1")" /usr/bin/storescu -aec STORESCP 127.0.0.1 11113 "${files[@]}"
  local t1; t1=$(now)
  kill $pid; wait $pid 2>/dev/null || true
  [ "$(ls "$work/scp" | wc -l)" -eq "$n" ] || { echo "storescp stored $(ls "$work/scp" | wc -l)/$n" >&2; exit 1; }
  echo "$t1 - $t0" | bc -l
}

cloudpdi_round() {
  rm -rf "$work/gw" && mkdir -p "$work/gw"
  gateway_config "$work/gw" ""
  $bin serve --config "$work/gw/c.toml" & local pid=$!
  wait_port 11180
  local t0; t0=$(now)
  env "$(dcmtk_env "$1")" /usr/bin/storescu -aec CLOUDPDI 127.0.0.1 11112 "${files[@]}"
  local t1; t1=$(now)
  local stored; stored=$(stored_instances "$bin")
  kill $pid; wait $pid || true
  [ "$stored" -eq "$n" ] || { echo "cloudpdi stored $stored/$n" >&2; exit 1; }
  echo "$t1 - $t0" | bc -l
}

echo "study: $n instances, $(du -sh "$work/study" | cut -f1); rounds: $rounds (median reported)"
for mode in nagle nodelay; do
  scp_times=() gw_times=()
  for _ in $(seq "$rounds"); do
    scp_times+=("$(storescp_round $mode)")
    gw_times+=("$(cloudpdi_round $mode)")
  done
  scp=$(median "${scp_times[@]}") gw=$(median "${gw_times[@]}")
  echo "DCMTK with $mode:"
  printf '  storescu -> storescp : %7.3f s %8.1f instances/s  (runs: %s)\n' "$scp" "$(echo "$n / $scp" | bc -l)" "${scp_times[*]}"
  printf '  storescu -> cloudpdi : %7.3f s %8.1f instances/s  (runs: %s)\n' "$gw" "$(echo "$n / $gw" | bc -l)" "${gw_times[*]}"
  printf '  ratio cloudpdi/storescp throughput: %.2f\n' "$(echo "$scp / $gw" | bc -l)"
done
