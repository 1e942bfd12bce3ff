//! The bounded pre-check of a dataset from outside: before any recursive parser (dicom-object's
//! `build_object`/`build_sequence`, the PDI element parser) sees bytes from the network or a
//! file, one loop with an explicit stack walks the element headers, skips the values, and
//! refuses
//! - sequences nested deeper than [`MAX_NESTING`] levels (a 54 KB dataset nesting 1,500
//!   levels overflowed the stack of the thread that parsed it and killed the daemon);
//! - a header (the elements before the pixel data, group 7FE0) larger than [`HEADER_BUDGET`],
//!   which the file set builder cannot read, so that what the SCP acknowledges can always
//!   be packed (one 1 GiB private element used to be acknowledged, held whole in memory,
//!   and then failed its study's whole batch);
//! - a text value longer than a 16-bit length can hold (implicit VR allows it, the DICOMDIR
//!   and every explicit VR syntax do not);
//! - deflated datasets that inflate beyond [`MAX_INFLATED`].
//!
//! It reads the dataset the way dicom-parser does (any undefined length opens a sequence,
//! except Pixel Data's fragments; implicit VR takes SQ from the standard dictionary), so
//! whatever dicom-object would recurse into is counted here first. Values are skipped, never
//! held: memory stays a few KiB whatever the input.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use dicom_encoding::{Codec, Endianness, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::pdi::element::dictionary_vr;
use crate::pdi::tags::{ITEM, ITEM_END, PIXEL_DATA, SEQUENCE_END, UNDEFINED};

/// Deepest sequence nesting accepted anywhere in a dataset. Real objects need far fewer:
/// structured reports nest their content tree about 10 levels, segmentations and RT objects
/// 4 to 6; a parser's stack is safe far beyond this.
pub const MAX_NESTING: usize = 32;

/// Most bytes of an instance before its pixel data (meta information included; for deflated
/// data, inflated bytes): what the file set builder reads of each instance
/// (`pdi::instance::read`), so reception refuses what the Pack step could not carry.
pub const HEADER_BUDGET: u64 = 64 << 20;

/// Most bytes a deflated dataset may inflate to (1 GiB): a few KiB of deflate can claim
/// gigabytes of CPU work.
pub const MAX_INFLATED: u64 = 1 << 30;

/// The first tag that is not part of the header: group 7FE0 (pixel data in all its forms,
/// offset tables) and everything after it.
pub const HEADER_END: u32 = 0x7FE0_0000;

/// Why a dataset was refused before parsing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// Sequences nest deeper than [`MAX_NESTING`].
    #[error(
        "dataset nests sequences deeper than {limit} levels; refused (at byte {offset} of the \
         dataset; no real DICOM object nests that deep: check the sending system)"
    )]
    TooDeep {
        /// The bound.
        limit: usize,
        /// Where the sequence that went too deep starts.
        offset: u64,
    },
    /// The elements before the pixel data exceed [`HEADER_BUDGET`].
    #[error(
        "the elements before the pixel data take more than {} MiB (element ({:04X},{:04X}) at \
         byte {offset}); refused: a file set cannot carry such a header (check the sending \
         system for an oversized private element)",
        limit >> 20, tag >> 16, tag & 0xFFFF
    )]
    HeaderTooLarge {
        /// The bound in bytes.
        limit: u64,
        /// The element that went over it.
        tag: u32,
        /// Where it starts.
        offset: u64,
    },
    /// A value of a short text VR (per the dictionary) longer than its 16-bit length can
    /// hold: implicit VR, or a long VR given by the sender, allows it; the DICOMDIR and a
    /// conversion to another syntax do not.
    #[error(
        "element ({:04X},{:04X}) ({vr}) is {length} bytes, more than the 65,534 its VR can \
         hold in explicit VR; refused (check the sending system)",
        tag >> 16, tag & 0xFFFF
    )]
    ValueTooLong {
        /// The element.
        tag: u32,
        /// Its dictionary VR.
        vr: String,
        /// Its length.
        length: u32,
    },
    /// A binary value whose length is not a whole number of its VR's units: dicom-parser
    /// reads only the whole units and loses its place in the dataset (then reads any
    /// length from the misplaced bytes), so the check and the parser would disagree.
    #[error(
        "element ({:04X},{:04X}) ({vr}) is {length} bytes, not a multiple of {unit}; \
         refused (check the sending system)",
        tag >> 16, tag & 0xFFFF
    )]
    Misaligned {
        /// The element.
        tag: u32,
        /// The VR it is read with.
        vr: String,
        /// Its length.
        length: u32,
        /// Bytes per value of that VR.
        unit: u32,
    },
    /// A deflated dataset inflates beyond [`MAX_INFLATED`].
    #[error(
        "the deflated dataset inflates to more than {} MiB; refused (send it uncompressed)",
        limit >> 20
    )]
    Inflated {
        /// The bound in bytes.
        limit: u64,
    },
    /// The transfer syntax is not one whose datasets can be read.
    #[error("transfer syntax {0} is unknown; its dataset cannot be read")]
    Syntax(String),
    /// The bytes are not a valid element stream.
    #[error("dataset cannot be parsed: {why} (at byte {offset})")]
    Malformed {
        /// Where, from the start of the dataset (inflated bytes for deflated data).
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// Reading failed.
    #[error("cannot read the dataset: {0}")]
    Io(#[from] io::Error),
}

/// How a transfer syntax encodes its dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Explicit VR (all but Implicit VR Little Endian).
    pub explicit: bool,
    /// Big endian (the retired Explicit VR Big Endian).
    pub big: bool,
    /// The dataset is deflated (Deflated Explicit VR Little Endian, JPIP Referenced Deflate).
    pub deflated: bool,
}

