//! `CLOUDPDI/MANIFEST.JSON`: every file of the set with its size and SHA-256 and, for
//! DICOM files, its UIDs, so that the receiver can prove the set is whole before anything
//! reaches its PACS (a DICOMDIR alone cannot: it has no checksums).

use std::cell::RefCell;
use std::io::{self, Write};

use serde::ser::{Error as _, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

/// Path of the manifest inside a file set.
pub const PATH: &str = "CLOUDPDI/MANIFEST.JSON";
/// The `format` value of our manifests.
pub const FORMAT: &str = "cloudpdi-pdi-manifest";
/// Largest manifest the reader accepts.
pub const MAX_BYTES: u64 = 128 << 20;

/// The manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Manifest version (1).
    pub version: u32,
    /// File-set ID of the DICOMDIR.
    pub file_set_id: String,
    /// Issuing facility.
    pub facility: String,
    /// When the set was built (UTC, RFC 3339).
    pub created: String,
    /// Every file except the manifest itself.
    pub files: Vec<ManifestFile>,
    /// Instances left out by the AI support-image policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
}

/// One file of the set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    /// Path inside the set, `/`-separated, as in the archive.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
    /// For DICOM instances: their identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<DicomIds>,
    /// Set for AI support images: "AI support image, not a diagnosis".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai_support: Option<String>,
}

/// Why a file is refused when its content is not what its manifest entry says.
pub const SHA256_MISMATCH: &str =
    "its SHA-256 does not match the manifest: the file was altered or damaged";

impl ManifestFile {
    /// Whether `sha256` is the digest this entry names (its hex in either case): the
    /// one comparison of both the set's check and the receiver's stream.
    pub fn names_digest(&self, sha256: &[u8; 32]) -> bool {
        hex::encode(sha256).eq_ignore_ascii_case(&self.sha256)
    }
}

/// The UIDs of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DicomIds {
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Study Instance UID.
    pub study_instance_uid: String,
    /// Series Instance UID.
    pub series_instance_uid: String,
    /// Transfer Syntax UID.
    pub transfer_syntax_uid: String,
}

/// An instance the policy kept out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Excluded {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Why (the policy's words).
    pub reason: String,
}

/// What a manifest says besides its list of files.
#[derive(Debug, Clone)]
pub struct Head<'a> {
    /// File-set ID of the DICOMDIR.
    pub file_set_id: &'a str,
    /// Issuing facility.
    pub facility: &'a str,
    /// When the set was built (UTC, RFC 3339).
    pub created: &'a str,
    /// Instances left out by the AI support-image policy.
    pub excluded: &'a [Excluded],
}

/// The same fields in the same order as [`Manifest`], with the files from an iterator.
#[derive(Serialize)]
#[serde(bound(serialize = "I: Iterator<Item = io::Result<ManifestFile>>"))]
struct Streamed<'a, I> {
    format: &'a str,
    version: u32,
    file_set_id: &'a str,
    facility: &'a str,
    created: &'a str,
    files: Files<I>,
    #[serde(skip_serializing_if = "nothing_excluded")]
    excluded: &'a [Excluded],
}

fn nothing_excluded(excluded: &&[Excluded]) -> bool {
    excluded.is_empty()
}

/// A list serialized as its iterator yields it (once).
struct Files<I>(RefCell<Option<I>>);

impl<I: Iterator<Item = io::Result<ManifestFile>>> Serialize for Files<I> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for file in self.0.borrow_mut().take().into_iter().flatten() {
            seq.serialize_element(&file.map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

/// Writes the manifest of `head` and `files` to `out`, one file entry at a time, byte for
/// byte as `serde_json::to_writer_pretty` writes a [`Manifest`]: a set of any size is
/// described without holding its list.
///
/// # Errors
/// What `files` or `out` report.
pub fn write(
    out: impl Write,
    head: &Head<'_>,
    files: impl Iterator<Item = io::Result<ManifestFile>>,
) -> io::Result<()> {
    let streamed = Streamed {
        format: FORMAT,
        version: 1,
        file_set_id: head.file_set_id,
        facility: head.facility,
        created: head.created,
        files: Files(RefCell::new(Some(files))),
        excluded: head.excluded,
    };
    serde_json::to_writer_pretty(out, &streamed).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::rfc3339;

    fn file(path: &str, uid: Option<&str>) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            size: 42,
            sha256: "ab".repeat(32),
            dicom: uid.map(|uid| DicomIds {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: uid.into(),
                study_instance_uid: "1.2.3".into(),
                series_instance_uid: "1.2.3.4".into(),
                transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            }),
            ai_support: uid.map(|_| "AI support image, not a diagnosis".into()),
        }
    }

    #[test]
    fn streamed_manifest_is_the_same_bytes_as_the_whole_one() {
        for excluded in [
            vec![],
            vec![Excluded {
                sop_instance_uid: "1.2.9".into(),
                reason: "AI support image".into(),
            }],
        ] {
            let files = vec![
                file("DICOMDIR", None),
                file("DICOM/PA000001", Some("1.2.5")),
            ];
            let whole = Manifest {
                format: FORMAT.into(),
                version: 1,
                file_set_id: "CLOUDPDI".into(),
                facility: "Kanto Hospital".into(),
                created: rfc3339(1_795_000_000),
                files: files.clone(),
                excluded: excluded.clone(),
            };
            let mut streamed = Vec::new();
            let head = Head {
                file_set_id: "CLOUDPDI",
                facility: "Kanto Hospital",
                created: &rfc3339(1_795_000_000),
                excluded: &excluded,
            };
            write(&mut streamed, &head, files.into_iter().map(Ok)).expect("writes");
            let expected = serde_json::to_vec_pretty(&whole).expect("serializes");
            assert_eq!(
                String::from_utf8_lossy(&streamed),
                String::from_utf8_lossy(&expected)
            );
        }
    }

    #[test]
    fn a_failing_entry_fails_the_manifest() {
        let files = [
            Ok(file("DICOMDIR", None)),
            Err(io::Error::other("disk gone")),
        ];
        let head = Head {
            file_set_id: "CLOUDPDI",
            facility: "",
            created: "",
            excluded: &[],
        };
        let error = write(Vec::new(), &head, files.into_iter()).expect_err("fails");
        assert!(error.to_string().contains("disk gone"), "{error}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
