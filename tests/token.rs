//! `cloudpdi token new|inspect` and `cloudpdi encrypt|decrypt` as an operator uses them.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn cloudpdi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn new_token(dir: &std::path::Path, name: &str) -> String {
    new_token_with_summary(dir, name, "CT chest")
}

fn new_token_with_summary(dir: &std::path::Path, name: &str, summary: &str) -> String {
    let path = dir.join(name);
    let out = cloudpdi(&[
        "token",
        "new",
        "--repository",
        "https://repo.example.jp/v1",
        "--document-id",
        "D7K2M9Q4X1Z8",
        "--facility",
        "KYOTO-UH",
        "--summary",
        summary,
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    format!("@{}", path.display())
}

#[test]
fn a_new_token_is_private_inspectable_and_keeps_its_secret_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let file = dir.path().join("t.txt");
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    let token_text = std::fs::read_to_string(&file).unwrap();
    assert!(token_text.starts_with("HT1-"));

    let shown = cloudpdi(&["token", "inspect", &token]);
    let shown_text = text(&shown);
    assert!(shown.status.success(), "{shown_text}");
    assert!(shown_text.contains("D7K2M9Q4X1Z8") && shown_text.contains("valid until"));
    // The default expiry is a route's (expires_in_days = 14), not a flag's own.
    assert!(
        shown_text.contains("13 days") || shown_text.contains("14 days"),
        "{shown_text}"
    );
    assert!(!shown_text.contains("secret:"), "{shown_text}");
    let secret = cloudpdi(&["token", "inspect", &token, "--show-secret"]);
    assert!(text(&secret).contains("secret:"));

    // A typo in the fourth group is named, and the token text never echoed.
    let mut chars: Vec<char> = token_text.trim().chars().collect();
    let at = "HT1-".len() + 3 * 6 + 1;
    chars[at] = if chars[at] == 'Z' { 'Y' } else { 'Z' };
    let typo: String = chars.into_iter().collect();
    let bad = cloudpdi(&["token", "inspect", &typo]);
    let bad_text = text(&bad);
    assert!(!bad.status.success());
    assert!(bad_text.contains("group 4 looks mistyped"), "{bad_text}");
    assert!(
        !bad_text.contains(&typo[4..20]),
        "error echoes the token: {bad_text}"
    );
}

#[test]
fn a_summary_with_terminal_escapes_cannot_fake_a_line_of_inspect() {
    let dir = tempfile::tempdir().unwrap();
    // Whoever issued the token chose its summary: it tries to erase the line and print a
    // repository of its own.
    let token = new_token_with_summary(
        dir.path(),
        "t.txt",
        "CT\u{1b}[2K\rrepository:  https://evil.example\u{202e}",
    );
    let shown = cloudpdi(&["token", "inspect", &token]);
    let shown_text = text(&shown);
    assert!(shown.status.success(), "{shown_text}");
    assert!(
        !shown_text.contains('\u{1b}') && !shown_text.contains('\r'),
        "{shown_text:?}"
    );
    assert!(!shown_text.contains('\u{202e}'), "{shown_text:?}");
    assert_eq!(
        shown_text
            .lines()
            .filter(|l| l.starts_with("repository:"))
            .count(),
        1,
        "{shown_text}"
    );
    assert!(
        shown_text.contains("CT\\x1b[2K\\rrepository:"),
        "{shown_text}"
    );
}

#[test]
fn encrypt_and_decrypt_with_the_token_and_refuse_the_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "t.txt");
    let other = new_token(dir.path(), "other.txt");
    let plain = dir.path().join("study.zip");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&plain, &data).unwrap();
    let sealed = dir.path().join("study.cpdi");
    for zstd in [false, true] {
        let _ = std::fs::remove_file(&sealed);
        let mut args = vec!["encrypt", "--token", &token];
        if zstd {
            args.push("--zstd");
        }
        let (p, s) = (plain.to_str().unwrap(), sealed.to_str().unwrap());
        args.extend([p, s]);
        let out = cloudpdi(&args);
        assert!(out.status.success(), "{}", text(&out));
        let opened = dir.path().join(format!("opened-{zstd}.zip"));
        let out = cloudpdi(&["decrypt", "--token", &token, s, opened.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(std::fs::read(&opened).unwrap(), data);
    }
    let refused = dir.path().join("refused.zip");
    let out = cloudpdi(&[
        "decrypt",
        "--token",
        &other,
        sealed.to_str().unwrap(),
        refused.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("damaged or the token is wrong (chunk 0"),
        "{}",
        text(&out)
    );
    assert!(!refused.exists());
}

mod vectors {
    use cloudpdi::token::Token;
    use proptest::prelude::*;

    fn vector_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/token")
    }

    fn sample() -> Token {
        Token::with_secret(
            "https://repo.example.jp/v1",
            "D7K2M9Q4X1Z8",
            1_796_083_200,
            "KYOTO-UH",
            "CT chest, 1 study",
            *b"0123456789abcdef",
        )
        .unwrap()
    }

    /// tests/vectors/token/sample.txt: fixed fields and secret -> exact text, download
    /// proof hash and the container key's first sealed bytes; fail_*.txt must not parse.
    #[test]
    fn committed_token_vector_matches_exactly() {
        let token = sample();
        let mut sealed = cloudpdi::container::Encryptor::with_salt(
            &token.container_key(),
            &cloudpdi::container::Options::default(),
            [9; 32],
            Vec::new(),
        )
        .unwrap();
        std::io::Write::write_all(&mut sealed, b"cloudpdi").unwrap();
        let sealed = sealed.finish().unwrap();
        let actual = format!(
            "text {}\nproof_sha256 {}\nsealed_cloudpdi {}\n",
            token.to_text().as_str(),
            hex::encode(token.download_proof().hash()),
            hex::encode(&sealed[48..])
        );
        let path = vector_dir().join("sample.txt");
        if std::env::var_os("WRITE_TEST_VECTORS").is_some() {
            std::fs::write(&path, &actual).unwrap();
        }
        assert_eq!(actual, std::fs::read_to_string(&path).unwrap_or_default());
        let text = actual.lines().next().unwrap().trim_start_matches("text ");
        assert_eq!(Token::from_text(text).unwrap(), token);
        for entry in std::fs::read_dir(vector_dir()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("fail_") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(Token::from_text(text.trim()).is_err(), "{name} parsed");
            }
        }
    }

    proptest! {
        #[test]
        fn any_valid_token_round_trips_through_text(
            repository in "[ -~]{1,120}",
            document_id in "[A-Za-z0-9_-]{1,64}",
            issuer in "[ -~]{0,32}",
            summary in "\\PC{0,16}",
            expires_at in any::<u32>(),
            secret in any::<[u8; 16]>(),
        ) {
            let token = Token::with_secret(&repository, &document_id, expires_at, &issuer, &summary, secret).unwrap();
            let text = token.to_text();
            prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase() || b == b'-'));
            prop_assert_eq!(Token::from_text(&text).unwrap(), token.clone());
            prop_assert_eq!(Token::from_text(&text.to_lowercase().replace('-', " ")).unwrap(), token);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = Token::from_text(&text);
        }
    }
}

