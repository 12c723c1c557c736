//! The readiness probe: a Kafka client of its own asks for the metadata of every topic the
//! bridge writes to, and for their `min.insync.replicas`, and tells which partitions can take
//! records; and the producer's warm-up.
//!
//! The probe's client has connections of its own: a broker answers a connection's requests
//! in order, and a metadata request queued behind a produce request that waits for a dead
//! follower to leave the in-sync replicas (up to `broker.session.timeout.ms`) would time out
//! though the broker is up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::util::Timeout;

use super::producer::{is_shared, LastError};

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
    /// No partition of a topic can take records (no leader, or too few in-sync replicas).
    NoWritablePartition,
    /// The producer has no producer id yet: it could not write (the cluster's transaction
    /// coordinator may still be loading).
    NoProducerId,
    /// With `kafka.exactly_once`: no transaction can be opened, or the open one cannot be
    /// committed (the transaction coordinator does not answer, or refuses).
    TransactionsStalled,
    /// The probe itself could not run.
    Internal,
}

impl ProbeFailure {
    pub const ALL: [ProbeFailure; 8] = [
        ProbeFailure::NoBroker,
        ProbeFailure::TopicMissing,
        ProbeFailure::TopicUnavailable,
        ProbeFailure::NoPartitions,
        ProbeFailure::NoWritablePartition,
        ProbeFailure::NoProducerId,
        ProbeFailure::TransactionsStalled,
        ProbeFailure::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeFailure::NoBroker => "no_broker",
            ProbeFailure::TopicMissing => "topic_missing",
            ProbeFailure::TopicUnavailable => "topic_unavailable",
            ProbeFailure::NoPartitions => "no_partitions",
            ProbeFailure::NoWritablePartition => "no_writable_partition",
            ProbeFailure::NoProducerId => "no_producer_id",
            ProbeFailure::TransactionsStalled => "transactions_stalled",
            ProbeFailure::Internal => "internal",
        }
    }

    /// Whether records should be refused at once while it lasts: only when no broker
    /// answers the probe's own client. A missing topic is left to librdkafka to report per
    /// record; partitions that cannot take records are refused one by one.
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
    /// The error Kafka gave for a topic, when it gave one (e.g. not authorized).
    pub code: Option<RDKafkaErrorCode>,
}

impl ProbeError {
    pub fn new(failure: ProbeFailure, detail: impl Into<String>) -> ProbeError {
        ProbeError {
            failure,
            detail: detail.into(),
            code: None,
        }
    }
}

/// Whether a partition can take records, as the last probe saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    Writable,
    /// No leader: being elected (librdkafka waits for it; records are not refused).
    NoLeader,
    /// Fewer in-sync replicas than `min.insync.replicas`: Kafka refuses every record with
    /// `acks=all` until the replicas catch up.
    TooFewReplicas {
        in_sync: usize,
        min: usize,
    },
}

impl PartitionState {
    pub fn reason(self) -> Option<&'static str> {
        match self {
            PartitionState::Writable => None,
            PartitionState::NoLeader => Some("no_leader"),
            PartitionState::TooFewReplicas { .. } => Some("too_few_in_sync_replicas"),
        }
    }
}

/// Every probed topic's partitions, by partition id, and the topics the probe could not find
/// or use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub topics: HashMap<String, Vec<PartitionState>>,
    /// Topics missing from the metadata, not authorized, or without partitions: why, for
    /// each. Their records are refused at once: none could be written.
    pub missing: HashMap<String, ProbeError>,
    /// How the producer places a key (the probe looks up a key's partition the same way).
    pub partitioner: Partitioner,
}

impl Health {
    /// The state of the partition `key` goes to (the configured partitioner's choice), when
    /// the topic was probed.
    pub fn of_key(&self, topic: &str, key: &[u8]) -> Option<(i32, PartitionState)> {
        let partitions = self.topics.get(topic)?;
        let p = self.partitioner.partition(key, partitions.len())?;
        Some((p as i32, partitions[p]))
    }

