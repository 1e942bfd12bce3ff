//! Transcoding on import (`inbound.transcode`): Orthanc, configured to accept only
//! uncompressed transfer syntaxes (its `AcceptedTransferSyntaxes`), receives pydicom's
//! compressed test files through `cloudpdi import`; the pixel values it stored are
//! compared with pydicom's own decoders (pylibjpeg: libjpeg, OpenJPEG, RLE) of the
//! originals.
//!
//! Orthanc cannot bind loopback only, so each test runs inside its own network namespace
//! ([`isolated`]).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// What Orthanc accepts in these tests: the three uncompressed syntaxes, nothing else.
fn uncompressed_only() -> serde_json::Value {
    serde_json::json!({
        "AcceptedTransferSyntaxes": [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2"
        ]
    })
}

/// Copies pydicom test files (argv[2:]) into argv[1] with fresh SOP Instance UIDs
/// (several share one, and Orthanc keeps only the first of a UID); prints
/// {"name": copy} as JSON. The pixel data stays as it was encoded.
const PREPARE: &str = r#"
import json, sys, warnings
warnings.simplefilter("ignore")
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
out = {}
for name in sys.argv[2:]:
    ds = pydicom.dcmread(get_testdata_file(name))
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = f"{sys.argv[1]}/{name}"
    ds.save_as(path, enforce_file_format=True)
    out[name] = path
print(json.dumps(out))
"#;

/// For each stored file (argv[2:]), finds its original among the copies named in the
/// JSON file argv[1] by SOP Instance UID, decodes both with pydicom and prints one JSON
/// line: the original's name and syntax, what Orthanc stored, and how far the pixel
/// values are apart.
const COMPARE: &str = r#"
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy
import pydicom
originals = {}
for name, path in json.load(open(sys.argv[1])).items():
    ds = pydicom.dcmread(path)
    originals[ds.SOPInstanceUID] = (name, ds)
for path in sys.argv[2:]:
    stored = pydicom.dcmread(path)
    name, original = originals[stored.SOPInstanceUID]
    a = original.pixel_array.astype(numpy.int64)
    b = stored.pixel_array.astype(numpy.int64)
    same_shape = a.shape == b.shape
    print(json.dumps({
        "name": name,
        "source_syntax": str(original.file_meta.TransferSyntaxUID),
        "source_lossy": str(original.get("LossyImageCompression", "")),
        "syntax": str(stored.file_meta.TransferSyntaxUID),
        "photometric": str(stored.PhotometricInterpretation),
        "source_photometric": str(original.PhotometricInterpretation),
        "patient_id": str(stored.get("PatientID", "")),
        "source_patient_id": str(original.get("PatientID", "")),
        "planar": stored.get("PlanarConfiguration"),
        "samples": int(stored.SamplesPerPixel),
        "bits": [int(stored.BitsAllocated), int(stored.BitsStored), int(stored.HighBit),
                 int(stored.PixelRepresentation)],
        "source_bits": [int(original.BitsAllocated), int(original.BitsStored),
                        int(original.HighBit), int(original.PixelRepresentation)],
        "lossy": str(stored.get("LossyImageCompression", "")),
        "lossy_method": str(stored.get("LossyImageCompressionMethod", "")),
        "same_shape": same_shape,
        "max_difference": int(numpy.abs(a - b).max()) if same_shape else -1,
        "mean_difference": float(numpy.abs(a - b).mean()) if same_shape else -1.0,
        "over_2": float((numpy.abs(a - b) > 2).mean()) if same_shape else 1.0,
    }))
"#;

fn python(script: &str, args: &[&str]) -> String {
    let out = run(Command::new("python3").arg("-c").arg(script).args(args));
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Copies of the named pydicom test files under `dir`, by name.
fn prepare(dir: &Path, names: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    std::fs::create_dir_all(dir).unwrap();
    let mut args = vec![dir.to_str().unwrap()];
    args.extend(names);
    let copies: serde_json::Value = serde_json::from_str(&python(PREPARE, &args)).unwrap();
    copies.as_object().unwrap().clone()
}

/// `cloudpdi import` of `paths` into the Orthanc of the namespace, with `extra` options.
fn import(paths: &[PathBuf], extra: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["import", "--pacs", "127.0.0.1:4242", "--called", "ORTHANC"])
        .args(extra)
        .args(paths))
}

