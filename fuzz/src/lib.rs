//! Helpers shared by the fuzz targets in `fuzz_targets/`.

pub mod json;

/// The stack of a tokio worker thread (tokio's default `thread_stack_size`), where the
/// gateway and the HTTP layer run request handling, fingerprints included.
pub const WORKER_STACK: usize = 2 * 1024 * 1024;

/// Runs `f` on a fresh thread with a tokio worker's 2 MiB stack and returns its result.
///
/// A stack overflow there kills the process (as it kills the gateway), which libFuzzer
/// reports as a crash with the input that caused it: see [`stack_overflow_aborts`].
pub fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    stack_overflow_aborts();
    let thread = std::thread::Builder::new()
        .name("worker-sized".into())
        .stack_size(WORKER_STACK)
        .spawn(move || {
            let _alt = AltStack::install();
            f()
        })
        .expect("spawn a worker-sized thread");
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Makes a stack overflow on a thread of [`on_worker_stack`] an `abort()`, which
/// libFuzzer catches (`-handle_abrt=1`, its default) and reports with the input.
///
/// Why this is needed: under libFuzzer the process's `main` is libFuzzer's, so Rust's
/// runtime never installs its own guard-page handler ("thread has overflowed its stack",
/// then abort), and libFuzzer's SIGSEGV handler runs without an alternate signal stack.
/// A thread that overflows its stack then cannot run any handler at all: the kernel
/// kills the process with SIGSEGV, libFuzzer never learns which input did it, and no
/// crash file is written. So: a SIGSEGV handler that runs on an alternate stack
/// (`SA_ONSTACK`, with a `sigaltstack` per thread from [`AltStack`]).
///
/// The handler does not abort on the overflowing thread: the overflow can hit inside
/// `malloc` with that thread's arena locked, and libFuzzer's crash report allocates, so
/// it would wait for that lock forever (seen: a hung smoke run). It sends SIGABRT to the
/// main thread instead, which waits in `join` with its own arena free, makes the report
/// and exits; the overflowing thread sleeps until then.
pub fn stack_overflow_aborts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain `sigaction` call with a handler that only writes to stderr and
        // aborts (both async-signal-safe).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_segv as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_segv(_signal: libc::c_int, _info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    const MESSAGE: &[u8] = b"\n==oncely-fuzz== SIGSEGV (a thread overflowed its stack, or a bad access): aborting\n";
    // SAFETY: write(2), getpid(2), gettid(2), tgkill(2), pause(2) and abort(3) are all
    // async-signal-safe.
    unsafe {
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        let pid = libc::getpid();
        if libc::gettid() == pid {
            libc::abort();
        }
        libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGABRT);
        loop {
            libc::pause();
        }
    }
}

/// An alternate signal stack for the current thread, removed when dropped.
struct AltStack {
    memory: Vec<u8>,
}

impl AltStack {
    /// Room for the handler above and for libFuzzer's SIGABRT handler, which runs on the
    /// same stack when the abort is raised from it (it writes the crash file).
    const SIZE: usize = 256 * 1024;

    fn install() -> AltStack {
        let mut memory = vec![0u8; Self::SIZE];
        let stack = libc::stack_t { ss_sp: memory.as_mut_ptr().cast(), ss_flags: 0, ss_size: Self::SIZE };
        // SAFETY: the memory lives as long as `self`, which disables the stack before
        // freeing it.
        unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) };
        AltStack { memory }
    }
}

impl Drop for AltStack {
    fn drop(&mut self) {
        let disable = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
        // SAFETY: disabling this thread's alternate stack before its memory is freed.
        unsafe { libc::sigaltstack(&disable, std::ptr::null_mut()) };
        let _ = self.memory.len();
    }
}
