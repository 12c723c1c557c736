//! Dead letters put through again once their cause is fixed (`tamio-kafka-bridge replay`).
//!
//! - **Re-verified, not trusted.** Each dead letter's body is verified against its recorded
//!   signature headers with the current secrets, the time window judged at its
//!   `received_at`. Write access to the dead-letter topic is no way in.
//! - **The live pipeline.** [`Ingest::replay`]: envelope rules, routes, duplicate
//!   suppression and the record format of a live delivery, plus `replayed_from` and
//!   `replayed_at`. A dead letter that still fails stays where it is and is reported.
//! - **Never skipped.** A letter that stays is taken up again by the next run of the same
//!   command, and only such letters: the group's position and the letters still to do are
//!   committed together (see [`positions`]). A run that leaves letters behind exits 2.
//! - **Per ticket in order.** Dead letters are keyed by ticket, so a ticket's are in one
//!   partition; up to `concurrency` records are in flight at once, never two of one key,
//!   and once a letter of a ticket stays, its later letters stay with it.
//! - **Exactly once.** Records and the group's position are committed in one Kafka
//!   transaction, about every second: a run stopped by a signal commits what it finished; a
//!   run killed, or halted by Kafka, leaves its open transaction aborted, and the next run
//!   puts those letters through again. `read_committed` consumers see each letter once.

pub mod positions;
mod source;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Kafka;
use crate::ingest::route::Pattern;
use crate::ingest::{envelope, HeldClaim, Ingest, IngestError, ReplayAccepted};
use crate::publish::record::{
    rfc3339_millis, Replayed, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};
use crate::publish::{Txn, TxnError};
use positions::{Positions, Step};
use source::{is_transient, Source, KAFKA_PATIENCE};
pub use source::{Bound, ReplayError};

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
    /// Why the replay stopped before the end (a signal, Kafka, the duplicate store), if it
    /// did: the same command resumes.
    pub stopped: Option<String>,
    /// Partitions read no further because more letters stay in them than one commit can
    /// name: their cause must be fixed first.
    pub crowded: Vec<i32>,
    /// The group's committed position per partition at the end (the first letter still to
    /// do, or the next to read).
    pub positions: BTreeMap<i32, i64>,
    /// Letters the next run of the same command takes up again, per partition (those that
    /// stay, and those a stop left undone).
    pub to_do: BTreeMap<i32, usize>,
    pub elapsed_secs: f64,
    pub records_per_sec: f64,
}

impl Summary {
    /// The summary of a replay stopped before it read anything.
    pub fn interrupted(options: &Options, started: Instant) -> Summary {
        Summary {
            topic: options.topic.clone(),
            group: options.group.clone(),
            dry_run: options.dry_run,
            counts: Counts::default(),
            would_publish_to: BTreeMap::new(),
            stayed: Vec::new(),
            complete: false,
            stopped: Some("interrupted before the first letter was read".into()),
            crowded: Vec::new(),
            positions: BTreeMap::new(),
            to_do: BTreeMap::new(),
            elapsed_secs: started.elapsed().as_secs_f64(),
            records_per_sec: 0.0,
        }
    }

    /// Exit status: 0 when everything selected was published (or was already), 2 when some
    /// stay (fix their cause, then run the same command again: it takes up exactly those),
    /// 3 when the replay stopped before the end (run it again to resume).
    pub fn exit_code(&self) -> i32 {
        if self.stopped.is_some() {
            3
        } else if self.counts.refused_total() > 0 || !self.crowded.is_empty() {
            2
        } else {
            0
        }
    }
}

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
        // Letters written before they were keyed by ticket: the body's ticket, for order.
        let key = message
            .key()
            .map(<[u8]>::to_vec)
            .or_else(|| envelope::peek_ticket_id(&body).map(String::into_bytes));
        Letter {
            partition: message.partition(),
            offset: message.offset(),
            key,
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

/// How a letter is put through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Publish,
    /// Judged, nothing written.
    DryRun,
    /// Judged, nothing written: an earlier letter of its ticket stays, so one that would be
    /// published stays with it (one refused in its own right says why).
    Held,
}

