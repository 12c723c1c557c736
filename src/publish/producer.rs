//! The producer's librdkafka configuration: the options the bridge sets for its guarantees
//! (idempotence, `acks=all`, a key-consistent partitioner, bounded queues), the security
//! options from `kafka.tls` and `kafka.sasl`, and the `kafka.librdkafka` pass-through, which
//! may not undo the former; and the context that turns librdkafka's statistics into metrics.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;

use crate::config::{check_pem_file, Kafka, SettingsError};
use crate::metrics::Metrics;

/// Options the bridge sets itself, each with the setting to use instead.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.brokers"),
    ("metadata.broker.list", "kafka.brokers"),
    (
        "enable.idempotence",
        "nothing: the producer is always idempotent",
    ),
    ("acks", "nothing: the producer always uses acks=all"),
    (
        "request.required.acks",
        "nothing: the producer always uses acks=all",
    ),
    ("message.timeout.ms", "kafka.delivery_timeout_ms"),
    ("delivery.timeout.ms", "kafka.delivery_timeout_ms"),
    ("queue.buffering.max.messages", "kafka.queue_max_messages"),
    ("queue.buffering.max.kbytes", "kafka.queue_max_kbytes"),
];

/// librdkafka's options that only a producer reads (CONFIGURATION.md, `P`): every other
/// option of the producer's client, the connection's above all (TLS verification, SASL,
/// sockets, DNS, proxies), is shared by the readiness probe's client and the replay's
/// consumer, so that they connect the way the producer does.
pub const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "batch.num.messages",
    "batch.size",
    "compression.codec",
    "compression.level",
    "compression.type",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "dr_cb",
    "dr_msg_cb",
    "enable.gapless.guarantee",
    "enable.idempotence",
    "linger.ms",
    "max.in.flight.requests.per.connection",
    "message.send.max.retries",
    "message.timeout.ms",
    "msg_order_cmp",
    "partitioner",
    "partitioner_cb",
    "produce.offset.report",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queuing.strategy",
    "request.required.acks",
    "request.timeout.ms",
    "retries",
    "sticky.partitioning.linger.ms",
    "transaction.timeout.ms",
    "transactional.id",
];

/// Whether another client of the bridge (the probe's, the replay's consumer) takes option
/// `key` of the producer's: all but the producer's own, its statistics and its name.
pub fn is_shared(key: &str) -> bool {
    !PRODUCER_ONLY.contains(&key) && key != "statistics.interval.ms" && key != "client.id"
}

/// The producer's `retry.backoff.ms`, unless `kafka.librdkafka` sets another.
pub const RETRY_BACKOFF_MS: &str = "50";

/// librdkafka's partitioners that send every record of one key to one partition (the
/// default, `murmur2_random`, places keys as the Java client does).
pub const KEY_CONSISTENT_PARTITIONERS: &[&str] = &[
    "murmur2_random",
    "murmur2",
    "consistent_random",
    "consistent",
    "fnv1a_random",
    "fnv1a",
];

fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Every reason the `kafka` settings cannot make a producer, each naming its setting.
pub fn check(k: &Kafka) -> Vec<SettingsError> {
    let mut errors = Vec::new();
    for (key, instead) in RESERVED {
        if k.librdkafka.contains_key(*key) {
            errors.push(invalid(
                "kafka.librdkafka",
                format!("`{key}` is the bridge's own; set {instead}"),
            ));
        }
    }
    if let Some(partitioner) = k.librdkafka.get("partitioner") {
        if !KEY_CONSISTENT_PARTITIONERS.contains(&partitioner.as_str()) {
            errors.push(invalid(
                "kafka.librdkafka",
                format!(
                    "`partitioner` = `{}` would not send every record of a ticket to one \
                     partition, which per-ticket order needs; use one of {}",
                    partitioner.chars().take(40).collect::<String>(),
                    KEY_CONSISTENT_PARTITIONERS.join(", ")
                ),
            ));
        }
    }
    if let Err(e) = check_security(k) {
        errors.push(e);
    }
    errors
}

