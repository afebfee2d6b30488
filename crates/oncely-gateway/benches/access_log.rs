//! What one access line costs the thread of the request that writes it, through the
//! subscriber the gateway installs ([`oncely_gateway::logs::dispatch`]) and its
//! non-blocking writer (lines handed to a writer thread that writes to a sink here).
//!
//! - `warn`: the default of `--log-level warn`: the line is filtered out (the baseline);
//! - `info_plain`, `info_json`: the keyed access line, as the layer writes it;
//! - `info_plain_uncached_time`: the same with tracing-subscriber's own timer, which
//!   formats the whole date and time on every line.
//!
//! The writer thread's own work (copying lines into its buffer, one `write(2)` per batch)
//! is on another thread and not counted here; a profile of the gateway counts it.
//!
//! ```text
//! cargo bench -p oncely-gateway --bench access_log
//! ```

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use oncely::{IdempotencyKey, Scope, StorageKey};
use oncely_gateway::logs::{LogFormat, dispatch};

/// The keyed access line of `oncely-http`'s layer, with the same fields and values.
fn access_line(method: &http::Method, path: &str, key: &StorageKey, started: Instant) {
    if tracing::enabled!(target: "oncely::access", tracing::Level::INFO) {
        let (method, path) = (method.clone(), path.to_string());
        tracing::info!(
            target: "oncely::access",
            %method,
            path,
            key = Some(tracing::field::display(*key)),
            outcome = "executed",
            status = 201u16,
            micros = started.elapsed().as_micros() as u64,
        );
    }
}

fn non_blocking_sink() -> (tracing_appender::non_blocking::NonBlocking, tracing_appender::non_blocking::WorkerGuard) {
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
    let cases = [
        ("warn", LogFormat::Plain, "warn"),
        ("info_plain", LogFormat::Plain, "info"),
        ("info_json", LogFormat::Json, "info"),
    ];
    for (name, format, level) in cases {
        let (writer, _guard) = non_blocking_sink();
        let logs = dispatch(format, level, writer, false);
        tracing::dispatcher::with_default(&logs, || {
            group.bench_function(name, |b| b.iter(|| access_line(black_box(&method), "/payments", &key, started)));
        });
    }
    let (writer, _guard) = non_blocking_sink();
    let uncached: tracing::Dispatch =
        tracing_subscriber::fmt().with_env_filter("info").with_writer(writer).with_ansi(false).finish().into();
    tracing::dispatcher::with_default(&uncached, || {
        group.bench_function("info_plain_uncached_time", |b| {
            b.iter(|| access_line(black_box(&method), "/payments", &key, started))
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
