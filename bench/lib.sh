# Shared by the benchmark scripts that run DCMTK against `cloudpdi serve` in a private
# network namespace (bench/reception, bench/tls): sourced, not run.

now() { date +%s.%N; }

# Waits until 127.0.0.1:$1 accepts connections (at most 5 s).
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }

# The median of the numbers given as arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Writes $1/c.toml: a gateway with its DICOM listener on 11112, admin on 11180, one route
# on AE title CLOUDPDI that never turns stable during a round, data in $1/data; $2 is
# more TOML (e.g. a [dicom.tls] table).
gateway_config() {
  cat > "$1/c.toml" <<TOML
[dicom]
listen = "127.0.0.1:11112"
$2
[spool]
data_dir = "$1/data"
min_free_mb = 0
[admin]
listen = "127.0.0.1:11180"
[log]
level = "warn"
[route.bench]
ae_title = "CLOUDPDI"
stable_after = 3600
TOML
}

# Instances the gateway on admin port 11180 holds in its batches ($1: the binary).
stored_instances() {
  "$1" status --admin 127.0.0.1:11180 --json |
    python3 -c 'import json,sys; print(sum(b["instances"] for b in json.load(sys.stdin)["batches"]))'
}
