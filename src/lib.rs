//! # cloudpdi — Cloud-PDI gateway
//!
//! Hospitals hand studies to each other by token instead of CD (MHLW HS043 "Cloud-PDI").
//! This crate is the whole system; the binary `cloudpdi` only parses arguments and calls
//! the `cli` module of the concept a command is about ([`pdi::cli`], [`token::cli`],
//! [`container::cli`], [`repository::cli`], [`gateway::cli`], [`admin::status`]).
//!
//! Where a study goes, in order (docs/architecture.md has the map):
//! 1. [`gateway::reception`]: the PACS sends a study to an AE title of a route; each
//!    instance is spooled durably and batched per study until the route is quiet;
//! 2. [`gateway::outbound`]: a stable batch is packed as a [`pdi`] file set, sealed in a
//!    [`container`] (AES-256-GCM, so the repository can never read it), uploaded to the
//!    [`repository`], and a [`token`] (text, QR code, printed slip) is issued;
//! 3. [`gateway::inbound`]: at the other hospital a token dropped into the watch folder
//!    becomes a job: download, open, verify, reconcile the Patient ID, and C-STORE into
//!    the local PACS with [`dicom::scu`].
//!
//! Both pipelines are durable [`gateway::jobs`] recorded in [`gateway::store`];
//! [`gateway::serve`] is the daemon that runs them. [`admin`] answers `cloudpdi status`,
//! health checks and Prometheus scrapes on loopback; [`web`] is the clerks' reception
//! page (log in, scan a token and watch the import, retry failed jobs, re-print slips).
//! Shared by all: [`config`] (every
//! setting and its default), [`durable`] (every file that must survive a crash),
//! [`clock`] (time as records and people read it), [`markup`] (HTML escaping),
//! [`listen`] (listening sockets, with errors that say what to do) and [`telemetry`]
//! (logs; text from outside is escaped).

pub mod admin;
pub mod clock;
pub mod config;
pub mod container;
pub mod dicom;
pub mod durable;
pub mod facility;
pub mod gateway;
pub mod listen;
pub mod markup;
pub mod pdi;
pub mod repository;
pub mod telemetry;
pub mod token;
pub mod web;
