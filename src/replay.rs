//! Dead letters put through again once their cause is fixed (`tamio-kafka-bridge replay`).
//!
//! - **Re-verified, not trusted.** Each dead letter's body is verified against its recorded
//!   signature headers with the current secrets, the time window judged at its
//!   `received_at`. Write access to the dead-letter topic is no way in.
//! - **The live pipeline.** [`Ingest::replay`]: envelope rules, routes, duplicate
//!   suppression and the record format of a live delivery, plus `replayed_from` and
//!   `replayed_at`. A dead letter that still fails stays where it is and is reported.
//! - **Resumable.** The consumer group's offsets are committed after each record's outcome
//!   (every second, and at the end): a run stopped by Ctrl-C or SIGTERM, or cut short by
//!   Kafka, resumes where it stopped when run again.
//! - **Per ticket in order.** Dead letters are keyed by ticket, so a ticket's are in one
//!   partition; up to `concurrency` records are in flight at once, never two of one key.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message, Timestamp};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Statistics};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Kafka;
use crate::ingest::route::Pattern;
use crate::ingest::{Ingest, IngestError, ReplayAccepted};
use crate::publish::producer::consumer_config;
use crate::publish::record::{
    rfc3339_millis, Replayed, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};

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

/// Which dead letters a replay puts through; every filter set must hold.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The body's `endpoint_id` is one of these (none: any).
    pub endpoint_ids: Vec<String>,
    /// The body's `event_type` matches (the route patterns' syntax).
    pub event_type: Option<Pattern>,
    /// The dead letter's `error_kind` is one of these (none: any).
    pub error_kinds: Vec<String>,
    /// Received at or after this time, or at or after these offsets.
    pub since: Option<Bound>,
    /// Received before this time, or before these offsets.
    pub until: Option<Bound>,
}

impl Selection {
    /// A stable text of the filters: the default consumer group is named after it, so that
    /// the same command resumes, and another selection keeps its own position.
    pub fn fingerprint(&self) -> String {
        format!(
            "endpoint={:?};type={:?};kind={:?};since={:?};until={:?}",
            self.endpoint_ids, self.event_type, self.error_kinds, self.since, self.until
        )
    }

    fn admits(&self, letter: &Letter) -> bool {
        if !self.endpoint_ids.is_empty()
            && !letter
                .peeked
                .endpoint_id
                .as_ref()
                .is_some_and(|id| self.endpoint_ids.contains(id))
        {
            return false;
        }
        if let Some(pattern) = &self.event_type {
            if !letter
                .peeked
                .event_type
                .as_deref()
                .is_some_and(|t| pattern.matches(t))
            {
                return false;
            }
        }
        if !self.error_kinds.is_empty()
            && !letter
                .error_kind
                .as_ref()
                .is_some_and(|k| self.error_kinds.contains(k))
        {
            return false;
        }
        let at = letter.received_at.unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(Bound::Time(since)) = &self.since {
            if at < *since {
                return false;
            }
        }
        if let Some(Bound::Time(until)) = &self.until {
            if at >= *until {
                return false;
            }
        }
        true
    }
}

/// What a replay is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The dead-letter topic.
    pub topic: String,
    /// The consumer group whose committed offsets make the replay resumable.
    pub group: String,
    pub selection: Selection,
    /// Report what would be published and what would stay; write and commit nothing.
    pub dry_run: bool,
    /// Records in flight at once (never two of one ticket).
    pub concurrency: usize,
}

/// The counts a replay keeps, for its progress and summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counts {
    /// Dead letters read.
    pub read: u64,
    /// Read and selected by the filters.
    pub selected: u64,
    /// Published to their topic.
    pub published: u64,
    /// Already published (the event id was acknowledged before): nothing written.
    pub duplicate: u64,
    /// Dry run: would be published.
    pub would_publish: u64,
    /// Still refused, by reason (the refusal's kind).
    pub refused: BTreeMap<String, u64>,
}

impl Counts {
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Selected records whose outcome is known.
    pub fn done(&self) -> u64 {
        self.published + self.duplicate + self.would_publish + self.refused_total()
    }
}

/// One dead letter that stays where it is, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stayed {
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<String>,
    pub reason: String,
    pub detail: String,
}

/// A replay's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub topic: String,
    pub group: String,
    pub dry_run: bool,
    #[serde(flatten)]
    pub counts: Counts,
    /// Dry run: the records that would be published, by destination topic.
    pub would_publish_to: BTreeMap<String, u64>,
    /// The first 1,000 dead letters that stay, each with its reason.
    pub stayed: Vec<Stayed>,
    /// True when every partition was read to its end (or to `--until`).
    pub complete: bool,
    /// Why the replay stopped before the end, if it did.
    pub stopped: Option<String>,
    /// The group's position per partition at the end (the next offset to replay).
    pub positions: BTreeMap<i32, i64>,
    pub elapsed_secs: f64,
    pub records_per_sec: f64,
}

