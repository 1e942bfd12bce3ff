#!/usr/bin/env python3
"""Write a Secondary Capture "CAD overlay" instance, as an AI product would send it next to
a chest X-ray: SC Image Storage, Image Type DERIVED\\SECONDARY\\CAD, Manufacturer
"ACME AI", Series Description "CAD overlay", and a private tag (0029,xx01) of creator
"ACME AI RESULT" holding "CTR 0.48".

Usage: pdi_cad.py OUT_FILE STUDY_UID PATIENT_ID
"""
import sys

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def main():
    out, study_uid, patient_id = sys.argv[1:4]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study_uid, "cad"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, "cad-series"])
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    ds.PatientID = patient_id
    ds.StudyDate = ds.ContentDate = "20261124"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "ACME AI"
    ds.SeriesDescription = "CAD overlay"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY", "CAD"]
    block = ds.private_block(0x0029, "ACME AI RESULT", create=True)
    block.add_new(0x01, "LO", "CTR 0.48")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((64, 64), dtype=np.uint8).tobytes()
    ds.save_as(out, enforce_file_format=True)
    print(ds.SOPInstanceUID)


if __name__ == "__main__":
    main()
