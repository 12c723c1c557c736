//! Heap allocations of the per-event work, stage by stage, for 1 KB, 3 KB and 200 KB events:
//! `cargo bench --bench allocations`. Counted with dhat's allocator (a separate binary from
//! the timing benchmark, whose figures it would distort).

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::envelope::Envelope;
use tamio_kafka_bridge::ingest::route::route;
use tamio_kafka_bridge::ingest::verify::{header_value, Verifier};
use tamio_kafka_bridge::publish::{rfc3339, Record};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const SECRET: &str = "bench-secret";
const FIXTURE: &str = include_str!("../tests/fixtures/whitelabel_ticket_updated.json");

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

fn report_allocations() {
    let v = verifier();
    println!("allocations per event (count, bytes), 2 secrets configured:");
    for size in [1_000, 3_000, 200_000] {
        let body = event_of(size);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let headers = headers_for(&body, now);
        let bytes = Bytes::from(body.clone());
        let at = UNIX_EPOCH + Duration::from_secs(now as u64);
        let verified = v.verify(&headers, bytes.clone(), at).unwrap();
        let verify = allocations(|| {
            black_box(v.verify(&headers, bytes.clone(), at).unwrap());
        });
        let parse = allocations(|| {
            black_box(Envelope::parse(&verified).unwrap());
        });
        let envelope = Envelope::parse(&verified).unwrap();
        let routing = allocations(|| {
            black_box(route(&envelope, "tamio.tickets").unwrap());
        });
        let build = allocations(|| {
            let d = route(&envelope, "tamio.tickets").unwrap();
            let received_at = rfc3339(at);
            let record = Record {
                topic: d.topic,
                key: &d.key,
                value: verified.bytes(),
                event_id: &envelope.event_id,
                event_type: &envelope.event_type,
                endpoint_id: &envelope.endpoint_id,
                signature: headers.get("tamio-signature").map(|h| h.as_bytes()),
                received_at: at,
            };
            black_box(record.to_kafka(&received_at));
        });
        println!(
            "  {:>4} KB: verify {:.0} ({:.0} B), parse {:.0} ({:.0} B), route {:.0} ({:.0} B), build record {:.0} ({:.0} B)",
            body.len() / 1000, verify.0, verify.1, parse.0, parse.1, routing.0, routing.1, build.0, build.1
        );
    }
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    report_allocations();
}
