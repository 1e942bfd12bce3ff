#!/usr/bin/env python3
"""Read a PDI file set with pydicom's FileSet and print what it finds, as JSON:
{"file_set_id", "instances": [{"sop_instance_uid", "record_type", "path"}], "patient_names": [...]}.

Every instance is loaded from its file (so a wrong File ID or a damaged file fails here),
and its SOP Instance UID must equal the one its directory record names.
"""
import json
import sys

from pydicom.fileset import FileSet


def main():
    fs = FileSet(sys.argv[1] + "/DICOMDIR")
    out = {"file_set_id": fs.ID, "instances": [], "patient_names": []}
    for instance in fs:
        ds = instance.load()
        uid = str(instance.SOPInstanceUID)
        if str(ds.SOPInstanceUID) != uid:
            sys.exit(f"{instance.path}: record says {uid}, file holds {ds.SOPInstanceUID}")
        out["instances"].append(
            {"sop_instance_uid": uid, "record_type": instance.node.record_type, "path": instance.path}
        )
    out["patient_names"] = [str(name) for name in fs.find_values("PatientName")]
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
