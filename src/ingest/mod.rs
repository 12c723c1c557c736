//! The request pipeline, on one screen: check the request line and headers, read the body
//! within its bound, verify the signature, validate the envelope, route it, publish it and
//! wait for Kafka's acknowledgement, then answer.

pub mod body;
pub mod dedup;
pub mod envelope;
mod quiet;
pub mod route;
pub mod verify;

use std::borrow::Cow;
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
use crate::error::{Outcome, Refusal};
use crate::finish::Finish;
use crate::metrics::Metrics;
use crate::publish::record::{DeadLetter, Record, Replayed};
use crate::publish::{PublishError, Publisher};
use crate::trace::{self, Span as _, Tracing};
use body::{Bodies, BodyError, BodyLimits};
use dedup::{Claim, Dedup, Original, Unclaimed};
use envelope::{Envelope, EnvelopeError};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context as TraceContext, KeyValue};
use route::{Destination, RouteError, Routes};
use verify::{VerifiedBody, Verifier, VerifyError};

/// Why a request was refused: the errors of every stage, and the request's own.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no such path; deliveries are accepted at {0}")]
    NotFound(String),
    #[error("method {0} is not allowed; deliveries are POST requests")]
    MethodNotAllowed(http::Method),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("{0}")]
    BodySlow(BodyError),
    #[error("{0}")]
    BodyMemory(BodyError),
    #[error("the bridge is at its limit of {0} requests in flight; retry later")]
    Overloaded(usize),
    #[error(
        "the shared store of delivered event ids cannot be used, and the bridge is set to \
         refuse deliveries meanwhile (dedup.on_store_error = \"refuse\"); retry later"
    )]
    DedupUnavailable,
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl IngestError {
    /// The kind of answer the sender gets (`crate::error` picks its status).
    pub fn refusal(&self) -> Refusal {
        match self {
            IngestError::NotFound(_) => Refusal::NotFound,
            IngestError::MethodNotAllowed(_) => Refusal::MethodNotAllowed,
            IngestError::UnsupportedMediaType(_) => Refusal::UnsupportedMediaType,
            IngestError::TooLarge { .. } => Refusal::PayloadTooLarge,
            IngestError::BodyTimeout(_) => Refusal::RequestTimeout,
            IngestError::BodyRead(_) => Refusal::BadRequest,
            IngestError::BodySlow(_) => Refusal::RequestTimeout,
            IngestError::BodyMemory(_) | IngestError::Overloaded(_) => Refusal::Overloaded,
            IngestError::DedupUnavailable => Refusal::DedupStoreUnavailable,
            IngestError::Verify(_) => Refusal::InvalidSignature,
            IngestError::Envelope(EnvelopeError::Json(_)) => Refusal::InvalidJson,
            IngestError::Envelope(_) => Refusal::InvalidEnvelope,
            IngestError::Route(_) => Refusal::UnroutableEvent,
            // Kafka will never take it: retrying would not help.
            IngestError::Publish(e) if !e.failure().is_retryable() => Refusal::PayloadTooLarge,
            IngestError::Publish(_) => Refusal::KafkaUnavailable,
        }
    }
}

/// The identifiers of the request's event, once its envelope has been read: the log line of
/// a refusal names them.
#[derive(Default)]
struct Seen {
    event_id: Option<Bytes>,
    event_type: Option<Bytes>,
}

impl Seen {
    fn event_id(&self) -> Option<&str> {
        self.event_id
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    fn event_type(&self) -> Option<&str> {
        self.event_type
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// How a dead letter is put through again.
struct Replay {
    replayed: Replayed,
    dry_run: bool,
}

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

/// A published event's duplicate claim, not yet acknowledged.
pub struct HeldClaim {
    guard: dedup::ClaimGuard,
    original: Original,
}

impl HeldClaim {
    /// The record is committed: later deliveries of the event are duplicates.
    pub fn acknowledged(self) {
        self.guard.acknowledged(self.original);
    }
}

impl std::fmt::Debug for HeldClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldClaim")
            .field("original", &self.original)
            .finish()
    }
}

/// What the sender is told about an accepted event.
#[derive(Debug, serde::Serialize)]
struct Accepted {
    /// A replayed event's claim, held for its transaction (never serialized).
    #[serde(skip)]
    held: Option<HeldClaim>,
    /// A slice of the body: the envelope's `event_id`, valid UTF-8.
    #[serde(serialize_with = "as_text")]
    event_id: Bytes,
    #[serde(serialize_with = "as_str")]
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    duplicate: bool,
}

fn as_str<S: serde::Serializer>(text: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(text)
}

fn as_text<S: serde::Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(std::str::from_utf8(bytes).unwrap_or_default())
}

