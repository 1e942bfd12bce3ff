//! Durable files: what this module writes is, after a crash or a power cut, either all
//! there under its final name or not there at all.
//!
//! One way, used by every part of the system (the spool, the job folders, token files,
//! slips, opened containers, PDI outputs): the content goes into a temp file created
//! exclusively (`O_EXCL`, never through a link left in its place, a fresh random name
//! from the `tempfile` crate, never a value from the data) with the mode the caller asks
//! for, which is fsynced, renamed to its name, and its folder fsynced so that the rename
//! survives too. A temp file that is dropped before it is committed is removed; one left
//! by a crash starts with `.` and ends with `.tmp` (the watch folder and the spool skip or
//! clear such names).
//!
//! Modes are given as at `open(2)`: the process umask may narrow them, never widen them.
//! Token files, slips and job files are written 0600; outputs a person asked for
//! (`cloudpdi encrypt`, `cloudpdi pdi build`) 0666 less the umask, as `File::create`.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A temp file being filled, which becomes a durable file by [`Pending::commit`] or
/// [`Pending::commit_new`]; dropped uncommitted, it is removed.
pub struct Pending {
    temp: tempfile::NamedTempFile,
}

impl Pending {
    /// A temp file in the folder where `path` will be (created durably if missing), so
    /// that the rename stays within one file system.
    ///
    /// # Errors
    /// The I/O error of creating the folder or the file.
    pub fn beside(path: &Path, mode: u32) -> io::Result<Pending> {
        let dir = folder_of(path);
        create_dir_all(dir)?;
        Pending::in_dir(dir, mode)
    }

    /// A temp file in `dir` (which must exist and be on the file system of the final
    /// name): for the spool, whose instances are received into `spool/tmp/`.
    ///
    /// # Errors
    /// The I/O error of creating the file.
    pub fn in_dir(dir: &Path, mode: u32) -> io::Result<Pending> {
        let temp = tempfile::Builder::new()
            .prefix(".")
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)?;
        Ok(Pending { temp })
    }

    /// The open temp file, to write into.
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// Where the temp file is, for a reader that needs a path (it holds what was written
    /// so far, not yet durable).
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Makes the content durable under `path`, replacing what was there: fsync, rename,
    /// fsync of the folder. `path` holds its old content or all of the new, never a part.
    ///
    /// # Errors
    /// The I/O error; the temp file is then removed.
    pub fn commit(self, path: &Path) -> io::Result<()> {
        self.finish(path, true)
    }

    /// As [`Pending::commit`], but refuses to replace a file already at `path`
    /// ([`io::ErrorKind::AlreadyExists`], naming the path).
    ///
    /// # Errors
    /// The I/O error; the temp file is then removed.
    pub fn commit_new(self, path: &Path) -> io::Result<()> {
        self.finish(path, false)
    }

    fn finish(self, path: &Path, replace: bool) -> io::Result<()> {
        self.temp.as_file().sync_all()?;
        let persisted = match replace {
            true => self.temp.persist(path).map(drop),
            false => self.temp.persist_noclobber(path).map(drop),
        };
        persisted.map_err(|e| match e.error.kind() {
            io::ErrorKind::AlreadyExists => already_exists(path),
            _ => e.error,
        })?;
        sync_dir(folder_of(path))
    }
}

/// Writes `bytes` to `path` durably (see the module documentation), replacing its old
/// content; the file gets `mode` (0o600 for anything that holds a token or its secret).
///
/// # Errors
/// The I/O error.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    create(path, mode, |file| io::Write::write_all(file, bytes))
}

/// Creates the file `path` with what `fill` writes into it, durably, replacing its old
/// content: `path` holds either its old content or all of the new, even after a crash.
/// When `fill` fails, nothing changes and the temp file is removed.
///
/// # Errors
/// What `fill` returns, or the I/O error.
pub fn create<T, E: From<io::Error>>(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<T, E>,
) -> Result<T, E> {
    let mut pending = Pending::beside(path, mode)?;
    let value = fill(pending.file())?;
    pending.commit(path)?;
    Ok(value)
}

