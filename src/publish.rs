//! The Kafka producer: builds each record, hands it to librdkafka and waits for the delivery
//! report, so that the sender is answered only once Kafka has the event.
//!
//! The producer is idempotent with `acks=all`: librdkafka keeps the order of the records of
//! one partition across its own retries, and the record key (the ticket id) picks the
//! partition with the Java client's murmur2 hash, so consumers and other producers agree on
//! where a ticket lives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;

use crate::config::Kafka;
use crate::metrics::Metrics;

/// Why an event did not reach Kafka. Every case asks the sender to retry later.
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
    #[error("Kafka refused the event ({reason}): {detail}")]
    Kafka {
        reason: &'static str,
        detail: String,
    },
}

impl PublishError {
    /// The `reason` label of the delivery-failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Timeout(_) => "timeout",
            PublishError::QueueFull => "queue_full",
            PublishError::Unreachable(_) => "broker_unavailable",
            PublishError::TooLarge(_) => "message_too_large",
            PublishError::Kafka { reason, .. } => reason,
        }
    }

    fn from_kafka(err: &KafkaError) -> PublishError {
        let code = err.rdkafka_error_code();
        let reason = match code {
            Some(RDKafkaErrorCode::QueueFull) => return PublishError::QueueFull,
            Some(
                RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut,
            ) => "timeout",
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
                return PublishError::TooLarge(err.to_string());
            }
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition,
            ) => "unknown_topic",
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication,
            ) => "authorization",
            Some(
                RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition,
            ) => "broker_unavailable",
            _ => "other",
        };
        PublishError::Kafka {
            reason,
            detail: err.to_string(),
        }
    }
}

/// Every value of [`PublishError::reason`], for pre-registering the metric's series.
pub const FAILURE_REASONS: &[&str] = &[
    "timeout",
    "queue_full",
    "message_too_large",
    "unknown_topic",
    "authorization",
    "broker_unavailable",
    "other",
];

/// One record to publish. The value is the request body byte for byte.
pub struct Record<'a> {
    pub topic: &'a str,
    /// None: the route's key is optional and absent; the record goes without a key.
    pub key: Option<&'a str>,
    pub value: &'a [u8],
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub endpoint_id: &'a str,
    pub ticket_id: Option<&'a str>,
    /// The signature headers as received, each under its record header name.
    pub signature: &'a [(&'static str, bytes::Bytes)],
    /// Unix seconds of the signature's timestamp (when the sender sent the event), for
    /// schemes that sign one.
    pub signed_at: Option<i64>,
    pub received_at: SystemTime,
    /// Add the CloudEvents Kafka binding headers.
    pub cloudevents: bool,
}

/// A record that owns its parts, for publishing from a task of its own (the delivery report
/// may come after the request that produced it was answered).
pub struct OwnedRecord {
    pub topic: Arc<str>,
    pub key: Option<String>,
    pub value: bytes::Bytes,
    pub event_id: String,
    pub event_type: String,
    pub endpoint_id: String,
    pub ticket_id: Option<String>,
    pub signature: Vec<(&'static str, bytes::Bytes)>,
    pub signed_at: Option<i64>,
    pub received_at: SystemTime,
    pub cloudevents: bool,
}

impl OwnedRecord {
    pub fn as_record(&self) -> Record<'_> {
        Record {
            topic: &self.topic,
            key: self.key.as_deref(),
            value: &self.value,
            event_id: &self.event_id,
            event_type: &self.event_type,
            endpoint_id: &self.endpoint_id,
            ticket_id: self.ticket_id.as_deref(),
            signature: &self.signature,
            signed_at: self.signed_at,
            received_at: self.received_at,
            cloudevents: self.cloudevents,
        }
    }
}

/// Header values a record needs that are made, not borrowed; they must outlive the record.
pub struct RecordTexts {
    received_at: String,
    ce_time: String,
    ce_source: String,
}

/// CloudEvents `specversion` the headers follow.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";

