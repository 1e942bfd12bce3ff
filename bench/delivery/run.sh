#!/usr/bin/env bash
# Sealed delivery latency (issue 13): from the token issued at site A to the fetch of the
# sealed token from site B's mailbox, at the default mailbox_poll_interval (30 s) unless
# POLL is given. A standalone `cloudpdi repository serve` knows HOSPA and HOSPB (API keys,
# public keys from `cloudpdi facility keygen`); site A routes with deliver_to = ["HOSPB"],
# site B reads its mailbox with accept_from = ["HOSPA"] (its PACS is DCMTK storescp).
# Each round waits a random part of the poll interval, then sends one small CT to A
# (2 slices); the figures come from the logs: A's "token issued"
# line, the repository's audit events (post, fetch) and B's "sealed token taken" line.
# Usage: bench/delivery/run.sh                 (5 rounds, poll 30 s)
#        ROUNDS=10 POLL=5 bench/delivery/run.sh
#        BENCH_BIN=/path/to/cloudpdi bench/delivery/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release --quiet
fi
bin=${BENCH_BIN:-$PWD/target/release/cloudpdi}
rounds=${ROUNDS:-5}
poll=${POLL:-30}
work=$(mktemp -d /tmp/cloudpdi-bench-delivery.XXXXXX)
started=()
trap 'kill "${started[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

facility() { # $1: code -> $work/$1.key, $work/$1.api-key, $work/$1.hash, $work/$1.pub, $work/$1.fp
  "$bin" facility keygen --out "$work/$1.key" >"$work/$1.keygen"
  grep -o 'x25519:[A-Za-z0-9_-]*' "$work/$1.keygen" >"$work/$1.pub"
  sed -n 's/^fingerprint: *//p' "$work/$1.keygen" >"$work/$1.fp"
  "$bin" repository new-key >"$work/$1.newkey"
  sed -n 's/.*shown once): *//p' "$work/$1.newkey" >"$work/$1.api-key"
  grep '^api_key_sha256' "$work/$1.newkey" >"$work/$1.hash"
}
facility HOSPA
facility HOSPB

hub=$(port)
cat >"$work/repository.toml" <<TOML
[server]
listen = "127.0.0.1:$hub"
[storage]
path = "$work/store"
[audit]
path = "$work/audit.jsonl"
[facility.HOSPA]
name = "Hospital A"
$(cat "$work/HOSPA.hash")
public_key = "$(cat "$work/HOSPA.pub")"
[facility.HOSPB]
name = "Hospital B"
$(cat "$work/HOSPB.hash")
public_key = "$(cat "$work/HOSPB.pub")"
TOML
"$bin" repository serve --config "$work/repository.toml" >"$work/repository.log" 2>&1 &
started+=("$!")
for i in $(seq 200); do curl -s "http://127.0.0.1:$hub/" >/dev/null && break; sleep 0.05; done

pacs=$(port)
mkdir -p "$work/pacs"
/usr/bin/storescp -aet PACS -od "$work/pacs" "$pacs" >"$work/pacs.log" 2>&1 &
started+=("$!")

site() { # $1: code, $2: other code, $3: extra TOML -> sets admin_$1, dicom_$1
  local dicom admin
  dicom=$(port); admin=$(port)
  mkdir -p "$work/$1"
  cat >"$work/$1/c.toml" <<TOML
[dicom]
listen = "127.0.0.1:$dicom"
[spool]
data_dir = "$work/$1/data"
min_free_mb = 0
[admin]
listen = "127.0.0.1:$admin"
[repository]
url = "http://127.0.0.1:$hub"
api_key_file = "$work/$1.api-key"
[facility]
code = "$1"
key_file = "$work/$1.key"
[facilities.$2]
fingerprint = "$(cat "$work/$2.fp")"
$3
TOML
  "$bin" serve --config "$work/$1/c.toml" >"$work/$1/log" 2>&1 &
  started+=("$!")
  for i in $(seq 200); do curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && break; sleep 0.05; done
  eval "admin_$1=$admin dicom_$1=$dicom"
}
site HOSPB HOSPA "[inbound]
pacs = \"127.0.0.1:$pacs\"
accept_from = [\"HOSPA\"]
mailbox_poll_interval = $poll"
site HOSPA HOSPB "[route.ct]
ae_title = \"CLOUDPDI\"
stable_after = 1
deliver_to = [\"HOSPB\"]"

# Unix seconds (with fractions) of the RFC 3339 timestamp that starts a log line.
stamp() { python3 -c 'import sys,datetime; print(datetime.datetime.fromisoformat(sys.argv[1].replace("Z","+00:00")).timestamp())' "$1"; }
lines() { grep -c "$1" "$2" 2>/dev/null || true; }

results=()
for round in $(seq "$rounds"); do
  # A random phase against B's poll, so that the rounds sample the whole interval rather
  # than the same point of it.
  sleep "$(python3 -c "import random; print(round(random.uniform(0, $poll), 2))")"
  python3 scripts/gen_ct.py "$work/study$round" --slices 2 --matrix 64 --patient-id "BENCH$round" >/dev/null
  /usr/bin/storescu -aec CLOUDPDI 127.0.0.1 "$dicom_HOSPA" "$work/study$round"/* 
  until [ "$(lines 'token issued' "$work/HOSPA/log")" -ge "$round" ]; do sleep 0.1; done
  until [ "$(lines 'sealed token taken from the mailbox' "$work/HOSPB/log")" -ge "$round" ]; do sleep 0.1; done
  issued=$(grep 'token issued' "$work/HOSPA/log" | sed -n "${round}p" | cut -d' ' -f1)
  taken=$(grep 'sealed token taken from the mailbox' "$work/HOSPB/log" | sed -n "${round}p" | cut -d' ' -f1)
  latency=$(echo "$(stamp "$taken") - $(stamp "$issued")" | bc)
  results+=("$latency")
  printf 'round %d: token issued %s, taken from the mailbox %s: %.2f s\n' "$round" "$issued" "$taken" "$latency"
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics,sys
v=[float(x) for x in sys.stdin]
print(f"poll interval '"$poll"' s, {len(v)} rounds: median {statistics.median(v):.2f} s, min {min(v):.2f} s, max {max(v):.2f} s, mean {statistics.mean(v):.2f} s")'
echo "audit events (post, fetch, delete) of the repository: $(grep -c . "$work/audit.jsonl") lines"
