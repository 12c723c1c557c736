//! Trace context from the webhook into Kafka, and the spans exported over OTLP/HTTP, checked
//! by a receiver that decodes the protocol's protobuf messages: a given `traceparent`
//! continued into the record and the spans, an invalid one replaced, an unsampled trace
//! propagated and not exported, a collector that is down costing no delivery, the span
//! attributes, and no secret, signature or body in what is exported.

mod common;

use std::time::Duration;

use common::otlp::*;
use common::*;
use http::StatusCode;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
/// A field of the bodies sent, which must appear in no span.
const BODY_MARKER: &str = "body-marker-never-exported";

fn bridge(topic: &str, extra: &[(&str, &str)]) -> Process {
    let brokers = brokers();
    let mut env = bridge_env(&brokers, topic);
    env.extend_from_slice(extra);
    Process::spawn(&env)
}

fn event(id: &str) -> String {
    serde_json::json!({
        "event_id": id,
        "event_type": "whitelabel_ticket_updated",
        "api_version": 2,
        "object": "event",
        "endpoint_id": "ep-trace",
        "data": {"ticket": {"id": "ticket-trace", "note": BODY_MARKER}}
    })
    .to_string()
}

/// Delivers `body` with its signature (or a wrong one) and `trace` headers.
async fn deliver(p: &Process, body: &str, sign: bool, trace: &[(&str, &str)]) -> (Reply, String) {
    let sig = tamio_kafka_bridge::ingest::verify::header_value(
        if sign {
            SECRET.as_bytes()
        } else {
            b"not-the-secret"
        },
        now(),
        body.as_bytes(),
    );
    let mut headers = vec![
        ("content-type", "application/json"),
        ("tamio-signature", sig.as_str()),
    ];
    headers.extend_from_slice(trace);
    let reply = post(&p.url(), &headers, body.as_bytes().to_vec()).await;
    (reply, sig)
}

