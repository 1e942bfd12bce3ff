#!/usr/bin/env bash
# DICOM TLS benchmark: DCMTK storescu -> `cloudpdi serve` over TLS (its [dicom.tls]
# listener, client certificate required) against the same over its plain listener, and
# DCMTK storescu -> DCMTK storescp plain and `+tls` as the peer reference; same study,
# same run, rounds interleaved, on loopback inside a private network namespace (storescp
# cannot bind loopback only). Certificates (EC P-256) are made with openssl for the run.
# Prints instances/s and the TLS/plain throughput ratio of each receiver. Needs root.
#
#   bench/tls/run.sh            # 500 slices, 3 rounds
#   SLICES=200 ROUNDS=5 bench/tls/run.sh
#   BENCH_BIN=/path/to/cloudpdi bench/tls/run.sh   # a build made elsewhere
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -n "${BENCH_BIN:-}" ] || cargo build --release --locked --quiet
export BENCH_BIN="${BENCH_BIN:-}"
work=$(mktemp -d /var/tmp/cloudpdi-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 scripts/gen_ct.py "$work/study" --slices "${SLICES:-500}" >/dev/null
(
  cd "$work"
  ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "$@" 2>/dev/null; }
  ec -x509 -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA"
  for name in server client; do
    ec -keyout $name.key -out $name.csr -subj "/CN=$name"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > $name.ext
    openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile $name.ext -out $name.pem 2>/dev/null
  done
)
unshare --net bash bench/tls/inner.sh "$work" "${ROUNDS:-3}"
