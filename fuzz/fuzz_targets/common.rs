//! Helpers shared by the targets that need files: a scratch folder per fuzzing process,
//! on tmpfs when there is one (every execution writes its input there).

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

/// Stack size of tokio's blocking threads (its default, which `serve` keeps): where the
/// daemon runs these parsers, so a recursion that would overflow there crashes here too.
const BLOCKING_STACK: usize = 2 << 20;

/// Runs `work` on a thread with the stack of a tokio blocking thread; a panic in it
/// panics here.
pub fn on_blocking_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .stack_size(BLOCKING_STACK)
            .spawn_scoped(scope, work)
            .expect("thread starts");
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
