//! # cloudpdi — Cloud-PDI gateway
//!
//! Hospitals hand studies to each other by token instead of CD (MHLW HS043 "Cloud-PDI").
//! This crate is the whole system; the binary `cloudpdi` is a thin CLI over it.
