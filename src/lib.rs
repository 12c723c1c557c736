//! tamio-kafka-bridge: receives signed Tamio webhook deliveries and publishes each ticket
//! event to Kafka, keyed by ticket id, answering the sender only once Kafka has it.
//!
//! [`run`] compiles the settings into a [`plan::Plan`], wires the stages together and owns
//! the order of shutdown: readiness turns 503, the ingress stops accepting, requests in
//! flight finish (within `server.drain_timeout_ms`), the producer flushes (within
//! `kafka.flush_timeout_ms`), then the admin listener closes.
//!
//! Modules, and the direction of their imports (nothing imports upward):
//! `lib` -> `server`, `admin`, `ingest`, `publish`, `reload`, `plan` -> `metrics`, `config`,
//! `error`.

pub mod admin;
pub mod config;
pub mod error;
pub mod finish;
pub mod ingest;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod publish;
pub mod reload;
pub mod replay;
pub mod server;
pub mod trace;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::admin::Readiness;
use crate::config::Settings;
use crate::error::Outcome;
use crate::ingest::verify::SignatureFailure;
use crate::ingest::Ingest;
use crate::metrics::{Labels, Metrics};
use crate::plan::{Plan, PlanError};
use crate::publish::{DeliveryFailure, Publisher};
use crate::reload::{Reload, ReloadResult};
use crate::server::tls::Tls;
use crate::server::{CloseReason, Drain, Limits};

/// Why the bridge could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "setting `kafka.brokers` is empty: run() needs a broker (main starts the embedded one)"
    )]
    NoBrokers,
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Dedup(String),
    #[error("cannot start tracing: {0}")]
    Tracing(String),
    #[error(transparent)]
    Replay(#[from] replay::ReplayError),
    #[error("the destination topics cannot be written: {0}")]
    Destinations(String),
}

/// The bridge's metrics, every fixed label set taken from the stage that owns it.
pub fn metrics() -> Metrics {
    Metrics::new(&Labels {
        outcomes: Outcome::ALL.map(Outcome::as_str).to_vec(),
        event_types: ingest::envelope::KNOWN_EVENT_TYPES
            .into_iter()
            .chain([ingest::envelope::OTHER_EVENT_TYPE])
            .collect(),
        delivery_failures: DeliveryFailure::ALL.map(DeliveryFailure::as_str).to_vec(),
        signature_failures: SignatureFailure::ALL.map(SignatureFailure::as_str).to_vec(),
        reload_results: ReloadResult::ALL.map(ReloadResult::as_str).to_vec(),
        connection_closes: CloseReason::ALL.map(CloseReason::as_str).to_vec(),
    })
}

/// Runs the bridge on the given listeners until `shutdown` completes, then shuts down in
/// order. Returns once everything it started has stopped.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let plan = Plan::compile(&settings)?;
    let (_no_reloads, reloads) = mpsc::channel(1);
    run_with_reloads(plan, listener, admin_listener, shutdown, reloads).await
}