    /// Partitions that cannot take records, each in a phrase for `/readyz`.
    pub fn degraded(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut topics: Vec<&String> = self.topics.keys().collect();
        topics.sort();
        for topic in topics {
            for (p, state) in self.topics[topic].iter().enumerate() {
                match state {
                    PartitionState::Writable => {}
                    PartitionState::NoLeader => out.push(format!("{topic}[{p}]: no leader")),
                    PartitionState::TooFewReplicas { in_sync, min } => out.push(format!(
                        "{topic}[{p}]: {in_sync} in-sync replica(s), min.insync.replicas is {min}"
                    )),
                }
            }
        }
        out
    }

    /// Whether any record may be refused: a topic missing, or a partition that cannot take
    /// records.
    pub fn any_degraded(&self) -> bool {
        !self.missing.is_empty()
            || self
                .topics
                .values()
                .any(|ps| ps.iter().any(|s| *s != PartitionState::Writable))
    }
}

/// librdkafka's key-consistent partitioners, by the hash each places a key with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Partitioner {
    /// `murmur2_random` (the bridge's default) and `murmur2`: the Java client's placement.
    #[default]
    Murmur2,
    /// `consistent_random` (an empty key goes to a random partition) and `consistent`: CRC-32.
    Crc32 { empty_is_random: bool },
    /// `fnv1a_random` and `fnv1a`: FNV-1a, as Sarama places keys.
    Fnv1a,
}

impl Partitioner {
    /// The partitioner librdkafka's `partitioner` option names; None for one that does not
    /// place keys consistently (the settings refuse those).
    pub fn named(name: &str) -> Option<Partitioner> {
        Some(match name {
            "murmur2_random" | "murmur2" => Partitioner::Murmur2,
            "consistent_random" => Partitioner::Crc32 {
                empty_is_random: true,
            },
            "consistent" => Partitioner::Crc32 {
                empty_is_random: false,
            },
            "fnv1a_random" | "fnv1a" => Partitioner::Fnv1a,
            _ => return None,
        })
    }

    /// The partition of `count` that librdkafka sends `key` to; None when it picks one at
    /// random or there are none.
    pub fn partition(self, key: &[u8], count: usize) -> Option<usize> {
        if count == 0 {
            return None;
        }
        let hash = match self {
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) as u32,
            Partitioner::Crc32 {
                empty_is_random: true,
            } if key.is_empty() => return None,
            Partitioner::Crc32 { .. } => crc32(key),
            Partitioner::Fnv1a => fnv1a(key),
        };
        Some(hash as usize % count)
    }
}