impl Encoding {
    /// The encoding of a transfer syntax the registry knows (padding NULs and spaces
    /// ignored); `None` for others.
    pub fn of(transfer_syntax: &str) -> Option<Encoding> {
        let uid = transfer_syntax.trim_end_matches(['\0', ' ']);
        let ts = TransferSyntaxRegistry.get(uid)?;
        Some(Encoding {
            explicit: uid != dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN,
            big: ts.endianness() == Endianness::Big,
            deflated: matches!(ts.codec(), Codec::Dataset(_)),
        })
    }
}

/// A source whose values the check can pass over without holding them.
pub trait Skip: Read {
    /// Passes over `n` bytes (reading them when the source cannot seek).
    ///
    /// # Errors
    /// The I/O error; a source that ends first may report it here or at the next read.
    fn skip(&mut self, n: u64) -> io::Result<()>;
}

impl Skip for &[u8] {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > self.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        *self = &self[n..];
        Ok(())
    }
}

impl Skip for BufReader<File> {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let n = i64::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        self.seek_relative(n)
    }
}

/// Any reader, skipped by reading (inflated data).
struct Streamed<R>(R);

impl<R: Read> Read for Streamed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> Skip for Streamed<R> {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.0).take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// Checks the dataset that `source` holds (from its first byte to its end; `len` is its
/// size when known, so that a value running past the end is noticed without reading it),
/// encoded in `transfer_syntax`, after a meta information group of `meta_len` bytes.
///
/// # Errors
/// [`DatasetError`] saying which bound was exceeded, or why the bytes are malformed.
pub fn check<S: Skip>(
    source: S,
    len: Option<u64>,
    transfer_syntax: &str,
    meta_len: u64,
) -> Result<(), DatasetError> {
    let encoding = Encoding::of(transfer_syntax)
        .ok_or_else(|| DatasetError::Syntax(transfer_syntax.to_owned()))?;
    if encoding.deflated {
        let inflated = Streamed(flate2::read::DeflateDecoder::new(source));
        Walker::new(inflated, None, encoding, HEADER_BUDGET, Some(MAX_INFLATED)).run()
    } else {
        let budget = HEADER_BUDGET.saturating_sub(meta_len);
        Walker::new(source, len, encoding, budget, None).run()
    }
}

/// Checks a dataset held in memory.
///
/// # Errors
/// As [`check`].
pub fn check_bytes(
    dataset: &[u8],
    transfer_syntax: &str,
    meta_len: u64,
) -> Result<(), DatasetError> {
    check(
        dataset,
        Some(dataset.len() as u64),
        transfer_syntax,
        meta_len,
    )
}

/// Checks the dataset of a file that starts at `offset` (after the meta information, which
/// is `offset - 132` bytes of a Part 10 file with its preamble).
///
/// # Errors
/// As [`check`].
pub fn check_file(
    path: &Path,
    offset: u64,
    transfer_syntax: &str,
    meta_len: u64,
) -> Result<(), DatasetError> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    file.seek(SeekFrom::Start(offset))?;
    let len = size
        .checked_sub(offset)
        .ok_or_else(|| DatasetError::Malformed {
            offset: 0,
            why: "the file ends before its dataset".into(),
        })?;
    check(
        BufReader::with_capacity(16 * 1024, file),
        Some(len),
        transfer_syntax,
        meta_len,
    )
}

