#!/usr/bin/env bash
# WAN benchmark (issue 15, item 4): a container uploaded to and downloaded from
# `cloudpdi repository serve` (TLS, local storage) over an emulated hospital link.
#
# This kernel has no netem, so the link is bench/wan/linkem.rs (built here with rustc):
# a userspace forwarder between two TUN devices, one in a client network namespace and
# one in a repository namespace, with a rate limit (token bucket, tail-drop queue of
# QUEUE_BDP bandwidth-delay products), a one-way delay and random loss per packet.
# For each loss rate the link is first checked (ping RTT, iperf3 one flow each way),
# then `cloudpdi repository upload` and `cloudpdi repository download` (the real client)
# move a random container of SIZE_MB across it.
# Efficiency = container bytes / (wall time of the command x link rate).
#
#   bench/wan/run.sh                                   # 250 MB, 100 Mbit/s, 20 ms, loss 0 and 0.5 %
#   LOSSES=0 SIZE_MB=100 bench/wan/run.sh              # quicker
#   PART_SIZES="8 32" bench/wan/run.sh                 # repository part_size_mb values to compare
#   BENCH_BIN=/path/to/cloudpdi bench/wan/run.sh       # another build (else: cargo build --release)
#   E2E=1 bench/wan/run.sh                             # also the whole pipeline (bench/e2e/inner.sh:
#                                                      # storescu -> site A -> repository -> site B ->
#                                                      # Orthanc, both sites in the client namespace)
#   TCP_CC=cubic bench/wan/run.sh                      # client and repository sockets with this
#                                                      # congestion control (LD_PRELOAD tcp_cc.c);
#                                                      # default: the machine's net.ipv4.tcp_congestion_control
# Needs root (network namespaces, TUN devices).
set -euo pipefail

SIZE_MB=${SIZE_MB:-250}
RATE_MBIT=${RATE_MBIT:-100}
DELAY_MS=${DELAY_MS:-20}
LOSSES=${LOSSES:-0 0.5}
PART_SIZES=${PART_SIZES:-8}
QUEUE_BDP=${QUEUE_BDP:-1}
VALIDATE=${VALIDATE:-1}
TCP_CC=${TCP_CC:-}
E2E=${E2E:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench/wan needs root (network namespaces, TUN devices)" >&2; exit 1; }
command -v iperf3 >/dev/null || apt-get install -y -q iperf3 >/dev/null
command -v ping >/dev/null || apt-get install -y -q iputils-ping >/dev/null
[ -x /usr/bin/time ] || apt-get install -y -q time >/dev/null
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release --locked --quiet --manifest-path "$ROOT/Cargo.toml"
  BENCH_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/cloudpdi"
fi
BIN=$BENCH_BIN

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/cloudpdi-bench-wan.XXXXXX")
NS_C=cpdiwanc$$
NS_R=cpdiwanr$$
LINK_PID=
SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=
}
link_down() {
  if [ -n "$LINK_PID" ]; then kill "$LINK_PID" 2>/dev/null || true; wait "$LINK_PID" 2>/dev/null || true; fi
  LINK_PID=
  ip netns del "$NS_C" 2>/dev/null || true
  ip netns del "$NS_R" 2>/dev/null || true
}
cleanup() { stop_server; link_down; rm -rf "$WORK"; }
trap cleanup EXIT

rustc -O --edition 2021 -o "$WORK/linkem" "$ROOT/bench/wan/linkem.rs"
CC_ENV=()
if [ -n "$TCP_CC" ]; then
  cc -O2 -shared -fPIC -o "$WORK/tcp_cc.so" "$ROOT/bench/wan/tcp_cc.c" -ldl
  CC_ENV=(LD_PRELOAD="$WORK/tcp_cc.so" BENCH_TCP_CC="$TCP_CC")
fi

