//! The one record type, from the request pipeline to librdkafka: it owns its parts (the
//! identifiers are slices of the body's buffer, not copies), so it can outlive the request
//! that made it while its delivery report is awaited.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

pub static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
pub static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
pub static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// Which request headers carried the signature that matched: a record carries them, as
/// received, so that a consumer can verify it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Accepted unsigned (`allow_unsigned`).
    Unsigned,
    /// The header of the `tamio` or `hmac-sha256` scheme, carried as `signature`.
    Header(HeaderName),
    /// `webhook-id`, `webhook-timestamp` and `webhook-signature`, under their own names.
    StandardWebhooks,
}

impl Proof {
    /// The headers, as (record header name, request header name).
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &HeaderName)> {
        let names = match self {
            Proof::Unsigned => [None, None, None],
            Proof::Header(name) => [Some(("signature", name)), None, None],
            Proof::StandardWebhooks => [
                Some(("webhook-id", &WEBHOOK_ID)),
                Some(("webhook-timestamp", &WEBHOOK_TIMESTAMP)),
                Some(("webhook-signature", &WEBHOOK_SIGNATURE)),
            ],
        };
        names.into_iter().flatten()
    }

    /// True when no signature was checked.
    pub fn is_empty(&self) -> bool {
        *self == Proof::Unsigned
    }
}

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
    /// The request's headers (moved, not copied), of which the record carries those of the
    /// signature as received.
    pub headers: HeaderMap,
    pub proof: Proof,
    /// Unix seconds of the signature's timestamp (when the sender sent the event), for
    /// schemes that sign one.
    pub signed_at: Option<i64>,
    pub received_at: SystemTime,
    /// Add the CloudEvents Kafka binding headers.
    pub cloudevents: bool,
    /// The `event_type` label the delivered-events counter counts this record under.
    pub event_label: &'static str,
    /// The W3C trace context of the record's producer span.
    pub trace: Option<crate::trace::TraceHeaders>,
    /// Where a replayed record came from (`<topic>:<partition>:<offset>` of the dead
    /// letter), and when it was replayed (RFC 3339).
    pub replayed: Option<Replayed>,
}

/// The `replayed_from` and `replayed_at` headers of a record put through from the
/// dead-letter topic.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub from: String,
    pub at: String,
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

/// Adds the signature headers as received.
fn with_signature(mut out: OwnedHeaders, received: &HeaderMap, proof: &Proof) -> OwnedHeaders {
    for (record_name, name) in proof.headers() {
        if let Some(value) = received.get(name) {
            out = out.insert(header(record_name, value.as_bytes()));
        }
    }
    out
}

impl Record {
    /// The librdkafka record: key, value, headers and timestamp. librdkafka copies the
    /// headers as they are added, so the texts made here need not outlive it.
    pub fn to_kafka(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut received_at = Text::<32>::new();
        write_rfc3339_millis(&mut received_at, self.received_at);
        let mut headers = OwnedHeaders::new_with_capacity(18)
            .insert(header("event_id", &self.event_id))
            .insert(header("event_type", &self.event_type))
            .insert(header("endpoint_id", &self.endpoint_id))
            .insert(header("api_version", b"2"))
            .insert(header("received_at", received_at.as_bytes()));
        if let Some(trace) = &self.trace {
            headers = headers.insert(header("traceparent", trace.traceparent.as_bytes()));
            if let Some(state) = &trace.tracestate {
                headers = headers.insert(header("tracestate", state.as_bytes()));
            }
        }
        if self.cloudevents {
            // Without a signed timestamp, the event's time is when the bridge received it.
            let signed_at = match self.signed_at {
                Some(t) => {
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(t).unwrap_or_default())
                }
                None => self.received_at,
            };
            let mut ce_time = Text::<32>::new();
            let _ = write!(ce_time, "{}", humantime::format_rfc3339_seconds(signed_at));
            // The endpoint id is at most 256 bytes (envelope rules).
            let mut ce_source = Text::<{ 17 + 256 }>::new();
            ce_source.push(b"/tamio/endpoints/");
            ce_source.push(&self.endpoint_id);
            // The CloudEvents Kafka protocol binding, binary content mode.
            headers = headers
                .insert(header(
                    "ce_specversion",
                    CLOUDEVENTS_SPEC_VERSION.as_bytes(),
                ))
                .insert(header("ce_id", &self.event_id))
                .insert(header("ce_source", ce_source.as_bytes()))
                .insert(header("ce_type", &self.event_type))
                .insert(header("ce_time", ce_time.as_bytes()))
                .insert(header("content-type", b"application/json"));
            if let Some(ticket) = &self.ticket_id {
                headers = headers.insert(header("ce_subject", ticket));
            }
            // The CloudEvents distributed-tracing extension.
            if let Some(trace) = &self.trace {
                headers = headers.insert(header("ce_traceparent", trace.traceparent.as_bytes()));
                if let Some(state) = &trace.tracestate {
                    headers = headers.insert(header("ce_tracestate", state.as_bytes()));
                }
            }
        }
        if let Some(replayed) = &self.replayed {
            headers = headers
                .insert(header("replayed_from", replayed.from.as_bytes()))
                .insert(header("replayed_at", replayed.at.as_bytes()));
        }
        let record = FutureRecord::to(&self.topic)
            .payload(&self.value[..])
            .headers(with_signature(headers, &self.headers, &self.proof))
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
    /// The ticket id when the body names one: a ticket's dead letters share a partition,
    /// so that a replay puts them through in their order.
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub error_kind: &'a str,
    pub error: &'a str,
    pub headers: &'a HeaderMap,
    pub proof: &'a Proof,
    pub received_at: SystemTime,
}

impl DeadLetter<'_> {
    /// The raw body with the error in the `error` and `error_kind` headers.
    pub fn to_kafka(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut received_at = Text::<32>::new();
        write_rfc3339_millis(&mut received_at, self.received_at);
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(header("error_kind", self.error_kind.as_bytes()))
            .insert(header("error", self.error.as_bytes()))
            .insert(header("received_at", received_at.as_bytes()));
        let record = FutureRecord::to(self.topic)
            .payload(self.value)
            .headers(with_signature(headers, self.headers, self.proof))
            .timestamp(unix_millis(self.received_at));
        match self.key {
            Some(key) => record.key(key),
            None => record,
        }
    }
}

/// A header value made on the stack (librdkafka copies it as the header is added); what
/// does not fit is cut off.
struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    fn new() -> Self {
        Text {
            buf: [0; N],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> std::fmt::Write for Text<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// RFC 3339 UTC with milliseconds, as in the `received_at` header.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn write_rfc3339_millis<const N: usize>(out: &mut Text<N>, t: SystemTime) {
    let _ = write!(out, "{}", humantime::format_rfc3339_millis(t));
}

fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
