#!/usr/bin/env python3
"""A PACS with a Storage Commitment Push Model SCP (pynetdicom), for tests/commitment.rs.

Usage: commit_pacs.py PORT OUT_DIR MODE [DELAY_S [LOSE_UID]]

Takes every C-STORE (Success), appending its SOP Instance UID to OUT_DIR.log (one line
per C-STORE). MODE says what it does with storage commitment:
  "same"          reports on the association of the request, DELAY_S seconds after its
                  N-ACTION-RSP: every instance committed, except LOSE_UID (when given),
                  failed with 0x0112 in every report (a PACS that keeps losing it);
  "no-commitment" does not accept the Storage Commitment Push Model SOP class;
  "refuse"        answers the N-ACTION 0x0110 (processing failure).

Runs until killed.
"""
import os
import sys
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

port, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
lose = sys.argv[5] if len(sys.argv) > 5 else None
lock = threading.Lock()


def handle_store(event):
    with lock:
        with open(out + ".log", "a") as log:
            log.write(event.request.AffectedSOPInstanceUID + "\n")
    return 0x0000


def report(assoc, request):
    time.sleep(delay)
    ds = Dataset()
    ds.TransactionUID = request.TransactionUID
    ds.ReferencedSOPSequence = []
    ds.FailedSOPSequence = []
    for ref in request.ReferencedSOPSequence:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
        item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
        if str(ref.ReferencedSOPInstanceUID) == lose:
            item.FailureReason = 0x0112
            ds.FailedSOPSequence.append(item)
        else:
            ds.ReferencedSOPSequence.append(item)
    event_type = 2 if ds.FailedSOPSequence else 1
    if not ds.FailedSOPSequence:
        del ds.FailedSOPSequence
    status, _ = assoc.send_n_event_report(
        ds, event_type, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
    )
    print(f"report sent on the same association, answered {status}", flush=True)


def handle_action(event):
    if mode == "refuse":
        return 0x0110, None
    request = event.action_information
    threading.Thread(target=report, args=(event.assoc, request), daemon=True).start()
    return 0x0000, None


ae = AE(ae_title="COMMITPACS")
ae.supported_contexts = StoragePresentationContexts
if mode != "no-commitment":
    ae.add_supported_context(StorageCommitmentPushModel)
ae.maximum_associations = 16
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
os.makedirs(out, exist_ok=True)
ae.start_server(
    ("127.0.0.1", port),
    evt_handlers=[(evt.EVT_C_STORE, handle_store), (evt.EVT_N_ACTION, handle_action)],
)
