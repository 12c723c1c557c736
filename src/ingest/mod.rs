//! The request pipeline, on one screen: `answer` a request by `process`ing it: check the
//! request line and headers, read the body within its bound, take a publishing slot,
//! `verify` the signature; then `accept` (in `accept.rs`, shared with the replay) validates
//! the envelope, routes it, claims the event id, publishes the record and waits for Kafka's
//! acknowledgement.

mod accept;
pub mod body;
pub mod dedup;
pub mod envelope;
mod error;
mod quiet;
pub mod route;
pub mod verify;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;
use tokio::sync::Semaphore;
use tracing::{field, Instrument};

use crate::config::Settings;
use crate::error::Outcome;
use crate::metrics::Metrics;
use crate::publish::record::Replayed;
use crate::publish::Publisher;
use crate::trace::{self, Tracing};
use body::{Bodies, BodyError, BodyLimits};
use dedup::Dedup;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context as TraceContext, KeyValue};
use route::Routes;
use verify::{VerifiedBody, Verifier};

pub use accept::{record, HeldClaim};
use accept::{Accept, Accepted, How, Seen};
pub use error::IngestError;

/// Where a replayed dead letter went: a partition of -1 for a dry run.
#[derive(Debug)]
pub struct ReplayAccepted {
    pub event_id: String,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub duplicate: bool,
    /// The event's duplicate claim, written but not yet committed: the replay acknowledges
    /// it once its transaction has committed, or drops it (releasing the id) on an abort.
    pub held: Option<HeldClaim>,
}

/// Everything a request needs, shared by all connections: what receiving takes here,
/// what accepting takes in [`accept::Accept`].
pub struct Ingest {
    path: String,
    max_body_bytes: usize,
    request_timeout: Duration,
    /// Replaced as a whole when the signature settings are reloaded.
    verifier: RwLock<Arc<Verifier>>,
    dedup: Arc<Dedup>,
    metrics: Arc<Metrics>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    bodies: Arc<Bodies>,
    /// Refusal log lines, one a second per kind.
    quiet: quiet::Quiet,
    tracing: Arc<Tracing>,
    /// The server span's name for the ingress path (`POST <path>`): made once, not per
    /// request.
    span_name: &'static str,
    accept: Accept,
}

impl Ingest {
    /// The pipeline of `settings`, with its compiled routes and verifier.
    pub fn new(
        settings: &Settings,
        routes: Routes,
        verifier: Verifier,
        dedup: dedup::Plan,
        publisher: Arc<Publisher>,
        metrics: Arc<Metrics>,
        tracing: Arc<Tracing>,
    ) -> Result<Ingest, String> {
        let dedup = Arc::new(Dedup::start(dedup, metrics.clone())?);
        Ok(Ingest {
            path: settings.server.path.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            request_timeout: settings.request_timeout(),
            verifier: RwLock::new(Arc::new(verifier)),
            in_flight: Arc::new(Semaphore::new(settings.server.max_in_flight)),
            max_in_flight: settings.server.max_in_flight,
            bodies: Bodies::new(BodyLimits {
                memory_bytes: settings.server.body_memory_bytes,
                first_reserve: BodyLimits::first_reserve_for(
                    settings.server.body_memory_bytes,
                    settings.server.max_connections,
                ),
                min_rate: settings.server.min_body_rate_bytes_per_sec,
                rate_grace: Duration::from_millis(settings.server.body_rate_grace_ms),
            }),
            quiet: quiet::Quiet::default(),
            // Made once per process (the path takes a restart).
            span_name: Box::leak(format!("POST {}", settings.server.path).into_boxed_str()),
            accept: Accept::new(
                settings,
                routes,
                dedup.clone(),
                publisher,
                metrics.clone(),
                tracing.clone(),
            ),
            dedup,
            metrics,
            tracing,
        })
    }

    /// Waits up to `timeout` for the writes to the shared duplicate store (on shutdown);
    /// returns how many are left.
    pub async fn flush_dedup(&self, timeout: Duration) -> u64 {
        self.dedup.flush(timeout).await
    }

    /// The verifier in force; a request keeps the one it started with.
    pub fn verifier(&self) -> Arc<Verifier> {
        self.verifier
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts new signature settings in force for the requests that start from now on.
    pub fn set_verifier(&self, verifier: Verifier) {
        *self
            .verifier
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(verifier);
    }

    /// Answers one request; never fails (every error becomes its response).
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: std::fmt::Display,
    {
        // A span per request only where it is logged (debug): building one and recording
        // its fields costs allocations on every request.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            event_id = field::Empty,
            event_type = field::Empty,
        );
        if span.is_disabled() {
            self.answer(req).await
        } else {
            self.answer(req).instrument(span).await
        }
    }

