//! The gateway's logs: the subscriber ([`dispatch`]), its writer thread ([`init`]), and
//! the timestamp every line starts with ([`CachedRfc3339`]).
//!
//! At the default `info` level every request writes one access line (target
//! `oncely::access`), so what a line costs the request's thread is a cost of every
//! request. `cargo bench -p oncely-gateway --bench access_log` measures it through
//! [`dispatch`], the subscriber the binary installs; `docs/benchmarks.md` has the figures.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;

pub mod access;
pub mod batched;
pub mod plain;

use batched::{BatchedLines, FlushGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::util::SubscriberInitExt;

/// The log format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2026-12-02T11:25:12.123456Z  INFO oncely::access: method=POST path="/payments" …`
    Plain,
    /// One JSON object per line.
    Json,
}

/// The subscriber the binary installs: `level` as an `EnvFilter` directive (`info` when
/// it does not parse), lines in `format` with [`CachedRfc3339`] timestamps, written to
/// `writer`, with colours when `ansi`. Plain lines are written by [`plain`]: the bytes
/// of tracing-subscriber's default format, for less.
///
/// ```
/// use oncely_gateway::logs::{LogFormat, dispatch};
///
/// let logs = dispatch(LogFormat::Json, "info", std::io::sink, false);
/// tracing::dispatcher::with_default(&logs, || {
///     tracing::info!(target: "oncely::access", status = 201, "written to the sink");
/// });
/// ```
pub fn dispatch<W>(format: LogFormat, level: &str, writer: W, ansi: bool) -> tracing::Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi).with_timer(CachedRfc3339);
    match format {
        LogFormat::Plain => {
            builder.fmt_fields(plain::PlainFields).event_format(plain::PlainLine::default()).finish().into()
        }
        LogFormat::Json => builder.json().finish().into(),
    }
}

/// Logs to stderr through [`BatchedLines`]: a request appends its access line to a
/// buffer and goes on, and the `oncely-log` thread writes the buffer every
/// [`batched::FLUSH_EVERY`]. Measured in `docs/benchmarks.md`: a line written straight to
/// stderr cost 5 µs of CPU and 6–9% of throughput; through tracing-appender's channel,
/// about 2 µs per line in all, with a wake-up of its writer thread for most lines.
///
/// Keep the returned guard until the process ends: dropping it writes what is left,
/// waiting up to a second. A process killed (SIGKILL, out of memory, abort) loses the
/// lines buffered since the last write, at most [`batched::FLUSH_EVERY`] of them.
pub(crate) fn init(format: LogFormat, level: &str) -> FlushGuard {
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (lines, guard) = BatchedLines::new(std::io::stderr(), batched::FLUSH_EVERY);
    // Also routes the `log` records of dependencies (tokio-postgres, rustls…) here.
    let installed = dispatch(format, level, lines.clone(), colour).try_init().is_ok();
    if installed && format == LogFormat::Plain && !colour {
        // Access lines skip the event: the lines `PlainLine` would write (see `access`).
        access::write_directly_to(lines);
    }
    guard
}

/// How long a thread's anchor for [`wall_time_of`] is used before it is read again.
const ANCHOR_FOR: Duration = Duration::from_secs(1);

thread_local! {
    /// A monotonic instant and the wall time read with it, on this thread.
    static ANCHOR: Cell<Option<(Instant, SystemTime)>> = const { Cell::new(None) };
}

/// The wall time of `at`, a monotonic instant read moments ago, without reading the wall
/// clock: this thread's anchor (an instant and the wall time read with it, at most
/// [`ANCHOR_FOR`] before) moved by the distance from it. A clock read is 20–40 ns on
/// these machines, a good part of an access line (`docs/benchmarks.md`).
///
/// On Linux both clocks run at the same NTP-disciplined rate (`adjtime` slews
/// `CLOCK_MONOTONIC` too), so this is the wall time of `at` to the microsecond, except
/// for up to [`ANCHOR_FOR`] after the wall clock is stepped, or after the machine resumed
/// from a suspend (which `Instant` does not count), when lines carry the offset from
/// before.
pub(crate) fn wall_time_of(at: Instant) -> SystemTime {
    let from_anchor = |(instant, wall): (Instant, SystemTime)| match at.checked_duration_since(instant) {
        Some(ahead) => wall.checked_add(ahead),
        None => wall.checked_sub(instant.duration_since(at)),
    };
    ANCHOR
        .try_with(|anchor| {
            let current = anchor
                .get()
                .filter(|(instant, _)| at.checked_duration_since(*instant).is_some_and(|ahead| ahead < ANCHOR_FOR));
            let current = current.unwrap_or_else(|| {
                let fresh = (Instant::now(), SystemTime::now());
                anchor.set(Some(fresh));
                fresh
            });
            from_anchor(current)
        })
        .ok()
        .flatten()
        // A thread being torn down, or a time out of `SystemTime`'s range: the clock.
        .unwrap_or_else(SystemTime::now)
}

