//! Kafka transactions: the replay's ([`Txn`], librdkafka's blocking calls on threads of
//! their own) and the ingress's with `kafka.exactly_once` ([`GroupCommit`]: deliveries
//! written in transactions committed together, each answered by its transaction's outcome).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};
use rdkafka::TopicPartitionList;

use super::outcome::{with_deadline, Delivered, DeliveryFailure, PublishError};
use super::producer::BridgeProducer;
use crate::metrics::Metrics;

/// How long a transaction may stay open before the broker aborts it (a replay that died
/// mid-transaction and is not run again): Kafka's own default.
pub(super) const TRANSACTION_TIMEOUT_MS: u64 = 60_000;

/// The transactions of a transactional [`Publisher`]: librdkafka's blocking calls, each on a
/// thread of its own.
pub struct Txn {
    pub(super) producer: BridgeProducer,
}

/// Why a transaction step failed, and what may follow.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct TxnError {
    pub error: KafkaError,
    /// The transaction must be aborted (its records and offsets are not committed).
    pub abort: bool,
    /// The step may be tried again.
    pub retriable: bool,
}

impl TxnError {
    fn of(error: KafkaError) -> TxnError {
        let (abort, retriable) = match &error {
            KafkaError::Transaction(e) => (e.txn_requires_abort(), e.is_retriable()),
            // The flush before a commit timed out: records are still in flight.
            _ => (true, false),
        };
        TxnError {
            error,
            abort,
            retriable,
        }
    }
}

impl Txn {
    async fn blocking<T: Send + 'static>(
        &self,
        step: impl FnOnce(&BridgeProducer) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, TxnError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || step(&producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
            .map_err(TxnError::of)
    }

    /// Gets the producer id, fencing any earlier producer with the same transactional id
    /// (a run that died) and finishing its open transaction.
    pub async fn init(&self, timeout: Duration) -> Result<(), TxnError> {
        self.blocking(move |p| p.init_transactions(timeout)).await
    }

    pub async fn begin(&self) -> Result<(), TxnError> {
        self.blocking(|p| p.begin_transaction()).await
    }

    /// Adds the consumer group's `offsets` to the transaction: they become visible with its
    /// records once it commits. Retriable, not resumable: sent again, it is a new request.
    pub async fn send_offsets(
        &self,
        offsets: TopicPartitionList,
        group: Arc<ConsumerGroupMetadata>,
        timeout: Duration,
    ) -> Result<(), TxnError> {
        self.blocking(move |p| p.send_offsets_to_transaction(&offsets, &group, timeout))
            .await
    }

    /// Commits the transaction: the records written since [`Txn::begin`] and the offsets
    /// sent become visible together. A retriable error (a timeout) leaves the commit in
    /// progress: call it again to resume it, and nothing else.
    pub async fn commit(&self, timeout: Duration) -> Result<(), TxnError> {
        self.blocking(move |p| {
            nothing_queued(p, timeout);
            p.commit_transaction(timeout)
        })
        .await
    }

    /// Aborts the transaction: nothing written since [`Txn::begin`] is visible to
    /// `read_committed` consumers, and the offsets are not moved.
    pub async fn abort(&self, timeout: Duration) -> Result<(), TxnError> {
        self.blocking(move |p| p.abort_transaction(timeout)).await
    }
}

// Exactly once for `read_committed` consumers (`kafka.exactly_once`): deliveries are written
// in Kafka transactions, committed together every few milliseconds (group commit), and a
// delivery is answered by its transaction's outcome: 200 once committed, 503 once aborted.
// A record is handed to the producer only inside an open transaction. The request's
// deadline may answer 503 first (and the probe, when Kafka cannot take the record): the
// delivery then holds its duplicate claim until the outcome, so that the sender's retry
// leaves no second visible copy.
//
// One transaction is open at a time (a producer has one): while it commits, the next
// deliveries wait to join the one after, and arrive in it together.

/// A transaction's outcome: committed, or why it was aborted.
pub(super) type TxnOutcome = Result<(), Arc<str>>;