/// Publishes `record`, and records Kafka's verdict in the duplicate claim (or, with `hold`,
/// hands the claim back unacknowledged) and in its producer span (ended with the verdict,
/// also when the request ended first).
async fn deliver(
    publisher: Arc<Publisher>,
    record: Record,
    claim: Option<dedup::ClaimGuard>,
    span: Option<trace::BoxedSpan>,
    hold: bool,
    deadline: tokio::time::Instant,
) -> Result<(crate::publish::Delivered, Arc<str>, Option<HeldClaim>), PublishError> {
    // Without a deadline: a record handed to Kafka is followed to its verdict even once the
    // request has ended. With exactly once, the deadline bounds only the wait to join a
    // transaction, so that a request answered 503 is never written after.
    let until = publisher.is_exactly_once().then_some(deadline);
    let result = publisher.publish(&record, until).await;
    if let Some(mut span) = span.filter(|s| s.is_recording()) {
        match &result {
            Ok(d) => {
                span.set_attribute(KeyValue::new(
                    "messaging.destination.partition.id",
                    d.partition.to_string(),
                ));
                span.set_attribute(KeyValue::new("messaging.kafka.offset", d.offset));
            }
            Err(e) => {
                span.set_attribute(KeyValue::new("error.type", e.failure().as_str()));
                span.set_status(trace::Status::error(e.to_string()));
            }
        }
        span.end();
    }
    let delivered = result?;
    let original = Original {
        topic: record.topic.clone(),
        delivered,
    };
    let held = match claim {
        Some(guard) if hold => Some(HeldClaim { guard, original }),
        Some(guard) => {
            guard.acknowledged(original);
            None
        }
        None => None,
    };
    Ok((delivered, record.topic, held))
}

/// Everything a request needs, shared by all connections.
pub struct Ingest {
    path: String,
    max_body_bytes: usize,
    request_timeout: Duration,
    routes: Routes,
    cloudevents: bool,
    dead_letter_topic: Option<String>,
    /// Replaced as a whole when the signature settings are reloaded.
    verifier: RwLock<Arc<Verifier>>,
    dedup: Arc<Dedup>,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    bodies: Arc<Bodies>,
    /// Refusal log lines, one a second per kind.
    quiet: quiet::Quiet,
    tracing: Arc<Tracing>,
    /// The duplicate store's name, for spans.
    dedup_store: &'static str,
    /// The server span's name for the ingress path (`POST <path>`), and the producer spans'
    /// (`publish <topic>`) for the routes' topics: made once, not per request.
    span_name: &'static str,
    publish_span_names: Vec<(String, &'static str)>,
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
        Ok(Ingest {
            path: settings.server.path.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            request_timeout: settings.request_timeout(),
            cloudevents: settings.kafka.cloudevents,
            dead_letter_topic: settings.dead_letter_topic().map(str::to_owned),
            verifier: RwLock::new(Arc::new(verifier)),
            dedup: Arc::new(Dedup::start(dedup, metrics.clone())?),
            publisher,
            metrics,
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
            tracing,
            dedup_store: match settings.dedup.store {
                crate::config::DedupStore::Memory => "memory",
                crate::config::DedupStore::Redis => "redis",
            },
            // Made once per process (the path and the routes take a restart).
            span_name: Box::leak(format!("POST {}", settings.server.path).into_boxed_str()),
            publish_span_names: routes
                .topics()
                .into_iter()
                .map(|topic| {
                    let name: &'static str = Box::leak(format!("publish {topic}").into_boxed_str());
                    (topic, name)
                })
                .collect(),
            routes,
        })
    }

