//! Log output: one line per event a person cares about, plain for journald or JSON.
//!
//! Much of what is logged comes from the network or from files (UIDs, AE titles, names,
//! error comments, token summaries). A `\n` in a SOP Instance UID must not forge a log
//! line, and an ANSI escape in a token must not repaint an admin's terminal, so every
//! field of a plain log line is written through [`Escaped`]; the JSON format escapes
//! control characters by itself. The CLI prints data through [`Escaped`] too.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;

use crate::config::{LogConfig, LogFormat};

/// dicom-rs warns about every character set it cannot decode while we only parse headers;
/// those lines would drown the ones an admin needs. `log.level` can still raise them.
const DICOM_CRATES: &str = "dicom_encoding=error,dicom_parser=error,dicom_object=error";

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{DICOM_CRATES},{}", config.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match config.format {
        LogFormat::Plain => builder.fmt_fields(escaped_fields()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Field formatting for plain lines: `message` bare, every other field `name=value`,
/// each value escaped.
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        if field.name() == "message" {
            write!(writer, "{}", Escaped(&text))
        } else {
            write!(writer, "{}={}", field.name(), Escaped(&text))
        }
    })
    .delimited(" ")
}

/// Displays text from outside (the network, a file, a token) on one line with nothing a
/// terminal would act on: control characters (C0, DEL, C1) and the Unicode controls that
/// reorder or hide text are shown as `\n`, `\x1b`, `\u{202e}`; everything else, Japanese
/// names included, is shown as it is.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' if self.0.contains(needs_escape) => f.write_str("\\\\")?,
                c if needs_escape(c) && u32::from(c) < 0x100 => {
                    write!(f, "\\x{:02x}", u32::from(c))?
                }
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Whether a character may change what a reader sees beyond itself: control characters,
/// bidirectional overrides and isolates, and zero-width or line/paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

/// [`Escaped`] as an owned string, for messages built before they are printed.
pub fn escape(text: &str) -> String {
    Escaped(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_cannot_forge_lines_or_colours() {
        assert_eq!(escape("1.2.3\nERROR forged"), "1.2.3\\nERROR forged");
        assert_eq!(escape("\u{1b}[2Krepository: x"), "\\x1b[2Krepository: x");
        assert_eq!(escape("a\u{202e}b\u{85}"), "a\\u{202e}b\\x85");
        assert_eq!(escape("del\u{7f}"), "del\\x7f");
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        for text in [
            "1.2.840.10008.5.1.4.1.1.2",
            "山田^太郎=ヤマダ^タロウ",
            "C:\\path",
            "",
        ] {
            assert_eq!(escape(text), text);
        }
    }

    #[test]
    fn a_backslash_is_doubled_only_where_escapes_appear() {
        // Otherwise "\\n" written by an attacker would read as an escaped newline.
        assert_eq!(escape("a\\nb\n"), "a\\\\nb\\n");
    }
}
