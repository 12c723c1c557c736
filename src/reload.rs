//! Reloading while the bridge runs: on SIGHUP, and when the content of a watched file (the
//! `--config` file, secret files, the TLS files) changes, the settings are loaded again from
//! their sources and compiled into a new plan. Its verifier and certificate are put in force;
//! the sections that take a restart are compared by value with the settings in force, and a
//! difference is reported (log and `tamio_bridge_reloads_total{result="restart_needed"}`).
//! Loading and compiling read files: both run on a blocking thread, never on the runtime's;
//! a reload that fails either way is tried again at every watch interval until one applies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Settings;
use crate::ingest::verify::Verifier;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::plan::Plan;
use crate::publish::Publisher;
use crate::server::tls::Tls;

/// A reload: the settings loaded again from their sources and compiled, or why they could
/// not be.
pub type Reload = Result<Plan, String>;

/// How a reload ended: the `result` label of `tamio_bridge_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Applied,
    /// Applied, and settings that take a restart differ from those in force.
    RestartNeeded,
    Failed,
}

impl ReloadResult {
    pub const ALL: [ReloadResult; 3] = [
        ReloadResult::Applied,
        ReloadResult::RestartNeeded,
        ReloadResult::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::RestartNeeded => "restart_needed",
            ReloadResult::Failed => "failed",
        }
    }
}

/// Where the settings come from again: the `--config` file (and the environment), with the
/// adjustments start-up made (the embedded mode's broker address and one-time secret).
pub struct Source<F> {
    pub config: Option<PathBuf>,
    pub adjust: F,
}

impl<F: Fn(&mut Settings)> Source<F> {
    /// Loads and compiles the settings (reading files: on a blocking thread).
    fn load(&self) -> Reload {
        let mut settings = Settings::load(self.config.as_deref()).map_err(|e| e.to_string())?;
        (self.adjust)(&mut settings);
        Plan::compile(&settings).map_err(|e| e.to_string())
    }

    /// The files whose content a reload depends on.
    fn files(&self, settings: &Settings) -> Vec<PathBuf> {
        watched_files(self.config.as_deref(), settings)
    }
}

/// The files whose content a reload depends on: the --config file, secret files, TLS files.
fn watched_files(config: Option<&Path>, settings: &Settings) -> Vec<PathBuf> {
    config
        .map(Path::to_owned)
        .into_iter()
        .chain(settings.reloadable_files())
        .collect()
}

/// A digest of each file's content (None when it cannot be read). Contents, not times: a
/// Kubernetes Secret volume swaps a symlink, and editors may keep a file's modification time.
fn fingerprint(files: &[PathBuf]) -> Vec<Option<[u8; 32]>> {
    use sha2::Digest;
    files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .ok()
                .map(|b| sha2::Sha256::digest(b).into())
        })
        .collect()
}

/// [`fingerprint`] on a blocking thread.
async fn fingerprint_off_runtime(files: &[PathBuf]) -> Vec<Option<[u8; 32]>> {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || fingerprint(&files))
        .await
        .unwrap_or_default()
}

/// Loads the settings again on each SIGHUP (`hangups`), and every `watch_interval` when a
/// watched file's content changed, and hands them to [`apply`]. A zero interval watches
/// nothing.
pub async fn watch<F>(
    source: Source<F>,
    started_with: &Settings,
    mut hangups: tokio::signal::unix::Signal,
    reloads: mpsc::Sender<Reload>,
) where
    F: Fn(&mut Settings) + Send + Sync + 'static,
{
    let source = Arc::new(source);
    let watch_interval = Duration::from_millis(started_with.reload.watch_interval_ms);
    let mut files = source.files(started_with);
    let mut seen = fingerprint_off_runtime(&files).await;
    // After a failed reload, try again at every tick until one applies: the files may be
    // half-written, or name a file that does not exist yet.
    let mut failing = false;
    let watching = !watch_interval.is_zero();
    let mut ticks = tokio::time::interval(if watching {
        watch_interval
    } else {
        Duration::from_secs(3600)
    });
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            signal = hangups.recv() => {
                if signal.is_none() {
                    return;
                }
                tracing::info!(
                    "SIGHUP received: reloading signature settings, secret files and TLS certificate"
                );
            }
            _ = ticks.tick(), if watching => {
                if !failing && fingerprint_off_runtime(&files).await == seen {
                    continue;
                }
                if !failing {
                    tracing::info!(
                        "a settings, secret or TLS file changed: reloading signature \
                         settings, secret files and TLS certificate"
                    );
                }
            }
        }
        // Taken before loading: a change made while loading shows at the next tick.
        seen = fingerprint_off_runtime(&files).await;
        let reload = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source.load())
                .await
                .unwrap_or_else(|e| Err(format!("loading the settings failed: {e}")))
        };
        // A load or a compile that failed (a certificate read while half-written, say) is
        // tried again at the next tick.
        failing = reload.is_err();
        if let Ok(plan) = &reload {
            let next = source.files(&plan.settings);
            if next != files {
                files = next;
                seen = fingerprint_off_runtime(&files).await;
            }
        }
        if reloads.send(reload).await.is_err() {
            return;
        }
    }
}