impl<'a> Record<'a> {
    pub fn texts(&self) -> RecordTexts {
        // Without a signed timestamp, the event's time is when the bridge received it.
        let signed_at = match self.signed_at {
            Some(t) => {
                SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or_default())
            }
            None => self.received_at,
        };
        RecordTexts {
            received_at: rfc3339(self.received_at),
            ce_time: if self.cloudevents {
                rfc3339_secs(signed_at)
            } else {
                String::new()
            },
            ce_source: if self.cloudevents {
                format!("/tamio/endpoints/{}", self.endpoint_id)
            } else {
                String::new()
            },
        }
    }

    /// The librdkafka record: key, value, headers and timestamp.
    pub fn to_kafka(&self, texts: &'a RecordTexts) -> FutureRecord<'a, str, [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(14)
            .insert(header("event_id", self.event_id.as_bytes()))
            .insert(header("event_type", self.event_type.as_bytes()))
            .insert(header("endpoint_id", self.endpoint_id.as_bytes()))
            .insert(header("api_version", b"2"))
            .insert(header("received_at", texts.received_at.as_bytes()));
        if self.cloudevents {
            // The CloudEvents Kafka protocol binding, binary content mode.
            headers = headers
                .insert(header(
                    "ce_specversion",
                    CLOUDEVENTS_SPEC_VERSION.as_bytes(),
                ))
                .insert(header("ce_id", self.event_id.as_bytes()))
                .insert(header("ce_source", texts.ce_source.as_bytes()))
                .insert(header("ce_type", self.event_type.as_bytes()))
                .insert(header("ce_time", texts.ce_time.as_bytes()))
                .insert(header("content-type", b"application/json"));
            if let Some(ticket) = self.ticket_id {
                headers = headers.insert(header("ce_subject", ticket.as_bytes()));
            }
        }
        let record = FutureRecord::to(self.topic)
            .payload(self.value)
            .headers(with_signature(headers, self.signature))
            .timestamp(unix_millis(self.received_at));
        match self.key {
            Some(key) => record.key(key),
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
    pub signature: &'a [(&'static str, bytes::Bytes)],
    pub received_at: SystemTime,
}

/// Where Kafka wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

fn with_signature(
    mut headers: OwnedHeaders,
    signature: &[(&'static str, bytes::Bytes)],
) -> OwnedHeaders {
    for (name, value) in signature {
        headers = headers.insert(header(name, value));
    }
    headers
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

/// The producer options the bridge sets, before `kafka.librdkafka` (which wins).
pub fn producer_config(kafka: &Kafka, brokers: &str, max_body_bytes: usize) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", kafka.delivery_timeout_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            kafka.queue_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            kafka.queue_max_kbytes.to_string(),
        )
        // Room for the largest accepted body plus its key and headers.
        .set("message.max.bytes", (max_body_bytes + 65_536).to_string())
        .set("linger.ms", "5")
        .set("allow.auto.create.topics", "false")
        .set("statistics.interval.ms", "5000")
        // Reconnect promptly after a broker returns, so readiness recovers within seconds.
        .set("reconnect.backoff.max.ms", "1000")
        .set("client.id", "tamio-kafka-bridge")
        .set("security.protocol", kafka.security_protocol());
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let tls = &kafka.tls;
    if tls.enabled {
        if !tls.ca_file.as_os_str().is_empty() {
            cfg.set("ssl.ca.location", path(&tls.ca_file));
        }
        if !tls.cert_file.as_os_str().is_empty() {
            cfg.set("ssl.certificate.location", path(&tls.cert_file))
                .set("ssl.key.location", path(&tls.key_file));
        }
        if !tls.key_password.expose().is_empty() {
            cfg.set(
                "ssl.key.password",
                String::from_utf8_lossy(tls.key_password.expose()),
            );
        }
    }
    if let Some(mechanism) = kafka.sasl.mechanism {
        cfg.set("sasl.mechanisms", mechanism.as_str())
            .set("sasl.username", &kafka.sasl.username)
            .set(
                "sasl.password",
                String::from_utf8_lossy(kafka.sasl.password.expose()),
            );
    }
    for (k, v) in &kafka.librdkafka {
        cfg.set(k, v);
    }
    cfg
}

/// The producer's context: turns librdkafka's statistics into metrics and notices fatal
/// errors. librdkafka's own log lines reach `tracing` through rdkafka's `tracing` feature.
pub struct StatsContext {
    metrics: Arc<Metrics>,
    /// Last cumulative (errors, retries) seen per broker, to count the increase.
    last: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
    /// Set when librdkafka reports a fatal error: this producer can deliver nothing more.
    fatal: Arc<AtomicBool>,
}

impl ClientContext for StatsContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(%reason, "the Kafka producer hit a fatal error; it will be replaced");
            self.fatal.store(true, Ordering::SeqCst);
        } else {
            tracing::warn!(%error, %reason, "Kafka client error");
        }
    }

    fn stats(&self, stats: Statistics) {
        let m = &self.metrics;
        m.producer_queue_messages.set(stats.msg_cnt as i64);
        m.producer_queue_bytes.set(stats.msg_size as i64);
        let mut last = self.last.lock().expect("stats lock");
        for broker in stats.brokers.values() {
            // Bootstrap entries (nodeid -1) stand for the configured addresses, not brokers.
            if broker.nodeid < 0 {
                continue;
            }
            let label = [broker.nodename.as_str()];
            m.broker_up
                .with_label_values(&label)
                .set(i64::from(broker.state == "UP"));
            if let Some(rtt) = &broker.rtt {
                m.broker_rtt
                    .with_label_values(&label)
                    .set(rtt.avg as f64 / 1_000_000.0);
            }
            let errors = broker.txerrs + broker.rxerrs + broker.req_timeouts;
            let retries = broker.txretries;
            let (prev_errors, prev_retries) = last
                .insert(broker.nodename.clone(), (errors, retries))
                .unwrap_or((0, 0));
            m.broker_request_errors
                .with_label_values(&label)
                .inc_by(errors.saturating_sub(prev_errors));
            m.broker_retries
                .with_label_values(&label)
                .inc_by(retries.saturating_sub(prev_retries));
        }
    }
}

