//! Raw DICOM elements: a small parser that keeps the byte offset of every element and item
//! and the value bytes as they are, and an Explicit VR Little Endian writer.
//!
//! The DICOMDIR needs what general DICOM libraries hide: where each directory record starts
//! in the file (record offsets) and the undecoded bytes of names in any character set (so a
//! Japanese name reaches the DICOMDIR byte for byte with its Specific Character Set). The
//! parser reads only what it is asked to (instances stop before their pixel data) and
//! refuses values larger than its budget, so a damaged length cannot claim the memory.

use std::io::Read;

use dicom_core::Tag as DicomTag;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_dictionary_std::{StandardDataDictionary, uids};

pub use crate::dicom::depth::MAX_NESTING;

pub use super::tags::ITEM;
use super::tags::{ITEM_END, SEQUENCE_END, UNDEFINED};

/// Explicit VR Big Endian: retired from the standard, still found in archives.
#[expect(deprecated, reason = "a retired syntax we must still read")]
const EXPLICIT_BIG: &str = uids::EXPLICIT_VR_BIG_ENDIAN;

/// How a dataset is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// Explicit VR Little Endian (and every compressed syntax, and deflate once inflated).
    ExplicitLittle,
    /// Implicit VR Little Endian: VRs come from the data dictionary.
    ImplicitLittle,
    /// Explicit VR Big Endian (retired, still found in archives).
    ExplicitBig,
}

impl Syntax {
    /// The dataset encoding of a transfer syntax UID.
    pub fn of(transfer_syntax: &str) -> Syntax {
        match transfer_syntax {
            uids::IMPLICIT_VR_LITTLE_ENDIAN => Syntax::ImplicitLittle,
            EXPLICIT_BIG => Syntax::ExplicitBig,
            _ => Syntax::ExplicitLittle,
        }
    }
}

/// Why bytes could not be read as DICOM elements.
#[derive(Debug, thiserror::Error)]
pub enum ElementError {
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Sequences nest deeper than [`MAX_NESTING`]: the parser recurses per level, so it
    /// stops here instead of running out of stack.
    #[error(
        "sequences nest deeper than {MAX_NESTING} levels at byte {offset}; refused (no real \
         DICOM file nests that deep: the data is damaged or hostile)"
    )]
    TooDeep {
        /// Where the sequence that went too deep starts, from the start of the file.
        offset: u64,
    },
    /// The bytes are not a valid element stream.
    #[error("malformed DICOM data at byte {offset}: {why}")]
    Malformed {
        /// Where the problem is, from the start of the file.
        offset: u64,
        /// What is wrong.
        why: String,
    },
}

/// One element: tag, VR, where it starts, and its value.
#[derive(Debug, Clone)]
pub struct Element {
    /// Group in the high 16 bits, element number in the low 16 bits.
    pub tag: u32,
    /// The VR as written, or from the dictionary for implicit VR (`UN` when unknown).
    pub vr: [u8; 2],
    /// Offset of the element's first byte from the start of the stream.
    pub offset: u64,
    /// The value.
    pub value: Value,
}

/// An element value.
#[derive(Debug, Clone)]
pub enum Value {
    /// Value bytes, in the stream's byte order.
    Bytes(Vec<u8>),
    /// A sequence.
    Items(Vec<Item>),
    /// Encapsulated pixel data (e.g. an icon), kept as its fragments.
    Fragments(Vec<Vec<u8>>),
}

/// A sequence item and where it starts.
#[derive(Debug, Clone)]
pub struct Item {
    /// Offset of the item tag from the start of the stream (directory record offsets).
    pub offset: u64,
    /// The item's elements.
    pub elements: Vec<Element>,
}

/// Finds an element of a list by tag.
pub fn find(elements: &[Element], tag: u32) -> Option<&Element> {
    elements.iter().find(|e| e.tag == tag)
}

impl Element {
    /// The value bytes of a non-sequence element.
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The value as text without trailing padding (spaces and NULs) or leading spaces.
    pub fn text(&self) -> Option<String> {
        self.bytes().map(|b| {
            String::from_utf8_lossy(b)
                .trim_end_matches(['\0', ' '])
                .trim_start_matches(' ')
                .to_owned()
        })
    }
}

/// Text of `tag` in `elements`, empty when absent.
pub fn text_of(elements: &[Element], tag: u32) -> String {
    find(elements, tag)
        .and_then(Element::text)
        .unwrap_or_default()
}

