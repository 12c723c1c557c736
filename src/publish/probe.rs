//! The readiness probe: asks a broker for the metadata of every topic the bridge writes to.

use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;

use super::producer::BridgeProducer;

/// Why the bridge is not ready to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailure {
    /// No broker answered a metadata request in time.
    NoBroker,
    /// A topic is not in the metadata: it does not exist.
    TopicMissing,
    /// The broker reports an error for a topic (e.g. not authorized).
    TopicUnavailable,
    /// A topic has no partitions.
    NoPartitions,
    /// The probe itself could not run.
    Internal,
}

impl ProbeFailure {
    pub const ALL: [ProbeFailure; 5] = [
        ProbeFailure::NoBroker,
        ProbeFailure::TopicMissing,
        ProbeFailure::TopicUnavailable,
        ProbeFailure::NoPartitions,
        ProbeFailure::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeFailure::NoBroker => "no_broker",
            ProbeFailure::TopicMissing => "topic_missing",
            ProbeFailure::TopicUnavailable => "topic_unavailable",
            ProbeFailure::NoPartitions => "no_partitions",
            ProbeFailure::Internal => "internal",
        }
    }

    /// Whether records should be refused at once while it lasts: only when no broker
    /// answers. A missing topic is left to librdkafka to report per record.
    pub fn refuses_records(self) -> bool {
        self == ProbeFailure::NoBroker
    }
}

/// A failed probe: its kind and a sentence for `/readyz` and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct ProbeError {
    pub failure: ProbeFailure,
    pub detail: String,
}

impl ProbeError {
    pub fn new(failure: ProbeFailure, detail: impl Into<String>) -> ProbeError {
        ProbeError {
            failure,
            detail: detail.into(),
        }
    }
}

/// Asks a broker for `topic`'s metadata: `Ok` when one answered within `timeout` and the
/// topic exists with partitions. Blocks: run it off the async runtime.
pub fn probe_topic(
    producer: &BridgeProducer,
    topic: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let md = producer
        .client()
        .fetch_metadata(Some(topic), Timeout::After(timeout))
        .map_err(|e| {
            ProbeError::new(
                ProbeFailure::NoBroker,
                format!("no broker answered a metadata request: {e}"),
            )
        })?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Err(ProbeError::new(
            ProbeFailure::TopicMissing,
            format!("topic `{topic}` is missing from the metadata"),
        ));
    };
    if let Some(err) = t.error() {
        return Err(ProbeError::new(
            ProbeFailure::TopicUnavailable,
            format!(
                "topic `{topic}` is not available: {}",
                RDKafkaErrorCode::from(err)
            ),
        ));
    }
    if t.partitions().is_empty() {
        return Err(ProbeError::new(
            ProbeFailure::NoPartitions,
            format!("topic `{topic}` has no partitions"),
        ));
    }
    Ok(())
}
