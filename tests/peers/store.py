#!/usr/bin/env python3
"""Send DICOM files with pynetdicom over ONE association and report every status.

Usage: store.py HOST PORT CALLED_AE CALLING_AE FILE...

Each file is sent as it is on disk (no decoding, its own transfer syntax). One JSON line
per file is printed and flushed as soon as its C-STORE response arrives:
  {"file": ..., "status": 0, "comment": ""}
status is -1 when no response came (association lost). Exit code 0 when the association
was established, 2 otherwise.
"""
import json
import sys

import pydicom
from pynetdicom import AE, _config

# Send each file's dataset bytes straight from disk, exactly as stored (no re-encoding).
_config.STORE_SEND_CHUNKED_DATASET = True

host, port, called, calling, *files = sys.argv[1:]
ae = AE(ae_title=calling)
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
contexts = set()
for path in files:
    # The meta group only: a hostile dataset must reach the SCP unparsed.
    meta = pydicom.filereader.read_file_meta_info(path)
    contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
for sop_class, ts in sorted(contexts):
    ae.add_requested_context(sop_class, [ts])
assoc = ae.associate(host, int(port), ae_title=called)
if not assoc.is_established:
    print(json.dumps({"association": "not established"}), flush=True)
    sys.exit(2)
for path in files:
    status, comment = -1, ""
    if assoc.is_established:
        rsp = assoc.send_c_store(path)
        if rsp is not None and "Status" in rsp:
            status = int(rsp.Status)
            comment = str(rsp.get("ErrorComment", ""))
    print(json.dumps({"file": path, "status": status, "comment": comment}), flush=True)
if assoc.is_established:
    assoc.release()