# Bandwidth-delay product of the round trip, in bytes: the queue holds QUEUE_BDP of them.
QUEUE=$(python3 -c "print(int($QUEUE_BDP * $RATE_MBIT * 1e6 / 8 * 2 * $DELAY_MS / 1000) + 65536)")
link_up() { # $1: loss in percent
  ip netns add "$NS_C"
  ip netns add "$NS_R"
  "$WORK/linkem" wanc$$ wanr$$ "$RATE_MBIT" "$DELAY_MS" "$1" "$QUEUE" "$WORK/link.stats" >"$WORK/linkem.out" 2>&1 &
  LINK_PID=$!
  for _ in $(seq 50); do grep -q ready "$WORK/linkem.out" && break; sleep 0.1; done
  grep -q ready "$WORK/linkem.out" || { echo "link emulator: $(cat "$WORK/linkem.out")" >&2; exit 1; }
  ip link set wanc$$ netns "$NS_C"
  ip link set wanr$$ netns "$NS_R"
  ip -n "$NS_C" link set lo up
  ip -n "$NS_R" link set lo up
  ip -n "$NS_C" addr add 10.77.0.1 peer 10.77.0.2 dev wanc$$
  ip -n "$NS_R" addr add 10.77.0.2 peer 10.77.0.1 dev wanr$$
  ip -n "$NS_C" link set wanc$$ mtu 1500 up
  ip -n "$NS_R" link set wanr$$ mtu 1500 up
}
inc() { ip netns exec "$NS_C" env "${CC_ENV[@]}" "$@"; }
inr() { ip netns exec "$NS_R" env "${CC_ENV[@]}" "$@"; }

# TLS: a CA for this run, trusted by the client through SSL_CERT_FILE (the repository
# is another host, so plain http would be refused, as in a hospital).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=bench-wan-ca -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=10.77.0.2 \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:10.77.0.2\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 1 -extfile "$WORK/ext" -out "$WORK/server.crt" 2>/dev/null

read -r KEY HASH < <("$BIN" repository new-key | awk -F'[:"] *' 'NR==1{k=$2} NR==2{print k, $2}')
printf '%s' "$(echo "$KEY" | tr -d ' ')" >"$WORK/api-key"
chmod 600 "$WORK/api-key"
URL=https://10.77.0.2:8443
start_server() { # $1: part_size_mb
  rm -rf "$WORK/store"
  cat >"$WORK/repository.toml" <<CONF
[server]
listen = "10.77.0.2:8443"
max_document_mb = $((SIZE_MB + 64))
part_size_mb = $1
[tls]
cert = "$WORK/server.crt"
key = "$WORK/server.key"
[storage]
path = "$WORK/store"
[audit]
path = "$WORK/audit.jsonl"
[log]
level = "warn"
[facility.BENCH]
api_key_sha256 = "$HASH"
CONF
  inr "$BIN" repository serve --config "$WORK/repository.toml" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    inc curl -sf --cacert "$WORK/ca.crt" "$URL/healthz" >/dev/null && return
    sleep 0.1
  done
  echo "repository did not start: $(cat "$WORK/server.log")" >&2
  exit 1
}

echo "generating $SIZE_MB MiB of random data (a sealed container is incompressible)..."
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom >"$WORK/container"
BYTES=$(stat -c %s "$WORK/container")
SHA=$(sha256sum "$WORK/container" | cut -d' ' -f1)
now() { date +%s.%N; }
eff() { python3 -c "print(f'{$1 / (($3 - $2) * $RATE_MBIT * 1e6 / 8):.2f}')"; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }
rss() { awk '/Maximum resident/ {printf "%.0f", $6/1024}' "$1"; }

