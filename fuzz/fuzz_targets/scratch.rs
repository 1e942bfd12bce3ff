//! A scratch folder per fuzzing process for the targets that need files, on tmpfs when
//! there is one (every execution writes its input there).

use std::path::PathBuf;

/// A fresh folder `<tmpfs or temp>/cloudpdi-fuzz-<pid>/<name>` (emptied on first use in
/// this process); scripts/fuzz.sh removes `cloudpdi-fuzz-*` after a run.
pub fn scratch(name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base
        .join(format!("cloudpdi-fuzz-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}