fn long_length(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"UC"
            | b"UR"
            | b"UT"
            | b"UN"
            | b"SV"
            | b"UV"
    )
}

/// The dictionary VR of a tag, for implicit VR data; `UN` when unknown.
pub fn dictionary_vr(tag: u32) -> [u8; 2] {
    let tag16 = DicomTag((tag >> 16) as u16, (tag & 0xFFFF) as u16);
    if tag & 0xFFFF == 0 {
        return *b"UL";
    }
    StandardDataDictionary
        .by_tag(tag16)
        .map_or(*b"UN", |entry| entry.vr().relaxed().to_bytes())
}

/// A reader of elements from a byte stream, with position and a byte budget.
pub struct Parser<R> {
    input: R,
    position: u64,
    lookahead: Vec<u8>,
    budget: u64,
    /// Sequences open around the element being read.
    depth: usize,
}

impl<R: Read> Parser<R> {
    /// Parses `input`, whose first byte is at `position`; at most `budget` bytes are read.
    pub fn new(input: R, position: u64, budget: u64) -> Parser<R> {
        Parser {
            input,
            position,
            lookahead: Vec::new(),
            budget,
            depth: 0,
        }
    }

    /// Current offset from the start of the stream.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Gives back the unread rest of the stream (peeked bytes first).
    pub fn into_rest(self) -> std::io::Chain<std::io::Cursor<Vec<u8>>, R> {
        std::io::Cursor::new(self.lookahead).chain(self.input)
    }

    fn malformed<T>(&self, why: impl Into<String>) -> Result<T, ElementError> {
        Err(ElementError::Malformed {
            offset: self.position,
            why: why.into(),
        })
    }

    /// Peeks at the next `n` bytes (fewer at the end of the stream).
    fn peek(&mut self, n: usize) -> Result<&[u8], ElementError> {
        while self.lookahead.len() < n {
            let mut chunk = [0u8; 64];
            let want = (n - self.lookahead.len()).min(chunk.len());
            let got = self.input.read(&mut chunk[..want])?;
            if got == 0 {
                break;
            }
            self.lookahead.extend_from_slice(&chunk[..got]);
        }
        Ok(&self.lookahead[..n.min(self.lookahead.len())])
    }