impl Summary {
    /// Exit status: 0 when everything selected was published (or was already), 2 when some
    /// stay refused, 3 when the replay stopped before the end (run it again to resume).
    pub fn exit_code(&self) -> i32 {
        if !self.complete {
            3
        } else if self.counts.refused_total() > 0 {
            2
        } else {
            0
        }
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
}

/// The consumer's context: the high watermark of each partition of the dead-letter topic, as
/// the broker's last fetch answer gave it (librdkafka's statistics), to know when a
/// partition has been read to its end.
struct Watermarks {
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

/// A dead letter as read: the body and what its headers say.
struct Letter {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    body: Bytes,
    /// The signature headers, under the request header names the verifier reads.
    headers: HeaderMap,
    received_at: Option<SystemTime>,
    /// The broker's append time, when the topic keeps one.
    appended_at: Option<SystemTime>,
    error_kind: Option<String>,
    /// What the unverified body says, for the filters and the report alone.
    peeked: Peek,
}

impl Letter {
    fn read(message: &BorrowedMessage<'_>, signature_headers: &[HeaderName]) -> Letter {
        let body = Bytes::copy_from_slice(message.payload().unwrap_or_default());
        let mut headers = HeaderMap::new();
        let (mut received_at, mut error_kind) = (None, None);
        if let Some(carried) = message.headers() {
            for h in carried.iter() {
                let Some(value) = h.value.and_then(|v| HeaderValue::from_bytes(v).ok()) else {
                    continue;
                };
                match h.key {
                    // The schemes with a header of their own: the verifier reads whichever
                    // of its names the sender used.
                    "signature" => {
                        for name in signature_headers {
                            headers.insert(name.clone(), value.clone());
                        }
                    }
                    "webhook-id" => drop(headers.insert(WEBHOOK_ID.clone(), value)),
                    "webhook-timestamp" => drop(headers.insert(WEBHOOK_TIMESTAMP.clone(), value)),
                    "webhook-signature" => drop(headers.insert(WEBHOOK_SIGNATURE.clone(), value)),
                    "received_at" => {
                        received_at = value
                            .to_str()
                            .ok()
                            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                    }
                    "error_kind" => error_kind = value.to_str().ok().map(str::to_owned),
                    _ => {}
                }
            }
        }
        let appended_at = match message.timestamp() {
            Timestamp::LogAppendTime(ms) if ms >= 0 => {
                Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64))
            }
            _ => None,
        };
        let peeked = serde_json::from_slice::<Peek>(&body).unwrap_or_default();
        Letter {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            body,
            headers,
            received_at,
            appended_at,
            error_kind,
            peeked,
        }
    }

