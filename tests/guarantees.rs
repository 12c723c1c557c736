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
    let topic = unique_topic("bound");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__SERVER__MAX_IN_FLIGHT", "2")],
    ))
    .await;
    // Two requests held open mid-body occupy the bound.
    let mut held = Vec::new();
    for i in 0..2 {
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
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bridge.send(FIXTURES[0]).await.status, StatusCode::OK);
    bridge.stop().await;
}
