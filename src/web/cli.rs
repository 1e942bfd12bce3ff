//! `cloudpdi web add-user NAME` and `cloudpdi web remove-user NAME`: the web page's users
//! file, edited while the daemon runs (it reads the file again when it changes). The
//! password is asked twice on the terminal without echo, or read from standard input
//! with `--password-stdin` (scripts, tests); it is never printed nor logged.

use std::io::{BufRead, IsTerminal, Read, Write};

use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
use zeroize::Zeroizing;

use super::users::{self, MAX_PASSWORD, UsersError};
use crate::config::Config;

/// Where the password comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordFrom {
    /// Asked twice on the terminal, without echo.
    Prompt,
    /// The first line of standard input.
    Stdin,
}

/// Adds user `name` (or changes their password); answers what was done.
///
/// # Errors
/// [`UsersError`]: the name or password refused, no terminal to ask on, the users file
/// unreadable or unwritable.
pub fn add_user(config: &Config, name: &str, from: PasswordFrom) -> Result<String, UsersError> {
    if !users::is_name(name) {
        return Err(UsersError::Name(name.to_owned()));
    }
    let password = match from {
        PasswordFrom::Stdin => read_line(&mut std::io::stdin().lock())?,
        PasswordFrom::Prompt => {
            let first = prompt(&format!("password for {name}: "))?;
            let again = prompt("the same password again: ")?;
            if first != again {
                return Err(UsersError::Mismatch);
            }
            first
        }
    };
    let path = config.web_users_file();
    let new = users::add(&path, name, &password)?;
    let done = if new {
        "added"
    } else {
        "changed (new password)"
    };
    Ok(format!(
        "web user {name} {done} in {}; the running daemon reads it at the next login, no \
         restart needed",
        path.display()
    ))
}

/// Removes user `name`; answers what was done.
///
/// # Errors
/// [`UsersError::Unknown`] for a name the file does not hold, or the file's errors.
pub fn remove_user(config: &Config, name: &str) -> Result<String, UsersError> {
    let path = config.web_users_file();
    users::remove(&path, name)?;
    Ok(format!(
        "web user {name} removed from {}; their open sessions end at their next request",
        path.display()
    ))
}

/// The first line of `input` (at most [`MAX_PASSWORD`] bytes), without its line end.
fn read_line(input: &mut impl BufRead) -> Result<Zeroizing<String>, UsersError> {
    let mut line = Zeroizing::new(String::new());
    let limit = u64::try_from(MAX_PASSWORD + 2).unwrap_or(u64::MAX);
    input
        .take(limit)
        .read_line(&mut line)
        .map_err(|source| UsersError::Io {
            action: "read",
            path: "standard input".into(),
            source,
        })?;
    let trimmed = line.trim_end_matches(['\r', '\n']).len();
    line.truncate(trimmed);
    Ok(line)
}

/// Asks on the terminal (standard input) without echo.
fn prompt(question: &str) -> Result<Zeroizing<String>, UsersError> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(UsersError::NoTerminal);
    }
    let io = |source| UsersError::Io {
        action: "read",
        path: "the terminal".into(),
        source,
    };
    let before = tcgetattr(&stdin).map_err(|e| io(e.into()))?;
    let mut quiet = before.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Now, &quiet).map_err(|e| io(e.into()))?;
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let line = read_line(&mut stdin.lock());
    let restored = tcsetattr(&stdin, OptionalActions::Now, &before);
    eprintln!();
    restored.map_err(|e| io(e.into()))?;
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_is_read_and_bounded() {
        let mut input = std::io::Cursor::new("a long password\r\nsecond line\n");
        assert_eq!(
            read_line(&mut input).expect("line").as_str(),
            "a long password"
        );
        let long = "p".repeat(MAX_PASSWORD * 2);
        let mut input = std::io::Cursor::new(long);
        assert_eq!(read_line(&mut input).expect("line").len(), MAX_PASSWORD + 2);
    }
}
