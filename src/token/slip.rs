//! The printable slip the patient carries instead of a CD: QR code (the token text only),
//! the grouped text to type if the QR cannot be read, expiry (local time, in Japanese and
//! English), issuing facility and whom to call, what the study is (patient's name, study
//! date, modality, description: what a clerk matches the slip to the patient with), and
//! short instructions in Japanese and English.
//!
//! Four renderings of one A5 layout: SVG and PDF (vector, QR drawn as rectangles), HTML
//! (the same content as a web page with an inline SVG QR, prints on A5), and PNG (only the
//! QR code with its quiet zone: a raster file to paste elsewhere; we ship no font to draw
//! text into pixels). The PDF embeds no font: Latin text uses the standard Helvetica and
//! Courier, Japanese text the Adobe-Japan1 font `HeiseiKakuGo-W5` by name with the
//! `UniJIS-UCS2-H` CMap, which Adobe readers and poppler (with `poppler-data`) provide.
//!
//! The patient's name may be printed (the patient holds the paper) but is never in the QR
//! code. The file holds the token: [`render`] writes it with mode 0600 (the pipeline
//! writes its slips 0640 for the clerks' group), to a temp file, fsynced and renamed.
//! Every printed field is bounded ([`MAX_FIELD_CHARS`]) and escaped for its format (HTML
//! and SVG entities; PDF text is written as hex strings, so no byte of a field can end a
//! PDF string).

use std::fmt::Write as _;
use std::path::Path;

use jiff::tz::TimeZone;

use super::Token;
use super::qr::{self, QUIET_ZONE, QrMatrix};
use crate::clock::{until_en, until_ja};
use crate::markup::escape;

/// Longest free-text field printed on the slip (characters).
pub const MAX_FIELD_CHARS: usize = 60;

/// What the slip prints besides the token. Only the token goes into the QR code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlipDetails {
    /// Name of the issuing facility, as patients know it (the token holds only a code).
    pub facility_name: String,
    /// How to reach the facility when the slip is lost or expired (phone, department).
    pub facility_contact: Option<String>,
    /// The patient's name, for the patient's own benefit; printed, never encoded.
    pub patient_name: Option<String>,
    /// The study date(s) as printed, e.g. "2026-11-20": with the modality, what a clerk
    /// matches the slip with.
    pub study_date: Option<String>,
    /// The study's modalities, e.g. "CT, PT".
    pub modality: Option<String>,
    /// The study description, e.g. "CT CHEST".
    pub study_description: Option<String>,
    /// What the token gives access to, e.g. "CT chest 2026-11-20, 1 study".
    pub content: String,
    /// The zone the expiry is printed in (`facility.time_zone`); `None`: the system's.
    pub time_zone: Option<TimeZone>,
}

/// `text` made fit to print: control characters (line breaks, tabs, escapes) become
/// spaces, runs of spaces one, and a text longer than [`MAX_FIELD_CHARS`] is cut with an
/// ellipsis. For fields taken from data (DICOM headers), which must never stop a slip.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_end();
    if out.chars().count() <= MAX_FIELD_CHARS {
        return out.to_owned();
    }
    let mut cut: String = out.chars().take(MAX_FIELD_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// File format of a slip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlipFormat {
    /// A web page (A5 when printed), QR as inline SVG.
    Html,
    /// A one-page A5 PDF, vector QR, no embedded fonts.
    Pdf,
    /// Only the QR code with its quiet zone, 8 pixels per module.
    Png,
    /// The A5 slip as SVG.
    Svg,
}

impl SlipFormat {
    /// The format named by a file's extension (`.html`/`.htm`, `.pdf`, `.png`, `.svg`).
    pub fn from_path(path: &Path) -> Option<SlipFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "html" | "htm" => Some(SlipFormat::Html),
            "pdf" => Some(SlipFormat::Pdf),
            "png" => Some(SlipFormat::Png),
            "svg" => Some(SlipFormat::Svg),
            _ => None,
        }
    }
}

