//! What one access line costs the thread of the request that writes it, through the
//! subscriber the gateway installs ([`oncely_gateway::logs::dispatch`]):
//!
//! - `warn`: `--log-level warn`: the line is filtered out (the baseline);
//! - `info_plain`, `info_json`: the keyed access line, as the layer writes it, through
//!   the gateway's writer ([`BatchedLines`]: appended to the thread's buffer, written by
//!   a thread of its own every 100 ms; to a sink here);
//! - `info_plain_channel`: the same line through tracing-appender's non-blocking writer
//!   (a channel to a writer thread: what the gateway used before);
//! - `info_plain_format_only`: the same line formatted and handed straight to a sink: the
//!   floor of any writer;
//! - `info_plain_uncached_time`: formatted with tracing-subscriber's own timer, which
//!   formats the whole date and time on every line, straight to a sink;
//! - `info_plain_default_format`: formatted by tracing-subscriber's default plain format
//!   (the same bytes as `logs::plain`'s, with the gateway's timer), straight to a sink;
//! - `info_plain_direct`: the same line written by the gateway's own access log
//!   ([`AccessLines`], `logs::access`): formatted straight into the thread's buffer, not
//!   through `tracing`, and appended to the same writer; the bytes of `info_plain`;
//! - `storage_key_derive`: one derivation of a storage key, without any line: what the
//!   line's `key` cost when the layer derived it a second time (it now reads the claim's,
//!   `Oncely::claim_request`).
//!
//! What a writer thread does is on another thread and not counted here; a profile of
//! the gateway counts it.
//!
//! ```text
//! cargo bench -p oncely-gateway --bench access_log
//! ```

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use oncely::{IdempotencyKey, Scope, StorageKey};
use oncely_gateway::logs::access::{self, AccessLines};
use oncely_gateway::logs::batched::BatchedLines;
use oncely_gateway::logs::{LogFormat, dispatch};
use oncely_http::{Access, AccessLog, TracingAccessLog};
use std::time::Duration;
use tracing_subscriber::util::SubscriberInitExt;

/// The keyed access line as `oncely-http`'s layer writes it through `log`: asked first,
/// then the method and path copied, and the line written with its key and outcome, its
/// end read from the clock once (`Access::new`).
fn access_line(log: &impl AccessLog, method: &http::Method, path: &str, key: &StorageKey, started: Instant) {
    if log.enabled() {
        let (method, path) = (method.clone(), path.to_string());
        let mut access = Access::new(&method, &path, "executed");
        access.key = Some(key);
        access.status = Some(http::StatusCode::CREATED);
        access.elapsed = access.finished.saturating_duration_since(started);
        log.log(&access);
    }
}

fn channel_to_sink() -> (tracing_appender::non_blocking::NonBlocking, tracing_appender::non_blocking::WorkerGuard) {
    tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::sink()))
}

fn bench(c: &mut Criterion) {
    let key = StorageKey::derive(&Scope::global(), &IdempotencyKey::new("order-8f14e45f").expect("a valid key"));
    let method = http::Method::POST;
    let started = Instant::now();
    let mut group = c.benchmark_group("access_log");
    let mut run = |name: &str, logs: tracing::Dispatch| {
        tracing::dispatcher::with_default(&logs, || {
            group.bench_function(name, |b| {
                b.iter(|| access_line(&TracingAccessLog, black_box(&method), "/payments", &key, started))
            });
        });
    };
    for (name, format, level) in [
        ("warn", LogFormat::Plain, "warn"),
        ("info_plain", LogFormat::Plain, "info"),
        ("info_json", LogFormat::Json, "info"),
    ] {
        let (lines, _guard) = BatchedLines::new(std::io::sink(), Duration::from_millis(100));
        run(name, dispatch(format, level, lines, false));
    }
    let (channel, _guard) = channel_to_sink();
    run("info_plain_channel", dispatch(LogFormat::Plain, "info", channel, false));
    run("info_plain_format_only", dispatch(LogFormat::Plain, "info", std::io::sink, false));
    let uncached =
        tracing_subscriber::fmt().with_env_filter("info").with_writer(std::io::sink).with_ansi(false).finish();
    run("info_plain_uncached_time", uncached.into());
    let default_format = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::sink)
        .with_ansi(false)
        .with_timer(oncely_gateway::logs::CachedRfc3339)
        .finish();
    run("info_plain_default_format", default_format.into());
    // Last: it sets the process's global subscriber, as the binary does.
    let (lines, _guard) = BatchedLines::new(std::io::sink(), Duration::from_millis(100));
    if dispatch(LogFormat::Plain, "info", lines.clone(), false).try_init().is_ok() {
        access::write_directly_to(lines);
        group.bench_function("info_plain_direct", |b| {
            b.iter(|| access_line(&AccessLines, black_box(&method), "/payments", &key, started))
        });
    }
    let (scope, idempotency_key) = (Scope::global(), IdempotencyKey::new("order-8f14e45f").expect("a valid key"));
    group.bench_function("storage_key_derive", |b| {
        b.iter(|| StorageKey::derive(black_box(&scope), black_box(&idempotency_key)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
