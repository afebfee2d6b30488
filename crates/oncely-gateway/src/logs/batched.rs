//! Log lines batched per thread and written by one thread of their own
//! ([`BatchedLines`]).
//!
//! tracing-appender's non-blocking writer sends every line through a channel: a `Vec`
//! allocated and copied per line, freed on the writer thread, and a wake-up of that
//! thread whenever it had emptied the channel, which at one access line per request is
//! most lines. Here a line is appended to its thread's own buffer (a mutex nobody else
//! takes except the flusher, every [`FLUSH_EVERY`]), and the flusher writes each
//! buffer whole.
//!
//! Guarantees, and where they are kept:
//! - **Whole lines, in each thread's order.** A line is one `write` of the formatter,
//!   appended whole; every write to the output holds the output's lock across taking a
//!   buffer and writing it (`sweep`, `append`'s overflow), so one thread's batches
//!   reach the output in the order they were filled. Lines of different threads are
//!   interleaved by batch, not by time: their timestamps order them.
//! - **Nothing dropped while the process runs, memory bounded.** A thread whose buffer
//!   reaches [`OVERFLOW_AT`] writes it out itself and waits for the output, as a request
//!   waited on a full channel before.
//! - **Seen within [`FLUSH_EVERY`]**, and flushed at exit by the [`FlushGuard`] (waiting
//!   up to a second for a stuck output). A process killed (SIGKILL, out of memory) loses
//!   what its threads buffered since the last sweep.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How often the flusher writes what the threads buffered.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// A thread's buffer size at which it writes the buffer itself (about a second of one
/// worker's access lines at 20k requests/s is 4 MiB: the flusher normally gets there
/// first).
pub const OVERFLOW_AT: usize = 1 << 20;

type Buffer = Arc<Mutex<Vec<u8>>>;

struct Shared {
    /// Every thread's buffer; a thread registers on its first line.
    buffers: Mutex<Vec<Buffer>>,
    out: Mutex<Box<dyn Write + Send>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain bytes behind: still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// This thread's buffer in each live [`BatchedLines`] (normally one). The `Weak`
    /// keeps the `Shared` allocation, so no later instance can share its address.
    static MINE: RefCell<Vec<(Weak<Shared>, Buffer)>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    /// Writes every buffer, holding the output throughout.
    fn sweep(&self) {
        let mut out = lock(&self.out);
        let mut buffers = lock(&self.buffers);
        for buffer in buffers.iter() {
            let batch = std::mem::take(&mut *lock(buffer));
            if !batch.is_empty() {
                // Nowhere to report a failing stderr; the lines are lost, as with any
                // logger.
                let _ = out.write_all(&batch);
            }
        }
        let _ = out.flush();
        // Buffers of threads that have ended (only this list holds them), now empty.
        buffers.retain(|buffer| Arc::strong_count(buffer) > 1);
    }

    fn append(self: &Arc<Self>, line: &[u8]) {
        let buffer = MINE.with_borrow_mut(|mine| {
            mine.retain(|(shared, _)| shared.strong_count() > 0);
            if let Some((_, buffer)) = mine.iter().find(|(shared, _)| std::ptr::eq(shared.as_ptr(), Arc::as_ptr(self)))
            {
                return Arc::clone(buffer);
            }
            let buffer = Buffer::default();
            lock(&self.buffers).push(Arc::clone(&buffer));
            mine.push((Arc::downgrade(self), Arc::clone(&buffer)));
            buffer
        });
        let mut pending = lock(&buffer);
        pending.extend_from_slice(line);
        if pending.len() < OVERFLOW_AT {
            return;
        }
        // The output's lock first, as `sweep` takes it: a batch the flusher took
        // earlier is written before this one.
        drop(pending);
        let mut out = lock(&self.out);
        let batch = std::mem::take(&mut *lock(&buffer));
        let _ = out.write_all(&batch);
    }
}

