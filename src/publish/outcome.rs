//! What becomes of a record: where Kafka wrote it, or why it did not take it.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why Kafka did not take a record: the `reason` label of the delivery-failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFailure {
    Timeout,
    QueueFull,
    MessageTooLarge,
    UnknownTopic,
    Authorization,
    BrokerUnavailable,
    /// The record's partition has fewer in-sync replicas than `min.insync.replicas`.
    NotEnoughReplicas,
    /// With `kafka.exactly_once`: the record's transaction was aborted.
    Transaction,
    Other,
}

impl DeliveryFailure {
    pub const ALL: [DeliveryFailure; 9] = [
        DeliveryFailure::Timeout,
        DeliveryFailure::QueueFull,
        DeliveryFailure::MessageTooLarge,
        DeliveryFailure::UnknownTopic,
        DeliveryFailure::Authorization,
        DeliveryFailure::BrokerUnavailable,
        DeliveryFailure::NotEnoughReplicas,
        DeliveryFailure::Transaction,
        DeliveryFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryFailure::Timeout => "timeout",
            DeliveryFailure::QueueFull => "queue_full",
            DeliveryFailure::MessageTooLarge => "message_too_large",
            DeliveryFailure::UnknownTopic => "unknown_topic",
            DeliveryFailure::Authorization => "authorization",
            DeliveryFailure::BrokerUnavailable => "broker_unavailable",
            DeliveryFailure::NotEnoughReplicas => "not_enough_replicas",
            DeliveryFailure::Transaction => "transaction_aborted",
            DeliveryFailure::Other => "other",
        }
    }

    /// Whether the same record may be taken later. A record Kafka calls too large never
    /// will be.
    pub fn is_retryable(self) -> bool {
        self != DeliveryFailure::MessageTooLarge
    }
}

/// Why an event did not reach Kafka.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("Kafka did not acknowledge the event within {0:?}")]
    Timeout(Duration),
    #[error("the producer queue is full; Kafka is not keeping up")]
    QueueFull,
    #[error("Kafka is unreachable: {0}")]
    Unreachable(String),
    #[error("the record is larger than Kafka accepts ({0})")]
    TooLarge(String),
    #[error("Kafka refused the event ({}): {detail}", reason.as_str())]
    Kafka {
        reason: DeliveryFailure,
        detail: String,
    },
}

impl PublishError {
    /// The kind of failure, for the metric and for choosing the answer.
    pub fn failure(&self) -> DeliveryFailure {
        match self {
            PublishError::Timeout(_) => DeliveryFailure::Timeout,
            PublishError::QueueFull => DeliveryFailure::QueueFull,
            PublishError::Unreachable(_) => DeliveryFailure::BrokerUnavailable,
            PublishError::TooLarge(_) => DeliveryFailure::MessageTooLarge,
            PublishError::Kafka { reason, .. } => *reason,
        }
    }

    pub fn from_kafka(err: &KafkaError) -> PublishError {
        let code = err.rdkafka_error_code();
        let reason = match code {
            Some(RDKafkaErrorCode::QueueFull) => return PublishError::QueueFull,
            Some(
                RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut,
            ) => DeliveryFailure::Timeout,
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
                return PublishError::TooLarge(err.to_string());
            }
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition,
            ) => DeliveryFailure::UnknownTopic,
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication,
            ) => DeliveryFailure::Authorization,
            Some(
                RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
            ) => DeliveryFailure::NotEnoughReplicas,
            Some(
                RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition,
            ) => DeliveryFailure::BrokerUnavailable,
            _ => DeliveryFailure::Other,
        };
        PublishError::Kafka {
            reason,
            detail: err.to_string(),
        }
    }
}

/// Where Kafka wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Awaits `future` until `deadline`, or without limit when there is none.
pub async fn with_deadline<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await,
        None => Ok(future.await),
    }
}