async fn put_through(
    ingest: Arc<Ingest>,
    letter: Letter,
    topic: Arc<str>,
    mode: Mode,
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
            mode != Mode::Publish,
        )
        .await;
    let outcome = match result {
        Ok(_) if mode == Mode::Held => Outcome::Stays {
            reason: "held_for_ticket_order".into(),
            detail: "an earlier dead letter of the same ticket stays; this one stays with it \
                     so that the ticket's events are published in order"
                .into(),
        },
        Ok(a) if mode == Mode::DryRun => Outcome::WouldPublish(a),
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

/// How long one transaction request (sending the group's position, a commit) may take before
/// it is sent again or resumed.
const KAFKA_STEP: Duration = Duration::from_secs(10);

/// How long a commit is resumed before its outcome is called unknown: past the
/// transaction's own timeout (60 s), after which the coordinator has ended it either way.
const COMMIT_PATIENCE: Duration = Duration::from_secs(75);

/// How often the open transaction is committed, with the group's position.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// The first letters that stay, listed in the summary.
const STAYED_LISTED: usize = 1000;

/// What a summary reports, kept so that an aborted transaction can take its share back.
#[derive(Debug, Clone, Default)]
struct Tally {
    counts: Counts,
    would_publish_to: BTreeMap<String, u64>,
    stayed: Vec<Stayed>,
}

/// The open transaction: the claims of the records written in it, and what to go back to if
/// it is aborted.
struct Batch {
    begun: Instant,
    before: (Positions, Tally, HashSet<Vec<u8>>),
    claims: Vec<HeldClaim>,
    /// The (endpoint id, event id) each letter put through in it names: a letter naming one
    /// again waits for the commit, which lets go of the first one's claim (it would wait for
    /// that claim, and the commit for it).
    ids: HashSet<(String, String)>,
    /// A letter waits for the commit.
    due: bool,
}

/// A replay under way.
struct Replay {
    ingest: Arc<Ingest>,
    topic: Arc<str>,
    options: Options,
    request_timeout: Duration,
    signature_headers: Vec<HeaderName>,
    positions: Positions,
    tally: Tally,
    keys_in_flight: HashSet<Vec<u8>>,
    /// Tickets with a letter that stays in this run: their later letters stay too, so that
    /// a ticket's events are published in order once the cause is fixed.
    held_keys: HashSet<Vec<u8>>,
    /// A letter read whose ticket has one in flight: it waits, and reading with it.
    waiting: Option<Letter>,
    /// Why the replay stops before the end; `halted` when Kafka or the store failed (the open
    /// transaction is then aborted rather than committed).
    stopped: Option<String>,
    halted: bool,
    crowded: Vec<i32>,
    batch: Option<Batch>,
    /// The group's position as last committed.
    committed: BTreeMap<i32, i64>,
}

type InFlight = std::pin::Pin<Box<dyn Future<Output = (Letter, Outcome)>>>;

impl Replay {
    /// Whether the open transaction should be committed now: new letters wait meanwhile.
    fn commit_due(&self) -> bool {
        self.batch
            .as_ref()
            .is_some_and(|b| b.due || b.begun.elapsed() >= COMMIT_EVERY)
    }

    /// Opens a transaction before the first letter read after the last commit.
    async fn open_batch(&mut self, txn: Option<&Txn>) {
        let Some(txn) = txn else { return };
        if self.batch.is_some() || self.stopped.is_some() {
            return;
        }
        if let Err(e) = txn.begin().await {
            self.halt(format!("cannot begin a transaction: {e}"));
            return;
        }
        self.batch = Some(Batch {
            begun: Instant::now(),
            before: (
                self.positions.clone(),
                self.tally.clone(),
                self.held_keys.clone(),
            ),
            claims: Vec::new(),
            ids: HashSet::new(),
            due: false,
        });
    }

    fn halt(&mut self, why: String) {
        self.halted = true;
        self.stopped.get_or_insert(why);
    }

    /// A letter handed over by the consumer: passed over, or made to wait its turn.
    fn take(&mut self, source: &mut Source, letter: Letter) {
        let (p, o) = (letter.partition, letter.offset);
        source.consumed.insert(p, o + 1);
        if source.until.get(&p).is_some_and(|&until| o >= until) {
            source.close(p);
            return;
        }
        if self.positions.read(p, o) == Step::Done {
            return;
        }
        if source.since.get(&p).is_some_and(|&since| o < since) {
            self.positions.done(p, o);
            return;
        }
        self.tally.counts.read += 1;
        if !self.options.selection.admits(&letter) {
            self.positions.done(p, o);
            return;
        }
        self.tally.counts.selected += 1;
        self.waiting = Some(letter);
    }

    /// Starts the waiting letter if its ticket has none in flight and there is room.
    fn start_waiting(&mut self, in_flight: &mut FuturesUnordered<InFlight>) {
        if self.stopped.is_some() || self.commit_due() {
            return;
        }
        let Some(letter) = self.waiting.take() else {
            return;
        };
        let key = letter.key.clone();
        if key
            .as_ref()
            .is_some_and(|k| self.keys_in_flight.contains(k))
            || in_flight.len() >= self.options.concurrency.max(1)
        {
            self.waiting = Some(letter);
            return;
        }
        let mode = if key.as_ref().is_some_and(|k| self.held_keys.contains(k)) {
            Mode::Held
        } else if self.options.dry_run {
            Mode::DryRun
        } else {
            Mode::Publish
        };
        if let (
            Mode::Publish,
            Some(batch),
            Peek {
                event_id: Some(event),
                endpoint_id: Some(endpoint),
                ..
            },
        ) = (mode, self.batch.as_mut(), &letter.peeked)
        {
            if !batch.ids.insert((endpoint.clone(), event.clone())) {
                batch.due = true;
                self.waiting = Some(letter);
                return;
            }
        }
        if let Some(k) = key {
            self.keys_in_flight.insert(k);
        }
        in_flight.push(Box::pin(put_through(
            self.ingest.clone(),
            letter,
            self.topic.clone(),
            mode,
            self.request_timeout,
        )));
    }

    /// Counts a letter's outcome and moves the position past it when it needs nothing more.
    fn record(&mut self, letter: Letter, outcome: Outcome, source: &mut Source) {
        if let Some(k) = &letter.key {
            self.keys_in_flight.remove(k);
        }
        let (p, o) = (letter.partition, letter.offset);
        let counts = &mut self.tally.counts;
        match outcome {
            Outcome::Published(mut a) => {
                counts.published += 1;
                tracing::debug!(
                    at = %letter.position(),
                    event_id = %a.event_id,
                    topic = %a.topic,
                    partition = a.partition,
                    offset = a.offset,
                    "published"
                );
                if let (Some(claim), Some(batch)) = (a.held.take(), self.batch.as_mut()) {
                    batch.claims.push(claim);
                }
                self.positions.done(p, o);
            }
            Outcome::Duplicate(a) => {
                counts.duplicate += 1;
                tracing::debug!(
                    at = %letter.position(),
                    event_id = %a.event_id,
                    "already published: nothing written"
                );
                self.positions.done(p, o);
            }
            Outcome::WouldPublish(a) => {
                counts.would_publish += 1;
                *self
                    .tally
                    .would_publish_to
                    .entry(a.topic.to_string())
                    .or_default() += 1;
                self.positions.done(p, o);
            }
            Outcome::Stays { reason, detail } => {
                *counts.refused.entry(reason.clone()).or_default() += 1;
                tracing::info!(at = %letter.position(), %reason, "{detail}");
                if let Some(k) = &letter.key {
                    self.held_keys.insert(k.clone());
                }
                if self.tally.stayed.len() < STAYED_LISTED {
                    self.tally.stayed.push(Stayed {
                        partition: p,
                        offset: o,
                        event_id: letter.peeked.event_id.clone(),
                        reason,
                        detail,
                    });
                }
                if self.positions.crowded(p) && !self.crowded.contains(&p) {
                    tracing::warn!(
                        partition = p,
                        "so many dead letters stay in this partition that no more of it is \
                         read in this run; fix their cause, then run again"
                    );
                    self.crowded.push(p);
                    source.close(p);
                }
            }
            Outcome::Halt(why) => {
                tracing::warn!(at = %letter.position(), "{why}; stopping");
                self.halt(why);
            }
        }
    }

    /// Commits the open transaction with the group's position; on failure aborts it, and
    /// the replay stops. The offsets are sent again while that fails with a retriable error;
    /// a commit that times out is resumed (librdkafka keeps it in progress: sending the
    /// offsets again or aborting would be refused), for up to [`COMMIT_PATIENCE`]. If it has
    /// not ended by then, its outcome is unknown: the replay stops, and the next run's
    /// producer finishes it (committed, or aborted) before anything is read.
    async fn commit(&mut self, txn: &Txn, group: &Arc<ConsumerGroupMetadata>, topic: &str) {
        let Some(batch) = self.batch.take() else {
            return;
        };
        let planned = self.positions.committable();
        let mut offsets = TopicPartitionList::new();
        for (&p, c) in &planned {
            let mut e = offsets.add_partition(topic, p);
            if e.set_offset(Offset::Offset(c.offset)).is_ok() {
                e.set_metadata(&c.metadata);
            }
        }
        let started = Instant::now();
        let patient = |e: &TxnError| e.retriable && !e.abort && started.elapsed() < COMMIT_PATIENCE;
        let mut sent = Ok(());
        if offsets.count() > 0 {
            sent = loop {
                match txn
                    .send_offsets(offsets.clone(), group.clone(), KAFKA_STEP)
                    .await
                {
                    Err(e) if patient(&e) => {
                        tracing::info!(error = %e, "sending the group's position again");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    result => break result,
                }
            };
        }
        let result = match sent {
            Err(e) => Err(e),
            Ok(()) => loop {
                match txn.commit(KAFKA_STEP).await {
                    Err(e) if patient(&e) => {
                        tracing::info!(error = %e, "the commit has not ended; resuming it");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) if e.retriable && !e.abort => {
                        // Still in progress in librdkafka and perhaps at the coordinator:
                        // neither committed nor aborted as far as this run knows.
                        self.halt(format!(
                            "the transaction's commit did not end within {COMMIT_PATIENCE:?} \
                             ({e}): its outcome is unknown; the next run finishes it before \
                             reading, and takes up whatever it did not commit"
                        ));
                        return;
                    }
                    result => break result,
                }
            },
        };
        match result {
            Ok(()) => {
                tracing::debug!(published = batch.claims.len(), "committed");
                for claim in batch.claims {
                    claim.acknowledged();
                }
                self.committed = planned.into_iter().map(|(p, c)| (p, c.offset)).collect();
            }
            Err(e) => {
                self.halt(format!("the transaction could not be committed: {e}"));
                self.abort(txn, batch).await;
            }
        }
    }

    /// Aborts the open transaction: nothing it wrote is visible to `read_committed`
    /// consumers, its claims are released, and its letters count as not done.
    async fn abort(&mut self, txn: &Txn, batch: Batch) {
        if let Err(e) = txn.abort(KAFKA_PATIENCE).await {
            // The broker aborts it when it times out, or the next run's producer does.
            tracing::warn!(error = %e, "aborting the transaction failed");
        }
        let (positions, tally, held) = batch.before;
        self.positions = positions;
        self.tally = tally;
        self.held_keys = held;
        drop(batch.claims);
    }
}

/// Runs a replay of `options.topic` through `ingest` until every partition is read to its
/// end, or `stop` completes (Ctrl-C, SIGTERM, SIGHUP), or Kafka fails. Records are written
/// through `txn`'s transactions (none for a dry run). `progress` is called with the counts
/// after each letter.
pub async fn run(
    ingest: Arc<Ingest>,
    txn: Option<Txn>,
    kafka: &Kafka,
    request_timeout: Duration,
    options: Options,
    mut progress: impl FnMut(&Counts),
    stop: impl Future<Output = ()>,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    tokio::pin!(stop);
    let Some((mut source, positions)) = open(txn.as_ref(), kafka, &options, stop.as_mut()).await?
    else {
        return Ok(Summary::interrupted(&options, started));
    };
    let group = match &txn {
        Some(_) => source.consumer.group_metadata().map(Arc::new),
        None => None,
    };
    tracing::info!(
        topic = %source.topic,
        group = %options.group,
        dry_run = options.dry_run,
        partitions = source.open.len(),
        "replaying dead letters"
    );
    let mut replay = Replay {
        topic: Arc::from(source.topic.as_str()),
        signature_headers: ingest.verifier().signature_headers(),
        ingest,
        options,
        request_timeout,
        positions,
        tally: Tally::default(),
        keys_in_flight: HashSet::new(),
        held_keys: HashSet::new(),
        waiting: None,
        stopped: None,
        halted: false,
        crowded: Vec::new(),
        batch: None,
        committed: source.committed.clone(),
    };
    let txn = txn.as_ref().zip(group.as_ref());
    replay.drive(&mut source, txn, &mut progress, stop).await;
    Ok(replay.summary(&source.topic, started))
}

/// Initialises the transactions, then opens the dead-letter topic's consumer; None when
/// `stop` completes first. Transactions first: initialising them fences a run of this
/// group that died and finishes its open transaction, whose offsets a read_committed
/// lookup would otherwise wait for until Kafka times the transaction out.
async fn open<S: Future<Output = ()>>(
    txn: Option<&Txn>,
    kafka: &Kafka,
    options: &Options,
    mut stop: std::pin::Pin<&mut S>,
) -> Result<Option<(Source, Positions)>, ReplayError> {
    if let Some(txn) = txn {
        tokio::select! {
            ready = txn.init(KAFKA_PATIENCE) => ready.map_err(|error| ReplayError::Transactions {
                id: options.group.clone(),
                error,
            })?,
            () = &mut stop => return Ok(None),
        }
    }
    let mut positions = Positions::default();
    let selection = &options.selection;
    let opened = Source::open(
        kafka,
        &options.topic,
        &options.group,
        &selection.since,
        &selection.until,
        &mut positions,
    );
    tokio::select! {
        source = opened => Ok(Some((source?, positions))),
        () = &mut stop => Ok(None),
    }
}

impl Replay {
    /// Reads, puts through and commits letters until the end, a stop or a halt. `txn`: the
    /// transactions and the consumer group's metadata (none for a dry run).
    async fn drive<S: Future<Output = ()>>(
        &mut self,
        source: &mut Source,
        txn: Option<(&Txn, &Arc<ConsumerGroupMetadata>)>,
        progress: &mut impl FnMut(&Counts),
        mut stop: std::pin::Pin<&mut S>,
    ) {
        let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        let mut ends = tokio::time::interval(Duration::from_millis(100));
        ends.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let only_txn = txn.map(|(txn, _)| txn);
        loop {
            // A letter read before the last commit starts in the next transaction.
            if self.waiting.is_some() && !self.commit_due() {
                self.open_batch(only_txn).await;
            }
            self.start_waiting(&mut in_flight);
            // A transaction is committed between letters, when its time has come or at the
            // end.
            let draining = self.commit_due() || self.stopped.is_some();
            let reading = !draining
                && self.waiting.is_none()
                && !source.open.is_empty()
                && in_flight.len() < self.options.concurrency.max(1);
            if in_flight.is_empty() && !reading {
                self.end_batch(txn, &source.topic).await;
                if self.stopped.is_some() || (self.waiting.is_none() && source.open.is_empty()) {
                    return;
                }
                continue;
            }
            tokio::select! {
                biased;
                () = &mut stop, if self.stopped.is_none() => {
                    self.stopped = Some("interrupted".into());
                }
                Some((letter, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.record(letter, outcome, source);
                    progress(&self.tally.counts);
                }
                _ = ends.tick(), if reading => source.close_the_ends(),
                message = source.consumer.recv(), if reading => match message {
                    Ok(m) => {
                        let letter = Letter::read(&m, &self.signature_headers);
                        drop(m);
                        self.open_batch(only_txn).await;
                        self.take(source, letter);
                        progress(&self.tally.counts);
                    }
                    Err(KafkaError::PartitionEOF(p)) => source.close(p),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the dead-letter topic");
                        if !is_transient(&e) {
                            self.halt(format!("reading the dead-letter topic: {e}"));
                        }
                    }
                },
            }
        }
    }

    /// With nothing in flight: commits the open transaction, or aborts it once halted.
    async fn end_batch(&mut self, txn: Option<(&Txn, &Arc<ConsumerGroupMetadata>)>, topic: &str) {
        let Some((txn, group)) = txn else {
            return;
        };
        if !self.halted {
            self.commit(txn, group, topic).await;
        } else if let Some(batch) = self.batch.take() {
            self.abort(txn, batch).await;
        }
    }

    /// What the run did, for the operator.
    fn summary(self, topic: &str, started: Instant) -> Summary {
        let elapsed = started.elapsed().as_secs_f64();
        let Replay {
            options,
            tally,
            stopped,
            crowded,
            committed,
            positions,
            ..
        } = self;
        Summary {
            topic: topic.to_owned(),
            group: options.group,
            dry_run: options.dry_run,
            records_per_sec: if elapsed > 0.0 {
                tally.counts.read as f64 / elapsed
            } else {
                0.0
            },
            counts: tally.counts,
            would_publish_to: tally.would_publish_to,
            stayed: tally.stayed,
            complete: stopped.is_none() && crowded.is_empty(),
            stopped,
            crowded,
            positions: committed,
            to_do: positions.to_do(),
            elapsed_secs: elapsed,
        }
    }
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
}
