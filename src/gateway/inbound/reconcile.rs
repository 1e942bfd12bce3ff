//! Patient ID reconciliation on import (IHE Import Reconciliation Workflow).
//!
//! A study from another hospital carries that hospital's Patient ID, which may collide
//! with a different local patient: the most common import failure. Before the study
//! enters the local PACS, its Patient ID is kept, prefixed with an issuer prefix, or
//! replaced by the local ID given with the token. When it changes, the original ID (and
//! its issuer) goes into Other Patient IDs Sequence, and Issuer of Patient ID names the
//! local domain, so nothing of the sender's identity is lost.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// Why a Patient ID cannot be reconciled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The resulting ID is not a valid LO value.
    #[error("patient ID {0:?} is not usable: at most 64 printable ASCII characters, no backslash")]
    InvalidId(String),
}

/// What to do with the sender's Patient ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientIdPolicy {
    /// Keep it (the local PACS or RIS reconciles).
    Keep,
    /// Prefix it (e.g. `"HOSPA-"`), keeping IDs of different senders apart.
    Prefix(String),
    /// Replace it with this local Patient ID (given with the token).
    Local(String),
}

impl PatientIdPolicy {
    /// The Patient ID the study should carry, or `None` to leave it unchanged.
    ///
    /// # Errors
    /// [`ReconcileError::InvalidId`] when the result is not a valid Patient ID.
    pub fn target(&self, original: &str) -> Result<Option<String>, ReconcileError> {
        let target = match self {
            PatientIdPolicy::Keep => return Ok(None),
            PatientIdPolicy::Prefix(prefix) => format!("{prefix}{original}"),
            PatientIdPolicy::Local(id) => id.clone(),
        };
        check_id(&target)?;
        Ok((target != original).then_some(target))
    }
}

/// Applies a policy to datasets, naming the local issuer of the new IDs.
#[derive(Debug, Clone)]
pub struct Reconciler {
    /// The policy.
    pub policy: PatientIdPolicy,
    /// Issuer of Patient ID for IDs of the local domain.
    pub local_issuer: String,
}

impl Reconciler {
    /// Rewrites the patient identity of `object` if the policy changes it; returns
    /// whether it did.
    ///
    /// # Errors
    /// [`ReconcileError`] when the new ID is invalid.
    pub fn apply(&self, object: &mut InMemDicomObject) -> Result<bool, ReconcileError> {
        let original = text(object, tags::PATIENT_ID);
        let Some(new_id) = self.policy.target(&original)? else {
            return Ok(false);
        };
        let mut item = vec![
            DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from(original)),
            DataElement::new(
                tags::TYPE_OF_PATIENT_ID,
                VR::CS,
                PrimitiveValue::from("TEXT"),
            ),
        ];
        let original_issuer = text(object, tags::ISSUER_OF_PATIENT_ID);
        if !original_issuer.is_empty() {
            item.push(DataElement::new(
                tags::ISSUER_OF_PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(original_issuer),
            ));
        }
        let mut items: Vec<InMemDicomObject> = object
            .element_opt(tags::OTHER_PATIENT_I_DS_SEQUENCE)
            .ok()
            .flatten()
            .and_then(|e| e.items())
            .map(<[InMemDicomObject]>::to_vec)
            .unwrap_or_default();
        items.push(InMemDicomObject::from_element_iter(item));
        object.put(DataElement::new(
            tags::OTHER_PATIENT_I_DS_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
        object.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(new_id),
        ));
        object.put(DataElement::new(
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(self.local_issuer.clone()),
        ));
        Ok(true)
    }
}

fn text(object: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    object
        .element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

/// Patient ID is LO: at most 64 characters; we write ASCII only (no character set
/// question for the receiving PACS) and no backslash (the value separator).
pub(crate) fn check_id(id: &str) -> Result<(), ReconcileError> {
    if id.is_empty()
        || id.len() > 64
        || !id.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return Err(ReconcileError::InvalidId(id.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient(id: &str, issuer: Option<&str>) -> InMemDicomObject {
        let mut object = InMemDicomObject::new_empty();
        object.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(id),
        ));
        if let Some(issuer) = issuer {
            object.put(DataElement::new(
                tags::ISSUER_OF_PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(issuer),
            ));
        }
        object
    }

    fn reconciler(policy: PatientIdPolicy) -> Reconciler {
        Reconciler {
            policy,
            local_issuer: "KYOTO-UH".into(),
        }
    }

    #[test]
    fn keep_changes_nothing() {
        let mut object = patient("12345", None);
        let before = object.clone();
        assert_eq!(
            reconciler(PatientIdPolicy::Keep).apply(&mut object),
            Ok(false)
        );
        assert_eq!(object, before);
    }

    #[test]
    fn local_id_moves_the_original_into_other_patient_ids() {
        let mut object = patient("12345", Some("OSAKA-GH"));
        let changed = reconciler(PatientIdPolicy::Local("L-777".into())).apply(&mut object);
        assert_eq!(changed, Ok(true));
        assert_eq!(text(&object, tags::PATIENT_ID), "L-777");
        assert_eq!(text(&object, tags::ISSUER_OF_PATIENT_ID), "KYOTO-UH");
        let items = object
            .element(tags::OTHER_PATIENT_I_DS_SEQUENCE)
            .expect("sequence")
            .items()
            .expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(text(&items[0], tags::PATIENT_ID), "12345");
        assert_eq!(text(&items[0], tags::ISSUER_OF_PATIENT_ID), "OSAKA-GH");
        assert_eq!(text(&items[0], tags::TYPE_OF_PATIENT_ID), "TEXT");
    }

    #[test]
    fn prefix_is_applied_and_invalid_results_are_refused() {
        let policy = PatientIdPolicy::Prefix("OSK-".into());
        assert_eq!(policy.target("123"), Ok(Some("OSK-123".into())));
        let long = PatientIdPolicy::Prefix("X".repeat(60));
        assert!(long.target("12345").is_err());
        assert!(PatientIdPolicy::Local("a\\b".into()).target("1").is_err());
        assert_eq!(PatientIdPolicy::Local("1".into()).target("1"), Ok(None));
    }
}
