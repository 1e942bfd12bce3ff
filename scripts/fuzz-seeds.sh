#!/usr/bin/env bash
# Builds the seed corpus of every fuzz target into fuzz/corpus/TARGET (generated, not
# committed) from the test data: tests/vectors, pydicom's bundled test files, a small CT
# study from scripts/gen_ct.py packed by `cloudpdi pdi build`, and hand-made DIMSE
# commands, ZIPs, container recipes and header values.
#
# Usage: scripts/fuzz-seeds.sh            (needs python3 with pydicom and numpy, cargo)
# The cloudpdi binary is built with cargo (CARGO_TARGET_DIR is honoured) unless CLOUDPDI
# names one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
corpus=$root/fuzz/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -z "${CLOUDPDI:-}" ]; then
    cargo build --quiet --bin cloudpdi
    CLOUDPDI=${CARGO_TARGET_DIR:-$root/target}/debug/cloudpdi
fi

# A small study (3 slices of 16x16 CT in two character sets) packed as a PDI.
python3 scripts/gen_ct.py "$work/ct" --slices 3 --matrix 16 --charset iso2022 >/dev/null
python3 scripts/gen_ct.py "$work/ct2" --slices 2 --matrix 16 --charset utf8 >/dev/null
"$CLOUDPDI" pdi build "$work/ct" "$work/ct2" --out "$work/pdi" --facility FUZZ >/dev/null
"$CLOUDPDI" pdi build "$work/ct" --out "$work/pdi.zip" --no-index-htm >/dev/null

python3 -W ignore - "$root" "$corpus" "$work" <<'PY'
import glob, hashlib, os, struct, sys, zipfile, zlib
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

root, corpus, work = map(Path, sys.argv[1:4])
pydicom_data = Path(pydicom.__file__).parent / "data" / "test_files"

def put(target, data):
    folder = corpus / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)

# --- DICOM datasets -------------------------------------------------------------------
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SOP_INSTANCE = "1.2.826.0.1.3680043.10.1436.99.1"
# Selector bytes of spool_identify (index into its SYNTAXES) and pdi_element.
SPOOL = {"implicit": 0, "explicit": 1, "big": 2, "deflate": 3, "jpeg": 4}
ELEMENT = {"implicit": 0, "explicit": 1, "big": 2}

def encode(ds, implicit, little):
    buf = DicomBytesIO()
    buf.is_implicit_VR = implicit
    buf.is_little_endian = little
    write_dataset(buf, ds)
    return buf.getvalue()

dicom_files = sorted(pydicom_data.glob("*.dcm")) + sorted(work.glob("ct*/*.dcm"))
for path in dicom_files:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        if "PixelData" in ds:
            del ds.PixelData
        plain = {
            "implicit": encode(ds, True, True),
            "explicit": encode(ds, False, True),
            "big": encode(ds, False, False),
        }
    except Exception as e:  # some test files are deliberately broken
        print(f"skip {path.name}: {e}", file=sys.stderr)
        continue
    for kind, data in plain.items():
        if len(data) <= 65536:
            put("pdi_element", bytes([ELEMENT[kind]]) + data)
    ds.SOPClassUID = SOP_CLASS
    ds.SOPInstanceUID = SOP_INSTANCE
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1436.99.2"
    try:
        identified = {
            "implicit": encode(ds, True, True),
            "explicit": encode(ds, False, True),
            "big": encode(ds, False, False),
        }
    except Exception as e:
        print(f"skip {path.name}: {e}", file=sys.stderr)
        continue
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    identified["deflate"] = deflater.compress(identified["explicit"]) + deflater.flush()
    identified["jpeg"] = identified["explicit"]
    for kind, data in identified.items():
        if len(data) <= 65536:
            put("spool_identify", bytes([SPOOL[kind]]) + data)

# --- DICOMDIRs, manifest, ZIPs ----------------------------------------------------------
for path in sorted((pydicom_data / "dicomdirtests").glob("DICOMDIR*")):
    put("pdi_dicomdir", path.read_bytes())
put("pdi_dicomdir", (work / "pdi" / "DICOMDIR").read_bytes())
put("pdi_manifest", (work / "pdi" / "CLOUDPDI" / "MANIFEST.JSON").read_bytes())
put("pdi_manifest", b'{"format":"cloudpdi-pdi-manifest","version":1,"file_set_id":"X",'
    b'"facility":"","created":"2025-01-01T00:00:00Z","files":[{"path":"DICOM/A",'
    b'"size":1,"sha256":"00"}],"excluded":[{"sop_instance_uid":"1.2","reason":"ai"}]}')
put("pdi_zip", (work / "pdi.zip").read_bytes())

def make_zip(name, **options):
    path = work / name
    with zipfile.ZipFile(path, "w", **options) as z:
        z.writestr("DICOMDIR", b"\0" * 128 + b"DICM")
        z.writestr("DICOM/", b"")
        z.writestr("DICOM/A/B", b"hello " * 40)
        z.comment = b"cloudpdi fuzz seed"
    return path.read_bytes()