/// The transaction deliveries join.
pub(super) struct OpenTxn {
    /// The producer whose transactions are initialised; None until they are.
    pub(super) producer: Option<BridgeProducer>,
    /// Whether a transaction is open: deliveries join only then.
    pub(super) begun: bool,
    /// Where the open transaction's outcome is announced.
    pub(super) outcome: tokio::sync::watch::Sender<Option<TxnOutcome>>,
}

/// The group commit of a transactional [`Publisher`].
pub struct GroupCommit {
    /// Deliveries hold it shared while they hand their record to the producer; the
    /// committer holds it alone to end the transaction and begin the next.
    pub(super) open: tokio::sync::RwLock<OpenTxn>,
    /// Records handed to the open transaction.
    pub(super) pending: std::sync::atomic::AtomicUsize,
    /// Records handed over whose delivery report has not come yet, and the committer's
    /// wake-up when the last comes: a commit is asked for once each is written, so that
    /// librdkafka's commit has nothing to flush.
    pub(super) unreported: std::sync::atomic::AtomicUsize,
    pub(super) reported: tokio::sync::Notify,
    pub(super) wake: tokio::sync::Notify,
    pub(super) linger: Duration,
    /// How long one commit or abort may take before it is tried again.
    pub(super) step_timeout: Duration,
    /// What readiness reads of the committer.
    pub(super) state: std::sync::Mutex<CommitterState>,
}

/// Since when the committer has been stuck, if it has: readiness says so once it is for
/// longer than Kafka's own failover.
#[derive(Debug)]
pub(super) struct CommitterState {
    /// Since when no transaction is open (deliveries are refused meanwhile), and why.
    pub(super) closed_since: Option<(tokio::time::Instant, String)>,
    /// Since when the open transaction has held records (cleared once it ends).
    pub(super) holding_since: Option<tokio::time::Instant>,
}

impl GroupCommit {
    /// A group commit of records that may each take `step_timeout`, lingering `linger` for
    /// more once a transaction holds one (the committer is started by the publisher).
    pub(super) fn new(linger: Duration, step_timeout: Duration) -> GroupCommit {
        GroupCommit {
            open: tokio::sync::RwLock::new(OpenTxn {
                producer: None,
                begun: false,
                outcome: tokio::sync::watch::channel(None).0,
            }),
            pending: std::sync::atomic::AtomicUsize::new(0),
            unreported: std::sync::atomic::AtomicUsize::new(0),
            reported: tokio::sync::Notify::new(),
            wake: tokio::sync::Notify::new(),
            linger,
            step_timeout,
            state: std::sync::Mutex::new(CommitterState {
                closed_since: Some((
                    tokio::time::Instant::now(),
                    "the producer's transactions are being initialised".into(),
                )),
                holding_since: None,
            }),
        }
    }

    /// Hands `record` to the open transaction (waiting for one until `deadline`); then what
    /// is left is waiting for the transaction's outcome, without a deadline: the committer
    /// always reaches one. That wait borrows nothing, so it can be finished when the request
    /// is gone, and it takes the record's report off the count the committer waits on,
    /// whatever happens.
    pub(super) async fn join(
        self: &Arc<Self>,
        record: FutureRecord<'_, [u8], [u8]>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<TxnReport, PublishError> {
        let waited = tokio::time::Instant::now();
        let open = with_deadline(deadline, self.open.read())
            .await
            .map_err(|_| PublishError::Timeout(waited.elapsed()))?;
        let Some(producer) = open.producer.as_ref().filter(|_| open.begun) else {
            return Err(PublishError::Unreachable(
                "no Kafka transaction can be opened now (the transactional producer's \
                 transactions are being initialised, or Kafka refuses them)"
                    .into(),
            ));
        };
        let outcome = open.outcome.subscribe();
        // Not handed over: not in the transaction, not written.
        let delivery = producer
            .send_result(record)
            .map_err(|(err, _)| PublishError::from_kafka(&err))?;
        self.unreported.fetch_add(1, Ordering::SeqCst);
        if self.pending.fetch_add(1, Ordering::SeqCst) == 0 {
            self.state()
                .holding_since
                .get_or_insert_with(tokio::time::Instant::now);
        }
        self.wake.notify_one();
        drop(open);
        Ok(TxnReport {
            group: self.clone(),
            delivery: Some(delivery),
            outcome,
        })
    }
}

