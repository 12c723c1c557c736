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
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::admin::{Admin, Readiness};
use crate::config::{Settings, SettingsError};
use crate::ingest::verify::Verifier;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::server::{Drain, Limits};
use crate::tls::{Tls, TlsError};

/// A reload: the settings loaded again from their sources, or why they could not be.
pub type Reload = Result<Settings, String>;

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
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Runs the bridge on the given listeners until `shutdown` completes, then shuts down in
/// order. Returns once everything it started has stopped.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (_no_reloads, reloads) = mpsc::channel(1);
    run_with_reloads(settings, listener, admin_listener, shutdown, reloads).await
}

/// Like [`run`], and puts in force the signature settings and TLS certificate of each
/// [`Reload`] received (main sends one on SIGHUP). Other settings apply at the next start.
pub async fn run_with_reloads(
    settings: Settings,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Reload>,
) -> Result<(), RunError> {
    if settings.embedded_kafka() {
        return Err(RunError::NoBrokers);
    }
    settings.check_signing()?;
    let tls = if settings.server.tls() {
        Some(Arc::new(Tls::load(
            &settings.server.tls_cert_file,
            &settings.server.tls_key_file,
        )?))
    } else {
        None
    };
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
    let ingress_limits = Limits::of(&settings.server);
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

    let ingest = Arc::new(Ingest::new(&settings, publisher.clone(), metrics.clone()));
    announce_signing(&settings, &ingest.verifier(), &metrics);
    if let Some(tls) = &tls {
        metrics.tls_certificate_expiry.set(tls.not_after());
    }
    warn_about_weak_settings(&settings);
    let reload_task = {
        let (ingest, tls, metrics) = (ingest.clone(), tls.clone(), metrics.clone());
        // What runs: the start-up settings, with what reloads have put in force since.
        let mut in_force = settings.clone();
        tokio::spawn(async move {
            while let Some(reload) = reloads.recv().await {
                let result = reload.and_then(|next| {
                    apply_reload(&next, &ingest, tls.as_deref())?;
                    if let Some(tls) = &tls {
                        metrics.tls_certificate_expiry.set(tls.not_after());
                    }
                    announce_signing(&next, &ingest.verifier(), &metrics);
                    in_force.signature = next.signature.clone();
                    in_force.server.tls_cert_file = next.server.tls_cert_file.clone();
                    in_force.server.tls_key_file = next.server.tls_key_file.clone();
                    Ok(needing_restart(&in_force, &next))
                });
                match result {
                    Ok(ignored) if ignored.is_empty() => {
                        metrics.reloads.with_label_values(&["applied"]).inc();
                        tracing::info!("reloaded: signature settings and TLS certificate in force");
                    }
                    Ok(ignored) => {
                        metrics.reloads.with_label_values(&["restart_needed"]).inc();
                        tracing::warn!(
                            sections = ?ignored,
                            "reloaded: signature settings and TLS certificate in force; the \
                             settings of these sections differ from those in force and take \
                             a restart"
                        );
                    }
                    Err(reason) => {
                        metrics.reloads.with_label_values(&["failed"]).inc();
                        tracing::error!(%reason, "reload refused: the settings in force stay");
                    }
                }
            }
        })
    };
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

/// Checks a reload's settings, then puts its TLS certificate and signature settings in
/// force; on error nothing changes.
fn apply_reload(next: &Settings, ingest: &Ingest, tls: Option<&Tls>) -> Result<(), String> {
    next.check_signing().map_err(|e| e.to_string())?;
    if next.server.tls() != tls.is_some() {
        return Err(
            "setting `server.tls_cert_file`: turning TLS on or off takes a restart".to_owned(),
        );
    }
    if let Some(tls) = tls {
        tls.reload(&next.server.tls_cert_file, &next.server.tls_key_file)
            .map_err(|e| e.to_string())?;
    }
    let verifier = Verifier::new(&next.signature);
    if verifier.accepts_unsigned() && !ingest.verifier().accepts_unsigned() {
        return Err(
            "setting `signature.secrets`: the reloaded settings have no secret, and accepting \
             unsigned deliveries (signature.allow_unsigned) takes a restart"
                .to_owned(),
        );
    }
    ingest.set_verifier(verifier);
    Ok(())
}

/// The sections of settings that differ between `current` and `next` and that a reload does
/// not apply. Compared by value, so a change to a redacted value (a password, a key) counts.
pub fn needing_restart(current: &Settings, next: &Settings) -> Vec<&'static str> {
    // The TLS files are reloaded; the rest of the server section is not.
    let server = |s: &Settings| crate::config::Server {
        tls_cert_file: Default::default(),
        tls_key_file: Default::default(),
        ..s.server.clone()
    };
    let differs = [
        ("server", server(current) != server(next)),
        ("admin", current.admin != next.admin),
        ("kafka", current.kafka != next.kafka),
        ("routes", current.routes != next.routes),
        ("dedup", current.dedup != next.dedup),
        ("reload", current.reload != next.reload),
        ("log", current.log != next.log),
    ];
    differs
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| name)
        .collect()
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

/// Logs how deliveries are checked, and sets the unsigned-deliveries metric.
fn announce_signing(settings: &Settings, verifier: &Verifier, metrics: &Metrics) {
    let sig = &settings.signature;
    metrics
        .unsigned_allowed
        .set(i64::from(verifier.accepts_unsigned()));
    if verifier.accepts_unsigned() {
        tracing::warn!(
            "UNSIGNED DELIVERIES ACCEPTED: signature.allow_unsigned is set and no secret is \
             configured, so anyone who can reach the ingress can write to Kafka"
        );
        return;
    }
    if sig.allow_unsigned {
        tracing::warn!(
            "signature.allow_unsigned has no effect: secrets are configured, so every delivery \
             must be signed"
        );
    }
    tracing::info!(
        scheme = sig.scheme.as_str(),
        secrets = sig.secrets.len(),
        endpoints = sig.endpoints.len(),
        "signatures required"
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn base() -> Settings {
        Settings::load_from(
            None,
            [(
                "TAMIO_BRIDGE__KAFKA__BROKERS".to_owned(),
                "b:9092".to_owned(),
            )],
        )
        .unwrap()
    }

    #[test]
    fn a_change_to_a_redacted_value_takes_a_restart() {
        let current = base();
        type Change = (&'static str, fn(&mut Settings));
        let changes: [Change; 4] = [
            ("kafka.tls.key_password", |s| {
                s.kafka.tls.key_password = Secret::new("another")
            }),
            ("kafka.sasl.password", |s| {
                s.kafka.sasl.password = Secret::new("another")
            }),
            ("kafka.librdkafka", |s| {
                s.kafka
                    .librdkafka
                    .insert("ssl.key.password".into(), "another".into());
            }),
            ("server.max_in_flight", |s| s.server.max_in_flight += 1),
        ];
        for (name, change) in changes {
            let mut next = current.clone();
            change(&mut next);
            let expected = if name.starts_with("kafka") {
                "kafka"
            } else {
                "server"
            };
            assert_eq!(needing_restart(&current, &next), [expected], "{name}");
        }
    }

    #[test]
    fn what_a_reload_applies_is_not_reported() {
        let current = base();
        let mut next = current.clone();
        next.server.tls_cert_file = "/new.crt".into();
        next.server.tls_key_file = "/new.key".into();
        next.signature.secrets.push(Secret::new("rotated"));
        assert!(needing_restart(&current, &next).is_empty());
    }
}
