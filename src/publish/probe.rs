//! The readiness probe: asks a broker for the metadata of every topic the bridge writes to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How long after its creation a producer is warmed up: by then librdkafka's own 500 ms
/// timer has asked for the id.
const WARM_UP_FOR: Duration = Duration::from_millis(500);

/// No request is started with less time than this left: it would stay queued, in front of
/// produce requests, after its answer stopped mattering.
const WARM_UP_LAST_CALL: Duration = Duration::from_millis(20);

/// The pauses before the warm-up's metadata requests: every few milliseconds while the first
/// connections come up, then less often (at most 16 requests in the 500 ms).
const WARM_UP_PAUSES_MS: [u64; 16] = [2, 3, 5, 5, 5, 5, 5, 10, 10, 10, 10, 20, 20, 40, 50, 100];

/// Gets a new idempotent producer its producer id within a round trip of its first broker
/// connection, instead of up to 500 ms later, so that the first records after a start or a
/// replacement do not wait for it.
///
/// librdkafka asks for the id from a broker that is up (`rd_kafka_idemp_pid_fsm`); the
/// first metadata answer retires the bootstrap connection, the leader is connected only once
/// a record can be sent, which needs the id, so none is up then and it tries again on a
/// 500 ms timer. Every metadata answer also makes it try again at once
/// (`rd_kafka_parse_Metadata`), and asking for metadata connects a broker; so a thread asks
/// for `topic`'s metadata a few times while the connections come up. It stops once a
/// learned broker has answered (it was up when the state machine ran), at the first error,
/// when [`WarmUp::done`] is called (the first delivery, a fatal error), or after
/// [`WARM_UP_FOR`].
pub struct WarmUp {
    done: AtomicBool,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl WarmUp {
    pub fn start(producer: BridgeProducer, topic: Arc<str>) -> Arc<WarmUp> {
        let warm = Arc::new(WarmUp {
            done: AtomicBool::new(false),
            thread: std::sync::Mutex::new(None),
        });
        let started = Instant::now();
        let state = warm.clone();
        let run = move || {
            for pause in WARM_UP_PAUSES_MS {
                std::thread::sleep(Duration::from_millis(pause));
                let left = WARM_UP_FOR.saturating_sub(started.elapsed());
                if left < WARM_UP_LAST_CALL || state.done.load(Ordering::Relaxed) {
                    break;
                }
                match producer
                    .client()
                    .fetch_metadata(Some(&topic), Timeout::After(left))
                {
                    Ok(md) if md.orig_broker_id() < 0 => {} // a bootstrap address answered
                    _ => break,
                }
            }
        };
        match std::thread::Builder::new()
            .name("producer-warm-up".into())
            .spawn(run)
        {
            Ok(thread) => {
                *warm.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
            }
            Err(err) => tracing::debug!(%err, "no warm-up for the new producer"),
        }
        warm
    }

    /// No more warm-up needed: the thread ends at its next step.
    pub fn done(&self) {
        if !self.done.load(Ordering::Relaxed) {
            self.done.store(true, Ordering::Relaxed);
        }
    }

    /// Ends the warm-up and waits for its thread (and its handle of the producer) to be
    /// gone: within a pause and one request. Blocks: not on the async runtime.
    pub fn stop(&self) {
        self.done();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
