//! The one error type of the request path, and the only place that picks HTTP status codes.
//!
//! Each stage has its own error enum beside its code; [`IngestError`] wraps them. `status()`
//! picks the status code, `kind()` names the problem in the JSON body and the log, and
//! `outcome()` is the label of the request counters.

use std::time::Duration;

use http::StatusCode;

use crate::ingest::envelope::EnvelopeError;
use crate::ingest::route::RouteError;
use crate::ingest::verify::VerifyError;
use crate::metrics::Outcome;
use crate::publish::PublishError;

/// How long a sender is asked to wait before retrying after a 503.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no such path; deliveries are accepted at {0}")]
    NotFound(String),
    #[error("method {0} is not allowed; deliveries are POST requests")]
    MethodNotAllowed(http::Method),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("the bridge is at its limit of {0} requests in flight; retry later")]
    Overloaded(usize),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::NotFound(_) => StatusCode::NOT_FOUND,
            IngestError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::BodyRead(_) => StatusCode::BAD_REQUEST,
            IngestError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Verify(_) => StatusCode::UNAUTHORIZED,
            IngestError::Envelope(_) | IngestError::Route(_) => StatusCode::BAD_REQUEST,
            // Kafka will never take it: retrying would not help.
            IngestError::Publish(PublishError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error` field of the JSON body.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::NotFound(_) => "not_found",
            IngestError::MethodNotAllowed(_) => "method_not_allowed",
            IngestError::UnsupportedMediaType(_) => "unsupported_media_type",
            IngestError::TooLarge { .. } => "payload_too_large",
            IngestError::BodyTimeout(_) => "request_timeout",
            IngestError::BodyRead(_) => "bad_request",
            IngestError::Overloaded(_) => "overloaded",
            IngestError::Verify(_) => "invalid_signature",
            IngestError::Envelope(EnvelopeError::Json(_)) => "invalid_json",
            IngestError::Envelope(_) => "invalid_envelope",
            IngestError::Route(_) => "unroutable_event",
            IngestError::Publish(PublishError::TooLarge(_)) => "payload_too_large",
            IngestError::Publish(_) => "kafka_unavailable",
        }
    }

    /// The `outcome` label of the request metrics.
    pub fn outcome(&self) -> Outcome {
        match self {
            IngestError::NotFound(_) => Outcome::NotFound,
            IngestError::MethodNotAllowed(_) => Outcome::MethodNotAllowed,
            IngestError::UnsupportedMediaType(_) => Outcome::UnsupportedMediaType,
            IngestError::TooLarge { .. } => Outcome::TooLarge,
            IngestError::BodyTimeout(_) => Outcome::Timeout,
            IngestError::BodyRead(_) => Outcome::Invalid,
            IngestError::Overloaded(_) => Outcome::Unavailable,
            IngestError::Verify(_) => Outcome::Unauthorized,
            IngestError::Envelope(_) | IngestError::Route(_) => Outcome::Invalid,
            IngestError::Publish(PublishError::TooLarge(_)) => Outcome::TooLarge,
            IngestError::Publish(_) => Outcome::Unavailable,
        }
    }

    /// Whether the sender should be told when to retry.
    pub fn retry_after(&self) -> Option<Duration> {
        (self.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER)
    }
}
