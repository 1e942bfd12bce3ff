//! Reception: where a study enters cloudpdi, in the order it travels.
//!
//! 1. [`scp`] accepts associations on the AE titles of the configured [`route`]s and
//!    receives C-STORE requests;
//! 2. [`spool`] writes each instance durably before the Success response;
//! 3. [`batch`] groups instances per route and study (or patient) in the index;
//! 4. [`stabilizer`] marks a batch stable after its quiet period, ready for
//!    [`crate::gateway::outbound`]; a storage commitment request covering a batch
//!    ([`commitment`]) closes it at once.

pub mod batch;
pub mod commitment;
pub mod route;
pub mod scp;
pub mod spool;
pub mod stabilizer;
