#!/usr/bin/env bash
# Completion benchmark (issue 15 item 3): the time of `POST .../complete` for a document
# of SIZE_MB (default 256) in 8 MiB parts, with the first form ({"sha256"}: the server
# reads every part back and hashes it, as every completion did before) and with the parts
# form ({"size", "parts_sha256"}: the server reads the per-part hashes it recorded on
# arrival). Local files, or S3 (moto's server on loopback) with BACKEND=s3.
#
#   bench/repository/completion.sh
#   BACKEND=s3 SIZE_MB=256 bench/repository/completion.sh
#   BIN=target/debug/cloudpdi bench/repository/completion.sh   # skip the release build
set -euo pipefail

SIZE_MB=${SIZE_MB:-256}
BACKEND=${BACKEND:-local}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/cloudpdi-bench-complete.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/cloudpdi"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
read -r KEY HASH < <("$BIN" repository new-key | awk -F'[:"] *' 'NR==1{k=$2} NR==2{print k, $2}')
KEY=$(echo "$KEY" | tr -d ' ')
if [ "$BACKEND" = s3 ]; then
    S3_PORT=$(free_port)
    moto_server -H 127.0.0.1 -p "$S3_PORT" >/dev/null 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -s -X PUT "http://127.0.0.1:$S3_PORT/bench" >/dev/null && break; sleep 0.2; done
    STORAGE="backend = \"s3\"
bucket = \"bench\"
endpoint = \"http://127.0.0.1:$S3_PORT\"
allow_http = true
access_key_id = \"testing\"
secret_access_key = \"testing\""
else
    STORAGE="path = \"$WORK/store\""
fi
cat > "$WORK/repository.toml" <<CONF
[server]
listen = "127.0.0.1:$PORT"
max_document_mb = $((SIZE_MB + 16))
part_size_mb = 8
[storage]
$STORAGE
[audit]
path = "$WORK/audit.jsonl"
[log]
level = "warn"
[facility.BENCH]
api_key_sha256 = "$HASH"
CONF
"$BIN" repository serve --config "$WORK/repository.toml" &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "$URL/healthz" >/dev/null && break; sleep 0.1; done

echo "generating $SIZE_MB MiB of random data in 8 MiB parts..."
mkdir "$WORK/parts"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > "$WORK/container"
split -b 8M -d -a 4 "$WORK/container" "$WORK/parts/p"
BYTES=$(stat -c %s "$WORK/container")
read -r WHOLE DIGEST < <(python3 - "$WORK/container" "$WORK/parts" <<'PY'
import hashlib, os, sys
whole = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
outer = hashlib.sha256()
for name in sorted(os.listdir(sys.argv[2])):
    outer.update(hashlib.sha256(open(os.path.join(sys.argv[2], name), "rb").read()).digest())
print(whole, outer.hexdigest())
PY
)

AUTH="Authorization: Bearer $KEY"
EXPIRES=$(( $(date +%s) + 3600 ))
PROOF=$(printf '%064d' 0)
create() {  # $1: the size member, or nothing for a streamed document
    curl -sf -H "$AUTH" -H 'Content-Type: application/json' \
        --data "{${1}\"expires_at\":$EXPIRES,\"max_downloads\":1,\"proof_hash\":\"$PROOF\"}" \
        "$URL/v1/documents" | python3 -c 'import json,sys; print(json.load(sys.stdin)["document_id"])'
}
upload() {  # $1: document ID; 4 parts at once
    ls "$WORK/parts" | awk '{printf "%s %d\n", $1, NR-1}' | xargs -P 4 -n 2 sh -c \
        'curl -sf -o /dev/null -X PUT -H "$0" --data-binary @"$1/$4" "$2/v1/documents/$3/parts/$5"' \
        "$AUTH" "$WORK/parts" "$URL" "$1"
}
complete() {  # $1: document ID, $2: body; prints seconds
    local t0 t1
    t0=$(date +%s.%N)
    curl -sf -o /dev/null -H "$AUTH" -H 'Content-Type: application/json' --data "$2" \
        "$URL/v1/documents/$1/complete"
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}

SIZED=$(create "\"size\":$BYTES,")
upload "$SIZED"
OLD=$(complete "$SIZED" "{\"sha256\":\"$WHOLE\"}")
STREAMED=$(create "")
upload "$STREAMED"
NEW=$(complete "$STREAMED" "{\"size\":$BYTES,\"parts_sha256\":\"$DIGEST\"}")
PARTS=$(ls "$WORK/parts" | wc -l)
echo
echo "completion of $SIZE_MB MiB ($PARTS parts), storage $BACKEND:"
echo "  whole SHA-256 (parts read back): $OLD s"
echo "  parts digest (hash records):     $NEW s"