/// What the walker is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A list of elements: the top level (`end` None) or an item.
    Elements { end: Option<u64>, explicit: bool },
    /// A sequence: items until its end or its delimiter.
    Sequence { end: Option<u64>, explicit: bool },
    /// Encapsulated pixel data: fragment items until the sequence delimiter.
    Fragments,
}

struct Walker<S> {
    source: S,
    position: u64,
    len: Option<u64>,
    big: bool,
    stack: Vec<Frame>,
    sequences: usize,
    /// Bytes the header may take; `None` once the top level reached group 7FE0.
    header_budget: Option<u64>,
    max_position: Option<u64>,
}

impl<S: Skip> Walker<S> {
    fn new(
        source: S,
        len: Option<u64>,
        encoding: Encoding,
        header_budget: u64,
        max_position: Option<u64>,
    ) -> Walker<S> {
        Walker {
            source,
            position: 0,
            len,
            big: encoding.big,
            stack: vec![Frame::Elements {
                end: None,
                explicit: encoding.explicit,
            }],
            sequences: 0,
            header_budget: Some(header_budget),
            max_position,
        }
    }

    fn malformed<T>(&self, why: impl Into<String>) -> Result<T, DatasetError> {
        Err(DatasetError::Malformed {
            offset: self.position,
            why: why.into(),
        })
    }

    fn advance(&mut self, n: u64) -> Result<(), DatasetError> {
        let Some(next) = self.position.checked_add(n) else {
            return self.malformed("a length runs past any possible end");
        };
        if self.len.is_some_and(|len| next > len) {
            return self.malformed("the data ends in the middle of an element");
        }
        if let Some(max) = self.max_position
            && next > max
        {
            return Err(DatasetError::Inflated { limit: max });
        }
        self.position = next;
        Ok(())
    }

