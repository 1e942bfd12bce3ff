//! The tags the PDI code reads and writes, as `group << 16 | element` numbers (the raw
//! element parser's form). Each value comes from the standard data dictionary
//! (`dicom_dictionary_std::tags`), under the dictionary's name or a shorter one; only the
//! item and delimitation tags, which the dictionary does not list, are written out here.

use dicom_core::Tag;

/// `group << 16 | element` of a tag.
pub const fn raw(tag: Tag) -> u32 {
    ((tag.0 as u32) << 16) | tag.1 as u32
}

/// Declares each name as the raw form of the dictionary tag of the same name, or of the
/// dictionary name after `=`.
macro_rules! from_dictionary {
    ($($name:ident $(= $standard:ident)?,)*) => {
        $(from_dictionary!(@one $name $(= $standard)?);)*
    };
    (@one $name:ident = $standard:ident) => {
        #[doc = concat!("`", stringify!($standard), "` of the standard dictionary.")]
        pub const $name: u32 = raw(dicom_dictionary_std::tags::$standard);
    };
    (@one $name:ident) => {
        #[doc = concat!("`", stringify!($name), "` of the standard dictionary.")]
        pub const $name: u32 = raw(dicom_dictionary_std::tags::$name);
    };
}

from_dictionary! {
    MEDIA_STORAGE_SOP_CLASS_UID,
    MEDIA_STORAGE_SOP_INSTANCE_UID,
    TRANSFER_SYNTAX_UID,
    FILE_SET_ID,
    FIRST_RECORD = OFFSET_OF_THE_FIRST_DIRECTORY_RECORD_OF_THE_ROOT_DIRECTORY_ENTITY,
    LAST_RECORD = OFFSET_OF_THE_LAST_DIRECTORY_RECORD_OF_THE_ROOT_DIRECTORY_ENTITY,
    CONSISTENCY_FLAG = FILE_SET_CONSISTENCY_FLAG,
    DIRECTORY_RECORD_SEQUENCE,
    NEXT_RECORD = OFFSET_OF_THE_NEXT_DIRECTORY_RECORD,
    IN_USE = RECORD_IN_USE_FLAG,
    LOWER_LEVEL = OFFSET_OF_REFERENCED_LOWER_LEVEL_DIRECTORY_ENTITY,
    RECORD_TYPE = DIRECTORY_RECORD_TYPE,
    REFERENCED_FILE_ID,
    REFERENCED_SOP_CLASS = REFERENCED_SOP_CLASS_UID_IN_FILE,
    REFERENCED_SOP_INSTANCE = REFERENCED_SOP_INSTANCE_UID_IN_FILE,
    REFERENCED_TRANSFER_SYNTAX = REFERENCED_TRANSFER_SYNTAX_UID_IN_FILE,
    SPECIFIC_CHARACTER_SET,
    IMAGE_TYPE,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_DATE,
    CONTENT_DATE,
    STUDY_TIME,
    CONTENT_TIME,
    ACCESSION_NUMBER,
    MODALITY,
    MANUFACTURER,
    STUDY_DESCRIPTION,
    REFERENCED_SERIES_SEQUENCE,
    SERIES_DESCRIPTION,
    PATIENT_NAME,
    PATIENT_ID,
    STUDY_INSTANCE_UID,
    SERIES_INSTANCE_UID,
    STUDY_ID,
    SERIES_NUMBER,
    INSTANCE_NUMBER,
    NUMBER_OF_FRAMES,
    ROWS,
    COLUMNS,
    VERIFICATION_DATETIME = VERIFICATION_DATE_TIME,
    VERIFYING_OBSERVER_SEQUENCE,
    CONCEPT_NAME_CODE_SEQUENCE,
    COMPLETION_FLAG,
    VERIFICATION_FLAG,
    HL7_INSTANCE_IDENTIFIER,
    DOCUMENT_TITLE,
    MIME_TYPE = MIME_TYPE_OF_ENCAPSULATED_DOCUMENT,
    CONTENT_LABEL,
    CONTENT_DESCRIPTION,
    PRESENTATION_CREATION_DATE,
    PRESENTATION_CREATION_TIME,
    CONTENT_CREATOR_NAME,
    DOSE_SUMMATION_TYPE,
    STRUCTURE_SET_LABEL,
    STRUCTURE_SET_DATE,
    STRUCTURE_SET_TIME,
    TREATMENT_DATE,
    TREATMENT_TIME,
    RT_PLAN_LABEL,
    RT_PLAN_DATE,
    RT_PLAN_TIME,
    PIXEL_DATA,
    FILE_META_INFORMATION_GROUP_LENGTH,
    FILE_META_INFORMATION_VERSION,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SERIES_DATE,
    ACQUISITION_DATE,
    SERIES_TIME,
    ACQUISITION_TIME,
    CODE_VALUE,
}

/// An item of a sequence or of encapsulated pixel data (FFFE,E000).
pub const ITEM: u32 = 0xFFFE_E000;
/// The end of an item of undefined length (FFFE,E00D).
pub const ITEM_END: u32 = 0xFFFE_E00D;
/// The end of a sequence of undefined length (FFFE,E0DD).
pub const SEQUENCE_END: u32 = 0xFFFE_E0DD;
/// The value length that means "undefined, up to a delimitation item".
pub const UNDEFINED: u32 = 0xFFFF_FFFF;