/// Like [`run`], from a compiled plan, and puts in force the signature settings and TLS
/// certificate of each [`Reload`] received (main sends one on SIGHUP and on a changed file).
/// Other settings apply at the next start.
pub async fn run_with_reloads(
    plan: Plan,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<Reload>,
) -> Result<(), RunError> {
    let (stages, ingress) = Stages::start(plan, Mode::Serve)?;
    let Stages {
        settings,
        metrics,
        publisher,
        ingest,
        ..
    } = &stages;
    let tls = ingress.certificate.map(|c| Arc::new(Tls::new(c)));
    let readiness = Arc::new(Readiness::new(metrics.clone()));
    let probe = tokio::spawn(probe_kafka(
        publisher.clone(),
        readiness.clone(),
        ingress.topics,
        Duration::from_millis(settings.kafka.readiness_interval_ms),
        Duration::from_millis(settings.kafka.readiness_timeout_ms),
    ));
    let admin_addr = admin_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = start_admin(admin_listener, &readiness, metrics, ingress.limits);
    if let Some(tls) = &tls {
        metrics.tls_certificate_expiry.set(tls.not_after());
    }
    warn_about_weak_settings(settings);
    announce_memory(settings);
    let reload_task = tokio::spawn(reload::apply(
        reload::Running::new(
            settings.clone(),
            ingest.clone(),
            tls.clone(),
            metrics.clone(),
            publisher.clone(),
        )
        .await,
        reloads,
    ));
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        path = %settings.server.path,
        admin = %admin_addr,
        tls = tls.is_some(),
        "accepting webhook deliveries"
    );
    let handling = ingest.clone();
    let drain = server::serve(
        listener,
        tls,
        move |req| handling.clone().handle(req),
        ingress.limits,
        metrics.clone(),
        async move {
            shutdown.await;
            // Readiness fails before the listener closes, so load balancers stop first.
            readiness.set_shutting_down();
            tracing::info!("shutting down: no new connections; finishing requests in flight");
        },
    )
    .await;
    if drain == Drain::TimedOut {
        tracing::warn!(
            drain_timeout_ms = settings.server.drain_timeout_ms,
            "requests still in flight at the drain deadline were cut short"
        );
    }
    probe.abort();
    reload_task.abort();
    stages.shut_down(admin).await;
    Ok(())
}

/// The stages serving and replay share, started from a plan: metrics, the publisher,
/// tracing and the request pipeline.
struct Stages {
    settings: Settings,
    metrics: Arc<Metrics>,
    publisher: Arc<Publisher>,
    traces: Arc<trace::Tracing>,
    ingest: Arc<Ingest>,
}

/// What the stages are started for.
enum Mode<'a> {
    /// Serving senders, with the producer `kafka.exactly_once` asks for.
    Serve,
    /// Replaying dead letters: records and the group's position are committed together, so
    /// the producer's transactional id is the group's name (a run fences the one before it
    /// and finishes its open transaction); a dry run writes nothing and needs none.
    Replay(&'a replay::Options),
}

/// What the plan holds for serving alone.
struct Ingress {
    certificate: Option<server::tls::Certificate>,
    limits: Limits,
    topics: Vec<String>,
}

impl Stages {
    fn start(plan: Plan, mode: Mode<'_>) -> Result<(Stages, Ingress), RunError> {
        if plan.settings.embedded_kafka() {
            return Err(RunError::NoBrokers);
        }
        let Plan {
            settings,
            routes,
            verifier,
            dedup,
            producer,
            certificate,
            limits,
            topics,
            tracing: trace_plan,
        } = plan;
        let metrics = Arc::new(metrics());
        let kafka = &settings.kafka;
        let publisher = match mode {
            Mode::Serve if kafka.exactly_once => {
                let id = kafka.transactional_id();
                tracing::info!(transactional_id = %id, "exactly once: deliveries are written in Kafka transactions");
                let linger = Duration::from_millis(kafka.transaction_linger_ms);
                Publisher::exactly_once(producer, metrics.clone(), &kafka.topic, &id, linger)?
            }
            Mode::Replay(options) if !options.dry_run => Arc::new(Publisher::transactional(
                producer,
                metrics.clone(),
                &kafka.topic,
                &options.group,
            )?),
            Mode::Serve | Mode::Replay(_) => {
                Arc::new(Publisher::new(producer, metrics.clone(), &kafka.topic)?)
            }
        };
        if let Mode::Serve = mode {
            tracing::info!(
                brokers = %kafka.brokers,
                topic = %kafka.topic,
                producer = ?publisher.describe(),
                "producer created"
            );
            reload::announce_signing(&settings, &verifier, &metrics);
        }
        let traces = trace::Tracing::start(&trace_plan, metrics.trace_spans_dropped.clone())
            .map_err(RunError::Tracing)?;
        if let Some(endpoint) = &trace_plan.endpoint {
            tracing::info!(%endpoint, "exporting traces");
        }
        let traces = Arc::new(traces);
        let ingest = Ingest::new(
            &settings,
            routes,
            verifier,
            dedup,
            publisher.clone(),
            metrics.clone(),
            traces.clone(),
        )
        .map_err(RunError::Dedup)?;
        let stages = Stages {
            settings,
            metrics,
            publisher,
            traces,
            ingest: Arc::new(ingest),
        };
        let ingress = Ingress {
            certificate,
            limits,
            topics,
        };
        Ok((stages, ingress))
    }

