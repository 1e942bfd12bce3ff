//! Decoding compressed pixel data for a PACS that refuses the instance's transfer syntax
//! (`inbound.transcode = "when-refused"`): the encapsulated pixel data becomes native
//! pixel data, to be sent in Explicit VR Little Endian (or Implicit, if that is all the
//! PACS accepted).
//!
//! The codecs are those of dicom-rs's transfer syntax registry that build from crates
//! alone (no C library, no cmake): JPEG baseline, extended and lossless (jpeg-decoder),
//! JPEG 2000 (openjp2, a Rust port of OpenJPEG) and RLE Lossless. JPEG-LS would need
//! CharLS, built with cmake, so it is not decoded; see docs/dependencies.md.
//!
//! What stays and what changes: the SOP Instance UID stays (decoding is a change of
//! encoding, not a new instance); Bits Allocated, Bits Stored, High Bit and Pixel
//! Representation stay; Photometric Interpretation becomes what the decoder produced
//! (RGB where it converts colours, see [`decoded_photometric`]); Planar Configuration
//! becomes 0 (interleaved) for colour images. An image that was compressed lossily keeps
//! Lossy Image Compression (0028,2110) "01" (set if the file lacked it, with the method
//! and ratio of this compression when neither is present): decoding does not bring the
//! lost detail back, and the PACS must not show it as lossless.
//!
//! Bounds: the decoded size (rows x columns x frames x samples x bytes per sample) is
//! computed before anything is allocated and refused above [`MAX_DECODED_BYTES`]; the
//! decoded and the re-encoded copy of instances being sent at once share a budget of
//! twice that ([`reserve`]), so parallel associations cannot multiply it. A panic inside
//! a codec crate (the registry's adapters index their output by values read from the
//! data; jpeg-decoder panics on some sample precisions) is caught with `catch_unwind`
//! and reported as a damaged file, not a crash of the import: the decoders only read
//! the object and write into a buffer that is dropped on failure, so nothing they leave
//! half-done is used. The panic's message still reaches the process's panic hook (the
//! log's standard error) once.

use std::panic::{AssertUnwindSafe, catch_unwind};

use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_dictionary_std::uids::{
    JPEG_BASELINE8_BIT, JPEG_EXTENDED12_BIT, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG2000,
    JPEG2000_LOSSLESS, RLE_LOSSLESS,
};
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::{Codec, TransferSyntaxIndex};
use dicom_object::{FileDicomObject, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

/// Largest decoded pixel data of one instance, in bytes (1 GiB): a multi-frame CT of
/// 2,000 slices of 512 x 512 x 16 bits fits (1,000 MiB); anything larger is refused
/// before decoding, so a hostile header claiming 65535 x 65535 x 2^31 frames allocates
/// nothing. The decoded data and its encoded copy are both in memory while it is sent.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// The transfer syntaxes this build decodes, with their names for messages.
pub const DECODABLE: &[(&str, &str)] = &[
    (JPEG_BASELINE8_BIT, "JPEG Baseline"),
    (JPEG_EXTENDED12_BIT, "JPEG Extended"),
    (JPEG_LOSSLESS, "JPEG Lossless"),
    (JPEG_LOSSLESS_SV1, "JPEG Lossless SV1"),
    (JPEG2000_LOSSLESS, "JPEG 2000 Lossless"),
    (JPEG2000, "JPEG 2000"),
    (RLE_LOSSLESS, "RLE Lossless"),
];

/// A Part 10 object held in memory, as dicom-object reads it.
pub type DicomFile = FileDicomObject<InMemDicomObject>;

/// Whether pixel data in `transfer_syntax` can be decoded by this build.
pub fn can_decode(transfer_syntax: &str) -> bool {
    DECODABLE.iter().any(|(uid, _)| *uid == transfer_syntax)
}

/// Why an instance's pixel data was not decoded; each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TranscodeError {
    /// The transfer syntax has no decoder in this build.
    #[error(
        "pixel data in transfer syntax {0} cannot be decoded here (decoders: JPEG baseline, \
         extended and lossless, JPEG 2000, RLE); configure the PACS to accept {0}"
    )]
    NoDecoder(String),
    /// An attribute the decoder needs is missing or out of range.
    #[error(
        "the image's {name} is {found}, which cannot be decoded ({expected}); the file is \
         not a usable image in transfer syntax {syntax}: configure the PACS to accept \
         {syntax}, or ask the sender for another copy"
    )]
    Attribute {
        /// The attribute, with its tag.
        name: &'static str,
        /// Its value, or "missing".
        found: String,
        /// What the decoder takes.
        expected: &'static str,
        /// The instance's transfer syntax.
        syntax: String,
    },
    /// The decoded pixel data would exceed [`MAX_DECODED_BYTES`].
    #[error(
        "decoding would take {bytes} bytes ({rows} rows x {columns} columns x {frames} \
         frame(s) x {samples} sample(s) x {sample_bytes} byte(s)), over the limit of {limit} \
         bytes for one instance: it is not decoded; configure the PACS to accept transfer \
         syntax {syntax}"
    )]
    TooLarge {
        /// The decoded size (saturated at u64::MAX).
        bytes: u64,
        /// Rows.
        rows: u16,
        /// Columns.
        columns: u16,
        /// Number of Frames.
        frames: u32,
        /// Samples per Pixel.
        samples: u16,
        /// Bytes per sample (Bits Allocated / 8).
        sample_bytes: u16,
        /// [`MAX_DECODED_BYTES`].
        limit: u64,
        /// The instance's transfer syntax.
        syntax: String,
    },
    /// The codec failed, or produced another amount of data than the header declares.
    #[error(
        "the pixel data in transfer syntax {syntax} cannot be decoded ({reason}): the file \
         is damaged or uses a feature the decoder lacks; configure the PACS to accept \
         {syntax}, or ask the sender for another copy"
    )]
    Decode {
        /// The instance's transfer syntax.
        syntax: String,
        /// What failed.
        reason: String,
    },
}

