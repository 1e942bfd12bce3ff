#!/usr/bin/env python3
"""Open several associations from one source address and keep them alive with C-ECHO.

Usage: flood.py BIND_ADDRESS HOST PORT CALLED_AE CALLING_AE COUNT SECONDS

Opens COUNT associations from BIND_ADDRESS (e.g. 127.0.0.2), prints one JSON line
{"established": N} once all were tried, then sends a C-ECHO on every open association
every 0.5 s for up to SECONDS and prints {"aborted": [seconds after which each
established association was dropped, or null if it was still open]}. Used to test that
one host cannot keep every SCP slot with C-ECHO keep-alives.
"""
import json
import sys
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

bind, host, port, called, calling, count, seconds = sys.argv[1:8]
port, count, seconds = int(port), int(count), float(seconds)
ae = AE(ae_title=calling)
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
ae.add_requested_context(Verification)
open_ = []
for _ in range(count):
    assoc = ae.associate(host, port, ae_title=called, bind_address=(bind, 0))
    if assoc.is_established:
        open_.append(assoc)
print(json.dumps({"established": len(open_)}), flush=True)
start = time.monotonic()
dropped = [None] * len(open_)
while time.monotonic() - start < seconds and any(d is None for d in dropped):
    for i, assoc in enumerate(open_):
        if dropped[i] is not None:
            continue
        if assoc.is_established:
            assoc.send_c_echo()
        if not assoc.is_established:
            dropped[i] = round(time.monotonic() - start, 2)
    time.sleep(0.5)
print(json.dumps({"aborted": dropped}), flush=True)
for assoc in open_:
    if assoc.is_established:
        assoc.release()