/// CRC-32 (IEEE), librdkafka's `rd_crc32`, of the `consistent` partitioners.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// librdkafka's `rd_fnv1a`: 32-bit FNV-1a, made non-negative as Sarama does.
pub fn fnv1a(data: &[u8]) -> u32 {
    let mut h: i32 = 0x811c_9dc5_u32 as i32;
    for &byte in data {
        h ^= i32::from(byte);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.wrapping_abs() as u32
}

/// Kafka's murmur2 (the Java client's and librdkafka's `murmur2_random` partitioner).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// How long a topic's `min.insync.replicas` is kept before it is asked again.
const MIN_ISR_FOR: Duration = Duration::from_secs(60);

/// The options of the probe's client: every option of the producer's `config` but the
/// producer's own ([`is_shared`]), so that it connects as the producer does, with requests
/// that time out after `timeout`.
fn probe_config(config: &ClientConfig, timeout: Duration) -> ClientConfig {
    let mut own = ClientConfig::new();
    // `config_map` shows secrets as a placeholder: the values come from `get`.
    for k in config.config_map().into_keys() {
        if let (true, Some(v)) = (is_shared(k), config.get(k)) {
            own.set(k, v);
        }
    }
    own.set("client.id", "tamio-kafka-bridge-probe");
    // librdkafka sends a metadata request to the broker it used last: a request to a
    // frozen broker must time out in librdkafka too (which then drops that connection),
    // not only for the caller, or every probe would wait on the same broker.
    own.set(
        "socket.timeout.ms",
        timeout.as_millis().max(100).to_string(),
    );
    own
}

/// How long a check of the brokers' certificate is taken as still true.
const DIAGNOSIS_FOR: Duration = Duration::from_secs(30);

/// A broker whose TLS certificate can be checked the way librdkafka checks it: against the
/// CA file, or the system's CAs.
struct TlsTarget {
    /// `host:port` of the first bootstrap broker.
    address: String,
    ca_file: Option<String>,
}

impl TlsTarget {
    /// The target of a client with `config`, when it speaks TLS and verifies the brokers.
    fn of(config: &ClientConfig) -> Option<TlsTarget> {
        let protocol = config.get("security.protocol")?.to_ascii_lowercase();
        if !protocol.ends_with("ssl")
            || config.get("enable.ssl.certificate.verification") == Some("false")
        {
            return None;
        }
        let first = config.get("bootstrap.servers")?.split(',').next()?.trim();
        let address = first.rsplit_once("://").map_or(first, |(_, a)| a);
        Some(TlsTarget {
            address: address.to_owned(),
            ca_file: config.get("ssl.ca.location").map(str::to_owned),
        })
    }

    /// Connects and verifies the broker's certificate chain with rustls; why it is refused
    /// (e.g. "invalid peer certificate: certificate expired: ..."), or None when it is not,
    /// or the check could not be made.
    fn check(&self, within: Duration) -> Option<String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        use std::net::ToSocketAddrs;
        let (host, _) = self.address.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path).ok()? {
                    roots.add(cert.ok()?).ok()?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(host.to_owned()).ok()?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
        let addr = self.address.to_socket_addrs().ok()?.next()?;
        let mut socket = std::net::TcpStream::connect_timeout(&addr, within).ok()?;
        socket.set_read_timeout(Some(within)).ok()?;
        socket.set_write_timeout(Some(within)).ok()?;
        while conn.is_handshaking() {
            if let Err(err) = conn.complete_io(&mut socket) {
                // Only the certificate's verdict: a broker that then wants a client
                // certificate, which this check does not present, says nothing of it.
                return match err
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>())
                {
                    Some(e @ rustls::Error::InvalidCertificate(_)) => Some(e.to_string()),
                    _ => None,
                };
            }
        }
        None
    }
}

/// The readiness probe's own client.
pub struct ProbeClient {
    admin: AdminClient<DefaultClientContext>,
    /// The producer's last connection error.
    last_error: Arc<LastError>,
    /// Where the brokers' certificates are checked, when they are.
    tls: Option<TlsTarget>,
    /// The producer's partitioner.
    partitioner: Partitioner,
    /// Why the brokers' certificate was refused, as checked here, and when.
    diagnosis: Mutex<Option<(Option<String>, Instant)>>,
    /// Each topic's `min.insync.replicas` (None: it could not be read; 1 is assumed) and when
    /// it was read.
    min_isr: Mutex<HashMap<String, (Option<usize>, Instant)>>,
}

impl ProbeClient {
    /// A client with the connection options of the producer's `config`, whose requests time
    /// out after `timeout`.
    pub fn new(
        config: &ClientConfig,
        timeout: Duration,
        last_error: Arc<LastError>,
    ) -> Result<ProbeClient, KafkaError> {
        Ok(ProbeClient {
            admin: probe_config(config, timeout).create()?,
            last_error,
            tls: TlsTarget::of(config),
            partitioner: config
                .get("partitioner")
                .and_then(Partitioner::named)
                .unwrap_or_default(),
            diagnosis: Mutex::new(None),
            min_isr: Mutex::new(HashMap::new()),
        })
    }