/// What decoding needs to know about an image, read and checked before any allocation.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    rows: u16,
    columns: u16,
    frames: u32,
    samples: u16,
    sample_bytes: u16,
}

/// The decoded size of `object`'s pixel data in bytes, checked against `limit`, without
/// decoding anything: what [`reserve`] is asked for before [`decode`] runs.
///
/// # Errors
/// [`TranscodeError::NoDecoder`], [`TranscodeError::Attribute`] or
/// [`TranscodeError::TooLarge`].
pub fn decoded_size(object: &DicomFile, limit: u64) -> Result<u64, TranscodeError> {
    geometry(object, limit).map(|(_, bytes)| bytes)
}

fn geometry(object: &DicomFile, limit: u64) -> Result<(Geometry, u64), TranscodeError> {
    let syntax = syntax_of(object);
    if !can_decode(&syntax) {
        return Err(TranscodeError::NoDecoder(syntax));
    }
    let bad = |name, found: Option<String>, expected| TranscodeError::Attribute {
        name,
        found: found.unwrap_or_else(|| "missing".into()),
        expected,
        syntax: syntax.clone(),
    };
    let number = |tag: Tag| -> Option<Result<i64, String>> {
        let element = object.get(tag)?;
        Some(
            element
                .to_int::<i64>()
                .map_err(|_| crate::telemetry::escape(&element.to_str().unwrap_or_default())),
        )
    };
    let in_range = |tag, name, range: std::ops::RangeInclusive<i64>, expected| match number(tag) {
        Some(Ok(v)) if range.contains(&v) => Ok(v),
        Some(Ok(v)) => Err(bad(name, Some(v.to_string()), expected)),
        Some(Err(text)) => Err(bad(name, Some(text), expected)),
        None => Err(bad(name, None, expected)),
    };
    let positive = 1..=i64::from(u16::MAX);
    let rows = in_range(
        tags::ROWS,
        "Rows (0028,0010)",
        positive.clone(),
        "1 to 65535",
    )?;
    let columns = in_range(tags::COLUMNS, "Columns (0028,0011)", positive, "1 to 65535")?;
    let samples = in_range(
        tags::SAMPLES_PER_PIXEL,
        "Samples per Pixel (0028,0002)",
        1..=3,
        "1 or 3",
    )?;
    if samples == 2 {
        return Err(bad(
            "Samples per Pixel (0028,0002)",
            Some("2".into()),
            "1 or 3",
        ));
    }
    let bits = in_range(
        tags::BITS_ALLOCATED,
        "Bits Allocated (0028,0100)",
        8..=16,
        "8 or 16",
    )?;
    if bits != 8 && bits != 16 {
        return Err(bad(
            "Bits Allocated (0028,0100)",
            Some(bits.to_string()),
            "8 or 16",
        ));
    }
    let frames = match number(tags::NUMBER_OF_FRAMES) {
        None => 1,
        Some(_) => in_range(
            tags::NUMBER_OF_FRAMES,
            "Number of Frames (0028,0008)",
            1..=i64::from(u32::MAX),
            "1 or more",
        )?,
    };
    let narrow16 = |v: i64| u16::try_from(v).unwrap_or(u16::MAX);
    let geometry = Geometry {
        rows: narrow16(rows),
        columns: narrow16(columns),
        frames: u32::try_from(frames).unwrap_or(u32::MAX),
        samples: narrow16(samples),
        sample_bytes: narrow16(bits / 8),
    };
    let bytes = u64::from(geometry.rows)
        .checked_mul(u64::from(geometry.columns))
        .and_then(|v| v.checked_mul(u64::from(geometry.frames)))
        .and_then(|v| v.checked_mul(u64::from(geometry.samples)))
        .and_then(|v| v.checked_mul(u64::from(geometry.sample_bytes)))
        .unwrap_or(u64::MAX);
    if bytes > limit {
        return Err(TranscodeError::TooLarge {
            bytes,
            rows: geometry.rows,
            columns: geometry.columns,
            frames: geometry.frames,
            samples: geometry.samples,
            sample_bytes: geometry.sample_bytes,
            limit,
            syntax,
        });
    }
    Ok((geometry, bytes))
}

