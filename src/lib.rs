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

use crate::admin::{Admin, Readiness};
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
        limits: ingress_limits,
        topics,
        tracing: trace_plan,
    } = plan;
    let tls = certificate.map(|c| Arc::new(Tls::new(c)));
    let metrics = Arc::new(metrics());
    let publisher = if settings.kafka.exactly_once {
        let id = settings.kafka.transactional_id();
        tracing::info!(transactional_id = %id, "exactly once: deliveries are written in Kafka transactions");
        Publisher::exactly_once(
            producer,
            metrics.clone(),
            &settings.kafka.topic,
            &id,
            Duration::from_millis(settings.kafka.transaction_linger_ms),
        )?
    } else {
        Arc::new(Publisher::new(
            producer,
            metrics.clone(),
            &settings.kafka.topic,
        )?)
    };
    tracing::info!(
        brokers = %settings.kafka.brokers,
        topic = %settings.kafka.topic,
        producer = ?publisher.describe(),
        "producer created"
    );
    let readiness = Arc::new(Readiness::new(metrics.clone()));
    let probe = tokio::spawn(probe_kafka(
        publisher.clone(),
        readiness.clone(),
        topics,
        Duration::from_millis(settings.kafka.readiness_interval_ms),
        Duration::from_millis(settings.kafka.readiness_timeout_ms),
    ));

    let admin_addr = admin_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
    });
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    // HTTP/1 only, few connections: probes and scrapers need nothing more.
    let admin_limits = Limits {
        http2: false,
        max_connections: 64,
        drain_timeout: Duration::from_secs(1),
        ..ingress_limits
    };
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        None,
        move |req| admin.clone().handle(req),
        admin_limits,
        metrics.clone(),
        async move {
            let _ = admin_stopped.await;
        },
    ));

    reload::announce_signing(&settings, &verifier, &metrics);
    let traces = Arc::new(
        trace::Tracing::start(&trace_plan, metrics.trace_spans_dropped.clone())
            .map_err(RunError::Dedup)?,
    );
    if let Some(endpoint) = &trace_plan.endpoint {
        tracing::info!(%endpoint, "exporting traces");
    }
    let ingest = Arc::new(
        Ingest::new(
            &settings,
            routes,
            verifier,
            dedup,
            publisher.clone(),
            metrics.clone(),
            traces.clone(),
        )
        .map_err(RunError::Dedup)?,
    );
    if let Some(tls) = &tls {
        metrics.tls_certificate_expiry.set(tls.not_after());
    }
    let ingest_after_drain = ingest.clone();
    warn_about_weak_settings(&settings);
    announce_memory(&settings);
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
    let readiness_on_stop = readiness.clone();
    let drain = server::serve(
        listener,
        tls,
        move |req| ingest.clone().handle(req),
        ingress_limits,
        metrics.clone(),
        async move {
            shutdown.await;
            // Readiness fails before the listener closes, so load balancers stop first.
            readiness_on_stop.set_shutting_down();
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
    let outstanding = flush_stages(&settings, &publisher, &ingest_after_drain, &traces).await;
    if outstanding == 0 {
        tracing::info!("producer flushed");
    } else {
        tracing::warn!(
            outstanding,
            "records still unacknowledged at the flush deadline (their senders were answered 503)"
        );
    }
    let _ = admin_stop.send(());
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
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
    if plan.settings.embedded_kafka() {
        return Err(RunError::NoBrokers);
    }
    let Plan {
        settings,
        routes,
        verifier,
        dedup,
        producer,
        tracing: trace_plan,
        ..
    } = plan;
    let metrics = Arc::new(metrics());
    // Records and the group's position are committed together: the producer's transactional
    // id is the group's name, so that a run fences the one before it and finishes its open
    // transaction.
    let publisher = Arc::new(if options.dry_run {
        Publisher::new(producer, metrics.clone(), &settings.kafka.topic)?
    } else {
        Publisher::transactional(
            producer,
            metrics.clone(),
            &settings.kafka.topic,
            &options.group,
        )?
    });
    // Nothing is read before every destination can be written: a missing topic would
    // otherwise stop the replay at its first record. A stop meanwhile ends it at once.
    tokio::pin!(stop);
    if !options.dry_run {
        let topics = routes.topics();
        let probed = publisher.probe(
            &topics,
            Duration::from_millis(settings.kafka.readiness_timeout_ms).max(Duration::from_secs(5)),
        );
        let probed = tokio::select! {
            probed = probed => probed,
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
    let traces = Arc::new(
        trace::Tracing::start(&trace_plan, metrics.trace_spans_dropped.clone())
            .map_err(RunError::Dedup)?,
    );
    let ingest = Arc::new(
        Ingest::new(
            &settings,
            routes,
            verifier,
            dedup,
            publisher.clone(),
            metrics,
            traces.clone(),
        )
        .map_err(RunError::Dedup)?,
    );
    let txn = (!options.dry_run).then(|| publisher.txn());
    let summary = replay::run(
        ingest.clone(),
        txn,
        &settings.kafka,
        settings.request_timeout(),
        options,
        progress,
        stop,
    )
    .await;
    flush_stages(&settings, &publisher, &ingest, &traces).await;
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
