#!/usr/bin/env python3
"""A Storage Commitment Push Model requester (pynetdicom), for tests/commitment.rs.

Usage: commit.py HOST PORT CALLED_AE CALLING_AE MODE LISTEN_PORT CLASS_UID:INSTANCE_UID...

Sends one N-ACTION (a new Transaction UID) listing the instances, then waits up to 30 s
for the N-EVENT-REPORT: on the same association (MODE "same") or on a new association
the SCP opens to 127.0.0.1:LISTEN_PORT (MODE "new"; the SCP proposes the SCP role).
Prints one JSON line: {"action_status": .., "event": .., "transaction_matches": ..,
"committed": [uid...], "failed": [[uid, reason]...]} (only "action_status" when the
N-ACTION was refused), with "proposed_roles": [scu, scp] when the report came on a new
association (the SCP/SCU Role Selection the SCP proposed, null for none). COMMIT_PAD_BYTES in the environment adds a private element of
that many bytes to the request.
"""
import json
import os
import sys
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

host, port, called, calling, mode, listen_port, *refs = sys.argv[1:]
done = threading.Event()
# The N-EVENT-REPORT-RSP has left: pynetdicom sends it after on_report returns, and a
# release sent before it would let the SCP see the release instead of the answer. Its
# message is announced (EVT_DIMSE_SENT) before its P-DATA is queued, so the answer counts
# as sent when the next P-DATA has gone out on the socket (EVT_PDU_SENT).
rsp_queued = threading.Event()
answered = threading.Event()
result = {}


def on_dimse_sent(event):
    if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
        rsp_queued.set()


def on_pdu_sent(event):
    if rsp_queued.is_set() and type(event.pdu).__name__ == "P_DATA_TF":
        answered.set()


def on_report(event):
    ds = event.event_information
    result["event"] = int(event.request.EventTypeID)
    result["transaction_matches"] = str(ds.TransactionUID) == str(request.TransactionUID)
    result["committed"] = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
    result["failed"] = [
        [str(i.ReferencedSOPInstanceUID), int(i.FailureReason)]
        for i in ds.get("FailedSOPSequence", [])
    ]
    if not event.assoc.is_requestor:
        # The association the SCP opened for its report: the roles it proposed.
        role = event.assoc.requestor.role_selection.get(StorageCommitmentPushModel)
        result["proposed_roles"] = None if role is None else [bool(role.scu_role), bool(role.scp_role)]
    done.set()
    # pynetdicom wants (status, reply dataset) from an N-EVENT-REPORT handler; a bare
    # status makes it abort the association instead of answering.
    return 0x0000, None


request = Dataset()
request.TransactionUID = generate_uid()
request.ReferencedSOPSequence = []
for ref in refs:
    sop_class, sop_instance = ref.split(":")
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    request.ReferencedSOPSequence.append(item)

# COMMIT_PAD_BYTES: a private element of that many bytes added to the request (a request
# over the SCP's size limit).
pad = int(os.environ.get("COMMIT_PAD_BYTES", "0"))
if pad:
    request.private_block(0x0009, "CLOUDPDI TEST", create=True).add_new(0x10, "OB", bytes(pad))

ae = AE(ae_title=calling)
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
ae.add_requested_context(StorageCommitmentPushModel)
server = None
if mode == "new":
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server(
        ("127.0.0.1", int(listen_port)),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
assoc = ae.associate(
    host,
    int(port),
    ae_title=called,
    evt_handlers=[
        (evt.EVT_N_EVENT_REPORT, on_report),
        (evt.EVT_DIMSE_SENT, on_dimse_sent),
        (evt.EVT_PDU_SENT, on_pdu_sent),
    ],
)
if not assoc.is_established:
    print(json.dumps({"association": "not established"}), flush=True)
    sys.exit(2)
status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
result["action_status"] = int(status.Status) if status is not None and "Status" in status else -1
if result["action_status"] != 0:
    # Refused: no report follows.
    assoc.release()
elif mode == "same":
    if done.wait(30):
        answered.wait(10)
    assoc.release()
else:
    assoc.release()
    done.wait(30)
if server is not None:
    # The handler's answer (N-EVENT-REPORT-RSP) is sent after it returns: let the SCP
    # read it and release before the server goes.
    time.sleep(1)
    server.shutdown()
print(json.dumps(result), flush=True)