/// RFC 3339 timestamps in UTC with microseconds (`2026-12-02T11:25:12.123456Z`), the
/// format of tracing-subscriber's default timer, with the date and time of day formatted
/// once per second per thread: within a second a line's timestamp costs a clock read and
/// six digits.
///
/// ```
/// use tracing_subscriber::fmt::format::Writer;
/// use tracing_subscriber::fmt::time::FormatTime;
/// use oncely_gateway::logs::CachedRfc3339;
///
/// let mut line = String::new();
/// CachedRfc3339.format_time(&mut Writer::new(&mut line)).unwrap();
/// assert_eq!(line.len(), "2026-12-02T11:25:12.123456Z".len());
/// assert!(line.ends_with('Z') && line.as_bytes()[19] == b'.');
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CachedRfc3339;

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl CachedRfc3339 {
    fn write(now: SystemTime, w: &mut Writer<'_>) -> std::fmt::Result {
        Self::with_parts(now, |prefix, fraction| w.write_str(prefix).and_then(|()| w.write_str(fraction.as_str())))
            // Before 1970 or after 9999 (a clock set very wrong): tracing-subscriber's
            // own timer, uncached, which handles both.
            .unwrap_or_else(|| tracing_subscriber::fmt::time::SystemTime.format_time(w))
    }

    /// The timestamp of `now` appended to `line`, as [`FormatTime::format_time`] writes
    /// it (for lines written without a `Writer`: see [`access`]). Before 1970 or past
    /// 9999, as there, tracing-subscriber's timer writes the clock's own time.
    pub(crate) fn write_bytes(now: SystemTime, line: &mut Vec<u8>) {
        let cached = Self::with_parts(now, |prefix, fraction| {
            line.extend_from_slice(prefix.as_bytes());
            line.extend_from_slice(&fraction.0);
            Ok(())
        });
        if cached.is_none() {
            let mut text = String::new();
            // As `write`: tracing-subscriber's own timer; as `PlainLine`, a timer that
            // fails does not lose the line.
            if tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut text)).is_err() {
                text = "<unknown time>".to_owned();
            }
            line.extend_from_slice(text.as_bytes());
        }
    }

    /// `write(date and time of day, fraction)` with the cached `YYYY-MM-DDTHH:MM:SS` of
    /// `now`'s second and its `.MMMMMMZ`; `None` before 1970 or past 9999, or without
    /// this thread's cache.
    fn with_parts(
        now: SystemTime,
        write: impl FnOnce(&str, &Fraction) -> std::fmt::Result,
    ) -> Option<std::fmt::Result> {
        now.duration_since(UNIX_EPOCH).ok().and_then(|since| {
            let (second, micros) = (since.as_secs(), since.subsec_micros());
            // A thread being torn down, or a timer called from inside a write: uncached.
            let cache = SECOND.try_with(|cache| {
                let mut cache = cache.try_borrow_mut().ok()?;
                let (cached, prefix) = &mut *cache;
                if *cached != second {
                    // Not cached while the prefix is being written: a failed write
                    // leaves no second cached with an empty prefix.
                    *cached = u64::MAX;
                    prefix.clear();
                    // `YYYY-MM-DDTHH:MM:SSZ` without its `Z`; humantime refuses years
                    // past 9999.
                    write!(prefix, "{}", humantime::format_rfc3339_seconds(now)).ok()?;
                    prefix.pop();
                    *cached = second;
                }
                Some(write(prefix, &fraction(micros)))
            });
            cache.ok().flatten()
        })
    }
}

