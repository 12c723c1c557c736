//! Trace context from the webhook into Kafka, and OpenTelemetry traces of deliveries.
//!
//! - **Propagation, always.** A request's W3C `traceparent` and `tracestate` are read with
//!   the SDK's trace-context propagator; invalid ones are ignored. Every record carries a
//!   `traceparent` naming its producer span (and the `tracestate`), sampled or not, as W3C
//!   propagation asks: without tracing on, the span is not built but its id is made, in the
//!   request's trace (or a new one).
//! - **Spans, when an endpoint is set.** A server span per request and a producer span per
//!   record, sampled parent-based (or as `OTEL_TRACES_SAMPLER` says), exported over OTLP/HTTP
//!   by the SDK's exporter. Export never holds a request: ended spans go into a bounded queue
//!   that a task drains in batches; a full queue, or an export that fails or takes longer
//!   than its deadline, drops spans and counts them
//!   (`tamio_bridge_trace_spans_dropped_total`).
//! - **Bounded in bytes, whatever a sender sends.** Every part of a span that comes from the
//!   request is cut to a bound (an unknown method is `_OTHER`, its original cut to
//!   [`MAX_METHOD_BYTES`]; a `tracestate` is kept to its members within
//!   [`MAX_TRACESTATE_BYTES`], as W3C allows), and the queue is bounded in bytes as well as in
//!   spans, the export in progress included. Spans of refused requests, which anyone can
//!   make sampled with a `traceparent`, take at most half of it.
//! - **At no cost when off**: no span is built, nothing is queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::config::{SettingsError, Tracing as TracingSettings};

pub use opentelemetry::trace::{Span, SpanKind, Status};
pub type BoxedSpan = opentelemetry_sdk::trace::Span;

/// Spans one export carries at most.
const BATCH: usize = 512;

/// The longest `http.request.method_original` kept for a method that is not HTTP's.
pub const MAX_METHOD_BYTES: usize = 64;

/// The longest `tracestate` continued: its leading members within this, as W3C's
/// "at least 512 characters" asks; longer ones are cut at a member's end.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The longest value of an attribute that comes from a request (a path, an id, a key).
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

/// A span's own size besides its name, attributes, events and trace state (SpanData's
/// fields, its vectors' headers, the resource and scope it points to).
const SPAN_OVERHEAD_BYTES: usize = 512;

/// The largest a span of the bridge can be with every cut above: the bound the memory formula
/// uses for spans of requests in progress.
pub const MAX_SPAN_BYTES: usize = 2 << 10;

/// How often spans waiting are exported, at the latest.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// The tracing the settings and the environment ask for, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The OTLP/HTTP traces URL; None exports nothing.
    pub endpoint: Option<String>,
    pub headers: HashMap<String, String>,
    pub service_name: String,
    pub sampler: SamplerChoice,
    pub max_queue_spans: usize,
    /// Bytes of spans waiting for export or being exported, at most.
    pub max_queue_bytes: usize,
    pub export_timeout: Duration,
}

/// A sampler, as `OTEL_TRACES_SAMPLER` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBased(ParentDefault),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParentDefault {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl SamplerChoice {
    fn sampler(self) -> Sampler {
        let root = |d: ParentDefault| match d {
            ParentDefault::AlwaysOn => Sampler::AlwaysOn,
            ParentDefault::AlwaysOff => Sampler::AlwaysOff,
            ParentDefault::Ratio(r) => Sampler::TraceIdRatioBased(r),
        };
        match self {
            SamplerChoice::AlwaysOn => Sampler::AlwaysOn,
            SamplerChoice::AlwaysOff => Sampler::AlwaysOff,
            SamplerChoice::Ratio(r) => Sampler::TraceIdRatioBased(r),
            SamplerChoice::ParentBased(d) => Sampler::ParentBased(Box::new(root(d))),
        }
    }
}

