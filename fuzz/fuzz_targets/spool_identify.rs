//! The SCP's instance identification: a received dataset (in the negotiated transfer
//! syntax) goes through `Spool::incoming` and `Spool::commit` exactly as in `serve`:
//! Part 10 meta header built from the command, the dataset parsed up to Pixel Data
//! (dicom-object), UIDs checked, and, when they match the command, stored durably in a
//! spool on tmpfs. Every check that commit runs before the parse (e.g. a nesting-depth
//! pre-check) is covered too. It runs on a thread with the stack of the tokio blocking
//! thread that runs it in `serve`.
//!
//! Input: one byte choosing the transfer syntax, then the dataset bytes. The command
//! announces the UIDs the seeds (scripts/fuzz-seeds.sh) carry, so mutations of a seed
//! reach the store as well as the refusals.
#![no_main]

mod blocking;
mod scratch;

use std::sync::LazyLock;
use std::time::Duration;

use cloudpdi::config::BatchBy;
use cloudpdi::gateway::reception::route::Route;
use cloudpdi::gateway::reception::spool::{InstanceHeader, Spool};
use libfuzzer_sys::fuzz_target;

/// SOP Class UID the seeds carry (Secondary Capture Image Storage).
const SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7";
/// SOP Instance UID the seeds carry.
const SOP_INSTANCE: &str = "1.2.826.0.1.3680043.10.1436.99.1";

/// Transfer syntaxes the SCP negotiates, one per kind of dataset encoding.
const SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",      // Implicit VR Little Endian
    "1.2.840.10008.1.2.1",    // Explicit VR Little Endian
    "1.2.840.10008.1.2.2",    // Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99", // Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50", // JPEG Baseline (encapsulated pixel data)
    "1.2.840.10008.1.2.5",    // RLE Lossless
];

struct Fixture {
    spool: Spool,
    route: Route,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = scratch::scratch("spool");
    let spool = Spool::open(&dir.join("spool"), &dir.join("index"), 0).expect("spool opens");
    let route = Route {
        name: "fuzz".into(),
        ae_title: "FUZZ".into(),
        allowed_callers: Vec::new(),
        batch_by: BatchBy::Study,
        stable_after: Duration::from_secs(3600),
    };
    spool.prepare_route(&route.name).expect("route folders");
    Fixture { spool, route }
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, dataset)) = data.split_first() else {
        return;
    };
    let fixture = &*FIXTURE;
    let header = InstanceHeader {
        sop_class_uid: SOP_CLASS.into(),
        sop_instance_uid: SOP_INSTANCE.into(),
        transfer_syntax: SYNTAXES[usize::from(selector) % SYNTAXES.len()].into(),
        calling_ae: "FUZZSCU".into(),
    };
    let mut incoming = fixture
        .spool
        .incoming(header)
        .expect("the command's UIDs form a meta header");
    incoming.push(dataset);
    let _ = blocking::on_blocking_thread(|| fixture.spool.commit(incoming, &fixture.route));
});
