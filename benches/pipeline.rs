//! The per-event work without I/O, for small (1 KB), typical (3 KB) and large (200 KB)
//! events: verify the signature, parse and validate the envelope, pick topic and key, build
//! the Kafka record. `cargo bench --bench pipeline` prints time per event (criterion);
//! `cargo bench --bench allocations` the heap allocations of each stage.

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::HeaderMap;
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::envelope::Envelope;
use tamio_kafka_bridge::ingest::route::route;
use tamio_kafka_bridge::ingest::verify::{header_value, Verifier};
use tamio_kafka_bridge::publish::{rfc3339, Record};

const SECRET: &str = "bench-secret";
const FIXTURE: &str = include_str!("../tests/fixtures/whitelabel_ticket_updated.json");

/// The fixture grown to about `size` bytes with a longer reply text.
fn event_of(size: usize) -> String {
    let pad = size.saturating_sub(FIXTURE.len());
    FIXTURE.replacen(
        "\"text\":\"Your request",
        &format!("\"text\":\"{}Your request", "x".repeat(pad)),
        1,
    )
}

fn verifier() -> Verifier {
    let settings = Settings::load_from(
        None,
        vec![(
            "TAMIO_BRIDGE__SIGNATURE__SECRETS".to_owned(),
            format!("old-secret,{SECRET}"),
        )],
    )
    .unwrap();
    Verifier::new(&settings.signature)
}

fn headers_for(body: &str, now: i64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "tamio-signature",
        header_value(SECRET.as_bytes(), now, body.as_bytes())
            .parse()
            .unwrap(),
    );
    h
}

fn pipeline(c: &mut Criterion) {
    let v = verifier();
    let mut group = c.benchmark_group("per_event");
    for size in [1_000, 3_000, 200_000] {
        let body = event_of(size);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let headers = headers_for(&body, now);
        let bytes = Bytes::from(body.clone());
        let at = UNIX_EPOCH + Duration::from_secs(now as u64);
        group.throughput(Throughput::Bytes(body.len() as u64));
        let label = format!("{}KB", body.len() / 1000);
        group.bench_with_input(BenchmarkId::new("verify", &label), &bytes, |b, bytes| {
            b.iter(|| v.verify(&headers, bytes.clone(), at).unwrap())
        });
        let verified = v.verify(&headers, bytes.clone(), at).unwrap();
        group.bench_with_input(BenchmarkId::new("parse", &label), &verified, |b, vb| {
            b.iter(|| Envelope::parse(vb).unwrap())
        });
        let envelope = Envelope::parse(&verified).unwrap();
        group.bench_with_input(BenchmarkId::new("route", &label), &envelope, |b, e| {
            b.iter(|| route(e, "tamio.tickets").unwrap().key.len())
        });
        group.bench_with_input(
            BenchmarkId::new("build_record", &label),
            &envelope,
            |b, e| {
                b.iter(|| {
                    let d = route(e, "tamio.tickets").unwrap();
                    let received_at = rfc3339(at);
                    let record = Record {
                        topic: d.topic,
                        key: &d.key,
                        value: verified.bytes(),
                        event_id: &e.event_id,
                        event_type: &e.event_type,
                        endpoint_id: &e.endpoint_id,
                        signature: headers.get("tamio-signature").map(|h| h.as_bytes()),
                        received_at: at,
                    };
                    black_box(record.to_kafka(&received_at));
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("all", &label), &bytes, |b, bytes| {
            b.iter(|| {
                let vb = v.verify(&headers, bytes.clone(), at).unwrap();
                let e = Envelope::parse(&vb).unwrap();
                let d = route(&e, "tamio.tickets").unwrap();
                let received_at = rfc3339(at);
                let record = Record {
                    topic: d.topic,
                    key: &d.key,
                    value: vb.bytes(),
                    event_id: &e.event_id,
                    event_type: &e.event_type,
                    endpoint_id: &e.endpoint_id,
                    signature: headers.get("tamio-signature").map(|h| h.as_bytes()),
                    received_at: at,
                };
                black_box(record.to_kafka(&received_at));
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = pipeline
}
criterion_main!(benches);