/// The producer's configuration, or every reason it cannot be made.
pub fn build(kafka: &Kafka, max_body_bytes: usize) -> Result<ClientConfig, Vec<SettingsError>> {
    let errors = check(kafka);
    if errors.is_empty() {
        Ok(producer_config(kafka, &kafka.brokers, max_body_bytes))
    } else {
        Err(errors)
    }
}

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
        // Batching without a timer: a record goes out at once when no produce request is in
        // flight to its broker, and the records that arrive while one is travel together in
        // the next. A lone sender waits for no linger; under load the batches grow by
        // themselves (benches/load.rs, docs/performance.md).
        .set("linger.ms", "0")
        .set("max.in.flight.requests.per.connection", "1")
        .set("socket.nagle.disable", "true")
        .set("allow.auto.create.topics", "false")
        // Also how soon readiness sees the producer id once it is assigned.
        .set("statistics.interval.ms", "1000")
        // Every request's own deadline, the broker's (acks) below the client's: a request to
        // a leader that froze, or to a broker shutting down (which stops reading its
        // connections before it closes them), is given up after 1.5 s instead of the
        // record's whole delivery timeout (librdkafka caps a request at the first record's
        // remaining message.timeout.ms and at socket.timeout.ms, 60 s by default: the 21 s
        // answers of a rolling restart). Giving it up drops the connection; librdkafka then
        // sends the records again, to the new leader once the metadata names it
        // (tests/broker_faults.rs: a rolling restart, a frozen leader).
        .set("socket.timeout.ms", "1500")
        .set("request.timeout.ms", "1000")
        // A record sent again, and the partition's leader looked up again, after 50 ms at
        // first and 250 ms at most (librdkafka: 100 ms and 1 s).
        .set("retry.backoff.ms", RETRY_BACKOFF_MS)
        .set("retry.backoff.max.ms", "250")
        // Reconnect promptly after a broker returns, so readiness recovers within seconds.
        .set("reconnect.backoff.max.ms", "1000")
        // Half of it (at least 11 ms) is how long librdkafka waits between connecting to
        // one broker and the next when none is up: at start, after the bootstrap
        // connection, before the first broker a record or the producer id needs (100 ms,
        // librdkafka's default, would keep the first records waiting 50 ms). Backoffs
        // after a lost connection still double up to the maximum.
        .set("reconnect.backoff.ms", "20")
        .set("client.id", "tamio-kafka-bridge");
    with_security(&mut cfg, kafka);
    for (k, v) in &kafka.librdkafka {
        cfg.set(k, v);
    }
    cfg
}

/// The options of `replay`'s consumer of the dead-letter topic in `group`: the brokers and
/// security of the `kafka` settings, with every option of `kafka.librdkafka` that is not the
/// producer's own ([`is_shared`]), so that it connects as the producer does; offsets
/// committed by hand, after each record's outcome. A partition's end is found from the high
/// watermark of the fetch answers (partition-end events are not used: librdkafka reports
/// some as global errors, outside the stream of the partition's records).
pub fn consumer_config(kafka: &Kafka, group: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers)
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "1000");
    with_security(&mut cfg, kafka);
    for (k, v) in &kafka.librdkafka {
        if is_shared(k) {
            cfg.set(k, v);
        }
    }
    // The consumer's own, whatever the pass-through says.
    cfg.set("group.id", group)
        .set("client.id", "tamio-kafka-bridge-replay")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false");
    cfg
}

/// TLS and SASL from `kafka.tls` and `kafka.sasl`.
fn with_security(cfg: &mut ClientConfig, kafka: &Kafka) {
    cfg.set("security.protocol", kafka.security_protocol());
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
}

/// Checks the `kafka.tls` and `kafka.sasl` settings and their files.
fn check_security(k: &Kafka) -> Result<(), SettingsError> {
    let tls = &k.tls;
    let set = |p: &PathBuf| !p.as_os_str().is_empty();
    if !tls.enabled && (set(&tls.ca_file) || set(&tls.cert_file) || set(&tls.key_file)) {
        return Err(invalid(
            "kafka.tls.enabled",
            "kafka.tls files are set but TLS is off: set kafka.tls.enabled = true",
        ));
    }
    if set(&tls.ca_file) {
        check_pem_file(&tls.ca_file, "CERTIFICATE").map_err(|r| invalid("kafka.tls.ca_file", r))?;
    }
    if set(&tls.cert_file) != set(&tls.key_file) {
        return Err(invalid(
            "kafka.tls.key_file",
            "kafka.tls.cert_file and kafka.tls.key_file are set together or not at all",
        ));
    }
    if !tls.key_password.expose().is_empty() && !set(&tls.key_file) {
        return Err(invalid(
            "kafka.tls.key_password",
            "is for an encrypted kafka.tls.key_file, and none is set",
        ));
    }
    if set(&tls.cert_file) {
        check_pem_file(&tls.cert_file, "CERTIFICATE")
            .map_err(|r| invalid("kafka.tls.cert_file", r))?;
        check_pem_file(&tls.key_file, "PRIVATE KEY")
            .map_err(|r| invalid("kafka.tls.key_file", r))?;
    }
    let sasl = &k.sasl;
    match sasl.mechanism {
        Some(_) => {
            if sasl.username.is_empty() {
                return Err(invalid(
                    "kafka.sasl.username",
                    "must be set with kafka.sasl.mechanism",
                ));
            }
            if sasl.password.expose().is_empty() {
                return Err(invalid(
                    "kafka.sasl.password",
                    "must be set (or kafka.sasl.password_file) with kafka.sasl.mechanism",
                ));
            }
        }
        None if !sasl.username.is_empty() || !sasl.password.expose().is_empty() => {
            return Err(invalid(
                "kafka.sasl.mechanism",
                "a SASL username or password is set but no mechanism: set PLAIN, \
                 SCRAM-SHA-256 or SCRAM-SHA-512",
            ));
        }
        None => {}
    }
    if tls.enabled || sasl.mechanism.is_some() {
        for key in k.librdkafka.keys() {
            if key == "security.protocol" || key.starts_with("ssl.") || key.starts_with("sasl.") {
                return Err(invalid(
                    "kafka.librdkafka",
                    format!("`{key}` conflicts with kafka.tls / kafka.sasl: use one or the other"),
                ));
            }
        }
    }
    Ok(())
}