/// `.MMMMMMZ`: the six digits of `micros` (below 1,000,000), zero-padded, written
/// without `fmt`'s padding machinery, which cost more than the rest of the timestamp.
fn fraction(micros: u32) -> Fraction {
    let mut text = *b".000000Z";
    let mut rest = micros;
    for digit in text[1..7].iter_mut().rev() {
        // Below 10: a digit.
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    Fraction(text)
}

/// The bytes [`fraction`] wrote: ASCII only.
struct Fraction([u8; 8]);

impl Fraction {
    fn as_str(&self) -> &str {
        // Every byte is `.`, `Z` or an ASCII digit.
        std::str::from_utf8(&self.0).unwrap_or(".000000Z")
    }
}

impl FormatTime for CachedRfc3339 {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        Self::write(SystemTime::now(), w)
    }
}

/// What a subscriber under test wrote: a writer whose clones share one buffer.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Lines {
    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lines").clone()).expect("utf-8")
    }
}

#[cfg(test)]
impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The timestamp of `since_epoch`, through a `Writer` and as bytes, which agree.
    fn at(since_epoch: Duration) -> String {
        let mut line = String::new();
        CachedRfc3339::write(UNIX_EPOCH + since_epoch, &mut Writer::new(&mut line)).expect("formats");
        let mut bytes = Vec::new();
        CachedRfc3339::write_bytes(UNIX_EPOCH + since_epoch, &mut bytes);
        assert_eq!(bytes, line.as_bytes());
        line
    }

    #[test]
    fn a_clock_before_1970_or_past_9999_still_gets_a_timestamp() {
        for time in
            [UNIX_EPOCH - Duration::from_secs(86_400), UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400)]
        {
            let mut line = String::new();
            CachedRfc3339::write(time, &mut Writer::new(&mut line)).expect("formats");
            assert!(line.len() >= 20, "{line}");
            let mut bytes = Vec::new();
            CachedRfc3339::write_bytes(time, &mut bytes);
            // tracing-subscriber's timer reads the clock itself: the same shape.
            assert_eq!(bytes.len(), line.len(), "{line}");
        }
    }

    #[test]
    fn timestamps_match_rfc3339_with_micros_across_seconds() {
        for (since, expected) in [
            (Duration::new(1_764_674_712, 123_456_789), "2025-12-02T11:25:12.123456Z"),
            (Duration::new(1_764_674_712, 999_999_999), "2025-12-02T11:25:12.999999Z"),
            (Duration::new(1_764_674_713, 7_000), "2025-12-02T11:25:13.000007Z"),
            (Duration::new(1_764_674_712, 0), "2025-12-02T11:25:12.000000Z"),
            (Duration::new(951_782_400, 500_000), "2000-02-29T00:00:00.000500Z"),
        ] {
            assert_eq!(at(since), expected);
            assert_eq!(at(since), humantime::format_rfc3339_micros(UNIX_EPOCH + since).to_string());
        }
    }

    /// `wall` is `expected` give or take what a busy machine may put between two reads.
    fn close_to(wall: SystemTime, expected: SystemTime) -> bool {
        let slack = Duration::from_millis(50);
        wall >= expected - slack && wall <= expected + slack
    }

    #[test]
    fn the_wall_time_of_an_instant_is_the_clocks_before_after_and_across_anchors() {
        for _ in 0..3 {
            let (at, now) = (Instant::now(), SystemTime::now());
            assert!(close_to(wall_time_of(at), now));
        }
        // Behind the thread's anchor (which is then read again), and past its second.
        let (at, now) = (Instant::now(), SystemTime::now());
        for offset in [Duration::from_millis(1500), Duration::from_millis(10)] {
            if let Some(earlier) = at.checked_sub(offset) {
                assert!(close_to(wall_time_of(earlier), now - offset), "{offset:?} before");
            }
        }
        let later = Duration::from_secs(3);
        assert!(close_to(wall_time_of(at + later), now + later), "{later:?} after");
        assert!(close_to(wall_time_of(at), now), "after re-anchoring ahead");
    }

    #[test]
    fn plain_lines_carry_the_timestamp_level_target_and_fields() {
        let lines = Lines::default();
        let sink = lines.clone();
        let logs = dispatch(LogFormat::Plain, "info", move || sink.clone(), false);
        tracing::dispatcher::with_default(&logs, || {
            tracing::info!(target: "oncely::access", path = "/payments", status = 201u16);
            tracing::debug!(target: "oncely::access", "filtered out");
        });
        let text = lines.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        let (stamp, rest) = text.split_once(' ').expect("a timestamp");
        assert_eq!(stamp.len(), 27, "{text}");
        assert!(stamp.ends_with('Z'), "{text}");
        assert_eq!(rest.trim_start(), "INFO oncely::access: path=\"/payments\" status=201\n");
    }
}