    /// Reads exactly `n` bytes.
    pub fn take(&mut self, n: u64) -> Result<Vec<u8>, ElementError> {
        if n > self.budget {
            return self.malformed(format!(
                "a value of {n} bytes is larger than the data can hold"
            ));
        }
        self.budget -= n;
        let n = usize::try_from(n).expect("bounded by the budget");
        let from_lookahead = n.min(self.lookahead.len());
        let mut out: Vec<u8> = self.lookahead.drain(..from_lookahead).collect();
        if out.len() < n {
            let start = out.len();
            out.resize(n, 0);
            if let Err(e) = self.input.read_exact(&mut out[start..]) {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    self.malformed("the data ends in the middle of an element")
                } else {
                    Err(e.into())
                };
            }
        }
        self.position += n as u64;
        Ok(out)
    }

    fn u16(&mut self, big: bool) -> Result<u16, ElementError> {
        let b = self.take(2)?;
        let b = [b[0], b[1]];
        Ok(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, big: bool) -> Result<u32, ElementError> {
        let b = self.take(4)?;
        let b = [b[0], b[1], b[2], b[3]];
        Ok(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// The tag of the next element without consuming it; `None` at the end of the stream.
    pub fn peek_tag(&mut self, syntax: Syntax) -> Result<Option<u32>, ElementError> {
        let b = self.peek(4)?;
        if b.len() < 4 {
            return Ok(None);
        }
        let (g, e) = if syntax == Syntax::ExplicitBig {
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
        Ok(Some((u32::from(g) << 16) | u32::from(e)))
    }

    fn tag(&mut self, syntax: Syntax) -> Result<u32, ElementError> {
        let big = syntax == Syntax::ExplicitBig;
        let g = self.u16(big)?;
        let e = self.u16(big)?;
        Ok((u32::from(g) << 16) | u32::from(e))
    }

    /// Reads elements until the stream ends, `end` is reached, or `stop` says so for the
    /// next top-level tag (that element is not consumed).
    pub fn dataset(
        &mut self,
        syntax: Syntax,
        end: Option<u64>,
        stop: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<Element>, ElementError> {
        let mut elements = Vec::new();
        loop {
            if end.is_some_and(|end| self.position >= end) {
                break;
            }
            let Some(tag) = self.peek_tag(syntax)? else {
                if end.is_some() {
                    return self.malformed("the data ends before its declared length");
                }
                break;
            };
            if stop(tag) {
                break;
            }
            if tag == ITEM_END {
                if end.is_some() {
                    return self.malformed("item delimiter inside a defined-length item");
                }
                self.take(8)?;
                break;
            }
            elements.push(self.element(syntax)?);
        }
        Ok(elements)
    }

    /// Reads elements of an undefined-length item until its delimiter.
    fn undefined_item(&mut self, syntax: Syntax) -> Result<Vec<Element>, ElementError> {
        let mut elements = Vec::new();
        loop {
            match self.peek_tag(syntax)? {
                None => return self.malformed("the data ends inside a sequence item"),
                Some(ITEM_END) => {
                    self.take(8)?;
                    return Ok(elements);
                }
                Some(_) => elements.push(self.element(syntax)?),
            }
        }
    }

    /// Reads one element (header and value).
    pub fn element(&mut self, syntax: Syntax) -> Result<Element, ElementError> {
        let offset = self.position;
        let big = syntax == Syntax::ExplicitBig;
        let tag = self.tag(syntax)?;
        if tag >> 16 == 0xFFFE {
            return self.malformed(format!("unexpected item tag {tag:08X} outside a sequence"));
        }
        let (vr, length) = if syntax == Syntax::ImplicitLittle {
            (dictionary_vr(tag), self.u32(false)?)
        } else {
            let vr_bytes = self.take(2)?;
            let vr = [vr_bytes[0], vr_bytes[1]];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return self.malformed(format!(
                    "element ({:04X},{:04X}) has no valid VR",
                    tag >> 16,
                    tag & 0xFFFF
                ));
            }
            if long_length(vr) {
                self.take(2)?;
                (vr, self.u32(big)?)
            } else {
                (vr, u32::from(self.u16(big)?))
            }
        };
        let value = if &vr == b"SQ" || (length == UNDEFINED && &vr == b"UN") {
            // An undefined-length UN is a sequence in Implicit VR Little Endian.
            let inner = if &vr == b"UN" {
                Syntax::ImplicitLittle
            } else {
                syntax
            };
            Value::Items(self.items(inner, length, offset)?)
        } else if length == UNDEFINED {
            if syntax == Syntax::ImplicitLittle {
                Value::Items(self.items(syntax, length, offset)?)
            } else {
                Value::Fragments(self.fragments(syntax)?)
            }
        } else {
            Value::Bytes(self.take(u64::from(length))?)
        };
        let vr = match (&value, &vr) {
            (Value::Items(_), b"UN") => *b"SQ",
            _ => vr,
        };
        Ok(Element {
            tag,
            vr,
            offset,
            value,
        })
    }

    /// Reads a sequence's items; each level of nesting is one level of recursion, so the
    /// depth is bounded.
    fn items(
        &mut self,
        syntax: Syntax,
        length: u32,
        offset: u64,
    ) -> Result<Vec<Item>, ElementError> {
        if self.depth >= MAX_NESTING {
            return Err(ElementError::TooDeep { offset });
        }
        self.depth += 1;
        let items = self.items_within(syntax, length);
        self.depth -= 1;
        items
    }

    fn items_within(&mut self, syntax: Syntax, length: u32) -> Result<Vec<Item>, ElementError> {
        let end = (length != UNDEFINED).then(|| self.position.saturating_add(u64::from(length)));
        let mut items = Vec::new();
        loop {
            if end.is_some_and(|end| self.position >= end) {
                if end.is_some_and(|end| self.position > end) {
                    return self.malformed("a sequence item runs past its sequence");
                }
                return Ok(items);
            }
            let offset = self.position;
            let tag = self.tag(syntax)?;
            let item_length = self.u32(syntax == Syntax::ExplicitBig)?;
            match tag {
                SEQUENCE_END if end.is_none() => return Ok(items),
                ITEM if item_length == UNDEFINED => items.push(Item {
                    offset,
                    elements: self.undefined_item(syntax)?,
                }),
                ITEM => {
                    let item_end = self.position.saturating_add(u64::from(item_length));
                    let elements = self.dataset(syntax, Some(item_end), &|_| false)?;
                    if self.position != item_end {
                        return self.malformed("a sequence item's elements overrun its length");
                    }
                    items.push(Item { offset, elements });
                }
                _ => {
                    return self.malformed(format!("expected a sequence item, found {tag:08X}"));
                }
            }
        }
    }

    fn fragments(&mut self, syntax: Syntax) -> Result<Vec<Vec<u8>>, ElementError> {
        let mut fragments = Vec::new();
        loop {
            let tag = self.tag(syntax)?;
            let length = self.u32(syntax == Syntax::ExplicitBig)?;
            match tag {
                SEQUENCE_END => return Ok(fragments),
                ITEM if length != UNDEFINED => fragments.push(self.take(u64::from(length))?),
                _ => return self.malformed("encapsulated data without its fragment items"),
            }
        }
    }
}

/// Size in bytes of a binary VR's unit, for byte-order conversion.
fn swap_unit(vr: [u8; 2]) -> usize {
    match &vr {
        b"US" | b"SS" | b"OW" | b"AT" => 2,
        b"UL" | b"SL" | b"FL" | b"OF" | b"OL" => 4,
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => 8,
        _ => 1,
    }
}

/// Converts an element read in `syntax` so that it can be written as Explicit VR Little
/// Endian (binary values of big-endian data are byte-swapped).
pub fn to_little_endian(element: &Element, syntax: Syntax) -> Element {
    let mut out = element.clone();
    if syntax == Syntax::ExplicitBig {
        convert(&mut out);
    }
    out
}

fn convert(element: &mut Element) {
    match &mut element.value {
        Value::Bytes(bytes) => {
            let unit = swap_unit(element.vr);
            if unit > 1 {
                for chunk in bytes.chunks_exact_mut(unit) {
                    chunk.reverse();
                }
            }
        }
        Value::Items(items) => {
            for item in items {
                item.elements.iter_mut().for_each(convert);
            }
        }
        Value::Fragments(_) => {}
    }
}

/// Appends `element` to `out` in Explicit VR Little Endian with defined lengths.
pub fn write(out: &mut Vec<u8>, element: &Element) {
    let vr = element.vr;
    out.extend_from_slice(&((element.tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&((element.tag & 0xFFFF) as u16).to_le_bytes());
    out.extend_from_slice(&vr);
    let body = match &element.value {
        Value::Bytes(bytes) => padded(bytes, vr),
        Value::Items(items) => {
            let mut body = Vec::new();
            for item in items {
                write_item(&mut body, &item.elements);
            }
            body
        }
        Value::Fragments(fragments) => {
            // Encapsulated data keeps its undefined length and delimiter.
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&UNDEFINED.to_le_bytes());
            for fragment in fragments {
                out.extend_from_slice(&0xFFFEu16.to_le_bytes());
                out.extend_from_slice(&0xE000u16.to_le_bytes());
                let length =
                    u32::try_from(fragment.len()).expect("fragments are read with a 32-bit length");
                out.extend_from_slice(&length.to_le_bytes());
                out.extend_from_slice(fragment);
            }
            out.extend_from_slice(&0xFFFEu16.to_le_bytes());
            out.extend_from_slice(&0xE0DDu16.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            return;
        }
    };
    let length = u32::try_from(body.len())
        .expect("values are read under a budget far below 4 GiB (Parser::new)");
    match u16::try_from(length) {
        Ok(short) if !long_length(vr) => out.extend_from_slice(&short.to_le_bytes()),
        _ => {
            if !long_length(vr) {
                // Longer than a 16-bit length can say (legal in implicit VR): PS3.5 6.2.2
                // has such a value written as UN, whose length field has 32 bits.
                let at = out.len() - 2;
                out[at..].copy_from_slice(b"UN");
            }
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&length.to_le_bytes());
        }
    }
    out.extend_from_slice(&body);
}

/// Appends an item with a defined length holding `elements`.
pub fn write_item(out: &mut Vec<u8>, elements: &[Element]) {
    let mut body = Vec::new();
    for element in elements {
        write(&mut body, element);
    }
    out.extend_from_slice(&0xFFFEu16.to_le_bytes());
    out.extend_from_slice(&0xE000u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Value bytes padded to even length (NUL for UI and binary VRs, space for text).
pub fn padded(bytes: &[u8], vr: [u8; 2]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() % 2 == 1 {
        let pad = match &vr {
            b"UI" | b"OB" | b"UN" => 0,
            _ => b' ',
        };
        out.push(pad);
    }
    out
}

/// A short text element (the value is padded as its VR requires).
pub fn text_element(tag: u32, vr: &[u8; 2], value: &[u8]) -> Element {
    Element {
        tag,
        vr: *vr,
        offset: 0,
        value: Value::Bytes(value.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_item_offsets() {
        let inner = vec![text_element(0x0008_0100, b"SH", b"T-04000")];
        let sequence = Element {
            tag: 0x0040_A043,
            vr: *b"SQ",
            offset: 0,
            value: Value::Items(vec![Item {
                offset: 0,
                elements: inner,
            }]),
        };
        let mut bytes = Vec::new();
        write(&mut bytes, &text_element(0x0008_0005, b"CS", b"ISO_IR 192"));
        write(&mut bytes, &sequence);
        let mut parser = Parser::new(&bytes[..], 0, 1 << 20);
        let elements = parser
            .dataset(Syntax::ExplicitLittle, None, &|_| false)
            .expect("parses");
        assert_eq!(elements.len(), 2);
        let Value::Items(items) = &elements[1].value else {
            panic!("a sequence")
        };
        assert_eq!(items[0].offset, 18 + 12);
        assert_eq!(text_of(&items[0].elements, 0x0008_0100), "T-04000");
    }

    #[test]
    fn a_short_vr_value_too_long_for_16_bits_is_written_as_un() {
        // Implicit VR allows a 70,000-byte Patient Name; explicit VR PN cannot say it
        // (the fuzzer's finding: the length was truncated and the rest read as elements).
        let name = vec![b'A'; 70_000];
        let mut implicit = vec![0x10, 0x00, 0x10, 0x00];
        implicit.extend_from_slice(&70_000u32.to_le_bytes());
        implicit.extend_from_slice(&name);
        implicit.extend_from_slice(&[0x10, 0x00, 0x20, 0x00, 4, 0, 0, 0]);
        implicit.extend_from_slice(b"ID01");
        let read = Parser::new(&implicit[..], 0, 1 << 20)
            .dataset(Syntax::ImplicitLittle, None, &|_| false)
            .expect("parses");
        let mut explicit = Vec::new();
        for element in &read {
            write(
                &mut explicit,
                &to_little_endian(element, Syntax::ImplicitLittle),
            );
        }
        assert_eq!(&explicit[4..8], b"UN\0\0");
        let again = Parser::new(&explicit[..], 0, 1 << 20)
            .dataset(Syntax::ExplicitLittle, None, &|_| false)
            .expect("what was written reads back");
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].bytes(), Some(&name[..]));
        assert_eq!(text_of(&again, 0x0010_0020), "ID01");
    }

    #[test]
    fn nesting_beyond_the_bound_is_an_error_not_a_stack_overflow() {
        // Undefined-length sequences and items, 5,000 levels (the DICOMDIR).
        let nested = |levels: usize| {
            let mut bytes = Vec::new();
            for _ in 0..levels {
                bytes.extend_from_slice(&[0x09, 0, 0x01, 0x10, b'S', b'Q', 0, 0]);
                bytes.extend_from_slice(&[0xFF; 4]);
                bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
            }
            for _ in 0..levels {
                bytes.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
                bytes.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
            }
            bytes
        };
        for (syntax, per_level) in [(Syntax::ExplicitLittle, 20), (Syntax::ImplicitLittle, 16)] {
            let bytes = nested(5000);
            let bytes = if syntax == Syntax::ImplicitLittle {
                bytes
                    .chunks(4)
                    .filter(|c| *c != b"SQ\0\0")
                    .flatten()
                    .copied()
                    .collect()
            } else {
                bytes
            };
            let mut parser = Parser::new(&bytes[..], 0, 1 << 20);
            let err = parser
                .dataset(syntax, None, &|_| false)
                .expect_err("too deep");
            let deepest = MAX_NESTING as u64 * per_level;
            assert!(
                matches!(err, ElementError::TooDeep { offset } if offset == deepest),
                "{err}"
            );
            assert!(
                err.to_string().contains("nest deeper than 32 levels"),
                "{err}"
            );
        }
        let bytes = nested(MAX_NESTING);
        let mut parser = Parser::new(&bytes[..], 0, 1 << 20);
        parser
            .dataset(Syntax::ExplicitLittle, None, &|_| false)
            .expect("32 levels are read");
    }

    #[test]
    fn a_lying_length_is_refused_without_allocating() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&[0x08, 0, 0x16, 0, b'O', b'B', 0, 0]);
        bytes.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let mut parser = Parser::new(&bytes[..], 0, 1 << 20);
        assert!(
            parser
                .dataset(Syntax::ExplicitLittle, None, &|_| false)
                .is_err()
        );
    }
}
