//! The canonical-JSON fingerprint on request bodies a client controls: ordinary
//! documents, and the deeply nested ones that used to overflow the stack.
//!
//! `cargo bench -p oncely --bench fingerprint`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oncely::Fingerprint;

/// A payment-like document of about `bytes` bytes: an object of objects, several keys each.
fn typical(bytes: usize) -> String {
    let item = r#"{"sku":"sku_1234","quantity":2,"unit_amount":1999,"metadata":{"b":"x","a":"y"}}"#;
    let count = (bytes / (item.len() + 1)).max(1);
    format!(r#"{{"currency":"eur","customer":"cus_9","items":[{}]}}"#, vec![item; count].join(","))
}

fn deep_arrays(bytes: usize) -> String {
    format!("{}{}", "[".repeat(bytes / 2), "]".repeat(bytes / 2))
}

fn deep_objects(bytes: usize) -> String {
    let depth = bytes / 6;
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint_from_json");
    for (name, make) in
        [("typical", typical as fn(usize) -> String), ("deep_arrays", deep_arrays), ("deep_objects", deep_objects)]
    {
        for size in [1024, 64 * 1024, 1024 * 1024] {
            let doc = make(size);
            group.throughput(Throughput::Bytes(doc.len() as u64));
            group.bench_with_input(BenchmarkId::new(name, size), &doc, |b, doc| {
                b.iter(|| Fingerprint::from_json(black_box(doc.as_bytes())))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
