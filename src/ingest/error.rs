//! Why a request was refused, and the answer each refusal gets.

use std::time::Duration;

use super::body::BodyError;
use super::envelope::EnvelopeError;
use super::route::RouteError;
use super::verify::VerifyError;
use crate::error::Refusal;
use crate::publish::PublishError;

/// Why a request was refused: the errors of every stage, and the request's own.
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
    #[error("{0}")]
    BodySlow(BodyError),
    #[error("{0}")]
    BodyMemory(BodyError),
    #[error("the bridge is at its limit of {0} requests in flight; retry later")]
    Overloaded(usize),
    #[error(
        "the shared store of delivered event ids cannot be used, and the bridge is set to \
         refuse deliveries meanwhile (dedup.on_store_error = \"refuse\"); retry later"
    )]
    DedupUnavailable,
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
    /// The kind of answer the sender gets (`crate::error` picks its status).
    pub fn refusal(&self) -> Refusal {
        match self {
            IngestError::NotFound(_) => Refusal::NotFound,
            IngestError::MethodNotAllowed(_) => Refusal::MethodNotAllowed,
            IngestError::UnsupportedMediaType(_) => Refusal::UnsupportedMediaType,
            IngestError::TooLarge { .. } => Refusal::PayloadTooLarge,
            IngestError::BodyTimeout(_) => Refusal::RequestTimeout,
            IngestError::BodyRead(_) => Refusal::BadRequest,
            IngestError::BodySlow(_) => Refusal::RequestTimeout,
            IngestError::BodyMemory(_) | IngestError::Overloaded(_) => Refusal::Overloaded,
            IngestError::DedupUnavailable => Refusal::DedupStoreUnavailable,
            IngestError::Verify(_) => Refusal::InvalidSignature,
            IngestError::Envelope(EnvelopeError::Json(_)) => Refusal::InvalidJson,
            IngestError::Envelope(_) => Refusal::InvalidEnvelope,
            IngestError::Route(_) => Refusal::UnroutableEvent,
            // Kafka will never take it: retrying would not help.
            IngestError::Publish(e) if !e.failure().is_retryable() => Refusal::PayloadTooLarge,
            IngestError::Publish(_) => Refusal::KafkaUnavailable,
        }
    }
}
