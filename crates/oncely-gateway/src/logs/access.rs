//! The gateway's access lines ([`AccessLines`]): one per request, keyed ([`Access`],
//! handed over by the idempotency layer) or not ([`Passed`]).
//!
//! With the plain format and no colours (the binary's default when stderr is not a
//! terminal) a line is formatted here, straight into a buffer of the request's thread,
//! and appended whole to the [`BatchedLines`] the subscriber writes to: the bytes that
//! `tracing` with [`PlainLine`](super::plain::PlainLine) would write, without the event's
//! dispatch, its field visitor, or a `dyn fmt::Write` call per piece. Counted with
//! callgrind (`bench/instructions.sh`, `LOG_LEVEL=info` against `warn`), that path cost a
//! replay about 4,400 instructions, this one about a third of it (`docs/benchmarks.md`).
//!
//! Otherwise (JSON, colours, a process whose subscriber is not the gateway's) a line is
//! the `tracing` event it always was, target `oncely::access`. Either way the subscriber's
//! filter decides whether it is written: [`AccessLines::enabled`] asks it.
//!
//! `tests::direct_lines_are_the_events_lines` checks byte for byte that both paths write
//! the same line, for keyed and pass-through requests, paths that need escaping and keys
//! that were never derived.

use std::cell::Cell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use oncely_http::{Access, AccessLog, TracingAccessLog};
use tracing_subscriber::fmt::MakeWriter;

use super::batched::BatchedLines;
use super::plain::needs_no_escaping;
use super::{CachedRfc3339, wall_time_of};

/// Where direct lines go, and whether the subscriber wants them: set once, by
/// [`write_directly_to`].
static DIRECT: OnceLock<Direct> = OnceLock::new();

struct Direct {
    lines: BatchedLines,
    /// The subscriber's answer for access lines, asked once: the gateway's filter is
    /// built at start and never reloaded, and its lines are never inside a span.
    enabled: bool,
}

/// Sends access lines straight to `lines` from now on (see the [module](self)), when the
/// process's global subscriber writes plain lines without colours to `lines`:
/// [`dispatch`](super::dispatch)`(LogFormat::Plain, level, lines, false)`, set as the
/// global default before this call (its filter is asked here, once, whether it wants
/// access lines). A second call changes nothing.
///
/// ```
/// use std::time::Duration;
/// use oncely_gateway::logs::{LogFormat, access, batched::BatchedLines, dispatch};
/// use tracing_subscriber::util::SubscriberInitExt;
///
/// let (lines, _flush_at_exit) = BatchedLines::new(std::io::sink(), Duration::from_millis(100));
/// if dispatch(LogFormat::Plain, "info", lines.clone(), false).try_init().is_ok() {
///     access::write_directly_to(lines);
/// }
/// ```
pub fn write_directly_to(lines: BatchedLines) {
    let enabled = TracingAccessLog.enabled();
    let _ = DIRECT.set(Direct { lines, enabled });
}

/// The gateway's access log (see the [module](self)): the idempotency layer's
/// [`AccessLog`] for keyed requests, and the line of every other request.
///
/// ```
/// use oncely::{MemoryStore, Oncely};
/// use oncely_gateway::logs::access::AccessLines;
/// use oncely_http::IdempotencyLayer;
///
/// let layer = IdempotencyLayer::new(Oncely::new(MemoryStore::new())).access_log(AccessLines);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLines;

/// The access line of a request the idempotency layer did not log: passed through, or
/// answered by the gateway before any route.
#[derive(Debug, Clone, Copy)]
pub struct Passed<'a> {
    /// The request's method.
    pub method: &'a Method,
    /// The request's path, without its query.
    pub path: &'a str,
    /// The status answered.
    pub status: StatusCode,
    /// Whether the answer carried `Idempotent-Replayed` (an upstream's own replay).
    pub replayed: bool,
    /// From the request's arrival to its answer.
    pub elapsed: Duration,
    /// When the answer was ready: the line's timestamp.
    pub finished: Instant,
}

impl AccessLines {
    /// Whether access lines are written: the subscriber's filter wants `INFO` events with
    /// target `oncely::access`. Asked before a request, so a log that is off costs no
    /// clock read and no copy of the path.
    pub fn enabled(&self) -> bool {
        match DIRECT.get() {
            Some(direct) => direct.enabled,
            None => TracingAccessLog.enabled(),
        }
    }