    fn position(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
}

/// The identifiers an unverified body names (none when it is not such JSON).
#[derive(Debug, Default, serde::Deserialize)]
struct Peek {
    #[serde(default)]
    event_id: Option<String>,
    #[serde(default)]
    endpoint_id: Option<String>,
    #[serde(default)]
    event_type: Option<String>,
}

/// A record's outcome, as the replay counts it.
enum Outcome {
    Published(ReplayAccepted),
    Duplicate(ReplayAccepted),
    WouldPublish(ReplayAccepted),
    /// Refused by the current settings: it stays, and the replay goes on.
    Stays {
        reason: String,
        detail: String,
    },
    /// Kafka or the duplicate store failed: the replay stops before this record.
    Halt(String),
}

/// The longest a dead letter's `received_at` may precede the broker's append time: the
/// request's deadline, and a minute for clocks.
fn append_slack(request_timeout: Duration) -> Duration {
    request_timeout + Duration::from_secs(60)
}

async fn put_through(
    ingest: Arc<Ingest>,
    letter: Letter,
    topic: Arc<str>,
    dry_run: bool,
    request_timeout: Duration,
) -> (Letter, Outcome) {
    let Some(received_at) = letter.received_at else {
        let outcome = Outcome::Stays {
            reason: "not_a_dead_letter".into(),
            detail: "no valid received_at header".into(),
        };
        return (letter, outcome);
    };
    // On a topic that keeps the broker's append time, a `received_at` set back to bring an
    // old signature into its window shows.
    if let Some(appended) = letter.appended_at {
        let early = appended
            .duration_since(received_at)
            .is_ok_and(|d| d > append_slack(request_timeout));
        let late = received_at
            .duration_since(appended)
            .is_ok_and(|d| d > Duration::from_secs(60));
        if early || late {
            let outcome = Outcome::Stays {
                reason: "received_at_mismatch".into(),
                detail: "received_at is far from the broker's append time".into(),
            };
            return (letter, outcome);
        }
    }
    let replayed = Replayed {
        from: format!("{topic}:{}:{}", letter.partition, letter.offset),
        at: rfc3339_millis(SystemTime::now()),
    };
    let result = ingest
        .replay(
            letter.headers.clone(),
            letter.body.clone(),
            received_at,
            replayed,
            dry_run,
        )
        .await;
    let outcome = match result {
        Ok(a) if dry_run => Outcome::WouldPublish(a),
        Ok(a) if a.duplicate => Outcome::Duplicate(a),
        Ok(a) => Outcome::Published(a),
        Err(e) => classify(e),
    };
    (letter, outcome)
}

fn classify(e: IngestError) -> Outcome {
    let kind = e.refusal().kind();
    match e {
        IngestError::Publish(ref p) if p.failure().is_retryable() => {
            Outcome::Halt(format!("Kafka did not acknowledge a replayed record: {e}"))
        }
        IngestError::DedupUnavailable | IngestError::Overloaded(_) => Outcome::Halt(e.to_string()),
        _ => Outcome::Stays {
            reason: kind.to_owned(),
            detail: e.to_string(),
        },
    }
}

/// Where each partition stands: the offsets in flight and the next one to read.
#[derive(Default)]
struct Positions {
    in_flight: BTreeMap<i32, BTreeSet<i64>>,
    next: BTreeMap<i32, i64>,
    /// The first record a halt left undone, per partition.
    undone: BTreeMap<i32, i64>,
}

impl Positions {
    fn start(&mut self, partition: i32, offset: i64) {
        self.in_flight.entry(partition).or_default().insert(offset);
        self.read(partition, offset);
    }