    /// Flushes the stages in order (`flush_stages`), logging what was left, then closes
    /// the admin listener.
    async fn shut_down(self, admin: Admin) {
        let outstanding =
            flush_stages(&self.settings, &self.publisher, &self.ingest, &self.traces).await;
        if outstanding == 0 {
            tracing::info!("producer flushed");
        } else {
            tracing::warn!(
                outstanding,
                "records still unacknowledged at the flush deadline (their senders were answered 503)"
            );
        }
        admin.stop().await;
        tracing::info!("stopped");
    }
}

/// The admin listener's server (metrics, health), and its stop.
struct Admin {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Drain>,
}

impl Admin {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves the admin listener until [`Admin::stop`]: HTTP/1 only, few connections (probes
/// and scrapers need nothing more).
fn start_admin(
    listener: TcpListener,
    readiness: &Arc<Readiness>,
    metrics: &Arc<Metrics>,
    ingress_limits: Limits,
) -> Admin {
    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = Limits {
        http2: false,
        max_connections: 64,
        drain_timeout: Duration::from_secs(1),
        ..ingress_limits
    };
    let task = tokio::spawn(server::serve(
        listener,
        None,
        move |req| admin.clone().handle(req),
        limits,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Admin { stop, task }
}

/// Replays the dead letters `options` select through the pipeline of `plan` (its routes,
/// secrets, envelope rules, duplicate store and record format), until the topic is read to
/// its end or `stop` completes; then flushes the producer and the duplicate store's writes.
pub async fn replay(
    plan: Plan,
    options: replay::Options,
    progress: impl FnMut(&replay::Counts),
    stop: impl Future<Output = ()>,
) -> Result<replay::Summary, RunError> {
    let (stages, ingress) = Stages::start(plan, Mode::Replay(&options))?;
    // Nothing is read before every destination can be written: a missing topic would
    // otherwise stop the replay at its first record. A stop meanwhile ends it at once.
    tokio::pin!(stop);
    if !options.dry_run {
        let timeout = Duration::from_millis(stages.settings.kafka.readiness_timeout_ms)
            .max(Duration::from_secs(5));
        // The routes' topics: the dead-letter topic (the plan's last) is read, not written.
        let mut topics = ingress.topics;
        if stages.settings.dead_letter_topic().is_some() {
            topics.pop();
        }
        let probed = tokio::select! {
            probed = stages.publisher.probe(&topics, timeout) => probed,
            () = &mut stop => {
                return Ok(replay::Summary::interrupted(&options, std::time::Instant::now()))
            }
        };
        probed
            // The transactional producer gets its id when the replay starts its transactions.
            .or_else(|e| match e.failure {
                publish::probe::ProbeFailure::NoProducerId => Ok(Vec::new()),
                _ => Err(e),
            })
            .map_err(|e| RunError::Destinations(e.to_string()))?;
    }
    let txn = (!options.dry_run).then(|| stages.publisher.txn());
    let summary = replay::run(
        stages.ingest.clone(),
        txn,
        &stages.settings.kafka,
        stages.settings.request_timeout(),
        options,
        progress,
        stop,
    )
    .await;
    flush_stages(
        &stages.settings,
        &stages.publisher,
        &stages.ingest,
        &stages.traces,
    )
    .await;
    Ok(summary?)
}

/// What the stages hold at the end, flushed in order: the producer's records (within
/// `kafka.flush_timeout_ms`), then the shared duplicate store's writes of their
/// acknowledgements, then the spans waiting for export. Returns the records still
/// unacknowledged.
async fn flush_stages(
    settings: &Settings,
    publisher: &Publisher,
    ingest: &Ingest,
    traces: &Arc<trace::Tracing>,
) -> i32 {
    let outstanding = publisher
        .flush(Duration::from_millis(settings.kafka.flush_timeout_ms))
        .await;
    // The acknowledgements of what was just flushed: until they are in the store, another
    // replica would write those events again once their claims expire. A writer retrying
    // after a failure pauses up to a second between rounds: it gets the producer's budget.
    let unwritten = ingest
        .flush_dedup(Duration::from_millis(settings.kafka.flush_timeout_ms))
        .await;
    if unwritten > 0 {
        tracing::warn!(
            unwritten,
            "acknowledgements not written to the shared duplicate store before the deadline: \
             another replica may write those events again once their claims expire"
        );
    }
    let flushing = traces.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.shutdown(Duration::from_secs(2))).await;
    outstanding
}

/// Logs the memory the settings allow at their bounds, and warns when the container's limit
/// is below it.
fn announce_memory(settings: &Settings) {
    let budget = memory::Budget::of(settings);
    match memory::container_limit() {
        Some(limit) if budget.total() > limit => tracing::warn!(
            limit_mib = limit >> 20,
            %budget,
            "the memory these settings allow at their bounds is above the container's limit: \
             lower server.max_connections, server.body_memory_bytes, kafka.queue_max_kbytes, \
             kafka.queue_max_messages or dedup.max_entries (docs/operations.md, Memory)"
        ),
        limit => tracing::info!(
            limit_mib = limit.map(|l| l >> 20),
            %budget,
            "memory at the bounds"
        ),
    }
}

/// Warns at start about settings that work but weaken what the bridge promises.
fn warn_about_weak_settings(settings: &Settings) {
    let sasl = &settings.kafka.sasl;
    if sasl.mechanism == Some(crate::config::SaslMechanism::Plain) && !settings.kafka.tls.enabled {
        tracing::warn!(
            "kafka.sasl.mechanism PLAIN without kafka.tls: the Kafka password crosses the \
             network in cleartext"
        );
    }
    let sig = &settings.signature;
    let plain_mac = (sig.scheme == crate::config::Scheme::HmacSha256 && !sig.secrets.is_empty())
        || sig
            .endpoints
            .values()
            .any(|e| e.scheme.unwrap_or(sig.scheme) == crate::config::Scheme::HmacSha256);
    if plain_mac && settings.dedup.window_secs == 0 {
        tracing::warn!(
            "the hmac-sha256 scheme signs no timestamp and dedup.window_secs is 0: a captured \
             delivery can be replayed at any time"
        );
    }
}

/// Probes the producer's connection every `interval` and keeps readiness up to date.
async fn probe_kafka(
    publisher: Arc<Publisher>,
    readiness: Arc<Readiness>,
    topics: Vec<String>,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        let state = publisher.probe(&topics, timeout).await;
        let ok = state.is_ok();
        let seen = state.clone();
        if readiness.set_kafka(state.map_err(|e| e.to_string())) {
            match seen {
                Ok(degraded) if degraded.is_empty() => {
                    tracing::info!(?topics, "Kafka is reachable: ready")
                }
                Ok(degraded) => tracing::warn!(
                    ?topics,
                    ?degraded,
                    "ready, but some partitions cannot take records: their deliveries are \
                     refused (too few in-sync replicas) or held (no leader)"
                ),
                Err(e) => tracing::warn!(
                    ?topics,
                    failure = e.failure.as_str(),
                    reason = %e,
                    "Kafka cannot take records: not ready"
                ),
            }
        }
        // Probe quickly while not ready, so recovery shows promptly.
        let pause = if ok {
            interval
        } else {
            interval.min(Duration::from_millis(500))
        };
        tokio::time::sleep(pause).await;
    }
}