/// The transfer syntax of the file meta, without padding.
fn syntax_of(object: &DicomFile) -> String {
    object
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// Decodes `object`'s encapsulated pixel data in place into native pixel data and sets
/// its transfer syntax to Explicit VR Little Endian, with the attributes the module
/// documentation lists; refuses (allocating nothing) when the decoded data would exceed
/// `limit` bytes ([`MAX_DECODED_BYTES`] when sending). Blocking, CPU-bound work: call it
/// off the async runtime.
///
/// # Errors
/// [`TranscodeError`], naming what was refused and what to do; `object` is then left
/// as it was.
pub fn decode(object: &mut DicomFile, limit: u64) -> Result<(), TranscodeError> {
    let (geometry, bytes) = geometry(object, limit)?;
    let syntax = syntax_of(object);
    let failed = |reason: String| TranscodeError::Decode {
        syntax: syntax.clone(),
        reason,
    };
    let compressed: u64 = match object.get(tags::PIXEL_DATA).map(|e| e.value()) {
        Some(Value::PixelSequence(sequence)) => {
            sequence.fragments().iter().map(|f| f.len() as u64).sum()
        }
        Some(_) => return Err(failed("its pixel data is not encapsulated".into())),
        None => return Err(failed("it has no pixel data".into())),
    };
    let reader = match TransferSyntaxRegistry.get(&syntax).map(|ts| ts.codec()) {
        Some(Codec::EncapsulatedPixelData(Some(reader), _)) => reader,
        _ => return Err(TranscodeError::NoDecoder(syntax)),
    };
    let expected = usize::try_from(bytes).map_err(|_| failed("too large here".into()))?;
    let mut pixels: Vec<u8> = Vec::new();
    pixels
        .try_reserve_exact(expected.saturating_add(1))
        .map_err(|_| failed(format!("{bytes} bytes of memory are not available")))?;
    let source_photometric = photometric_of(object);
    let source: &DicomFile = object;
    let decoded = catch_unwind(AssertUnwindSafe(|| match syntax.as_str() {
        JPEG_BASELINE8_BIT | JPEG_EXTENDED12_BIT | JPEG_LOSSLESS | JPEG_LOSSLESS_SV1 => {
            decode_jpeg(source, geometry, &source_photometric, &mut pixels)
        }
        JPEG2000 | JPEG2000_LOSSLESS => check_j2k_sizes(source, geometry).and_then(|()| {
            reader
                .decode(source, &mut pixels)
                .map_err(|e| e.to_string())
        }),
        _ => check_rle_headers(source, geometry).and_then(|()| {
            reader
                .decode(source, &mut pixels)
                .map_err(|e| e.to_string())
        }),
    }));
    match decoded {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return Err(failed(reason)),
        Err(_) => return Err(failed("the decoder failed on malformed data".into())),
    }
    if pixels.len() != expected {
        return Err(failed(format!(
            "the decoder produced {} bytes where the header declares {bytes}",
            pixels.len()
        )));
    }
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    let photometric = decoded_photometric(&syntax, &source_photometric, geometry.samples);
    let vr = if geometry.sample_bytes == 1 {
        VR::OB
    } else {
        VR::OW
    };
    object.put(DataElement::new(
        tags::PIXEL_DATA,
        vr,
        PrimitiveValue::from(pixels),
    ));
    for tag in [
        tags::EXTENDED_OFFSET_TABLE,
        tags::EXTENDED_OFFSET_TABLE_LENGTHS,
        tags::ENCAPSULATED_PIXEL_DATA_VALUE_TOTAL_LENGTH,
    ] {
        object.remove_element(tag);
    }
    object.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from(photometric),
    ));
    if geometry.samples > 1 {
        object.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
    }
    mark_lossy(object, &syntax, bytes, compressed);
    object.update_meta(|meta| meta.set_transfer_syntax(&EXPLICIT_VR_LITTLE_ENDIAN));
    Ok(())
}