impl Plan {
    /// The plan of the `tracing` settings, the standard `OTEL_*` variables of `env` winning
    /// over them.
    pub fn build(
        t: &TracingSettings,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Plan, SettingsError> {
        let bad = |key: &'static str, reason: String| SettingsError::Invalid { key, reason };
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let traces_url = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
        let endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| traces_url(&b)))
            .or_else(|| (!t.endpoint.is_empty()).then(|| traces_url(&t.endpoint)));
        if let Some(url) = &endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(
                    "tracing.endpoint",
                    "must be an http:// or https:// URL (OTLP over HTTP)".into(),
                ));
            }
            if url.starts_with("https://") {
                return Err(bad(
                    "tracing.endpoint",
                    "https:// is not supported yet: export to a collector on the pod's \
                     network in cleartext, and let it forward over TLS"
                        .into(),
                ));
            }
        }
        let sampler = sampler(
            &set("OTEL_TRACES_SAMPLER").unwrap_or_else(|| t.sampler.clone()),
            &set("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| t.sampler_arg.clone()),
        )?;
        let mut headers: HashMap<String, String> = t.headers.clone().into_iter().collect();
        // The exporter reads OTEL_EXPORTER_OTLP_HEADERS itself, over these.
        headers.retain(|k, _| !k.trim().is_empty());
        if t.max_queue_spans == 0 {
            return Err(bad("tracing.max_queue_spans", "must be above 0".into()));
        }
        if t.max_queue_bytes < 64 << 10 {
            return Err(bad(
                "tracing.max_queue_bytes",
                "must be at least 65536 (64 KiB)".into(),
            ));
        }
        if t.export_timeout_ms == 0 {
            return Err(bad("tracing.export_timeout_ms", "must be above 0".into()));
        }
        Ok(Plan {
            endpoint,
            headers,
            service_name: set("OTEL_SERVICE_NAME").unwrap_or_else(|| t.service_name.clone()),
            sampler,
            max_queue_spans: t.max_queue_spans,
            max_queue_bytes: t.max_queue_bytes,
            export_timeout: Duration::from_millis(t.export_timeout_ms),
        })
    }
}

/// The sampler `name` (OpenTelemetry's names) with its `arg`, a ratio where it takes one.
fn sampler(name: &str, arg: &str) -> Result<SamplerChoice, SettingsError> {
    let bad = |key: &'static str, reason: String| SettingsError::Invalid { key, reason };
    let ratio = || -> Result<f64, SettingsError> {
        arg.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| {
                bad(
                    "tracing.sampler_arg",
                    format!("`{arg}` is no ratio between 0 and 1"),
                )
            })
    };
    Ok(match name.trim() {
        "always_on" => SamplerChoice::AlwaysOn,
        "always_off" => SamplerChoice::AlwaysOff,
        "traceidratio" => SamplerChoice::Ratio(ratio()?),
        "parentbased_always_on" => SamplerChoice::ParentBased(ParentDefault::AlwaysOn),
        "parentbased_always_off" => SamplerChoice::ParentBased(ParentDefault::AlwaysOff),
        "parentbased_traceidratio" => SamplerChoice::ParentBased(ParentDefault::Ratio(ratio()?)),
        other => {
            return Err(bad(
                "tracing.sampler",
                format!(
                    "`{other}` is none of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                ),
            ))
        }
    })
}

/// Tracing in force: the propagator, always; the tracer, when spans are exported.
pub struct Tracing {
    propagator: TraceContextPropagator,
    tracer: Option<SdkTracer>,
    provider: Option<SdkTracerProvider>,
}

