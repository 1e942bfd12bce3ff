#!/usr/bin/env bash
# Container throughput against OpenSSL's AES-256-GCM on the same machine, in one run:
# `openssl speed -evp aes-256-gcm` (1 MiB blocks) on one core and on all cores
# (`-elapsed -multi N`), cloudpdi's streaming seal/open of 1 GiB (1 MiB chunks) on one
# core and on all cores, the aes-gcm crate's bare loop, and zstd + seal/open of a
# generated CT study. ROUNDS rounds interleave openssl and cloudpdi; the best figure of
# each line is reported (on a shared machine the best round is the least disturbed).
# One-core figures divide by CPU time (openssl's default, the bench's thread CPU time),
# all-core figures by wall-clock time.
#
#   bench/crypto/run.sh                       # 200-slice CT, 3 rounds
#   SLICES=500 ROUNDS=5 bench/crypto/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cores=$(nproc)
python3 scripts/gen_ct.py "$work/ct" --slices "${SLICES:-200}" >/dev/null
cargo bench --locked --quiet --bench container --no-run 2>/dev/null

openssl_mbs() { # MB/s of `openssl speed` with the given extra options
  openssl speed "$@" -evp aes-256-gcm -bytes 1048576 -seconds 3 2>/dev/null \
    | awk 'tolower($1) == "aes-256-gcm" {sub(/k$/, "", $2); printf "%.0f", $2 * 1000 / 1e6}'
}
echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg), cores: $cores"
for _ in $(seq "${ROUNDS:-3}"); do
  echo "openssl aes-256-gcm 1 cores: $(openssl_mbs) MB/s"
  cargo bench --locked --quiet --bench container -- "$work/ct" 2>/dev/null
  echo "openssl aes-256-gcm ${cores} cores: $(openssl_mbs -elapsed -multi "$cores") MB/s"
done >"$work/rounds"
# Best of the rounds per line (the ratio line of zstd is the same every round).
best=$(awk -F': ' '{v = $2 + 0; if (!($1 in b) || v > b[$1]) {b[$1] = v; l[$1] = $0}; if (!($1 in o)) o[$1] = n++}
  END {for (k in o) print o[k] "\t" l[k]}' "$work/rounds" | sort -n | cut -f2-)
echo "$best"
figure() { echo "$best" | awk -F': ' -v what="$1" '$1 == what {print $2 + 0}'; }
ratio() { echo "$(figure "$1") / $(figure "$2")" | bc -l | xargs printf '%.2f'; }
one="openssl aes-256-gcm 1 cores"
all="openssl aes-256-gcm ${cores} cores"
echo "ratios 1 core:  seal $(ratio 'cloudpdi seal 1 cores' "$one")," \
  "open $(ratio 'cloudpdi open 1 cores' "$one"), bare aes-gcm loop $(ratio 'aes-gcm bare loop 1 core' "$one")"
echo "ratios ${cores} cores: seal $(ratio "cloudpdi seal ${cores} cores" "$all")," \
  "open $(ratio "cloudpdi open ${cores} cores" "$all")"
echo "scaling ${cores} cores / 1 core: seal $(ratio "cloudpdi seal ${cores} cores" 'cloudpdi seal 1 cores')," \
  "open $(ratio "cloudpdi open ${cores} cores" 'cloudpdi open 1 cores'), openssl $(ratio "$all" "$one")"
