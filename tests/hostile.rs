//! Hostile input gets a precise answer or a closed connection, never a crash or a hang, and
//! the bridge keeps serving others meanwhile.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn hostile_bridge(topic: &str) -> Bridge {
    create_topic(topic, 1).await;
    Bridge::start_ready(settings(
        topic,
        &[
            ("TAMIO_BRIDGE__SERVER__HEADER_READ_TIMEOUT_MS", "1000"),
            ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "2000"),
            ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "1500"),
            ("TAMIO_BRIDGE__SERVER__MAX_BODY_BYTES", "4194304"),
        ],
    ))
    .await
}

/// Reads until the peer closes or `within` passes; returns what arrived and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

async fn signed_raw(bridge: &Bridge, body: &[u8]) -> Reply {
    let sig = tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body);
    post(
        &bridge.url(),
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &sig),
        ],
        body.to_vec(),
    )
    .await
}

async fn still_serves(bridge: &Bridge, id: &str) {
    let reply = bridge.send(&ticket_event(id, "ticket-ok", 0)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_within_the_header_timeout() {
    let bridge = hostile_bridge(&unique_topic("stall")).await;
    let addr: SocketAddr = bridge.addr;
    // Nothing at all; headers that never finish; a stalled HTTP/2 preface.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"POST /webhooks/tamio HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut preface = TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2").await.unwrap();

    still_serves(&bridge, "whev_during_stall").await;
    for (name, stream) in [
        ("silent", &mut silent),
        ("partial headers", &mut partial),
        ("h2 preface", &mut preface),
    ] {
        let (_, closed) = read_until_closed(stream, Duration::from_secs(5)).await;
        assert!(
            closed,
            "{name}: still open after 5 s with a 1 s header timeout"
        );
    }
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_speaks_http1_only() {
    let bridge = hostile_bridge(&unique_topic("admin-h1")).await;
    // An HTTP/2 connection could idle there for ever; HTTP/1 connections are reaped.
    let mut h2 = TcpStream::connect(bridge.admin).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut h2, Duration::from_secs(5)).await;
    assert!(closed, "the admin listener kept an HTTP/2 connection open");
    assert_eq!(get(bridge.admin, "/healthz").await.status, StatusCode::OK);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_within_the_request_deadline() {
    let bridge = hostile_bridge(&unique_topic("slowbody")).await;
    let mut s = TcpStream::connect(bridge.addr).await.unwrap();
    s.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"event",
            bridge.path
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(6)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_declared_length_gets_413_without_reading() {
    let bridge = hostile_bridge(&unique_topic("declared")).await;
    let mut s = TcpStream::connect(bridge.addr).await.unwrap();
    s.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
            bridge.path
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // No body is sent: the answer must come anyway.
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_is_refused_precisely() {
    let topic = unique_topic("json");
    let bridge = hostile_bridge(&topic).await;

    let deep = "[".repeat(1_000_000);
    let reply = signed_raw(&bridge, deep.as_bytes()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"], "invalid_json");

    let deep_inside = format!(
        r#"{{"event_id":"e","event_type":"whitelabel_ticket_created","api_version":2,"object":"event","endpoint_id":"x","data":{}}}"#,
        "[".repeat(500_000)
    );
    let reply = signed_raw(&bridge, deep_inside.as_bytes()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let mut invalid_utf8 = FIXTURES[0].as_bytes().to_vec();
    let at = FIXTURES[0].find("Help with").unwrap();
    invalid_utf8[at] = 0xff;
    let reply = signed_raw(&bridge, &invalid_utf8).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"], "invalid_json");

    let duplicate_keys = FIXTURES[0].replacen("{", r#"{"event_id":"whev_other","#, 1);
    let reply = signed_raw(&bridge, duplicate_keys.as_bytes()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("duplicate field"));

    let huge_version = FIXTURES[0].replace(
        r#""api_version":2"#,
        &format!(r#""api_version":{}"#, "9".repeat(400)),
    );
    let reply = signed_raw(&bridge, huge_version.as_bytes()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.text().contains("api_version"));

    // A number too large for any integer, in a field the bridge does not read, passes
    // through untouched: the body is published byte for byte.
    let huge_extra = FIXTURES[0].replacen("{", &format!(r#"{{"amount":{},"#, "9".repeat(400)), 1);
    let reply = signed_raw(&bridge, huge_extra.as_bytes()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let records = read_topic(&topic, 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, huge_extra.as_bytes());
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_neither_block_others_nor_stay() {
    let bridge = hostile_bridge(&unique_topic("idle")).await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(bridge.addr).await.unwrap());
    }
    still_serves(&bridge, "whev_among_idle").await;
    // The header timeout reaps them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut closed = 0;
    for s in idle.iter_mut().take(50) {
        if read_until_closed(s, Duration::from_millis(300)).await.1 {
            closed += 1;
        }
    }
    assert_eq!(closed, 50, "idle connections outlived the header timeout");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_bound_a_new_sender_takes_the_longest_idle_slot() {
    let topic = unique_topic("connbound");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[
            ("TAMIO_BRIDGE__SERVER__MAX_CONNECTIONS", "10"),
            ("TAMIO_BRIDGE__SERVER__HEADER_READ_TIMEOUT_MS", "3000"),
        ],
    ))
    .await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(bridge.addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The eleventh is served at once: the oldest idle connection gives up its slot, the
    // others keep theirs, so the bound holds.
    let started = Instant::now();
    still_serves(&bridge, "whev_after_bound").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the new sender waited {:?}",
        started.elapsed()
    );
    assert!(
        read_until_closed(&mut idle[0], Duration::from_millis(500))
            .await
            .1
    );
    for s in &mut idle[2..] {
        assert!(
            !read_until_closed(s, Duration::from_millis(50)).await.1,
            "more connections closed than the new ones needed"
        );
    }
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_hyper_cannot_parse_gets_its_bare_400_and_nothing_is_written() {
    // The one exception to JSON error bodies (README, Endpoints): a request head the HTTP
    // layer cannot parse never reaches the bridge, and hyper answers it itself.
    let topic = unique_topic("nul");
    let bridge = hostile_bridge(&topic).await;
    let body = ticket_event("whev_nul", "ticket-nul", 0);
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    let mut s = TcpStream::connect(bridge.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /webhooks/tamio HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             X-Trace: a\0b\r\nTamio-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
    assert!(rest.is_empty(), "{answer:?}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 0"),
        "{head}"
    );
    assert!(closed, "the connection stays open after an unparsable head");
    // The same delivery with a clean head is taken, and is the only record.
    still_serves(&bridge, "whev_nul_clean").await;
    let records = read_topic(&topic, 1).await;
    let ids = event_ids(&records);
    assert_eq!(ids, ["whev_nul_clean"]);
    bridge.stop().await;
}
