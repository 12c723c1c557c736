//! A verified body's way to Kafka: envelope, route, duplicate claim, record, delivery. The
//! same for a sender's delivery and a replayed dead letter; `How` says which.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context as TraceContext, KeyValue};

use super::dedup::Dedup;
use super::dedup::{self, Claim, Original, Unclaimed};
use super::envelope::{self, Envelope};
use super::error::IngestError;
use super::route::Destination;
use super::route::Routes;
use super::verify::VerifiedBody;
use crate::config::Settings;
use crate::finish::Finish;
use crate::metrics::Metrics;
use crate::publish::record::{DeadLetter, Record, Replayed};
use crate::publish::{PublishError, Publisher};
use crate::trace::Tracing;
use crate::trace::{self, Span as _};

/// The identifiers of the request's event, once its envelope has been read: the log line of
/// a refusal names them.
#[derive(Default)]
pub(super) struct Seen {
    event_id: Option<Bytes>,
    event_type: Option<Bytes>,
}

impl Seen {
    pub(super) fn event_id(&self) -> Option<&str> {
        self.event_id
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    pub(super) fn event_type(&self) -> Option<&str> {
        self.event_type
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// How a verified body is accepted.
pub(super) enum How {
    /// A sender's delivery: with a dead-letter topic, one that cannot be published goes
    /// there before its sender is answered.
    Live,
    /// A dead letter put through again, inside the replay's transaction: a refusal stays
    /// where it is, and the duplicate claim is held until the transaction commits.
    Replay(Replayed),
    /// A replay's dry run: stops once the destination is known and writes nothing.
    DryRun,
}

/// What the sender is told about an accepted event.
#[derive(Debug, serde::Serialize)]
pub(super) struct Accepted {
    /// A replayed event's claim, held for its transaction (never serialized).
    #[serde(skip)]
    pub held: Option<HeldClaim>,
    /// A slice of the body: the envelope's `event_id`, valid UTF-8.
    #[serde(serialize_with = "as_text")]
    pub event_id: Bytes,
    #[serde(serialize_with = "as_str")]
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub duplicate: bool,
}

fn as_str<S: serde::Serializer>(text: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(text)
}

fn as_text<S: serde::Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(std::str::from_utf8(bytes).unwrap_or_default())
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

/// What accepting a verified body takes, shared by every request and the replay.
pub(super) struct Accept {
    request_timeout: Duration,
    routes: Routes,
    cloudevents: bool,
    dead_letter_topic: Option<String>,
    dedup: Arc<Dedup>,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    tracing: Arc<Tracing>,
    /// The duplicate store's name, for spans.
    dedup_store: &'static str,
    /// The producer spans' names (`publish <topic>`) for the routes' topics: made once,
    /// not per request.
    publish_span_names: Vec<(String, &'static str)>,
}

impl Accept {
    pub(super) fn new(
        settings: &Settings,
        routes: Routes,
        dedup: Arc<Dedup>,
        publisher: Arc<Publisher>,
        metrics: Arc<Metrics>,
        tracing: Arc<Tracing>,
    ) -> Accept {
        Accept {
            request_timeout: settings.request_timeout(),
            cloudevents: settings.kafka.cloudevents,
            dead_letter_topic: settings.dead_letter_topic().map(str::to_owned),
            dedup,
            publisher,
            metrics,
            tracing,
            dedup_store: match settings.dedup.store {
                crate::config::DedupStore::Memory => "memory",
                crate::config::DedupStore::Redis => "redis",
            },
            // Made once per process (the routes take a restart).
            publish_span_names: routes
                .topics()
                .into_iter()
                .map(|topic| {
                    let name: &'static str = Box::leak(format!("publish {topic}").into_boxed_str());
                    (topic, name)
                })
                .collect(),
            routes,
        }
    }

    /// The producer span's name for `topic`.
    fn publish_span_name(&self, topic: &str) -> Cow<'static, str> {
        match self.publish_span_names.iter().find(|(t, _)| t == topic) {
            Some((_, name)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("publish {topic}")),
        }
    }

    /// Validates, routes, claims and publishes a verified body.
    pub(super) async fn accept(
        &self,
        verified: VerifiedBody,
        headers: HeaderMap,
        deadline: tokio::time::Instant,
        seen: &mut Seen,
        cx: &TraceContext,
        how: How,
    ) -> Result<Accepted, IngestError> {
        let envelope = match Envelope::parse(&verified) {
            Ok(envelope) => envelope,
            Err(e) => {
                let key = || envelope::peek_ticket_id(verified.bytes());
                return Err(self
                    .refuse_signed(e.into(), &verified, &headers, key, deadline, &how)
                    .await);
            }
        };
        self.seen(seen, &verified, &envelope, cx);
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
                    .refuse_signed(e.into(), &verified, &headers, key, deadline, &how)
                    .await);
            }
        };
        let accepted = |topic, partition, offset, duplicate| Accepted {
            held: None,
            event_id: slice_or_own(verified.bytes(), envelope.event_id.clone()),
            topic,
            partition,
            offset,
            duplicate,
        };
        if let How::DryRun = how {
            return Ok(accepted(destination.topic.clone(), -1, -1, false));
        }
        // What Kafka cannot take now is refused before anything waits: a delivery of an event
        // whose earlier delivery is still in Kafka's hands (its sender already answered 503)
        // would otherwise wait for that one's verdict, to be refused then.
        let key = destination.key.as_deref().map(str::as_bytes);
        if let Some(refusal) = self.publisher.refusal_now(destination.topic, key) {
            return Err(refusal.into());
        }
        let claim = match self.claim(&envelope, &destination, deadline, cx).await? {
            Some(Claim::Duplicate(original)) => {
                let Original { topic, delivered } = original;
                return Ok(accepted(topic, delivered.partition, delivered.offset, true));
            }
            Some(Claim::First(guard)) => Some(guard),
            None => None,
        };
        let record = record(&verified, headers, &envelope, destination, self.cloudevents);
        self.publish(record, claim, deadline, cx, how).await
    }

