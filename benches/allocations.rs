//! Heap allocations of the per-event work, stage by stage, for 1 KB, 3 KB and 200 KB events:
//! `cargo bench --bench allocations`. Counted with dhat's allocator, in a binary of its own so
//! that it does not distort the timing benchmark. It holds them to docs/performance.md's budget (0 to
//! verify, route and build the record, 1 of 8 bytes to parse), and the test command runs it.

mod common;

use std::hint::black_box;

use common::Case;
use tamio_kafka_bridge::ingest::envelope::Envelope;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Allocations and bytes `f` makes per call, averaged over 1,000 calls.
fn allocations<F: FnMut()>(mut f: F) -> (f64, f64) {
    f();
    let before = dhat::HeapStats::get();
    for _ in 0..1000 {
        f();
    }
    let after = dhat::HeapStats::get();
    (
        (after.total_blocks - before.total_blocks) as f64 / 1000.0,
        (after.total_bytes - before.total_bytes) as f64 / 1000.0,
    )
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    println!("heap allocations per event: count (bytes); 2 secrets configured");
    for size in [1_000, 3_000, 200_000] {
        let case = Case::new(size);
        let verify = allocations(|| {
            black_box(case.verify());
        });
        let verified = case.verify();
        let parse = allocations(|| {
            black_box(Envelope::parse(&verified).unwrap());
        });
        let envelope = Envelope::parse(&verified).unwrap();
        let route = allocations(|| {
            black_box(case.routes.route(&envelope, verified.bytes()).unwrap());
        });
        // The request's headers move into the record; their copies are made beforehand.
        let mut headers: Vec<_> = (0..1001).map(|_| case.headers.clone()).collect();
        let build = allocations(|| case.build(&verified, headers.pop().unwrap(), &envelope));
        println!(
            "  {:>6}: verify {} ({} B), parse {} ({} B), route {} ({} B), route + build record {} ({} B)",
            case.label, verify.0, verify.1, parse.0, parse.1, route.0, route.1, build.0, build.1
        );
        // The budget docs/performance.md states, whatever the size: the body is never copied.
        assert_eq!(verify.0, 0.0, "{}: verifying allocates", case.label);
        assert!(
            parse.0 <= 1.0 && parse.1 <= 8.0,
            "{}: parsing allocates {parse:?}",
            case.label
        );
        assert_eq!(route.0, 0.0, "{}: routing allocates", case.label);
        assert_eq!(
            build.0, 0.0,
            "{}: building the record allocates",
            case.label
        );
    }
}
