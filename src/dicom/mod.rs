//! DICOM networking: the upper layer is dicom-ul's; DIMSE command sets and the service
//! logic are here.

pub mod commitment;
pub mod depth;
pub mod dimse;
pub mod scu;
pub mod syntax;
pub mod tls;
pub mod transcode;
