//! How a request ends, and the only place that builds an HTTP answer for a refusal.
//!
//! Each stage has its own error enum beside its code; the request pipeline sorts them into a
//! [`Refusal`], the kind of answer the sender gets. [`Refusal::status`] picks the status
//! code, [`Refusal::kind`] names the problem in the JSON body and the log,
//! [`Refusal::outcome`] is the label of the request counters, and [`answer`] builds the whole
//! response: status, JSON body, `Retry-After`, `Allow`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// How long a sender is asked to wait before retrying after a 503.
pub const RETRY_AFTER_SECS: u64 = 5;

/// How a request ended: the `outcome` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Unauthorized,
    Invalid,
    TooLarge,
    UnsupportedMediaType,
    MethodNotAllowed,
    NotFound,
    Timeout,
    Unavailable,
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::Unauthorized,
        Outcome::Invalid,
        Outcome::TooLarge,
        Outcome::UnsupportedMediaType,
        Outcome::MethodNotAllowed,
        Outcome::NotFound,
        Outcome::Timeout,
        Outcome::Unavailable,
        Outcome::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Invalid => "invalid",
            Outcome::TooLarge => "too_large",
            Outcome::UnsupportedMediaType => "unsupported_media_type",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::NotFound => "not_found",
            Outcome::Timeout => "timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::Internal => "internal",
        }
    }
}

/// The kinds of refusal a sender can get: one status code each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    MethodNotAllowed,
    UnsupportedMediaType,
    PayloadTooLarge,
    RequestTimeout,
    BadRequest,
    Overloaded,
    InvalidSignature,
    InvalidJson,
    InvalidEnvelope,
    UnroutableEvent,
    KafkaUnavailable,
    DedupStoreUnavailable,
}

impl Refusal {
    pub const ALL: [Refusal; 13] = [
        Refusal::NotFound,
        Refusal::MethodNotAllowed,
        Refusal::UnsupportedMediaType,
        Refusal::PayloadTooLarge,
        Refusal::RequestTimeout,
        Refusal::BadRequest,
        Refusal::Overloaded,
        Refusal::InvalidSignature,
        Refusal::InvalidJson,
        Refusal::InvalidEnvelope,
        Refusal::UnroutableEvent,
        Refusal::KafkaUnavailable,
        Refusal::DedupStoreUnavailable,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::BadRequest
            | Refusal::InvalidJson
            | Refusal::InvalidEnvelope
            | Refusal::UnroutableEvent => StatusCode::BAD_REQUEST,
            Refusal::InvalidSignature => StatusCode::UNAUTHORIZED,
            Refusal::Overloaded | Refusal::KafkaUnavailable | Refusal::DedupStoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The `error` field of the JSON body.
    pub fn kind(self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::UnsupportedMediaType => "unsupported_media_type",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::RequestTimeout => "request_timeout",
            Refusal::BadRequest => "bad_request",
            Refusal::Overloaded => "overloaded",
            Refusal::InvalidSignature => "invalid_signature",
            Refusal::InvalidJson => "invalid_json",
            Refusal::InvalidEnvelope => "invalid_envelope",
            Refusal::UnroutableEvent => "unroutable_event",
            Refusal::KafkaUnavailable => "kafka_unavailable",
            Refusal::DedupStoreUnavailable => "dedup_store_unavailable",
        }
    }

    /// The `outcome` label of the request metrics.
    pub fn outcome(self) -> Outcome {
        match self {
            Refusal::NotFound => Outcome::NotFound,
            Refusal::MethodNotAllowed => Outcome::MethodNotAllowed,
            Refusal::UnsupportedMediaType => Outcome::UnsupportedMediaType,
            Refusal::PayloadTooLarge => Outcome::TooLarge,
            Refusal::RequestTimeout => Outcome::Timeout,
            Refusal::BadRequest
            | Refusal::InvalidJson
            | Refusal::InvalidEnvelope
            | Refusal::UnroutableEvent => Outcome::Invalid,
            Refusal::InvalidSignature => Outcome::Unauthorized,
            Refusal::Overloaded | Refusal::KafkaUnavailable | Refusal::DedupStoreUnavailable => {
                Outcome::Unavailable
            }
        }
    }

    /// Whether the sender should be told when to retry.
    pub fn retry_after(self) -> Option<Duration> {
        (self.status() == StatusCode::SERVICE_UNAVAILABLE)
            .then_some(Duration::from_secs(RETRY_AFTER_SECS))
    }
}

/// A JSON answer.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The answer to a refused request: `{"error": kind, "message": ...}` with the status and
/// headers the refusal calls for.
pub fn answer(refusal: Refusal, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": refusal.kind(), "message": message });
    let mut response = json(refusal.status(), body.to_string().into_bytes());
    if let Some(after) = refusal.retry_after() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(after.as_secs()));
    }
    if refusal == Refusal::MethodNotAllowed {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
    }
    response
}
