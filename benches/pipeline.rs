//! The per-event work without I/O, for small (1 KB), typical (3 KB) and large (200 KB)
//! events: verify the signature, parse and validate the envelope, pick topic and key, build
//! the Kafka record. `cargo bench --bench pipeline` prints time per event (criterion);
//! `cargo bench --bench allocations` the heap allocations of each stage.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::Case;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tamio_kafka_bridge::ingest::envelope::Envelope;

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_event");
    for size in [1_000, 3_000, 200_000] {
        let case = Case::new(size);
        group.throughput(Throughput::Bytes(case.bytes.len() as u64));
        group.bench_function(BenchmarkId::new("verify", &case.label), |b| {
            b.iter(|| black_box(case.verify()))
        });
        let verified = case.verify();
        group.bench_function(BenchmarkId::new("parse", &case.label), |b| {
            b.iter(|| black_box(Envelope::parse(&verified).unwrap()))
        });
        let envelope = Envelope::parse(&verified).unwrap();
        group.bench_function(BenchmarkId::new("route", &case.label), |b| {
            b.iter(|| black_box(case.routes.route(&envelope, verified.bytes()).unwrap()))
        });
        group.bench_function(
            BenchmarkId::new("route_and_build_record", &case.label),
            |b| b.iter(|| case.build(&verified, &envelope)),
        );
        group.bench_function(BenchmarkId::new("all", &case.label), |b| {
            b.iter(|| case.all())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = pipeline
}
criterion_main!(benches);
