#!/usr/bin/env bash
# Repository transfer benchmark: a 1 GiB container uploaded to and downloaded from
# `cloudpdi repository serve` (local storage, loopback) with our client
# (`cloudpdi repository upload|download`) and with curl against the same server,
# plus a plain file copy of the same file. Prints MB/s, ratios and the client's peak RSS.
#
#   bench/repository/run.sh            # 1 GiB
#   SIZE_MB=256 bench/repository/run.sh
set -euo pipefail

SIZE_MB=${SIZE_MB:-1024}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/cloudpdi-bench-repo.XXXXXX")
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

[ -x /usr/bin/time ] || { apt-get install -y -q time >/dev/null; }
[ -x /usr/bin/curl ] || { apt-get install -y -q curl >/dev/null; }

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/cloudpdi"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
read -r KEY HASH < <("$BIN" repository new-key | awk -F'[:"] *' 'NR==1{k=$2} NR==2{print k, $2}')
KEY=$(echo "$KEY" | tr -d ' ')
printf '%s' "$KEY" > "$WORK/api-key"
cat > "$WORK/repository.toml" <<CONF
[server]
listen = "127.0.0.1:$PORT"
max_document_mb = $((SIZE_MB + 16))
[storage]
path = "$WORK/store"
[audit]
path = "$WORK/audit.jsonl"
[log]
level = "warn"
[facility.BENCH]
api_key_sha256 = "$HASH"
CONF
"$BIN" repository serve --config "$WORK/repository.toml" &
SERVER_PID=$!
for _ in $(seq 100); do curl -sf "$URL/healthz" >/dev/null && break; sleep 0.1; done

echo "generating $SIZE_MB MiB of random data..."
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > "$WORK/container"
BYTES=$(stat -c %s "$WORK/container")
SHA=$(sha256sum "$WORK/container" | cut -d' ' -f1)

now() { date +%s.%N; }
mbps() { python3 -c "print(f'{$BYTES / ($2 - $1) / 1e6:.0f}')"; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
rss() { awk '/Maximum resident/ {printf "%.0f", $6/1024}' "$1"; }

# Plain file copy (page cache to page cache, then synced, as the server syncs parts).
sync
t0=$(now); cp "$WORK/container" "$WORK/copy"; sync "$WORK/copy"; t1=$(now)
COPY_S=$(secs "$t0" "$t1"); COPY_MBS=$(mbps "$t0" "$t1")
rm -f "$WORK/copy"

# Our client.
"$BIN" token new --repository "$URL" --document-id 00000000000000000000 \
    --expires-in-days 1 --out "$WORK/token" >/dev/null
t0=$(now)
/usr/bin/time -v -o "$WORK/up.time" "$BIN" repository upload --url "$URL" \
    --api-key-file "$WORK/api-key" --token "@$WORK/token" --token-out "$WORK/token2" \
    "$WORK/container" >/dev/null 2>&1
t1=$(now)
OURS_UP_S=$(secs "$t0" "$t1"); OURS_UP=$(mbps "$t0" "$t1"); OURS_UP_RSS=$(rss "$WORK/up.time")
t0=$(now)
/usr/bin/time -v -o "$WORK/down.time" "$BIN" repository download --token "@$WORK/token2" \
    "$WORK/ours.out" >/dev/null 2>&1
t1=$(now)
OURS_DOWN_S=$(secs "$t0" "$t1"); OURS_DOWN=$(mbps "$t0" "$t1"); OURS_DOWN_RSS=$(rss "$WORK/down.time")
[ "$(sha256sum "$WORK/ours.out" | cut -d' ' -f1)" = "$SHA" ] || { echo "our download differs"; exit 1; }
rm -f "$WORK/ours.out"

# curl: the same API by hand. Parts are cut beforehand (not timed); the SHA-256 for
# complete is computed beforehand too (our client hashes while it sends).
PROOF=$(openssl rand -hex 32)
PROOF_HASH=$(printf '%s' "$PROOF" | xxd -r -p | sha256sum | cut -d' ' -f1)
EXPIRES=$(( $(date +%s) + 3600 ))
CREATED=$(curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    --data "{\"size\":$BYTES,\"expires_at\":$EXPIRES,\"max_downloads\":3,\"proof_hash\":\"$PROOF_HASH\"}" \
    "$URL/v1/documents")
ID=$(echo "$CREATED" | python3 -c 'import json,sys; print(json.load(sys.stdin)["document_id"])')
PART=$(echo "$CREATED" | python3 -c 'import json,sys; print(json.load(sys.stdin)["part_size"])')
mkdir "$WORK/parts"
split -a 6 -d -b "$PART" "$WORK/container" "$WORK/parts/p"
: > "$WORK/curl.cfg"
n=0
for f in "$WORK"/parts/p*; do
    printf 'upload-file = "%s"\nurl = "%s/v1/documents/%s/parts/%d"\n' "$f" "$URL" "$ID" "$n" >> "$WORK/curl.cfg"
    n=$((n + 1))
done
sync
t0=$(now)
curl -sf -H "Authorization: Bearer $KEY" --config "$WORK/curl.cfg" >/dev/null
curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    --data "{\"sha256\":\"$SHA\"}" "$URL/v1/documents/$ID/complete" >/dev/null
t1=$(now)
CURL_UP_S=$(secs "$t0" "$t1"); CURL_UP=$(mbps "$t0" "$t1")
rm -rf "$WORK/parts"
t0=$(now)
curl -sf -H "x-download-proof: $PROOF" -o "$WORK/curl.out" "$URL/v1/documents/$ID/content"
sync "$WORK/curl.out"
t1=$(now)
CURL_DOWN_S=$(secs "$t0" "$t1"); CURL_DOWN=$(mbps "$t0" "$t1")
[ "$(sha256sum "$WORK/curl.out" | cut -d' ' -f1)" = "$SHA" ] || { echo "curl download differs"; exit 1; }

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
echo "repository transfer, $SIZE_MB MiB, loopback, local storage, $(git -C "$ROOT" rev-parse --short HEAD)"
echo "| | upload | download | client peak RSS (up/down) |"
echo "|---|---|---|---|"
echo "| plain file copy (cp + sync) | $COPY_S s, $COPY_MBS MB/s | | |"
echo "| curl | $CURL_UP_S s, $CURL_UP MB/s | $CURL_DOWN_S s, $CURL_DOWN MB/s | |"
echo "| cloudpdi client | $OURS_UP_S s, $OURS_UP MB/s | $OURS_DOWN_S s, $OURS_DOWN MB/s | $OURS_UP_RSS / $OURS_DOWN_RSS MiB |"
echo "| client / curl | $(ratio "$OURS_UP" "$CURL_UP") | $(ratio "$OURS_DOWN" "$CURL_DOWN") | |"
echo "| client / copy | $(ratio "$OURS_UP" "$COPY_MBS") | $(ratio "$OURS_DOWN" "$COPY_MBS") | |"