if [ "$E2E" = 1 ]; then
  python3 "$ROOT/scripts/gen_ct.py" "$WORK/study" --slices "${SLICES:-500}" >/dev/null
  STUDY_BYTES=$(cat "$WORK"/study/* | wc -c)
fi
rows=()
checks=()
e2e=()
for loss in $LOSSES; do
  link_up "$loss"
  if [ "$VALIDATE" = 1 ]; then
    rtt=$(inc ping -q -c 10 -i 0.2 10.77.0.2 | awk -F/ '/^rtt|^round-trip/ {print $5}')
    inr iperf3 -s -B 10.77.0.2 >/dev/null 2>&1 &
    iperf_pid=$!
    sleep 0.5
    iperf() { inc iperf3 -c 10.77.0.2 -t 10 -J "$@" | python3 -c 'import json,sys; j = json.load(sys.stdin); print("%.1f" % (j["end"]["sum_received"]["bits_per_second"] / 1e6))'; }
    up_bbr=$(iperf -C bbr); down_bbr=$(iperf -C bbr -R); up_cubic=$(iperf -C cubic); up_cubic4=$(iperf -C cubic -P 4)
    kill "$iperf_pid"; wait "$iperf_pid" 2>/dev/null || true
    checks+=("| $loss % | $rtt ms | $up_bbr / $down_bbr | $up_cubic | $up_cubic4 |")
  fi
  for part in $PART_SIZES; do
    start_server "$part"
    rm -f "$WORK/token" "$WORK/token2" "$WORK/down"
    "$BIN" token new --repository "$URL" --document-id 00000000000000000000 \
      --expires-in-days 1 --out "$WORK/token" >/dev/null
    # The congestion control the transfer's sockets really use, seen by ss after 2 s
    # (a shorter transfer shows "?").
    (sleep 2; ip netns exec "$NS_C" ss -tin dst 10.77.0.2) >"$WORK/ss.txt" 2>&1 &
    t0=$(now)
    inc env SSL_CERT_FILE="$WORK/ca.crt" /usr/bin/time -v -o "$WORK/up.time" "$BIN" repository upload \
      --url "$URL" --api-key-file "$WORK/api-key" --token "@$WORK/token" --token-out "$WORK/token2" \
      "$WORK/container" >"$WORK/up.log" 2>&1 || { echo "upload failed: $(tail -3 "$WORK/up.log")" >&2; exit 1; }
    t1=$(now)
    used=$({ grep -oE '\b(bbr|cubic|reno)\b' "$WORK/ss.txt" || true; } | sort -u | tr '\n' ' ')
    inc env SSL_CERT_FILE="$WORK/ca.crt" /usr/bin/time -v -o "$WORK/down.time" "$BIN" repository download \
      --token "@$WORK/token2" "$WORK/down" >"$WORK/down.log" 2>&1 || { echo "download failed: $(tail -3 "$WORK/down.log")" >&2; exit 1; }
    t2=$(now)
    [ "$(sha256sum "$WORK/down" | cut -d' ' -f1)" = "$SHA" ] || { echo "the download differs" >&2; exit 1; }
    rows+=("| $loss % | ${used:-? }| $part MiB | $(secs "$t0" "$t1") s | **$(eff "$BYTES" "$t0" "$t1")** | $(secs "$t1" "$t2") s | **$(eff "$BYTES" "$t1" "$t2")** | $(rss "$WORK/up.time") / $(rss "$WORK/down.time") MiB |")
    stop_server
  done
  if [ "$E2E" = 1 ]; then
    start_server "${PART_SIZES%% *}"
    mkdir -p "$WORK/e2e-$loss"
    ln -s "$WORK/study" "$WORK/e2e-$loss/study"
    (cd "$ROOT" && inc env BENCH_BIN="$BIN" SSL_CERT_FILE="$WORK/ca.crt" REPO_URL="$URL" \
      REPO_KEY_FILE="$WORK/api-key" bash bench/e2e/inner.sh "$WORK/e2e-$loss") >"$WORK/e2e.out" 2>&1 \
      || { echo "end to end failed: $(tail -5 "$WORK/e2e.out")" >&2; exit 1; }
    e2e+=("loss $loss %:" "$(grep -E '^(\(a\)|\(b\)| +(storescu|stable|token|B takes)|peak memory)' "$WORK/e2e.out")")
    stop_server
  fi
  echo "link counters, loss $loss %:"; cat "$WORK/link.stats"
  link_down
done

echo
echo "WAN: $RATE_MBIT Mbit/s, $DELAY_MS ms one way, queue $QUEUE bytes; $BYTES bytes; $("$BIN" --version 2>/dev/null || echo cloudpdi); $(git -C "$ROOT" rev-parse --short HEAD); machine's TCP congestion control $(cat /proc/sys/net/ipv4/tcp_congestion_control)${TCP_CC:+, sockets set to $TCP_CC}"
if [ "$VALIDATE" = 1 ]; then
  echo "| loss | ping RTT (avg) | iperf3 1 flow bbr up / down, Mbit/s | cubic 1 flow up | cubic 4 flows up |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${checks[@]}"
  echo
fi
echo "| loss | congestion control (upload, ss) | part size | upload | upload efficiency | download | download efficiency | client peak RSS up/down |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if [ "$E2E" = 1 ]; then
  echo
  echo "end to end over the link ($(ls "$WORK/study" | wc -l) instances, $STUDY_BYTES bytes; the study's bytes" \
    "once up and once down take $(python3 -c "print(f'{2 * $STUDY_BYTES * 8 / ($RATE_MBIT * 1e6):.1f}')") s at the link rate):"
  printf '%s\n' "${e2e[@]}"
fi