/// The W3C headers a record carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl Tracing {
    /// Propagation only.
    pub fn off() -> Tracing {
        Tracing {
            propagator: TraceContextPropagator::new(),
            tracer: None,
            provider: None,
        }
    }

    /// The tracing of `plan`; with an endpoint, the export task runs on the current tokio
    /// runtime.
    pub fn start(plan: &Plan, dropped: IntCounter) -> Result<Tracing, String> {
        let Some(endpoint) = &plan.endpoint else {
            return Ok(Tracing::off());
        };
        let client = opentelemetry_http::hyper::HyperClient::with_default_connector(
            plan.export_timeout,
            None,
        );
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(endpoint.clone())
            .with_headers(plan.headers.clone())
            .with_timeout(plan.export_timeout)
            .build()
            .map_err(|e| format!("the OTLP exporter: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(plan.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(plan.max_queue_spans);
        let (flush, flushes) = mpsc::unbounded_channel();
        let bytes = Arc::new(QueueBytes {
            max: plan.max_queue_bytes,
            all: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        tokio::spawn(export(
            exporter,
            rx,
            flushes,
            plan.export_timeout,
            dropped.clone(),
            bytes.clone(),
        ));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue {
                tx,
                flush,
                dropped,
                bytes,
            })
            .with_sampler(plan.sampler.sampler())
            .with_resource(resource)
            .build();
        Ok(Tracing {
            propagator: TraceContextPropagator::new(),
            tracer: Some(provider.tracer("tamio-kafka-bridge")),
            provider: Some(provider),
        })
    }

    /// The tracer, when spans are built.
    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracer.as_ref()
    }

    /// The trace context a request's headers carry (empty when they carry none, or an
    /// invalid one), its `tracestate` cut to [`MAX_TRACESTATE_BYTES`].
    pub fn extract(&self, headers: &http::HeaderMap) -> Context {
        if !headers.contains_key("traceparent") {
            return Context::new();
        }
        self.propagator.extract(&Bounded(headers))
    }

    /// The trace context any carrier holds (a record's headers, for a consumer).
    pub fn extract_from(&self, carrier: &dyn Extractor) -> Context {
        self.propagator.extract(carrier)
    }

    /// The headers of a record whose producer span is `span` (the span of `cx`).
    pub fn headers_of(&self, cx: &Context) -> TraceHeaders {
        let mut out = Headers::default();
        self.propagator.inject_context(cx, &mut out);
        TraceHeaders {
            traceparent: out.traceparent.unwrap_or_default(),
            tracestate: out.tracestate.filter(|s| !s.is_empty()),
        }
    }

    /// The context of a producer span that is not built (tracing off, or not sampled): a
    /// new span id in the parent's trace (or a new trace), with the parent's flags and
    /// state.
    pub fn unbuilt_child(&self, parent: &Context) -> Context {
        let span = parent.span();
        let p = span.span_context();
        let (trace_id, flags, state) = if p.is_valid() {
            (p.trace_id(), p.trace_flags(), p.trace_state().clone())
        } else {
            (
                TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes()),
                TraceFlags::default(),
                TraceState::default(),
            )
        };
        let id = SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes());
        Context::new().with_remote_span_context(SpanContext::new(trace_id, id, flags, false, state))
    }

    /// The context of a request's server span, child of `parent` (the request's own trace
    /// context); `parent` itself when spans are not built. `route`: the ingress path and
    /// its span name, when the request is for it. Semantic conventions: a method HTTP does
    /// not define is `_OTHER` (its original cut short) and names the span `HTTP`; nothing
    /// a sender controls goes into a span uncut.
    pub fn server_span(
        &self,
        parent: Context,
        method: &http::Method,
        path: &str,
        route: Option<(&str, &'static str)>,
    ) -> Context {
        let Some(tracer) = self.tracer() else {
            return parent;
        };
        let known = known_method(method);
        let name = match (known, route) {
            (Some("POST"), Some((_, name))) => name,
            (Some(method), _) => method,
            (None, _) => "HTTP",
        };
        let span = start_span(tracer, name, SpanKind::Server, &parent, || {
            let mut attributes = vec![
                KeyValue::new("http.request.method", known.unwrap_or("_OTHER")),
                KeyValue::new("url.path", cut(path, MAX_ATTRIBUTE_BYTES)),
            ];
            if known.is_none() {
                attributes.push(KeyValue::new(
                    "http.request.method_original",
                    cut(method.as_str(), MAX_METHOD_BYTES),
                ));
            }
            if let Some((route, _)) = route {
                attributes.push(KeyValue::new("http.route", route.to_owned()));
            }
            attributes
        });
        parent.with_span(span)
    }

    /// A record's producer span, child of the server span `cx`, and the context its record's
    /// headers carry; without spans, only that context (a new span id in the request's
    /// trace).
    pub fn producer_span(
        &self,
        name: std::borrow::Cow<'static, str>,
        topic: &str,
        key: Option<&[u8]>,
        cx: &Context,
    ) -> (Option<BoxedSpan>, Context) {
        let Some(tracer) = self.tracer() else {
            return (None, self.unbuilt_child(cx));
        };
        let span = start_span(tracer, name, SpanKind::Producer, cx, || {
            let mut attributes = vec![
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "publish"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
            ];
            if let Some(key) = key {
                attributes.push(KeyValue::new(
                    "messaging.kafka.message.key",
                    cut(&String::from_utf8_lossy(key), MAX_ATTRIBUTE_BYTES),
                ));
            }
            attributes
        });
        let producer_cx = Context::new().with_remote_span_context(span.span_context().clone());
        (Some(span), producer_cx)
    }

    /// Exports what waits, within `timeout` (on shutdown).
    pub fn shutdown(&self, timeout: Duration) {
        if let Some(provider) = &self.provider {
            let _ = provider.shutdown_with_timeout(timeout);
        }
    }
}

