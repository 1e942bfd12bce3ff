//! The web page's users: a file of `name:$argon2id$...` lines (PHC strings, argon2id with
//! the crate's default cost), written durably with mode 0600 by `cloudpdi web add-user`
//! and `remove-user`, and read again by the daemon whenever its size or modification time
//! changes, so that adding or removing a user needs no restart (a removed user's
//! sessions end at their next request).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use zeroize::Zeroizing;

/// Longest user name: names are typed at the login and shown in logs.
pub const MAX_NAME: usize = 32;

/// Shortest password `cloudpdi web add-user` accepts.
pub const MIN_PASSWORD: usize = 10;

/// Longest password accepted (bytes), at add-user and at the login: hashing cost grows
/// with the length, and no person types more.
pub const MAX_PASSWORD: usize = 256;

/// Largest users file read (bytes): a few thousand users; a bigger file is not ours.
pub const MAX_USERS_FILE: u64 = 1024 * 1024;

/// Why a user could not be added, removed or read; messages say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsersError {
    /// A name outside the allowed characters or length.
    #[error(
        "{0:?} is not a usable user name: 1-{MAX_NAME} characters of a-z, A-Z, 0-9, '.', '_' \
         and '-'"
    )]
    Name(String),
    /// A password too short or too long.
    #[error(
        "the password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters (bytes); choose \
         another"
    )]
    Password,
    /// No terminal to ask the password on.
    #[error(
        "standard input is not a terminal, so the password cannot be asked: run the command \
         in a terminal, or give the password on standard input with --password-stdin"
    )]
    NoTerminal,
    /// The two prompts differed.
    #[error("the two passwords differ: nothing was changed; run the command again")]
    Mismatch,
    /// `remove-user` named no user of the file.
    #[error("no user {0:?} in {path}: nothing was changed (check the spelling)", path = .1.display())]
    Unknown(String, PathBuf),
    /// A line of the file is not `name:$argon2id$...`.
    #[error(
        "{} line {line}: not \"name:$argon2id$...\"; correct or delete the line (or remove \
         the user and add it again)",
        .path.display()
    )]
    Line {
        /// The users file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The file is larger than [`MAX_USERS_FILE`].
    #[error("{} is larger than {MAX_USERS_FILE} bytes: it is not a users file; check web.users_file", .0.display())]
    TooLarge(PathBuf),
    /// Reading or writing the file failed.
    #[error("cannot {action} {}: {source}; check web.users_file and that the command runs as the daemon's user", .path.display())]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The users file.
        path: PathBuf,
        /// What the system reported.
        source: std::io::Error,
    },
    /// The command runs as another user than the one owning the users file (or its
    /// folder): the file it wrote would be unreadable to the daemon.
    #[error(
        "{} belongs to user ID {owner}, but this command runs as user ID {me}: the file it \
         writes would be unreadable to the daemon, so nothing was changed; run the command as \
         the file's owner (e.g. sudo -u '#{owner}' cloudpdi web ...)",
        .path.display()
    )]
    Owner {
        /// The users file (or its folder, before the first user).
        path: PathBuf,
        /// Its owner's user ID.
        owner: u32,
        /// The user ID this command runs as.
        me: u32,
    },
    /// Hashing failed (no randomness for the salt).
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Whether `name` is a user name the file can hold.
pub fn is_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Hashes `password` as an argon2id PHC string with a fresh random salt.
///
/// # Errors
/// [`UsersError::Password`] outside the allowed length, [`UsersError::Hash`].
pub fn hash(password: &str) -> Result<String, UsersError> {
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&password.len()) {
        return Err(UsersError::Password);
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Hash(e.to_string()))
}

/// A hash of a password nobody has, verified when the name is unknown so that a login
/// takes as long whether or not the name exists.
fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        Argon2::default()
            .hash_password(b"no user has this password")
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// Parses the users file's text: name to PHC string.
fn parse(path: &Path, text: &str) -> Result<BTreeMap<String, String>, UsersError> {
    let mut users = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || UsersError::Line {
            path: path.to_owned(),
            line: i + 1,
        };
        let (name, phc) = line.split_once(':').ok_or_else(bad)?;
        if !is_name(name) || !phc.starts_with("$argon2id$") {
            return Err(bad());
        }
        users.insert(name.to_owned(), phc.to_owned());
    }
    Ok(users)
}

