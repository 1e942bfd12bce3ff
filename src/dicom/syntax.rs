//! What the SCP negotiates: every storage SOP class of the standard plus Verification, in
//! every transfer syntax whose datasets can be read (uncompressed, deflate, and all the
//! encapsulated ones: JPEG, JPEG-LS, JPEG 2000, RLE, MPEG-2/4, HEVC, ...).
//!
//! Pixel data is never decoded: instances are stored exactly as received, so accepting an
//! encapsulated syntax only requires that its dataset can be parsed.

use std::sync::LazyLock;

use dicom_dictionary_std::uids;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = uids::VERIFICATION;

/// The storage SOP class table (data, not code: UID, tab, name per line).
const STORAGE_SOP_CLASSES: &str = include_str!("storage_sop_classes.txt");

/// Every storage SOP class of the standard, plus Verification.
pub static ABSTRACT_SYNTAXES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut list: Vec<&'static str> = STORAGE_SOP_CLASSES
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split('\t').next())
        .filter(|uid| !uid.is_empty())
        .collect();
    list.push(VERIFICATION);
    list
});

/// Every transfer syntax whose datasets the registry can read, in the registry's order.
pub static TRANSFER_SYNTAXES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    TransferSyntaxRegistry
        .iter()
        .filter(|ts| !ts.is_unsupported())
        .map(|ts| ts.uid())
        .collect()
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_agrees_with_the_standard_dictionary() {
        use dicom_core::dictionary::{UidDictionary, UidDictionaryEntry};
        use dicom_dictionary_std::StandardSopClassDictionary;
        let mut known = 0;
        for uid in ABSTRACT_SYNTAXES.iter().filter(|uid| **uid != VERIFICATION) {
            assert!(
                uid.bytes().all(|b| b.is_ascii_digit() || b == b'.'),
                "{uid:?}"
            );
            if let Some(entry) = StandardSopClassDictionary.by_uid(uid) {
                assert!(
                    entry.name().contains("Storage"),
                    "{uid} is {}",
                    entry.name()
                );
                known += 1;
            }
        }
        assert!(
            known * 10 >= ABSTRACT_SYNTAXES.len() * 9,
            "only {known} known"
        );
    }

    #[test]
    fn covers_the_storage_classes_and_syntaxes_the_issue_names() {
        for uid in [
            uids::CT_IMAGE_STORAGE,
            uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
            uids::ENCAPSULATED_PDF_STORAGE,
            uids::BASIC_TEXT_SR_STORAGE,
            uids::ENHANCED_MR_IMAGE_STORAGE,
            VERIFICATION,
        ] {
            assert!(ABSTRACT_SYNTAXES.contains(&uid), "{uid}");
        }
        assert!(!ABSTRACT_SYNTAXES.contains(&uids::STORAGE_COMMITMENT_PUSH_MODEL));
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.100",
            "1.2.840.10008.1.2.4.102",
            "1.2.840.10008.1.2.4.107",
        ] {
            assert!(TRANSFER_SYNTAXES.contains(&ts), "{ts}");
        }
    }
}