/// As [`create`], for a file that must not exist yet (an output a person named): refused
/// before `fill` runs when `path` exists, and never replaced if it appears meanwhile.
///
/// # Errors
/// [`io::ErrorKind::AlreadyExists`] naming the path, what `fill` returns, or the I/O
/// error.
pub fn create_new<T, E: From<io::Error>>(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<T, E>,
) -> Result<T, E> {
    if path.symlink_metadata().is_ok() {
        return Err(already_exists(path).into());
    }
    let mut pending = Pending::beside(path, mode)?;
    let value = fill(pending.file())?;
    pending.commit_new(path)?;
    Ok(value)
}

/// Makes a rename, a creation or a removal in `dir` durable.
///
/// # Errors
/// The I/O error.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents so that they survive a crash (each new folder's
/// parent is fsynced); a folder already there costs one `stat`.
///
/// # Errors
/// The I/O error.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(folder_of(dir))
}

/// Creates `dir` as [`create_dir_all`] does and gives it `mode` (also when it existed):
/// the daemon's folders get the same access whatever the umask and whatever an older
/// version left.
///
/// # Errors
/// The I/O error.
pub fn folder_with_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Removes a folder and everything in it; a folder already gone is fine (a step that
/// removes one is repeated after a crash).
///
/// # Errors
/// The I/O error.
pub fn remove_dir_all(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The folder holding `path` (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn already_exists(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{} exists already; give a new name, or move the old file away",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The names in `dir`, for tests that check nothing but the expected files is left.
    fn names(dir: &Path) -> Vec<PathBuf> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| PathBuf::from(e.expect("entry").file_name()))
            .collect();
        names.sort();
        names
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn writes_replace_keep_the_mode_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("token");
        write(&path, b"one", 0o600).expect("write");
        write(&path, b"two", 0o600).expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(names(&dir.path().join("sub")), [PathBuf::from("token")]);
        remove_dir_all(&dir.path().join("sub")).expect("remove");
        remove_dir_all(&dir.path().join("sub")).expect("remove twice");
    }

    #[test]
    fn a_failed_fill_changes_nothing_and_removes_its_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slip.pdf");
        write(&path, b"old", 0o600).expect("write");
        let failed = create(&path, 0o600, |file| {
            io::Write::write_all(file, b"half")?;
            Err::<(), _>(io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert_eq!(names(dir.path()), [PathBuf::from("slip.pdf")]);
    }

    #[test]
    fn create_new_refuses_an_existing_file_or_link_before_filling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let link = dir.path().join("out.zip");
        std::os::unix::fs::symlink(&victim, &link).expect("link");
        let mut filled = false;
        let err = create_new(&link, 0o600, |_| {
            filled = true;
            Ok::<(), io::Error>(())
        })
        .expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("out.zip exists already"), "{err}");
        assert!(!filled);
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
        let fresh = dir.path().join("fresh.zip");
        create_new(&fresh, 0o600, |f| io::Write::write_all(f, b"zip")).expect("new");
        assert_eq!(mode(&fresh), 0o600);
        assert_eq!(names(dir.path()).len(), 3);
    }

    #[test]
    fn commit_new_never_replaces_a_file_that_appeared_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token.txt");
        let mut pending = Pending::beside(&path, 0o600).expect("pending");
        io::Write::write_all(pending.file(), b"new").expect("fill");
        std::fs::write(&path, b"theirs").expect("race");
        let err = pending.commit_new(&path).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"theirs");
        assert_eq!(names(dir.path()), [PathBuf::from("token.txt")]);
    }

    #[test]
    fn temp_files_are_created_exclusively_with_the_mode_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pending = Pending::in_dir(dir.path(), 0o600).expect("pending");
        let name = pending.path().file_name().expect("name").to_string_lossy();
        assert!(name.starts_with('.') && name.ends_with(".tmp"), "{name}");
        assert_eq!(mode(pending.path()), 0o600);
        let path = pending.path().to_owned();
        drop(pending);
        assert!(!path.exists());
        let nested = dir.path().join("a/b/c");
        create_dir_all(&nested).expect("create");
        create_dir_all(&nested).expect("again");
        assert!(nested.is_dir());
    }
}
