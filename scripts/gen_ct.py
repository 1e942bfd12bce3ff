#!/usr/bin/env python3
"""Generate a synthetic CT study (one DICOM Part 10 file per slice) for tests and benchmarks.

Every slice is a 512x512 16-bit CT Image Storage instance (about 0.5 MB), so a 500-slice
study is about the size of a real chest CT. The patient name can be written in Japanese
(ISO 2022 IR 87 or ISO_IR 192) to exercise character-set handling downstream.

Usage: gen_ct.py OUT_DIR [--slices N] [--patient-id ID] [--charset latin|iso2022|utf8]
                 [--study-uid UID] [--seed N] [--matrix 512]
"""
import argparse
import datetime
import os

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

NAMES = {
    "latin": ("ISO_IR 100", "Yamada^Taro"),
    "iso2022": ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "utf8": ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}


def make_slice(i, n, args, study_uid, series_uid, frame_uid, rng):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(i)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    charset, name = NAMES[args.charset]
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = name
    ds.PatientID = args.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261124"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC" + args.patient_id[-6:]
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "AXIAL 1.0"
    ds.Modality = "CT"
    ds.Manufacturer = "cloudpdi-test"
    ds.SeriesNumber = 1
    ds.InstanceNumber = i + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-250.0, -250.0, -float(i)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    m = args.matrix
    ds.Rows = ds.Columns = m
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    yy, xx = np.mgrid[0:m, 0:m]
    body = ((xx - m // 2) ** 2 + (yy - m // 2) ** 2) < ((200 - (i % 50)) * m // 512) ** 2
    pixels = np.where(body, 1000, 0).astype(np.uint16)
    pixels += rng.integers(0, 64, size=(m, m), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--patient-id", default="PID000001")
    p.add_argument("--charset", choices=sorted(NAMES), default="iso2022")
    p.add_argument("--study-uid", default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--matrix", type=int, default=512,
                   help="rows and columns (smaller for studies of many small instances)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    study_uid = args.study_uid or generate_uid(entropy_srcs=["study", str(args.seed), args.patient_id])
    series_uid = generate_uid(entropy_srcs=[study_uid, "series"])
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame"])
    for i in range(args.slices):
        ds = make_slice(i, args.slices, args, study_uid, series_uid, frame_uid, rng)
        ds.save_as(os.path.join(args.out, f"CT{i + 1:05d}.dcm"), enforce_file_format=True)
    print(study_uid)


if __name__ == "__main__":
    main()
