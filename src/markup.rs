//! Escaping text for HTML and XML, for what a person opens in a browser or prints: the
//! `INDEX.HTM` of a file set and the token slip (HTML with SVG).

/// `text` safe in HTML and XML content and in quoted attributes (`&`, `<`, `>`, `"`, `'`).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_characters_are_escaped_and_others_kept() {
        assert_eq!(
            escape("<a href=\"x\">R&D 'y'</a> 山田"),
            "&lt;a href=&quot;x&quot;&gt;R&amp;D &#39;y&#39;&lt;/a&gt; 山田"
        );
    }
}