/// The producer's context: turns librdkafka's statistics into metrics and notices fatal
/// errors. librdkafka's own log lines reach `tracing` through rdkafka's `tracing` feature.
pub struct StatsContext {
    metrics: Arc<Metrics>,
    /// Last cumulative (errors, retries) seen per broker, to count the increase.
    last: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
    /// Set when librdkafka reports a fatal error: this producer can deliver nothing more.
    fatal: Arc<AtomicBool>,
    /// The producer id librdkafka holds, from its statistics; -1 while it has none.
    producer_id: Arc<AtomicI64>,
    /// Where the last error on a connection is kept, for the readiness probe to name.
    last_error: Arc<LastError>,
    /// Whether every broker is down.
    reach: Arc<Reach>,
}

impl StatsContext {
    /// A context counting into `metrics` that sets `fatal` when librdkafka reports a fatal
    /// error, `producer_id` to the producer id its statistics show (-1: none), and keeps
    /// other errors in `last_error`.
    pub fn new(
        metrics: Arc<Metrics>,
        fatal: Arc<AtomicBool>,
        producer_id: Arc<AtomicI64>,
        last_error: Arc<LastError>,
        reach: Arc<Reach>,
    ) -> StatsContext {
        StatsContext {
            metrics,
            last: Default::default(),
            fatal,
            producer_id,
            last_error,
            reach,
        }
    }
}

