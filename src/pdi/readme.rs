//! `README.TXT` and `INDEX.HTM`: what a person opening the set (or the disc it replaces)
//! sees first: who issued it, what is inside, which images are AI support images, and how
//! to open it.

use std::fmt::Write as _;

use super::policy::LABEL;
use crate::markup::escape;

/// One study as listed for people.
#[derive(Debug, Clone)]
pub struct StudyLine {
    /// Study Date (YYYYMMDD) or empty.
    pub date: String,
    /// Study Description (ASCII only; other text is replaced by a note).
    pub description: String,
    /// Modalities of its series.
    pub modalities: Vec<String>,
    /// Series count.
    pub series: usize,
    /// Instance count.
    pub instances: usize,
}

/// One AI support image as listed for people.
#[derive(Debug, Clone)]
pub struct LabelledLine {
    /// Its File ID path, e.g. `DICOM/PA000001/ST000001/SE000002/IM000001`.
    pub path: String,
    /// Its Series Description (ASCII only).
    pub series_description: String,
}

/// What both texts say.
#[derive(Debug, Clone)]
pub struct Contents {
    /// Issuing facility.
    pub facility: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Patients.
    pub patients: usize,
    /// Studies.
    pub studies: Vec<StudyLine>,
    /// AI support images that travel with the label.
    pub labelled: Vec<LabelledLine>,
    /// AI support images left out.
    pub excluded: usize,
    /// Attachment paths.
    pub attachments: Vec<String>,
}

/// Printable ASCII for the README (which must be plain text any viewer can show).
pub fn ascii(text: &str) -> String {
    if text.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        text.to_owned()
    } else {
        "(text in another character set)".to_owned()
    }
}

/// `README.TXT`, plain ASCII with CR LF line ends.
pub fn readme(c: &Contents) -> Vec<u8> {
    let mut t = String::new();
    let instances: usize = c.studies.iter().map(|s| s.instances).sum();
    let _ = writeln!(
        t,
        "PORTABLE DATA FOR IMAGING (IHE PDI) - CLOUD-PDI FILE SET"
    );
    let _ = writeln!(t);
    let _ = writeln!(t, "Issued by:  {}", ascii(&c.facility));
    let _ = writeln!(t, "Created:    {}", c.created);
    let _ = writeln!(t, "Written by: cloudpdi {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "Contents: {} patient(s), {} study(ies), {instances} DICOM instance(s).",
        c.patients,
        c.studies.len()
    );
    for s in &c.studies {
        let _ = writeln!(
            t,
            "  {}  {:<40}  {}  {} series, {} instance(s)",
            if s.date.is_empty() {
                "--------"
            } else {
                &s.date
            },
            ascii(&s.description),
            s.modalities.join("/"),
            s.series,
            s.instances
        );
    }
    let _ = writeln!(t);
    if !c.labelled.is_empty() {
        let _ = writeln!(t, "AI SUPPORT IMAGES: {LABEL}.");
        let _ = writeln!(
            t,
            "The following {} file(s) were produced by computer-aided detection or other",
            c.labelled.len()
        );
        let _ = writeln!(
            t,
            "AI software. They support the reading; they are not a diagnosis:"
        );
        for l in &c.labelled {
            let _ = writeln!(t, "  {}  {}", l.path, ascii(&l.series_description));
        }
        let _ = writeln!(t);
    }
    if c.excluded > 0 {
        let _ = writeln!(
            t,
            "{} AI support image(s) were left out by the sender's policy.",
            c.excluded
        );
        let _ = writeln!(t);
    }
    if !c.attachments.is_empty() {
        let _ = writeln!(t, "Documents (not DICOM):");
        for a in &c.attachments {
            let _ = writeln!(t, "  {a}");
        }
        let _ = writeln!(t);
    }
    let _ = writeln!(t, "HOW TO OPEN");
    let _ = writeln!(
        t,
        "Import this folder into a PACS or open it with a DICOM viewer that reads a"
    );
    let _ = writeln!(
        t,
        "DICOMDIR (the file DICOMDIR at the top lists every image). INDEX.HTM lists the"
    );
    let _ = writeln!(
        t,
        "contents in a web browser. CLOUDPDI/MANIFEST.JSON holds the SHA-256 of every file;"
    );
    let _ = writeln!(t, "`cloudpdi pdi verify` checks the whole set against it.");
    t.replace('\n', "\r\n").into_bytes()
}

/// `INDEX.HTM`: the same for a web browser (UTF-8, no scripts, no external resources).
pub fn index(c: &Contents) -> Vec<u8> {
    let e = |t: &str| escape(&ascii(t));
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Cloud-PDI file set</title></head><body>\n<h1>Cloud-PDI file set</h1>\n\
         <p>Issued by {} on {}.</p>\n",
        e(&c.facility),
        escape(&c.created)
    );
    h.push_str(
        "<table border=\"1\"><tr><th>Study date</th><th>Description</th><th>Modalities</th>\
         <th>Series</th><th>Instances</th></tr>\n",
    );
    for s in &c.studies {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.date),
            e(&s.description),
            e(&s.modalities.join("/")),
            s.series,
            s.instances
        );
    }
    h.push_str("</table>\n");
    if !c.labelled.is_empty() {
        let _ = writeln!(
            h,
            "<h2 style=\"color:#b00\">{LABEL}</h2>\n<p>These files were produced by AI \
             software. They support the reading; they are not a diagnosis.</p><ul>"
        );
        for l in &c.labelled {
            let _ = writeln!(
                h,
                "<li>{} ({}): {LABEL}</li>",
                escape(&l.path),
                e(&l.series_description)
            );
        }
        h.push_str("</ul>\n");
    }
    if c.excluded > 0 {
        let _ = writeln!(
            h,
            "<p>{} AI support image(s) were left out by the sender's policy.</p>",
            c.excluded
        );
    }
    if !c.attachments.is_empty() {
        h.push_str("<h2>Documents</h2><ul>\n");
        for a in &c.attachments {
            let _ = writeln!(h, "<li><a href=\"{0}\">{0}</a></li>", escape(a));
        }
        h.push_str("</ul>\n");
    }
    h.push_str("</body></html>\n");
    h.into_bytes()
}
