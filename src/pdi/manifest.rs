//! `CLOUDPDI/MANIFEST.JSON`: every file of the set with its size and SHA-256 and, for
//! DICOM files, its UIDs, so that the receiver can prove the set is whole before anything
//! reaches its PACS (a DICOMDIR alone cannot: it has no checksums).

use serde::{Deserialize, Serialize};

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

/// Date and time of a Unix timestamp (UTC): (year, month, day, hour, minute, second).
pub fn civil(unix_seconds: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = unix_seconds / 86_400;
    let rem = unix_seconds % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// RFC 3339 text of a Unix timestamp (UTC).
pub fn rfc3339(unix_seconds: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_seconds);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
