//! The per-event work without I/O, for small (1 KB), typical (3 KB) and large (200 KB)
//! events: verify the signature, parse and validate the envelope, pick topic and key, build
//! the Kafka record. `cargo bench --bench pipeline` prints time per event (criterion);
//! `cargo bench --bench allocations` the heap allocations of each stage.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::Case;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::HeaderMap;
use tamio_kafka_bridge::config::{MacEncoding, Settings};
use tamio_kafka_bridge::ingest::envelope::Envelope;
use tamio_kafka_bridge::ingest::verify::{self, Verifier};

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
            |b| b.iter(|| case.build(&verified, case.headers.clone(), &envelope)),
        );
        group.bench_function(BenchmarkId::new("all", &case.label), |b| {
            b.iter(|| case.all())
        });
    }
    group.finish();
}

/// Verification of a 3 KB event with one secret, in each scheme.
fn schemes(c: &mut Criterion) {
    let case = Case::new(3_000);
    let body = case.bytes.as_ref();
    let now = case
        .at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let sw = verify::standard_webhooks_signature(whsec.as_bytes(), "msg_1", now, body).unwrap();
    let plain = verify::plain_mac(b"s3cret", body, MacEncoding::Hex);
    let tamio = verify::header_value(b"s3cret", now, body);
    // Scheme, secret, and the headers of a delivery signed with it.
    type Signed<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let cases: [Signed<'_>; 3] = [
        ("tamio", "s3cret", vec![("tamio-signature", tamio)]),
        (
            "standard-webhooks",
            whsec,
            vec![
                ("webhook-id", "msg_1".to_owned()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", sw),
            ],
        ),
        ("hmac-sha256", "s3cret", vec![("tamio-signature", plain)]),
    ];
    let mut group = c.benchmark_group("verify_one_secret");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for (scheme, secret, given) in cases {
        let settings = Settings::load_from(
            None,
            [
                ("TAMIO_BRIDGE__SIGNATURE__SCHEME", scheme),
                ("TAMIO_BRIDGE__SIGNATURE__SECRETS", secret),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap();
        let verifier = Verifier::build(&settings.signature).unwrap();
        let mut headers = HeaderMap::new();
        for (name, value) in &given {
            headers.insert(*name, value.parse().unwrap());
        }
        group.bench_function(BenchmarkId::new(scheme, &case.label), |b| {
            b.iter(|| {
                black_box(
                    verifier
                        .verify(&headers, case.bytes.clone(), case.at)
                        .unwrap(),
                )
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = pipeline, schemes
}
criterion_main!(benches);