/// A [`MakeWriter`] that batches lines per thread (see the [module](self)).
///
/// ```
/// use std::time::Duration;
/// use oncely_gateway::logs::batched::BatchedLines;
///
/// let (lines, guard) = BatchedLines::new(std::io::sink(), Duration::from_millis(100));
/// let logs = tracing_subscriber::fmt().with_writer(lines).finish();
/// tracing::subscriber::with_default(logs, || tracing::info!("buffered, then written"));
/// drop(guard); // writes what is left
/// ```
#[derive(Clone)]
pub struct BatchedLines {
    shared: Arc<Shared>,
}

impl BatchedLines {
    /// Lines for `out`, written every `every` by a thread named `oncely-log`, and at the
    /// latest when the returned guard is dropped.
    pub fn new(out: impl Write + Send + 'static, every: Duration) -> (Self, FlushGuard) {
        let shared = Arc::new(Shared {
            buffers: Mutex::default(),
            out: Mutex::new(Box::new(out)),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let flusher = Arc::clone(&shared);
        let (done, finished) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("oncely-log".into()).spawn(move || {
            loop {
                let stop = lock(&flusher.stop);
                let (stop, _) = flusher.wake.wait_timeout(stop, every).unwrap_or_else(PoisonError::into_inner);
                let stopping = *stop;
                drop(stop);
                flusher.sweep();
                if stopping {
                    let _ = done.send(());
                    return;
                }
            }
        });
        let guard = FlushGuard { shared: Arc::clone(&shared), thread: thread.ok(), finished };
        (Self { shared }, guard)
    }
}

impl<'a> MakeWriter<'a> for BatchedLines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { shared: &self.shared }
    }
}

/// One formatted line on its way into its thread's buffer.
pub struct LineWriter<'a> {
    shared: &'a Arc<Shared>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.shared.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Stops the flusher when dropped, after it wrote everything buffered (waiting up to a
/// second: a stuck output cannot hold the process's exit).
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    finished: std::sync::mpsc::Receiver<()>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            // No flusher thread could be started: write what is buffered here.
            self.shared.sweep();
            return;
        };
        *lock(&self.shared.stop) = true;
        self.shared.wake.notify_one();
        if self.finished.recv_timeout(Duration::from_secs(1)).is_ok() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Output(Arc<Mutex<Vec<u8>>>);

    impl Write for Output {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Output {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).expect("utf-8")
        }
    }

    /// Every line of many threads arrives whole, each thread's in its order, including
    /// a thread that overflows its buffer many times over.
    #[test]
    fn lines_of_many_threads_arrive_whole_and_in_each_threads_order() {
        let output = Output::default();
        let (lines, guard) = BatchedLines::new(output.clone(), Duration::from_millis(5));
        let per_thread = [2_000, 2_000, 2_000, 40_000];
        std::thread::scope(|scope| {
            for (thread, &count) in per_thread.iter().enumerate() {
                let lines = &lines;
                scope.spawn(move || {
                    for n in 0..count {
                        // Lines of about 100 bytes: the last thread writes ~4 MiB.
                        let line = format!("t{thread} n{n} {}\n", "x".repeat(80));
                        lines.make_writer().write_all(line.as_bytes()).expect("append");
                    }
                });
            }
        });
        drop(guard);
        let text = output.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut fields = line.split(' ');
            let thread: usize = fields.next().and_then(|t| t.strip_prefix('t')?.parse().ok()).expect("thread");
            let n: usize = fields.next().and_then(|n| n.strip_prefix('n')?.parse().ok()).expect("number");
            assert_eq!(fields.next().map(str::len), Some(80), "a whole line: {line}");
            assert_eq!(n, next[thread], "thread {thread}'s lines in order");
            next[thread] += 1;
        }
        assert_eq!(next, per_thread, "every line arrived");
    }

    #[test]
    fn a_line_is_written_within_the_interval_without_waiting_for_exit() {
        let output = Output::default();
        let (lines, _guard) = BatchedLines::new(output.clone(), Duration::from_millis(10));
        lines.make_writer().write_all(b"soon\n").expect("append");
        // Polls the output for the flusher's sweep (no signal exists for it).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while output.text().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(output.text(), "soon\n");
    }
}