#[derive(Default)]
struct Headers {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// A request's headers as the propagator reads them, `tracestate` cut to its leading members
/// within [`MAX_TRACESTATE_BYTES`].
struct Bounded<'a>(&'a http::HeaderMap);

impl Extractor for Bounded<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?.to_str().ok()?;
        if key != "tracestate" || value.len() <= MAX_TRACESTATE_BYTES {
            return Some(value);
        }
        let end = value[..=MAX_TRACESTATE_BYTES].rfind(',')?;
        Some(&value[..end])
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// `text` cut to at most `max` bytes, at a character's boundary.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The methods HTTP defines (RFC 9110 and PATCH): any other is recorded as `_OTHER`.
pub fn known_method(method: &http::Method) -> Option<&'static str> {
    use http::Method;
    Some(match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => return None,
    })
}

/// Reads trace context from any string map (a record's headers, in the example consumer).
pub struct MapExtractor<'a>(pub &'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Bytes of spans queued or being exported, and of those the spans of refused requests.
#[derive(Debug)]
struct QueueBytes {
    max: usize,
    all: AtomicUsize,
    refused: AtomicUsize,
}

impl QueueBytes {
    /// Takes `bytes` of the bound (and of the refused requests' half); false when they do
    /// not fit.
    fn take(&self, bytes: usize, refused: bool) -> bool {
        let fits =
            |limit: usize| move |held: usize| (held + bytes <= limit).then_some(held + bytes);
        if refused
            && self
                .refused
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, fits(self.max / 2))
                .is_err()
        {
            return false;
        }
        if self
            .all
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, fits(self.max))
            .is_err()
        {
            if refused {
                self.refused.fetch_sub(bytes, Ordering::AcqRel);
            }
            return false;
        }
        true
    }

    fn give_back(&self, bytes: usize, refused: usize) {
        self.all.fetch_sub(bytes, Ordering::AcqRel);
        self.refused.fetch_sub(refused, Ordering::AcqRel);
    }
}

/// A span in the queue, with the bytes it holds of the bound.
#[derive(Debug)]
struct Queued {
    span: SpanData,
    bytes: usize,
    refused: bool,
}

/// What a span holds in memory, as near as its parts tell.
fn span_bytes(span: &SpanData) -> usize {
    let value = |v: &opentelemetry::Value| match v {
        opentelemetry::Value::String(s) => s.as_str().len(),
        _ => 16,
    };
    let attributes = |attrs: &[KeyValue]| -> usize {
        attrs
            .iter()
            .map(|kv| kv.key.as_str().len() + value(&kv.value) + 32)
            .sum()
    };
    let events: usize = span
        .events
        .iter()
        .map(|e| e.name.len() + attributes(&e.attributes) + 64)
        .sum();
    let state = span.span_context.trace_state();
    let state = if *state == TraceState::default() {
        0
    } else {
        state.header().len()
    };
    SPAN_OVERHEAD_BYTES + span.name.len() + attributes(&span.attributes) + events + state
}