put("pdi_zip", make_zip("stored.zip", compression=zipfile.ZIP_STORED))
put("pdi_zip", make_zip("deflated.zip", compression=zipfile.ZIP_DEFLATED))
with zipfile.ZipFile(work / "zip64.zip", "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
    with z.open("BIG", "w", force_zip64=True) as f:
        f.write(b"x" * 1000)
put("pdi_zip", (work / "zip64.zip").read_bytes())
with zipfile.ZipFile(work / "empty.zip", "w") as z:
    pass
put("pdi_zip", (work / "empty.zip").read_bytes())
for seed in ("pdi.zip", "stored.zip", "deflated.zip", "zip64.zip", "empty.zip"):
    put("zip_stream", (work / seed).read_bytes())

# --- DIMSE commands ---------------------------------------------------------------------
def element(tag, value):
    return struct.pack("<HHI", 0, tag, len(value)) + value

def uid(text):
    data = text.encode()
    return data + b"\0" if len(data) % 2 else data

def command(*elements):
    body = b"".join(elements)
    return element(0x0000, struct.pack("<I", len(body))) + body

us = lambda v: struct.pack("<H", v)
put("dimse_command", command(element(0x0002, uid(SOP_CLASS)), element(0x0100, us(0x0001)),
    element(0x0110, us(7)), element(0x0700, us(0)), element(0x0800, us(0)),
    element(0x1000, uid(SOP_INSTANCE))))
put("dimse_command", command(element(0x0002, uid("1.2.840.10008.1.1")),
    element(0x0100, us(0x0030)), element(0x0110, us(1)), element(0x0800, us(0x0101))))
put("dimse_command", command(element(0x0002, uid(SOP_CLASS)), element(0x0100, us(0x8001)),
    element(0x0120, us(7)), element(0x0800, us(0x0101)), element(0x0900, us(0xC000)),
    element(0x0902, b"dataset cannot be parsed "), element(0x1000, uid(SOP_INSTANCE))))

# --- DICOM Upper Layer PDUs -------------------------------------------------------------
def pdu(kind, body):
    return struct.pack(">BBI", kind, 0, len(body)) + body

def item(kind, body):
    return struct.pack(">BBH", kind, 0, len(body)) + body

def ae(title):
    return title.encode().ljust(16)

def associate_rq(called, calling, contexts):
    items = item(0x10, b"1.2.840.10008.3.1.1.1")
    for number, (abstract, syntaxes) in enumerate(contexts):
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, t.encode()) for t in syntaxes)
        items += item(0x20, bytes([2 * number + 1, 0, 0, 0]) + sub)
    items += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4")
                  + item(0x55, b"CLOUDPDI_TEST"))
    return pdu(0x01, struct.pack(">HH", 1, 0) + ae(called) + ae(calling) + b"\0" * 32 + items)

