//! Plain log lines, byte for byte those of tracing-subscriber's default `Full` format
//! without colours, written for less: [`PlainLine`] (the line) and [`PlainFields`] (its
//! fields).
//!
//! At `info` every request writes an access line, so what formatting one costs is paid
//! by every request. The default format paints each field name, each target and each
//! `=` through `nu_ansi_term` even when colours are off, and formats every value through
//! `{:?}` behind two more `format_args!` layers. Counted with callgrind
//! (`bench/instructions.sh`), that was most of the 9,000–16,000 instructions an access
//! line cost. These write the same bytes directly. The gateway's access lines now skip
//! the event altogether when they can ([`super::access`]), and these write the rest.
//!
//! What they cover, and what they hand back to tracing-subscriber's own formatter:
//!
//! - [`PlainLine`] writes events that have no span around them and that did not come
//!   from the `log` crate, on a writer without colours. Any other event (inside a span,
//!   a `log` record, colours on) is formatted by `Format<Full>` itself.
//! - [`PlainFields`] writes strings that need no escaping, integers, booleans, and any
//!   other value through `{:?}`, as `name=value`. It hands a field called `message`
//!   (escaped against terminal injection by tracing-subscriber), a raw identifier
//!   (`r#type`), and errors (with their sources) to `DefaultVisitor`, and skips the `log.`
//!   fields of `log` records, as it does.
//!
//! `PlainLine` writes what the gateway's subscriber writes: the default `Full` layout
//! (timestamp, level, target; no thread names, file names or line numbers). It does not
//! read a builder's `with_target(false)` and the like, which the gateway does not set.
//!
//! `tests::lines_match_the_default_format` checks the equivalence on each of these, and
//! `tests::the_access_line_takes_the_direct_path` that the access line is written here.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::CachedRfc3339;

/// The plain line format: `TIMESTAMP LEVEL TARGET: FIELDS`, as tracing-subscriber's
/// `Full` format writes it without colours, timestamps from `T`.
///
/// ```
/// use oncely_gateway::logs::plain::{PlainFields, PlainLine};
///
/// let logs = tracing_subscriber::fmt()
///     .with_ansi(false)
///     .with_writer(std::io::sink)
///     .fmt_fields(PlainFields)
///     .event_format(PlainLine::default())
///     .finish();
/// tracing::subscriber::with_default(logs, || {
///     tracing::info!(target: "oncely::access", path = "/payments", status = 201u16);
/// });
/// ```
#[derive(Debug, Clone)]
pub struct PlainLine<T = CachedRfc3339> {
    timer: T,
    /// For the events this does not write itself.
    full: Format<Full, T>,
}

impl Default for PlainLine<CachedRfc3339> {
    fn default() -> Self {
        Self::with_timer(CachedRfc3339)
    }
}

impl<T: FormatTime + Clone> PlainLine<T> {
    /// Lines whose timestamps `timer` writes.
    pub fn with_timer(timer: T) -> Self {
        Self { full: tracing_subscriber::fmt::format().with_timer(timer.clone()), timer }
    }
}

impl<S, N, T> FormatEvent<S, N> for PlainLine<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if writer.has_ansi_escapes() || event.is_log() || ctx.event_scope().is_some() {
            #[cfg(test)]
            tests::HANDED_OVER.with(|n| n.set(n.get() + 1));
            return self.full.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        // As `Full`: a timer that fails does not lose the line.
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        // `Full` pads the level to five characters, right-aligned, between two spaces.
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// Fields as `name=value`, separated by spaces, as tracing-subscriber's `DefaultFields`
/// writes them without colours (see the [module](self) for what it hands over).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor { writer, is_empty: true, result: Ok(()) }
    }
}

/// The visitor of [`PlainFields`].
#[derive(Debug)]
pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    /// No field written yet (the next one is not preceded by a space).
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Whether this visitor writes `field` itself: not the names `DefaultVisitor` treats
    /// apart, and not on a writer with colours (field names in italics).
    fn writes(&self, field: &Field) -> bool {
        let name = field.name();
        self.result.is_ok() && name != "message" && !name.starts_with("r#") && !self.writer.has_ansi_escapes()
    }

    /// Writes `name=` after the separating space.
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.is_empty) {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(field.name())?;
        self.writer.write_char('=')
    }

    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        self.result = self.name(field).and_then(|()| value(&mut self.writer));
    }

    /// `field` written by tracing-subscriber's own visitor.
    fn hand_over(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        #[cfg(test)]
        tests::HANDED_OVER.with(|n| n.set(n.get() + 1));
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut default);
        self.result = default.finish();
        // It skips `log.` fields; every other field it writes.
        self.is_empty &= is_log_metadata(field);
    }
}

/// The fields a `log` record carries as metadata, written by neither visitor.
fn is_log_metadata(field: &Field) -> bool {
    field.name().starts_with("log.")
}