/// The encapsulated fragments of `object`, concatenated (a frame may span fragments).
fn fragments(object: &DicomFile) -> Vec<u8> {
    match object.get(tags::PIXEL_DATA).map(|e| e.value()) {
        Some(Value::PixelSequence(sequence)) => sequence.fragments().concat(),
        _ => Vec::new(),
    }
}

/// Decodes every JPEG frame with jpeg-decoder directly rather than through the
/// registry's adapter, for two reasons: the colour transform of a lossy colour image is
/// the one its Photometric Interpretation names (RGB: none; YBR_FULL, YBR_FULL_422:
/// YCbCr), where the adapter lets the decoder guess from JPEG markers DICOM writers
/// often omit (a JPEG of RGB samples without an Adobe marker was read as YCbCr); and each
/// frame's own size (its SOF) is checked against the header, already bounded, before its
/// samples are allocated.
fn decode_jpeg(
    object: &DicomFile,
    geometry: Geometry,
    photometric: &str,
    dst: &mut Vec<u8>,
) -> Result<(), String> {
    use jpeg_decoder::{ColorTransform, Decoder, PixelFormat};
    let data = fragments(object);
    let frame_bytes = usize::from(geometry.rows)
        * usize::from(geometry.columns)
        * usize::from(geometry.samples)
        * usize::from(geometry.sample_bytes);
    let mut at = 0usize;
    for frame in 0..geometry.frames {
        let start = data
            .get(at..)
            .and_then(|rest| rest.windows(2).position(|w| w == [0xFF, 0xD8]))
            .map(|p| at + p)
            .ok_or_else(|| format!("frame {} of {} is missing", frame + 1, geometry.frames))?;
        let mut cursor = std::io::Cursor::new(&data[start..]);
        let mut decoder = Decoder::new(&mut cursor);
        decoder.set_max_decoding_buffer_size(frame_bytes.saturating_mul(2).max(1 << 20));
        if geometry.samples == 3 {
            decoder.set_color_transform(match photometric {
                "RGB" => ColorTransform::RGB,
                _ => ColorTransform::YCbCr,
            });
        }
        decoder.read_info().map_err(|e| e.to_string())?;
        let info = decoder.info().ok_or_else(|| "no frame header".to_owned())?;
        let samples = match info.pixel_format {
            PixelFormat::L8 | PixelFormat::L16 => 1,
            PixelFormat::RGB24 => 3,
            PixelFormat::CMYK32 => 4,
        };
        if (info.width, info.height, samples) != (geometry.columns, geometry.rows, geometry.samples)
        {
            return Err(format!(
                "frame {} is {} x {} pixels of {samples} sample(s) where the header declares \
                 {} x {} of {}",
                frame + 1,
                info.width,
                info.height,
                geometry.columns,
                geometry.rows,
                geometry.samples
            ));
        }
        let pixels = decoder.decode().map_err(|e| e.to_string())?;
        if pixels.len() != frame_bytes {
            return Err(format!(
                "frame {} decoded to {} bytes where the header declares {frame_bytes}",
                frame + 1,
                pixels.len()
            ));
        }
        match info.pixel_format {
            // jpeg-decoder writes 16-bit samples in the machine's byte order.
            PixelFormat::L16 => dst.extend(
                pixels
                    .chunks_exact(2)
                    .flat_map(|b| u16::from_ne_bytes([b[0], b[1]]).to_le_bytes()),
            ),
            _ => dst.extend_from_slice(&pixels),
        }
        let consumed = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
        at = start.saturating_add(consumed.max(2));
    }
    Ok(())
}

