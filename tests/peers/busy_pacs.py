#!/usr/bin/env python3
"""A PACS that takes the first LIMIT instances and then answers every C-STORE with
0xA700 (out of resources), like a PACS whose disk filled up in the middle of a study.

Usage: busy_pacs.py PORT OUT_DIR LIMIT

Each stored instance is written to OUT_DIR under its SOP Instance UID, exactly as
received. Runs until killed.
"""
import os
import sys
import threading

from pynetdicom import AE, StoragePresentationContexts, evt

port, out, limit = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lock = threading.Lock()
stored = 0


def handle_store(event):
    global stored
    with lock:
        if stored >= limit:
            return 0xA700
        stored += 1
    uid = event.request.AffectedSOPInstanceUID
    with open(os.path.join(out, uid), "wb") as f:
        f.write(event.encoded_dataset())
    return 0x0000


ae = AE(ae_title="BUSY")
ae.supported_contexts = StoragePresentationContexts
ae.maximum_associations = 16
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle_store)])
