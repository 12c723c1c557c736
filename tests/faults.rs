//! Faults injected on cue with librdkafka's mock cluster (the real-broker suite covers the
//! rest): produce errors, retriable and not, and a broker going down and coming back.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tamio_kafka_bridge::config::Settings;

fn mock_settings(cluster: &Mock, topic: &str) -> Settings {
    let mut s = settings(
        topic,
        &[
            ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "4000"),
            ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
        ],
    );
    s.kafka.brokers = cluster.bootstrap_servers();
    s
}

/// A one-broker mock cluster with `topic` (`partitions`, one replica each) and a bridge on
/// it, ready.
async fn mock_bridge(topic: &str, partitions: i32) -> (Mock, Bridge) {
    let cluster = mock_cluster(1, topic, partitions, 1);
    let bridge = Bridge::start_ready(mock_settings(&cluster, topic)).await;
    (cluster, bridge)
}

fn failures(metrics: &str, reason: &str) -> f64 {
    sample(
        metrics,
        &format!("tamio_bridge_kafka_delivery_failures_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_errors_are_retried_or_reported_under_their_reason() {
    let topic = "tamio.tickets.faults";
    let (cluster, bridge) = mock_bridge(topic, 3).await;

    // Retriable errors: librdkafka retries within the deadline and the event is delivered.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    let reply = bridge.send(&ticket_event("whev_retried", "t-1", 0)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let metrics = bridge.metrics().await;
    assert_eq!(
        tamio_kafka_bridge::publish::DeliveryFailure::ALL
            .iter()
            .map(|r| failures(&metrics, r.as_str()))
            .sum::<f64>(),
        0.0
    );

    // A record Kafka calls too large will never be taken: 413, not "retry later".
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let reply = bridge.send(&ticket_event("whev_too_large", "t-2", 0)).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "payload_too_large");
    let metrics = bridge.metrics().await;
    assert_eq!(failures(&metrics, "message_too_large"), 1.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_requests_total{outcome="too_large"}"#
        ),
        1.0
    );

    // The same event sent again goes through: nothing stuck behind the failure.
    let reply = bridge.send(&ticket_event("whev_too_large", "t-2", 0)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_is_a_timeout_then_recovery() {
    let topic = "tamio.tickets.down";
    let (cluster, bridge) = mock_bridge(topic, 1).await;
    assert_eq!(
        bridge
            .send(&ticket_event("whev_before", "t-1", 0))
            .await
            .status,
        StatusCode::OK
    );

    cluster.broker_down(1).unwrap();
    let reply = bridge.send(&ticket_event("whev_during", "t-1", 1)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    // A timeout, or "unreachable" when the readiness probe noticed first.
    let metrics = bridge.metrics().await;
    assert_eq!(
        failures(&metrics, "timeout") + failures(&metrics, "broker_unavailable"),
        1.0
    );
    wait_for_readyz(
        bridge.admin,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(10),
    )
    .await;

    cluster.broker_up(1).unwrap();
    wait_for_readyz(bridge.admin, StatusCode::OK, Duration::from_secs(10)).await;
    let reply = bridge.send(&ticket_event("whev_during", "t-1", 1)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.stop().await;
}

/// The error that makes librdkafka declare an idempotent producer dead: a sequence number
/// out of order on the request at the head of the line (it can no longer reason about what
/// the broker holds). The errors of a producer id the broker no longer takes (fenced, an
/// invalid epoch, an unknown id) it recovers from by itself: see
/// `producer_id_errors_under_load_are_recovered_without_a_new_producer`.
const KILLS_THE_PRODUCER: RDKafkaRespErr =
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_producer_is_replaced_and_delivery_resumes() {
    let topic = "tamio.tickets.fenced";
    let (cluster, bridge) = mock_bridge(topic, 1).await;
    assert_eq!(
        bridge.send(&ticket_event("whev_a", "t-1", 0)).await.status,
        StatusCode::OK
    );

    // librdkafka declares the producer dead: nothing it sends can succeed.
    cluster.request_errors(RDKafkaApiKey::Produce, &[KILLS_THE_PRODUCER]);
    let reply = bridge.send(&ticket_event("whev_b", "t-1", 1)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );

    // The sender's retry goes out through a fresh producer.
    let reply = bridge.send(&ticket_event("whev_b", "t-1", 1)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let metrics = bridge.metrics().await;
    assert_eq!(
        sample(&metrics, "tamio_bridge_kafka_producer_restarts_total"),
        1.0
    );
    let records = read_topic_from(
        &cluster.bootstrap_servers(),
        topic,
        2,
        Duration::from_millis(500),
        Duration::from_secs(20),
    )
    .await;
    let ids = event_ids(&records);
    assert_eq!(ids, ["whev_a", "whev_b"]);
    bridge.stop().await;
}

/// A replacement that dies in turn is not rebuilt in a loop: at most one replacement every
/// 500 ms after the first, while deliveries keep being answered (503, retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_dead_one_after_another_are_replaced_at_most_twice_a_second() {
    let topic = "tamio.tickets.refenced";
    let (cluster, bridge) = mock_bridge(topic, 1).await;
    assert_eq!(
        bridge
            .send(&ticket_event("whev_first", "t-1", 0))
            .await
            .status,
        StatusCode::OK
    );

    // The next six producers each die at their first record.
    cluster.request_errors(RDKafkaApiKey::Produce, &[KILLS_THE_PRODUCER; 6]);
    let retry = ticket_event("whev_again", "t-1", 1);
    let started = std::time::Instant::now();
    let mut answers = std::collections::BTreeMap::<u16, u32>::new();
    while started.elapsed() < Duration::from_millis(1200) {
        *answers
            .entry(bridge.send(&retry).await.status.as_u16())
            .or_default() += 1;
    }
    let restarts = sample(
        &bridge.metrics().await,
        "tamio_bridge_kafka_producer_restarts_total",
    );
    // Unpaced, all six replacements are built within a few milliseconds.
    assert!(
        (1.0..=4.0).contains(&restarts),
        "{restarts} replacements in 1.2 s; answers {answers:?}"
    );
    assert_eq!(answers.keys().collect::<Vec<_>>(), [&503], "{answers:?}");

    // Once the broker takes this producer's records, the retry is delivered.
    let mut reply = bridge.send(&retry).await;
    while reply.status != StatusCode::OK && started.elapsed() < Duration::from_secs(15) {
        reply = bridge.send(&retry).await;
    }
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let restarts = sample(
        &bridge.metrics().await,
        "tamio_bridge_kafka_producer_restarts_total",
    );
    assert_eq!(restarts, 6.0);
    let records = read_topic_from(
        &cluster.bootstrap_servers(),
        topic,
        2,
        Duration::from_millis(500),
        Duration::from_secs(20),
    )
    .await;
    let ids = event_ids(&records);
    assert_eq!(ids, ["whev_first", "whev_again"]);
    bridge.stop().await;
}

/// Drives 32 senders against a bridge process on a mock cluster and injects `errors` into
/// the produce requests once 300 events are acknowledged; returns the run and the bridge.
async fn under_load(topic: &str, errors: &[RDKafkaRespErr]) -> (Mock, Process, LoadReport) {
    let cluster = mock_cluster(1, topic, 3, 1);
    let brokers = cluster.bootstrap_servers();
    let bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "4000"),
        ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
    ]);
    bridge.wait_ready().await;
    let load = Load {
        url: bridge.url(),
        tickets: 32,
        per_ticket: 30,
        max_attempts: 50,
        retry_pause: Duration::from_millis(20),
        until: None,
    };
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = tokio::spawn({
        let acked = acked.clone();
        async move { load.run(acked).await }
    });
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.request_errors(RDKafkaApiKey::Produce, errors);
    let report = run.await.unwrap();
    (cluster, bridge, report)
}

/// Each producer-id error a broker may answer with under load, one after another: the
/// idempotent producer drains its requests, bumps its epoch and goes on. No new producer is
/// built, so nothing Kafka may have written is purged and retried: every event is written
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_id_errors_under_load_are_recovered_without_a_new_producer() {
    let topic = "tamio.tickets.pid-errors";
    let (cluster, bridge, report) = under_load(
        topic,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
        ],
    )
    .await;
    assert_eq!(report.abandoned, 0, "{:?}", report.answers);
    let metrics = get(bridge.admin, "/metrics").await.text();
    let restarts = sample(&metrics, "tamio_bridge_kafka_producer_restarts_total");
    let findings = check_losses(&cluster.bootstrap_servers(), topic, &report).await;
    println!(
        "producer-id errors after 300 acknowledged: answers {:?}, {restarts} new producers, {} \
         records written twice",
        report.answers, findings.duplicates
    );
    findings.assert_nothing_lost(&report);
    assert_eq!(restarts, 0.0, "a new producer was built");
    assert_eq!(findings.duplicates, 0, "an event was written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_dies_under_load_is_replaced_once_and_writes_nothing_twice() {
    let topic = "tamio.tickets.fenced-load";
    let (cluster, bridge, report) = under_load(topic, &[KILLS_THE_PRODUCER]).await;
    let brokers = cluster.bootstrap_servers();
    assert_eq!(report.abandoned, 0, "{:?}", report.answers);

    let metrics = get(bridge.admin, "/metrics").await.text();
    assert_eq!(
        sample(&metrics, "tamio_bridge_kafka_producer_restarts_total"),
        1.0
    );
    let log = bridge.log_text();
    assert_eq!(
        log.matches("building a new one").count(),
        1,
        "concurrent deliveries built more than one producer"
    );
    // How long deliveries waited: the slowest 200 sent around the replacement, against the
    // median of the run.
    let mut ok: Vec<Duration> = report
        .timings
        .iter()
        .filter(|(_, _, status)| *status == 200)
        .map(|(_, took, _)| *took)
        .collect();
    ok.sort();
    let median = ok[ok.len() / 2];
    let slowest = ok.last().copied().unwrap_or_default();
    let failed = report.timings.iter().filter(|t| t.2 != 200).count();
    let built_ms = log
        .lines()
        .find(|l| l.contains("replaced the Kafka producer"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["fields"]["built_ms"].as_u64());
    let findings = check_losses(&brokers, topic, &report).await;
    println!(
        "dead after 300 acknowledged: {failed} requests answered 503 and retried; producer \
         built in {built_ms:?} ms; answers 200: median {median:?}, slowest {slowest:?}; {} \
         records written twice",
        findings.duplicates
    );
    findings.assert_nothing_lost(&report);
    assert_eq!(findings.duplicates, 0, "an event was written twice");
}