    async fn answer<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        let mut seen = Seen::default();
        // The request's trace context (always), and its server span when spans are built.
        let routed = req.uri().path() == self.path;
        let cx = self.tracing.server_span(
            self.tracing.extract(req.headers()),
            req.method(),
            req.uri().path(),
            routed.then_some((self.path.as_str(), self.span_name)),
        );
        let (outcome, response, refused) = match self.process(req, &mut seen, &cx).await {
            Ok(accepted) => {
                tracing::debug!(
                    partition = accepted.partition,
                    offset = accepted.offset,
                    duplicate = accepted.duplicate,
                    "accepted"
                );
                let outcome = if accepted.duplicate {
                    Outcome::Duplicate
                } else {
                    Outcome::Accepted
                };
                let body = serde_json::to_vec(&accepted).unwrap_or_default();
                (outcome, crate::error::json(StatusCode::OK, body), None)
            }
            Err(err) => {
                let refusal = err.refusal();
                let status = refusal.status().as_u16();
                let (event_id, event_type) = (seen.event_id(), seen.event_type());
                if let Some(suppressed) = self.quiet.admit(refusal) {
                    let kind = refusal.kind();
                    if refusal.status().is_server_error() {
                        tracing::warn!(status, kind, event_id, event_type, suppressed, "{err}");
                    } else {
                        tracing::info!(status, kind, event_id, event_type, suppressed, "{err}");
                    }
                }
                (
                    refusal.outcome(),
                    crate::error::answer(refusal, &err.to_string()),
                    Some(refusal.kind()),
                )
            }
        };
        self.metrics
            .answered(outcome.as_str(), started.elapsed().as_secs_f64());
        self.metrics.body_memory.set(self.bodies.used() as i64);
        trace::end_server_span(&cx, response.status().as_u16(), outcome.as_str(), refused);
        response
    }

    async fn process<B>(
        &self,
        req: Request<B>,
        seen: &mut Seen,
        cx: &TraceContext,
    ) -> Result<Accepted, IngestError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        if req.uri().path() != self.path {
            return Err(IngestError::NotFound(self.path.clone()));
        }
        if req.method() != Method::POST {
            return Err(IngestError::MethodNotAllowed(req.method().clone()));
        }
        let received_at = SystemTime::now();
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let (parts, body) = req.into_parts();
        let declared = check_headers(&parts.headers, self.max_body_bytes)?;

        // Receiving is bounded by bytes in memory and a minimum rate; only a request whose
        // body has arrived takes one of the `max_in_flight` publishing slots, so bodies that
        // trickle in cannot take them from senders that are done.
        let bytes = self
            .bodies
            .read(
                body,
                declared,
                self.max_body_bytes,
                deadline,
                self.request_timeout,
            )
            .await
            .map_err(|e| match e {
                BodyError::TooLarge(limit) => IngestError::TooLarge { limit },
                BodyError::Timeout(t) => IngestError::BodyTimeout(t),
                BodyError::TooSlow(_) => IngestError::BodySlow(e),
                BodyError::Evicted | BodyError::NoMemory => IngestError::BodyMemory(e),
                BodyError::Read(e) => IngestError::BodyRead(e),
                BodyError::Fragmented { .. } => IngestError::BodyRead(e.to_string()),
            })?;
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| IngestError::Overloaded(self.max_in_flight))?;
        self.metrics.in_flight.inc();
        let _in_flight = scopeguard(|| self.metrics.in_flight.dec());

        if cx.span().is_recording() {
            cx.span()
                .set_attribute(KeyValue::new("http.request.body.size", bytes.len() as i64));
        }
        let verified = self.verify(&parts.headers, bytes, received_at, cx)?;
        self.accept
            .accept(verified, parts.headers, deadline, seen, cx, How::Live)
            .await
    }

    /// Puts a dead letter through again: verified against its recorded signature headers at
    /// its `received_at`, then the pipeline of a live delivery (envelope rules, routes,
    /// duplicate suppression, record format), the record carrying `replayed_from` and
    /// `replayed_at`. A refusal is returned, never dead-lettered again. With `dry_run`, it
    /// stops once the destination is known and writes nothing: `Ok` with no partition.
    pub async fn replay(
        &self,
        headers: HeaderMap,
        body: Bytes,
        received_at: SystemTime,
        replayed: Replayed,
        dry_run: bool,
    ) -> Result<ReplayAccepted, IngestError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut seen = Seen::default();
        let cx = self.tracing.extract(&headers);
        let how = if dry_run {
            How::DryRun
        } else {
            How::Replay(replayed)
        };
        let verified = self.verify(&headers, body, received_at, &cx)?;
        let accepted = self
            .accept
            .accept(verified, headers, deadline, &mut seen, &cx, how)
            .await?;
        Ok(ReplayAccepted {
            event_id: String::from_utf8_lossy(&accepted.event_id).into_owned(),
            topic: accepted.topic,
            partition: accepted.partition,
            offset: accepted.offset,
            duplicate: accepted.duplicate,
            held: accepted.held,
        })
    }

    /// Verifies the signature of a received body, counting a refusal by its reason and the
    /// sender's delay.
    fn verify(
        &self,
        headers: &HeaderMap,
        bytes: Bytes,
        received_at: SystemTime,
        cx: &TraceContext,
    ) -> Result<VerifiedBody, IngestError> {
        let verified = self
            .verifier()
            .verify(headers, bytes, received_at)
            .inspect_err(|e| {
                self.metrics
                    .signature_failures
                    .with_label_values(&[e.reason().as_str()])
                    .inc()
            })?;
        if let Some(delay) = verified.sender_delay_secs() {
            self.metrics.sender_delay.observe(delay as f64);
        }
        if cx.span().is_recording() {
            let scheme = verified.scheme().map_or("unsigned", |s| s.as_str());
            cx.span().add_event(
                "signature verified",
                vec![KeyValue::new("tamio.signature.scheme", scheme)],
            );
        }
        Ok(verified)
    }
}

