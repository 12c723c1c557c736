//! The Kafka producer: hands each record to librdkafka and waits for the delivery report, so
//! that the sender is answered only once Kafka has the event.
//!
//! The producer is idempotent with `acks=all`: librdkafka keeps the order of the records of
//! one partition across its own retries, and the record key (the ticket id) picks the
//! partition with the Java client's murmur2 hash, so consumers and other producers agree on
//! where a ticket lives.

mod outcome;
pub mod probe;
pub mod producer;
pub mod record;
pub mod txn;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::finish::Finish;
use crate::metrics::Metrics;
pub use outcome::{with_deadline, Delivered, DeliveryFailure, PublishError};
use probe::{Health, PartitionState, ProbeClient, ProbeError, ProbeFailure};
use producer::{BridgeProducer, LastError, Reach, StatsContext, WarmUp};
use record::{DeadLetter, Record};
use txn::{
    end_transaction, txn_is_fatal, txn_step, OpenTxn, TRANSACTION_TIMEOUT_MS, TXN_CLOSED_FOR,
    TXN_FATAL, TXN_TIMEOUT_MS, TXN_UNKNOWN,
};
pub use txn::{GroupCommit, Txn, TxnError};

/// The current producer, its fatal-error flag and its warm-up.
#[derive(Clone)]
struct Current {
    producer: BridgeProducer,
    fatal: Arc<AtomicBool>,
    /// Told at the first delivery (the producer has its id) or a fatal error.
    warm_up: Arc<WarmUp>,
    /// When it was made, if it replaced a dead one.
    replaced_at: Option<std::time::Instant>,
    /// Its producer id, from its statistics (-1: none yet).
    producer_id: Arc<AtomicI64>,
}

/// A replacement that dies in turn is replaced no sooner than this after it was made: an
/// error that kills every new producer at once (e.g. no authorization for a producer id)
/// then rebuilds it at most twice a second instead of in a loop. The first replacement is
/// built at once.
const MIN_REPLACEMENT_LIFETIME: Duration = Duration::from_millis(500);

/// A new producer, and a thread that gets it its producer id at once (see
/// [`WarmUp`]).
fn create(
    config: &ClientConfig,
    metrics: &Arc<Metrics>,
    topic: &Arc<str>,
    last_error: &Arc<LastError>,
    reach: &Arc<Reach>,
) -> Result<Current, KafkaError> {
    let fatal = Arc::new(AtomicBool::new(false));
    let producer_id = Arc::new(AtomicI64::new(-1));
    let context = StatsContext::new(
        metrics.clone(),
        fatal.clone(),
        producer_id.clone(),
        last_error.clone(),
        reach.clone(),
    );
    let producer = BridgeProducer::new(config.create_with_context(context)?);
    Ok(Current {
        warm_up: WarmUp::start(producer.clone(), topic.clone()),
        producer,
        fatal,
        replaced_at: None,
        producer_id,
    })
}

/// Shared by every request: the producer in force and what it takes to replace it.
pub struct Publisher {
    /// Replaced as a whole when librdkafka declares the producer dead (a fatal error, e.g. a
    /// fenced idempotent producer): records then go to a fresh producer with a new id.
    current: std::sync::RwLock<Current>,
    /// Held while a dead producer is being replaced.
    replacing: tokio::sync::Mutex<()>,
    config: Arc<ClientConfig>,
    metrics: Arc<Metrics>,
    /// The topic a new producer asks the metadata of while it warms up.
    topic: Arc<str>,
    /// False while the readiness probe finds no broker answering: records are then refused
    /// at once instead of waiting out the delivery timeout.
    reachable: AtomicBool,
    /// The readiness probe's own client; renewed with the producer.
    probe_client: std::sync::RwLock<Arc<ProbeClient>>,
    /// The last connection error the producer reported, which the probe names.
    last_error: Arc<LastError>,
    /// What the last probe saw of each partition; `degraded` while any cannot take records
    /// (only then is a record's partition looked up).
    health: std::sync::RwLock<Arc<Health>>,
    degraded: AtomicBool,
    /// A transactional producer (the replay's): never replaced, since a replacement would
    /// lose the transaction's state; a fatal error ends its deliveries.
    transactional: bool,
    /// With `kafka.exactly_once`: the transactions deliveries are written in.
    group: std::sync::OnceLock<Arc<GroupCommit>>,
    /// Whether the producer's connections show every broker down; bumped too after each
    /// probe that leaves records refused (no broker answers, a topic missing, a partition
    /// with too few in-sync replicas): deliveries waiting for their verdict look again
    /// ([`Publisher::until_refused`]).
    reach: Arc<Reach>,
}

