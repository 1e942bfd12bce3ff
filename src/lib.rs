//! # cloudpdi — Cloud-PDI gateway
//!
//! Hospitals hand studies to each other by token instead of CD (MHLW HS043 "Cloud-PDI").
//! This crate is the whole system; the binary `cloudpdi` is a thin CLI over it.
//!
//! Where a study goes, in order (outbound):
//! 1. [`dicom::scp`] accepts associations on the AE titles of the configured routes
//!    ([`route`]) and receives C-STORE requests;
//! 2. [`spool`] writes each instance durably (temp file, fsync, rename, sled index) before
//!    the Success response;
//! 3. [`batch`] groups instances per route and study (or patient) and marks a batch stable
//!    after a quiet period, queued for packing.
//!
//! A batch is packed as a [`pdi`] file set (DICOMDIR, files, manifest; AI support images
//! included, labelled or left out by the route's policy), streamed into a ZIP.
//!
//! Between the two sides travels a [`container`]: the PDI ZIP, optionally compressed,
//! sealed in chunks with AES-256-GCM so that the repository can never read it.
//!
//! The patient carries a [`token`] (text, QR code, printed slip) instead of the disc.
//! The container travels through the [`repository`] (`cloudpdi repository serve`, or
//! embedded in the gateway), which keeps it until it expires and never sees the token.
//!
//! [`outbound`] drives a stable batch through PDI, sealing, upload and token; [`watch`]
//! turns token files dropped into a folder into [`inbound`] jobs: download, open, verify,
//! then [`dicom::scu`] stores the study into the local PACS (also `cloudpdi import`),
//! after [`reconcile`] gave it a local Patient ID. Both are durable [`jobs`] in sled.
//!
//! [`serve`] is the daemon that runs these; [`admin`] answers `cloudpdi status`
//! ([`status`]), health checks and Prometheus scrapes ([`metrics`]) on loopback.
//! [`config`] holds every setting and its default; [`telemetry`] sets up the logs.

pub mod admin;
pub mod batch;
pub mod config;
pub mod container;
pub mod dicom;
pub mod inbound;
pub mod jobs;
pub mod metrics;
pub mod outbound;
pub mod pdi;
pub mod reconcile;
pub mod repository;
pub mod route;
pub mod serve;
pub mod spool;
pub mod status;
pub mod telemetry;
pub mod token;
pub mod watch;
