//! The gateway daemon (`cloudpdi serve`): the two pipelines a study travels through.
//!
//! - [`reception`]: the PACS sends a study to our AE titles; it is spooled durably and
//!   batched per route and study until quiet.
//! - [`outbound`]: a stable batch is packed as a PDI file set, sealed, uploaded to the
//!   repository, and a token (text, QR, slip) is issued.
//! - [`inbound`]: a token dropped into the watch folder is downloaded, opened, verified,
//!   given a local Patient ID and stored into the local PACS.
//!
//! Both pipelines are durable [`jobs`] that resume after a crash, recorded in the
//! [`store`] (the one module that reaches the database), whose finished records
//! [`retention`] forgets; [`serve`] starts and stops every task in order.

pub mod cli;
pub mod inbound;
pub mod jobs;
pub mod outbound;
pub mod reception;
pub mod retention;
pub mod serve;
pub mod store;
pub mod study;