/// A record handed to the open transaction: its report, then its transaction's outcome.
pub(super) struct TxnReport {
    group: Arc<GroupCommit>,
    /// Until its report has come; a report never awaited is taken off the count on drop.
    delivery: Option<DeliveryFuture>,
    outcome: tokio::sync::watch::Receiver<Option<TxnOutcome>>,
}

impl Drop for TxnReport {
    fn drop(&mut self) {
        if self.delivery.take().is_some() {
            self.group.reported_one();
        }
    }
}

impl TxnReport {
    pub(super) async fn verdict(mut self) -> Result<Delivered, PublishError> {
        let report = match self.delivery.as_mut() {
            Some(delivery) => delivery.await,
            None => unreachable!("a report is awaited once"),
        };
        self.delivery = None;
        self.group.reported_one();
        let verdict = match self.outcome.wait_for(Option::is_some).await {
            Ok(verdict) => verdict.clone().unwrap_or(Err("no outcome".into())),
            Err(_) => Err("the bridge stopped before the transaction ended".into()),
        };
        match (verdict, report) {
            (Ok(()), Ok(Ok(d))) => Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            }),
            // A transaction commits only when each of its records was written.
            (Ok(()), Ok(Err((err, _)))) => Err(PublishError::from_kafka(&err)),
            (Ok(()), Err(_canceled)) => Err(PublishError::Kafka {
                reason: DeliveryFailure::Other,
                detail: "the producer was shut down before the delivery report".into(),
            }),
            (Err(why), Ok(Err((err, _)))) => Err(PublishError::Kafka {
                reason: PublishError::from_kafka(&err).failure(),
                detail: format!("the transaction was aborted ({why}): {err}"),
            }),
            (Err(why), _) if why.contains(TXN_UNKNOWN) => Err(PublishError::Kafka {
                reason: DeliveryFailure::Transaction,
                detail: why.to_string(),
            }),
            (Err(why), _) => Err(PublishError::Kafka {
                reason: DeliveryFailure::Transaction,
                detail: format!("the transaction was aborted, nothing of it is visible: {why}"),
            }),
        }
    }
}

impl GroupCommit {
    /// No transaction is open, for `why` (kept since the first failure).
    pub(super) fn closed_because(&self, why: String) {
        let mut state = self.state();
        match &mut state.closed_since {
            Some((_, reason)) => *reason = why,
            None => state.closed_since = Some((tokio::time::Instant::now(), why)),
        }
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, CommitterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why readiness should say no: no transaction could be opened for `closed_for`
    /// (deliveries are refused meanwhile), or the open one has held records for longer than
    /// `holding_for` (twice a record's own delivery timeout: longer than a leader's
    /// failover, which holds every transaction back meanwhile) without ending.
    pub fn stalled(&self, closed_for: Duration, holding_for: Duration) -> Option<String> {
        let state = self.state();
        if let Some((since, why)) = &state.closed_since {
            if since.elapsed() > closed_for {
                return Some(format!(
                    "exactly once: no Kafka transaction could be opened for {:.0?}: {why}",
                    since.elapsed()
                ));
            }
        }
        match state.holding_since {
            Some(since) if since.elapsed() > holding_for => Some(format!(
                "exactly once: the open Kafka transaction has waited {:.0?} to commit (is the \
                 transaction coordinator unavailable? see the log)",
                since.elapsed()
            )),
            _ => None,
        }
    }

    /// One record handed over has its report (or will never be awaited).
    fn reported_one(&self) {
        if self.unreported.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.reported.notify_one();
        }
    }
}

/// A blocking step of librdkafka's transaction API, on a thread of its own.
pub(super) async fn txn_step<T: Send + 'static>(
    producer: &BridgeProducer,
    f: impl FnOnce(&BridgeProducer) -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || f(&producer))
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

