//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz` (the process runs
//! its loops) and `GET /readyz` (a broker answers, every topic exists with a partition that
//! can take records, the producer holds its producer id, and the bridge is not shutting
//! down).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::metrics::Metrics;

/// Whether the bridge should be sent traffic, and if not, why.
pub struct Readiness {
    /// Ready, with the partitions that cannot take records (named, not a reason to take the
    /// replica out of service), or why not.
    kafka: Mutex<Result<Vec<String>, String>>,
    shutting_down: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Readiness {
    pub fn new(metrics: Arc<Metrics>) -> Readiness {
        Readiness {
            kafka: Mutex::new(Err("no readiness probe has completed yet".into())),
            shutting_down: AtomicBool::new(false),
            metrics,
        }
    }

    /// Records the latest probe; returns true when this changes the state or its reason.
    pub fn set_kafka(&self, state: Result<Vec<String>, String>) -> bool {
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        self.metrics
            .kafka_up
            .set(i64::from(state.is_ok() && !shutting_down));
        let mut current = self.kafka.lock().expect("readiness lock");
        let changed = *current != state;
        *current = state;
        changed
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.metrics.kafka_up.set(0);
    }

    /// `Ok` when ready (with the partitions that cannot take records), else the reason.
    pub fn check(&self) -> Result<Vec<String>, String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("the bridge is shutting down".into());
        }
        self.kafka.lock().expect("readiness lock").clone()
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl Admin {
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            "/healthz" => text(
                StatusCode::OK,
                "application/json",
                r#"{"status":"ok"}"#.into(),
            ),
            "/readyz" => match self.readiness.check() {
                Ok(degraded) if degraded.is_empty() => text(
                    StatusCode::OK,
                    "application/json",
                    r#"{"ready":true}"#.into(),
                ),
                // Other partitions take records: the replica stays in service, and names
                // the ones whose records are refused or held.
                Ok(degraded) => text(
                    StatusCode::OK,
                    "application/json",
                    serde_json::json!({ "ready": true, "degraded": degraded }).to_string(),
                ),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    serde_json::json!({ "ready": false, "reason": reason }).to_string(),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