/// Whether a span is a refused request's: a server span ended in error.
fn refused(span: &SpanData) -> bool {
    span.span_kind == SpanKind::Server && matches!(span.status, Status::Error { .. })
}

/// Ended spans into a queue bounded in spans and in bytes; what does not fit is dropped and
/// counted.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<Queued>,
    /// Asks the export task to export what waits now, and to say when it is done.
    flush: mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>,
    dropped: IntCounter,
    bytes: Arc<QueueBytes>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let (bytes, refused) = (span_bytes(&span), refused(&span));
        if !self.bytes.take(bytes, refused) {
            self.dropped.inc();
            return;
        }
        let queued = Queued {
            span,
            bytes,
            refused,
        };
        if self.tx.try_send(queued).is_err() {
            self.bytes.give_back(bytes, if refused { bytes } else { 0 });
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        // Called off the runtime's threads (the bridge's shutdown uses a blocking thread).
        let (done, wait) = std::sync::mpsc::channel();
        if self.flush.send(done).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
        Ok(())
    }
}

/// Exports the queue's spans in batches, every [`EXPORT_EVERY`] or [`BATCH`] spans; an
/// export that fails or takes longer than `timeout` drops its spans (counted). A batch's
/// bytes are given back once its export is over.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<Queued>,
    mut flushes: mpsc::UnboundedReceiver<std::sync::mpsc::Sender<()>>,
    timeout: Duration,
    dropped: IntCounter,
    bytes: Arc<QueueBytes>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let out = |batch: &mut Vec<Queued>| std::mem::replace(batch, Vec::with_capacity(BATCH));
    loop {
        let deadline = tokio::time::Instant::now() + EXPORT_EVERY;
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                received = tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)) => {
                    match received {
                        Ok(0) => {
                            // Every sender is gone: the last batch, then stop.
                            if !batch.is_empty() {
                                send(&exporter, out(&mut batch), timeout, &dropped, &bytes).await;
                            }
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                Some(done) = flushes.recv() => {
                    // Everything that waits, now.
                    while let Ok(span) = rx.try_recv() {
                        batch.push(span);
                        if batch.len() == BATCH {
                            send(&exporter, out(&mut batch), timeout, &dropped, &bytes).await;
                        }
                    }
                    if !batch.is_empty() {
                        send(&exporter, out(&mut batch), timeout, &dropped, &bytes).await;
                    }
                    let _ = done.send(());
                }
            }
        }
        if !batch.is_empty() {
            send(&exporter, out(&mut batch), timeout, &dropped, &bytes).await;
        }
    }
}

async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<Queued>,
    timeout: Duration,
    dropped: &IntCounter,
    bytes: &QueueBytes,
) {
    let n = batch.len() as u64;
    let (mut held, mut refused) = (0, 0);
    let spans: Vec<SpanData> = batch
        .into_iter()
        .map(|q| {
            held += q.bytes;
            if q.refused {
                refused += q.bytes;
            }
            q.span
        })
        .collect();
    match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            dropped.inc_by(n);
            tracing::debug!(%err, spans = n, "span export failed; the spans are dropped");
        }
        Err(_) => {
            dropped.inc_by(n);
            tracing::debug!(spans = n, "span export timed out; the spans are dropped");
        }
    }
    bytes.give_back(held, refused);
}

/// Ends the server span of `cx` with the answer: its status, the outcome and, for a
/// refusal, its kind (never its message, the body or a header).
pub fn end_server_span(
    cx: &Context,
    status: u16,
    outcome: &'static str,
    refused: Option<&'static str>,
) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    span.set_attribute(KeyValue::new("tamio.outcome", outcome));
    if let Some(kind) = refused {
        span.set_attribute(KeyValue::new("error.type", kind));
        span.set_status(Status::error(kind));
    }
    span.end();
}

