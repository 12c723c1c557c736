//! tamio-kafka-bridge: receives signed Tamio webhook deliveries and publishes each ticket
//! event to Kafka, keyed by ticket id, answering the sender only once Kafka has it.
//!
//! [`run`] wires the stages together and owns the order of shutdown: readiness turns 503,
//! the ingress stops accepting, requests in flight finish (within `server.drain_timeout_ms`),
//! the producer flushes (within `kafka.flush_timeout_ms`), then the admin listener closes.

pub mod admin;
pub mod config;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod publish;
pub mod server;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::{Admin, Readiness};
use crate::config::Settings;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::server::{Drain, Limits};

/// Why the bridge could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "setting `kafka.brokers` is empty: run() needs a broker (main starts the embedded one)"
    )]
    NoBrokers,
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
}

/// Runs the bridge on the given listeners until `shutdown` completes, then shuts down in
/// order. Returns once everything it started has stopped.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    if settings.embedded_kafka() {
        return Err(RunError::NoBrokers);
    }
    let metrics = Arc::new(Metrics::new());
    let publisher = Publisher::new(
        &settings.kafka,
        settings.server.max_body_bytes,
        metrics.clone(),
    )?;
    tracing::info!(
        brokers = %settings.kafka.brokers,
        topic = %settings.kafka.topic,
        producer = ?publisher.describe(),
        "producer created"
    );
    let readiness = Arc::new(Readiness::new(metrics.clone()));

    let topics: Vec<String> = crate::ingest::route::Routes::new(&settings)
        .topics()
        .into_iter()
        .chain(settings.dead_letter_topic().map(str::to_owned))
        .collect();
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
    // HTTP/1 only: idle HTTP/2 connections could otherwise fill the admin listener's few
    // slots and starve the probes.
    let admin_limits = Limits {
        http2: false,
        header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
        max_connections: 64,
        drain_timeout: Duration::from_secs(1),
    };
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        move |req| admin.clone().handle(req),
        admin_limits,
        async move {
            let _ = admin_stopped.await;
        },
    ));

    let ingest = Arc::new(Ingest::new(&settings, publisher.clone(), metrics.clone()));
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        path = %settings.server.path,
        admin = %admin_addr,
        "accepting webhook deliveries"
    );
    let readiness_on_stop = readiness.clone();
    let drain = server::serve(
        listener,
        move |req| ingest.clone().handle(req),
        Limits {
            http2: true,
            header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
            max_connections: settings.server.max_connections,
            drain_timeout: Duration::from_millis(settings.server.drain_timeout_ms),
        },
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
    let outstanding = publisher
        .flush(Duration::from_millis(settings.kafka.flush_timeout_ms))
        .await;
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

/// Probes the producer's connection every `interval` and keeps readiness up to date.
async fn probe_kafka(
    publisher: Publisher,
    readiness: Arc<Readiness>,
    topics: Vec<String>,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        let state = publisher.probe(&topics, timeout).await;
        let ok = state.is_ok();
        let reason = state.as_ref().err().cloned();
        if readiness.set_kafka(state) {
            match reason {
                None => tracing::info!(?topics, "Kafka is reachable: ready"),
                Some(reason) => tracing::warn!(?topics, %reason, "Kafka is unreachable: not ready"),
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