/// Reads the users file; a missing file holds no user.
fn read(path: &Path) -> Result<BTreeMap<String, String>, UsersError> {
    let io = |source| UsersError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_USERS_FILE => {
            return Err(UsersError::TooLarge(path.to_owned()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io(e)),
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse(path, &text)
}

/// Writes `users` durably (temp file, fsync, rename), mode 0600.
fn write(path: &Path, users: &BTreeMap<String, String>) -> Result<(), UsersError> {
    let text: String = users
        .iter()
        .map(|(name, phc)| format!("{name}:{phc}\n"))
        .collect();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| UsersError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        })?;
    }
    crate::durable::write(path, text.as_bytes(), 0o600).map_err(|source| UsersError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

/// Adds user `name` with `password`, or changes the password of an existing one; returns
/// whether the user is new.
///
/// # Errors
/// [`UsersError`]: the name or password refused, the file unreadable or unwritable.
pub fn add(path: &Path, name: &str, password: &str) -> Result<bool, UsersError> {
    if !is_name(name) {
        return Err(UsersError::Name(name.to_owned()));
    }
    let phc = hash(password)?;
    update(path, |users| {
        Ok(users.insert(name.to_owned(), phc).is_none())
    })
}

/// Removes user `name`.
///
/// # Errors
/// [`UsersError::Unknown`] when the file has no such user, or the file's errors.
pub fn remove(path: &Path, name: &str) -> Result<(), UsersError> {
    update(path, |users| match users.remove(name) {
        Some(_) => Ok(()),
        None => Err(UsersError::Unknown(name.to_owned(), path.to_owned())),
    })
}

/// Reads the users file, applies `change` and writes it back, under an exclusive lock of
/// the file's folder (two commands at once do not lose one's change), and only as the
/// owner of the file (or of its folder before the first user), so that the daemon can
/// still read what is written.
fn update<R>(
    path: &Path,
    change: impl FnOnce(&mut BTreeMap<String, String>) -> Result<R, UsersError>,
) -> Result<R, UsersError> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| UsersError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let folder = std::fs::File::open(dir).map_err(io)?;
    rustix::fs::flock(&folder, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(e.into()))?;
    let (owned, owner) = match std::fs::metadata(path) {
        Ok(meta) => (path.to_owned(), meta.uid()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (dir.to_owned(), folder.metadata().map_err(io)?.uid())
        }
        Err(e) => return Err(io(e)),
    };
    // The effective user ID, as the owner of this process's /proc entry (proc(5)).
    let me = std::fs::metadata("/proc/self").map_err(io)?.uid();
    if owner != me {
        return Err(UsersError::Owner {
            path: owned,
            owner,
            me,
        });
    }
    let mut users = read(path)?;
    let answer = change(&mut users)?;
    write(path, &users)?;
    Ok(answer)
}

/// The users the daemon knows, read again when the file changes.
pub struct Users {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

/// The file as last read, and what identified its version.
#[derive(Default)]
struct Loaded {
    version: Option<(u64, Option<SystemTime>)>,
    users: Arc<BTreeMap<String, String>>,
}

impl Users {
    /// The users of the file at `path` (read at the first use).
    pub fn new(path: PathBuf) -> Users {
        Users {
            path,
            loaded: Mutex::new(Loaded::default()),
        }
    }