    /// The producer span's name for `topic`.
    fn publish_span_name(&self, topic: &str) -> Cow<'static, str> {
        match self.publish_span_names.iter().find(|(t, _)| t == topic) {
            Some((_, name)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("publish {topic}")),
        }
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
        let parent = self.tracing.extract(req.headers());
        let cx = match self.tracing.tracer() {
            Some(tracer) => {
                // Semantic conventions: a method HTTP does not define is `_OTHER` (its
                // original cut short) and names the span `HTTP`; nothing a sender controls
                // goes into a span uncut.
                let routed = req.uri().path() == self.path;
                let method = trace::known_method(req.method());
                let name = match method {
                    Some("POST") if routed => self.span_name,
                    Some(method) => method,
                    None => "HTTP",
                };
                let span = trace::start_span(
                    tracer,
                    Cow::Borrowed(name),
                    trace::SpanKind::Server,
                    &parent,
                    || {
                        let mut attributes = vec![
                            KeyValue::new("http.request.method", method.unwrap_or("_OTHER")),
                            KeyValue::new(
                                "url.path",
                                trace::cut(req.uri().path(), trace::MAX_ATTRIBUTE_BYTES),
                            ),
                        ];
                        if method.is_none() {
                            attributes.push(KeyValue::new(
                                "http.request.method_original",
                                trace::cut(req.method().as_str(), trace::MAX_METHOD_BYTES),
                            ));
                        }
                        if routed {
                            attributes.push(KeyValue::new("http.route", self.path.clone()));
                        }
                        attributes
                    },
                );
                parent.with_span(span)
            }
            None => parent,
        };
        // Whether this request's spans record (sampled): only then are attributes and
        // events made.
        let traced = cx.span().is_recording();
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
        if traced {
            let span = cx.span();
            let status = response.status().as_u16();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            span.set_attribute(KeyValue::new("tamio.outcome", outcome.as_str()));
            // The refusal's kind, never its message, the body or a header.
            if let Some(kind) = refused {
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(trace::Status::error(kind));
            }
            span.end();
        }
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
        self.publish_verified(parts.headers, bytes, received_at, deadline, seen, cx, None)
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
        let how = Replay { replayed, dry_run };
        let accepted = self
            .publish_verified(
                headers,
                body,
                received_at,
                deadline,
                &mut seen,
                &cx,
                Some(how),
            )
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

    /// Verifies, validates, routes, claims and publishes a received body.
    #[allow(clippy::too_many_arguments)]
    async fn publish_verified(
        &self,
        headers: HeaderMap,
        bytes: Bytes,
        received_at: SystemTime,
        deadline: tokio::time::Instant,
        seen: &mut Seen,
        cx: &TraceContext,
        replay: Option<Replay>,
    ) -> Result<Accepted, IngestError> {
        let traced = cx.span().is_recording();
        let verifier = self.verifier();
        let verified = verifier
            .verify(&headers, bytes, received_at)
            .inspect_err(|e| {
                self.metrics
                    .signature_failures
                    .with_label_values(&[e.reason().as_str()])
                    .inc()
            })?;
        if let Some(delay) = verified.sender_delay_secs() {
            self.metrics.sender_delay.observe(delay as f64);
        }
        if traced {
            let scheme = verified.scheme().map_or("unsigned", |s| s.as_str());
            cx.span().add_event(
                "signature verified",
                vec![KeyValue::new("tamio.signature.scheme", scheme)],
            );
        }

        let envelope = match Envelope::parse(&verified) {
            Ok(envelope) => envelope,
            Err(e) => {
                let key = || envelope::peek_ticket_id(verified.bytes());
                return Err(self
                    .refuse_signed(e.into(), &verified, &headers, key, deadline, &replay)
                    .await);
            }
        };
        seen.event_id = Some(slice_or_own(verified.bytes(), envelope.event_id.clone()));
        seen.event_type = Some(slice_or_own(verified.bytes(), envelope.event_type.clone()));
        if traced {
            let span = cx.span();
            span.add_event("envelope parsed", vec![]);
            span.set_attribute(KeyValue::new(
                "tamio.event.id",
                envelope.event_id.to_string(),
            ));
            span.set_attribute(KeyValue::new(
                "tamio.event.type",
                envelope.event_type.to_string(),
            ));
        }
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("event_id", envelope.event_id.as_ref());
            span.record("event_type", envelope.event_type.as_ref());
        }

        let destination = match self.routes.route(&envelope, verified.bytes()) {
            Ok(destination) => destination,
            Err(e) => {
                // Keyed by the ticket whatever the event type, so that a ticket's letters
                // share a partition and are replayed in order.
                let key = || {
                    envelope
                        .ticket_id
                        .as_deref()
                        .map(str::to_owned)
                        .or_else(|| envelope::peek_ticket_id(verified.bytes()))
                };
                return Err(self
                    .refuse_signed(e.into(), &verified, &headers, key, deadline, &replay)
                    .await);
            }
        };