/// Why a slip could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlipError {
    /// A printed field is too long or has control characters.
    #[error("slip field {0}: at most {MAX_FIELD_CHARS} characters, no line breaks")]
    Field(&'static str),
    /// The token could not be drawn as a QR code.
    #[error("cannot draw the QR code: {0}")]
    Qr(#[from] qr::QrError),
    /// The output file name does not say which format.
    #[error("the slip file name must end in .html, .pdf, .png or .svg")]
    Format,
    /// Writing the file failed.
    #[error("slip file {path}: {message}")]
    Io {
        /// The file being written.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// Renders the slip for `token` into `out` (mode 0600, temp + fsync + rename).
///
/// # Errors
/// [`SlipError`] for invalid details or a failed write; `out` is then unchanged.
pub fn render(
    token: &Token,
    details: &SlipDetails,
    format: SlipFormat,
    out: &Path,
) -> Result<(), SlipError> {
    let bytes = render_bytes(token, details, format)?;
    write_private(out, &bytes)
}

/// The slip's bytes, for callers that send it elsewhere than a file (it holds the token).
///
/// # Errors
/// [`SlipError`] for invalid details.
pub fn render_bytes(
    token: &Token,
    details: &SlipDetails,
    format: SlipFormat,
) -> Result<Vec<u8>, SlipError> {
    validate(details)?;
    let text = token.to_text();
    let matrix = qr::encode(&token.to_qr_text())?;
    let zone = match &details.time_zone {
        Some(zone) => zone.clone(),
        None => crate::clock::time_zone("").unwrap_or(TimeZone::UTC),
    };
    let expiry = u64::from(token.expires_at);
    let slip = Slip {
        text: &text,
        expiry: [until_ja(expiry, &zone), until_en(expiry, &zone)],
        details,
        matrix: &matrix,
    };
    Ok(match format {
        SlipFormat::Html => slip.html().into_bytes(),
        SlipFormat::Svg => slip.svg().into_bytes(),
        SlipFormat::Pdf => slip.pdf(),
        SlipFormat::Png => {
            let mut png = Vec::new();
            qr::to_png(&matrix, 8, &mut png).map_err(|message| SlipError::Io {
                path: "(memory)".into(),
                message,
            })?;
            png
        }
    })
}

fn validate(details: &SlipDetails) -> Result<(), SlipError> {
    let fields = [
        ("facility name", Some(&details.facility_name)),
        ("facility contact", details.facility_contact.as_ref()),
        ("patient name", details.patient_name.as_ref()),
        ("study date", details.study_date.as_ref()),
        ("modality", details.modality.as_ref()),
        ("study description", details.study_description.as_ref()),
        ("content", Some(&details.content)),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            if value.chars().count() > MAX_FIELD_CHARS || value.chars().any(char::is_control) {
                return Err(SlipError::Field(name));
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` readable by the owner only, durably ([`crate::durable`]).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SlipError> {
    path.file_name().ok_or(SlipError::Format)?;
    crate::durable::write(path, bytes, 0o600).map_err(|e| SlipError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Instructions for the patient, pre-broken into lines that fit the A5 layout.
const INSTRUCTIONS_JA: [&str; 6] = [
    "この用紙は、CDの代わりにあなたの画像・検査データを受け取る",
    "ための鍵です。紹介先の医療機関の受付に、有効期限までに",
    "この用紙をお渡しください。",
    "QRコードと文字列は、ご本人と紹介先の医療機関以外には見せない",
    "でください（写真の送信やSNSへの投稿もしないでください）。",
    "紛失したときや期限が切れたときは、発行医療機関にご連絡ください。",
];
/// Label of the facility's contact, printed under the instructions.
const CONTACT_LABEL: &str = "お問い合わせ・紛失時 / Questions, lost slip: ";
const INSTRUCTIONS_EN: [&str; 5] = [
    "This slip replaces the CD with your images and results. Hand it",
    "to the reception of the hospital or clinic you are referred to,",
    "before the expiry date. Show the QR code and the text to no one",
    "else; do not photograph, send or post them. If the slip is lost",
    "or expired, contact the issuing facility.",
];
const TITLE_JA: &str = "医療画像・検査データ受け取り票";
const TITLE_EN: &str = "Token for your medical images (HI-TOKEN)";
const GROUPS_PER_LINE: usize = 5;

/// Page size (A5, points) and margin shared by the SVG and PDF layouts.
const PAGE_W: f64 = 420.0;
const PAGE_H: f64 = 595.0;
const MARGIN: f64 = 36.0;
const QR_SIDE: f64 = 150.0;

/// Typeface of a piece of text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Face {
    Sans,
    Mono,
}

/// One drawing instruction of the A5 layout, y measured down from the top edge (points).
enum Item {
    Text {
        x: f64,
        y: f64,
        size: f64,
        face: Face,
        gray: bool,
        text: String,
    },
    Qr {
        x: f64,
        y: f64,
        side: f64,
    },
}

struct Slip<'a> {
    text: &'a str,
    /// The expiry in Japanese and in English.
    expiry: [String; 2],
    details: &'a SlipDetails,
    matrix: &'a QrMatrix,
}

impl Slip<'_> {
    /// The labelled rows: (Japanese / English label, value).
    fn rows(&self) -> Vec<(&'static str, String)> {
        let d = self.details;
        let mut rows = vec![("発行医療機関 / Issued by", d.facility_name.clone())];
        if let Some(patient) = &d.patient_name {
            rows.push(("患者氏名 / Patient", patient.clone()));
        }
        let study: Vec<&str> = [&d.study_date, &d.modality, &d.study_description]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        if !study.is_empty() {
            rows.push(("検査 / Study", study.join("  ")));
        }
        rows.push(("内容 / Content", d.content.clone()));
        let [ja, en] = &self.expiry;
        rows.push(("有効期限 / Valid until", ja.clone()));
        rows.push(("", en.clone()));
        rows
    }

    /// The token text in lines of whole groups, each with the number of its first group
    /// (error messages name groups by number).
    fn text_lines(&self) -> Vec<(usize, String)> {
        let groups: Vec<&str> = self.text.split('-').collect();
        let (prefix, groups) = groups.split_first().expect("the text has a prefix");
        groups
            .chunks(GROUPS_PER_LINE)
            .enumerate()
            .map(|(i, line)| {
                let joined = line.join("-");
                let text = if i == 0 {
                    format!("{prefix}-{joined}")
                } else {
                    joined
                };
                (i * GROUPS_PER_LINE + 1, text)
            })
            .collect()
    }

    fn layout(&self) -> Vec<Item> {
        let text = |x, y, size, face, gray, text: &str| Item::Text {
            x,
            y,
            size,
            face,
            gray,
            text: text.to_owned(),
        };
        let mut items = Vec::new();
        let mut y = MARGIN + 14.0;
        items.push(text(MARGIN, y, 14.0, Face::Sans, false, TITLE_JA));
        y += 16.0;
        items.push(text(MARGIN, y, 11.0, Face::Sans, false, TITLE_EN));
        y += 8.0;
        let value_x = MARGIN + 118.0;
        for (label, value) in self.rows() {
            y += 15.0;
            if !label.is_empty() {
                items.push(text(MARGIN, y, 8.0, Face::Sans, true, label));
            }
            let size = fit(&value, 10.0, PAGE_W - MARGIN - value_x);
            items.push(text(value_x, y, size, Face::Sans, false, &value));
        }
        y += 10.0;
        items.push(Item::Qr {
            x: (PAGE_W - QR_SIDE) / 2.0,
            y,
            side: QR_SIDE,
        });
        y += QR_SIDE + 6.0;
        for (group, line) in self.text_lines() {
            y += 13.0;
            items.push(text(
                MARGIN,
                y,
                7.0,
                Face::Sans,
                true,
                &format!("({group})"),
            ));
            items.push(text(MARGIN + 28.0, y, 10.5, Face::Mono, false, &line));
        }
        y += 6.0;
        for line in INSTRUCTIONS_JA {
            y += 11.0;
            items.push(text(MARGIN, y, 8.5, Face::Sans, false, line));
        }
        y += 4.0;
        for line in INSTRUCTIONS_EN {
            y += 11.0;
            items.push(text(MARGIN, y, 8.5, Face::Sans, false, line));
        }
        if let Some(contact) = &self.details.facility_contact {
            y += 14.0;
            let line = format!("{CONTACT_LABEL}{contact}");
            let size = fit(&line, 9.0, PAGE_W - 2.0 * MARGIN);
            items.push(text(MARGIN, y, size, Face::Sans, false, &line));
        }
        items
    }

    fn svg(&self) -> String {
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
             width=\"148mm\" height=\"210mm\" viewBox=\"0 0 {PAGE_W} {PAGE_H}\">\n\
             <rect width=\"{PAGE_W}\" height=\"{PAGE_H}\" fill=\"#fff\"/>\n"
        );
        for item in self.layout() {
            match item {
                Item::Text {
                    x,
                    y,
                    size,
                    face,
                    gray,
                    text,
                } => {
                    let family = match face {
                        Face::Sans => "'Noto Sans CJK JP','Hiragino Sans','Yu Gothic',sans-serif",
                        Face::Mono => "'DejaVu Sans Mono',Consolas,monospace",
                    };
                    let fill = if gray { "#555" } else { "#000" };
                    let weight = if face == Face::Mono { "bold" } else { "normal" };
                    let _ = writeln!(
                        out,
                        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size:.1}\" font-family=\"{family}\" \
                         font-weight=\"{weight}\" fill=\"{fill}\">{}</text>",
                        escape(&text)
                    );
                }
                Item::Qr { x, y, side } => {
                    out.push_str(&qr_svg_group(self.matrix, x, y, side));
                }
            }
        }
        out.push_str("</svg>\n");
        out
    }

    fn html(&self) -> String {
        let mut rows = String::new();
        for (label, value) in self.rows() {
            let _ = writeln!(
                rows,
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(label),
                escape(&value)
            );
        }
        let lines: String = self
            .text_lines()
            .iter()
            .map(|(group, line)| {
                format!("<span class=\"n\">({group})</span> {}<br/>\n", escape(line))
            })
            .collect();
        let side = self.matrix.width() + 2 * QUIET_ZONE;
        let qr = qr_svg_group(self.matrix, 0.0, 0.0, side as f64);
        let contact = match &self.details.facility_contact {
            Some(contact) => format!(
                "<p class=\"contact\">{}<b>{}</b></p>\n",
                escape(CONTACT_LABEL),
                escape(contact)
            ),
            None => String::new(),
        };
        format!(
            "<!DOCTYPE html>\n<html lang=\"ja\">\n<head>\n<meta charset=\"utf-8\"/>\n\
             <title>{title}</title>\n<style>\n\
             @page {{ size: A5; margin: 12mm; }}\n\
             body {{ font-family: 'Noto Sans CJK JP', 'Hiragino Sans', 'Yu Gothic', sans-serif; max-width: 125mm; }}\n\
             h1 {{ font-size: 14pt; margin: 0; }} h2 {{ font-size: 11pt; margin: 0 0 3mm 0; font-weight: normal; }}\n\
             th {{ text-align: left; font-weight: normal; color: #555; font-size: 8pt; padding-right: 4mm; }}\n\
             .qr {{ display: block; width: 55mm; height: 55mm; margin: 4mm auto; }}\n\
             .token {{ font-family: 'DejaVu Sans Mono', Consolas, monospace; font-weight: bold; font-size: 11pt; }}\n\
             .n {{ color: #555; font-size: 7pt; font-weight: normal; }}\n\
             p {{ font-size: 9pt; }}\n</style>\n</head>\n<body>\n\
             <h1>{title}</h1>\n<h2>{subtitle}</h2>\n<table>\n{rows}</table>\n\
             <svg class=\"qr\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {side} {side}\" \
             role=\"img\" aria-label=\"QR code of the token\">\n{qr}</svg>\n\
             <p class=\"token\">\n{lines}</p>\n<p lang=\"ja\">{ja}</p>\n<p lang=\"en\">{en}</p>\n\
             {contact}</body>\n</html>\n",
            title = escape(TITLE_JA),
            subtitle = escape(TITLE_EN),
            ja = escape(&INSTRUCTIONS_JA.concat()),
            en = escape(&INSTRUCTIONS_EN.join(" ")),
        )
    }

    fn pdf(&self) -> Vec<u8> {
        let mut content = String::new();
        for item in self.layout() {
            match item {
                Item::Text {
                    x,
                    y,
                    size,
                    face,
                    gray,
                    text,
                } => {
                    let (font, hex) = pdf_text(face, &text);
                    let shade = if gray { "0.33" } else { "0" };
                    let _ = writeln!(
                        content,
                        "BT {shade} g /{font} {size:.1} Tf {x:.2} {:.2} Td <{hex}> Tj ET",
                        PAGE_H - y
                    );
                }
                Item::Qr { x, y, side } => {
                    let module = side / (self.matrix.width() + 2 * QUIET_ZONE) as f64;
                    content.push_str("0 g\n");
                    for (row, col, len) in self.matrix.dark_runs() {
                        let left = x + (col + QUIET_ZONE) as f64 * module;
                        let top = y + (row + QUIET_ZONE) as f64 * module;
                        let _ = writeln!(
                            content,
                            "{left:.3} {:.3} {:.3} {module:.3} re",
                            PAGE_H - top - module,
                            len as f64 * module
                        );
                    }
                    content.push_str("f\n");
                }
            }
        }
        pdf_document(&content)
    }
}

/// Font size (at most `max`) at which `text` fits `width` points, estimating CJK
/// characters as 1 em and others as 0.55 em.
fn fit(text: &str, max: f64, width: f64) -> f64 {
    let ems: f64 = text
        .chars()
        .map(|c| if c.is_ascii() { 0.55 } else { 1.0 })
        .sum();
    if ems == 0.0 {
        max
    } else {
        (width / ems).clamp(5.0, max)
    }
}

/// The QR code with its quiet zone as SVG rectangles in a square of `side` at (x, y).
fn qr_svg_group(matrix: &QrMatrix, x: f64, y: f64, side: f64) -> String {
    let modules = (matrix.width() + 2 * QUIET_ZONE) as f64;
    let scale = side / modules;
    let mut path = String::new();
    for (row, col, len) in matrix.dark_runs() {
        let _ = write!(
            path,
            "M{} {}h{len}v1h-{len}z",
            col + QUIET_ZONE,
            row + QUIET_ZONE
        );
    }
    format!(
        "<g transform=\"translate({x:.2} {y:.2}) scale({scale:.5})\">\
         <rect width=\"{modules}\" height=\"{modules}\" fill=\"#fff\"/>\
         <path d=\"{path}\" fill=\"#000\" shape-rendering=\"crispEdges\"/></g>\n"
    )
}

/// PDF font resource and hex string for `text`: ASCII in Helvetica or Courier-Bold,
/// anything else in the Japanese CID font as UCS-2 (characters beyond the BMP print as a
/// full-width question mark).
fn pdf_text(face: Face, text: &str) -> (&'static str, String) {
    if text.is_ascii() {
        let font = if face == Face::Mono { "F2" } else { "F1" };
        return (font, hex::encode_upper(text.as_bytes()));
    }
    let mut hex = String::with_capacity(text.len() * 4);
    for c in text.chars() {
        let unit = u16::try_from(u32::from(c)).unwrap_or(0xFF1F);
        let _ = write!(hex, "{unit:04X}");
    }
    ("F3", hex)
}

/// A one-page PDF around `content`, with cross-reference table.
fn pdf_document(content: &str) -> Vec<u8> {
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R /F2 6 0 R /F3 7 0 R >> >> >>"
        ),
        format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_owned(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Courier-Bold /Encoding /WinAnsiEncoding >>"
            .to_owned(),
        "<< /Type /Font /Subtype /Type0 /BaseFont /HeiseiKakuGo-W5 /Encoding /UniJIS-UCS2-H \
         /DescendantFonts [8 0 R] >>"
            .to_owned(),
        "<< /Type /Font /Subtype /CIDFontType0 /BaseFont /HeiseiKakuGo-W5 \
         /CIDSystemInfo << /Registry (Adobe) /Ordering (Japan1) /Supplement 2 >> \
         /FontDescriptor 9 0 R /DW 1000 /W [1 95 500 231 389 500 631 631 500] >>"
            .to_owned(),
        "<< /Type /FontDescriptor /FontName /HeiseiKakuGo-W5 /Flags 4 \
         /FontBBox [-92 -250 1010 922] /ItalicAngle 0 /Ascent 752 /Descent -221 \
         /CapHeight 737 /StemV 114 >>"
            .to_owned(),
    ];
    let mut out = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for offset in offsets {
        let _ = writeln!(table, "{offset:010} 00000 n ");
    }
    let _ = write!(
        table,
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    );
    out.extend_from_slice(table.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::with_secret(
            crate::token::RepositoryRef::Community("KYOTO1".into()),
            "0123456789abcdef0123",
            1_796_083_200,
            [0x42; 16],
        )
        .expect("valid sample")
    }

    fn details() -> SlipDetails {
        SlipDetails {
            facility_name: "京都大学医学部附属病院 <test & \"quote\">".into(),
            facility_contact: Some("075-000-0000".into()),
            patient_name: Some("山田 太郎".into()),
            content: "CT chest".into(),
            ..SlipDetails::default()
        }
    }

    #[test]
    fn text_lines_keep_every_group_and_number_them() {
        let token = token();
        let text = token.to_text();
        let matrix = qr::encode(&text).expect("fits");
        let details = details();
        let slip = Slip {
            text: &text,
            expiry: [
                "2026年12月1日 09:00まで".into(),
                "until 1 Dec 2026 09:00 (JST)".into(),
            ],
            details: &details,
            matrix: &matrix,
        };
        let lines = slip.text_lines();
        let joined: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(joined.join("-"), *text);
        assert_eq!(lines[1].0, GROUPS_PER_LINE + 1);
    }

    #[test]
    fn markup_is_escaped_and_the_patient_name_is_printed() {
        let svg =
            String::from_utf8(render_bytes(&token(), &details(), SlipFormat::Svg).expect("render"))
                .expect("utf-8");
        assert!(svg.contains("&lt;test &amp; &quot;quote&quot;&gt;"));
        assert!(!svg.contains("<test"));
        assert!(svg.contains("山田 太郎"));
    }

    #[test]
    fn long_or_multi_line_fields_are_refused() {
        let mut bad = details();
        bad.patient_name = Some("a\nb".into());
        assert!(matches!(
            render_bytes(&token(), &bad, SlipFormat::Html),
            Err(SlipError::Field("patient name"))
        ));
        bad.patient_name = None;
        bad.content = "x".repeat(MAX_FIELD_CHARS + 1);
        assert!(render_bytes(&token(), &bad, SlipFormat::Pdf).is_err());
    }

    #[test]
    fn data_fields_are_made_printable() {
        assert_eq!(printable("  CT\r\n\u{1b}[31m CHEST\t "), "CT [31m CHEST");
        let long = printable(&"山".repeat(MAX_FIELD_CHARS * 2));
        assert_eq!(long.chars().count(), MAX_FIELD_CHARS);
        assert!(long.ends_with('…'));
        let mut details = details();
        details.study_description = Some(long);
        assert!(render_bytes(&token(), &details, SlipFormat::Pdf).is_ok());
    }

    /// With every field at its longest and the contact printed, the A5 page still holds
    /// everything: the last line ends above the bottom edge.
    #[test]
    fn the_fullest_slip_fits_the_page() {
        let token = token();
        let text = token.to_text();
        let matrix = qr::encode(&text).expect("fits");
        let long = "山".repeat(MAX_FIELD_CHARS);
        let details = SlipDetails {
            facility_name: long.clone(),
            facility_contact: Some(long.clone()),
            patient_name: Some(long.clone()),
            study_date: Some(long.clone()),
            modality: Some(long.clone()),
            study_description: Some(long.clone()),
            content: long.clone(),
            time_zone: None,
        };
        let slip = Slip {
            text: &text,
            expiry: [long.clone(), long],
            details: &details,
            matrix: &matrix,
        };
        let bottom = slip
            .layout()
            .iter()
            .map(|item| match item {
                Item::Text { y, .. } => *y,
                Item::Qr { y, side, .. } => y + side,
            })
            .fold(0.0, f64::max);
        assert!(bottom < PAGE_H - 12.0, "last line at {bottom} of {PAGE_H}");
    }

    #[test]
    fn expiry_is_local_time_with_the_hour() {
        let mut details = details();
        details.time_zone = Some(crate::clock::time_zone("Asia/Tokyo").expect("tzdata"));
        let html =
            String::from_utf8(render_bytes(&token(), &details, SlipFormat::Html).expect("render"))
                .expect("utf-8");
        // 1_796_083_200 is 2026-12-01 00:00 UTC.
        assert!(html.contains("2026年12月1日 09:00まで"), "{html}");
        assert!(html.contains("until 1 Dec 2026 09:00 (JST)"), "{html}");
        assert!(!html.contains("(UTC)"), "{html}");
    }

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(
            SlipFormat::from_path(Path::new("a/slip.PDF")),
            Some(SlipFormat::Pdf)
        );
        assert_eq!(SlipFormat::from_path(Path::new("slip.txt")), None);
        assert_eq!(SlipFormat::from_path(Path::new("slip")), None);
    }
}