    /// Probes `topics` within `timeout` each: every partition's state seen, every topic that
    /// cannot be written marked, and why the bridge cannot take records, if it cannot (the
    /// first cause found). Every topic is probed whatever the ones before it showed; only
    /// when no broker answers is nothing known. Blocks: run it off the async runtime.
    pub fn probe(
        &self,
        topics: &[String],
        timeout: Duration,
        attempts: usize,
    ) -> (Health, Option<ProbeError>) {
        let mut health = Health {
            partitioner: self.partitioner,
            ..Health::default()
        };
        let mut failed = None;
        for topic in topics {
            let min = self.min_isr(topic, timeout).unwrap_or(1);
            // A broker that does not answer was dropped by the timeout: others are asked
            // before "no broker answered" is said (`attempts` in all): a frozen broker's
            // kernel still accepts a new connection, which librdkafka may pick again.
            let mut asked = self.partitions(topic, min, timeout);
            for _ in 1..attempts {
                match &asked {
                    Err(e) if e.failure == ProbeFailure::NoBroker => {
                        asked = self.partitions(topic, min, timeout);
                    }
                    _ => break,
                }
            }
            let states = match asked {
                Ok(states) => states,
                Err(e) if e.failure == ProbeFailure::NoBroker => {
                    return (
                        Health {
                            partitioner: self.partitioner,
                            ..Health::default()
                        },
                        Some(e),
                    )
                }
                Err(e) => {
                    failed.get_or_insert_with(|| e.clone());
                    health.missing.insert(topic.clone(), e);
                    continue;
                }
            };
            if failed.is_none() && states.iter().all(|s| *s != PartitionState::Writable) {
                let mut h = Health::default();
                h.topics.insert(topic.clone(), states.clone());
                failed = Some(ProbeError::new(
                    ProbeFailure::NoWritablePartition,
                    format!(
                        "no partition of `{topic}` can take records: {}",
                        h.degraded().join("; ")
                    ),
                ));
            }
            health.topics.insert(topic.clone(), states);
        }
        (health, failed)
    }

    /// When librdkafka could not verify a broker's certificate (OpenSSL says no more than
    /// "certificate verify failed"), why: the first bootstrap broker's certificate checked
    /// against the same CAs, once every [`DIAGNOSIS_FOR`]. Blocks for up to a handshake.
    fn certificate_diagnosis(&self, cause: &str) -> Option<String> {
        let target = self.tls.as_ref()?;
        if !cause.contains("certificate verify failed") {
            return None;
        }
        let mut diagnosis = self.diagnosis.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((why, at)) = diagnosis.as_ref() {
            if at.elapsed() < DIAGNOSIS_FOR {
                return why.clone();
            }
        }
        let why = target.check(Duration::from_secs(2));
        if let Some(why) = &why {
            tracing::error!(broker = %target.address, %why, "the broker's TLS certificate is refused");
        }
        *diagnosis = Some((why.clone(), Instant::now()));
        why
    }

