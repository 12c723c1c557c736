//! The one record type, from the request pipeline to librdkafka: it owns its parts (the
//! identifiers are slices of the body's buffer, not copies), so it can outlive the request
//! that made it while its delivery report is awaited.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

/// CloudEvents `specversion` the headers follow.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";

/// One record to publish. The value is the request body byte for byte.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    /// None: the route's key is optional and absent; the record goes without a key.
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub event_id: Bytes,
    pub event_type: Bytes,
    pub endpoint_id: Bytes,
    pub ticket_id: Option<Bytes>,
    /// The signature headers as received, each under its record header name.
    pub signature: Vec<(&'static str, Bytes)>,
    /// Unix seconds of the signature's timestamp (when the sender sent the event), for
    /// schemes that sign one.
    pub signed_at: Option<i64>,
    pub received_at: SystemTime,
    /// Add the CloudEvents Kafka binding headers.
    pub cloudevents: bool,
    /// The `event_type` label the delivered-events counter counts this record under.
    pub event_label: &'static str,
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

/// Adds the signature headers as received.
pub fn with_signature(
    mut headers: OwnedHeaders,
    signature: &[(&'static str, Bytes)],
) -> OwnedHeaders {
    for (name, value) in signature {
        headers = headers.insert(header(name, value));
    }
    headers
}

impl Record {
    /// The librdkafka record: key, value, headers and timestamp. librdkafka copies the
    /// headers as they are added, so the texts made here need not outlive it.
    pub fn to_kafka(&self) -> FutureRecord<'_, [u8], [u8]> {
        let received_at = rfc3339(self.received_at);
        let mut headers = OwnedHeaders::new_with_capacity(14)
            .insert(header("event_id", &self.event_id))
            .insert(header("event_type", &self.event_type))
            .insert(header("endpoint_id", &self.endpoint_id))
            .insert(header("api_version", b"2"))
            .insert(header("received_at", received_at.as_bytes()));
        if self.cloudevents {
            // Without a signed timestamp, the event's time is when the bridge received it.
            let signed_at = match self.signed_at {
                Some(t) => {
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(t).unwrap_or_default())
                }
                None => self.received_at,
            };
            let ce_time = rfc3339_secs(signed_at);
            let mut ce_source = Vec::with_capacity(17 + self.endpoint_id.len());
            ce_source.extend_from_slice(b"/tamio/endpoints/");
            ce_source.extend_from_slice(&self.endpoint_id);
            // The CloudEvents Kafka protocol binding, binary content mode.
            headers = headers
                .insert(header(
                    "ce_specversion",
                    CLOUDEVENTS_SPEC_VERSION.as_bytes(),
                ))
                .insert(header("ce_id", &self.event_id))
                .insert(header("ce_source", &ce_source))
                .insert(header("ce_type", &self.event_type))
                .insert(header("ce_time", ce_time.as_bytes()))
                .insert(header("content-type", b"application/json"));
            if let Some(ticket) = &self.ticket_id {
                headers = headers.insert(header("ce_subject", ticket));
            }
        }
        let record = FutureRecord::to(&self.topic)
            .payload(&self.value[..])
            .headers(with_signature(headers, &self.signature))
            .timestamp(unix_millis(self.received_at));
        match &self.key {
            Some(key) => record.key(&key[..]),
            None => record,
        }
    }
}

/// A signed delivery whose envelope was refused, kept for inspection.
pub struct DeadLetter<'a> {
    pub topic: &'a str,
    pub value: &'a [u8],
    pub error_kind: &'a str,
    pub error: &'a str,
    pub signature: &'a [(&'static str, Bytes)],
    pub received_at: SystemTime,
}

impl DeadLetter<'_> {
    /// The raw body with the error in the `error` and `error_kind` headers.
    pub fn to_kafka(&self) -> FutureRecord<'_, [u8], [u8]> {
        let received_at = rfc3339(self.received_at);
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(header("error_kind", self.error_kind.as_bytes()))
            .insert(header("error", self.error.as_bytes()))
            .insert(header("received_at", received_at.as_bytes()));
        FutureRecord::to(self.topic)
            .payload(self.value)
            .headers(with_signature(headers, self.signature))
            .timestamp(unix_millis(self.received_at))
    }
}

/// RFC 3339 UTC with milliseconds, as in the `received_at` header.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn rfc3339_secs(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
