//! Readiness that tells the truth: it follows a broker that freezes, dies and returns, turns
//! 503 before the listener closes on shutdown, and the producer's statistics reach /metrics.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_through_freeze_kill_and_return() {
    let mut broker = OwnBroker::start().await;
    let topic = unique_topic("ready");
    broker.create_topic(&topic, 3).await;
    // The default probe period and deadline: what operators get.
    let mut s = settings(
        &topic,
        &[("TAMIO_BRIDGE__KAFKA__READINESS_INTERVAL_MS", "1000")],
    );
    s.kafka.brokers = broker.address();
    s.kafka
        .librdkafka
        .insert("statistics.interval.ms".into(), "500".into());
    let bridge = Bridge::start_ready(s).await;
    assert_eq!(bridge.send(FIXTURES[0]).await.status, StatusCode::OK);

    // The producer's statistics arrive as metrics.
    let broker_series = format!(
        "tamio_bridge_kafka_broker_up{{broker=\"{}\"}} 1",
        broker.address()
    );
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = bridge.metrics().await;
        if metrics.contains(&broker_series) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metrics.contains(&broker_series), "{metrics}");
    assert!(metrics.contains("tamio_bridge_kafka_broker_rtt_seconds{broker="));
    // At most the one record sent so far can have been queued when the statistics were taken.
    assert!(sample(&metrics, "tamio_bridge_kafka_producer_queue_messages") <= 1.0);
    assert_eq!(sample(&metrics, "tamio_bridge_kafka_up"), 1.0);

    broker.freeze();
    let took = wait_for_readyz(bridge.admin, StatusCode::SERVICE_UNAVAILABLE, LIMIT).await;
    println!("frozen broker: not ready after {took:?}");
    let reply = get(bridge.admin, "/readyz").await;
    assert!(
        reply.json()["reason"].as_str().unwrap().contains("broker"),
        "{}",
        reply.text()
    );
    assert_eq!(
        sample(&bridge.metrics().await, "tamio_bridge_kafka_up"),
        0.0
    );

    broker.thaw();
    let took = wait_for_readyz(bridge.admin, StatusCode::OK, LIMIT).await;
    println!("thawed broker: ready after {took:?}");
    assert_eq!(
        sample(&bridge.metrics().await, "tamio_bridge_kafka_up"),
        1.0
    );

    broker.kill();
    let took = wait_for_readyz(bridge.admin, StatusCode::SERVICE_UNAVAILABLE, LIMIT).await;
    println!("killed broker: not ready after {took:?}");

    broker.restart().await;
    let took = wait_for_readyz(bridge.admin, StatusCode::OK, LIMIT).await;
    println!("restarted broker: ready after {took:?}");
    let reply = bridge.send(FIXTURES[1]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_readiness_503_before_the_listener_closes() {
    let topic = unique_topic("drain");
    create_topic(&topic, 1).await;
    let mut bridge = Bridge::start_ready(settings(&topic, &[])).await;

    // A request in flight keeps the drain open while we look.
    let body = ticket_event("whev_drain", "ticket-drain", 0);
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    let mut slow = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Tamio-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
        bridge.path,
        body.len()
    );
    let (first, rest) = body.split_at(10);
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    bridge.begin_stop();
    wait_for_readyz(
        bridge.admin,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(2),
    )
    .await;
    let reply = get(bridge.admin, "/readyz").await;
    assert!(reply.text().contains("shutting down"), "{}", reply.text());
    // Then the listener closes to new connections.
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(bridge.addr).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "listener still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request in flight still completes.
    slow.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    slow.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    bridge.stop().await;
    assert_eq!(read_topic(&topic, 1).await.len(), 1);
}