    /// Notes the event's identifiers: for the refusal's log line, the server span and the
    /// request's log span.
    fn seen(
        &self,
        seen: &mut Seen,
        verified: &VerifiedBody,
        envelope: &Envelope,
        cx: &TraceContext,
    ) {
        seen.event_id = Some(slice_or_own(verified.bytes(), envelope.event_id.clone()));
        seen.event_type = Some(slice_or_own(verified.bytes(), envelope.event_type.clone()));
        let span = cx.span();
        if span.is_recording() {
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
    }

    /// The event's duplicate claim (None with duplicate suppression off). A delivery of an
    /// event already acknowledged writes nothing; one of an event being published right now
    /// waits for that outcome, until the probe learns Kafka cannot take the record. Ids are
    /// scoped by endpoint, so one endpoint's ids cannot shadow another's.
    async fn claim(
        &self,
        envelope: &Envelope<'_>,
        destination: &Destination<'_>,
        deadline: tokio::time::Instant,
        cx: &TraceContext,
    ) -> Result<Option<Claim>, IngestError> {
        if !self.dedup.enabled() {
            return Ok(None);
        }
        let key = destination.key.as_deref().map(str::as_bytes);
        let refused = async {
            self.publisher.until_refused(destination.topic, key).await;
        };
        let claim = self
            .dedup
            .claim(&envelope.endpoint_id, &envelope.event_id, deadline, refused)
            .await;
        self.metrics.dedup_entries.set(self.dedup.len() as i64);
        if cx.span().is_recording() {
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
            Ok(claim) => Ok(Some(claim)),
            Err(Unclaimed::Timeout) => Err(PublishError::Timeout(self.request_timeout).into()),
            Err(Unclaimed::StoreUnavailable) => Err(IngestError::DedupUnavailable),
            Err(Unclaimed::GaveUp) => {
                let refusal = self.publisher.refusal_now(destination.topic, key);
                Err(refusal
                    .unwrap_or_else(|| PublishError::Unreachable("Kafka refused it".into()))
                    .into())
            }
        }
    }

    /// Publishes `record` and waits for Kafka's verdict, holding the duplicate claim until
    /// then. If the request ends first (its deadline passes: 503, or the client goes away),
    /// a task of its own finishes the delivery, so that a record that still lands is
    /// remembered and the sender's retry is answered as a duplicate instead of written again.
    async fn publish(
        &self,
        mut record: Record,
        claim: Option<dedup::ClaimGuard>,
        deadline: tokio::time::Instant,
        cx: &TraceContext,
        how: How,
    ) -> Result<Accepted, IngestError> {
        // The producer span's context travels in the record's headers.
        let name = self.publish_span_name(&record.topic);
        let (span, producer_cx) =
            self.tracing
                .producer_span(name, &record.topic, record.key.as_deref(), cx);
        record.trace = Some(self.tracing.headers_of(&producer_cx));
        // A replayed record is written inside the replay's transaction: its claim is
        // acknowledged once that commits.
        let hold = matches!(how, How::Replay(_));
        if let How::Replay(replayed) = how {
            record.replayed = Some(replayed);
        }
        let event_id = record.event_id.clone();
        let (topic, key) = (record.topic.clone(), record.key.clone());
        let publisher = self.publisher.clone();
        let mut delivery = Finish::new(deliver(publisher, record, claim, span, hold, deadline));
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
        how: &How,
    ) -> IngestError {
        // A replayed dead letter that still fails stays where it is.
        let (Some(topic), How::Live) = (&self.dead_letter_topic, how) else {
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