/// True when `{:?}` of `text` is `text` in double quotes: printable ASCII, with no `"`
/// or `\` to escape.
pub(super) fn needs_no_escaping(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if is_log_metadata(field) {
        } else if self.writes(field) && needs_no_escaping(value) {
            self.write(field, |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.hand_over(field, |v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if is_log_metadata(field) {
        } else if self.writes(field) {
            self.write(field, |w| w.write_str(itoa::Buffer::new().format(value)));
        } else {
            self.hand_over(field, |v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if is_log_metadata(field) {
        } else if self.writes(field) {
            self.write(field, |w| w.write_str(itoa::Buffer::new().format(value)));
        } else {
            self.hand_over(field, |v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if is_log_metadata(field) {
        } else if self.writes(field) {
            self.write(field, |w| w.write_str(if value { "true" } else { "false" }));
        } else {
            self.hand_over(field, |v| v.record_bool(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !is_log_metadata(field) {
            self.hand_over(field, |v| v.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if is_log_metadata(field) {
        } else if self.writes(field) {
            self.write(field, |w| write!(w, "{value:?}"));
        } else {
            self.hand_over(field, |v| v.record_debug(field, value));
        }
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Lines;
    use std::cell::Cell;

    thread_local! {
        /// Lines and fields handed to tracing-subscriber's own formatter on this thread.
        pub(super) static HANDED_OVER: Cell<usize> = const { Cell::new(0) };
    }

    /// A fixed timestamp, so that two formatters' lines can be compared.
    #[derive(Clone, Copy)]
    struct Fixed;
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-03T17:00:00.000001Z")
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \"failed\"")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    /// Every kind of event and field the gateway or its dependencies log.
    fn events() {
        let method = http::Method::POST;
        tracing::info!(target: "oncely::access", %method, path = "/payments", key = "ab12", outcome = "replayed",
            status = 201u16, micros = 57u64);
        tracing::info!(target: "oncely::access", %method, path = "/a \"quoted\" \\ path\n\u{1b}[31m", key = "",
            status = 0u16);
        tracing::info!(path = "/caf\u{e9}", "a message with {} and \u{1b}[31m", "arguments");
        tracing::warn!(error = &Outer(Inner) as &(dyn std::error::Error + 'static), "store failed");
        tracing::error!(error = %Outer(Inner), r#type = "raw", negative = -3i64, yes = true, ratio = 0.5f64);
        tracing::debug!(big = u128::MAX, list = ?["a", "b"], "debug");
        tracing::trace!(empty = "", quote = "say \"hi\"", backslash = "a\\b", tab = "a\tb", "trace");
        tracing::info!("");
        tracing::info!(only = 1u8);
        let outer = tracing::info_span!("request", id = 7u64, path = "/p");
        let _entered = outer.enter();
        tracing::info!(inside = "a span", "in a span");
        let inner = tracing::debug_span!("store", kind = "sqlite");
        inner.in_scope(|| tracing::warn!(deep = 2u8));
        drop(_entered);
        tracing::info!(parent: &outer, explicit = true);
        // One statement: the record borrows its `format_args!`.
        tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("from the log crate: {}", 42))
                .level(log::Level::Warn)
                .target("tokio_postgres::connection")
                .module_path(Some("tokio_postgres::connection"))
                .file(Some("src/connection.rs"))
                .line(Some(12))
                .build(),
        )
        .expect("a log record");
    }

    fn lines(plain: bool) -> String {
        let lines = Lines::default();
        let sink = lines.clone();
        let builder = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .with_timer(Fixed);
        let dispatch: tracing::Dispatch = if plain {
            builder.fmt_fields(PlainFields).event_format(PlainLine::with_timer(Fixed)).finish().into()
        } else {
            builder.finish().into()
        };
        tracing::dispatcher::with_default(&dispatch, events);
        lines.text()
    }

    #[test]
    fn lines_match_the_default_format() {
        let (ours, theirs) = (lines(true), lines(false));
        assert_eq!(ours.lines().count(), 13, "{ours}");
        for (ours, theirs) in ours.lines().zip(theirs.lines()) {
            assert_eq!(ours, theirs);
        }
        assert_eq!(ours, theirs);
        assert!(ours.starts_with(
            "2026-12-03T17:00:00.000001Z  INFO oncely::access: method=POST path=\"/payments\" key=\"ab12\" \
             outcome=\"replayed\" status=201 micros=57\n"
        ));
    }

    #[test]
    fn the_access_line_takes_the_direct_path() {
        let handed_over = |log: &dyn Fn()| {
            let dispatch: tracing::Dispatch = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(std::io::sink)
                .fmt_fields(PlainFields)
                .event_format(PlainLine::with_timer(Fixed))
                .finish()
                .into();
            HANDED_OVER.with(|n| n.set(0));
            tracing::dispatcher::with_default(&dispatch, log);
            HANDED_OVER.with(Cell::get)
        };
        let method = http::Method::POST;
        let access = || {
            tracing::info!(target: "oncely::access", %method, path = "/payments", key = %"ab12", outcome = "replayed",
                status = 201u16, micros = 57u64);
        };
        assert_eq!(handed_over(&access), 0, "the access line, its line and every field, is written here");
        assert_eq!(handed_over(&|| tracing::info!("a message")), 1, "a message field is handed over");
        let in_span = || tracing::info_span!("request").in_scope(|| tracing::info!(n = 1u8));
        assert_eq!(handed_over(&in_span), 1, "a line in a span is handed over");
    }
}