/// What a reload can change while the bridge runs.
pub struct Running {
    /// The settings in force: those of the start, with what reloads have put in force since.
    pub in_force: Settings,
    pub ingest: Arc<Ingest>,
    pub tls: Option<Arc<Tls>>,
    pub metrics: Arc<Metrics>,
    /// Renewed when the content of the `kafka.tls` files changes.
    pub publisher: Arc<Publisher>,
    /// The digest of the `kafka.tls` files the Kafka clients in force were built with.
    pub kafka_tls_seen: Vec<Option<[u8; 32]>>,
}

impl Running {
    /// What a reload needs of the bridge started with `settings`.
    pub async fn new(
        settings: Settings,
        ingest: Arc<Ingest>,
        tls: Option<Arc<Tls>>,
        metrics: Arc<Metrics>,
        publisher: Arc<Publisher>,
    ) -> Running {
        let kafka_tls_seen = fingerprint_off_runtime(&settings.kafka_tls_files()).await;
        Running {
            in_force: settings,
            ingest,
            tls,
            metrics,
            publisher,
            kafka_tls_seen,
        }
    }

    /// Renews the Kafka clients when the content of the `kafka.tls` files changed since they
    /// were built (a rotated client certificate, a new CA). A renewal that fails leaves the
    /// clients in force, and the next reload tries again.
    async fn renew_kafka_clients(&mut self) -> Result<bool, String> {
        let now = fingerprint_off_runtime(&self.in_force.kafka_tls_files()).await;
        if now == self.kafka_tls_seen {
            return Ok(false);
        }
        // librdkafka reads the files when a client is built: the new producer must hold a
        // producer id within the delivery timeout, or the clients in force stay.
        let within = Duration::from_millis(self.in_force.kafka.delivery_timeout_ms);
        self.publisher.renew_clients(within).await?;
        self.kafka_tls_seen = now;
        Ok(true)
    }
}

/// Applies each reload received until the channel closes.
pub async fn apply(mut running: Running, mut reloads: mpsc::Receiver<Reload>) {
    while let Some(reload) = reloads.recv().await {
        let mut result = reload.and_then(|plan| running.put_in_force(plan));
        if result.is_ok() {
            match running.renew_kafka_clients().await {
                Ok(true) => tracing::info!(
                    "renewed the Kafka clients: the kafka.tls files changed, and the brokers \
                     took the new ones"
                ),
                Ok(false) => {}
                Err(reason) => {
                    result = Err(format!("renewing the Kafka clients failed: {reason}"));
                }
            }
        }
        let outcome = match result {
            Ok(ignored) if ignored.is_empty() => {
                tracing::info!("reloaded: signature settings and TLS certificate in force");
                ReloadResult::Applied
            }
            Ok(ignored) => {
                tracing::warn!(
                    sections = ?ignored,
                    "reloaded: signature settings and TLS certificate in force; the settings \
                     of these sections differ from those in force and take a restart"
                );
                ReloadResult::RestartNeeded
            }
            Err(reason) => {
                tracing::error!(%reason, "reload refused: the settings in force stay");
                ReloadResult::Failed
            }
        };
        running
            .metrics
            .reloads
            .with_label_values(&[outcome.as_str()])
            .inc();
    }
}

impl Running {
    /// Puts the plan's certificate and verifier in force, after checking everything; on
    /// error nothing changes. Returns the sections that differ and take a restart.
    fn put_in_force(&mut self, plan: Plan) -> Result<Vec<&'static str>, String> {
        let next = &plan.settings;
        if plan.certificate.is_some() != self.tls.is_some() {
            return Err(
                "setting `server.tls_cert_file`: turning TLS on or off takes a restart".to_owned(),
            );
        }
        if plan.verifier.accepts_unsigned() && !self.ingest.verifier().accepts_unsigned() {
            return Err(
                "setting `signature.secrets`: the reloaded settings have no secret, and \
                 accepting unsigned deliveries (signature.allow_unsigned) takes a restart"
                    .to_owned(),
            );
        }
        if let (Some(tls), Some(certificate)) = (&self.tls, plan.certificate) {
            tls.replace(certificate);
            self.metrics.tls_certificate_expiry.set(tls.not_after());
        }
        announce_signing(next, &plan.verifier, &self.metrics);
        self.ingest.set_verifier(plan.verifier);
        self.in_force.signature = next.signature.clone();
        self.in_force.server.tls_cert_file = next.server.tls_cert_file.clone();
        self.in_force.server.tls_key_file = next.server.tls_key_file.clone();
        Ok(needing_restart(&self.in_force, next))
    }
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
        ("tracing", current.tracing != next.tracing),
    ];
    differs
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| name)
        .collect()
}

/// Logs how deliveries are checked, and sets the unsigned-deliveries metric.
pub fn announce_signing(settings: &Settings, verifier: &Verifier, metrics: &Metrics) {
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
