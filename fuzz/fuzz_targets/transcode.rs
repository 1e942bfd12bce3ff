//! Decoding compressed pixel data for a PACS that refuses its transfer syntax
//! (`dicom::transcode::decode`): the image attributes and the fragments come from the
//! input, so the size bound, the checks of each frame's own size (JPEG SOF, JPEG 2000
//! SIZ) against the header, and the codecs themselves (jpeg-decoder, OpenJPEG, the
//! registry's RLE decoder) all see hostile data. A panic inside a codec is caught by
//! `decode` and reported as an error (see its module documentation); libFuzzer's panic
//! hook, which aborts at once, is therefore replaced by a silent one, so that only a
//! panic `decode` lets through (its own code) ends the run as a crash.
//!
//! Runs on a thread with the stack of a tokio blocking thread, as in the daemon.
//!
//! Input: syntax selector (index into `DECODABLE`), rows (u16 LE), columns (u16 LE),
//! frames, samples per pixel, bits allocated, bits stored, Photometric Interpretation
//! selector, then fragments, each a u32 LE length and its bytes (the last one takes what
//! is left). Decoded sizes are bounded at 16 MiB here (the daemon's bound is 1 GiB,
//! tested by the unit tests) to keep the fuzzer fast.
#![no_main]

mod blocking;

use std::sync::Once;

use cloudpdi::dicom::transcode::{DECODABLE, DicomFile, decode};
use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::FileMetaTableBuilder;
use libfuzzer_sys::fuzz_target;

/// The decoded-size bound of this target.
const LIMIT: u64 = 16 << 20;

const PHOTOMETRIC: &[&str] = &[
    "MONOCHROME2",
    "MONOCHROME1",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
];

static QUIET_PANICS: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    QUIET_PANICS.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    blocking::on_blocking_thread(|| check(data));
});

fn check(data: &[u8]) {
    let Some((header, mut rest)) = data.split_first_chunk::<10>() else {
        return;
    };
    let (syntax, _) = DECODABLE[usize::from(header[0]) % DECODABLE.len()];
    let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
    let mut fragments = Vec::new();
    while !rest.is_empty() && fragments.len() < 8 {
        let len = match rest.split_first_chunk::<4>() {
            Some((len, tail)) => {
                rest = tail;
                usize::try_from(u32::from_le_bytes(*len)).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        let (fragment, tail) = rest.split_at(len.min(rest.len()));
        fragments.push(fragment.to_vec());
        rest = tail;
    }
    let Ok(meta) = FileMetaTableBuilder::new()
        .transfer_syntax(syntax)
        .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
        .media_storage_sop_instance_uid("1.2.3.4")
        .build()
    else {
        return;
    };
    let mut object = DicomFile::new_empty_with_meta(meta);
    let photometric = PHOTOMETRIC[usize::from(header[9]) % PHOTOMETRIC.len()];
    for (tag, vr, value) in [
        (tags::ROWS, VR::US, PrimitiveValue::from(u16_at(1))),
        (tags::COLUMNS, VR::US, PrimitiveValue::from(u16_at(3))),
        (
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(header[5].to_string()),
        ),
        (
            tags::SAMPLES_PER_PIXEL,
            VR::US,
            PrimitiveValue::from(u16::from(header[6])),
        ),
        (
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(u16::from(header[7])),
        ),
        (
            tags::BITS_STORED,
            VR::US,
            PrimitiveValue::from(u16::from(header[8])),
        ),
        (
            tags::HIGH_BIT,
            VR::US,
            PrimitiveValue::from(u16::from(header[8]).saturating_sub(1)),
        ),
        (tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        (
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from(photometric),
        ),
    ] {
        object.put(DataElement::new(tag, vr, value));
    }
    object.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        Value::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), fragments)),
    ));
    if decode(&mut object, LIMIT).is_ok() {
        let pixels = object
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.to_bytes().ok())
            .map_or(0, |b| b.len() as u64);
        assert!(pixels <= LIMIT + 1, "{pixels} bytes decoded over the bound");
    }
}