    /// Writes the line of a request the idempotency layer did not log.
    pub fn passed(&self, passed: &Passed<'_>) {
        if let Some(direct) = DIRECT.get() {
            // As the event would be: filtered out when the subscriber does not want it.
            if direct.enabled {
                write_line(&direct.lines, passed.finished, |line| passed_fields(line, passed));
            }
            return;
        }
        let method = passed.method;
        tracing::info!(
            target: "oncely::access",
            %method,
            path = passed.path,
            status = passed.status.as_u16(),
            replayed = passed.replayed,
            micros = passed.elapsed.as_micros() as u64,
        );
    }
}

impl AccessLog for AccessLines {
    fn enabled(&self) -> bool {
        AccessLines::enabled(self)
    }

    fn log(&self, access: &Access<'_>) {
        match DIRECT.get() {
            Some(direct) if direct.enabled => {
                write_line(&direct.lines, access.finished, |line| keyed_fields(line, access));
            }
            Some(_) => {}
            None => TracingAccessLog.log(access),
        }
    }
}

thread_local! {
    /// The line buffer of this thread, kept with its capacity between lines.
    static LINE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Formats a line (timestamp, level, target, then `fields`) in this thread's buffer and
/// appends it whole to `lines`. Bytes, not a `String`: nothing here is validated as
/// UTF-8 again (the path is a `&str` already, the rest ASCII). The timestamp is the wall
/// time of `at` ([`wall_time_of`]): no clock is read for it.
fn write_line(lines: &BatchedLines, at: Instant, fields: impl FnOnce(&mut Vec<u8>)) {
    // Taken out while in use (a thread being torn down has none: a fresh one).
    let mut line = LINE.try_with(Cell::take).unwrap_or_default();
    line.clear();
    CachedRfc3339::write_bytes(wall_time_of(at), &mut line);
    line.extend_from_slice(HEAD.as_bytes());
    fields(&mut line);
    line.push(b'\n');
    // A single write: the line is appended whole.
    let _ = lines.make_writer().write_all(&line);
    let _ = LINE.try_with(|buffer| buffer.set(line));
}

/// What `PlainLine` writes between the timestamp and the fields of an `INFO` event with
/// target `oncely::access`.
const HEAD: &str = "  INFO oncely::access: ";

/// `method=… path=… key=… outcome=… status=… micros=…`, as `TracingAccessLog`'s event
/// through `PlainFields`.
fn keyed_fields(line: &mut Vec<u8>, access: &Access<'_>) {
    method_and_path(line, access.method, access.path);
    line.extend_from_slice(b" key=");
    if let Some(key) = access.key {
        let mut hex = [0u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(key.as_bytes()) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(*byte)]);
        }
        line.extend_from_slice(&hex);
    }
    line.extend_from_slice(b" outcome=");
    quoted(line, access.outcome);
    line.extend_from_slice(b" status=");
    line.extend_from_slice(itoa::Buffer::new().format(access.status.map_or(0, |status| status.as_u16())).as_bytes());
    micros(line, access.elapsed);
}

/// Each byte's two lowercase hex digits: a look-up a byte, where `hex::encode_to_slice`
/// looks each half up apart (measured: a third of a direct line went to the key's 64
/// digits).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [DIGITS[byte >> 4], DIGITS[byte & 0xf]];
        byte += 1;
    }
    pairs
};

/// `method=… path=… status=… replayed=… micros=…`, as [`AccessLines::passed`]'s event
/// through `PlainFields`.
fn passed_fields(line: &mut Vec<u8>, passed: &Passed<'_>) {
    method_and_path(line, passed.method, passed.path);
    line.extend_from_slice(b" status=");
    line.extend_from_slice(itoa::Buffer::new().format(passed.status.as_u16()).as_bytes());
    line.extend_from_slice(if passed.replayed { b" replayed=true" } else { b" replayed=false" });
    micros(line, passed.elapsed);
}

fn method_and_path(line: &mut Vec<u8>, method: &Method, path: &str) {
    // `%method`: its token, which has nothing to escape.
    line.extend_from_slice(b"method=");
    line.extend_from_slice(method.as_str().as_bytes());
    line.extend_from_slice(b" path=");
    quoted(line, path);
}