/// Checks the image size in the SIZ segment of every JPEG 2000 frame's codestream
/// against the header (already bounded) before OpenJPEG allocates what the codestream
/// claims. DICOM carries bare codestreams (PS3.5 A.4.4), starting SOC, SIZ.
fn check_j2k_sizes(object: &DicomFile, geometry: Geometry) -> Result<(), String> {
    for frame in 0..geometry.frames {
        let data = object
            .frame_pixel_data(frame)
            .ok_or_else(|| format!("frame {} of {} is missing", frame + 1, geometry.frames))?;
        let field = |at: usize, len: usize| -> Option<u32> {
            let bytes = data.get(at..at.checked_add(len)?)?;
            Some(bytes.iter().fold(0u32, |v, b| (v << 8) | u32::from(*b)))
        };
        if field(0, 4) != Some(0xFF4F_FF51) {
            return Err(format!(
                "frame {} is not a JPEG 2000 codestream (SOC, SIZ)",
                frame + 1
            ));
        }
        let size = (|| {
            let (x, y) = (field(8, 4)?, field(12, 4)?);
            let (x0, y0) = (field(16, 4)?, field(20, 4)?);
            Some((x.checked_sub(x0)?, y.checked_sub(y0)?, field(40, 2)?))
        })()
        .ok_or_else(|| format!("frame {} has a malformed SIZ segment", frame + 1))?;
        let declared = (
            u32::from(geometry.columns),
            u32::from(geometry.rows),
            u32::from(geometry.samples),
        );
        if size != declared {
            return Err(format!(
                "frame {} is {} x {} pixels of {} component(s) where the header declares {} x \
                 {} of {}",
                frame + 1,
                size.0,
                size.1,
                size.2,
                declared.0,
                declared.1,
                declared.2
            ));
        }
    }
    Ok(())
}

