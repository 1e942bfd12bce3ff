//! Decoding compressed pixel data for a PACS that refuses the instance's transfer syntax
//! (`inbound.transcode = "when-refused"`): the encapsulated pixel data becomes native
//! pixel data, to be sent in Explicit VR Little Endian (or Implicit, if that is all the
//! PACS accepted).
//!
//! The codecs are those of dicom-rs's transfer syntax registry that build on a fresh
//! machine with a C compiler and no system library or cmake: JPEG baseline, extended and
//! lossless (jpeg-decoder), JPEG 2000 (OpenJPEG 2.5, the C library vendored and compiled
//! by openjpeg-sys; openjp2, its Rust port, frees memory it never allocated, undefined
//! behaviour, on valid files) and RLE Lossless. JPEG-LS would need CharLS, built with
//! cmake, so it is not decoded; see docs/dependencies.md.
//!
//! What stays and what changes: the SOP Instance UID stays (decoding is a change of
//! encoding, not a new instance); Bits Allocated, Bits Stored, High Bit and Pixel
//! Representation stay; Photometric Interpretation becomes what the decoder produced
//! (RGB where it converts colours, see [`decoded_photometric`]); Planar Configuration
//! becomes 0 (interleaved) for colour images. An image that was compressed lossily (JPEG
//! baseline or extended; JPEG 2000 whose codestream uses the 9/7 irreversible wavelet)
//! keeps Lossy Image Compression (0028,2110) "01" (set if the file lacked it, with the
//! method and ratio of this compression when neither is present): decoding does not
//! bring the lost detail back, and the PACS must not show it as lossless.
//!
//! Bounds: the decoded size (rows x columns x frames x samples x bytes per sample) is
//! computed before anything is allocated and refused above [`MAX_DECODED_BYTES`], and a
//! JPEG 2000 frame above [`MAX_J2K_FRAME_SAMPLES`]; what decoding holds at its peak (the
//! decoded data, its re-encoded copy, the codec's working memory for a frame:
//! [`memory_needed`]) is reserved from a budget of twice [`MAX_DECODED_BYTES`] shared by
//! every association ([`reserve`]), so parallel associations cannot multiply it. Frames
//! are found once, in one pass over the fragments ([`frames_of`]). Each JPEG 2000 frame's
//! SIZ (size, components, precision, sign, subsampling) and COD (wavelet, colour
//! transform), each RLE frame's header, and each JPEG frame's SOF are checked against the
//! header before the codec allocates what they claim. A panic inside a codec crate (the
//! registry's adapters index their output by values read from the data; jpeg-decoder
//! panics on some sample precisions) is caught with `catch_unwind` and reported as a
//! damaged file, not a crash of the import: the decoders only read the object and write
//! into a buffer that is dropped on failure, so nothing they leave half-done is used. The
//! panic's message still reaches the process's panic hook (the log's standard error)
//! once.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use dicom_core::value::{C, Value};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_dictionary_std::uids::{
    JPEG_BASELINE8_BIT, JPEG_EXTENDED12_BIT, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG2000,
    JPEG2000_LOSSLESS, RLE_LOSSLESS,
};
use dicom_encoding::adapters::{PixelDataObject, RawPixelData};
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
    /// A JPEG 2000 frame over [`MAX_J2K_FRAME_SAMPLES`]: the decoder's working memory
    /// for it would exceed 1 GiB.
    #[error(
        "a frame of {rows} rows x {columns} columns x {components} component(s) is \
         {samples} samples, over the limit of {limit} samples for one JPEG 2000 frame (the \
         decoder needs 8 bytes per sample): it is not decoded; configure the PACS to \
         accept transfer syntax {syntax}"
    )]
    FrameTooLarge {
        /// Samples in one frame.
        samples: u64,
        /// Rows.
        rows: u16,
        /// Columns.
        columns: u16,
        /// Samples per Pixel.
        components: u16,
        /// [`MAX_J2K_FRAME_SAMPLES`].
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

/// The memory decoding `object` takes at its peak, in bytes, checked against `limit`
/// (for the decoded size) without decoding anything: what [`reserve`] is asked for
/// before [`decode`] runs. It counts the decoded pixel data, its encoded copy (the
/// dataset written for the PACS) and the decoder's working memory for one frame:
/// OpenJPEG holds each sample of a frame twice as a 32-bit integer (its tile and its
/// image, [`J2K_WORKING_BYTES_PER_SAMPLE`]); jpeg-decoder its component planes, upsampled,
/// and its output (3 frames' bytes); the RLE decoder one segment (1 frame's bytes at most).
///
/// # Errors
/// [`TranscodeError::NoDecoder`], [`TranscodeError::Attribute`],
/// [`TranscodeError::TooLarge`] or [`TranscodeError::FrameTooLarge`].
pub fn memory_needed(object: &DicomFile, limit: u64) -> Result<u64, TranscodeError> {
    let (geometry, bytes) = geometry(object, limit)?;
    let frame_samples = geometry.frame_samples();
    let frame_bytes = frame_samples * u64::from(geometry.sample_bytes);
    let working = match syntax_of(object).as_str() {
        JPEG2000 | JPEG2000_LOSSLESS => frame_samples * J2K_WORKING_BYTES_PER_SAMPLE,
        RLE_LOSSLESS => frame_bytes,
        _ => frame_bytes * 3,
    };
    Ok(bytes.saturating_mul(2).saturating_add(working))
}

/// OpenJPEG's working memory per sample of a frame: a 32-bit integer in its tile buffer
/// and another in the decoded image's component planes.
const J2K_WORKING_BYTES_PER_SAMPLE: u64 = 8;

/// Largest JPEG 2000 frame, in samples (rows x columns x components): 2^27 (134 million,
/// e.g. 11,585 x 11,585 monochrome or 6,688 x 6,688 RGB), so that OpenJPEG's working
/// memory for one frame stays within 1 GiB ([`J2K_WORKING_BYTES_PER_SAMPLE`]). Larger
/// single frames (a whole slide not cut into tiles) are refused before decoding.
pub const MAX_J2K_FRAME_SAMPLES: u64 = 1 << 27;

impl Geometry {
    /// Samples in one frame: rows x columns x samples per pixel.
    fn frame_samples(self) -> u64 {
        u64::from(self.rows) * u64::from(self.columns) * u64::from(self.samples)
    }
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
    if matches!(syntax.as_str(), JPEG2000 | JPEG2000_LOSSLESS)
        && geometry.frame_samples() > MAX_J2K_FRAME_SAMPLES
    {
        return Err(TranscodeError::FrameTooLarge {
            samples: geometry.frame_samples(),
            rows: geometry.rows,
            columns: geometry.columns,
            components: geometry.samples,
            limit: MAX_J2K_FRAME_SAMPLES,
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
    let source_photometric = photometric_of(object);
    let source: &DicomFile = object;
    // What the codestreams say about their coding (JPEG 2000 only): whether a 9/7
    // irreversible wavelet was used, and whether the colour transform was applied.
    let mut coding = Coding::default();
    let frames = match syntax.as_str() {
        JPEG2000 | JPEG2000_LOSSLESS => {
            let frames = frames_of(source, geometry, &syntax).map_err(failed)?;
            let signed = pixel_representation(source, &syntax)?;
            coding = check_j2k(&frames, geometry, signed).map_err(failed)?;
            Some(frames)
        }
        RLE_LOSSLESS => {
            let frames = frames_of(source, geometry, &syntax).map_err(failed)?;
            check_rle_headers(&frames, geometry).map_err(failed)?;
            Some(frames)
        }
        _ => None,
    };
    let photometric =
        decoded_photometric(&syntax, &source_photometric, geometry.samples, coding.mct)
            .map_err(failed)?;
    let mut pixels: Vec<u8> = Vec::new();
    pixels
        .try_reserve_exact(expected.saturating_add(1))
        .map_err(|_| failed(format!("{bytes} bytes of memory are not available")))?;
    let decoded = catch_unwind(AssertUnwindSafe(|| match frames {
        None => decode_jpeg(source, geometry, &source_photometric, &mut pixels),
        Some(frames) => reader
            .decode(
                &OnePerFrame {
                    object: source,
                    frames,
                },
                &mut pixels,
            )
            .map_err(|e| e.to_string()),
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
    mark_lossy(object, &syntax, coding.irreversible, bytes, compressed);
    object.update_meta(|meta| meta.set_transfer_syntax(&EXPLICIT_VR_LITTLE_ENDIAN));
    Ok(())
}

/// The compressed bytes of each frame, found in one pass over the fragments (the
/// registry's `frame_pixel_data` walks from the first fragment for every frame: quadratic
/// in the fragments of a multi-frame image). One fragment per frame is taken as it is; a
/// single frame may span any number of fragments; several frames spread over fragments
/// need a Basic Offset Table whose every entry starts a fragment (the registry's decoder
/// finds no frame after the first without one). RLE Lossless carries each frame in
/// exactly one fragment (PS3.5 G.2): anything else is refused, since the registry's RLE
/// decoder reads one frame per fragment whatever Number of Frames says.
fn frames_of<'a>(
    object: &'a DicomFile,
    geometry: Geometry,
    syntax: &str,
) -> Result<Vec<Cow<'a, [u8]>>, String> {
    let Some(Value::PixelSequence(sequence)) = object.get(tags::PIXEL_DATA).map(|e| e.value())
    else {
        return Err("its pixel data is not encapsulated".into());
    };
    let fragments = sequence.fragments();
    let frames = usize::try_from(geometry.frames).unwrap_or(usize::MAX);
    if fragments.len() == frames {
        return Ok(fragments
            .iter()
            .map(|f| Cow::Borrowed(f.as_slice()))
            .collect());
    }
    if syntax == RLE_LOSSLESS {
        return Err(format!(
            "it has {} fragment(s) for {frames} frame(s), where RLE Lossless carries each \
             frame in exactly one fragment (PS3.5 G.2)",
            fragments.len()
        ));
    }
    if frames == 1 {
        return Ok(vec![Cow::Owned(fragments.concat())]);
    }
    let table = sequence.offset_table();
    let misplaced = || {
        format!(
            "its {frames} frames are spread over {} fragments without a Basic Offset Table \
             whose {frames} entries each start a fragment",
            fragments.len()
        )
    };
    if frames > fragments.len() || table.len() != frames {
        return Err(misplaced());
    }
    let mut grouped: Vec<Vec<&[u8]>> = Vec::with_capacity(frames);
    let mut starts = table.iter().map(|&offset| u64::from(offset)).peekable();
    let mut position = 0u64;
    for fragment in fragments {
        match starts.peek() {
            Some(&start) if start == position => {
                starts.next();
                grouped.push(Vec::new());
            }
            Some(&start) if start < position => return Err(misplaced()),
            _ => {}
        }
        grouped
            .last_mut()
            .ok_or_else(misplaced)?
            .push(fragment.as_slice());
        // Each fragment is an item: an 8-byte header, then its bytes.
        position = position.saturating_add(8 + fragment.len() as u64);
    }
    if starts.next().is_some() {
        return Err(misplaced());
    }
    Ok(grouped
        .into_iter()
        .map(|parts| match parts.as_slice() {
            [one] => Cow::Borrowed(*one),
            _ => Cow::Owned(parts.concat()),
        })
        .collect())
}

/// `object` as the registry's decoders read it, with exactly one fragment per frame (the
/// frames of [`frames_of`]), so that their `frame_pixel_data` takes each frame as it is.
struct OnePerFrame<'a> {
    object: &'a DicomFile,
    frames: Vec<Cow<'a, [u8]>>,
}

impl PixelDataObject for OnePerFrame<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        self.object.transfer_syntax_uid()
    }

    fn rows(&self) -> Option<u16> {
        self.object.rows()
    }

    fn cols(&self) -> Option<u16> {
        self.object.cols()
    }

    fn samples_per_pixel(&self) -> Option<u16> {
        self.object.samples_per_pixel()
    }

    fn bits_allocated(&self) -> Option<u16> {
        self.object.bits_allocated()
    }

    fn bits_stored(&self) -> Option<u16> {
        self.object.bits_stored()
    }

    fn photometric_interpretation(&self) -> Option<&str> {
        self.object.photometric_interpretation()
    }

    fn number_of_frames(&self) -> Option<u32> {
        u32::try_from(self.frames.len()).ok()
    }

    fn number_of_fragments(&self) -> Option<u32> {
        u32::try_from(self.frames.len()).ok()
    }

    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        self.frames.get(fragment).map(|f| Cow::Borrowed(f.as_ref()))
    }

    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        None
    }

    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        Some(RawPixelData {
            fragments: self.frames.iter().map(|f| f.to_vec()).collect(),
            offset_table: C::new(),
        })
    }
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

