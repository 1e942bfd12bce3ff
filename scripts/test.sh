#!/usr/bin/env bash
# Installs the test peers when they are missing, then runs every test.
#
# Peers (Debian packages): dcmtk (storescu, storescp, echoscu, dcmdump, dcmmkdir),
# orthanc, dicom3tools (dciodvfy), zbar-tools (zbarimg), zip/unzip, curl, iproute2 and
# util-linux (network/mount namespaces for peers that cannot bind loopback only),
# poppler-utils, poppler-data, qpdf, librsvg2-bin (checking the token slip's PDF and SVG),
# tzdata (/usr/share/zoneinfo: slips print the expiry in facility.time_zone).
# Python packages (PyPI, with python3-pip from Debian when pip is missing): pydicom,
# pydicom-data, pynetdicom, numpy, moto[server], and pydicom's pixel data decoders
# pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle (tests/transcode.rs
# compares our decoding with theirs), and playwright (tests/peers/web_browser.py drives
# Debian's chromium, the Debian package `chromium`, through it; no browser is downloaded;
# fonts-ipafont-gothic gives its screenshots Japanese glyphs).
# cargo-deny (crates.io) for scripts/deny.sh.
# Needs root for apt-get and for the namespace tests (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
need() { [ -x "$2" ] || missing+=("$1"); }
need dcmtk /usr/bin/storescu
need orthanc /usr/sbin/Orthanc
need dicom3tools /usr/bin/dciodvfy
need zbar-tools /usr/bin/zbarimg
need poppler-utils /usr/bin/pdftoppm
need qpdf /usr/bin/qpdf
need librsvg2-bin /usr/bin/rsvg-convert
[ -e /usr/share/poppler/cMap/Adobe-Japan1/UniJIS-UCS2-H ] || missing+=(poppler-data)
[ -e /usr/share/zoneinfo/Asia/Tokyo ] || missing+=(tzdata)
need zip /usr/bin/zip
need unzip /usr/bin/unzip
need curl /usr/bin/curl
need iproute2 /usr/sbin/ip
need util-linux /usr/bin/unshare
need time /usr/bin/time
need mount /usr/bin/mount
need openssl /usr/bin/openssl
need chromium /usr/bin/chromium
# Japanese glyphs for the reception page's screenshots (tests/peers/web_browser.py).
[ -e /usr/share/fonts/opentype/ipafont-gothic/ipag.ttf ] || missing+=(fonts-ipafont-gothic)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test peers: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! python3 -c 'import pydicom, pynetdicom, numpy, moto.server, data_store, pylibjpeg, libjpeg, openjpeg, rle' 2>/dev/null; then
  echo "installing Python test packages"
  # Debian marks its Python "externally managed" (PEP 668); the test machine's Python is
  # ours to install into.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check \
    pydicom pydicom-data pynetdicom numpy 'moto[server]' \
    pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle
fi
if ! python3 -c 'import playwright.sync_api' 2>/dev/null; then
  echo "installing playwright (Python)"
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check playwright
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
scripts/deny.sh
cargo test --locked --no-fail-fast "$@"
