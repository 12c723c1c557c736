//! Every metric of the bridge, declared once on one registry and passed to the stages that
//! count. Label values come from small fixed sets, never from request data.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The label values each fixed label set takes, given by the stages that own them (their
/// failure kinds' `ALL`). Every series of these sets exists from start-up, at 0.
#[derive(Debug, Default, Clone)]
pub struct Labels {
    /// `outcome` of the request counters.
    pub outcomes: Vec<&'static str>,
    /// `event_type` of the delivered-events counter.
    pub event_types: Vec<&'static str>,
    /// `reason` of the delivery-failure counter.
    pub delivery_failures: Vec<&'static str>,
    /// `reason` of the signature-failure counter.
    pub signature_failures: Vec<&'static str>,
    /// `result` of the reload counter.
    pub reload_results: Vec<&'static str>,
    /// `reason` of the closed-connections counter.
    pub connection_closes: Vec<&'static str>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub kafka_delivery_duration: Histogram,
    pub events_delivered: IntCounterVec,
    pub kafka_delivery_failures: IntCounterVec,
    pub signature_failures: IntCounterVec,
    pub sender_delay: Histogram,
    pub in_flight: IntGauge,
    pub body_memory: IntGauge,
    pub kafka_up: IntGauge,
    pub dead_letters: IntCounter,
    pub producer_restarts: IntCounter,
    pub dedup_entries: IntGauge,
    pub dedup_store_up: IntGauge,
    pub dedup_store_errors: IntCounter,
    pub unsigned_allowed: IntGauge,
    pub tls_certificate_expiry: IntGauge,
    pub reloads: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub http2_streams_refused: IntCounter,
    pub trace_spans_dropped: IntCounter,
    pub producer_queue_messages: IntGauge,
    pub producer_queue_bytes: IntGauge,
    pub broker_rtt: GaugeVec,
    pub broker_up: IntGaugeVec,
    /// Partitions the last readiness probe found unable to take records, by topic and
    /// reason (`no_leader`, `too_few_in_sync_replicas`).
    pub partitions_unwritable: IntGaugeVec,
    pub broker_request_errors: IntCounterVec,
    pub broker_retries: IntCounterVec,
    /// With `kafka.exactly_once`: transactions ended, by `result` (committed, aborted).
    pub transactions: IntCounterVec,
    /// With `kafka.exactly_once`: records a transaction held.
    pub transaction_records: Histogram,
    /// With `kafka.exactly_once`: the time of a commit's steps (`flush`: every record of the
    /// transaction reported; `end`: EndTxn and its markers).
    pub transaction_commit: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const DELAY_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

impl Metrics {
    /// Declares every metric on a new registry. A list, one declaration per metric: the
    /// order is the struct's, the exposition sorts by name.
    pub fn new(labels: &Labels) -> Metrics {
        let d = Declare(Registry::new());
        d.gauges(
            "tamio_bridge_build_info",
            "Always 1; the version as a label.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        #[cfg(target_os = "linux")]
        d.register(prometheus::process_collector::ProcessCollector::for_self());
        Metrics {
            requests: d.counters(
                "tamio_bridge_requests_total",
                "Webhook requests answered, by outcome.",
                "outcome",
                &labels.outcomes,
            ),
            request_duration: d.histograms(
                "tamio_bridge_request_duration_seconds",
                "Time from reading a request to answering it, by outcome.",
                LATENCY_BUCKETS,
                "outcome",
                &labels.outcomes,
            ),
            kafka_delivery_duration: d.histogram(
                "tamio_bridge_kafka_delivery_duration_seconds",
                "Time from handing a record to the producer to its delivery report.",
                LATENCY_BUCKETS,
            ),
            events_delivered: d.counters(
                "tamio_bridge_events_delivered_total",
                "Events Kafka acknowledged, by event type (unknown types count as `other`).",
                "event_type",
                &labels.event_types,
            ),
            kafka_delivery_failures: d.counters(
                "tamio_bridge_kafka_delivery_failures_total",
                "Events Kafka did not acknowledge, by reason.",
                "reason",
                &labels.delivery_failures,
            ),
            signature_failures: d.counters(
                "tamio_bridge_signature_failures_total",
                "Deliveries refused for their signature, by reason.",
                "reason",
                &labels.signature_failures,
            ),
            sender_delay: d.histogram(
                "tamio_bridge_sender_delay_seconds",
                "Receipt time minus the signature's timestamp: how late the sender delivers.",
                DELAY_BUCKETS,
            ),
            in_flight: d.gauge(
                "tamio_bridge_in_flight_requests",
                "Webhook requests being processed.",
            ),
            body_memory: d.gauge(
                "tamio_bridge_body_memory_bytes",
                "Bytes of request bodies held in memory, from their first byte until their record is delivered (server.body_memory_bytes bounds it).",
            ),
            kafka_up: d.gauge(
                "tamio_bridge_kafka_up",
                "1 while a broker answers the producer and the topic exists; the same truth as /readyz.",
            ),
            dead_letters: d.counter(
                "tamio_bridge_dead_letters_total",
                "Signed deliveries with an invalid envelope written to the dead-letter topic.",
            ),
            producer_restarts: d.counter(
                "tamio_bridge_kafka_producer_restarts_total",
                "Times the producer was replaced after librdkafka declared it dead (a fatal error).",
            ),
            dedup_entries: d.gauge(
                "tamio_bridge_dedup_entries",
                "Acknowledged event ids remembered for duplicate suppression.",
            ),
            dedup_store_up: d.gauge(
                "tamio_bridge_dedup_store_up",
                "1 while the store of duplicate claims is in use (always 1 with dedup.store = memory); \
                 0 while the shared store is marked down (every command failed for \
                 dedup.redis_down_after_ms) and claims fall back to this process's memory (or \
                 deliveries are refused).",
            ),
            dedup_store_errors: d.counter(
                "tamio_bridge_dedup_store_errors_total",
                "Commands to the shared duplicate store that failed or did not answer in time (each \
                 is sent again), and writes to it dropped from a full queue.",
            ),
            unsigned_allowed: d.gauge(
                "tamio_bridge_unsigned_allowed",
                "1 while deliveries are accepted without a signature (signature.allow_unsigned with \
                 no secret configured); 0 while every delivery must be signed.",
            ),
            tls_certificate_expiry: d.gauge(
                "tamio_bridge_tls_certificate_expiry_timestamp_seconds",
                "When the ingress's TLS certificate in force expires (its notAfter, unix seconds); \
                 0 without TLS.",
            ),
            reloads: d.counters(
                "tamio_bridge_reloads_total",
                "Reloads of the signature settings, secret files and TLS certificate (SIGHUP or \
                 a changed file), by result: applied; restart_needed (applied, and settings \
                 that take a restart changed too); failed (the previous ones stay).",
                "result",
                &labels.reload_results,
            ),
            connections_closed: d.counters(
                "tamio_bridge_connections_closed_total",
                "Ingress connections the bridge closed, by reason: idle (no request for \
                 server.idle_timeout_ms), reclaimed (the connection bound was reached and a new \
                 connection took the slot of the longest-idle one), slow_start (no first \
                 request within server.header_read_timeout_ms), http2_abuse (an HTTP/2 peer \
                 broke a bound on streams, resets, control frames or header blocks).",
                "reason",
                &labels.connection_closes,
            ),
            http2_streams_refused: d.counter(
                "tamio_bridge_http2_streams_refused_total",
                "HTTP/2 streams reset with REFUSED_STREAM: beyond the first of their connection, at server.http2_max_pending_streams.",
            ),
            trace_spans_dropped: d.counter(
                "tamio_bridge_trace_spans_dropped_total",
                "Spans not exported: the export queue (tracing.max_queue_spans) was full, or their export failed or timed out.",
            ),
            producer_queue_messages: d.gauge(
                "tamio_bridge_kafka_producer_queue_messages",
                "Records waiting in the producer for Kafka's acknowledgement (librdkafka msg_cnt).",
            ),
            producer_queue_bytes: d.gauge(
                "tamio_bridge_kafka_producer_queue_bytes",
                "Bytes of the records waiting in the producer (librdkafka msg_size).",
            ),
            broker_rtt: d.float_gauges(
                "tamio_bridge_kafka_broker_rtt_seconds",
                "Average request round-trip time to each broker over the last statistics window.",
                &["broker"],
            ),
            broker_up: d.gauges(
                "tamio_bridge_kafka_broker_up",
                "1 while the producer's connection to the broker is up.",
                &["broker"],
            ),
            partitions_unwritable: d.gauges(
                "tamio_bridge_kafka_partitions_unwritable",
                "Partitions the last readiness probe found unable to take records: no leader, \
                 or fewer in-sync replicas than the topic's min.insync.replicas (deliveries \
                 to those are answered 503 at once).",
                &["topic", "reason"],
            ),
            broker_request_errors: d.counters(
                "tamio_bridge_kafka_broker_request_errors_total",
                "Requests to each broker that failed: send and receive errors and timeouts.",
                "broker",
                &[],
            ),
            broker_retries: d.counters(
                "tamio_bridge_kafka_broker_retries_total",
                "Requests the producer sent again to each broker.",
                "broker",
                &[],
            ),
            transactions: d.counters(
                "tamio_bridge_kafka_transactions_total",
                "With kafka.exactly_once: Kafka transactions ended, by result (committed, or \
                 aborted: their deliveries were answered 503 and nothing of them is visible \
                 to read_committed consumers).",
                "result",
                &[],
            ),
            transaction_records: d.histogram(
                "tamio_bridge_kafka_transaction_records",
                "With kafka.exactly_once: records one transaction held (group commit).",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            transaction_commit: d.histograms(
                "tamio_bridge_kafka_transaction_commit_seconds",
                "With kafka.exactly_once: time of each step of a commit, by step (flush: until \
                 librdkafka holds no record of the transaction; end: EndTxn and its markers).",
                &[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.08, 0.1, 0.2, 0.5, 1.0, 5.0,
                ],
                "step",
                &[],
            ),
            registry: d.0,
        }
    }

    /// Counts one answered request.
    pub fn answered(&self, outcome: &str, seconds: f64) {
        self.requests.with_label_values(&[outcome]).inc();
        self.request_duration
            .with_label_values(&[outcome])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Declares metrics on a registry, one helper per kind; a family with a fixed label set gets
/// every series at 0 from the start, so that rates and ratios are defined before the first
/// event of each kind.
struct Declare(Registry);

impl Declare {
    fn register<C: prometheus::core::Collector + 'static>(&self, collector: C) {
        self.0
            .register(Box::new(collector))
            .expect("metric names are unique");
    }

    fn declared<C: prometheus::core::Collector + Clone + 'static>(&self, collector: C) -> C {
        self.register(collector.clone());
        collector
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.declared(IntCounter::new(name, help).expect("valid metric"))
    }

    fn counters(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntCounterVec {
        let family = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        for value in values {
            family.with_label_values(&[value]);
        }
        self.declared(family)
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.declared(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.declared(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn float_gauges(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.declared(GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.declared(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn histograms(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        label: &str,
        values: &[&str],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let family = HistogramVec::new(opts, &[label]).expect("valid metric");
        for value in values {
            family.with_label_values(&[value]);
        }
        self.declared(family)
    }
}

impl Default for Metrics {
    /// Metrics with no series pre-registered.
    fn default() -> Self {
        Metrics::new(&Labels::default())
    }
}
