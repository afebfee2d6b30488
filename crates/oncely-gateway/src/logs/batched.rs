//! Log lines buffered in memory and written by a thread of their own ([`BatchedLines`]).
//!
//! tracing-appender's non-blocking writer sends every line through a channel: a `Vec`
//! allocated and copied per line, freed on the writer thread, and a wake-up of that
//! thread whenever it had emptied the channel, which at one access line per request is
//! most lines. Here a line is appended to one buffer (a short critical section: a copy
//! of the line), and the flusher writes the buffer whole every [`FLUSH_EVERY`].
//!
//! Guarantees, and where they are kept:
//! - **Whole lines, in the order they were logged.** A line is one `write` of the
//!   formatter, appended whole under the buffer's lock; every write to the output holds
//!   the output's lock across taking the buffer and writing it (`Shared::sweep`).
//! - **Nothing dropped while the process runs, memory bounded.** A thread that fills the
//!   buffer to [`OVERFLOW_AT`] writes it out itself and waits for the output, as a
//!   request waited on a full channel before.
//! - **Seen within [`FLUSH_EVERY`]**, and flushed at exit by the [`FlushGuard`] (waiting
//!   up to a second for a stuck output); a line logged after that last sweep is written
//!   by its own thread. A process killed (SIGKILL, out of memory) loses what was
//!   buffered since the last sweep.
//! - **The output must not log** through this writer: the flusher holds the output's
//!   lock while it writes (stderr never logs).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How often the flusher writes what was buffered.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The buffer size at which the thread that fills it writes it itself (about a second
/// of access lines at 20k requests/s is 4 MiB: the flusher normally gets there first).
pub const OVERFLOW_AT: usize = 1 << 20;

struct Shared {
    /// Lines not yet written, in the order they were logged.
    pending: Mutex<Vec<u8>>,
    out: Mutex<Output>,
    /// Set (under `sleep`) before the last sweep: from then on a thread writes its own
    /// lines.
    stopped: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// Where lines go, and the buffer last written there, kept empty with its capacity and
/// swapped in for `pending` at the next sweep: appends do not regrow a buffer from
/// nothing after every sweep (a reallocation and copy of up to [`OVERFLOW_AT`] bytes
/// under the lock every request's line takes). The two buffers hold at most about
/// twice [`OVERFLOW_AT`].
struct Output {
    to: Box<dyn Write + Send>,
    spare: Vec<u8>,
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain bytes behind: still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Writes what is pending. The output's lock is taken first and held across taking
    /// the batch and writing it, here and in `append`: batches reach the output in the
    /// order they were taken, so lines keep the order they were logged in.
    fn sweep(&self) {
        let mut out = lock(&self.out);
        let Output { to, spare } = &mut *out;
        std::mem::swap(&mut *lock(&self.pending), spare);
        if !spare.is_empty() {
            // Nowhere to report a failing stderr; the lines are lost, as with any logger.
            let _ = to.write_all(spare);
            spare.clear();
        }
        let _ = to.flush();
    }

    fn append(&self, line: &[u8]) {
        let mut pending = lock(&self.pending);
        pending.extend_from_slice(line);
        // After the append: a line appended before `stopped` was set is the last
        // sweep's (it takes the buffer after setting it), one appended after is seen
        // here and written by this thread.
        if pending.len() < OVERFLOW_AT && !self.stopped.load(Ordering::SeqCst) {
            return;
        }
        drop(pending);
        self.sweep();
    }

    /// Marks the writer stopped and wakes the flusher for its last sweep. Under the
    /// flusher's sleep lock, so that the wake cannot fall between its check of the flag
    /// and its wait.
    fn stop(&self) {
        let _sleep = lock(&self.sleep);
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// A [`MakeWriter`] that buffers lines for a thread of its own (see the [module](self)).
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
            pending: Mutex::default(),
            out: Mutex::new(Output { to: Box::new(out), spare: Vec::new() }),
            stopped: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let flusher = Arc::clone(&shared);
        let (done, finished) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("oncely-log".into()).spawn(move || {
            loop {
                let sleep = lock(&flusher.sleep);
                // Checks the flag before sleeping: a stop signalled during a sweep is
                // not missed.
                let stopped = || flusher.stopped.load(Ordering::SeqCst);
                drop(flusher.wake.wait_timeout_while(sleep, every, |_| !stopped()));
                let stopping = stopped();
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

/// One formatted line on its way into the buffer.
pub struct LineWriter<'a> {
    shared: &'a Shared,
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
        self.shared.stop();
        let Some(thread) = self.thread.take() else {
            // No flusher thread could be started: write what is buffered here.
            self.shared.sweep();
            return;
        };
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

    /// Every line of many threads arrives whole, each thread's in its order, while one
    /// thread overflows the buffer many times over.
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

    /// Lines that two threads log one after the other (each waits for the other's)
    /// come out in that order, whichever thread logged them.
    #[test]
    fn lines_of_different_threads_keep_the_order_they_were_logged_in() {
        let output = Output::default();
        let (lines, guard) = BatchedLines::new(output.clone(), Duration::from_millis(1));
        let (to_b, from_a) = std::sync::mpsc::channel::<usize>();
        let (to_a, from_b) = std::sync::mpsc::channel::<usize>();
        std::thread::scope(|scope| {
            let lines = &lines;
            scope.spawn(move || {
                for n in (0..200).step_by(2) {
                    lines.make_writer().write_all(format!("{n}\n").as_bytes()).expect("append");
                    to_b.send(n + 1).expect("b waits");
                    from_b.recv().expect("b answered");
                }
            });
            scope.spawn(move || {
                while let Ok(n) = from_a.recv() {
                    lines.make_writer().write_all(format!("{n}\n").as_bytes()).expect("append");
                    to_a.send(n).expect("a waits");
                }
            });
        });
        drop(guard);
        let logged: Vec<usize> = output.text().lines().map(|n| n.parse().expect("a number")).collect();
        assert_eq!(logged, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn a_line_logged_after_the_last_sweep_is_written_by_its_thread() {
        let output = Output::default();
        let (lines, guard) = BatchedLines::new(output.clone(), Duration::from_secs(3600));
        lines.make_writer().write_all(b"before\n").expect("append");
        drop(guard);
        lines.make_writer().write_all(b"after\n").expect("append");
        assert_eq!(output.text(), "before\nafter\n");
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
