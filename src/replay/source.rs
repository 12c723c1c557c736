//! The dead-letter topic's consumer: where each partition starts (the group's committed
//! position, `--since`), where it ends (the broker's high watermark, `--until`), and the
//! lookups that find them, off the async runtime.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Statistics};
use rdkafka::{Offset, TopicPartitionList};

use super::positions::Positions;
use crate::config::Kafka;
use crate::publish::producer::consumer_config;
use crate::publish::TxnError;

/// Where a selection starts or ends: a time (a dead letter's `received_at`), or an offset
/// per partition (partitions not named are not bounded).
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    Time(SystemTime),
    Offsets(BTreeMap<i32, i64>),
}

impl Bound {
    /// An RFC 3339 time (`2026-12-01T09:00:00Z`), or offsets `partition:offset,...`.
    pub fn parse(text: &str) -> Result<Bound, String> {
        let text = text.trim();
        if let Ok(t) = humantime::parse_rfc3339_weak(text) {
            return Ok(Bound::Time(t));
        }
        let mut offsets = BTreeMap::new();
        for part in text.split(',') {
            let (p, o) = part.split_once(':').ok_or_else(|| {
                format!("`{text}` is neither an RFC 3339 time nor partition:offset pairs")
            })?;
            let p: i32 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{p}` is not a partition"))?;
            let o: i64 = o
                .trim()
                .parse()
                .map_err(|_| format!("`{o}` is not an offset"))?;
            if p < 0 || o < 0 {
                return Err(format!("`{part}`: partitions and offsets are not negative"));
            }
            offsets.insert(p, o);
        }
        Ok(Bound::Offsets(offsets))
    }
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot create the consumer of the dead-letter topic: {0}")]
    Consumer(KafkaError),
    #[error("the dead-letter topic `{0}` does not exist (or is not visible to these credentials)")]
    NoTopic(String),
    #[error("reading the dead-letter topic `{topic}`: {error}")]
    Kafka { topic: String, error: KafkaError },
    #[error(
        "cannot start the replay's transactions (transactional id `{id}`): {error}; the \
         principal needs WRITE and DESCRIBE on that transactional id"
    )]
    Transactions { id: String, error: TxnError },
}

/// How long a transaction step may take, and how long the coordinator's transient errors are
/// retried when the replay starts.
pub(super) const KAFKA_PATIENCE: Duration = Duration::from_secs(30);

/// The consumer's context: the high watermark of each partition of the dead-letter topic, as
/// the broker's last fetch answer gave it (librdkafka's statistics), to know when a
/// partition has been read to its end.
pub(super) struct Watermarks {
    topic: String,
    /// (low, high) per partition.
    high: std::sync::Mutex<BTreeMap<i32, (i64, i64)>>,
}

impl Watermarks {
    fn of(&self, partition: i32) -> Option<(i64, i64)> {
        self.high
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&partition)
            .copied()
    }
}

impl ClientContext for Watermarks {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut high = self.high.lock().unwrap_or_else(|p| p.into_inner());
        for (&id, p) in &topic.partitions {
            if id >= 0 && p.hi_offset >= 0 {
                high.insert(id, (p.lo_offset.max(0), p.hi_offset));
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, "librdkafka: {reason}");
    }
}

impl ConsumerContext for Watermarks {}

/// The dead-letter topic's consumer, and which partitions are still read.
pub(super) struct Source {
    pub(super) consumer: StreamConsumer<Watermarks>,
    pub(super) topic: String,
    /// Partitions not yet read to their end (or to `--until`).
    pub(super) open: HashSet<i32>,
    /// The next offset the consumer hands over, per partition.
    pub(super) consumed: BTreeMap<i32, i64>,
    pub(super) since: BTreeMap<i32, i64>,
    pub(super) until: BTreeMap<i32, i64>,
    /// The group's position when the replay started.
    pub(super) committed: BTreeMap<i32, i64>,
}

/// What the consumer looks up before reading: the topic's partitions, the group's committed
/// positions and the offsets `--since` names.
struct LookedUp {
    partitions: Vec<i32>,
    committed: TopicPartitionList,
    since: BTreeMap<i32, i64>,
}

impl Source {
    /// Opens the consumer, takes the group's committed positions (retrying the coordinator's
    /// transient errors: a coordinator still loading, or moving) into `positions`, and
    /// assigns every partition from there. librdkafka's lookups block: they run on a thread
    /// of their own, and a caller that stops waiting leaves the consumer to be dropped there.
    pub(super) async fn open(
        kafka: &Kafka,
        topic: &str,
        group: &str,
        since: &Option<Bound>,
        until: &Option<Bound>,
        positions: &mut Positions,
    ) -> Result<Source, ReplayError> {
        let topic = topic.to_owned();
        let kafka_error = |error| ReplayError::Kafka {
            topic: topic.clone(),
            error,
        };
        let consumer: StreamConsumer<Watermarks> = consumer_config(kafka, group)
            .set("statistics.interval.ms", "100")
            .set("isolation.level", "read_committed")
            .create_with_context(Watermarks {
                topic: topic.clone(),
                high: Default::default(),
            })
            .map_err(ReplayError::Consumer)?;
        let since = since.clone();
        let named = topic.clone();
        let (consumer, looked_up) = tokio::task::spawn_blocking(move || {
            let looked_up = look_up(&consumer, &named, since.as_ref());
            (consumer, looked_up)
        })
        .await
        .map_err(|_| ReplayError::Consumer(KafkaError::Canceled))?;
        let LookedUp {
            partitions,
            committed,
            since,
        } = looked_up.map_err(|e| match e {
            None => ReplayError::NoTopic(topic.clone()),
            Some(error) => kafka_error(error),
        })?;
        let until: BTreeMap<i32, i64> = match until {
            Some(Bound::Offsets(o)) => o.clone(),
            _ => BTreeMap::new(),
        };
        let mut source = Source {
            consumer,
            topic: topic.clone(),
            open: HashSet::new(),
            consumed: BTreeMap::new(),
            since,
            until,
            committed: BTreeMap::new(),
        };
        source.assign(&partitions, &committed, positions)?;
        Ok(source)
    }

    /// Assigns each of `partitions` from the later of the group's committed position and
    /// `--since`'s (the beginning when neither), skipping those already at `--until`.
    fn assign(
        &mut self,
        partitions: &[i32],
        committed: &TopicPartitionList,
        positions: &mut Positions,
    ) -> Result<(), ReplayError> {
        let kafka_error = |error| ReplayError::Kafka {
            topic: self.topic.clone(),
            error,
        };
        let mut assignment = TopicPartitionList::new();
        for &p in partitions {
            let group_at =
                committed
                    .find_partition(&self.topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(positions.resume(p, o, e.metadata())),
                        _ => None,
                    });
            if let Some(at) = group_at {
                self.committed.insert(p, at);
            }
            let start = match (group_at, self.since.get(&p)) {
                (Some(g), Some(&s)) => Some(g.max(s)),
                (g, s) => g.or(s.copied()),
            };
            if let (Some(start), Some(&until)) = (start, self.until.get(&p)) {
                if start >= until {
                    continue;
                }
            }
            tracing::debug!(partition = p, committed = ?group_at, ?start, "replay starts");
            assignment
                .add_partition_offset(
                    &self.topic,
                    p,
                    start.map_or(Offset::Beginning, Offset::Offset),
                )
                .map_err(kafka_error)?;
            self.open.insert(p);
            if let Some(start) = start {
                self.consumed.insert(p, start);
            }
        }
        if !self.open.is_empty() {
            self.consumer.assign(&assignment).map_err(kafka_error)?;
        }
        Ok(())
    }

    /// Stops reading `partition`.
    pub(super) fn close(&mut self, partition: i32) {
        if self.open.remove(&partition) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, partition);
            let _ = self.consumer.pause(&tpl);
        }
    }

    /// Closes the partitions the consumer has handed over every record of, below the high
    /// watermark of the broker's last fetch answer.
    pub(super) fn close_the_ends(&mut self) {
        for p in self.open.clone() {
            if let Some((low, high)) = self.consumer.context().of(p) {
                if self.consumed.get(&p).copied().unwrap_or(low) >= high {
                    tracing::debug!(partition = p, low, high, "read to its end");
                    self.close(p);
                }
            }
        }
    }
}

/// The topic's partitions, the group's committed positions and the offsets of a `--since`
/// time, each request retried while it fails with a transient error. None: the topic does not
/// exist. Blocks.
fn look_up(
    consumer: &StreamConsumer<Watermarks>,
    topic: &str,
    since: Option<&Bound>,
) -> Result<LookedUp, Option<KafkaError>> {
    let timeout = Duration::from_secs(10);
    let metadata = patiently(|| consumer.fetch_metadata(Some(topic), timeout)).map_err(Some)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(None);
    }
    let mut all = TopicPartitionList::new();
    for &p in &partitions {
        all.add_partition(topic, p);
    }
    let committed = patiently(|| consumer.committed_offsets(all.clone(), timeout)).map_err(Some)?;
    let since = match since {
        Some(Bound::Offsets(o)) => o.clone(),
        Some(Bound::Time(t)) => {
            let ms = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let mut times = TopicPartitionList::new();
            for &p in &partitions {
                times
                    .add_partition_offset(topic, p, Offset::Offset(ms))
                    .map_err(Some)?;
            }
            patiently(|| consumer.offsets_for_times(times.clone(), timeout))
                .map_err(Some)?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect()
        }
        None => BTreeMap::new(),
    };
    Ok(LookedUp {
        partitions,
        committed,
        since,
    })
}

/// Calls a Kafka request again while it fails with a transient error, for up to
/// [`KAFKA_PATIENCE`]. Blocks.
fn patiently<T>(mut call: impl FnMut() -> Result<T, KafkaError>) -> Result<T, KafkaError> {
    let started = Instant::now();
    loop {
        match call() {
            Err(e) if is_transient(&e) && started.elapsed() < KAFKA_PATIENCE => {
                tracing::info!(error = %e, "Kafka is not ready yet; trying again");
                std::thread::sleep(Duration::from_millis(250));
            }
            result => return result,
        }
    }
}

pub(super) fn is_transient(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    )
}
