#!/usr/bin/env bash
# Installs cloudpdi as a systemd service on this machine (run as root):
# binary to /usr/local/bin, configuration to /etc/cloudpdi (kept if present),
# units to /etc/systemd/system, then enables and starts the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
# Slips print the expiry in facility.time_zone (or the system's): the time zone database
# (/usr/share/zoneinfo) comes from the tzdata package, absent from minimal images.
[ -e /usr/share/zoneinfo/Asia/Tokyo ] || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tzdata
}
install -m 0755 target/release/cloudpdi /usr/local/bin/cloudpdi
install -d -m 0755 /etc/cloudpdi /usr/local/share/doc/cloudpdi
# The daemon's user; its group may read the token folder (add clerks who print slips).
getent group cloudpdi >/dev/null || groupadd --system cloudpdi
getent passwd cloudpdi >/dev/null || useradd --system --gid cloudpdi --home-dir /var/lib/cloudpdi \
  --no-create-home --shell /usr/sbin/nologin cloudpdi
# The data folder is written into the file, so every command finds the daemon's data.
if [ ! -e /etc/cloudpdi/cloudpdi.toml ]; then
  sed 's|^data_dir = .*|data_dir = "/var/lib/cloudpdi"|' conf/cloudpdi.toml >/etc/cloudpdi/cloudpdi.toml
  chmod 0644 /etc/cloudpdi/cloudpdi.toml
elif grep -q '^data_dir = "\./data"' /etc/cloudpdi/cloudpdi.toml; then
  # Earlier units set the data folder in the environment; it now lives in the file.
  sed -i 's|^data_dir = "\./data"|data_dir = "/var/lib/cloudpdi"|' /etc/cloudpdi/cloudpdi.toml
  echo "install: spool.data_dir set to /var/lib/cloudpdi in /etc/cloudpdi/cloudpdi.toml (the unit no longer sets it)"
fi
install -m 0644 README.md /usr/local/share/doc/cloudpdi/README.md
install -m 0644 systemd/cloudpdi.service /etc/systemd/system/cloudpdi.service
systemctl daemon-reload
systemctl enable --now cloudpdi.service
systemctl --no-pager status cloudpdi.service
