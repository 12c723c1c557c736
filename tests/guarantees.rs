//! Duplicates suppressed, dead letters kept (never from strangers), work bounded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_delivery_is_answered_as_duplicate_and_writes_nothing() {
    let topic = unique_topic("dedup");
    create_topic(&topic, 3).await;
    let bridge = Bridge::start_ready(settings(&topic, &[])).await;
    let body = FIXTURES[1];

    let first = bridge.send(body).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["duplicate"], false);
    // The sender retries later with a fresh signature.
    let again = bridge.send_signed(body, SECRET, now() - 30).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    let again = again.json();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["partition"], first.json()["partition"]);
    assert_eq!(again["offset"], first.json()["offset"]);

    // Many concurrent deliveries of one new event: one record.
    let bridge = Arc::new(bridge);
    let body = ticket_event("whev_concurrent", "ticket-c", 0);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let bridge = bridge.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move { bridge.send(&body).await }));
    }
    let mut fresh = 0;
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        if reply.json()["duplicate"] == false {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one delivery publishes");

    let records = read_topic(&topic, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let metrics = bridge.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_requests_total{outcome="duplicate"}"#
        ),
        20.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_requests_total{outcome="accepted"}"#
        ),
        2.0
    );
    assert_eq!(sample(&metrics, "tamio_bridge_dedup_entries"), 2.0);
    Arc::try_unwrap(bridge).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_can_be_turned_off() {
    let topic = unique_topic("nodedup");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__DEDUP__WINDOW_SECS", "0")],
    ))
    .await;
    for _ in 0..2 {
        let reply = bridge.send(FIXTURES[0]).await;
        assert_eq!(reply.json()["duplicate"], false);
    }
    assert_eq!(read_topic(&topic, 2).await.len(), 2);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_invalid_envelopes_go_to_the_dead_letter_topic_and_strangers_nowhere() {
    let topic = unique_topic("main");
    let dlt = unique_topic("dlt");
    create_topic(&topic, 1).await;
    create_topic(&dlt, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str())],
    ))
    .await;
    let invalid = r#"{"event_id":"whev_bad","event_type":"whitelabel_ticket_created","api_version":3,"object":"event","endpoint_id":"e","data":{}}"#;

    // A stranger's invalid body: 401, nothing written anywhere.
    let reply = bridge.send_signed(invalid, "not-the-secret", now()).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // The genuine sender's: still 400, and kept.
    let reply = bridge.send(invalid).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"], "invalid_envelope");
    let not_json = "{not json";
    let reply = bridge.send(not_json).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let letters = read_topic(&dlt, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].value, invalid.as_bytes());
    assert_eq!(letters[0].headers["error_kind"], "invalid_envelope");
    assert!(letters[0].headers["error"].contains("api_version"));
    assert!(letters[0].headers["signature"].starts_with("t="));
    assert_eq!(letters[1].value, not_json.as_bytes());
    assert_eq!(letters[1].headers["error_kind"], "invalid_json");
    let metrics = bridge.metrics().await;
    assert_eq!(sample(&metrics, "tamio_bridge_dead_letters_total"), 2.0);

    // Nothing reached the main topic: a genuine event after them is the only record.
    assert_eq!(bridge.send(FIXTURES[0]).await.status, StatusCode::OK);
    assert_eq!(read_topic(&topic, 1).await.len(), 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_in_flight_bound_the_answer_is_503_at_once() {
    // A broker of the test's own, frozen so that requests wait for Kafka's acknowledgement:
    // those are the requests the bound counts.
    let broker = OwnBroker::start().await;
    let topic = unique_topic("bound");
    broker.create_topic(&topic, 1).await;
    let address = broker.address();
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[
            ("TAMIO_BRIDGE__SERVER__MAX_IN_FLIGHT", "2"),
            ("TAMIO_BRIDGE__KAFKA__BROKERS", &address),
            ("TAMIO_BRIDGE__KAFKA__READINESS_TIMEOUT_MS", "5000"),
        ],
    ))
    .await;
    assert_eq!(bridge.send(FIXTURES[1]).await.status, StatusCode::OK);
    broker.freeze();
    // Two requests waiting for Kafka occupy the bound.
    let mut held = Vec::new();
    for i in 0..2 {
        let body = ticket_event(&format!("whev_held_{i}"), "t", i);
        let url = bridge.url();
        let sig = tamio_kafka_bridge::ingest::verify::header_value(
            SECRET.as_bytes(),
            now(),
            body.as_bytes(),
        );
        held.push(tokio::spawn(async move {
            post(
                &url,
                &[
                    ("content-type", "application/json"),
                    ("tamio-signature", &sig),
                ],
                body.into_bytes(),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = bridge.send(FIXTURES[0]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "overloaded");
    assert_eq!(reply.headers["retry-after"], "5");
    assert_eq!(
        sample(&bridge.metrics().await, "tamio_bridge_in_flight_requests"),
        2.0
    );
    broker.thaw();
    for held in held {
        assert_eq!(held.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(bridge.send(FIXTURES[0]).await.status, StatusCode::OK);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_still_arriving_take_no_in_flight_slot() {
    let topic = unique_topic("receiving");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__SERVER__MAX_IN_FLIGHT", "2")],
    ))
    .await;
    // Ten requests held open mid-body: more than the bound, and none of them counts.
    let mut held = Vec::new();
    for i in 0..10 {
        let body = ticket_event(&format!("whev_held_{i}"), "t", i);
        let mut s = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{",
            bridge.path,
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = bridge.send(FIXTURES[0]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        sample(&bridge.metrics().await, "tamio_bridge_in_flight_requests"),
        0.0
    );
    drop(held);
    bridge.stop().await;
}

/// The duplicate claim lasts until Kafka's verdict, not until the request's answer: a record
/// that lands after its request ended — answered 503 at its deadline, or left by its client —
/// is remembered, and the sender's retry is answered as a duplicate instead of written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_lands_after_its_request_ended_is_remembered() {
    use tokio::io::AsyncReadExt;
    let topic = "tamio.tickets.late";
    let cluster = mock_cluster(1, topic, 1, 1);
    let mut s = settings(
        topic,
        &[
            ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "2000"),
            ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "1900"),
        ],
    );
    s.kafka.brokers = cluster.bootstrap_servers();
    let bridge = Bridge::start_ready(s).await;
    // A first delivery sets the producer up before the broker turns slow.
    let warm = bridge
        .send(&ticket_event("whev_late_warm", "t-late", 0))
        .await;
    assert_eq!(warm.status, StatusCode::OK, "{}", warm.text());
    // Every answer of the broker now takes 1.5 s: a record sent 1 s into its request (the
    // body trickles in) lands after the request's 2 s deadline.
    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    for (id, client_leaves) in [("whev_late_deadline", false), ("whev_late_gone", true)] {
        let body = ticket_event(id, "t-late", 1);
        let sig = tamio_kafka_bridge::ingest::verify::header_value(
            SECRET.as_bytes(),
            now(),
            body.as_bytes(),
        );
        let mut conn = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Tamio-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
            bridge.path,
            body.len()
        );
        let (first, rest) = body.split_at(body.len() / 2);
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(first.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        conn.write_all(rest.as_bytes()).await.unwrap();
        if client_leaves {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(conn);
        } else {
            let mut answer = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
                .await
                .unwrap()
                .unwrap();
            let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
            assert!(answer.starts_with("HTTP/1.1 503"), "{id}: {answer}");
        }
        // The record lands meanwhile. The sender retries as it does after a 503 or a lost
        // connection; while the first attempt is still in flight a retry waits for it (or is
        // answered 503 at its own deadline), and once it has landed the retry is a duplicate.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut retry = bridge.send(&body).await;
        for _ in 0..10 {
            if retry.status != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            retry = bridge.send(&body).await;
        }
        assert_eq!(retry.status, StatusCode::OK, "{id}: {}", retry.text());
        assert_eq!(retry.json()["duplicate"], true, "{id}: {}", retry.text());
    }
    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    let records = read_topic_from(
        &cluster.bootstrap_servers(),
        topic,
        3,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    let ids = event_ids(&records);
    assert_eq!(
        ids,
        ["whev_late_warm", "whev_late_deadline", "whev_late_gone"]
    );
    bridge.stop().await;
}