type BridgeProducer = FutureProducer<StatsContext>;

/// The current producer and its fatal-error flag.
#[derive(Clone)]
struct Current {
    producer: BridgeProducer,
    fatal: Arc<AtomicBool>,
}

#[derive(Clone)]
pub struct Publisher {
    /// Replaced as a whole when librdkafka declares the producer dead (a fatal error, e.g. a
    /// fenced idempotent producer): records then go to a fresh producer with a new id.
    current: Arc<std::sync::RwLock<Current>>,
    /// Held while a dead producer is being replaced.
    replacing: Arc<tokio::sync::Mutex<()>>,
    config: Arc<ClientConfig>,
    metrics: Arc<Metrics>,
    /// False while the readiness probe finds no broker answering: records are then refused
    /// at once instead of waiting out the delivery timeout.
    reachable: Arc<AtomicBool>,
}

impl Publisher {
    pub fn new(
        kafka: &Kafka,
        max_body_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Publisher, KafkaError> {
        let config = producer_config(kafka, &kafka.brokers, max_body_bytes);
        let current = Self::create(&config, &metrics)?;
        Ok(Publisher {
            current: Arc::new(std::sync::RwLock::new(current)),
            replacing: Arc::new(tokio::sync::Mutex::new(())),
            config: Arc::new(config),
            metrics,
            reachable: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Hands the record to librdkafka and waits for Kafka to acknowledge it with `acks=all`:
    /// until `deadline`, or with none until the delivery report (librdkafka reports within
    /// `kafka.delivery_timeout_ms`).
    pub async fn publish(
        &self,
        record: Record<'_>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Delivered, PublishError> {
        let texts = record.texts();
        let future_record = record.to_kafka(&texts);
        let result = self.deliver(future_record, deadline).await;
        match &result {
            Ok(_) => self.metrics.delivered(record.event_type),
            Err(e) => self.count_failure(e),
        }
        result
    }

    /// Writes a refused delivery's raw body to the dead-letter topic, with the error in the
    /// `error` and `error_kind` headers, and waits for Kafka's acknowledgement.
    pub async fn dead_letter(
        &self,
        letter: DeadLetter<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Delivered, PublishError> {
        let received_at = rfc3339(letter.received_at);
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(header("error_kind", letter.error_kind.as_bytes()))
            .insert(header("error", letter.error.as_bytes()))
            .insert(header("received_at", received_at.as_bytes()));
        let headers = with_signature(headers, letter.signature);
        let future_record: FutureRecord<'_, str, [u8]> = FutureRecord::to(letter.topic)
            .payload(letter.value)
            .headers(headers)
            .timestamp(unix_millis(letter.received_at));
        let result = self.deliver(future_record, Some(deadline)).await;
        match &result {
            Ok(_) => self.metrics.dead_letters.inc(),
            Err(e) => self.count_failure(e),
        }
        result
    }

    fn create(config: &ClientConfig, metrics: &Arc<Metrics>) -> Result<Current, KafkaError> {
        let fatal = Arc::new(AtomicBool::new(false));
        let context = StatsContext {
            metrics: metrics.clone(),
            last: Default::default(),
            fatal: fatal.clone(),
        };
        Ok(Current {
            producer: config.create_with_context(context)?,
            fatal,
        })
    }

    /// The producer in force (for probes and flushes, which never replace it).
    fn producer(&self) -> BridgeProducer {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .producer
            .clone()
    }

    /// The producer to deliver with; when the one in force has died, replaces it first. One
    /// replacement at a time, built on a blocking thread: concurrent deliveries that find it
    /// dead wait for that one, each within its deadline.
    async fn live_producer(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Current, PublishError> {
        let seen = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !seen.fatal.load(Ordering::SeqCst) {
            return Ok(seen);
        }
        let waited = tokio::time::Instant::now();
        let Ok(_turn) = with_deadline(deadline, self.replacing.lock()).await else {
            return Err(PublishError::Timeout(waited.elapsed()));
        };
        let now = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !Arc::ptr_eq(&now.fatal, &seen.fatal) {
            // Replaced while this delivery waited for its turn.
            return Ok(now);
        }
        tracing::warn!("the Kafka producer is dead: building a new one");
        let (config, metrics) = (self.config.clone(), self.metrics.clone());
        let started = std::time::Instant::now();
        let fresh = tokio::task::spawn_blocking(move || Self::create(&config, &metrics)).await;
        let fresh = match fresh {
            Ok(Ok(fresh)) => fresh,
            Ok(Err(err)) => {
                tracing::error!(%err, "cannot create a new Kafka producer");
                return Ok(now);
            }
            Err(err) => {
                tracing::error!(%err, "creating a new Kafka producer failed");
                return Ok(now);
            }
        };
        let retired = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            fresh.clone(),
        );
        self.metrics.producer_restarts.inc();
        tracing::warn!(
            built_ms = started.elapsed().as_millis() as u64,
            "replaced the Kafka producer after its fatal error"
        );
        // Dropping a producer purges, flushes and joins librdkafka's threads: not on the
        // runtime's threads.
        std::thread::spawn(move || drop(retired));
        Ok(fresh)
    }

    fn count_failure(&self, err: &PublishError) {
        self.metrics
            .kafka_delivery_failures
            .with_label_values(&[err.reason()])
            .inc();
    }

    async fn deliver(
        &self,
        record: FutureRecord<'_, str, [u8]>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Delivered, PublishError> {
        if !self.reachable.load(Ordering::Relaxed) {
            return Err(PublishError::Unreachable(
                "no broker answered the last readiness probe".into(),
            ));
        }
        let started = tokio::time::Instant::now();
        let current = self.live_producer(deadline).await?;
        let result = match current.producer.send_result(record) {
            Err((err, _)) => Err(PublishError::from_kafka(&err)),
            Ok(delivery) => match with_deadline(deadline, delivery).await {
                Err(_) => Err(PublishError::Timeout(
                    deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(started)),
                )),
                Ok(Err(_canceled)) => Err(PublishError::Kafka {
                    reason: "other",
                    detail: "the producer was shut down before the delivery report".into(),
                }),
                Ok(Ok(Err((err, _)))) => {
                    if kills_the_producer(&err) {
                        tracing::error!(%err, "the Kafka producer was fenced; it will be replaced");
                        current.fatal.store(true, Ordering::SeqCst);
                    }
                    Err(PublishError::from_kafka(&err))
                }
                Ok(Ok(Ok(d))) => Ok(Delivered {
                    partition: d.partition,
                    offset: d.offset,
                }),
            },
        };
        self.metrics
            .kafka_delivery_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Probes every topic the bridge writes to (see [`probe_topic`]), and refuses records at
    /// once while no broker answers.
    pub async fn probe(&self, topics: &[String], timeout: Duration) -> Result<(), String> {
        let producer = self.producer();
        let topics = topics.to_vec();
        let result = tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .try_for_each(|topic| probe_topic(&producer, topic, timeout))
        })
        .await
        .unwrap_or_else(|e| Err(format!("readiness probe failed: {e}")));
        // Only "no broker answers" refuses records at once; a missing topic is left to
        // librdkafka to report per record.
        let unreachable = matches!(&result, Err(reason) if reason.starts_with(NO_BROKER));
        self.reachable.store(!unreachable, Ordering::Relaxed);
        result
    }
}

const NO_BROKER: &str = "no broker answered";

/// Awaits `future` until `deadline`, or without limit when there is none.
async fn with_deadline<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future).await,
        None => Ok(future.await),
    }
}

