#!/usr/bin/env python3
"""A PACS that counts: every C-STORE it answers with Success is appended, by SOP
Instance UID, to OUT_DIR.log (one line per C-STORE, so an instance sent twice shows
twice), and the dataset is written to OUT_DIR under its SOP Instance UID. Each store
takes at least DELAY_MS milliseconds, so a test can stop the sender in the middle.
The instance REFUSE_UID, when given, is refused (0xC000) and neither logged nor kept.

Usage: counting_pacs.py PORT OUT_DIR DELAY_MS [REFUSE_UID]

Runs until killed.
"""
import os
import sys
import threading
import time

from pynetdicom import AE, StoragePresentationContexts, evt

port, out, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]) / 1000.0
refuse = sys.argv[4] if len(sys.argv) > 4 else None
lock = threading.Lock()


def handle_store(event):
    time.sleep(delay)
    uid = event.request.AffectedSOPInstanceUID
    if uid == refuse:
        return 0xC000
    with open(os.path.join(out, uid), "wb") as f:
        f.write(event.encoded_dataset())
    with lock:
        with open(out + ".log", "a") as log:
            log.write(uid + "\n")
    return 0x0000


ae = AE(ae_title="COUNTING")
ae.supported_contexts = StoragePresentationContexts
ae.maximum_associations = 16
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle_store)])
