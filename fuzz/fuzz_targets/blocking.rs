//! Runs a parser where the daemon runs it: on a thread with the stack of a tokio
//! blocking thread.

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