fn paths_of(copies: &serde_json::Map<String, serde_json::Value>) -> Vec<PathBuf> {
    copies
        .values()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect()
}

/// Lossless sources: decoded, their pixels must equal pydicom's exactly.
const LOSSLESS: &[&str] = &[
    "MR_small_RLE.dcm",                // RLE, 16-bit monochrome
    "SC_rgb_rle.dcm",                  // RLE, 8-bit RGB
    "SC_rgb_rle_16bit.dcm",            // RLE, 16-bit RGB
    "SC_rgb_rle_2frame.dcm",           // RLE, two RGB frames
    "JPEG-LL.dcm",                     // JPEG lossless SV1, 16-bit
    "SC_rgb_jpeg_gdcm.dcm",            // JPEG lossless SV1, RGB
    "emri_small_jpeg_2k_lossless.dcm", // JPEG 2000 lossless, 10 frames of 12 bits
    "US1_J2KR.dcm",                    // JPEG 2000 lossless, YBR_RCT -> RGB
    "MR_small_jp2klossless.dcm",       // JPEG 2000 lossless, signed 16-bit (openjp2: UB)
];

/// Lossy sources: decoded, their pixels may differ from pydicom's by the rounding of
/// two different decoders (see [`JPEG_TOLERANCE`]).
const LOSSY: &[&str] = &[
    "SC_rgb_jpeg_dcmtk.dcm",          // JPEG baseline, YBR_FULL -> RGB
    "SC_rgb_dcmtk_+eb+cy+np.dcm",     // JPEG baseline, YBR_FULL_422 (subsampled) -> RGB
    "SC_jpeg_no_color_transform.dcm", // JPEG baseline stored as RGB (no transform)
    "JPEG2000.dcm",                   // JPEG 2000 (lossy syntax), 16-bit
    "color3d_jpeg_baseline.dcm",      // JPEG baseline, 120 frames, YBR_FULL_422 -> RGB
    "SC_rgb_small_odd_jpeg.dcm",      // JPEG baseline, 3 x 3 RGB: odd-length pixel data
    "US1_J2KI.dcm",                   // JPEG 2000 9/7 with colour transform: YBR_ICT -> RGB
    "693_J2KI.dcm",                   // JPEG 2000 (5/3 coded, declared lossy), signed
    "RG1_J2KI.dcm",                   // JPEG 2000 9/7, MONOCHROME1, 15 bits in 11 fragments
];

/// Largest difference allowed between our lossy JPEG decoder (jpeg-decoder) and
/// pydicom's (Thomas Richter's libjpeg in pylibjpeg-libjpeg): ISO 10918-1 lets each
/// decoder use its own inverse DCT (within the accuracy of ISO 10918-2), its own
/// YCbCr-to-RGB rounding and its own chroma upsampling, so samples differ by a level or
/// two (measured: 1 for 4:4:4 and RGB files, 2 for the 4:2:2 file). A wrong colour
/// transform or a wrong frame differs by tens of levels (137 for the RGB file read as
/// YCbCr), so the tolerance still tells a right decoding from a wrong one.
const JPEG_TOLERANCE: i64 = 2;

/// The 120 frames of 4:2:2 JPEG in `color3d_jpeg_baseline.dcm` differ more at a few
/// sharp colour edges, where the two decoders upsample chroma differently (measured: at
/// most 5 levels, on 0.005 % of the samples, mean difference 0.02); the share of samples
/// beyond [`JPEG_TOLERANCE`] is bounded too, so a wrong frame or colour transform (tens
/// of levels nearly everywhere) still fails.
const JPEG_422_MULTIFRAME: (&str, i64, f64) = ("color3d_jpeg_baseline.dcm", 5, 1e-4);