/// How long a request of the readiness probe's client may take, before librdkafka drops the
/// connection to the broker that does not answer (the probe asks another then).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Publisher {
    /// A producer with `config` (see [`producer::build`]), warmed up with the metadata of
    /// `topic`.
    pub fn new(
        config: ClientConfig,
        metrics: Arc<Metrics>,
        topic: &str,
    ) -> Result<Publisher, KafkaError> {
        let topic: Arc<str> = topic.into();
        let last_error = Arc::new(LastError::default());
        let reach = Arc::new(Reach::default());
        let current = create(&config, &metrics, &topic, &last_error, &reach)?;
        let probe_client = Arc::new(ProbeClient::new(
            &config,
            PROBE_TIMEOUT,
            last_error.clone(),
        )?);
        Ok(Publisher {
            current: std::sync::RwLock::new(current),
            replacing: tokio::sync::Mutex::new(()),
            config: Arc::new(config),
            metrics,
            topic,
            reachable: AtomicBool::new(true),
            probe_client: std::sync::RwLock::new(probe_client),
            last_error,
            health: std::sync::RwLock::new(Arc::new(Health::default())),
            degraded: AtomicBool::new(false),
            transactional: false,
            group: std::sync::OnceLock::new(),
            reach,
        })
    }

    /// A transactional producer with `config` and `transactional.id` `id` (see [`Txn`]).
    pub fn transactional(
        mut config: ClientConfig,
        metrics: Arc<Metrics>,
        topic: &str,
        id: &str,
    ) -> Result<Publisher, KafkaError> {
        config
            .set("transactional.id", id)
            .set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS.to_string());
        let mut publisher = Publisher::new(config, metrics, topic)?;
        publisher.transactional = true;
        Ok(publisher)
    }

    /// The ingress's publisher with `kafka.exactly_once`: a producer with transactional id
    /// `id` whose deliveries are written in transactions committed together, each answered
    /// once its transaction has ended (see [`GroupCommit`]). Starts the committer: call on
    /// the runtime.
    pub fn exactly_once(
        mut config: ClientConfig,
        metrics: Arc<Metrics>,
        topic: &str,
        id: &str,
        linger: Duration,
    ) -> Result<Arc<Publisher>, KafkaError> {
        let delivery: u64 = config
            .get("message.timeout.ms")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(9000);
        // A record in a transaction is answered by the request's deadline at the latest, its
        // claim held until the transaction ends; librdkafka keeps it through a leader's
        // failover (about 10 s on Kafka's defaults) instead of timing it out at the delivery
        // timeout, which would abort the transaction. An open transaction lives longer
        // still: Kafka aborting it would fence the producer. A replica that died with one
        // open has it aborted by Kafka after that, unless its successor (the same id)
        // fences it first.
        let records = 2 * delivery;
        config
            .set("message.timeout.ms", records.to_string())
            .set("transactional.id", id)
            .set(
                "transaction.timeout.ms",
                TXN_TIMEOUT_MS.max(2 * records).to_string(),
            );
        // A transaction begun right after a commit finds its partitions' markers still being
        // written (CONCURRENT_TRANSACTIONS), and librdkafka adds them again after
        // retry.backoff.ms: at its default (100 ms) every transaction would wait that long.
        // Unless `kafka.librdkafka` sets it.
        if config.get("retry.backoff.ms") == Some(producer::RETRY_BACKOFF_MS) {
            config.set("retry.backoff.ms", "5");
        }
        let mut publisher = Publisher::new(config, metrics, topic)?;
        publisher.transactional = true;
        let publisher = Arc::new(publisher);
        let group = Arc::new(GroupCommit::new(linger, publisher.delivery_timeout()));
        tokio::spawn(commit_loop(group.clone(), Arc::downgrade(&publisher)));
        let _ = publisher.group.set(group);
        Ok(publisher)
    }

    /// Replaces a transactional producer that failed for good (fenced, or a fatal error) with
    /// a new one with the same transactional id, whose initialisation fences the old.
    async fn replace_transactional(&self) {
        let _turn = self.replacing.lock().await;
        let (config, metrics, topic, last_error, reach) = self.build_parts();
        match tokio::task::spawn_blocking(move || {
            create(&config, &metrics, &topic, &last_error, &reach)
        })
        .await
        {
            Ok(Ok(fresh)) => {
                let retired = std::mem::replace(
                    &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
                    fresh,
                );
                self.metrics.producer_restarts.inc();
                tracing::warn!("exactly once: replaced the transactional producer");
                std::thread::spawn(move || {
                    retired.warm_up.stop();
                    drop(retired)
                });
            }
            Ok(Err(err)) => tracing::error!(%err, "cannot create a new Kafka producer"),
            Err(err) => tracing::error!(%err, "creating a new Kafka producer failed"),
        }
    }

    /// Whether deliveries are written in transactions (`kafka.exactly_once`).
    pub fn is_exactly_once(&self) -> bool {
        self.group.get().is_some()
    }

    /// The transactions of a transactional producer.
    pub fn txn(&self) -> Txn {
        Txn {
            producer: self.producer(),
        }
    }

    /// Hands the record to librdkafka and waits for Kafka to acknowledge it with `acks=all`:
    /// until `deadline`, or with none until the delivery report (librdkafka reports within
    /// `kafka.delivery_timeout_ms`).
    pub async fn publish(
        &self,
        record: &Record,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Delivered, PublishError> {
        self.deliver(
            record.to_kafka(),
            deadline,
            Counted::Event(record.event_label),
        )
        .await
    }

    /// Writes a refused delivery's raw body to the dead-letter topic, with the error in the
    /// `error` and `error_kind` headers, and waits for Kafka's acknowledgement.
    pub async fn dead_letter(
        &self,
        letter: DeadLetter<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Delivered, PublishError> {
        self.deliver(letter.to_kafka(), Some(deadline), Counted::DeadLetter)
            .await
    }

    /// What a new producer is built from, to take to a blocking thread.
    #[allow(clippy::type_complexity)]
    fn build_parts(
        &self,
    ) -> (
        Arc<ClientConfig>,
        Arc<Metrics>,
        Arc<str>,
        Arc<LastError>,
        Arc<Reach>,
    ) {
        (
            self.config.clone(),
            self.metrics.clone(),
            self.topic.clone(),
            self.last_error.clone(),
            self.reach.clone(),
        )
    }

    /// The producer in force (for probes and flushes, which never replace it).
    fn producer(&self) -> BridgeProducer {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .producer
            .clone()
    }

    /// The producer in force, its fatal flag and its warm-up, replacing it first when
    /// librdkafka declared it dead. No handle of a producer is held across an await here: a
    /// producer replaced meanwhile is dropped by its retiring thread, never by this task.
    async fn live_producer(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(BridgeProducer, Arc<AtomicBool>, Arc<WarmUp>), PublishError> {
        let seen = self.current_parts();
        if !seen.1.load(Ordering::SeqCst) {
            return Ok(seen);
        }
        let (_, seen_fatal, _) = seen;
        if self.transactional {
            return Err(PublishError::Kafka {
                reason: DeliveryFailure::Other,
                detail: "the transactional producer failed for good (fenced by another run \
                         with the same transactional id?)"
                    .into(),
            });
        }
        let waited = tokio::time::Instant::now();
        let Ok(_turn) = with_deadline(deadline, self.replacing.lock()).await else {
            return Err(PublishError::Timeout(waited.elapsed()));
        };
        let replaced_at = {
            let now = self.current.read().unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(&now.fatal, &seen_fatal) {
                // Replaced while this delivery waited for its turn.
                drop(now);
                return Ok(self.current_parts());
            }
            now.warm_up.done();
            now.replaced_at
        };
        if let Some(lived) = replaced_at.map(|at| at.elapsed()) {
            if lived < MIN_REPLACEMENT_LIFETIME {
                let pause = tokio::time::sleep(MIN_REPLACEMENT_LIFETIME - lived);
                if with_deadline(deadline, pause).await.is_err() {
                    return Err(PublishError::Timeout(waited.elapsed()));
                }
            }
        }
        self.replace().await;
        Ok(self.current_parts())
    }

    /// Builds a new producer in place of the dead one (off the runtime), and retires the
    /// dead one on a thread of its own; the dead one stays when no new one can be built.
    async fn replace(&self) {
        tracing::warn!("the Kafka producer is dead: building a new one");
        let (config, metrics, topic, last_error, reach) = self.build_parts();
        let started = std::time::Instant::now();
        let fresh = tokio::task::spawn_blocking(move || {
            create(&config, &metrics, &topic, &last_error, &reach)
        })
        .await;
        let fresh = match fresh {
            Ok(Ok(fresh)) => Current {
                replaced_at: Some(std::time::Instant::now()),
                ..fresh
            },
            Ok(Err(err)) => {
                tracing::error!(%err, "cannot create a new Kafka producer");
                return;
            }
            Err(err) => {
                tracing::error!(%err, "creating a new Kafka producer failed");
                return;
            }
        };
        let retired = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            fresh,
        );
        self.metrics.producer_restarts.inc();
        tracing::warn!(
            built_ms = started.elapsed().as_millis() as u64,
            "replaced the Kafka producer after its fatal error"
        );
        // A fatal error purges the dead producer's queue (never sent: its records are known
        // not to be written) but not its requests in flight, whose answers still say what
        // Kafka wrote. Dropping a producer purges those too, and their records would report
        // failure whatever the broker did with them: so it is flushed first, for as long as
        // a record may take, then dropped (which joins librdkafka's threads: not on the
        // runtime's threads).
        let drain = self.delivery_timeout();
        std::thread::spawn(move || {
            let _ = retired.producer.flush(Timeout::After(drain));
            drop(retired)
        });
    }

    /// The producer in force, its fatal flag and its warm-up.
    fn current_parts(&self) -> (BridgeProducer, Arc<AtomicBool>, Arc<WarmUp>) {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        (
            current.producer.clone(),
            current.fatal.clone(),
            current.warm_up.clone(),
        )
    }

    /// Builds a new producer and probe client with the same options, which reads the files
    /// they name again (the client certificate and key, the CA), and puts them in force once
    /// the new producer holds a producer id, i.e. the brokers took its credentials. Until then,
    /// and for good if they do not within `within`, the clients in force stay. Records handed
    /// to the old producer are still reported by it: it is flushed before it is dropped.
    pub async fn renew_clients(&self, within: Duration) -> Result<(), String> {
        if self.transactional {
            return Err("a transactional producer is not renewed".into());
        }
        let _turn = self.replacing.lock().await;
        let (config, metrics, topic, last_error, reach) = self.build_parts();
        let built = tokio::task::spawn_blocking(move || {
            Ok::<_, KafkaError>((
                create(&config, &metrics, &topic, &last_error, &reach)?,
                ProbeClient::new(&config, PROBE_TIMEOUT, last_error.clone())?,
            ))
        })
        .await
        .map_err(|e| format!("building the new Kafka clients failed: {e}"))?
        .map_err(|e| format!("cannot build the new Kafka clients: {e}"))?;
        let (fresh, probe_client) = built;
        let started = tokio::time::Instant::now();
        while fresh.producer_id.load(Ordering::SeqCst) < 0 {
            if started.elapsed() > within {
                // Dropping a client joins librdkafka's threads: not on the runtime's.
                std::thread::spawn(move || {
                    fresh.warm_up.stop();
                    drop((fresh, probe_client))
                });
                return Err(format!(
                    "the new Kafka producer got no producer id within {within:?}: the brokers \
                     did not take its credentials (see the Kafka client errors logged); the \
                     clients in force stay"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let retired = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            fresh,
        );
        let retired_probe = std::mem::replace(
            &mut *self.probe_client.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(probe_client),
        );
        retired.warm_up.done();
        let drain = self.delivery_timeout();
        std::thread::spawn(move || {
            let _ = retired.producer.flush(Timeout::After(drain));
            drop((retired, retired_probe))
        });
        Ok(())
    }

    /// librdkafka's `message.timeout.ms`: how long a record may take.
    fn delivery_timeout(&self) -> Duration {
        self.config
            .get("message.timeout.ms")
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10))
    }

    /// Hands the record over and follows it to Kafka's verdict. Once handed over, the rest
    /// runs to its end even if the caller is dropped (a sender that hung up): the verdict is
    /// counted, and a transaction's count of records awaiting their report always comes back
    /// down.
    async fn deliver(
        &self,
        record: FutureRecord<'_, [u8], [u8]>,
        deadline: Option<tokio::time::Instant>,
        counted: Counted,
    ) -> Result<Delivered, PublishError> {
        let started = tokio::time::Instant::now();
        let report = match self.hand_over(record, deadline).await {
            Ok(report) => report,
            Err(err) => {
                counted.count(&self.metrics, Err(&err));
                return Err(err);
            }
        };
        let metrics = self.metrics.clone();
        Finish::new(async move {
            let result = report.await;
            metrics
                .kafka_delivery_duration
                .observe(started.elapsed().as_secs_f64());
            counted.count(&metrics, result.as_ref().map(|_| ()));
            result
        })
        .await
    }

    /// Gives the record to librdkafka (inside the open transaction with `exactly_once`);
    /// what is left is waiting for its verdict, which borrows nothing.
    async fn hand_over(
        &self,
        record: FutureRecord<'_, [u8], [u8]>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Report, PublishError> {
        if let Some(refusal) = self.unreachable() {
            return Err(refusal);
        }
        if let Some(refusal) = self.unwritable(record.topic, record.key) {
            return Err(refusal);
        }
        if let Some(group) = self.group.get() {
            // A commit that cannot end (Kafka cannot take one of its records) holds the
            // next transaction back: what the probe then refuses is not left waiting for it.
            let (topic, key) = (record.topic, record.key);
            let joined = tokio::select! {
                joined = group.join(record, deadline) => joined?,
                refused = self.until_refused(topic, key) => return Err(refused),
            };
            return Ok(Box::pin(joined.verdict()));
        }
        let (producer, fatal, warm_up) = self.live_producer(deadline).await?;
        let sent = producer.send_result(record);
        // Not held while the report is awaited: the last handle of a replaced producer is
        // dropped on the thread the replacement made for it, not on a runtime thread.
        drop(producer);
        let delivery = sent.map_err(|(err, _)| PublishError::from_kafka(&err))?;
        Ok(Box::pin(follow(delivery, deadline, fatal, warm_up)))
    }

    /// Resolves, with the refusal, once a probe after the call shows that Kafka cannot take
    /// a record for `topic` and `key` now (see [`Publisher::unwritable`]), or that no broker
    /// answers; never otherwise. A delivery waiting for its verdict races it, so that its
    /// sender hears at once what a new delivery would hear.
    pub async fn until_refused(&self, topic: &str, key: Option<&[u8]>) -> PublishError {
        let mut probes = self.reach.subscribe();
        loop {
            if probes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(refusal) = self.unreachable() {
                return refusal;
            }
            if let Some(refusal) = self.unwritable(topic, key) {
                return refusal;
            }
        }
    }

    /// Why a record for `topic` and `key` would be refused at once now, if it would: then
    /// counted as a delivery failure, as a record refused when handed over is.
    pub fn refusal_now(&self, topic: &str, key: Option<&[u8]>) -> Option<PublishError> {
        let refusal = self.unreachable().or_else(|| self.unwritable(topic, key))?;
        self.metrics
            .kafka_delivery_failures
            .with_label_values(&[refusal.failure().as_str()])
            .inc();
        Some(refusal)
    }

    /// The refusal of every record while no broker can be reached: the producer's own
    /// connections are all down, or no broker answered the last probe.
    fn unreachable(&self) -> Option<PublishError> {
        if self.reach.all_down() {
            Some(PublishError::Unreachable(
                "every broker's connection is down".into(),
            ))
        } else if !self.reachable.load(Ordering::Relaxed) {
            Some(PublishError::Unreachable(
                "no broker answered the last readiness probe".into(),
            ))
        } else {
            None
        }
    }

    /// The refusal of a record the last probe showed Kafka cannot take now: its topic
    /// missing (or not authorized), or its partition with too few in-sync replicas. A
    /// partition without a leader is not refused: librdkafka holds its records until one is
    /// elected. With `exactly_once` this also keeps a record Kafka would refuse out of a
    /// transaction, which it would abort with every other delivery in it.
    fn unwritable(&self, topic: &str, key: Option<&[u8]>) -> Option<PublishError> {
        if !self.degraded.load(Ordering::Relaxed) {
            return None;
        }
        let health = self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(why) = health.missing.get(topic) {
            let reason = match (why.failure, why.code) {
                (ProbeFailure::TopicMissing | ProbeFailure::NoPartitions, _) => {
                    DeliveryFailure::UnknownTopic
                }
                (_, Some(code)) => {
                    PublishError::from_kafka(&KafkaError::MetadataFetch(code)).failure()
                }
                _ => DeliveryFailure::Other,
            };
            return Some(PublishError::Kafka {
                reason,
                detail: format!("{why} (see /readyz): not written"),
            });
        }
        let (partition, state) = health.of_key(topic, key?)?;
        match state {
            PartitionState::TooFewReplicas { in_sync, min } => Some(PublishError::Kafka {
                reason: DeliveryFailure::NotEnoughReplicas,
                detail: format!(
                    "partition {partition} of {topic} has {in_sync} in-sync replica(s) and \
                     needs {min} (min.insync.replicas): Kafka takes none of its records now"
                ),
            }),
            _ => None,
        }
    }

    /// Probes every topic the bridge writes to through the probe's own client: readiness,
    /// and which partitions' records are refused at once. Records are refused at once while
    /// no broker answers; the bridge is not ready until the producer holds a producer id.
    pub async fn probe(
        &self,
        topics: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, ProbeError> {
        let client = self
            .probe_client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let topics = topics.to_vec();
        let began = std::time::Instant::now();
        // While the producer's own connections show every broker down, the probe asks once,
        // briefly, instead of three times at its full timeout: what it would wait for is
        // known. Its answer is also how the producer hears of a broker back, since it makes
        // no connection while every record is refused.
        let all_down = self.reach.all_down();
        let (timeout, attempts) = if all_down {
            (timeout.min(Duration::from_millis(800)), 1)
        } else {
            (timeout, 3)
        };
        let (health, failed) =
            tokio::task::spawn_blocking(move || client.probe(&topics, timeout, attempts))
                .await
                .unwrap_or_else(|e| {
                    let failed = ProbeError::new(
                        ProbeFailure::Internal,
                        format!("readiness probe failed: {e}"),
                    );
                    (Health::default(), Some(failed))
                });
        if all_down
            && !failed
                .as_ref()
                .is_some_and(|e| e.failure == ProbeFailure::NoBroker)
        {
            self.reach.back_up();
        }
        let unreachable = failed.as_ref().is_some_and(|e| e.failure.refuses_records());
        self.reachable.store(!unreachable, Ordering::Relaxed);
        let (degraded, refusing) = self.keep(health);
        if unreachable || refusing {
            self.reach.bump();
        }
        tracing::debug!(
            took_ms = began.elapsed().as_millis() as u64,
            unreachable,
            refusing,
            "probed"
        );
        if let Some(failed) = failed {
            return Err(failed);
        }
        self.can_write()?;
        Ok(degraded)
    }

    /// Keeps what a probe saw of the partitions, for the quick refusals and the metric of
    /// unwritable partitions; returns the degraded partitions' descriptions, and whether any
    /// partition's records are refused.
    fn keep(&self, health: Health) -> (Vec<String>, bool) {
        self.metrics.partitions_unwritable.reset();
        for (topic, states) in &health.topics {
            for state in states {
                if let Some(reason) = state.reason() {
                    self.metrics
                        .partitions_unwritable
                        .with_label_values(&[topic.as_str(), reason])
                        .inc();
                }
            }
        }
        let degraded = health.degraded();
        let refusing = health.any_degraded();
        self.degraded.store(refusing, Ordering::Relaxed);
        // Partitions seen, even when none of a topic can take records: theirs are refused.
        *self.health.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(health);
        (degraded, refusing)
    }

    /// Whether the producer could write now: it holds a producer id and, with exactly once,
    /// its transactions are not stalled.
    fn can_write(&self) -> Result<(), ProbeError> {
        let has_id = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .producer_id
            .load(Ordering::Relaxed)
            >= 0;
        if !has_id {
            return Err(ProbeError::new(
                ProbeFailure::NoProducerId,
                "the producer has no producer id yet: it could not write (the cluster's \
                 transaction coordinator may still be loading)",
            ));
        }
        match self
            .group
            .get()
            .and_then(|g| g.stalled(TXN_CLOSED_FOR, 2 * self.delivery_timeout()))
        {
            Some(why) => Err(ProbeError::new(ProbeFailure::TransactionsStalled, why)),
            None => Ok(()),
        }
    }

    /// Waits up to `timeout` for every queued record to be acknowledged; returns how many
    /// were still outstanding when it gave up.
    pub async fn flush(&self, timeout: Duration) -> i32 {
        let (producer, warm_up) = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            (current.producer.clone(), current.warm_up.clone())
        };
        tokio::task::spawn_blocking(move || {
            // Its handle of the producer is gone before the flush: the last one is dropped
            // by the caller.
            warm_up.stop();
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

/// What a delivery's verdict is counted as.
#[derive(Debug, Clone, Copy)]
enum Counted {
    /// An event, by its type's label.
    Event(&'static str),
    DeadLetter,
}

impl Counted {
    fn count(self, metrics: &Metrics, result: Result<(), &PublishError>) {
        match (self, result) {
            (Counted::Event(label), Ok(())) => {
                metrics.events_delivered.with_label_values(&[label]).inc()
            }
            (Counted::DeadLetter, Ok(())) => metrics.dead_letters.inc(),
            (_, Err(e)) => metrics
                .kafka_delivery_failures
                .with_label_values(&[e.failure().as_str()])
                .inc(),
        }
    }
}

/// A record handed over, waiting for its verdict: its transaction's outcome, or its
/// delivery report.
type Report =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Delivered, PublishError>> + Send>>;

/// The delivery report of a record handed to an idempotent producer, until `deadline`.
async fn follow(
    delivery: DeliveryFuture,
    deadline: Option<tokio::time::Instant>,
    fatal: Arc<AtomicBool>,
    warm_up: Arc<WarmUp>,
) -> Result<Delivered, PublishError> {
    let started = tokio::time::Instant::now();
    match with_deadline(deadline, delivery).await {
        Err(_) => Err(PublishError::Timeout(
            deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(started)),
        )),
        Ok(Err(_canceled)) => Err(PublishError::Kafka {
            reason: DeliveryFailure::Other,
            detail: "the producer was shut down before the delivery report".into(),
        }),
        Ok(Ok(Err((err, _)))) => {
            if kills_the_producer(&err) {
                tracing::error!(%err, "librdkafka declared the Kafka producer dead; it will be replaced");
                fatal.store(true, Ordering::SeqCst);
                warm_up.done();
            }
            Err(PublishError::from_kafka(&err))
        }
        Ok(Ok(Ok(d))) => {
            warm_up.done();
            Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            })
        }
    }
}

/// Whether a record's error means its producer can deliver nothing more: librdkafka's own
/// verdict (`Fatal`, which its error callback reports too, a moment later), and the two
/// errors it reports on a record only when it has just declared the producer dead (a
/// sequence out of order at the head of the line, an unknown producer id it cannot
/// recover from without risking a duplicate; where it can, it drains, bumps the epoch and
/// sends the records again without reporting them). An idempotent producer recovers by
/// itself from an invalid epoch or a fenced id (KIP-360), and a record failed that way was
/// not written: replacing the producer for those would purge records Kafka may have
/// written, and their senders' retries would write them again. Apache Kafka takes the bumped
/// epoch, also after every broker was down for longer than the delivery timeout
/// (tests/broker_faults.rs: no producer replaced through any fault).
fn kills_the_producer(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::UnknownProducerId
        )
    )
}

// The committer of `kafka.exactly_once` (see [`GroupCommit`]).

/// Initialises the producer's transactions and begins one, then, whenever records are
/// pending, lingers, commits, and begins the next before any delivery may join; until the
/// publisher is gone.
async fn commit_loop(group: Arc<GroupCommit>, publisher: std::sync::Weak<Publisher>) {
    let pause = Duration::from_millis(500);
    loop {
        let Some(publisher) = publisher.upgrade() else {
            return;
        };
        let mut open = group.open.write().await;
        if begin(&group, &mut open, &publisher).await {
            break;
        }
        drop(open);
        tokio::time::sleep(pause).await;
    }
    loop {
        // Records join; then a little longer for more.
        while group.pending.load(Ordering::SeqCst) == 0 {
            group.wake.notified().await;
        }
        tokio::time::sleep(group.linger).await;
        let Some(publisher) = publisher.upgrade() else {
            return;
        };
        let mut open = group.open.write().await;
        let records = group.pending.swap(0, Ordering::SeqCst);
        // Each record written (or failed) first: the commit then only ends the transaction.
        let reports_by = tokio::time::Instant::now() + group.step_timeout;
        while group.unreported.load(Ordering::SeqCst) > 0 {
            let _ = tokio::time::timeout_at(reports_by, group.reported.notified()).await;
            if tokio::time::Instant::now() >= reports_by {
                break;
            }
        }
        let producer = open.producer.clone().expect("a transaction is open");
        let outcome = end_transaction(&group, &producer, &publisher.metrics).await;
        drop(producer);
        let result = match &outcome {
            Ok(()) => "committed",
            Err(why) if why.contains(TXN_UNKNOWN) => "unknown",
            Err(_) => "aborted",
        };
        publisher
            .metrics
            .transactions
            .with_label_values(&[result])
            .inc();
        publisher
            .metrics
            .transaction_records
            .observe(records as f64);
        if let Err(why) = &outcome {
            tracing::warn!(%why, records, "exactly once: a transaction was aborted; its deliveries are answered 503");
        }
        let fatal = matches!(&outcome, Err(why) if why.starts_with(TXN_FATAL));
        open.outcome.send_replace(Some(outcome));
        open.begun = false;
        {
            let mut state = group.state();
            state.holding_since = None;
            state
                .closed_since
                .get_or_insert((tokio::time::Instant::now(), "a commit just ended".into()));
        }
        if fatal {
            open.producer = None;
            publisher.replace_transactional().await;
        }
        // The next transaction, before any delivery may join. While it cannot begin, the
        // lock is let go and deliveries are refused at once.
        while !begin(&group, &mut open, &publisher).await {
            drop(open);
            tokio::time::sleep(pause).await;
            open = group.open.write().await;
        }
    }
}

/// Makes sure `open` has a producer whose transactions are initialised, and begins a
/// transaction with an outcome of its own; false when it cannot.
async fn begin(group: &GroupCommit, open: &mut OpenTxn, publisher: &Publisher) -> bool {
    let producer = match open.producer.clone() {
        Some(producer) => producer,
        None => {
            let producer = publisher.producer();
            let timeout = group.step_timeout;
            if let Err(err) = txn_step(&producer, move |p| p.init_transactions(timeout)).await {
                tracing::warn!(%err, "exactly once: cannot initialise the producer's transactions; trying again");
                group.closed_because(format!("initialising transactions failed: {err}"));
                if txn_is_fatal(&err) {
                    publisher.replace_transactional().await;
                }
                return false;
            }
            tracing::info!("exactly once: the producer's transactions are ready");
            open.producer = Some(producer.clone());
            producer
        }
    };
    if let Err(err) = txn_step(&producer, |p| p.begin_transaction()).await {
        tracing::error!(%err, "exactly once: cannot begin a transaction; trying again");
        group.closed_because(format!("beginning a transaction failed: {err}"));
        if txn_is_fatal(&err) {
            open.producer = None;
            publisher.replace_transactional().await;
        }
        return false;
    }
    open.outcome = tokio::sync::watch::channel(None).0;
    open.begun = true;
    group.state().closed_since = None;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn passwords_are_redacted_when_the_producer_is_described() {
        let k = Settings::load_from(
            None,
            [
                ("TAMIO_BRIDGE__KAFKA__BROKERS", "b:9092"),
                ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "SCRAM-SHA-512"),
                ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "bridge"),
                ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD", "hunter2-sasl"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap()
        .kafka;
        assert!(!format!("{k:?}").contains("hunter2"));
        // Creating a producer needs no broker that answers.
        let config = producer::build(&k, 1000).unwrap();
        let publisher =
            Publisher::new(config, Arc::new(crate::metrics::Metrics::default()), "t").unwrap();
        let described = format!("{:?}", publisher.describe());
        assert!(described.contains("sasl.username"), "{described}");
        assert!(!described.contains("hunter2"), "{described}");
    }
}