    /// The current users (blocking: may read the file). A file that cannot be read (not
    /// readable by the daemon, a bad line, too large) holds no user, so that a removal
    /// that went wrong never leaves a user in: the reason is logged once per change.
    pub fn current(&self) -> Arc<BTreeMap<String, String>> {
        let version = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.len(), m.modified().ok()));
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.version.is_some() && loaded.version == version {
            return loaded.users.clone();
        }
        loaded.version = version;
        match read(&self.path) {
            Ok(users) => {
                tracing::info!(
                    users = users.len(),
                    file = %crate::telemetry::escape(&self.path.display().to_string()),
                    "web: users file read"
                );
                loaded.users = Arc::new(users);
            }
            Err(e) => {
                tracing::error!(
                    "web: {}; until it is fixed no one can log in and every open session ends",
                    crate::telemetry::escape(&e.to_string())
                );
                loaded.users = Arc::new(BTreeMap::new());
            }
        }
        loaded.users.clone()
    }

    /// A digest of `name`'s password hash now (`None`: no such user): a session keeps the
    /// one of its login and ends when it differs, so a changed password ends the sessions
    /// opened with the old one.
    pub fn key(&self, name: &str) -> Option<String> {
        use sha2::Digest;
        self.current()
            .get(name)
            .map(|phc| hex::encode(sha2::Sha256::digest(phc.as_bytes())))
    }

    /// Whether `password` is `name`'s (blocking: argon2 takes tens of milliseconds on
    /// purpose). An unknown name costs the same time and answers false.
    pub fn verify(&self, name: &str, password: &Zeroizing<String>) -> bool {
        if password.len() > MAX_PASSWORD {
            return false;
        }
        let users = self.current();
        let (phc, known) = match users.get(name) {
            Some(phc) => (phc.as_str(), true),
            None => (decoy(), false),
        };
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), phc)
            .is_ok();
        known && matches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_added_verified_changed_and_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("web-users");
        assert!(add(&path, "clerk", "correct horse battery").expect("added"));
        let text = std::fs::read_to_string(&path).expect("file");
        assert!(text.starts_with("clerk:$argon2id$v=19$"), "{text}");
        assert!(!text.contains("correct horse"), "no password in the file");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let users = Users::new(path.clone());
        let password = |p: &str| Zeroizing::new(p.to_owned());
        assert!(users.verify("clerk", &password("correct horse battery")));
        assert!(!users.verify("clerk", &password("correct horse batterY")));
        assert!(!users.verify("nobody", &password("correct horse battery")));
        assert!(!add(&path, "clerk", "another long password").expect("changed"));
        assert!(users.verify("clerk", &password("another long password")));
        remove(&path, "clerk").expect("removed");
        assert!(users.key("clerk").is_none());
        assert!(matches!(
            remove(&path, "clerk"),
            Err(UsersError::Unknown(..))
        ));
    }

    #[test]
    fn a_file_that_cannot_be_read_holds_no_user() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("web-users");
        add(&path, "clerk", "correct horse battery").expect("added");
        let users = Users::new(path.clone());
        assert!(users.key("clerk").is_some());
        let mut text = std::fs::read_to_string(&path).expect("file");
        text.push_str("a line edited by hand\n");
        std::fs::write(&path, &text).expect("write");
        assert!(users.key("clerk").is_none(), "fail closed");
        remove(&path, "clerk").expect_err("the bad line is named");
        std::fs::write(&path, text.lines().next().expect("line")).expect("write");
        assert!(users.key("clerk").is_some(), "read again once fixed");
    }

    #[test]
    fn only_the_files_owner_changes_it_and_no_change_is_lost() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("web-users");
        add(&path, "clerk", "correct horse battery").expect("added");
        std::os::unix::fs::chown(&path, Some(54_321), None).expect("tests run as root");
        let err = add(&path, "nurse", "correct horse battery").expect_err("another owner");
        assert!(
            err.to_string().contains("user ID 54321") && err.to_string().contains("sudo -u"),
            "{err}"
        );
        assert!(matches!(
            remove(&path, "clerk"),
            Err(UsersError::Owner { .. })
        ));
        std::os::unix::fs::chown(&path, Some(0), None).expect("root");
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let path = path.clone();
                std::thread::spawn(move || {
                    add(&path, &format!("user{n}"), "correct horse battery").expect("added")
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().expect("thread"));
        }
        assert_eq!(read(&path).expect("read").len(), 5, "no change lost");
    }

    #[test]
    fn names_passwords_and_lines_are_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("web-users");
        for name in ["", "a:b", "名前", "x y", &"n".repeat(MAX_NAME + 1)] {
            assert!(matches!(
                add(&path, name, "long enough pw"),
                Err(UsersError::Name(_))
            ));
        }
        assert!(is_name(&"n".repeat(MAX_NAME)));
        assert!(matches!(
            add(&path, "a", "short"),
            Err(UsersError::Password)
        ));
        let long = "p".repeat(MAX_PASSWORD + 1);
        assert!(matches!(add(&path, "a", &long), Err(UsersError::Password)));
        let big = vec![b'#'; usize::try_from(MAX_USERS_FILE).expect("small") + 1];
        std::fs::write(&path, big).expect("write");
        assert!(matches!(read(&path), Err(UsersError::TooLarge(_))));
        std::fs::write(&path, "clerk:plain-text-password\n").expect("write");
        let err = read(&path).expect_err("not a hash");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(!err.to_string().contains("plain-text"), "{err}");
    }
}