    fn read(&mut self, partition: i32, offset: i64) {
        let next = self.next.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    fn finish(&mut self, partition: i32, offset: i64) {
        if let Some(set) = self.in_flight.get_mut(&partition) {
            set.remove(&offset);
        }
    }

    fn leave_undone(&mut self, partition: i32, offset: i64) {
        let undone = self.undone.entry(partition).or_insert(offset);
        *undone = (*undone).min(offset);
    }

    /// The offset to commit per partition: everything before it has its outcome.
    fn committable(&self) -> BTreeMap<i32, i64> {
        self.next
            .iter()
            .map(|(&p, &next)| {
                let first_open = self
                    .in_flight
                    .get(&p)
                    .and_then(|s| s.first().copied())
                    .unwrap_or(next);
                let undone = self.undone.get(&p).copied().unwrap_or(next);
                (p, first_open.min(undone).min(next))
            })
            .collect()
    }
}

fn commit(
    consumer: &StreamConsumer<Watermarks>,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
    mode: CommitMode,
) -> Result<(), KafkaError> {
    if positions.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in positions {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    consumer.commit(&tpl, mode)
}

/// Runs a replay of `options.topic` through `ingest` until every partition is read to its
/// end, or `stop` completes (Ctrl-C, SIGTERM), or Kafka fails. `progress` is called with the
/// counts after each record.
pub async fn run(
    ingest: Arc<Ingest>,
    kafka: &Kafka,
    request_timeout: Duration,
    options: Options,
    mut progress: impl FnMut(&Counts),
    stop: impl Future<Output = ()>,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    let topic = options.topic.clone();
    let kafka_error = |error| ReplayError::Kafka {
        topic: topic.clone(),
        error,
    };
    let consumer: StreamConsumer<Watermarks> = consumer_config(kafka, &options.group)
        .set("statistics.interval.ms", "100")
        .create_with_context(Watermarks {
            topic: topic.clone(),
            high: Default::default(),
        })
        .map_err(ReplayError::Consumer)?;
    let timeout = Duration::from_secs(10);

    // The partitions, where the group stands in each, and where the selection starts.
    let metadata = consumer
        .fetch_metadata(Some(&topic), timeout)
        .map_err(kafka_error)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ReplayError::NoTopic(topic));
    }
    let mut all = TopicPartitionList::new();
    for &p in &partitions {
        all.add_partition(&topic, p);
    }
    let committed = consumer
        .committed_offsets(all.clone(), timeout)
        .map_err(kafka_error)?;
    let since_offsets: BTreeMap<i32, i64> = match &options.selection.since {
        Some(Bound::Offsets(o)) => o.clone(),
        Some(Bound::Time(t)) => {
            let ms = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let mut times = TopicPartitionList::new();
            for &p in &partitions {
                times
                    .add_partition_offset(&topic, p, Offset::Offset(ms))
                    .map_err(kafka_error)?;
            }
            let found = consumer
                .offsets_for_times(times, timeout)
                .map_err(kafka_error)?;
            found
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
    let until_offsets: BTreeMap<i32, i64> = match &options.selection.until {
        Some(Bound::Offsets(o)) => o.clone(),
        _ => BTreeMap::new(),
    };
    let mut assignment = TopicPartitionList::new();
    let mut open: HashSet<i32> = HashSet::new();
    let mut positions = Positions::default();
    // The next offset the consumer hands over, per partition.
    let mut consumed: BTreeMap<i32, i64> = BTreeMap::new();
    for &p in &partitions {
        let group_at = committed
            .find_partition(&topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let start = match (group_at, since_offsets.get(&p)) {
            (Some(g), Some(&s)) => Some(g.max(s)),
            (g, s) => g.or(s.copied()),
        };
        if let (Some(start), Some(&until)) = (start, until_offsets.get(&p)) {
            if start >= until {
                continue;
            }
        }
        tracing::debug!(partition = p, committed = ?group_at, ?start, "replay starts");
        let offset = start.map_or(Offset::Beginning, Offset::Offset);
        assignment
            .add_partition_offset(&topic, p, offset)
            .map_err(kafka_error)?;
        open.insert(p);
        if let Some(start) = start {
            positions.next.insert(p, start);
            consumed.insert(p, start);
        }
    }
    tracing::info!(
        topic = %topic,
        group = %options.group,
        dry_run = options.dry_run,
        partitions = partitions.len(),
        "replaying dead letters"
    );
    if !open.is_empty() {
        consumer.assign(&assignment).map_err(kafka_error)?;
    }

    let signature_headers = ingest.verifier().signature_headers();
    let shared_topic: Arc<str> = Arc::from(topic.as_str());
    let mut counts = Counts::default();
    let mut would_publish_to: BTreeMap<String, u64> = BTreeMap::new();
    let mut stayed: Vec<Stayed> = Vec::new();
    let mut stopped: Option<String> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut keys_in_flight: HashSet<Vec<u8>> = HashSet::new();
    // A record read whose ticket has one in flight: it waits, and reading with it.
    let mut waiting: Option<Letter> = None;
    let mut last_commit = Instant::now();
    let mut committed_at: BTreeMap<i32, i64> = BTreeMap::new();
    let concurrency = options.concurrency.max(1);
    // A partition is read to its end once the consumer has handed over every record below
    // the high watermark of the broker's last fetch answer.
    let mut ends = tokio::time::interval(Duration::from_millis(100));
    ends.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);

    loop {
        // Start what can start.
        if stopped.is_none() {
            if let Some(letter) = waiting.take() {
                let blocked = letter
                    .key
                    .as_ref()
                    .is_some_and(|k| keys_in_flight.contains(k));
                if blocked || in_flight.len() >= concurrency {
                    waiting = Some(letter);
                } else {
                    if let Some(k) = &letter.key {
                        keys_in_flight.insert(k.clone());
                    }
                    positions.start(letter.partition, letter.offset);
                    in_flight.push(put_through(
                        ingest.clone(),
                        letter,
                        shared_topic.clone(),
                        options.dry_run,
                        request_timeout,
                    ));
                }
            }
        }
        let reading = stopped.is_none()
            && waiting.is_none()
            && !open.is_empty()
            && in_flight.len() < concurrency;
        if !reading && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            () = &mut stop, if stopped.is_none() => {
                stopped = Some("interrupted".into());
            }
            Some((letter, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(k) = &letter.key {
                    keys_in_flight.remove(k);
                }
                match outcome {
                    Outcome::Published(a) => {
                        counts.published += 1;
                        tracing::debug!(
                            at = %letter.position(),
                            event_id = %a.event_id,
                            topic = %a.topic,
                            partition = a.partition,
                            offset = a.offset,
                            "published"
                        );
                    }
                    Outcome::Duplicate(a) => {
                        counts.duplicate += 1;
                        tracing::debug!(
                            at = %letter.position(),
                            event_id = %a.event_id,
                            "already published: nothing written"
                        );
                    }
                    Outcome::WouldPublish(a) => {
                        counts.would_publish += 1;
                        *would_publish_to.entry(a.topic.to_string()).or_default() += 1;
                    }
                    Outcome::Stays { reason, detail } => {
                        *counts.refused.entry(reason.clone()).or_default() += 1;
                        tracing::info!(at = %letter.position(), %reason, "{detail}");
                        if stayed.len() < 1000 {
                            stayed.push(Stayed {
                                partition: letter.partition,
                                offset: letter.offset,
                                event_id: letter.peeked.event_id.clone(),
                                reason,
                                detail,
                            });
                        }
                    }
                    Outcome::Halt(why) => {
                        tracing::warn!(at = %letter.position(), "{why}; stopping");
                        positions.leave_undone(letter.partition, letter.offset);
                        stopped.get_or_insert(why);
                    }
                }
                positions.finish(letter.partition, letter.offset);
                progress(&counts);
            }
            _ = ends.tick(), if reading => {
                for p in open.clone() {
                    if let Some((low, high)) = consumer.context().of(p) {
                        if consumed.get(&p).copied().unwrap_or(low) >= high {
                            tracing::debug!(
                                partition = p,
                                consumed = ?consumed.get(&p),
                                low,
                                high,
                                "read to its end"
                            );
                            open.remove(&p);
                            pause(&consumer, &topic, p);
                        }
                    }
                }
            }
            message = consumer.recv(), if reading => {
                match message {
                    Ok(m) => {
                        let letter = Letter::read(&m, &signature_headers);
                        drop(m);
                        consumed.insert(letter.partition, letter.offset + 1);
                        if let Some(&until) = until_offsets.get(&letter.partition) {
                            if letter.offset >= until {
                                open.remove(&letter.partition);
                                pause(&consumer, &topic, letter.partition);
                                continue;
                            }
                        }
                        if let Some(&since) = since_offsets.get(&letter.partition) {
                            if letter.offset < since {
                                positions.read(letter.partition, letter.offset);
                                continue;
                            }
                        }
                        counts.read += 1;
                        if !options.selection.admits(&letter) {
                            positions.read(letter.partition, letter.offset);
                            progress(&counts);
                            continue;
                        }
                        counts.selected += 1;
                        waiting = Some(letter);
                    }
                    Err(KafkaError::PartitionEOF(p)) => {
                        open.remove(&p);
                        pause(&consumer, &topic, p);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the dead-letter topic");
                        if !is_transient(&e) {
                            stopped = Some(format!("reading the dead-letter topic: {e}"));
                        }
                    }
                }
            }
        }
        if !options.dry_run && last_commit.elapsed() >= Duration::from_secs(1) {
            let now = positions.committable();
            if now != committed_at && commit(&consumer, &topic, &now, CommitMode::Async).is_ok() {
                committed_at = now;
            }
            last_commit = Instant::now();
        }
    }

    let mut final_positions = positions.committable();
    if !options.dry_run {
        if let Err(e) = commit(&consumer, &topic, &final_positions, CommitMode::Sync) {
            tracing::warn!(error = %e, "committing the group's position");
            stopped.get_or_insert(format!("the group's position could not be committed: {e}"));
        }
    } else {
        final_positions = committed_at;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Summary {
        topic,
        group: options.group,
        dry_run: options.dry_run,
        records_per_sec: if elapsed > 0.0 {
            counts.read as f64 / elapsed
        } else {
            0.0
        },
        counts,
        would_publish_to,
        stayed,
        complete: stopped.is_none(),
        stopped,
        positions: final_positions,
        elapsed_secs: elapsed,
    })
}

fn pause(consumer: &StreamConsumer<Watermarks>, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let _ = consumer.pause(&tpl);
}

fn is_transient(e: &KafkaError) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_times_or_offsets() {
        assert_eq!(
            Bound::parse("2026-12-01T09:00:00Z").unwrap(),
            Bound::Time(humantime::parse_rfc3339("2026-12-01T09:00:00Z").unwrap())
        );
        assert_eq!(
            Bound::parse("0:12, 2:7").unwrap(),
            Bound::Offsets(BTreeMap::from([(0, 12), (2, 7)]))
        );
        for bad in ["yesterday", "0:x", "-1:3", "1:"] {
            assert!(Bound::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_committed_position_waits_for_the_first_record_in_flight_or_undone() {
        let mut p = Positions::default();
        p.start(0, 10);
        p.start(0, 11);
        p.start(1, 3);
        p.finish(0, 11);
        assert_eq!(p.committable(), BTreeMap::from([(0, 10), (1, 3)]));
        p.finish(0, 10);
        p.finish(1, 3);
        assert_eq!(p.committable(), BTreeMap::from([(0, 12), (1, 4)]));
        p.start(1, 4);
        p.leave_undone(1, 4);
        p.finish(1, 4);
        p.read(1, 5);
        assert_eq!(p.committable(), BTreeMap::from([(0, 12), (1, 4)]));
    }
}