/// Errors after which an idempotent producer can deliver nothing more: its producer id or
/// epoch is no longer accepted, so only a new producer (a new id) gets records through.
fn kills_the_producer(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
        )
    )
}

/// Asks a broker for `topic`'s metadata: `Ok` when one answered within `timeout` and the
/// topic exists with partitions, else a sentence saying what is wrong.
fn probe_topic(producer: &BridgeProducer, topic: &str, timeout: Duration) -> Result<(), String> {
    let md = producer
        .client()
        .fetch_metadata(Some(topic), Timeout::After(timeout))
        .map_err(|e| format!("{NO_BROKER} a metadata request: {e}"))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Err(format!("topic `{topic}` is missing from the metadata"));
    };
    if let Some(err) = t.error() {
        return Err(format!(
            "topic `{topic}` is not available: {}",
            RDKafkaErrorCode::from(err)
        ));
    }
    if t.partitions().is_empty() {
        return Err(format!("topic `{topic}` has no partitions"));
    }
    Ok(())
}

impl Publisher {
    /// Waits up to `timeout` for every queued record to be acknowledged; returns how many
    /// were still outstanding when it gave up.
    pub async fn flush(&self, timeout: Duration) -> i32 {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            let _ = producer.flush(Timeout::After(timeout));
            producer.in_flight_count()
        })
        .await
        .unwrap_or(-1)
    }

    /// Records handed to librdkafka and not yet reported.
    pub fn in_flight(&self) -> i32 {
        self.producer().in_flight_count()
    }

    /// Options the producer was built with, for the start-up log, secrets redacted.
    pub fn describe(&self) -> BTreeMap<String, String> {
        self.config
            .config_map()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), crate::config::shown_value(k, v).to_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn kafka(env: &[(&str, &str)]) -> Kafka {
        let mut all = vec![(
            "TAMIO_BRIDGE__KAFKA__BROKERS".to_owned(),
            "b:9092".to_owned(),
        )];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::load_from(None, all).unwrap().kafka
    }

    fn get<'a>(cfg: &'a ClientConfig, key: &str) -> Option<&'a str> {
        cfg.get(key)
    }

    #[test]
    fn security_settings_become_librdkafka_options() {
        let plain = producer_config(&kafka(&[]), "b:9092", 1000);
        assert_eq!(get(&plain, "security.protocol"), Some("plaintext"));
        assert_eq!(get(&plain, "sasl.mechanisms"), None);

        let sasl = producer_config(
            &kafka(&[
                ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "PLAIN"),
                ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "bridge"),
                ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD", "pw-1"),
            ]),
            "b:9092",
            1000,
        );
        assert_eq!(get(&sasl, "security.protocol"), Some("sasl_plaintext"));
        assert_eq!(get(&sasl, "sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(get(&sasl, "sasl.username"), Some("bridge"));
        assert_eq!(get(&sasl, "sasl.password"), Some("pw-1"));

        let tls = producer_config(
            &kafka(&[
                ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true"),
                ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "SCRAM-SHA-256"),
                ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "bridge"),
                ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD", "pw-2"),
            ]),
            "b:9092",
            1000,
        );
        assert_eq!(get(&tls, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(get(&tls, "sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(get(&tls, "ssl.ca.location"), None, "the system's CAs");
    }

    #[test]
    fn passwords_are_redacted_when_the_producer_is_described() {
        let k = kafka(&[
            ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "SCRAM-SHA-512"),
            ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "bridge"),
            ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD", "hunter2-sasl"),
        ]);
        assert!(!format!("{k:?}").contains("hunter2"));
        // Creating a producer connects to nothing yet.
        let publisher = Publisher::new(&k, 1000, Arc::new(crate::metrics::Metrics::new())).unwrap();
        let described = format!("{:?}", publisher.describe());
        assert!(described.contains("sasl.username"), "{described}");
        assert!(!described.contains("hunter2"), "{described}");
    }
}
