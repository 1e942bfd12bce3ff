//! HI-TOKEN: the patient's key to a study in the repository.
//!
//! Only the text codec is done so far (see `text`); the binary envelope, key derivation,
//! slip and CLI of issue 4 are still to come.

pub mod text;
