#!/usr/bin/env bash
# Runs inside `unshare --net` (only `lo`): see run.sh. bench/wan/run.sh (E2E=1) runs it in
# its client namespace with REPO_URL and REPO_KEY_FILE: both sites then use that
# repository across the emulated link instead of site A's embedded one.
set -euo pipefail
work=$1
ip link set lo up
bin=${BENCH_BIN:-$PWD/target/release/cloudpdi}
n=$(ls "$work/study" | wc -l)
now() { date +%s.%N; }
# Every process started here (Orthanc, both sites) is stopped when the script ends.
started=()
trap 'kill "${started[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
count() { curl -sf http://127.0.0.1:8042/statistics | python3 -c 'import json,sys; print(json.load(sys.stdin)["CountInstances"])'; }

orthanc() { # $1: storage folder
  mkdir -p "$1"
  cat >"$1/orthanc.json" <<JSON
{"Name":"bench","StorageDirectory":"$1/db","IndexDirectory":"$1/db","HttpPort":8042,"DicomPort":4242,
 "DicomAet":"ORTHANC","RemoteAccessAllowed":false,"AuthenticationEnabled":false,"DicomAlwaysAllowStore":true,"Plugins":[]}
JSON
  # Orthanc's DCMTK keeps Nagle's algorithm on like storescu's: off for both, as a PACS
  # tuned for throughput would run (with it on, each C-STORE response waits ~40 ms).
  TCP_NODELAY=1 /usr/sbin/Orthanc "$1/orthanc.json" >"$1/log" 2>&1 &
  peer=$!
  started+=("$peer")
  for i in $(seq 200); do curl -sf http://127.0.0.1:8042/system >/dev/null && return; sleep 0.1; done
  echo "Orthanc did not start" >&2; exit 1
}
site() { # $1: folder, $2: dicom port, $3: admin port, $4: embedded repository port, $5: extra TOML
  mkdir -p "$1"
  local repo=""
  if [ -n "${REPO_URL:-}" ]; then
    repo="url = \"$REPO_URL\"
api_key_file = \"$REPO_KEY_FILE\""
  fi
  cat >"$1/c.toml" <<TOML
[dicom]
listen = "127.0.0.1:$2"
[spool]
data_dir = "$1/data"
min_free_mb = 0
[admin]
listen = "127.0.0.1:$3"
[repository]
embedded_listen = "127.0.0.1:$4"
$repo
[route.ct]
ae_title = "CLOUDPDI"
stable_after = ${STABLE_AFTER:-1}
compress = ${COMPRESS:-false}
$5
TOML
  "$bin" serve --config "$1/c.toml" >"$1/log" 2>&1 &
  started+=("$!")
  site_pid=$!
  for i in $(seq 200); do curl -sf "http://127.0.0.1:$3/healthz" >/dev/null && return; sleep 0.05; done
  echo "cloudpdi did not start: $(cat "$1/log")" >&2; exit 1
}

# Peak resident memory of a process (VmHWM), in MiB, and its reset (clear_refs 5), so
# that the peak of one phase can be read at its end.
hwm() { awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
hwm_reset() { echo 5 >"/proc/$1/clear_refs"; }
# CPU seconds (user + system) a process used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

# (a) storescu straight into Orthanc.
# Each timed phase starts with nothing left to write back from the one before: Orthanc
# does not fsync, and the kernel would write back its ~260 MB of the earlier phase 30 s
# later, in the middle of (b).
orthanc "$work/orthanc-a"
sync
t0=$(now)
cpu_d0=$(cpu "$peer")
TCP_NODELAY=1 /usr/bin/storescu -aec ORTHANC 127.0.0.1 4242 "$work"/study/* 
t1=$(now)
cpu_d=$(echo "$(cpu "$peer") - $cpu_d0" | bc)
[ "$(count)" = "$n" ] || { echo "Orthanc holds $(count) of $n" >&2; exit 1; }
kill $peer; wait $peer 2>/dev/null || true
direct=$(echo "$t1 - $t0" | bc)

# (a4) the same into a fresh Orthanc over 4 associations at once (4 storescu, a quarter of
# the files each), as site B imports: Orthanc's own floor for (b)'s last step.
orthanc "$work/orthanc-a4"
files=("$work"/study/*)
lanes=()
sync
t0=$(now)
cpu_d40=$(cpu "$peer")
for k in 0 1 2 3; do
  TCP_NODELAY=1 /usr/bin/storescu -aec ORTHANC 127.0.0.1 4242 $(printf '%s\n' "${files[@]}" | awk -v k=$k 'NR % 4 == k') &
  lanes+=("$!")
done
wait "${lanes[@]}"
t1=$(now)
cpu_d4=$(echo "$(cpu "$peer") - $cpu_d40" | bc)
[ "$(count)" = "$n" ] || { echo "Orthanc (4 associations) holds $(count) of $n" >&2; exit 1; }
kill $peer; wait $peer 2>/dev/null || true
direct4=$(echo "$t1 - $t0" | bc)

# (b) through cloudpdi.
orthanc "$work/orthanc-b"
site "$work/a" 11112 11180 11190 "[outbound]
enabled = true"
pid_a=$site_pid
site "$work/b" 11113 11181 11191 "[inbound]
pacs = \"127.0.0.1:4242\"
pacs_ae_title = \"ORTHANC\"
poll_interval = 1"
pid_b=$site_pid
sync
tin=$(now)
TCP_NODELAY=1 /usr/bin/storescu -aec CLOUDPDI 127.0.0.1 11112 "$work"/study/*
t0=$(now)
ingest_mib=$(hwm "$pid_a")
hwm_reset "$pid_a"
hwm_reset "$pid_b"
cpu_a0=$(cpu "$pid_a"); cpu_b0=$(cpu "$pid_b"); cpu_o0=$(cpu "$peer")
# BENCH_PERF=FILE records where the three processes spend their CPU during the transfer
# (perf record -g; read it with `perf report -i FILE --sort pid,comm,dso,sym`).
if [ -n "${BENCH_PERF:-}" ]; then
  perf record -q -F 1999 -g -p "$pid_a,$pid_b,$peer" -o "$BENCH_PERF" 2>/dev/null &
  perf_pid=$!
fi
until "$bin" status --admin 127.0.0.1:11180 --json | grep '"direction": "outbound"' >/dev/null; do sleep 0.02; done
tstable=$(now)
until ls "$work"/a/data/tokens/ct/*.token >/dev/null 2>&1; do sleep 0.02; done
ttoken=$(now)
cp "$work"/a/data/tokens/ct/*.token "$work/b/data/inbox/"
until "$bin" status --admin 127.0.0.1:11181 --json | grep '"direction": "inbound"' >/dev/null; do sleep 0.02; done
ttaken=$(now)
# The end of (b): site B logs "import done" once the PACS answered every C-STORE (and
# the repository took the receipt), as storescu's exit ends (a); Orthanc's count is
# checked after. Not by asking Orthanc meanwhile: a curl + python3 every 50 ms took CPU
# and Orthanc's index from the import it timed (B's window, same build: median 2.27 s
# against 1.94 s; bench/README.md).
deadline=$(( $(date +%s) + 300 ))
until grep -q "import done" "$work/b/log"; do
  kill -0 "$pid_b" 2>/dev/null || { echo "site B exited before its import was done" >&2; exit 1; }
  [ "$(date +%s)" -lt "$deadline" ] || { echo "site B did not finish its import within 300 s" >&2; exit 1; }
  sleep 0.02
done
tdone=$(now)
[ "$(count)" = "$n" ] || { echo "Orthanc holds $(count) of $n after site B's import" >&2; exit 1; }
if [ -n "${BENCH_PERF:-}" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
mem_a=$(hwm "$pid_a")
mem_b=$(hwm "$pid_b")
cpu_a=$(echo "$(cpu "$pid_a") - $cpu_a0" | bc); cpu_b=$(echo "$(cpu "$pid_b") - $cpu_b0" | bc)
cpu_o=$(echo "$(cpu "$peer") - $cpu_o0" | bc)
kill $peer
calc() { echo "$1" | bc -l | xargs printf '%.2f'; }
ingest=$(calc "$t0 - $tin")
stable=$(calc "$tstable - $t0")
pipeline=$(calc "$tdone - $tstable")
total=$(calc "$ingest + $pipeline")
poll=$(calc "$ttaken - $ttoken")
echo "study: $n instances, $(du -sm "$work/study" | cut -f1) MB; $("$bin" --version 2>/dev/null || echo "$bin")"
printf '(a) storescu -> Orthanc (TCP_NODELAY=1):            %6.2f s\n' "$direct"
printf '    the same over 4 associations (reference):       %6.2f s\n' "$direct4"
printf '    storescu -> site A (durable ingest):            %6.2f s\n' "$ingest"
printf '    stable wait (excluded):                         %6.2f s\n' "$stable"
printf '    stable -> token (pack, seal, upload):           %6.2f s\n' "$(calc "$ttoken - $tstable")"
printf '    token -> B takes it (inbox poll, poll_interval 1 s): %6.2f s\n' "$poll"
printf '    B takes it -> all instances in Orthanc:         %6.2f s\n' "$(calc "$tdone - $ttaken")"
printf '(b) total minus stable wait:                        %6.2f s\n' "$total"
printf 'ratio (b)/(a): %.2f (goal <= 2.0, stretch 1.5); without the inbox poll: %.2f\n' \
  "$(calc "$total / $direct")" "$(calc "($total - $poll) / $direct")"
printf 'peak memory (VmHWM) during the transfer: site A %s MiB, site B %s MiB (site A during ingest %s MiB; goal <= 64)\n' \
  "$mem_a" "$mem_b" "$ingest_mib"
printf 'CPU seconds during the transfer (2 cores): site A %s, site B %s, Orthanc %s\n' "$cpu_a" "$cpu_b" "$cpu_o"
printf 'Orthanc CPU seconds, the same instances sent directly: %s (1 association), %s (4)\n' "$cpu_d" "$cpu_d4"
printf 'one disc at the hospital: 20 min = 1200 s (%.0fx faster including the stable wait)\n' \
  "$(calc "1200 / ($total + $stable)")"
# BENCH_LOGS=DIR keeps both daemons' logs (their step lines carry times) for a breakdown.
if [ -n "${BENCH_LOGS:-}" ]; then
  mkdir -p "$BENCH_LOGS"
  cp "$work/a/log" "$BENCH_LOGS/site-a.log"
  cp "$work/b/log" "$BENCH_LOGS/site-b.log"
fi