fn traceparent_parts(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    assert_eq!(parts[1].len(), 32, "{value}");
    assert_eq!(parts[2].len(), 16, "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_trace_is_continued_into_the_record_and_the_spans() {
    let receiver = OtlpReceiver::start().await;
    let topic = unique_topic("trace");
    create_topic(&topic, 3).await;
    let url = receiver.url();
    let bridge = bridge(&topic, &[("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str())]);
    bridge.wait_ready().await;

    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let (reply, sig) = deliver(
        &bridge,
        &event("whev_traced"),
        true,
        &[
            ("traceparent", &traceparent),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let answer = reply.json();

    // The record: the producer span's context, in the request's trace.
    let records = read_topic(&topic, 1).await;
    let record = &records[0];
    let (trace, producer, flags) = traceparent_parts(&record.headers["traceparent"]);
    assert_eq!(trace, TRACE);
    assert_ne!(producer, PARENT, "the record names its producer span");
    assert_eq!(flags, "01");
    assert_eq!(record.headers["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(
        record.headers["ce_traceparent"],
        record.headers["traceparent"]
    );
    assert_eq!(record.headers["ce_tracestate"], "congo=t61rcWkgMzE");

    // A refusal in another trace, for its kind.
    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    let (refused, _) = deliver(
        &bridge,
        &event("whev_refused"),
        false,
        &[(
            "traceparent",
            &format!("00-{refused_trace}-b7ad6b7169203331-01"),
        )],
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans
                .iter()
                .filter(|(_, s)| hex_id(&s.trace_id) == TRACE)
                .count()
                >= 2
                && spans
                    .iter()
                    .any(|(_, s)| hex_id(&s.trace_id) == refused_trace)
        })
        .await;
    let ours: Vec<_> = spans
        .iter()
        .filter(|(_, s)| hex_id(&s.trace_id) == TRACE)
        .collect();
    let (service, server) = ours
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("a server span");
    assert_eq!(service, "tamio-kafka-bridge");
    assert_eq!(server.name, "POST /webhooks/tamio");
    assert_eq!(hex_id(&server.parent_span_id), PARENT);
    assert_eq!(
        attribute(server, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        attribute(server, "http.route").as_deref(),
        Some("/webhooks/tamio")
    );
    assert_eq!(
        attribute(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(attribute(server, "http.request.body.size").is_some());
    let events: Vec<&str> = server.events.iter().map(|e| e.name.as_str()).collect();
    for expected in ["signature verified", "envelope parsed", "duplicate claim"] {
        assert!(events.contains(&expected), "{events:?}");
    }
    let claim = server
        .events
        .iter()
        .find(|e| e.name == "duplicate claim")
        .unwrap();
    assert!(claim
        .attributes
        .iter()
        .any(|a| a.key == "tamio.dedup.result"));

    let (_, publish) = ours
        .iter()
        .find(|(_, s)| s.kind == 4)
        .expect("a producer span");
    assert_eq!(publish.name, format!("publish {topic}"));
    assert_eq!(
        hex_id(&publish.span_id),
        producer,
        "the record names the producer span"
    );
    assert_eq!(publish.parent_span_id, server.span_id);
    assert_eq!(
        attribute(publish, "messaging.system").as_deref(),
        Some("kafka")
    );
    assert_eq!(
        attribute(publish, "messaging.destination.name").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(
        attribute(publish, "messaging.kafka.message.key").as_deref(),
        Some("ticket-trace")
    );
    assert_eq!(
        attribute(publish, "messaging.destination.partition.id"),
        Some(answer["partition"].to_string())
    );
    assert_eq!(
        attribute(publish, "messaging.kafka.offset"),
        Some(answer["offset"].to_string())
    );

    let (_, refusal) = spans
        .iter()
        .find(|(_, s)| hex_id(&s.trace_id) == refused_trace)
        .unwrap();
    assert_eq!(
        attribute(refusal, "error.type").as_deref(),
        Some("invalid_signature")
    );
    assert_eq!(
        refusal.status.as_ref().map(|s| s.code),
        Some(2),
        "status error"
    );

    // Nothing of the body, the signature or the secret is exported.
    let raw = String::from_utf8_lossy(&receiver.raw()).into_owned();
    for secret in [SECRET, sig.as_str(), BODY_MARKER, "tamio-signature"] {
        assert!(
            !raw.contains(secret),
            "{secret} appears in the exported spans"
        );
    }
    let sig_mac = sig.split("s=").nth(1).unwrap();
    assert!(!raw.contains(sig_mac));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_traceparent_is_replaced_and_an_unsampled_trace_is_propagated_not_exported() {
    let receiver = OtlpReceiver::start().await;
    let topic = unique_topic("trace-bad");
    create_topic(&topic, 1).await;
    let url = receiver.url();
    let bridge = bridge(&topic, &[("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str())]);
    bridge.wait_ready().await;

    let garbage = "00-zzzz-not-a-trace";
    let (reply, _) = deliver(
        &bridge,
        &event("whev_garbage"),
        true,
        &[("traceparent", garbage)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let unsampled_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let unsampled = format!("00-{unsampled_trace}-{PARENT}-00");
    let (reply, _) = deliver(
        &bridge,
        &event("whev_unsampled"),
        true,
        &[("traceparent", &unsampled)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Last, a sampled one: once its spans are in, the earlier ones would be too.
    let marker_trace = "11111111111111111111111111111111";
    let (reply, _) = deliver(
        &bridge,
        &event("whev_marker"),
        true,
        &[("traceparent", &format!("00-{marker_trace}-{PARENT}-01"))],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let records = read_topic(&topic, 3).await;
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r.headers["event_id"] == id)
            .unwrap_or_else(|| panic!("{id} not in Kafka"))
    };
    let (trace, _, _) = traceparent_parts(&by_id("whev_garbage").headers["traceparent"]);
    assert!(
        !garbage.contains(&trace) && trace != "0".repeat(32),
        "a new trace: {trace}"
    );
    let (trace, _, flags) = traceparent_parts(&by_id("whev_unsampled").headers["traceparent"]);
    assert_eq!(trace, unsampled_trace);
    assert_eq!(flags, "00", "propagated unsampled");

    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans
                .iter()
                .filter(|(_, s)| hex_id(&s.trace_id) == marker_trace)
                .count()
                >= 2
        })
        .await;
    assert!(
        spans
            .iter()
            .all(|(_, s)| hex_id(&s.trace_id) != unsampled_trace),
        "an unsampled trace was exported"
    );
    // The replaced one started a trace of its own: a root server span.
    assert!(spans.iter().any(|(_, s)| s.kind == 2
        && s.parent_span_id.is_empty()
        && hex_id(&s.trace_id) == trace_of(&by_id("whev_garbage").headers["traceparent"])));
}

fn trace_of(traceparent: &str) -> String {
    traceparent_parts(traceparent).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_no_delivery_and_its_spans_are_counted_dropped() {
    let topic = unique_topic("trace-down");
    create_topic(&topic, 1).await;
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let bridge = bridge(&topic, &[("OTEL_EXPORTER_OTLP_ENDPOINT", nowhere.as_str())]);
    bridge.wait_ready().await;
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = format!("whev_down_{i}");
        let (reply, _) = deliver(&bridge, &event(&id), true, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        ids.push(id);
    }
    assert_all_in_kafka(&topic, &ids).await;
    let started = std::time::Instant::now();
    let mut dropped = 0.0;
    while started.elapsed() < Duration::from_secs(10) {
        dropped = sample(
            &get(bridge.admin, "/metrics").await.text(),
            "tamio_bridge_trace_spans_dropped_total",
        );
        if dropped >= 100.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("collector down: 50 deliveries answered 200, {dropped} spans counted dropped");
    assert!(dropped >= 100.0, "two spans a delivery: {dropped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_records_still_carry_the_trace() {
    let topic = unique_topic("trace-off");
    create_topic(&topic, 1).await;
    let bridge = bridge(&topic, &[]);
    bridge.wait_ready().await;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let (reply, _) = deliver(
        &bridge,
        &event("whev_off"),
        true,
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let (reply, _) = deliver(&bridge, &event("whev_off_new"), true, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let records = read_topic(&topic, 2).await;
    let continued = records
        .iter()
        .find(|r| r.headers["event_id"] == "whev_off")
        .unwrap();
    let (trace, span, flags) = traceparent_parts(&continued.headers["traceparent"]);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(span, PARENT);
    let fresh = records
        .iter()
        .find(|r| r.headers["event_id"] == "whev_off_new")
        .unwrap();
    let (trace, _, flags) = traceparent_parts(&fresh.headers["traceparent"]);
    assert_ne!(trace, TRACE);
    assert_eq!(flags, "00");
    assert_eq!(
        sample(
            &get(bridge.admin, "/metrics").await.text(),
            "tamio_bridge_trace_spans_dropped_total"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_consumer_continues_the_trace_request_publish_process() {
    let receiver = OtlpReceiver::start().await;
    let topic = unique_topic("trace-consumer");
    create_topic(&topic, 1).await;
    let url = receiver.url();
    let bridge = bridge(&topic, &[("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str())]);
    bridge.wait_ready().await;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let mut body: serde_json::Value = serde_json::from_str(&event("whev_consumed")).unwrap();
    body["data"]["ticket"]["updated_at"] = serde_json::json!(1_700_000_000);
    let (reply, _) = deliver(
        &bridge,
        &body.to_string(),
        true,
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/consumer");
    assert!(
        example.exists(),
        "{} is missing: .ci/test builds it",
        example.display()
    );
    let out = tokio::process::Command::new(&example)
        .args([
            "--brokers",
            &brokers(),
            "--topic",
            &topic,
            "--from-beginning",
        ])
        .args(["--group", &unique_topic("g"), "--exit-when-idle-ms", "2000"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("\"trace_id\":\"{TRACE}\"")),
        "{stdout}"
    );

    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans.iter().any(|(_, s)| s.kind == 5) && spans.iter().any(|(_, s)| s.kind == 4)
        })
        .await;
    let (_, publish) = spans
        .iter()
        .find(|(_, s)| s.kind == 4)
        .expect("the producer span");
    let (service, process) = spans
        .iter()
        .find(|(_, s)| s.kind == 5)
        .expect("a consumer span");
    assert_eq!(service, "tamio-tickets-consumer");
    assert_eq!(process.name, format!("process {topic}"));
    assert_eq!(
        hex_id(&process.trace_id),
        TRACE,
        "one trace: request, publish, process"
    );
    assert_eq!(process.parent_span_id, publish.span_id);
}