        if let Some(Replay { dry_run: true, .. }) = &replay {
            return Ok(Accepted {
                held: None,
                event_id: slice_or_own(verified.bytes(), envelope.event_id.clone()),
                topic: destination.topic.clone(),
                partition: -1,
                offset: -1,
                duplicate: false,
            });
        }

        // A delivery of an event already acknowledged writes nothing; one of an event being
        // published right now waits for that outcome. Ids are scoped by endpoint, so one
        // endpoint's ids cannot shadow another's.
        // What Kafka cannot take now is refused before anything waits: a delivery of an event
        // whose earlier delivery is still in Kafka's hands (its sender already answered 503)
        // would otherwise wait for that one's verdict, to be refused then.
        let key = destination.key.as_deref().map(str::as_bytes);
        if let Some(refusal) = self.publisher.refusal_now(destination.topic, key) {
            return Err(refusal.into());
        }
        let claim = if self.dedup.enabled() {
            // A delivery of an event whose earlier delivery is still in Kafka's hands waits for
            // that one's verdict; until the probe learns Kafka cannot take the record.
            let refused = async {
                self.publisher.until_refused(destination.topic, key).await;
            };
            let claim = self
                .dedup
                .claim(&envelope.endpoint_id, &envelope.event_id, deadline, refused)
                .await;
            self.metrics.dedup_entries.set(self.dedup.len() as i64);
            if traced {
                let result = match &claim {
                    Ok(Claim::First(_)) => "miss",
                    Ok(Claim::Duplicate(_)) => "hit",
                    Err(Unclaimed::Timeout) => "timeout",
                    Err(Unclaimed::StoreUnavailable) => "unavailable",
                    Err(Unclaimed::GaveUp) => "refused",
                };
                cx.span().add_event(
                    "duplicate claim",
                    vec![
                        KeyValue::new("tamio.dedup.store", self.dedup_store),
                        KeyValue::new("tamio.dedup.result", result),
                    ],
                );
            }
            match claim {
                Err(Unclaimed::Timeout) => {
                    return Err(PublishError::Timeout(self.request_timeout).into())
                }
                Err(Unclaimed::StoreUnavailable) => return Err(IngestError::DedupUnavailable),
                Err(Unclaimed::GaveUp) => {
                    let refusal = self.publisher.refusal_now(destination.topic, key);
                    return Err(refusal
                        .unwrap_or_else(|| PublishError::Unreachable("Kafka refused it".into()))
                        .into());
                }
                Ok(Claim::Duplicate(original)) => {
                    return Ok(Accepted {
                        held: None,
                        event_id: slice_or_own(verified.bytes(), envelope.event_id.clone()),
                        topic: original.topic,
                        partition: original.delivered.partition,
                        offset: original.delivered.offset,
                        duplicate: true,
                    })
                }
                Ok(Claim::First(guard)) => Some(guard),
            }
        } else {
            None
        };

