//! Settings compiled into a plan: each stage's builder runs on its section (routes, the
//! signature verifier, the producer's options, the ingress certificate, the connection
//! bounds), and every error of every stage is collected, each naming its setting.
//!
//! `run()` starts from a plan; a reload compiles a new one and puts in force what can change
//! while the bridge runs.

use std::fmt;

use rdkafka::config::ClientConfig;

use crate::config::{Settings, SettingsError};
use crate::ingest::dedup;
use crate::ingest::route::Routes;
use crate::ingest::verify::Verifier;
use crate::publish::producer;
use crate::server::tls::Certificate;
use crate::server::Limits;

/// Everything the bridge runs from, built and checked.
pub struct Plan {
    pub settings: Settings,
    pub routes: Routes,
    pub verifier: Verifier,
    pub dedup: dedup::Plan,
    /// The producer's librdkafka options.
    pub producer: ClientConfig,
    /// The ingress certificate, when it serves TLS.
    pub certificate: Option<Certificate>,
    pub limits: Limits,
    /// Every topic the bridge writes to: the routes' and the dead-letter topic.
    pub topics: Vec<String>,
    /// Traces: the `tracing` settings and the `OTEL_*` variables.
    pub tracing: crate::trace::Plan,
}

/// Why settings do not compile: every error found, each naming its setting.
#[derive(Debug)]
pub struct PlanError(pub Vec<SettingsError>);

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PlanError {}

