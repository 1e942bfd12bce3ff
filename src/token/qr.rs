//! The token's QR code: only the token text, in QR alphanumeric mode.
//!
//! The QR code holds [`super::Token::to_qr_text`]: the text form without the hyphens
//! between groups. It is upper-case Crockford base32, all inside QR's
//! alphanumeric character set (`0-9 A-Z space $ % * + - . / :`), which packs 5.5 bits per
//! character instead of 8 in byte mode: a smaller code that a phone camera or a desk
//! scanner reads from paper more reliably. Error correction level Q (25 % of the symbol
//! may be lost) because the slip lives in a wallet.

use qrcode::bits::Bits;
use qrcode::{Color, EcLevel, QrCode, Version};

/// Modules of white border the QR specification requires around the symbol.
pub const QUIET_ZONE: usize = 4;

/// Why a QR code could not be made.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum QrError {
    /// A character outside QR alphanumeric mode (the token text never has one).
    #[error("the text has characters outside QR alphanumeric mode")]
    NotAlphanumeric,
    /// Longer than the largest QR code at level Q.
    #[error("the token is too long for a QR code")]
    TooLong,
}

/// A QR symbol as a square of dark/light modules, without the quiet zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrMatrix {
    version: i16,
    width: usize,
    dark: Vec<bool>,
}

impl QrMatrix {
    /// The QR version (1-40) the encoder chose: the smallest holding the text at level Q.
    pub fn version(&self) -> i16 {
        self.version
    }

    /// Modules per side (without the quiet zone).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Whether the module at column `x`, row `y` is dark.
    pub fn is_dark(&self, x: usize, y: usize) -> bool {
        self.dark[y * self.width + x]
    }

    /// Runs of dark modules per row, as `(row, first column, length)`: fewer shapes to
    /// draw in SVG and PDF than one square per module.
    pub fn dark_runs(&self) -> Vec<(usize, usize, usize)> {
        let mut runs = Vec::new();
        for y in 0..self.width {
            let mut x = 0;
            while x < self.width {
                if self.is_dark(x, y) {
                    let start = x;
                    while x < self.width && self.is_dark(x, y) {
                        x += 1;
                    }
                    runs.push((y, start, x - start));
                } else {
                    x += 1;
                }
            }
        }
        runs
    }
}

/// The smallest QR code (level Q) holding `text` in alphanumeric mode only.
///
/// # Errors
/// [`QrError`] when the text is not alphanumeric-mode text or too long.
pub fn encode(text: &str) -> Result<QrMatrix, QrError> {
    const ALPHANUMERIC: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";
    if !text.bytes().all(|b| ALPHANUMERIC.contains(&b)) {
        return Err(QrError::NotAlphanumeric);
    }
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        let fits = bits.push_alphanumeric_data(text.as_bytes()).is_ok()
            && bits.push_terminator(EcLevel::Q).is_ok();
        if !fits {
            continue;
        }
        let code = QrCode::with_bits(bits, EcLevel::Q).map_err(|_| QrError::TooLong)?;
        let width = code.width();
        let version = match code.version() {
            Version::Normal(v) | Version::Micro(v) => v,
        };
        let dark = code
            .to_colors()
            .into_iter()
            .map(|c| c == Color::Dark)
            .collect();
        return Ok(QrMatrix {
            version,
            width,
            dark,
        });
    }
    Err(QrError::TooLong)
}

/// A grayscale PNG of the symbol with its quiet zone, `scale` pixels per module.
///
/// # Errors
/// The PNG encoder's error text (only on a failing writer).
pub fn to_png(matrix: &QrMatrix, scale: usize, out: impl std::io::Write) -> Result<(), String> {
    let side = (matrix.width + 2 * QUIET_ZONE) * scale;
    let mut pixels = vec![0xFFu8; side * side];
    for y in 0..matrix.width {
        for x in 0..matrix.width {
            if matrix.is_dark(x, y) {
                let (px, py) = ((x + QUIET_ZONE) * scale, (y + QUIET_ZONE) * scale);
                for row in py..py + scale {
                    pixels[row * side + px..row * side + px + scale].fill(0);
                }
            }
        }
    }
    let side = u32::try_from(side).map_err(|_| "QR image too large".to_owned())?;
    let mut encoder = png::Encoder::new(out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&pixels)
        .and_then(|()| writer.finish())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphanumeric_only_and_smallest_version() {
        assert_eq!(encode("hello"), Err(QrError::NotAlphanumeric));
        // 21 x 21 (version 1) holds 16 alphanumeric characters at level Q.
        let small = encode("HT2-ABCDE-FGHJK").expect("fits");
        assert_eq!((small.version(), small.width()), (1, 21));
        assert_eq!(encode(&"A".repeat(3000)), Err(QrError::TooLong));
    }

    #[test]
    fn runs_cover_exactly_the_dark_modules() {
        let matrix = encode("HT2-0123456789").expect("fits");
        let from_runs: usize = matrix.dark_runs().iter().map(|r| r.2).sum();
        let dark = matrix.dark.iter().filter(|d| **d).count();
        assert_eq!(from_runs, dark);
    }
}