/// What the main header of a JPEG 2000 codestream says about its coding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Coding {
    /// The 9/7 irreversible wavelet (COD transformation 0): the image is lossy whatever
    /// the file declares.
    irreversible: bool,
    /// The multiple component transform (COD SGcod MCT 1): the decoder turns the three
    /// components back into RGB.
    mct: bool,
}

/// Decoded frames of this size or more (16 MiB) are refused by the registry's JPEG 2000
/// and RLE decoders when the compressed data is implausibly small; checked here first so
/// that the refusal names its cause.
const PLAUSIBLE_FRAME_BYTES: u64 = 16 << 20;

/// The compression ratio above which the registry's JPEG 2000 decoder refuses a frame of
/// [`PLAUSIBLE_FRAME_BYTES`] or more.
const J2K_MAX_RATIO: u64 = 64;

/// The compression ratio above which the registry's RLE decoder refuses a frame (or a
/// segment) of [`PLAUSIBLE_FRAME_BYTES`] or more.
const RLE_MAX_RATIO: u64 = 32;

/// Refuses what the registry's allocation guard would refuse, saying why: `decoded`
/// bytes of at least [`PLAUSIBLE_FRAME_BYTES`] from fewer than `decoded / ratio`
/// compressed bytes.
fn check_ratio(what: &str, decoded: u64, compressed: u64, ratio: u64) -> Result<(), String> {
    if decoded >= PLAUSIBLE_FRAME_BYTES && compressed < decoded / ratio {
        return Err(format!(
            "{what} would decode to {decoded} bytes from {compressed} compressed bytes, a \
             ratio over {ratio}:1 that the decoder refuses as implausible for frames of \
             {PLAUSIBLE_FRAME_BYTES} bytes or more"
        ));
    }
    Ok(())
}

