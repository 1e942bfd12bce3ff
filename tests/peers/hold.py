#!/usr/bin/env python3
"""Open one association with pynetdicom, keep it silent for a while, then try a C-ECHO.

Usage: hold.py HOST PORT CALLED_AE SECONDS

Prints one JSON line when the association is established ({"established": true}) and
one at the end: {"echo_after_wait": STATUS or null, "aborted": bool}. Used to test the
association limit (a second peer must wait) and the idle timeout (the SCP drops us).
"""
import json
import sys
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

host, port, called, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
ae = AE(ae_title="HOLDER")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
ae.add_requested_context(Verification)
assoc = ae.associate(host, port, ae_title=called)
print(json.dumps({"established": assoc.is_established}), flush=True)
if not assoc.is_established:
    sys.exit(2)
time.sleep(seconds)
status = None
if assoc.is_established:
    rsp = assoc.send_c_echo()
    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
aborted = assoc.is_aborted or not assoc.is_established
print(json.dumps({"echo_after_wait": status, "aborted": aborted}), flush=True)
if assoc.is_established:
    assoc.release()