/// Checks the 64-byte RLE header of every frame (PS3.5 G.3.1) before the registry's
/// decoder reads it: that decoder allocates as many offsets as the header's segment
/// count says (a 30-byte input asked for 7.6 GB, found by fuzzing). The count must be
/// one segment per byte of each sample (at most 15), each offset inside the frame.
fn check_rle_headers(object: &DicomFile, geometry: Geometry) -> Result<(), String> {
    let segments = u32::from(geometry.samples) * u32::from(geometry.sample_bytes);
    for frame in 0..geometry.frames {
        let data = object
            .frame_pixel_data(frame)
            .ok_or_else(|| format!("frame {} of {} is missing", frame + 1, geometry.frames))?;
        let word = |i: usize| -> Option<u32> {
            let bytes = data.get(i * 4..i * 4 + 4)?;
            Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        };
        let bad = || format!("frame {} has a malformed RLE header", frame + 1);
        if word(0) != Some(segments) {
            return Err(format!(
                "frame {} declares {:?} RLE segments where {} sample(s) of {} byte(s) need {segments}",
                frame + 1,
                word(0),
                geometry.samples,
                geometry.sample_bytes
            ));
        }
        for segment in 1..=segments as usize {
            let offset = word(segment).ok_or_else(bad)?;
            if offset < 64 || offset as usize >= data.len() {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// Photometric Interpretation (0028,0004) without padding; empty when missing.
fn photometric_of(object: &DicomFile) -> String {
    object
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

/// The Photometric Interpretation of what the registry's decoder of `syntax` produced
/// from an image in `source` with `samples` samples per pixel: a single sample keeps its
/// interpretation (MONOCHROME1, MONOCHROME2, PALETTE COLOR); lossy JPEG is converted
/// from YCbCr to RGB when its interpretation is YBR_FULL or YBR_FULL_422 ([`decode_jpeg`]);
/// JPEG 2000 applies the inverse component transform, so YBR_ICT and YBR_RCT become RGB;
/// lossless JPEG and RLE convert nothing, so YBR_FULL stays YBR_FULL.
pub fn decoded_photometric(syntax: &str, source: &str, samples: u16) -> String {
    if samples != 3 {
        return source.to_owned();
    }
    match syntax {
        JPEG_BASELINE8_BIT | JPEG_EXTENDED12_BIT => "RGB".into(),
        JPEG2000 | JPEG2000_LOSSLESS if matches!(source, "YBR_ICT" | "YBR_RCT") => "RGB".into(),
        _ => source.to_owned(),
    }
}

/// The method term of PS3.3 C.7.6.1.1.5.1 for a syntax that compresses lossily, `None`
/// for a lossless one. JPEG 2000 (.91) may be reversible: its own Lossy Image
/// Compression value is trusted when present.
fn lossy_method(syntax: &str) -> Option<&'static str> {
    match syntax {
        JPEG_BASELINE8_BIT | JPEG_EXTENDED12_BIT => Some("ISO_10918_1"),
        JPEG2000 => Some("ISO_15444_1"),
        _ => None,
    }
}

/// Keeps (or sets) Lossy Image Compression "01" for an image decoded from a lossy
/// syntax; the method and ratio are added only when the file had neither.
fn mark_lossy(object: &mut DicomFile, syntax: &str, decoded: u64, compressed: u64) {
    let Some(method) = lossy_method(syntax) else {
        return;
    };
    let declared = object
        .get(tags::LOSSY_IMAGE_COMPRESSION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_owned());
    match (syntax == JPEG2000, declared.as_deref()) {
        // Already marked lossy: kept, with its method and ratio.
        (_, Some("01")) => return,
        // JPEG 2000 (.91) declared reversible by its encoder: trusted.
        (true, Some("00")) => return,
        // JPEG baseline and extended are always lossy, whatever the file says; JPEG 2000
        // that does not say is not presented as lossless.
        _ => {}
    }
    object.put(DataElement::new(
        tags::LOSSY_IMAGE_COMPRESSION,
        VR::CS,
        PrimitiveValue::from("01"),
    ));
    let has = |tag| object.get(tag).is_some();
    if !has(tags::LOSSY_IMAGE_COMPRESSION_METHOD) && !has(tags::LOSSY_IMAGE_COMPRESSION_RATIO) {
        object.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION_METHOD,
            VR::CS,
            PrimitiveValue::from(method),
        ));
        let ratio = decoded as f64 / compressed.max(1) as f64;
        object.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION_RATIO,
            VR::DS,
            PrimitiveValue::from(format!("{ratio:.2}")),
        ));
    }
}

/// Bytes of decoded instances in flight at once (decoded data and its encoded copy):
/// twice [`MAX_DECODED_BYTES`], counted in MiB.
const IN_FLIGHT_MIB: u32 = 2 * (MAX_DECODED_BYTES >> 20) as u32;

/// The memory budget shared by every association that sends decoded instances.
static IN_FLIGHT: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(IN_FLIGHT_MIB as usize);