        // The delivery holds the duplicate claim until Kafka's verdict. It is awaited here;
        // if the request ends first (its deadline passes: 503, or the client goes away), a
        // task of its own finishes it, so that a record that still lands is remembered and
        // the sender's retry is answered as a duplicate instead of written again.
        let mut record = record(&verified, headers, &envelope, destination, self.cloudevents);
        // The producer span, child of the server span; without spans, only its id, in the
        // request's trace. Its context travels in the record's headers.
        let (span, producer_cx) = match self.tracing.tracer() {
            Some(tracer) => {
                let span = trace::start_span(
                    tracer,
                    self.publish_span_name(&record.topic),
                    trace::SpanKind::Producer,
                    cx,
                    || {
                        let mut attributes = vec![
                            KeyValue::new("messaging.system", "kafka"),
                            KeyValue::new("messaging.operation.type", "send"),
                            KeyValue::new("messaging.operation.name", "publish"),
                            KeyValue::new("messaging.destination.name", record.topic.to_string()),
                        ];
                        if let Some(key) = &record.key {
                            attributes.push(KeyValue::new(
                                "messaging.kafka.message.key",
                                trace::cut(
                                    &String::from_utf8_lossy(key),
                                    trace::MAX_ATTRIBUTE_BYTES,
                                ),
                            ));
                        }
                        attributes
                    },
                );
                let producer_cx =
                    TraceContext::new().with_remote_span_context(span.span_context().clone());
                (Some(span), producer_cx)
            }
            None => (None, self.tracing.unbuilt_child(cx)),
        };
        record.trace = Some(self.tracing.headers_of(&producer_cx));
        // A replayed record is written inside the replay's transaction: its claim is
        // acknowledged once that commits.
        let hold = replay.is_some();
        record.replayed = replay.map(|r| r.replayed);
        let event_id = record.event_id.clone();
        let (topic, key) = (record.topic.clone(), record.key.clone());
        let mut delivery = Finish::new(deliver(
            self.publisher.clone(),
            record,
            claim,
            span,
            hold,
            deadline,
        ));
        // Answered at the deadline, or as soon as the readiness probe learns that Kafka
        // cannot take the record now (no broker answers, too few in-sync replicas): the
        // delivery then goes on without its sender, holding the duplicate claim until
        // Kafka's verdict, so that the sender's retry is not written twice.
        let (delivered, topic, held) = tokio::select! {
            biased;
            result = &mut delivery => result?,
            () = tokio::time::sleep_until(deadline) => {
                return Err(PublishError::Timeout(self.request_timeout).into())
            }
            refused = self.publisher.until_refused(&topic, key.as_deref()) => {
                return Err(refused.into())
            }
        };
        self.metrics.dedup_entries.set(self.dedup.len() as i64);

        Ok(Accepted {
            held,
            event_id,
            topic,
            partition: delivered.partition,
            offset: delivered.offset,
            duplicate: false,
        })
    }

    /// A genuine sender's delivery that cannot be published: with a dead-letter topic, its
    /// raw body goes there before the sender hears `err`. If that write fails, the sender is
    /// told to retry (503) rather than lose the body.
    async fn refuse_signed(
        &self,
        err: IngestError,
        verified: &VerifiedBody,
        headers: &HeaderMap,
        key: impl FnOnce() -> Option<String>,
        deadline: tokio::time::Instant,
        replay: &Option<Replay>,
    ) -> IngestError {
        // A replayed dead letter that still fails stays where it is.
        let (Some(topic), None) = (&self.dead_letter_topic, replay) else {
            return err;
        };
        // The ticket id, read only for a letter that is written.
        let key = key();
        let message = err.to_string();
        let letter = DeadLetter {
            topic,
            key: key.as_deref().map(str::as_bytes),
            value: verified.bytes(),
            error_kind: err.refusal().kind(),
            error: &message,
            headers,
            proof: verified.proof(),
            received_at: verified.received_at(),
        };
        match self.publisher.dead_letter(letter, deadline).await {
            Ok(_) => err,
            Err(publish) => {
                tracing::warn!(refused = %message, "the dead-letter write failed");
                IngestError::Publish(publish)
            }
        }
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

/// The record of a verified, valid and routed delivery: the body byte for byte, and the
/// identifiers as slices of its buffer.
pub fn record(
    verified: &VerifiedBody,
    headers: HeaderMap,
    envelope: &Envelope<'_>,
    destination: Destination<'_>,
    cloudevents: bool,
) -> Record {
    let body = verified.bytes();
    Record {
        topic: destination.topic.clone(),
        key: destination.key.map(|key| slice_or_own(body, key)),
        value: body.clone(),
        event_id: slice_or_own(body, envelope.event_id.clone()),
        event_type: slice_or_own(body, envelope.event_type.clone()),
        endpoint_id: slice_or_own(body, envelope.endpoint_id.clone()),
        ticket_id: envelope.ticket_id.clone().map(|t| slice_or_own(body, t)),
        headers,
        proof: verified.proof().clone(),
        signed_at: verified.signed_at(),
        received_at: verified.received_at(),
        cloudevents,
        event_label: envelope::event_type_label(&envelope.event_type),
        trace: None,
        replayed: None,
    }
}

/// `text`, a part of `body`, as a slice of the body's buffer (no copy); its own copy when
/// the JSON had to unescape it.
fn slice_or_own(body: &Bytes, text: Cow<'_, str>) -> Bytes {
    match text {
        Cow::Borrowed(s) => body.slice_ref(s.as_bytes()),
        Cow::Owned(s) => Bytes::from(s.into_bytes()),
    }
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