impl Plan {
    /// Compiles `settings`, collecting every stage's errors.
    pub fn compile(settings: &Settings) -> Result<Plan, PlanError> {
        let mut errors = Vec::new();
        if let Err(e) = settings.check_signing() {
            errors.push(e);
        }
        let routes = Routes::build(
            &settings.routes,
            &settings.kafka.topic,
            settings.dead_letter_topic(),
        )
        .map_err(|e| errors.extend(e))
        .ok();
        let verifier = Verifier::build(&settings.signature)
            .map_err(|e| errors.extend(e))
            .ok();
        let dedup = dedup::Plan::build(settings)
            .map_err(|e| errors.push(e))
            .ok();
        let producer = producer::build(&settings.kafka, settings.server.max_body_bytes)
            .map_err(|e| errors.extend(e))
            .ok();
        let certificate = if settings.server.tls() {
            Certificate::load(
                &settings.server.tls_cert_file,
                &settings.server.tls_key_file,
            )
            .map(Some)
            .map_err(|e| errors.push(e.into()))
            .ok()
        } else {
            Some(None)
        };
        let tracing = crate::trace::Plan::build(&settings.tracing, |name| std::env::var(name).ok())
            .map_err(|e| errors.push(e))
            .ok();
        match (routes, verifier, dedup, producer, certificate, tracing) {
            (
                Some(routes),
                Some(verifier),
                Some(dedup),
                Some(producer),
                Some(certificate),
                Some(tracing),
            ) if errors.is_empty() => {
                let mut topics = routes.topics();
                topics.extend(settings.dead_letter_topic().map(str::to_owned));
                Ok(Plan {
                    settings: settings.clone(),
                    routes,
                    verifier,
                    dedup,
                    producer,
                    certificate,
                    limits: Limits::of(&settings.server),
                    topics,
                    tracing,
                })
            }
            _ => Err(PlanError(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load_file(text: &str) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load_from(Some(&path), HashMap::<String, String>::new())
    }

    /// Loads `text` and compiles it; the error text of whichever step refused it.
    fn compile_file(text: &str) -> Result<Plan, String> {
        let settings = load_file(text).map_err(|e| e.to_string())?;
        Plan::compile(&settings).map_err(|e| e.to_string())
    }

    fn compile_env(pairs: &[(&str, &str)]) -> Result<Plan, String> {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let settings = Settings::load_from(None, env).map_err(|e| e.to_string())?;
        Plan::compile(&settings).map_err(|e| e.to_string())
    }

    const SIGNED: &str = "[signature]\nsecrets = ['s']\n";

    #[test]
    fn routes_that_cannot_work_are_refused_by_name() {
        let cases = [
            (
                "event_type = \"a_*\"\nkey = \"data/id\"",
                "must start with `/`",
            ),
            ("event_type = \"a_*\"\nkey = \"/x\"\ntopic = \"\"", "topic"),
            ("event_type = \"\"\nkey = \"/x\"", "must not be empty"),
            ("event_type = \"a b\"\nkey = \"/x\"", "may hold only"),
        ];
        for (route, says) in cases {
            let err = compile_file(&format!("{SIGNED}[[routes]]\n{route}\n"))
                .err()
                .unwrap();
            assert!(
                err.contains("routes[0]") && err.contains(says),
                "{route}: {err}"
            );
        }
        let err = compile_file(&format!(
            "{SIGNED}[[routes]]\nevent_type = \"*\"\nkey = \"/event_id\"\n\
             [[routes]]\nevent_type = \"whitelabel_ticket_*\"\nkey = \"/data/ticket/id\"\n"
        ))
        .err()
        .unwrap();
        assert!(
            err.contains("routes[1]") && err.contains("can never match"),
            "{err}"
        );
        let err = compile_file(&format!(
            "{SIGNED}[[routes]]\nevent_type = \"ticket_*\"\nkey = \"/event_id\"\n\
             [[routes]]\nevent_type = \"ticket_created\"\nkey = \"/event_id\"\n"
        ))
        .err()
        .unwrap();
        assert!(
            err.contains("routes[1]") && err.contains("routes[0]"),
            "{err}"
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let err = compile_file(
            "[signature]\nsecrets = ['s']\nheader = 'bad header'\n\
             [kafka.librdkafka]\nacks = '1'\npartitioner = 'random'\n\
             [[routes]]\nevent_type = 'a*b'\nkey = '/event_id'\n",
        )
        .err()
        .unwrap();
        for named in ["signature.header", "`acks`", "`partitioner`", "routes[0]"] {
            assert!(err.contains(named), "{named} missing from: {err}");
        }
        assert_eq!(err.lines().count(), 4, "{err}");
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases = [
            (
                "TAMIO_BRIDGE__SIGNATURE__HEADER",
                "bad header",
                "signature.header",
            ),
            (
                "TAMIO_BRIDGE__KAFKA__LIBRDKAFKA__ACKS",
                "1",
                "kafka.librdkafka",
            ),
        ];
        for (key, value, named) in cases {
            let err = compile_env(&[(key, value), ("TAMIO_BRIDGE__SIGNATURE__SECRETS", "s")])
                .err()
                .unwrap();
            assert!(
                err.contains(named),
                "{key}={value}: `{err}` should name `{named}`"
            );
        }
    }

    #[test]
    fn structured_and_passthrough_kafka_security_do_not_mix() {
        let err = compile_file(&format!(
            "{SIGNED}[kafka]\nbrokers = 'b:9092'\n[kafka.tls]\nenabled = true\n\
             [kafka.librdkafka]\n\"security.protocol\" = \"ssl\"\n"
        ))
        .err()
        .unwrap();
        assert!(
            err.contains("kafka.librdkafka") && err.contains("security.protocol"),
            "{err}"
        );
        // Without the structured settings the pass-through stays available.
        let plan = compile_file(&format!(
            "{SIGNED}[kafka]\nbrokers = 'b:9092'\n[kafka.librdkafka]\n\"security.protocol\" = \"ssl\"\n"
        ))
        .ok()
        .unwrap();
        assert_eq!(plan.settings.kafka.security_protocol(), "plaintext");
    }

    #[test]
    fn standard_webhooks_secrets_are_checked_at_load() {
        let err = compile_file(
            "[signature.endpoints.ep-1]\nscheme = 'standard-webhooks'\nsecrets = ['not-whsec']\n",
        )
        .err()
        .unwrap();
        assert!(
            err.contains("ep-1") && err.contains("whsec_") && !err.contains("not-whsec"),
            "{err}"
        );
        let ok = compile_file(
            "[signature]\nscheme = 'standard-webhooks'\nsecrets = ['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']\n",
        )
        .ok()
        .unwrap();
        assert_eq!(
            ok.settings.signature.scheme,
            crate::config::Scheme::StandardWebhooks
        );
    }

    #[test]
    fn endpoint_options_that_would_be_ignored_are_refused() {
        for (text, says) in [
            (
                "[signature.endpoints.ep-1]\nscheme = 'standard-webhooks'\nheader = 'X-Sig'\n\
                 secrets = ['whsec_AAEC']\n",
                "header has no effect",
            ),
            (
                "[signature.endpoints.ep-1]\nencoding = 'base64'\nsecrets = ['s']\n",
                "encoding applies",
            ),
            (
                "[kafka.tls]\nenabled = true\nkey_password = 'p'\n",
                "kafka.tls.key_password",
            ),
        ] {
            let err = compile_file(text).err().unwrap();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