/// Starts a span on `tracer`, child of `parent`, with `attributes`.
pub fn start_span(
    tracer: &SdkTracer,
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> BoxedSpan {
    // The samplers offered decide on the trace id and the parent alone, so the attributes
    // are made only for a span that records: an unsampled request allocates none of them.
    let mut span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, parent);
    if span.is_recording() {
        span.set_attributes(attributes());
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TracingSettings {
        crate::config::Settings::load_from(None, Vec::<(String, String)>::new())
            .unwrap()
            .tracing
    }

    #[test]
    fn the_standard_variables_win_over_the_settings() {
        let mut t = settings();
        t.endpoint = "http://collector:4318".into();
        let plan = Plan::build(&t, |_| None).unwrap();
        assert_eq!(
            plan.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            plan.sampler,
            SamplerChoice::ParentBased(ParentDefault::Ratio(1.0))
        );
        let env = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://other:4318/".into()),
            "OTEL_TRACES_SAMPLER" => Some("traceidratio".into()),
            "OTEL_TRACES_SAMPLER_ARG" => Some("0.25".into()),
            "OTEL_SERVICE_NAME" => Some("bridge-eu".into()),
            _ => None,
        };
        let plan = Plan::build(&t, env).unwrap();
        assert_eq!(
            plan.endpoint.as_deref(),
            Some("http://other:4318/v1/traces")
        );
        assert_eq!(plan.sampler, SamplerChoice::Ratio(0.25));
        assert_eq!(plan.service_name, "bridge-eu");
        let traces = |name: &str| {
            (name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| "http://t:1/custom".into())
        };
        assert_eq!(
            Plan::build(&t, traces).unwrap().endpoint.as_deref(),
            Some("http://t:1/custom")
        );
        t.sampler_arg = "2".into();
        assert!(Plan::build(&t, |_| None).is_err());
        t.sampler_arg = "1".into();
        t.sampler = "sometimes".into();
        assert!(Plan::build(&t, |_| None).is_err());
    }

    #[test]
    fn a_long_tracestate_keeps_its_leading_members_within_the_bound() {
        let tracing = Tracing::off();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let members: Vec<String> = (0..32)
            .map(|i| format!("v{i}={}", "x".repeat(250)))
            .collect();
        headers.insert("tracestate", members.join(",").parse().unwrap());
        let out = tracing.headers_of(&tracing.unbuilt_child(&tracing.extract(&headers)));
        let state = out.tracestate.unwrap();
        assert!(state.len() <= MAX_TRACESTATE_BYTES, "{}", state.len());
        assert!(state.starts_with("v0="), "{state}");
    }

    #[test]
    fn spans_of_refused_requests_take_at_most_half_the_queue() {
        let q = QueueBytes {
            max: 1000,
            all: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        };
        assert!(q.take(400, true));
        assert!(!q.take(200, true), "past half for refused requests");
        assert!(q.take(500, false), "accepted ones still have room");
        assert!(!q.take(200, false), "past the bound");
        q.give_back(400, 400);
        assert!(q.take(200, true));
        assert_eq!(q.all.load(Ordering::Relaxed), 700);
        assert_eq!(q.refused.load(Ordering::Relaxed), 200);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        assert_eq!(cut("abc", 8), "abc");
        assert_eq!(cut("ééé", 3), "é");
        assert_eq!(known_method(&http::Method::POST), Some("POST"));
        assert_eq!(known_method(&"PURGE".parse().unwrap()), None);
    }

    #[test]
    fn a_valid_traceparent_is_continued_and_an_invalid_one_ignored() {
        let tracing = Tracing::off();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        headers.insert("tracestate", "vendor=abc".parse().unwrap());
        let parent = tracing.extract(&headers);
        let child = tracing.unbuilt_child(&parent);
        let out = tracing.headers_of(&child);
        assert!(
            out.traceparent
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out:?}"
        );
        assert!(out.traceparent.ends_with("-01"));
        assert!(
            !out.traceparent.contains("00f067aa0ba902b7"),
            "a new span id"
        );
        assert_eq!(out.tracestate.as_deref(), Some("vendor=abc"));

        headers.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let out = tracing.headers_of(&tracing.unbuilt_child(&tracing.extract(&headers)));
        assert!(
            !out.traceparent.contains("0000000000000000000000000000000"),
            "{out:?}"
        );
        assert!(
            out.traceparent.ends_with("-00"),
            "a new trace, not sampled: {out:?}"
        );
    }
}