/// Refuses, before reading the body, what the headers already show to be unacceptable;
/// returns the declared length.
fn check_headers(headers: &HeaderMap, max_body_bytes: usize) -> Result<Option<u64>, IngestError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .ok_or_else(|| {
            IngestError::UnsupportedMediaType(
                "the Content-Type header is missing; deliveries are application/json".into(),
            )
        })?
        .to_str()
        .unwrap_or("");
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media_type != "application/json" && !media_type.ends_with("+json") {
        return Err(IngestError::UnsupportedMediaType(format!(
            "Content-Type `{}` is not JSON; deliveries are application/json",
            content_type.chars().take(100).collect::<String>()
        )));
    }
    if let Some(encoding) = headers.get(CONTENT_ENCODING) {
        let encoding = encoding.to_str().unwrap_or("").trim();
        if !encoding.eq_ignore_ascii_case("identity") {
            return Err(IngestError::UnsupportedMediaType(format!(
                "Content-Encoding `{}` is not supported; send the body uncompressed",
                encoding.chars().take(100).collect::<String>()
            )));
        }
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok())
        .and_then(|l| l.parse::<u64>().ok());
    if declared.is_some_and(|l| l > max_body_bytes as u64) {
        return Err(IngestError::TooLarge {
            limit: max_body_bytes,
        });
    }
    Ok(declared)
}

/// Runs `f` when dropped: keeps a gauge right on every path out of a request, cancellation
/// included.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/cloudevents+json",
        ] {
            assert!(
                check_headers(&headers(&[("content-type", ok)]), 10).is_ok(),
                "{ok}"
            );
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", ""] {
            let e = check_headers(&headers(&[("content-type", bad)]), 10).unwrap_err();
            assert_eq!(
                e.refusal().status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{bad}"
            );
        }
        let e = check_headers(&HeaderMap::new(), 10).unwrap_err();
        assert_eq!(e.refusal().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn encodings_and_declared_lengths() {
        let json = ("content-type", "application/json");
        let e = check_headers(&headers(&[json, ("content-encoding", "gzip")]), 10).unwrap_err();
        assert_eq!(e.refusal().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(check_headers(&headers(&[json, ("content-encoding", "identity")]), 10).is_ok());
        let e = check_headers(&headers(&[json, ("content-length", "11")]), 10).unwrap_err();
        assert_eq!(e.refusal().status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(check_headers(&headers(&[json, ("content-length", "10")]), 10).is_ok());
    }
}