/// Checks the SIZ segment of every JPEG 2000 frame's codestream against the header
/// (already bounded) before OpenJPEG allocates what the codestream claims, and reads the
/// main header's COD segment. DICOM carries bare codestreams (PS3.5 A.4.4), starting
/// SOC, SIZ. The registry's decoder writes each component's samples, truncated to Bits
/// Allocated, where a full-size component would go: every component must therefore be
/// full size (XRsiz = YRsiz = 1), fit in Bits Allocated, and be signed exactly when Pixel
/// Representation says so, or the image would be stored with zeros or wrapped values.
/// All frames must agree on the colour transform; any frame coded with the 9/7 wavelet
/// makes the image lossy.
fn check_j2k(frames: &[Cow<'_, [u8]>], geometry: Geometry, signed: bool) -> Result<Coding, String> {
    let mut coding: Option<Coding> = None;
    for (frame, data) in frames.iter().enumerate() {
        let frame = frame + 1;
        let field = |at: usize, len: usize| -> Option<u32> {
            let bytes = data.get(at..at.checked_add(len)?)?;
            Some(bytes.iter().fold(0u32, |v, b| (v << 8) | u32::from(*b)))
        };
        if data.starts_with(&[0, 0, 0, 0x0C, 0x6A, 0x50, 0x20, 0x20]) {
            return Err(format!(
                "frame {frame} is a JP2 file (a codestream wrapped in JP2 boxes), where DICOM \
                 carries the bare codestream (PS3.5 A.4.4)"
            ));
        }
        if field(0, 4) != Some(0xFF4F_FF51) {
            return Err(format!(
                "frame {frame} is not a JPEG 2000 codestream (SOC, SIZ)"
            ));
        }
        let size = (|| {
            let (x, y) = (field(8, 4)?, field(12, 4)?);
            let (x0, y0) = (field(16, 4)?, field(20, 4)?);
            Some((x.checked_sub(x0)?, y.checked_sub(y0)?, field(40, 2)?))
        })()
        .ok_or_else(|| format!("frame {frame} has a malformed SIZ segment"))?;
        let declared = (
            u32::from(geometry.columns),
            u32::from(geometry.rows),
            u32::from(geometry.samples),
        );
        if size != declared {
            return Err(format!(
                "frame {frame} is {} x {} pixels of {} component(s) where the header declares \
                 {} x {} of {}",
                size.0, size.1, size.2, declared.0, declared.1, declared.2
            ));
        }
        let bits_allocated = 8 * u32::from(geometry.sample_bytes);
        for component in 0..usize::from(geometry.samples) {
            let at = 42 + 3 * component;
            let (ssiz, xrsiz, yrsiz) =
                (|| Some((field(at, 1)?, field(at + 1, 1)?, field(at + 2, 1)?)))()
                    .ok_or_else(|| format!("frame {frame} has a malformed SIZ segment"))?;
            let number = component + 1;
            if (xrsiz, yrsiz) != (1, 1) {
                return Err(format!(
                    "frame {frame} component {number} is subsampled ({xrsiz} x {yrsiz}), where \
                     the decoded image needs every sample of every component"
                ));
            }
            let precision = (ssiz & 0x7F) + 1;
            if precision > bits_allocated {
                return Err(format!(
                    "frame {frame} component {number} has {precision}-bit samples, more than \
                     Bits Allocated (0028,0100) {bits_allocated}"
                ));
            }
            if (ssiz & 0x80 != 0) != signed {
                return Err(format!(
                    "frame {frame} component {number} is {} where Pixel Representation \
                     (0028,0103) is {}",
                    if signed { "unsigned" } else { "signed" },
                    if signed { "1 (signed)" } else { "0 (unsigned)" }
                ));
            }
        }
        let frame_bytes = u64::from(geometry.rows)
            * u64::from(geometry.columns)
            * u64::from(geometry.samples)
            * u64::from(geometry.sample_bytes);
        check_ratio(
            &format!("frame {frame}"),
            frame_bytes,
            data.len() as u64,
            J2K_MAX_RATIO,
        )?;
        let this = main_cod(data).map_err(|reason| format!("frame {frame} {reason}"))?;
        match coding {
            Some(first) if first.mct != this.mct && geometry.samples == 3 => {
                return Err(format!(
                    "frame {frame} {} the colour transform where frame 1 {}",
                    if this.mct {
                        "applies"
                    } else {
                        "does not apply"
                    },
                    if first.mct { "does" } else { "does not" }
                ));
            }
            Some(first) => {
                coding = Some(Coding {
                    irreversible: first.irreversible || this.irreversible,
                    mct: first.mct,
                });
            }
            None => coding = Some(this),
        }
    }
    Ok(coding.unwrap_or_default())
}

/// Reads the COD segment (FF52) of a codestream's main header (ISO 15444-1 A.6.1): the
/// marker segments after SIZ up to the first tile-part (SOT, FF90), each with its length.
/// The wavelet (SPcod transformation: 0 = 9/7 irreversible, 1 = 5/3 reversible) and the
/// multiple component transform (SGcod) come from there; COD and COC segments of tile-part
/// headers, which may override them per tile, are not read.
fn main_cod(data: &[u8]) -> Result<Coding, String> {
    let word = |at: usize| -> Option<usize> {
        let bytes = data.get(at..at.checked_add(2)?)?;
        Some(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
    };
    let malformed = || "has a malformed main header (no COD segment before the first tile)";
    // SOC (2 bytes), then SIZ: its marker and its length.
    let mut at = word(4)
        .and_then(|length| length.checked_add(4))
        .ok_or_else(malformed)?;
    loop {
        let marker = word(at).ok_or_else(malformed)?;
        let length = word(at + 2).ok_or_else(malformed)?;
        match marker {
            0xFF52 => {
                // Lcod, Scod, SGcod (progression, 2 bytes of layers, MCT), SPcod
                // (levels, code-block width, height, style, transformation).
                let byte = |offset: usize| data.get(at + offset).copied();
                let (mct, transformation) = byte(8).zip(byte(13)).ok_or_else(malformed)?;
                return Ok(Coding {
                    irreversible: transformation == 0,
                    mct: mct == 1,
                });
            }
            0xFF90 => return Err(malformed().into()),
            _ if length < 2 => return Err(malformed().into()),
            _ => at = at.checked_add(2 + length).ok_or_else(malformed)?,
        }
    }
}

/// Pixel Representation (0028,0103): whether the samples are signed. JPEG 2000 needs it
/// to check each component's sign.
fn pixel_representation(object: &DicomFile, syntax: &str) -> Result<bool, TranscodeError> {
    let element = object.get(tags::PIXEL_REPRESENTATION);
    match element.map(|e| e.to_int::<i64>()) {
        Some(Ok(0)) => Ok(false),
        Some(Ok(1)) => Ok(true),
        found => Err(TranscodeError::Attribute {
            name: "Pixel Representation (0028,0103)",
            found: match found {
                Some(Ok(v)) => v.to_string(),
                Some(Err(_)) => crate::telemetry::escape(
                    &element.and_then(|e| e.to_str().ok()).unwrap_or_default(),
                ),
                None => "missing".into(),
            },
            expected: "0 or 1",
            syntax: syntax.to_owned(),
        }),
    }
}

/// Checks the 64-byte RLE header of every frame (PS3.5 G.3.1), one fragment each
/// ([`frames_of`]), before the registry's decoder reads it: that decoder allocates as
/// many offsets as the header's segment count says (a 30-byte input asked for 7.6 GB,
/// found by fuzzing). The count must be one segment per byte of each sample (at most 6),
/// each offset inside the frame; the decoded size must be plausible for the compressed
/// one ([`check_ratio`]).
fn check_rle_headers(frames: &[Cow<'_, [u8]>], geometry: Geometry) -> Result<(), String> {
    let segments = u32::from(geometry.samples) * u32::from(geometry.sample_bytes);
    let segment_bytes = u64::from(geometry.rows) * u64::from(geometry.columns);
    let frame_bytes = segment_bytes * u64::from(segments);
    let total = frame_bytes.saturating_mul(frames.len() as u64);
    let first = frames.first().map_or(0, |f| f.len() as u64);
    // The registry's decoder sizes its output from the first frame's length.
    check_ratio(
        "the image",
        total,
        first.saturating_mul(frames.len() as u64),
        RLE_MAX_RATIO,
    )?;
    for (frame, data) in frames.iter().enumerate() {
        let frame = frame + 1;
        let word = |i: usize| -> Option<u32> {
            let bytes = data.get(i * 4..i * 4 + 4)?;
            Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        };
        let bad = || format!("frame {frame} has a malformed RLE header");
        if word(0) != Some(segments) {
            return Err(format!(
                "frame {frame} declares {:?} RLE segments where {} sample(s) of {} byte(s) need {segments}",
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
        check_ratio(
            &format!("a segment of frame {frame}"),
            segment_bytes,
            data.len() as u64,
            RLE_MAX_RATIO,
        )?;
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

/// The Photometric Interpretation of what the decoder of `syntax` produces from an image
/// in `source` with `samples` samples per pixel, or why the result would be mislabelled:
/// a single sample keeps its interpretation (MONOCHROME1, MONOCHROME2, PALETTE COLOR);
/// lossy JPEG is converted from full-range YCbCr to RGB when its interpretation is
/// YBR_FULL or YBR_FULL_422 ([`decode_jpeg`]; YBR_PARTIAL_* would need another
/// conversion and is refused); JPEG 2000 turns YBR_ICT and YBR_RCT into RGB when its
/// codestream applies the colour transform (`mct`, from COD), and without it they are
/// refused (the samples would be neither RGB nor what the interpretation says); lossless
/// JPEG and RLE convert nothing, so YBR_FULL stays YBR_FULL.
fn decoded_photometric(
    syntax: &str,
    source: &str,
    samples: u16,
    mct: bool,
) -> Result<String, String> {
    if samples != 3 {
        return Ok(source.to_owned());
    }
    match syntax {
        JPEG_BASELINE8_BIT | JPEG_EXTENDED12_BIT => match source {
            "RGB" | "YBR_FULL" | "YBR_FULL_422" => Ok("RGB".into()),
            other => Err(format!(
                "its Photometric Interpretation is {}, which is converted to RGB only as \
                 RGB, YBR_FULL or YBR_FULL_422",
                crate::telemetry::escape(other)
            )),
        },
        JPEG2000 | JPEG2000_LOSSLESS if matches!(source, "YBR_ICT" | "YBR_RCT") => match mct {
            true => Ok("RGB".into()),
            false => Err(format!(
                "its Photometric Interpretation is {source} but the codestream does not apply \
                 the colour transform (COD multiple component transform 0)"
            )),
        },
        _ => Ok(source.to_owned()),
    }
}

/// Keeps (or sets) Lossy Image Compression "01" for an image decoded from lossy coding:
/// JPEG baseline and extended always, JPEG 2000 when a codestream used the 9/7
/// irreversible wavelet (`irreversible`), whatever the file declared; the method and
/// ratio are added only when the file had neither. Reversible JPEG 2000 (5/3) keeps the
/// file's own value, absent if absent: its encoder may have quantized before coding.
fn mark_lossy(
    object: &mut DicomFile,
    syntax: &str,
    irreversible: bool,
    decoded: u64,
    compressed: u64,
) {
    let method = match syntax {
        JPEG_BASELINE8_BIT | JPEG_EXTENDED12_BIT => "ISO_10918_1",
        JPEG2000 | JPEG2000_LOSSLESS if irreversible => "ISO_15444_1",
        _ => return,
    };
    let declared = object
        .get(tags::LOSSY_IMAGE_COMPRESSION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_owned());
    if declared.as_deref() == Some("01") {
        return;
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

/// Bytes of decoding in flight at once, counted in MiB: twice [`MAX_DECODED_BYTES`]. An
/// instance that needs more ([`memory_needed`]) waits until it has the whole budget, and
/// is then decoded alone.
const IN_FLIGHT_MIB: u32 = 2 * (MAX_DECODED_BYTES >> 20) as u32;

/// The memory budget shared by every association that sends decoded instances.
static IN_FLIGHT: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(IN_FLIGHT_MIB as usize);

/// The budget's share for `bytes` ([`memory_needed`]), in MiB.
fn share(bytes: u64) -> u32 {
    let mib = (bytes >> 20).saturating_add(1);
    u32::try_from(mib).unwrap_or(u32::MAX).min(IN_FLIGHT_MIB)
}

/// Takes the memory for decoding an instance that needs `bytes` ([`memory_needed`]) if
/// it is free now, without waiting: the caller can then free what it holds (an idle
/// association) before it waits with [`reserve`].
pub fn try_reserve(bytes: u64) -> Option<tokio::sync::SemaphorePermit<'static>> {
    IN_FLIGHT.try_acquire_many(share(bytes)).ok()
}

/// Waits until the memory for decoding an instance that needs `bytes` is free
/// ([`memory_needed`]), and holds it until the returned permit is dropped: move the
/// permit into the blocking task that decodes, and keep it until the bytes are sent, so
/// that a cancelled send does not free memory a decoder still uses.
pub async fn reserve(bytes: u64) -> tokio::sync::SemaphorePermit<'static> {
    IN_FLIGHT
        .acquire_many(share(bytes))
        .await
        .expect("the budget is static and never closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::PixelFragmentSequence;
    use dicom_object::FileMetaTableBuilder;

    /// Sets the Number of Frames of `object` (text, as an IS value).
    fn frames(object: &mut InMemDicomObject, count: &str) {
        object.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(count),
        ));
    }

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
        frames(&mut object, "2147483647");
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
            memory_needed(&object, 255),
            Err(TranscodeError::TooLarge { bytes: 256, .. })
        ));
        assert_eq!(
            memory_needed(&object, 256).expect("within the limit"),
            2 * 256 + 3 * 256,
            "decoded, encoded copy and jpeg-decoder's working memory"
        );
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
        let named = |syntax, source, samples, mct| {
            decoded_photometric(syntax, source, samples, mct).expect("converted or kept")
        };
        assert_eq!(named(JPEG_BASELINE8_BIT, "YBR_FULL_422", 3, false), "RGB");
        assert_eq!(named(JPEG2000, "YBR_ICT", 3, true), "RGB");
        assert_eq!(named(JPEG2000_LOSSLESS, "YBR_RCT", 3, true), "RGB");
        assert_eq!(named(JPEG2000_LOSSLESS, "YBR_FULL", 3, false), "YBR_FULL");
        assert_eq!(named(JPEG2000, "RGB", 3, false), "RGB");
        assert_eq!(named(RLE_LOSSLESS, "YBR_FULL", 3, false), "YBR_FULL");
        assert_eq!(named(JPEG_LOSSLESS_SV1, "YBR_FULL", 3, false), "YBR_FULL");
        assert_eq!(
            named(JPEG_BASELINE8_BIT, "MONOCHROME1", 1, false),
            "MONOCHROME1"
        );
        assert_eq!(
            named(RLE_LOSSLESS, "PALETTE COLOR", 1, false),
            "PALETTE COLOR"
        );
    }

    #[test]
    fn colour_the_decoder_would_mislabel_is_refused() {
        let refused = decoded_photometric(JPEG2000, "YBR_ICT", 3, false).expect_err("no MCT");
        assert!(
            refused.contains("YBR_ICT but the codestream does not apply the colour transform"),
            "{refused}"
        );
        let refused = decoded_photometric(JPEG_BASELINE8_BIT, "YBR_PARTIAL_420", 3, false)
            .expect_err("partial range is not full range");
        assert!(
            refused.contains("YBR_PARTIAL_420, which is converted to RGB only as RGB"),
            "{refused}"
        );
    }

    /// A JPEG 2000 main header: SOC, SIZ of `columns` x `rows` with `components` (Ssiz,
    /// XRsiz, YRsiz each), COD with `mct` and `transformation`, then SOT.
    fn codestream(
        columns: u32,
        rows: u32,
        components: &[[u8; 3]],
        mct: u8,
        transformation: u8,
    ) -> Vec<u8> {
        let mut data = vec![0xFF, 0x4F, 0xFF, 0x51];
        let lsiz = 38 + 3 * components.len() as u16;
        data.extend_from_slice(&lsiz.to_be_bytes());
        data.extend_from_slice(&[0, 0]);
        for v in [columns, rows, 0, 0, columns, rows, 0, 0] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        data.extend_from_slice(&(components.len() as u16).to_be_bytes());
        for component in components {
            data.extend_from_slice(component);
        }
        // A comment segment first, as encoders write one.
        data.extend_from_slice(&[0xFF, 0x64, 0, 6, 0, 1, b'h', b'i']);
        data.extend_from_slice(&[0xFF, 0x52, 0, 12, 0, 0, 0, 1, mct, 5, 4, 4, 0]);
        data.push(transformation);
        data.extend_from_slice(&[0xFF, 0x90, 0, 10, 0, 0, 0, 0, 0, 0, 0, 1]);
        data
    }

    /// `decode`'s refusal of a JPEG 2000 image whose fragments are `fragments`.
    fn j2k_refusal(samples: u16, bits: u16, signed: bool, fragments: Vec<Vec<u8>>) -> String {
        let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), fragments);
        let mut object = image(JPEG2000, 8, 8, samples, Value::PixelSequence(sequence));
        object.put(DataElement::new(
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(bits),
        ));
        object.put(DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(u16::from(signed)),
        ));
        decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn components_the_decoder_would_store_wrongly_are_refused() {
        // Subsampled chroma: the registry's decoder would leave three quarters zero.
        let subsampled = codestream(8, 8, &[[7, 1, 1], [7, 2, 2], [7, 2, 2]], 0, 1);
        let refused = j2k_refusal(3, 8, false, vec![subsampled]);
        assert!(
            refused.contains("frame 1 component 2 is subsampled (2 x 2)"),
            "{refused}"
        );
        // 12-bit samples where Bits Allocated is 8: truncated to their low byte.
        let deep = codestream(8, 8, &[[11, 1, 1]], 0, 1);
        let refused = j2k_refusal(1, 8, false, vec![deep]);
        assert!(
            refused.contains(
                "frame 1 component 1 has 12-bit samples, more than Bits Allocated (0028,0100) 8"
            ),
            "{refused}"
        );
        // Signed samples stored as unsigned ones: negative values would wrap.
        let signed = codestream(8, 8, &[[0x8F, 1, 1]], 0, 1);
        let refused = j2k_refusal(1, 16, false, vec![signed.clone()]);
        assert!(
            refused.contains(
                "frame 1 component 1 is signed where Pixel Representation (0028,0103) is 0"
            ),
            "{refused}"
        );
        let refused = j2k_refusal(1, 16, true, vec![codestream(8, 8, &[[15, 1, 1]], 0, 1)]);
        assert!(
            refused.contains("component 1 is unsigned where Pixel Representation (0028,0103) is 1"),
            "{refused}"
        );
        // A JP2 file is named as such.
        let mut jp2 = vec![
            0, 0, 0, 0x0C, 0x6A, 0x50, 0x20, 0x20, 0x0D, 0x0A, 0x87, 0x0A,
        ];
        jp2.extend_from_slice(&signed);
        let refused = j2k_refusal(1, 16, true, vec![jp2]);
        assert!(refused.contains("frame 1 is a JP2 file"), "{refused}");
    }

    #[test]
    fn the_main_cod_segment_says_whether_the_coding_is_lossy_and_transforms_colour() {
        let coding = |mct, transformation| {
            main_cod(&codestream(8, 8, &[[7, 1, 1]; 3], mct, transformation)).expect("a COD")
        };
        assert_eq!(
            coding(1, 0),
            Coding {
                irreversible: true,
                mct: true
            }
        );
        assert_eq!(
            coding(0, 1),
            Coding {
                irreversible: false,
                mct: false
            }
        );
        let mut no_cod = codestream(8, 8, &[[7, 1, 1]], 0, 1);
        let cod = no_cod
            .windows(2)
            .position(|w| w == [0xFF, 0x52])
            .expect("COD written");
        no_cod.drain(cod..cod + 14);
        assert!(main_cod(&no_cod).is_err());
        // A segment length pointing past the data.
        let mut truncated = codestream(8, 8, &[[7, 1, 1]], 0, 1);
        truncated.truncate(60);
        assert!(main_cod(&truncated).is_err());
        // Frames that disagree on the colour transform are refused.
        let sequence = PixelFragmentSequence::new(
            vec![0u32, 0],
            vec![
                codestream(8, 8, &[[7, 1, 1]; 3], 1, 1),
                codestream(8, 8, &[[7, 1, 1]; 3], 0, 1),
            ],
        );
        let mut object = image(JPEG2000, 8, 8, 3, Value::PixelSequence(sequence));
        frames(&mut object, "2");
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains("frame 2 does not apply the colour transform where frame 1 does"),
            "{refused}"
        );
    }

    /// The Lossy Image Compression attributes `mark_lossy` leaves on an image of
    /// `syntax` declaring `declared`, coded `irreversible`ly or not.
    fn marked(syntax: &str, declared: Option<&str>, irreversible: bool) -> (String, String) {
        let mut object = image(syntax, 8, 8, 1, Value::from(PrimitiveValue::Empty));
        if let Some(value) = declared {
            object.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION,
                VR::CS,
                PrimitiveValue::from(value),
            ));
        }
        mark_lossy(&mut object, syntax, irreversible, 400, 100);
        let text = |tag| {
            object
                .get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        (
            text(tags::LOSSY_IMAGE_COMPRESSION),
            text(tags::LOSSY_IMAGE_COMPRESSION_METHOD),
        )
    }

    #[test]
    fn jpeg_2000_is_marked_lossy_from_its_wavelet_not_from_its_syntax() {
        // 9/7: lossy, whatever the file said.
        assert_eq!(
            marked(JPEG2000, Some("00"), true),
            ("01".into(), "ISO_15444_1".into())
        );
        assert_eq!(
            marked(JPEG2000_LOSSLESS, None, true),
            ("01".into(), "ISO_15444_1".into())
        );
        // 5/3: the declared value is trusted, absent stays absent.
        assert_eq!(
            marked(JPEG2000, None, false),
            (String::new(), String::new())
        );
        assert_eq!(
            marked(JPEG2000, Some("00"), false),
            ("00".into(), String::new())
        );
        assert_eq!(
            marked(JPEG2000, Some("01"), false),
            ("01".into(), String::new())
        );
        // JPEG baseline is always lossy.
        assert_eq!(
            marked(JPEG_BASELINE8_BIT, Some("00"), false),
            ("01".into(), "ISO_10918_1".into())
        );
    }

    /// An RLE frame of `rows` x `columns` 8-bit monochrome samples, all `value`: one
    /// segment of replicate runs.
    fn rle_frame(rows: u16, columns: u16, value: u8) -> Vec<u8> {
        let mut frame = vec![0u8; 64];
        frame[0..4].copy_from_slice(&1u32.to_le_bytes());
        frame[4..8].copy_from_slice(&64u32.to_le_bytes());
        let mut left = usize::from(rows) * usize::from(columns);
        while left > 0 {
            let run = left.min(128);
            frame.push((257 - run) as u8);
            frame.push(value);
            left -= run;
        }
        frame
    }

    #[test]
    fn an_rle_frame_in_two_fragments_is_refused_and_each_fragment_is_checked() {
        // One frame, two fragments: the registry's decoder would decode both as frames
        // (twice the declared size), and a hostile second header went unchecked.
        let sequence = PixelFragmentSequence::new(
            Vec::<u32>::new(),
            vec![rle_frame(8, 8, 1), rle_frame(8, 8, 2)],
        );
        let mut object = image(RLE_LOSSLESS, 8, 8, 1, Value::PixelSequence(sequence));
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains(
                "it has 2 fragment(s) for 1 frame(s), where RLE Lossless carries each frame in \
                 exactly one fragment (PS3.5 G.2)"
            ),
            "{refused}"
        );
        // Two frames, two fragments: both headers are checked, not only the first.
        let mut hostile = rle_frame(8, 8, 2);
        hostile[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let sequence =
            PixelFragmentSequence::new(Vec::<u32>::new(), vec![rle_frame(8, 8, 1), hostile]);
        let mut object = image(RLE_LOSSLESS, 8, 8, 1, Value::PixelSequence(sequence));
        frames(&mut object, "2");
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains("frame 2 declares Some(4294967295) RLE segments"),
            "{refused}"
        );
        // And two good frames decode to two frames.
        let sequence = PixelFragmentSequence::new(
            Vec::<u32>::new(),
            vec![rle_frame(8, 8, 1), rle_frame(8, 8, 2)],
        );
        let mut object = image(RLE_LOSSLESS, 8, 8, 1, Value::PixelSequence(sequence));
        frames(&mut object, "2");
        decode(&mut object, MAX_DECODED_BYTES).expect("two frames");
        let pixels = object
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.to_bytes().ok())
            .expect("native pixel data");
        assert_eq!(&pixels[..], [[1u8; 64], [2u8; 64]].concat());
    }

    #[test]
    fn an_implausibly_small_rle_frame_is_refused_naming_the_ratio() {
        // 4096 x 4096 = 16 MiB from a 64-byte header and 2 bytes per 128 samples is
        // 64:1: over the RLE decoder's 32:1.
        let sequence =
            PixelFragmentSequence::new(Vec::<u32>::new(), vec![rle_frame(4096, 4096, 7)]);
        let mut object = image(RLE_LOSSLESS, 4096, 4096, 1, Value::PixelSequence(sequence));
        let refused = decode(&mut object, MAX_DECODED_BYTES)
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains("a ratio over 32:1 that the decoder refuses as implausible"),
            "{refused}"
        );
    }

    #[test]
    fn frames_spread_over_fragments_are_found_once_from_the_offset_table() {
        let geometry = Geometry {
            rows: 8,
            columns: 8,
            frames: 2,
            samples: 1,
            sample_bytes: 1,
        };
        let object = |table: Vec<u32>| {
            let sequence = PixelFragmentSequence::new(
                table,
                vec![vec![1u8, 2], vec![3, 4, 5, 6], vec![7u8, 8]],
            );
            image(JPEG2000, 8, 8, 1, Value::PixelSequence(sequence))
        };
        // Frame 1: fragments 1 and 2 (8 + 2 + 8 + 4 bytes); frame 2: fragment 3.
        let split = object(vec![0, 22]);
        let frames = frames_of(&split, geometry, JPEG2000).expect("two frames");
        assert_eq!(
            frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>(),
            vec![vec![1u8, 2, 3, 4, 5, 6], vec![7, 8]]
        );
        for table in [
            vec![],
            vec![0, 21],
            vec![0, 0],
            vec![0, 10, 22],
            vec![0, 99],
        ] {
            let refused =
                frames_of(&object(table.clone()), geometry, JPEG2000).expect_err("refused");
            assert!(
                refused.contains(
                    "its 2 frames are spread over 3 fragments without a Basic Offset Table \
                     whose 2 entries each start a fragment"
                ),
                "{table:?}: {refused}"
            );
        }
    }

    #[test]
    fn a_jpeg_2000_frame_over_the_sample_limit_is_refused_before_decoding() {
        // 12,000 x 12,000 x 8 bits: 144 MB decoded (under 1 GiB), but 1.15 GB of
        // OpenJPEG working memory for its one frame.
        let sequence = PixelFragmentSequence::new(
            Vec::<u32>::new(),
            vec![codestream(12_000, 12_000, &[[7, 1, 1]], 0, 1)],
        );
        let mut object = image(JPEG2000, 12_000, 12_000, 1, Value::PixelSequence(sequence));
        let refused = decode(&mut object, MAX_DECODED_BYTES).expect_err("refused");
        assert!(
            matches!(
                refused,
                TranscodeError::FrameTooLarge {
                    samples: 144_000_000,
                    ..
                }
            ),
            "{refused}"
        );
        assert!(
            refused.to_string().contains(
                "is 144000000 samples, over the limit of 134217728 samples for one JPEG 2000 frame"
            ),
            "{refused}"
        );
        assert!(matches!(
            memory_needed(&object, MAX_DECODED_BYTES),
            Err(TranscodeError::FrameTooLarge { .. })
        ));
    }
}