/// Files that stay refused, each with its reason: this build has no JPEG-LS decoder
/// (CharLS needs cmake), and jpeg-decoder decodes DCT JPEG of 8-bit precision only, not
/// the 12-bit samples JPEG extended allows.
const NOT_DECODED: &[(&str, &str)] = &[
    (
        "MR_small_jpeg_ls_lossless.dcm",
        "the PACS does not accept transfer syntax 1.2.840.10008.1.2.4.80 for SOP class \
         1.2.840.10008.5.1.4.1.1.4, and the data cannot be converted",
    ),
    (
        "JPGExtended.dcm",
        "the pixel data in transfer syntax 1.2.840.10008.1.2.4.51 cannot be decoded \
         (unsupported JPEG feature: SamplePrecision(12))",
    ),
];

#[test]
fn compressed_instances_a_pacs_refuses_are_stored_decoded_with_pydicoms_pixel_values() {
    if !isolated(
        "compressed_instances_a_pacs_refuses_are_stored_decoded_with_pydicoms_pixel_values",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut names: Vec<&str> = LOSSLESS.to_vec();
    names.extend(LOSSY);
    names.extend(NOT_DECODED.iter().map(|(name, _)| *name));
    let copies = prepare(&dir.path().join("study"), &names);
    let orthanc = Orthanc::start_with(dir.path(), uncompressed_only());
    // Reconciliation (prefix) runs on the same decoded instances.
    let out = import(
        &paths_of(&copies),
        &["--associations", "2", "--patient-id-prefix", "EXT-"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "two files are refused");
    let refused: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("refused:"))
        .collect();
    assert_eq!(refused.len(), NOT_DECODED.len(), "{stdout}{stderr}");
    for (name, reason) in NOT_DECODED {
        assert!(
            refused
                .iter()
                .any(|l| l.contains(&format!("/{name}: {reason}"))),
            "{stderr}"
        );
    }
    let stored = orthanc.download_all(&dir.path().join("stored"));
    assert_eq!(
        stored.len(),
        LOSSLESS.len() + LOSSY.len(),
        "{stdout}{stderr}"
    );
    let index = dir.path().join("copies.json");
    std::fs::write(&index, serde_json::Value::Object(copies).to_string()).unwrap();
    let mut args = vec![index.to_str().unwrap().to_owned()];
    args.extend(stored.iter().map(|p| p.to_str().unwrap().to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = python(COMPARE, &args);
    let results: Vec<serde_json::Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), stored.len());
    for r in &results {
        let name = r["name"].as_str().unwrap();
        println!("{r}");
        assert_eq!(r["syntax"], "1.2.840.10008.1.2.1", "explicit VR LE: {r}");
        assert_eq!(r["same_shape"], true, "{r}");
        assert_eq!(r["bits"], r["source_bits"], "bit depth kept: {r}");
        if r["samples"] == 3 {
            assert_eq!(r["planar"], 0, "{r}");
            assert_eq!(r["photometric"], "RGB", "{r}");
        } else {
            assert_eq!(r["photometric"], r["source_photometric"], "{r}");
        }
        assert_eq!(
            r["patient_id"].as_str().unwrap(),
            format!("EXT-{}", r["source_patient_id"].as_str().unwrap()),
            "reconciled: {r}"
        );
        let difference = r["max_difference"].as_i64().unwrap();
        if LOSSLESS.contains(&name) {
            assert_eq!(difference, 0, "lossless source decoded exactly: {r}");
            assert_eq!(r["lossy"], r["source_lossy"], "{r}");
        } else {
            assert_eq!(r["lossy"], "01", "a lossy source stays marked lossy: {r}");
            let tolerance = match r["source_syntax"].as_str().unwrap() {
                // JPEG 2000: OpenJPEG, as pylibjpeg-openjpeg.
                "1.2.840.10008.1.2.4.91" => 0,
                _ if name == JPEG_422_MULTIFRAME.0 => {
                    let beyond = r["over_2"].as_f64().unwrap();
                    assert!(beyond <= JPEG_422_MULTIFRAME.2, "{r}");
                    JPEG_422_MULTIFRAME.1
                }
                _ => JPEG_TOLERANCE,
            };
            assert!(difference <= tolerance, "{r}");
        }
    }
}

#[test]
fn with_transcode_never_a_refused_syntax_stays_refused_and_the_message_names_the_key() {
    if !isolated(
        "with_transcode_never_a_refused_syntax_stays_refused_and_the_message_names_the_key",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copies = prepare(&dir.path().join("study"), &["SC_rgb_jpeg_dcmtk.dcm"]);
    let orthanc = Orthanc::start_with(dir.path(), uncompressed_only());
    let out = import(&paths_of(&copies), &["--transcode", "never"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not accept transfer syntax 1.2.840.10008.1.2.4.50")
            && stderr.contains(r#"set inbound.transcode = "when-refused""#),
        "{stderr}"
    );
    assert_eq!(orthanc.get("/instances"), serde_json::json!([]));
}

/// Makes a JPEG baseline file whose header claims 65535 x 65535 pixels x 3 samples x
/// 300 frames (3.8 TB decoded) around a 100 x 100 JPEG.
const HOSTILE: &str = r#"
import sys, warnings
warnings.simplefilter("ignore")
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
ds.Rows = 65535
ds.Columns = 65535
ds.NumberOfFrames = 300
uid = generate_uid()
ds.SOPInstanceUID = uid
ds.file_meta.MediaStorageSOPInstanceUID = uid
ds.save_as(sys.argv[1], enforce_file_format=True)
"#;

#[test]
fn a_claimed_decoded_size_over_the_bound_is_refused_before_decoding() {
    if !isolated("a_claimed_decoded_size_over_the_bound_is_refused_before_decoding") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hostile = dir.path().join("hostile.dcm");
    python(HOSTILE, &[hostile.to_str().unwrap()]);
    let orthanc = Orthanc::start_with(dir.path(), uncompressed_only());
    let out = run(Command::new(require("/usr/bin/time"))
        .args(["-f", "max-rss-kib=%M"])
        .arg(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["import", "--pacs", "127.0.0.1:4242", "--called", "ORTHANC"])
        .arg(&hostile));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("65535 rows x 65535 columns x 300 frame(s) x 3 sample(s) x 1 byte(s)")
            && stderr.contains("over the limit of 1073741824 bytes")
            && stderr
                .contains("configure the PACS to accept transfer syntax 1.2.840.10008.1.2.4.50"),
        "{stderr}"
    );
    let rss: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("max-rss-kib="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(rss < 200 * 1024, "nothing large was allocated: {rss} KiB");
    assert_eq!(orthanc.get("/instances"), serde_json::json!([]));
}

#[test]
fn a_pacs_taking_only_implicit_vr_gets_the_decoded_pixels_in_implicit_vr() {
    let dir = tempfile::tempdir().unwrap();
    let copies = prepare(
        &dir.path().join("study"),
        &["SC_rgb_rle.dcm", "emri_small_jpeg_2k_lossless.dcm"],
    );
    let received = dir.path().join("received");
    std::fs::create_dir_all(&received).unwrap();
    let paths: Vec<String> = paths_of(&copies)
        .iter()
        .map(|p| format!("'{}'", p.display()))
        .collect();
    // DCMTK storescp cannot bind loopback only: it runs in a private network namespace.
    let out = in_netns(&format!(
        "{} +xi -od '{}' 11113 & peer=$!
         for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/11113) 2>/dev/null && break; sleep 0.05; done
         {} import --pacs 127.0.0.1:11113 --called ANY-SCP {} && echo import-ok",
        require("/usr/bin/storescp"),
        received.display(),
        env!("CARGO_BIN_EXE_cloudpdi"),
        paths.join(" ")
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("import-ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = files_in(&received);
    assert_eq!(stored.len(), 2);
    let index = dir.path().join("copies.json");
    std::fs::write(&index, serde_json::Value::Object(copies).to_string()).unwrap();
    let mut args = vec![index.to_str().unwrap().to_owned()];
    args.extend(stored.iter().map(|p| p.to_str().unwrap().to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for line in python(COMPARE, &args).lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["syntax"], "1.2.840.10008.1.2", "implicit VR LE: {r}");
        assert_eq!(r["max_difference"], 0, "{r}");
    }
}
