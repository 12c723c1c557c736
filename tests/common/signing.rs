//! Signing helpers for tests: the schemes' test secrets, bodies and tampered twins.

use super::{now, ticket_event};
use tamio_kafka_bridge::ingest::verify;

pub fn tamio_header(secret: &str, body: &str) -> String {
    verify::header_value(secret.as_bytes(), now(), body.as_bytes())
}

pub const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const PLAIN_SECRET: &str = "plain-secret-7d1e";

/// A ticket event from `endpoint`.
pub fn event_from(endpoint: &str, event_id: &str, seq: usize) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&ticket_event(event_id, "ticket-schemes", seq)).unwrap();
    v["endpoint_id"] = endpoint.into();
    v.to_string()
}

/// The same body with one byte changed.
pub fn tampered(body: &str) -> String {
    body.replacen("\"is_open\":true", "\"is_open\":false", 1)
}
