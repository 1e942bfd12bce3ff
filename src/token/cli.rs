//! What the `cloudpdi token` commands and `encrypt`/`decrypt` need besides the codec:
//! reading a token from an argument or a file, writing a token file, and a readable
//! description of a token.

use std::io::Write;
use std::path::Path;

use jiff::tz::TimeZone;

use super::{RepositoryRef, Token, TokenError};
use crate::clock::{local_text, time_left};
use zeroize::Zeroizing;

use crate::telemetry::Escaped;

/// Why a token could not be read or written by the CLI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The token itself is wrong.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The expiry asked for is past what a token can carry.
    #[error(
        "an expiry {days} days from now is past 2106, the latest a token can carry; give \
         fewer days"
    )]
    Expiry {
        /// The days asked for.
        days: u32,
    },
    /// The slip could not be rendered or written.
    #[error(transparent)]
    Slip(#[from] super::slip::SlipError),
    /// The token is past its expiry: the repository no longer opens it.
    #[error(
        "this token expired on {since}: the repository no longer gives its study out; the \
         patient should ask the issuing facility for a new slip"
    )]
    Expired {
        /// The expiry, in local time.
        since: String,
    },
    /// The token file cannot be read or written.
    #[error("token file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Issues a token with a fresh random secret that expires `expires_in_days` from now
/// (`cloudpdi token new`).
///
/// # Errors
/// [`CliError::Token`] for an invalid field, [`CliError::Expiry`] past 2106.
pub fn issue(
    repository: RepositoryRef,
    document_id: &str,
    expires_in_days: u32,
) -> Result<Token, CliError> {
    let expires = crate::clock::now_seconds()
        .checked_add(u64::from(expires_in_days) * 86_400)
        .and_then(|t| u32::try_from(t).ok())
        .ok_or(CliError::Expiry {
            days: expires_in_days,
        })?;
    Ok(Token::issue(repository, document_id, expires)?)
}

/// What a slip shows besides the token (`cloudpdi token slip`); a field left out is
/// left empty.
#[derive(Debug, Clone, Default)]
pub struct SlipText {
    /// Facility name as patients know it (the token does not carry it).
    pub facility_name: String,
    /// How to reach the facility.
    pub contact: Option<String>,
    /// Patient name, printed only (never in the QR code).
    pub patient_name: Option<String>,
    /// Description of the content, without patient data (the token carries none).
    pub content: Option<String>,
}

/// Renders the slip for `token` into `out`, in the format its extension names.
///
/// # Errors
/// [`CliError::Slip`]: an unknown extension, a field too long, a failed write.
pub fn write_slip(token: &Token, text: SlipText, out: &Path) -> Result<(), CliError> {
    use super::slip::{SlipDetails, SlipError, SlipFormat, render};
    let format = SlipFormat::from_path(out).ok_or(SlipError::Format)?;
    let details = SlipDetails {
        facility_name: text.facility_name,
        facility_contact: text.contact,
        patient_name: text.patient_name,
        content: text.content.unwrap_or_default(),
        ..SlipDetails::default()
    };
    Ok(render(token, &details, format, out)?)
}

/// A description of a token for a person (`cloudpdi token inspect`), as of now, times in
/// the system's time zone; `known` is the URL the configuration's `[repositories]` gives
/// the token's community code (`None`: not listed, or no configuration).
pub fn describe_now(token: &Token, known: Option<&str>, show_secret: bool) -> String {
    let zone = crate::clock::time_zone("").unwrap_or(TimeZone::UTC);
    describe(
        token,
        known,
        crate::clock::now_seconds(),
        &zone,
        show_secret,
    )
}

/// Whether the token still opens its study now (`cloudpdi token inspect` exits non-zero
/// for an expired one, so scripts and clerks can tell).
///
/// # Errors
/// [`CliError::Expired`] from the token's expiry second on (as the repository decides).
pub fn check_valid_now(token: &Token) -> Result<(), CliError> {
    let zone = crate::clock::time_zone("").unwrap_or(TimeZone::UTC);
    check_valid(token, crate::clock::now_seconds(), &zone)
}

/// Whether the token still opens its study at `now`; see [`check_valid_now`].
///
/// # Errors
/// [`CliError::Expired`] from the token's expiry second on.
pub fn check_valid(token: &Token, now: u64, zone: &TimeZone) -> Result<(), CliError> {
    let expiry = u64::from(token.expires_at);
    match time_left(now, expiry) {
        Some(_) => Ok(()),
        None => Err(CliError::Expired {
            since: local_text(expiry, zone),
        }),
    }
}

/// Reads a token given as text or as `@FILE` (preferred: a token on the command line is
/// visible to other users in the process list).
///
/// # Errors
/// [`CliError`] when the file cannot be read or the token is invalid.
pub fn read_token(arg: &str) -> Result<Token, CliError> {
    let text = match arg.strip_prefix('@') {
        Some(path) => read_token_file(Path::new(path))?,
        None => Zeroizing::new(arg.to_owned()),
    };
    Ok(Token::from_text(text.trim())?)
}

/// Most bytes read from a token file: a token is a few hundred bytes, so a larger file
/// (or `/dev/zero`) is not a token file and is not read further.
pub const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// Reads a token file, at most [`MAX_TOKEN_FILE`] bytes.
/// The text is wiped when dropped, and read into a buffer that never grows, so no copy is
/// left behind.
fn read_token_file(path: &Path) -> Result<Zeroizing<String>, CliError> {
    use std::io::Read;
    let file_error = |source| CliError::File {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(file_error)?;
    let capacity = usize::try_from(MAX_TOKEN_FILE + 1).expect("a small constant");
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(file_error)?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(file_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {MAX_TOKEN_FILE} bytes, so not a token file (a token is a few \
                 hundred bytes); give the file the sending hospital issued"
            ),
        )));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        file_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not text, so not a token file; give the file the sending hospital issued",
        ))
    })?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// Writes the token's text to the new file `path`, readable by its owner only, durably
/// ([`crate::durable`]: temp file, fsync, rename, folder fsync); an existing file is never
/// replaced.
///
/// # Errors
/// [`CliError::File`] when the file exists or cannot be written.
pub fn write_token_file(token: &Token, path: &Path) -> Result<(), CliError> {
    let line = token.to_line();
    crate::durable::create_new(path, 0o600, |file| file.write_all(line.as_bytes())).map_err(
        |source| CliError::File {
            path: path.display().to_string(),
            source,
        },
    )
}

/// A description of a token for a person, times in `zone`; the secret only when asked.
/// `known` is the URL of the token's community code in `[repositories]`, if listed.
pub fn describe(
    token: &Token,
    known: Option<&str>,
    now: u64,
    zone: &TimeZone,
    show_secret: bool,
) -> String {
    let expiry = u64::from(token.expires_at);
    let validity = match time_left(now, expiry) {
        Some(left) => format!("valid until {}, {left}", local_text(expiry, zone)),
        None => format!("EXPIRED since {}", local_text(expiry, zone)),
    };
    let repository = match (&token.repository, known) {
        (RepositoryRef::Community(code), Some(url)) => {
            format!("community {code} = {}", Escaped(url))
        }
        (RepositoryRef::Community(code), None) => {
            format!("community {code} (not in [repositories] of this configuration)")
        }
        (RepositoryRef::Url(url), _) => Escaped(url).to_string(),
    };
    let mut out = format!(
        "repository:  {repository}\ndocument ID: {}\nvalidity:    {validity}\n",
        Escaped(&token.document_id),
    );
    if show_secret {
        out.push_str(&format!("secret:      {}\n", hex::encode(&token.secret.0)));
    }
    out
}