/// Waits until the memory for decoding `bytes` of pixel data (and encoding it again) is
/// free, and holds it until the returned permit is dropped (once the instance is sent).
pub async fn reserve(bytes: u64) -> tokio::sync::SemaphorePermit<'static> {
    let mib = (bytes.saturating_mul(2) >> 20).saturating_add(1);
    let mib = u32::try_from(mib).unwrap_or(u32::MAX).min(IN_FLIGHT_MIB);
    IN_FLIGHT
        .acquire_many(mib)
        .await
        .expect("the budget is static and never closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::PixelFragmentSequence;
    use dicom_object::FileMetaTableBuilder;

    /// An image of `rows` x `columns` 8-bit samples in `syntax`, with `pixel_data`.
    fn image(
        syntax: &str,
        rows: u16,
        columns: u16,
        samples: u16,
        pixel_data: Value<InMemDicomObject>,
    ) -> DicomFile {
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(syntax)
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
            .media_storage_sop_instance_uid("1.2.3.4")
            .build()
            .expect("a complete meta group");
        let mut object = DicomFile::new_empty_with_meta(meta);
        let photometric = if samples == 3 { "RGB" } else { "MONOCHROME2" };
        for (tag, vr, value) in [
            (
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ),
            (tags::ROWS, VR::US, PrimitiveValue::from(rows)),
            (tags::COLUMNS, VR::US, PrimitiveValue::from(columns)),
            (
                tags::SAMPLES_PER_PIXEL,
                VR::US,
                PrimitiveValue::from(samples),
            ),
            (tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16)),
            (tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16)),
            (tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16)),
            (
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(0u16),
            ),
            (
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(photometric),
            ),
        ] {
            object.put(DataElement::new(tag, vr, value));
        }
        object.put(DataElement::new(tags::PIXEL_DATA, VR::OB, pixel_data));
        object
    }

    /// A JPEG baseline image of a `size` x `size` monochrome gradient, encoded by the
    /// registry's JPEG writer, and the gradient itself.
    fn jpeg(size: u16) -> (DicomFile, Vec<u8>) {
        let pixels: Vec<u8> = (0..usize::from(size) * usize::from(size))
            .map(|i| (i % 251) as u8)
            .collect();
        let native = image(
            dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN,
            size,
            size,
            1,
            Value::from(PrimitiveValue::from(pixels.clone())),
        );
        let Some(Codec::EncapsulatedPixelData(_, Some(writer))) = TransferSyntaxRegistry
            .get(JPEG_BASELINE8_BIT)
            .map(|ts| ts.codec())
        else {
            panic!("the JPEG writer is built");
        };
        let (mut fragments, mut offsets) = (Vec::new(), Vec::new());
        let mut options = dicom_encoding::adapters::EncodeOptions::new();
        options.quality = Some(100);
        writer
            .encode(&native, options, &mut fragments, &mut offsets)
            .expect("the gradient encodes");
        let sequence = PixelFragmentSequence::new(offsets, fragments);
        (
            image(
                JPEG_BASELINE8_BIT,
                size,
                size,
                1,
                Value::PixelSequence(sequence),
            ),
            pixels,
        )
    }

    #[test]
    fn a_jpeg_is_decoded_to_explicit_le_and_stays_marked_lossy() {
        let (mut object, pixels) = jpeg(16);
        decode(&mut object, MAX_DECODED_BYTES).expect("a 16 x 16 JPEG decodes");
        assert_eq!(
            object.meta().transfer_syntax(),
            dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN
        );
        let decoded = object
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.to_bytes().ok())
            .expect("native pixel data");
        assert_eq!(decoded.len(), pixels.len());
        let worst = decoded
            .iter()
            .zip(&pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(worst.is_some_and(|d| d <= 4), "quality 100: {worst:?}");
        let text = |tag| {
            object
                .get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim().to_owned())
                .expect("attribute present")
        };
        assert_eq!(text(tags::LOSSY_IMAGE_COMPRESSION), "01");
        assert_eq!(text(tags::LOSSY_IMAGE_COMPRESSION_METHOD), "ISO_10918_1");
        assert_eq!(text(tags::SOP_INSTANCE_UID), "1.2.3.4");
        assert_eq!(text(tags::PHOTOMETRIC_INTERPRETATION), "MONOCHROME2");
    }

    #[test]
    fn a_claimed_size_over_the_limit_is_refused_before_anything_is_allocated() {
        let (mut object, _) = jpeg(16);
        for (tag, value) in [(tags::ROWS, 65535u16), (tags::COLUMNS, 65535)] {
            object.put(DataElement::new(tag, VR::US, PrimitiveValue::from(value)));
        }
        object.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from("2147483647"),
        ));
        let refused = decode(&mut object, MAX_DECODED_BYTES).expect_err("refused");
        assert!(
            matches!(refused, TranscodeError::TooLarge { bytes, .. } if bytes > MAX_DECODED_BYTES)
        );
        assert!(
            refused.to_string().contains(
                "65535 rows x 65535 columns x 2147483647 frame(s) x 1 sample(s) x 1 byte(s)), \
                 over the limit of 1073741824 bytes"
            ),
            "{refused}"
        );
        assert_eq!(
            object.meta().transfer_syntax(),
            JPEG_BASELINE8_BIT,
            "left as it was"
        );
        let (object, _) = jpeg(16);
        assert!(matches!(
            decoded_size(&object, 255),
            Err(TranscodeError::TooLarge { bytes: 256, .. })
        ));
    }

    #[test]
    fn a_frame_larger_than_the_header_says_is_refused_before_it_is_decoded() {
        let (mut object, _) = jpeg(64);
        for tag in [tags::ROWS, tags::COLUMNS] {
            object.put(DataElement::new(tag, VR::US, PrimitiveValue::from(8u16)));
        }
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains(
                "frame 1 is 64 x 64 pixels of 1 sample(s) where the header declares 8 x 8 of 1"
            ),
            "{refused}"
        );
    }

    #[test]
    fn a_codestream_whose_size_disagrees_with_the_header_is_refused() {
        // SOC, SIZ: 4096 x 4096, one component, where the header says 8 x 8.
        let mut siz = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for v in [4096u32, 4096, 0, 0, 4096, 4096, 0, 0] {
            siz.extend_from_slice(&v.to_be_bytes());
        }
        siz.extend_from_slice(&[0, 1, 7, 1, 1]);
        let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), vec![siz]);
        let mut object = image(JPEG2000_LOSSLESS, 8, 8, 1, Value::PixelSequence(sequence));
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains("frame 1 is 4096 x 4096 pixels of 1 component(s) where the header declares 8 x 8 of 1"),
            "{refused}"
        );
    }

    #[test]
    fn an_rle_header_claiming_more_segments_than_the_samples_have_is_refused() {
        // As the fuzzer found: a segment count of 67,109,746 for an RGB image (3 segments).
        let mut header = vec![0u8; 64];
        header[0..4].copy_from_slice(&0x0400_0372u32.to_le_bytes());
        let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), vec![header]);
        let mut object = image(RLE_LOSSLESS, 100, 100, 3, Value::PixelSequence(sequence));
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains(
                "frame 1 declares Some(67109746) RLE segments where 3 sample(s) of 1 byte(s) need 3"
            ),
            "{refused}"
        );
    }

    #[test]
    fn attributes_the_decoders_cannot_take_are_named() {
        let (mut object, _) = jpeg(16);
        object.put(DataElement::new(
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(12u16),
        ));
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains("Bits Allocated (0028,0100) is 12, which cannot be decoded (8 or 16)"),
            "{refused}"
        );
        let (mut object, _) = jpeg(16);
        object.remove_element(tags::ROWS);
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(refused.contains("Rows (0028,0010) is missing"), "{refused}");
        let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), vec![vec![0xFF, 0xD8]]);
        let mut jpeg_ls = image(
            "1.2.840.10008.1.2.4.80",
            16,
            16,
            1,
            Value::PixelSequence(sequence),
        );
        assert!(matches!(
            decode(&mut jpeg_ls, MAX_DECODED_BYTES),
            Err(TranscodeError::NoDecoder(_))
        ));
    }

    #[test]
    fn colour_is_named_as_each_decoder_leaves_it() {
        assert_eq!(
            decoded_photometric(JPEG_BASELINE8_BIT, "YBR_FULL_422", 3),
            "RGB"
        );
        assert_eq!(decoded_photometric(JPEG2000, "YBR_ICT", 3), "RGB");
        assert_eq!(
            decoded_photometric(JPEG2000_LOSSLESS, "YBR_FULL", 3),
            "YBR_FULL"
        );
        assert_eq!(decoded_photometric(RLE_LOSSLESS, "YBR_FULL", 3), "YBR_FULL");
        assert_eq!(
            decoded_photometric(JPEG_LOSSLESS_SV1, "YBR_FULL", 3),
            "YBR_FULL"
        );
        assert_eq!(
            decoded_photometric(JPEG_BASELINE8_BIT, "MONOCHROME1", 1),
            "MONOCHROME1"
        );
        assert_eq!(
            decoded_photometric(RLE_LOSSLESS, "PALETTE COLOR", 1),
            "PALETTE COLOR"
        );
    }
}