/// A string field as `PlainFields` writes it: in double quotes, escaped as `{:?}` escapes
/// it when it needs that.
fn quoted(line: &mut Vec<u8>, text: &str) {
    if needs_no_escaping(text) {
        line.push(b'"');
        line.extend_from_slice(text.as_bytes());
        line.push(b'"');
    } else {
        // Writing to a `Vec` cannot fail.
        let _ = write!(line, "{text:?}");
    }
}

fn micros(line: &mut Vec<u8>, elapsed: Duration) {
    line.extend_from_slice(b" micros=");
    line.extend_from_slice(itoa::Buffer::new().format(elapsed.as_micros() as u64).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Lines;
    use crate::logs::plain::{PlainFields, PlainLine};
    use oncely::StorageKey;
    use std::fmt;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;

    /// A fixed timestamp, so that the two paths' lines can be compared.
    #[derive(Clone, Copy)]
    struct Fixed;
    const STAMP: &str = "2026-12-03T17:00:00.000001Z";
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str(STAMP)
        }
    }

    /// What the gateway's subscriber writes for what `emit` logs, with [`Fixed`]'s time.
    fn through_tracing(emit: impl FnOnce()) -> String {
        let lines = Lines::default();
        let sink = lines.clone();
        let logs = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .fmt_fields(PlainFields)
            .event_format(PlainLine::with_timer(Fixed))
            .finish();
        tracing::subscriber::with_default(logs, emit);
        lines.text()
    }

    /// The direct line of `fields`, with [`Fixed`]'s time.
    fn direct(fields: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut line = format!("{STAMP}{HEAD}").into_bytes();
        fields(&mut line);
        line.push(b'\n');
        String::from_utf8(line).expect("UTF-8")
    }

    #[test]
    fn direct_lines_are_the_events_lines() {
        // Every byte value in its place: a key whose digits are in order.
        let key = StorageKey::from_bytes(std::array::from_fn(|i| (i * 8 + 3) as u8));
        let extension = Method::from_bytes(b"PURGE").expect("a method");
        let paths = ["/payments", "/a \"quoted\" \\ path\n\u{1b}[31m", "/caf\u{e9}", ""];
        let mut checked = 0;
        for path in paths {
            for (method, key, outcome, status) in [
                (&Method::POST, Some(&key), "replayed", Some(StatusCode::CREATED)),
                (&Method::PATCH, None, "refused", Some(StatusCode::TOO_MANY_REQUESTS)),
                (&extension, Some(&key), "unknown", None),
            ] {
                let mut access = Access::new(method, path, outcome);
                access.key = key;
                access.status = status;
                access.elapsed = Duration::from_micros(1234);
                let line = direct(|line| keyed_fields(line, &access));
                assert_eq!(line, through_tracing(|| TracingAccessLog.log(&access)));
                checked += 1;
            }
            for (replayed, status) in [(false, StatusCode::OK), (true, StatusCode::BAD_GATEWAY)] {
                let elapsed = Duration::from_micros(98_765);
                let passed = Passed { method: &Method::GET, path, status, replayed, elapsed, finished: Instant::now() };
                let line = direct(|line| passed_fields(line, &passed));
                // Not yet direct in this process: the event.
                assert!(DIRECT.get().is_none());
                assert_eq!(line, through_tracing(|| AccessLines.passed(&passed)));
                checked += 1;
            }
        }
        assert_eq!(checked, 20);
    }

    #[test]
    fn a_direct_line_is_appended_whole_with_a_timestamp() {
        let out = Lines::default();
        let (lines, guard) = BatchedLines::new(out.clone(), Duration::from_secs(60));
        let passed = Passed {
            method: &Method::DELETE,
            path: "/x",
            status: StatusCode::NO_CONTENT,
            replayed: false,
            elapsed: Duration::ZERO,
            finished: Instant::now(),
        };
        write_line(&lines, passed.finished, |line| passed_fields(line, &passed));
        drop(guard);
        let text = out.text();
        let (stamp, rest) = text.split_once(' ').expect("a timestamp");
        assert_eq!(stamp.len(), STAMP.len(), "{text}");
        assert_eq!(
            rest, " INFO oncely::access: method=DELETE path=\"/x\" status=204 replayed=false micros=0\n",
            "{text}"
        );
    }
}