put("dicom_pdu", associate_rq("CLOUDPDI", "STORESCU", [
    ("1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
    (SOP_CLASS, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"]),
]))
put("dicom_pdu", pdu(0x04, struct.pack(">IBB", 2 + 12, 1, 0x03) + b"\0\0\0\0\0\0\0\0\0\0\0\0"))
put("dicom_pdu", pdu(0x05, b"\0\0\0\0"))
put("dicom_pdu", pdu(0x06, b"\0\0\0\0"))
put("dicom_pdu", pdu(0x07, b"\0\0\2\0"))
put("dicom_pdu", pdu(0x03, bytes([0, 1, 1, 7])))

# --- Container --------------------------------------------------------------------------
for path in sorted((root / "tests" / "vectors" / "container").glob("*.hex")):
    for line in path.read_text().splitlines():
        if line.startswith("head "):
            head = bytes.fromhex(line.split()[1])
            put("container_header", head[:48])
            put("container_decrypt", b"\0" + head)
put("container_decrypt", b"\0" + (root / "tests/vectors/container/fail_truncated.bin").read_bytes()[:4096])
# Recipes (odd mode byte, see fuzz_targets/container_decrypt.rs): flags, length, fill.
import random
rng = random.Random(12)
zstd_frame = bytes.fromhex("28b52ffd2000410000") # empty zstd frame
for mode, chunks in [
    (1, [(0x01, 0x00, 0x10, 0x41)]),                      # one short last chunk
    (1, [(0x80, 0, 0, 0), (0x01, 0x00, 0x20, 0x42)]),     # full chunk, then last
    (1, [(0x80, 0, 0, 0), (0x81, 0, 0, 0)]),              # full last chunk
    (1, [(0x00, 0x00, 0x00, 0x00)]),                      # never flagged last
    (1, [(0x80, 0, 0, 0), (0x80, 0, 0, 0), (0x21, 0x01, 0x00, 0x43)]),
    (3, [(0x01, 0x00, len(zstd_frame), 0)]),              # zstd, empty frame
]:
    recipe = bytearray([mode])
    for spec in chunks:
        recipe += bytes(spec)
        if spec[0] == 0x01 and mode == 3:
            recipe += zstd_frame
    put("container_decrypt", bytes(recipe))

# --- Tokens, watch drops ----------------------------------------------------------------
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
def token_bytes(text):
    symbols = [ALPHABET.index(c) for c in text[4:].replace("-", "")]
    groups = [symbols[i:i + 4] for i in range(0, len(symbols), 5)]
    acc = bits = 0
    out = bytearray()
    for s in (s for g in groups for s in g):
        acc = (acc << 5) | s
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    return bytes(out)

for path in sorted((root / "tests" / "vectors" / "token").glob("*.txt")):
    text = path.read_text().splitlines()[0].removeprefix("text ").strip()
    put("token_text", text.encode())
    put("token_text", text.lower().replace("-", " ").encode())
    put("watch_drop", f"{text[:40]}\n{text[40:]}\npatient-id: 00771234\n".encode())
    if path.name == "sample.txt":
        put("token_bytes", token_bytes(text))

# --- Repository API JSON (selector byte: see fuzz_targets/repository_json.rs) -----------
H = "ab" * 32
for selector, body in [
    (0, '{"size":5,"expires_at":7,"max_downloads":1,"proof_hash":"%s"}' % H),
    (1, '{"instances_imported":3,"instances_refused":1,"note":"ok"}'),
    (2, '{"sha256":"%s"}' % H),
    (3, '{"document_id":"D0C","part_size":8388608,"parts":2}'),
    (4, '{"document_id":"D0C","state":"complete","size":5,"part_size":5,"parts_held":[0],'
        '"sha256":"%s","created_at":1,"expires_at":2,"max_downloads":1,"downloads":0,'
        '"receipts":[{"received_at":3,"instances_imported":1,"instances_refused":0,"note":""}]}' % H),
    (5, '{"error":"not_available","message":"this document is not available"}'),
    (6, H),
    (1, '{"instances_imported":3,"instances_refused":0,"note":"","facility":"B"}'),
    (7, '[{"message_id":"0123456789abcdef0123","sender":"A","size":153,"posted_at":5}]'),
    (8, '{"code":"B","name":"B Hospital","public_key":"x25519:%s"}' % ("A" * 43)),
    (9, '{"message_id":"0123456789abcdef0123"}'),
]:
    put("repository_json", bytes([selector]) + body.encode())

# --- Sealed tokens (selector byte: see fuzz_targets/sealed.rs) -------------------------
for path in sorted((root / "tests" / "vectors" / "sealed").glob("*.txt")):
    fields = dict(l.split(" ", 1) for l in path.read_text().splitlines() if not l.startswith("#"))
    put("sealed", b"\x00" + bytes.fromhex(fields["sealed"]))
    put("sealed", b"\x01\x01\x80" + bytes.fromhex(fields["plaintext"]))
    put("sealed", b"\x02x25519:" + __import__("base64").urlsafe_b64encode(
        bytes.fromhex(fields["recipient_public"])).rstrip(b"="))
put("sealed", b"\x020000-0000-0000-0000-0000-0000-0000-0001")
put("sealed", b"\x02zzzz zzzz oool iiii 7kq2 m9xd 0000 0000")

# --- HTTP headers -----------------------------------------------------------------------
for value in [b"bytes=0-", b"bytes=10-", b"bytes=1-5", b"bytes=1-5,7-9", b" bytes= 3 - 9 ",
              b"items=1-5", b"bytes=18446744073709551615-"]:
    put("http_range", value)
for value in [b"bytes 0-99/100", b"bytes */100", b"bytes 5-/7", b"bytes 1-2/*",
              b"bytes 18446744073709551615-18446744073709551615/18446744073709551615"]:
    put("http_content_range", value)

# --- Compressed pixel data (layout: see fuzz_targets/transcode.rs) ---------------------
DECODABLE = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
             "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
             "1.2.840.10008.1.2.5"]
PHOTOMETRIC = ["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
               "YBR_RCT", "PALETTE COLOR"]
from pydicom.encaps import generate_fragments
for path in sorted(pydicom_data.glob("*.dcm")):
    try:
        ds = pydicom.dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts not in DECODABLE or len(ds.PixelData) > 65536:
            continue
        head = bytes([DECODABLE.index(ts)]) + struct.pack("<HH", ds.Rows, ds.Columns) + bytes([
            int(ds.get("NumberOfFrames", 1) or 1), ds.SamplesPerPixel, ds.BitsAllocated,
            ds.BitsStored, PHOTOMETRIC.index(ds.PhotometricInterpretation)
            if ds.PhotometricInterpretation in PHOTOMETRIC else 0])
        body = b"".join(struct.pack("<I", len(f)) + f for f in generate_fragments(ds.PixelData))
        put("transcode", head + body)
    except Exception:
        pass

for folder in sorted(corpus.iterdir()):
    print(f"{folder.name}: {len(list(folder.iterdir()))} seeds")
PY
