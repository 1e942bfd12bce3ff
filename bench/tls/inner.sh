#!/usr/bin/env bash
# Runs inside `unshare --net` (only `lo`): see run.sh.
set -euo pipefail
work=$1 rounds=$2
ip link set lo up
files=("$work"/study/*.dcm)
n=${#files[@]}
bin=${BENCH_BIN:-target/release/cloudpdi}
# DCMTK on Debian leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment.
export TCP_NODELAY=1
client_tls=(+tls "$work/client.key" "$work/client.pem" +cf "$work/ca.pem")

source "$(dirname "$0")/../lib.sh"

# $1: plain or tls
storescp_round() {
  rm -rf "$work/scp" && mkdir -p "$work/scp"
  local server=() client=() port=11113
  if [ "$1" = tls ]; then
    server=(+tls "$work/server.key" "$work/server.pem" +cf "$work/ca.pem") client=("${client_tls[@]}") port=11114
  fi
  # The port probe below is one failed association for storescp: its log is kept aside.
  /usr/bin/storescp "${server[@]}" -od "$work/scp" $port 2>>"$work/storescp.log" & local pid=$!
  wait_port $port
  local t0; t0=$(now)
  /usr/bin/storescu "${client[@]}" -aec STORESCP 127.0.0.1 $port "${files[@]}"
  local t1; t1=$(now)
  kill $pid; wait $pid 2>/dev/null || true
  [ "$(ls "$work/scp" | wc -l)" -eq "$n" ] || { echo "storescp ($1) stored $(ls "$work/scp" | wc -l)/$n" >&2; exit 1; }
  echo "$t1 - $t0" | bc -l
}

cloudpdi_round() {
  rm -rf "$work/gw" && mkdir -p "$work/gw"
  gateway_config "$work/gw" "[dicom.tls]
listen = \"127.0.0.1:2762\"
certificate = \"$work/server.pem\"
key = \"$work/server.key\"
client_ca = \"$work/ca.pem\""
  $bin serve --config "$work/gw/c.toml" & local pid=$!
  wait_port 11180
  local client=() port=11112
  if [ "$1" = tls ]; then client=("${client_tls[@]}") port=2762; fi
  local t0; t0=$(now)
  /usr/bin/storescu "${client[@]}" -aec CLOUDPDI 127.0.0.1 $port "${files[@]}"
  local t1; t1=$(now)
  local stored; stored=$(stored_instances "$bin")
  kill $pid; wait $pid || true
  [ "$stored" -eq "$n" ] || { echo "cloudpdi ($1) stored $stored/$n" >&2; exit 1; }
  echo "$t1 - $t0" | bc -l
}

echo "study: $n instances, $(du -sh "$work/study" | cut -f1); rounds: $rounds (median reported); DCMTK with TCP_NODELAY=1"
gw_plain=() gw_tls=() scp_plain=() scp_tls=()
for _ in $(seq "$rounds"); do
  gw_plain+=("$(cloudpdi_round plain)")
  gw_tls+=("$(cloudpdi_round tls)")
  scp_plain+=("$(storescp_round plain)")
  scp_tls+=("$(storescp_round tls)")
done
line() { printf '  %-28s: %7.3f s %8.1f instances/s  (runs: %s)\n' "$1" "$2" "$(echo "$n / $2" | bc -l)" "$3"; }
for who in cloudpdi storescp; do
  if [ $who = cloudpdi ]; then plain=$(median "${gw_plain[@]}") tls=$(median "${gw_tls[@]}") rp="${gw_plain[*]}" rt="${gw_tls[*]}"
  else plain=$(median "${scp_plain[@]}") tls=$(median "${scp_tls[@]}") rp="${scp_plain[*]}" rt="${scp_tls[*]}"; fi
  echo "storescu -> $who:"
  line "plain" "$plain" "$rp"
  line "TLS" "$tls" "$rt"
  printf '  TLS/plain throughput: %.2f (TLS costs %.1f%%)\n' "$(echo "$plain / $tls" | bc -l)" "$(echo "($tls - $plain) / $tls * 100" | bc -l)"
done
