//! Proxy workers: one thread per core, each running its own single-threaded Tokio
//! runtime, on which client connections are served to completion.
//!
//! Why: on a multi-threaded runtime a proxied request is handed between threads several
//! times (the client connection's task, the keyed operation's task, the upstream
//! connection's task), and on a small machine each hand-off to another thread is a
//! wake-up through the kernel. The profiles in `docs/benchmarks.md` (issue 13) put
//! 28% of the gateway's CPU in waking and switching threads. With a worker per core, a
//! connection and everything it spawns (the upstream connections of its worker's pool,
//! keyed operations that outlive their client) stay on one thread, as in nginx's worker
//! processes; only the accept crosses threads, once per connection.
//!
//! The accept loop (on the main runtime) hands each connection to the next worker in
//! turn. Invariants:
//! - a worker's runtime lives until [`Workers::stop`], which the server calls only after
//!   the running operations have been drained: a task spawned on a worker (an operation
//!   whose client hung up) is never dropped by an early shutdown of its runtime;
//! - [`current`] is the worker's number on a worker's thread and `None` elsewhere; the
//!   proxy uses it to give each worker its own upstream connection pool.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The number of the worker running on this thread, `None` off the workers' threads.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The default number of workers: one per core the process may use.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Worker threads, each with a single-threaded runtime; see the [module](self).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
    exit: CancellationToken,
}

impl Workers {
    /// Starts `count` workers (at least one), named `oncely-worker-N`.
    ///
    /// # Errors
    /// The operating system refused a thread, or a runtime could not be built.
    pub fn start(count: usize) -> io::Result<Self> {
        let exit = CancellationToken::new();
        let mut workers = Self { handles: Vec::new(), threads: Vec::new(), next: AtomicUsize::new(0), exit };
        for n in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let exit = workers.exit.clone();
            let thread = std::thread::Builder::new().name(format!("oncely-worker-{n}")).spawn(move || {
                CURRENT.with(|c| c.set(Some(n)));
                runtime.block_on(exit.cancelled());
                // Not a plain drop, which would wait for blocking tasks without a bound.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
            workers.handles.push(handle);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Runs `task` on the next worker in turn.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        drop(self.handles[n].spawn(task));
    }

    /// Stops the workers' runtimes (dropping whatever still runs on them) and waits for
    /// their threads.
    pub fn stop(mut self) {
        self.exit.cancel();
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}

/// Dropped without [`Workers::stop`] (an error while starting), the workers still end.
impl Drop for Workers {
    fn drop(&mut self) {
        self.exit.cancel();
    }
}
