//! What the per-event benchmarks share: events of a given size, the verifier and routes of
//! the default settings (with two secrets, as during a rotation), and the stages themselves.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::envelope::Envelope;
use tamio_kafka_bridge::ingest::route::Routes;
use tamio_kafka_bridge::ingest::verify::{header_value, VerifiedBody, Verifier};

pub const SECRET: &str = "bench-secret";
const FIXTURE: &str = include_str!("../../tests/fixtures/whitelabel_ticket_updated.json");

/// One event of about `size` bytes, signed, with everything the stages need.
pub struct Case {
    pub label: String,
    pub bytes: Bytes,
    pub headers: HeaderMap,
    pub at: SystemTime,
    pub verifier: Verifier,
    pub routes: Routes,
}

impl Case {
    pub fn new(size: usize) -> Case {
        let pad = size.saturating_sub(FIXTURE.len());
        let body = FIXTURE.replacen(
            "\"text\":\"Your request",
            &format!("\"text\":\"{}Your request", "x".repeat(pad)),
            1,
        );
        let settings = Settings::load_from(
            None,
            vec![(
                "TAMIO_BRIDGE__SIGNATURE__SECRETS".to_owned(),
                format!("old-secret,{SECRET}"),
            )],
        )
        .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut headers = HeaderMap::new();
        headers.insert(
            "tamio-signature",
            header_value(SECRET.as_bytes(), now as i64, body.as_bytes())
                .parse()
                .unwrap(),
        );
        Case {
            label: format!("{}KB", body.len() / 1000),
            bytes: Bytes::from(body),
            headers,
            at: UNIX_EPOCH + Duration::from_secs(now),
            verifier: Verifier::build(&settings.signature).unwrap(),
            routes: Routes::build(&settings.routes, &settings.kafka.topic, None).unwrap(),
        }
    }

    pub fn verify(&self) -> VerifiedBody {
        self.verifier
            .verify(&self.headers, self.bytes.clone(), self.at)
            .unwrap()
    }

    /// Routes `envelope` and builds its Kafka record, as the bridge does before sending.
    pub fn build(&self, verified: &VerifiedBody, headers: HeaderMap, envelope: &Envelope<'_>) {
        let d = self.routes.route(envelope, verified.bytes()).unwrap();
        let record = tamio_kafka_bridge::ingest::record(verified, headers, envelope, d, true);
        black_box(record.to_kafka());
    }

    /// All four stages.
    pub fn all(&self) {
        let verified = self.verify();
        let envelope = Envelope::parse(&verified).unwrap();
        self.build(&verified, self.headers.clone(), &envelope);
    }
}
