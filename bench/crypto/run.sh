#!/usr/bin/env bash
# Container throughput against OpenSSL's AES-256-GCM on the same machine, in one run:
# `openssl speed -evp aes-256-gcm` (1 MiB blocks, one core) and cloudpdi's streaming
# seal/open of 1 GiB (1 MiB chunks, one core), plus zstd+seal on a generated CT study.
#
#   bench/crypto/run.sh            # 200-slice CT for the zstd figure
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 scripts/gen_ct.py "$work/ct" --slices "${SLICES:-200}" >/dev/null
ours=$(cargo bench --locked --quiet --bench container -- "$work/ct" 2>/dev/null)
echo "$ours"
openssl_mbs=$(openssl speed -evp aes-256-gcm -bytes 1048576 -seconds 3 2>/dev/null \
  | awk 'tolower($1) == "aes-256-gcm" {sub(/k$/, "", $2); printf "%.0f", $2 * 1000 / 1e6}')
echo "openssl aes-256-gcm 1 core (1 MiB blocks): ${openssl_mbs} MB/s"
seal=$(echo "$ours" | awk '/seal 1 core/ {print $5}')
open=$(echo "$ours" | awk '/open 1 core/ {print $5}')
printf 'ratio seal/openssl: %.2f   open/openssl: %.2f\n' \
  "$(echo "$seal / $openssl_mbs" | bc -l)" "$(echo "$open / $openssl_mbs" | bc -l)"