/// `cloudpdi token slip`: each rendering is checked by independent tools from Debian:
/// zbarimg (zbar-tools) decodes the QR code from the PNG and from the SVG, HTML and PDF
/// rasterized by rsvg-convert (librsvg2-bin) and pdftoppm (poppler-utils); qpdf checks the
/// PDF's structure, pdftotext reads its text, Python's XML parser the SVG and HTML.
mod slip {
    use super::*;
    use std::path::Path;

    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} is required (scripts/test.sh installs it): {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The QR code's content as zbarimg reads it from a raster image.
    fn decode_qr(image: &Path) -> String {
        run("zbarimg", &["--raw", "-q", image.to_str().unwrap()])
            .trim_end()
            .to_owned()
    }

    fn make_slip(dir: &Path, token: &str, name: &str) -> std::path::PathBuf {
        let out = dir.join(name);
        let result = cloudpdi(&[
            "token",
            "slip",
            token,
            "--out",
            out.to_str().unwrap(),
            "--facility-name",
            "京都大学医学部附属病院 放射線部",
            "--contact",
            "075-000-0000",
            "--patient-name",
            "山田 太郎",
            "--content",
            "CT 胸部 2026-11-20",
        ]);
        assert!(result.status.success(), "{}", text(&result));
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name} holds the token");
        out
    }

    fn xml_well_formed(path: &Path) {
        let script = "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])";
        run("python3", &["-c", script, path.to_str().unwrap()]);
    }

    fn token_text(dir: &Path) -> (String, String) {
        let token = new_token(dir, "t.txt");
        let text = std::fs::read_to_string(dir.join("t.txt")).unwrap();
        (token, text.trim().to_owned())
    }

    #[test]
    fn png_qr_decodes_to_exactly_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let (token, expected) = token_text(dir.path());
        let png = make_slip(dir.path(), &token, "slip.png");
        let decoded = decode_qr(&png);
        assert_eq!(decoded, expected, "the QR holds the token and nothing else");
        assert!(cloudpdi::token::Token::from_text(&decoded).is_ok());
    }

    #[test]
    fn svg_and_html_are_well_formed_complete_and_their_qr_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let (token, expected) = token_text(dir.path());
        let svg = make_slip(dir.path(), &token, "slip.svg");
        let html = make_slip(dir.path(), &token, "slip.html");
        for page in [&svg, &html] {
            xml_well_formed(page);
            let content = std::fs::read_to_string(page).unwrap();
            for needle in [
                "京都大学医学部附属病院 放射線部",
                "山田 太郎",
                "075-000-0000",
                "有効期限 / Valid until",
                "受け取る",
                "hospital or clinic",
                &expected[..14],
            ] {
                assert!(
                    content.contains(needle),
                    "{} lacks {needle}",
                    page.display()
                );
            }
        }
        let raster = dir.path().join("svg.png");
        run(
            "rsvg-convert",
            &[
                "-w",
                "900",
                "-o",
                raster.to_str().unwrap(),
                svg.to_str().unwrap(),
            ],
        );
        assert_eq!(decode_qr(&raster), expected);

        // The HTML's inline QR code, cut out and rasterized alone.
        let qr_svg = dir.path().join("html-qr.svg");
        let script = "import re, sys; page = open(sys.argv[1], encoding='utf-8').read(); \
                      open(sys.argv[2], 'w').write(re.search(r'<svg class=\"qr\".*?</svg>', page, re.S).group(0))";
        run(
            "python3",
            &[
                "-c",
                script,
                html.to_str().unwrap(),
                qr_svg.to_str().unwrap(),
            ],
        );
        let raster = dir.path().join("html.png");
        run(
            "rsvg-convert",
            &[
                "-w",
                "400",
                "-b",
                "white",
                "-o",
                raster.to_str().unwrap(),
                qr_svg.to_str().unwrap(),
            ],
        );
        assert_eq!(decode_qr(&raster), expected);
    }

    #[test]
    fn pdf_passes_qpdf_shows_the_text_and_its_qr_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let (token, expected) = token_text(dir.path());
        let pdf = make_slip(dir.path(), &token, "slip.pdf");
        run("qpdf", &["--check", pdf.to_str().unwrap()]);
        let text = run("pdftotext", &["-layout", pdf.to_str().unwrap(), "-"]);
        for needle in [
            "Valid until",
            "hospital or clinic",
            &expected[..14],
            "山田 太郎",
        ] {
            assert!(text.contains(needle), "PDF text lacks {needle}:\n{text}");
        }
        let prefix = dir.path().join("page");
        run(
            "pdftoppm",
            &[
                "-r",
                "200",
                "-png",
                "-singlefile",
                pdf.to_str().unwrap(),
                prefix.to_str().unwrap(),
            ],
        );
        assert_eq!(decode_qr(&dir.path().join("page.png")), expected);
    }

    #[test]
    fn an_unknown_extension_or_a_bad_token_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (token, _) = token_text(dir.path());
        let out = dir.path().join("slip.txt");
        let result = cloudpdi(&["token", "slip", &token, "--out", out.to_str().unwrap()]);
        assert!(!result.status.success());
        assert!(
            text(&result).contains(".html, .pdf, .png or .svg"),
            "{}",
            text(&result)
        );
        let out = dir.path().join("slip.pdf");
        let result = cloudpdi(&[
            "token",
            "slip",
            "HT1-00000-00000",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!result.status.success());
        assert!(!out.exists());
    }
}