impl ClientContext for StatsContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(%reason, "the Kafka producer hit a fatal error; it will be replaced");
            self.fatal.store(true, Ordering::SeqCst);
        } else {
            tracing::warn!(%error, %reason, "Kafka client error");
            // librdkafka's reason names the broker and the cause (e.g. "SASL authentication
            // error: ..." or "SSL handshake failed: ..."), never a secret. "All brokers are
            // down" follows the cause and would hide it.
            if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
                self.reach.went_down();
            } else {
                self.last_error.remember(reason.to_owned());
            }
        }
    }

    fn stats(&self, stats: Statistics) {
        // Once assigned, the id stays (an epoch bump after a broker's death keeps it, and the
        // producer recovers by itself): readiness waits only for the first.
        if let Some(eos) = &stats.eos {
            if eos.producer_id >= 0 {
                self.producer_id.store(eos.producer_id, Ordering::Relaxed);
            }
        }
        let m = &self.metrics;
        m.producer_queue_messages.set(stats.msg_cnt as i64);
        m.producer_queue_bytes.set(stats.msg_size as i64);
        if stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP")
        {
            self.reach.one_up();
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
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

/// A handle of the producer. Dropping a producer's last handle purges it, waits up to
/// 500 ms for its reports and joins librdkafka's threads: when that last handle goes on the
/// async runtime, the producer is dropped on a thread of its own instead, so that no
/// runtime worker ever blocks on it.
#[derive(Clone)]
pub struct BridgeProducer(Arc<Retiring>);

struct Retiring(Option<FutureProducer<StatsContext>>);

impl BridgeProducer {
    pub fn new(producer: FutureProducer<StatsContext>) -> BridgeProducer {
        BridgeProducer(Arc::new(Retiring(Some(producer))))
    }
}

impl std::ops::Deref for BridgeProducer {
    type Target = FutureProducer<StatsContext>;

    fn deref(&self) -> &Self::Target {
        self.0 .0.as_ref().expect("taken only when dropped")
    }
}

impl Drop for Retiring {
    fn drop(&mut self) {
        let Some(producer) = self.0.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // If no thread can be made, the closure (and the producer) is dropped here.
            let _ = std::thread::Builder::new()
                .name("producer-retired".into())
                .spawn(move || drop(producer));
        }
    }
}

/// What the producer's own connections show of the brokers, shared by every producer the
/// publisher makes and read by the deliveries and the probe: every broker down (librdkafka's
/// ALL_BROKERS_DOWN, which it reports within a connection attempt of the last one going,
/// once one was up), until one is up again (its statistics, every second). Each change, and
/// each probe that leaves records refused, wakes the deliveries waiting for their verdict.
pub struct Reach {
    all_down: AtomicBool,
    ever_up: AtomicBool,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Reach {
    fn default() -> Reach {
        Reach {
            all_down: AtomicBool::new(false),
            ever_up: AtomicBool::new(false),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Reach {
    /// Whether every broker's connection is down.
    pub fn all_down(&self) -> bool {
        self.all_down.load(Ordering::Relaxed)
    }

    /// Wakes the deliveries waiting for their verdict.
    pub fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn went_down(&self) {
        // Not before a first broker was up: at start, connections are still being made.
        if self.ever_up.load(Ordering::Relaxed) && !self.all_down.swap(true, Ordering::Relaxed) {
            tracing::warn!("every broker's connection is down: deliveries are refused at once");
            self.bump();
        }
    }

    fn one_up(&self) {
        self.ever_up.store(true, Ordering::Relaxed);
        self.back_up();
    }

    /// A broker answered again (the producer's statistics, or the readiness probe).
    pub fn back_up(&self) {
        if self.all_down.swap(false, Ordering::Relaxed) {
            tracing::info!("a broker answers again: deliveries are taken");
        }
    }
}

/// How long a connection error is shown as the likely cause of brokers not answering
/// (librdkafka reports an identical error again only every 30 s).
const ERROR_RECENT: Duration = Duration::from_secs(300);

/// The last error librdkafka reported on a connection of the producer (an authentication
/// refused, a certificate not trusted or expired), so that the probe's "no broker answered"
/// can say why. librdkafka's error texts name the broker and the cause, never a secret.
#[derive(Default)]
pub struct LastError(Mutex<Option<(String, Instant)>>);

impl LastError {
    /// The error, if recent.
    pub fn recent(&self) -> Option<String> {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(_, at)| at.elapsed() < ERROR_RECENT)
            .map(|(e, _)| e.clone())
    }

    pub fn remember(&self, mut text: String) {
        // Shown by /readyz: cut to a bound, at a character boundary.
        if text.len() > 400 {
            let mut end = 400;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((text, Instant::now()));
    }
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
}

#[cfg(test)]
mod retiring {
    use super::*;
    use rdkafka::producer::FutureRecord;
    use std::time::{Duration, Instant};

    /// A producer with a record queued for a broker that accepts connections and never
    /// answers.
    fn stuck_producer(silent: &std::net::TcpListener) -> FutureProducer<StatsContext> {
        let producer: FutureProducer<StatsContext> = ClientConfig::new()
            .set(
                "bootstrap.servers",
                silent.local_addr().unwrap().to_string(),
            )
            .set("message.timeout.ms", "10000")
            .create_with_context(StatsContext::new(
                Arc::new(Metrics::default()),
                Arc::default(),
                Arc::new(AtomicI64::new(-1)),
                Arc::default(),
                Arc::default(),
            ))
            .unwrap();
        let _ = producer.send_result(FutureRecord::<[u8], [u8]>::to("t").payload(b"x"));
        std::thread::sleep(Duration::from_millis(300));
        producer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_producers_last_handle_dropped_on_the_runtime_does_not_block_it() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Dropped in place, a producer waits for its reports and joins its threads.
        let raw = stuck_producer(&silent);
        let started = Instant::now();
        drop(raw);
        let in_place = started.elapsed();
        let handle = BridgeProducer::new(stuck_producer(&silent));
        let copy = handle.clone();
        drop(handle);
        let started = Instant::now();
        drop(copy);
        let retired = started.elapsed();
        println!("dropped in place: {in_place:?}; last handle on the runtime: {retired:?}");
        assert!(
            retired < Duration::from_millis(20) && in_place > retired * 5,
            "in place {in_place:?}, last handle {retired:?}"
        );
    }
}