    /// Reads `N` bytes; `None` at a clean end of the data.
    fn read<const N: usize>(&mut self) -> Result<Option<[u8; N]>, DatasetError> {
        let mut buf = [0u8; N];
        let mut got = 0;
        while got < N {
            match self.source.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got == 0 {
            return Ok(None);
        }
        if got < N {
            return self.malformed("the data ends in the middle of an element header");
        }
        self.advance(N as u64)?;
        Ok(Some(buf))
    }

    fn need<const N: usize>(&mut self) -> Result<[u8; N], DatasetError> {
        match self.read::<N>()? {
            Some(bytes) => Ok(bytes),
            None => self.malformed("the data ends inside a sequence or item"),
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), DatasetError> {
        let from = self.position;
        self.advance(n)?;
        match self.source.skip(n) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(DatasetError::Malformed {
                offset: from,
                why: "the data ends in the middle of an element".into(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn u16(&mut self) -> Result<u16, DatasetError> {
        let b = self.need::<2>()?;
        Ok(if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self) -> Result<u32, DatasetError> {
        let b = self.need::<4>()?;
        Ok(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn tag(&self, b: [u8; 4]) -> u32 {
        let (group, element) = if self.big {
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        } else {
            (
                u16::from_le_bytes([b[0], b[1]]),
                u16::from_le_bytes([b[2], b[3]]),
            )
        };
        (u32::from(group) << 16) | u32::from(element)
    }

    /// Fails when the header part would end beyond its budget at `end`.
    fn within_header(&self, tag: u32, start: u64, end: u64) -> Result<(), DatasetError> {
        match self.header_budget {
            Some(limit) if end > limit => Err(DatasetError::HeaderTooLarge {
                limit: HEADER_BUDGET,
                tag,
                offset: start,
            }),
            _ => Ok(()),
        }
    }

    fn run(mut self) -> Result<(), DatasetError> {
        while let Some(&frame) = self.stack.last() {
            match frame {
                Frame::Elements { end, explicit } => {
                    if let Some(end) = end {
                        if self.position >= end {
                            if self.position > end {
                                return self.malformed("an item's elements overrun its length");
                            }
                            self.stack.pop();
                            continue;
                        }
                    }
                    self.element(end.is_none() && self.stack.len() == 1, explicit)?;
                }
                Frame::Sequence { end, explicit } => {
                    if let Some(end) = end {
                        if self.position >= end {
                            if self.position > end {
                                return self.malformed("a sequence's items overrun its length");
                            }
                            self.pop_sequence();
                            continue;
                        }
                    }
                    let tag_bytes = self.need::<4>()?;
                    let tag = self.tag(tag_bytes);
                    let length = self.u32()?;
                    match tag {
                        SEQUENCE_END if end.is_none() => self.pop_sequence(),
                        ITEM if length == UNDEFINED => self.stack.push(Frame::Elements {
                            end: None,
                            explicit,
                        }),
                        ITEM => {
                            let item_end = self.end_of(length)?;
                            self.stack.push(Frame::Elements {
                                end: Some(item_end),
                                explicit,
                            });
                        }
                        _ => {
                            return self.malformed(format!(
                                "expected a sequence item, found ({:04X},{:04X})",
                                tag >> 16,
                                tag & 0xFFFF
                            ));
                        }
                    }
                }
                Frame::Fragments => {
                    let tag_bytes = self.need::<4>()?;
                    let tag = self.tag(tag_bytes);
                    let length = self.u32()?;
                    match tag {
                        SEQUENCE_END => {
                            self.stack.pop();
                        }
                        ITEM if length != UNDEFINED => {
                            let start = self.position;
                            let end = self.end_of(length)?;
                            self.within_header(PIXEL_DATA, start, end)?;
                            self.skip(u64::from(length))?;
                        }
                        _ => return self.malformed("encapsulated data without its fragment items"),
                    }
                }
            }
        }
        Ok(())
    }

    fn pop_sequence(&mut self) {
        self.stack.pop();
        self.sequences -= 1;
    }

    fn end_of(&self, length: u32) -> Result<u64, DatasetError> {
        match self.position.checked_add(u64::from(length)) {
            Some(end) => Ok(end),
            None => self.malformed("a length runs past any possible end"),
        }
    }

    /// Reads one element header of an element list and either skips its value or opens
    /// the sequence or fragments it starts.
    fn element(&mut self, top: bool, explicit: bool) -> Result<(), DatasetError> {
        let start = self.position;
        let Some(tag_bytes) = self.read::<4>()? else {
            if top {
                self.stack.pop();
                return Ok(());
            }
            return self.malformed("the data ends inside a sequence item");
        };
        let tag = self.tag(tag_bytes);
        if tag == ITEM_END {
            self.need::<4>()?;
            if top {
                // dicom-parser ignores a stray delimiter at the top level; so does this.
                return Ok(());
            }
            return match self.stack.last() {
                Some(Frame::Elements { end: None, .. }) => {
                    self.stack.pop();
                    Ok(())
                }
                _ => self.malformed("item delimiter inside a defined-length item"),
            };
        }
        if top && self.header_budget.is_some() && tag >= HEADER_END {
            self.header_budget = None;
        }
        if tag >> 16 == 0xFFFE {
            return self.malformed(format!(
                "unexpected item tag ({:04X},{:04X}) outside a sequence",
                tag >> 16,
                tag & 0xFFFF
            ));
        }
        let (vr, length) = if explicit {
            let vr = self.need::<2>()?;
            let Some(long) = long_length(vr) else {
                return self.malformed(format!(
                    "element ({:04X},{:04X}) has no valid VR",
                    tag >> 16,
                    tag & 0xFFFF
                ));
            };
            if long {
                self.need::<2>()?;
                (vr, self.u32()?)
            } else {
                (vr, u32::from(self.u16()?))
            }
        } else {
            (dictionary_vr(tag), self.u32()?)
        };
        if tag == PIXEL_DATA && length == UNDEFINED {
            self.stack.push(Frame::Fragments);
            return Ok(());
        }
        if explicit && length == UNDEFINED && !matches!(&vr, b"SQ" | b"UN") {
            // The file set's parser would read it as fragments, dicom-parser as items.
            return self.malformed(format!(
                "element ({:04X},{:04X}) ({}) has an undefined length, which only SQ, UN and \
                 Pixel Data may have",
                tag >> 16,
                tag & 0xFFFF,
                String::from_utf8_lossy(&vr)
            ));
        }
        if &vr == b"SQ" || length == UNDEFINED {
            if self.sequences >= MAX_NESTING {
                return Err(DatasetError::TooDeep {
                    limit: MAX_NESTING,
                    offset: start,
                });
            }
            let end = if length == UNDEFINED {
                None
            } else {
                let end = self.end_of(length)?;
                self.within_header(tag, start, end)?;
                Some(end)
            };
            self.sequences += 1;
            self.stack.push(Frame::Sequence { end, explicit });
            return Ok(());
        }
        if let Some(unit) = binary_unit(vr)
            && length % unit != 0
        {
            return Err(DatasetError::Misaligned {
                tag,
                vr: String::from_utf8_lossy(&vr).into_owned(),
                length,
                unit,
            });
        }
        if length > 0xFFFF {
            // A DICOMDIR key is written with the dictionary's VR (whatever VR the sender
            // used), and so is a conversion to another syntax.
            let known = if explicit { dictionary_vr(tag) } else { vr };
            if is_short_text(known) {
                return Err(DatasetError::ValueTooLong {
                    tag,
                    vr: String::from_utf8_lossy(&known).into_owned(),
                    length,
                });
            }
        }
        let end = self.end_of(length)?;
        self.within_header(tag, start, end)?;
        self.skip(u64::from(length))
    }
}

/// Whether an explicit VR has a 4-byte length; `None` for bytes that are no VR.
fn long_length(vr: [u8; 2]) -> Option<bool> {
    match &vr {
        b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR"
        | b"UT" | b"UV" => Some(true),
        b"AE" | b"AS" | b"AT" | b"CS" | b"DA" | b"DS" | b"DT" | b"FD" | b"FL" | b"IS" | b"LO"
        | b"LT" | b"PN" | b"SH" | b"SL" | b"SS" | b"ST" | b"TM" | b"UI" | b"UL" | b"US" => {
            Some(false)
        }
        _ => None,
    }
}

/// Bytes per value of the binary VRs, which dicom-parser reads in whole units.
fn binary_unit(vr: [u8; 2]) -> Option<u32> {
    match &vr {
        b"US" | b"SS" | b"OW" => Some(2),
        b"UL" | b"SL" | b"FL" | b"OF" | b"OL" | b"AT" => Some(4),
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => Some(8),
        _ => None,
    }
}

/// Text VRs whose explicit encoding has a 16-bit length.
fn is_short_text(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"ST"
            | b"TM"
            | b"UI"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const BIG: &str = "1.2.840.10008.1.2.2";

    /// A private sequence nested `levels` deep with defined lengths throughout (the walker
    /// must track ends, not only delimiters), in explicit VR of either byte order.
    fn defined(levels: usize, big: bool) -> Vec<u8> {
        let u16b = |v: u16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u32b = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..levels {
            let mut item = Vec::new();
            item.extend_from_slice(&u16b(0xFFFE));
            item.extend_from_slice(&u16b(0xE000));
            item.extend_from_slice(&u32b(inner.len() as u32));
            item.extend_from_slice(&inner);
            let mut sequence = Vec::new();
            sequence.extend_from_slice(&u16b(0x0009));
            sequence.extend_from_slice(&u16b(0x1001));
            sequence.extend_from_slice(b"SQ\0\0");
            sequence.extend_from_slice(&u32b(item.len() as u32));
            sequence.extend_from_slice(&item);
            inner = sequence;
        }
        inner
    }

    #[test]
    fn defined_lengths_count_like_delimiters_in_either_byte_order() {
        for (ts, big) in [(EXPLICIT, false), (BIG, true)] {
            check_bytes(&defined(MAX_NESTING, big), ts, 0).expect("32 levels pass");
            let err = check_bytes(&defined(MAX_NESTING + 1, big), ts, 0).expect_err("33");
            assert!(matches!(err, DatasetError::TooDeep { .. }), "{err}");
            assert!(
                err.to_string()
                    .starts_with("dataset nests sequences deeper than 32 levels; refused")
            );
        }
    }

    #[test]
    fn the_header_budget_counts_the_meta_and_ends_at_group_7fe0() {
        let mut big = vec![0x09, 0x00, 0x02, 0x10, b'O', b'B', 0, 0];
        big.extend_from_slice(&(1000u32).to_le_bytes());
        big.resize(big.len() + 1000, 0);
        check_bytes(&big, EXPLICIT, HEADER_BUDGET - 1012).expect("fits exactly");
        let err = check_bytes(&big, EXPLICIT, HEADER_BUDGET - 1011).expect_err("one byte over");
        assert!(
            matches!(
                err,
                DatasetError::HeaderTooLarge {
                    tag: 0x0009_1002,
                    ..
                }
            ),
            "{err}"
        );
        // The same element after the pixel data is not header.
        let mut after = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0, 0, 0, 0];
        after.extend_from_slice(&[0x09, 0x7F, 0x02, 0x10, b'O', b'B', 0, 0]);
        after.extend_from_slice(&(1000u32).to_le_bytes());
        after.resize(after.len() + 1000, 0);
        check_bytes(&after, EXPLICIT, HEADER_BUDGET).expect("not header");
    }

    #[test]
    fn lying_lengths_unknown_vrs_and_truncation_are_malformed() {
        let mut lying = vec![0x09, 0x00, 0x02, 0x10, b'O', b'B', 0, 0];
        lying.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(check_bytes(&lying, EXPLICIT, 0).is_err());
        let unknown = [0x09, 0x00, 0x02, 0x10, b'z', b'z', 0, 0];
        let err = check_bytes(&unknown, EXPLICIT, 0).expect_err("no VR");
        assert!(err.to_string().contains("has no valid VR"), "{err}");
        let open = [
            0x09, 0x00, 0x01, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        let err = check_bytes(&open, EXPLICIT, 0).expect_err("unterminated");
        assert!(matches!(err, DatasetError::Malformed { .. }), "{err}");
        assert!(matches!(
            check_bytes(&[], "1.2.3.4", 0),
            Err(DatasetError::Syntax(_))
        ));
    }

    #[test]
    fn an_implicit_text_value_too_long_for_explicit_vr_is_refused() {
        let mut name = vec![0x10, 0x00, 0x10, 0x00];
        name.extend_from_slice(&(70_000u32).to_le_bytes());
        name.resize(name.len() + 70_000, b'A');
        let err = check_bytes(&name, "1.2.840.10008.1.2", 0).expect_err("PN of 70,000 bytes");
        assert!(matches!(err, DatasetError::ValueTooLong { .. }), "{err}");
        // The same name sent as UT in explicit VR.
        let mut name = vec![0x10, 0x00, 0x10, 0x00, b'U', b'T', 0, 0];
        name.extend_from_slice(&(70_000u32).to_le_bytes());
        name.resize(name.len() + 70_000, b'A');
        let err = check_bytes(&name, EXPLICIT, 0).expect_err("PN as UT");
        assert!(
            err.to_string().contains("(0010,0010) (PN) is 70000 bytes"),
            "{err}"
        );
        // A private UT (0009,1010) that long is fine.
        name[..4].copy_from_slice(&[0x09, 0x00, 0x10, 0x10]);
        check_bytes(&name, EXPLICIT, 0).expect("private UT");
    }

    #[test]
    fn only_sq_un_and_pixel_data_may_have_an_undefined_length() {
        let mut bytes = vec![
            0x09, 0x00, 0x02, 0x10, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        bytes.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let err = check_bytes(&bytes, EXPLICIT, 0).expect_err("OB of undefined length");
        assert!(
            err.to_string().contains("only SQ, UN and Pixel Data"),
            "{err}"
        );
        bytes[4..6].copy_from_slice(b"UN");
        check_bytes(&bytes, EXPLICIT, 0).expect("an empty UN sequence");
    }

    #[test]
    fn a_binary_value_of_a_broken_length_is_refused() {
        // Found by fuzzing: a group length (UL from the dictionary) of 18 bytes made
        // dicom-parser read 16, lose its place, and allocate 2.7 GB for a length it then
        // read from the middle of a value.
        let mut implicit = vec![0x08, 0x4F, 0x00, 0x00, 18, 0, 0, 0];
        implicit.extend_from_slice(&[0x41; 18]);
        let err = check_bytes(&implicit, "1.2.840.10008.1.2", 0).expect_err("18-byte UL");
        assert!(
            matches!(
                err,
                DatasetError::Misaligned {
                    unit: 4,
                    length: 18,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("not a multiple of 4"), "{err}");
        let mut explicit = vec![0x28, 0x00, 0x10, 0x00, b'U', b'S', 3, 0, 1, 2, 3];
        assert!(matches!(
            check_bytes(&explicit, EXPLICIT, 0),
            Err(DatasetError::Misaligned { unit: 2, .. })
        ));
        explicit[6] = 2;
        explicit.pop();
        check_bytes(&explicit, EXPLICIT, 0).expect("a 2-byte US");
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_inflation_bound() {
        use std::io::Write;
        // Pixel data claiming 2 GiB (zeros would deflate to about 2 MiB): refused before
        // any of it is inflated.
        let mut header = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0];
        header.extend_from_slice(&(2u32 << 30).to_le_bytes());
        let mut deflater =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        deflater.write_all(&header).expect("deflate");
        let bytes = deflater.finish().expect("deflate");
        let err = check_bytes(&bytes, "1.2.840.10008.1.2.1.99", 0).expect_err("bomb");
        assert!(matches!(err, DatasetError::Inflated { .. }), "{err}");
    }
}
