#!/usr/bin/env python3
"""List a varied corpus of DICOM Part 10 files from pydicom's bundled test data.

Prints JSON: [{"path", "transfer_syntax", "sop_class_uid", "sop_instance_uid", "charset"}].
Only files a storage SCP can receive are listed: a file meta header, a SOP Class and
Instance UID, a Study Instance UID, and one file per SOP Instance UID (several bundled
files share UIDs; the ones that add a transfer syntax or character set not yet covered
win).
"""
import json
import subprocess
import sys
import warnings

import pydicom
from pydicom.data import get_charset_files, get_testdata_files

warnings.simplefilter("ignore")


def describe(path):
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")).startswith("1.2.840.10008.1.3.10"):
            return None
        item = {
            "path": path,
            "transfer_syntax": ts,
            "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "study_uid": str(ds.StudyInstanceUID),
            "charset": "\\".join(ds.get("SpecificCharacterSet", []) if isinstance(ds.get("SpecificCharacterSet"), list) else [str(ds.get("SpecificCharacterSet", ""))]),
        }
        if str(ds.file_meta.MediaStorageSOPInstanceUID) != item["sop_instance_uid"]:
            return None
        return item
    except Exception:
        return None


def dcmtk_reads(item):
    """DCMTK must parse the file and find its SOP UIDs, or storescu refuses to send it
    (e.g. explicit_VR-UN.dcm, whose UIDs are encoded as UN)."""
    out = subprocess.run(
        ["/usr/bin/dcmdump", "-q", "+P", "0008,0016", "+P", "0008,0018", item["path"]],
        capture_output=True,
        text=True,
        errors="replace",
    )
    return out.returncode == 0 and out.stdout.count(" UI ") == 2


def main():
    files = sorted(set(get_testdata_files("*.dcm") + get_charset_files("*.dcm")))
    items = [d for d in map(describe, files) if d and dcmtk_reads(d)]
    seen_uid, seen_kind, chosen = set(), set(), []
    # First pass: one file per new (transfer syntax, charset); second: the rest.
    for only_new in (True, False):
        for item in items:
            kind = (item["transfer_syntax"], item["charset"])
            if item["sop_instance_uid"] in seen_uid or (only_new and kind in seen_kind):
                continue
            seen_uid.add(item["sop_instance_uid"])
            seen_kind.add(kind)
            chosen.append(item)
    json.dump(chosen, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