fn txn_requires_abort(err: &KafkaError) -> bool {
    match err {
        KafkaError::Transaction(e) => e.txn_requires_abort(),
        _ => true,
    }
}

fn txn_is_retriable(err: &KafkaError) -> bool {
    match err {
        KafkaError::Transaction(e) => e.is_retriable(),
        _ => false,
    }
}

pub(super) fn txn_is_fatal(err: &KafkaError) -> bool {
    match err {
        KafkaError::Transaction(e) => e.is_fatal(),
        _ => false,
    }
}

/// The least `transaction.timeout.ms` of the ingress's transactions: past a leader's
/// failover with room to spare.
pub(super) const TXN_TIMEOUT_MS: u64 = 30_000;

/// How long no transaction may be open (deliveries refused at once) before readiness says
/// so: a few probes, longer than a commit that ends and the next that begins.
pub(super) const TXN_CLOSED_FOR: Duration = Duration::from_secs(2);

/// The prefix of an outcome after which the producer is replaced.
pub(super) const TXN_FATAL: &str = "the producer failed for good";

/// Commits the open transaction, or aborts it when Kafka says it must be: never leaves it
/// undecided. A commit that times out is resumed (librdkafka keeps it in progress: only
/// `commit_transaction` may be called again), as is an abort. A fatal error after a commit
/// was resumed leaves the outcome unknown: Kafka may have committed it.
pub(super) async fn end_transaction(
    group: &GroupCommit,
    producer: &BridgeProducer,
    metrics: &Metrics,
) -> TxnOutcome {
    let timeout = group.step_timeout;
    let mut resumed = false;
    let cause = loop {
        let steps = txn_step(producer, move |p| {
            let began = std::time::Instant::now();
            nothing_queued(p, timeout);
            let flushed = began.elapsed();
            let ended = p.commit_transaction(timeout);
            Ok((flushed, began.elapsed() - flushed, ended))
        });
        let (flushed, ended_in, ended) = match steps.await {
            Ok(steps) => steps,
            Err(err) => (Duration::ZERO, Duration::ZERO, Err(err)),
        };
        let observe = |step: &str, took: Duration| {
            metrics
                .transaction_commit
                .with_label_values(&[step])
                .observe(took.as_secs_f64())
        };
        observe("flush", flushed);
        observe("end", ended_in);
        match ended {
            Ok(()) => return Ok(()),
            Err(err) if txn_is_fatal(&err) && resumed => {
                return Err(format!("{TXN_FATAL}: {TXN_UNKNOWN} ({err})").into())
            }
            Err(err) if txn_is_fatal(&err) => return Err(format!("{TXN_FATAL}: {err}").into()),
            Err(err) if txn_is_retriable(&err) && !txn_requires_abort(&err) => {
                tracing::warn!(%err, "exactly once: the commit did not finish; resuming it");
                resumed = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => break err,
        }
    };
    loop {
        match txn_step(producer, move |p| p.abort_transaction(timeout)).await {
            Ok(()) => return Err(cause.to_string().into()),
            Err(err) if txn_is_fatal(&err) => return Err(format!("{TXN_FATAL}: {err}").into()),
            Err(err) => {
                tracing::warn!(%err, "exactly once: the abort did not finish; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The words of an outcome Kafka may have committed.
pub(super) const TXN_UNKNOWN: &str =
    "the transaction's outcome is unknown: Kafka may have committed it";

/// Waits, for up to `timeout`, until librdkafka holds no record: each one's report has been
/// handed over and the report itself let go. rdkafka's `commit_transaction` first flushes,
/// and its flush polls in steps of up to 100 ms while a report is still counted (librdkafka
/// lets a message go only once its report event is destroyed, just after the callback that
/// gave the report to the delivery); waiting here, in steps of 50 µs, leaves that flush
/// nothing to wait for.
fn nothing_queued(producer: &BridgeProducer, timeout: Duration) {
    let began = std::time::Instant::now();
    while producer.in_flight_count() > 0 && began.elapsed() < timeout {
        std::thread::sleep(Duration::from_micros(50));
    }
}