    fn partitions(
        &self,
        topic: &str,
        min: usize,
        timeout: Duration,
    ) -> Result<Vec<PartitionState>, ProbeError> {
        let md = self
            .admin
            .inner()
            .fetch_metadata(Some(topic), Timeout::After(timeout))
            .map_err(|e| {
                let why = match self.last_error.recent() {
                    Some(cause) => match self.certificate_diagnosis(&cause) {
                        Some(checked) => format!(
                            " (last connection error: {cause}; the broker's certificate, \
                             checked by the bridge: {checked})"
                        ),
                        None => format!(" (last connection error: {cause})"),
                    },
                    None => String::new(),
                };
                ProbeError::new(
                    ProbeFailure::NoBroker,
                    format!("no broker answered a metadata request: {e}{why}"),
                )
            })?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Err(ProbeError::new(
                ProbeFailure::TopicMissing,
                format!("topic `{topic}` is missing from the metadata"),
            ));
        };
        if let Some(err) = t.error() {
            return Err(ProbeError {
                code: Some(RDKafkaErrorCode::from(err)),
                ..ProbeError::new(
                    ProbeFailure::TopicUnavailable,
                    format!(
                        "topic `{topic}` is not available: {}",
                        RDKafkaErrorCode::from(err)
                    ),
                )
            });
        }
        if t.partitions().is_empty() {
            return Err(ProbeError::new(
                ProbeFailure::NoPartitions,
                format!("topic `{topic}` has no partitions"),
            ));
        }
        let mut states = vec![PartitionState::NoLeader; t.partitions().len()];
        for p in t.partitions() {
            let Some(slot) = usize::try_from(p.id()).ok().and_then(|i| states.get_mut(i)) else {
                continue;
            };
            // Kafka holds a partition to min.insync.replicas or its replica count, whichever
            // is less (its `effectiveMinIsr`): one replica with min.insync.replicas=2 takes
            // records.
            let min = min.min(p.replicas().len().max(1));
            *slot = if p.leader() < 0 || p.error().is_some() {
                PartitionState::NoLeader
            } else if p.isr().len() < min {
                PartitionState::TooFewReplicas {
                    in_sync: p.isr().len(),
                    min,
                }
            } else {
                PartitionState::Writable
            };
        }
        Ok(states)
    }

    /// The topic's `min.insync.replicas`, read at most once a minute; None when it cannot
    /// be read (no DESCRIBE_CONFIGS on the topic).
    fn min_isr(&self, topic: &str, timeout: Duration) -> Option<usize> {
        if let Some((min, at)) = self
            .min_isr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            if at.elapsed() < MIN_ISR_FOR {
                return *min;
            }
        }
        let read = block_on(self.admin.describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(timeout)),
        ));
        let min = read.ok().and_then(|results| {
            results
                .into_iter()
                .next()?
                .ok()?
                .entries
                .into_iter()
                .find_map(|e| {
                    (e.name == "min.insync.replicas")
                        .then(|| e.value?.parse().ok())
                        .flatten()
                })
        });
        if min.is_none() {
            tracing::debug!(topic, "min.insync.replicas could not be read; 1 assumed");
        }
        self.min_isr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), (min, Instant::now()));
        min
    }
}

/// Waits for an admin future on this (blocking) thread: librdkafka's background thread
/// completes it.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_shares_the_producers_connection_and_its_secrets() {
        let mut producer = ClientConfig::new();
        producer
            .set("bootstrap.servers", "k1:9092")
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "alice")
            .set("sasl.password", "pw-61f0")
            .set("ssl.key.password", "key-pw")
            .set("acks", "all")
            .set("transactional.id", "t");
        let probe = probe_config(&producer, Duration::from_secs(3));
        assert_eq!(probe.get("sasl.password"), Some("pw-61f0"));
        assert_eq!(probe.get("ssl.key.password"), Some("key-pw"));
        assert_eq!(probe.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(probe.get("bootstrap.servers"), Some("k1:9092"));
        assert_eq!(probe.get("socket.timeout.ms"), Some("3000"));
        assert_eq!(probe.get("acks"), None);
        assert_eq!(probe.get("transactional.id"), None);
    }

    #[test]
    fn murmur2_is_kafkas() {
        // Kafka's own test vectors (clients' UtilsTest).
        for (text, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(text.as_bytes()), hash, "{text}");
        }
    }

    #[test]
    fn a_key_finds_its_partitions_state() {
        let mut health = Health::default();
        health.topics.insert(
            "t".into(),
            vec![
                PartitionState::Writable,
                PartitionState::TooFewReplicas { in_sync: 1, min: 2 },
                PartitionState::Writable,
            ],
        );
        // toPositive(murmur2("abc")) % 3 == 479470107 % 3 == 0.
        assert_eq!(
            health.of_key("t", b"abc"),
            Some((0, PartitionState::Writable))
        );
        assert!(health.any_degraded());
        assert_eq!(
            health.degraded(),
            ["t[1]: 1 in-sync replica(s), min.insync.replicas is 2"]
        );
        assert_eq!(health.of_key("other", b"abc"), None);
    }
}
