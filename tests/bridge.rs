//! The bridge against the real broker: HTTP in, Kafka out, metrics scraped.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fixture_arrives_keyed_by_ticket_with_exact_body_and_headers() {
    let topic = unique_topic("fixtures");
    create_topic(&topic, 3).await;
    let bridge = Bridge::start_ready(settings(&topic, &[])).await;

    let mut answers = HashMap::new();
    for body in FIXTURES {
        let reply = bridge.send(body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let json = reply.json();
        let event: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["event_id"], event["event_id"]);
        assert_eq!(json["topic"], topic.as_str());
        assert_eq!(json["duplicate"], false);
        answers.insert(event["event_id"].as_str().unwrap().to_owned(), json);
    }

    let records = read_topic(&topic, FIXTURES.len()).await;
    assert_eq!(records.len(), FIXTURES.len());
    for body in FIXTURES {
        let event: serde_json::Value = serde_json::from_str(body).unwrap();
        let event_id = event["event_id"].as_str().unwrap();
        let record = records
            .iter()
            .find(|r| r.headers.get("event_id").map(String::as_str) == Some(event_id))
            .unwrap_or_else(|| panic!("{event_id} not in Kafka"));
        assert_eq!(
            record.key.as_deref(),
            event["data"]["ticket"]["id"].as_str(),
            "key is the ticket id"
        );
        assert_eq!(
            record.value,
            body.as_bytes(),
            "value is the body byte for byte"
        );
        assert_eq!(
            record.headers["event_type"],
            event["event_type"].as_str().unwrap()
        );
        assert_eq!(
            record.headers["endpoint_id"],
            event["endpoint_id"].as_str().unwrap()
        );
        assert_eq!(record.headers["api_version"], "2");
        let received = humantime::parse_rfc3339(&record.headers["received_at"])
            .expect("received_at is RFC 3339");
        let age = std::time::SystemTime::now()
            .duration_since(received)
            .unwrap_or_default();
        assert!(
            age < Duration::from_secs(300),
            "received_at is recent: {age:?}"
        );
        assert!(record.headers["signature"].starts_with("t="));
        let answer = &answers[event_id];
        assert_eq!(answer["partition"], record.partition);
        assert_eq!(answer["offset"], record.offset);
    }
    // The created and updated fixtures are one ticket: one partition, created first.
    let ticket: Vec<&Record> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("fbaddbf8-e290-4fa4-a3ed-fbb4837dabe1"))
        .collect();
    assert_eq!(ticket.len(), 2);
    assert_eq!(ticket[0].partition, ticket[1].partition);
    assert_eq!(ticket[0].headers["event_type"], "whitelabel_ticket_created");
    assert!(ticket[0].offset < ticket[1].offset);

    let metrics = bridge.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_requests_total{outcome="accepted"}"#
        ),
        4.0
    );
    for t in ["created", "updated", "assigned", "resolved"] {
        let series =
            format!(r#"tamio_bridge_events_delivered_total{{event_type="whitelabel_ticket_{t}"}}"#);
        assert_eq!(sample(&metrics, &series), 1.0, "{series}");
    }
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_has_its_status_and_writes_nothing() {
    let topic = unique_topic("rejections");
    create_topic(&topic, 3).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__SERVER__MAX_BODY_BYTES", "4096")],
    ))
    .await;
    let url = bridge.url();
    let body = FIXTURES[0];
    let t = now();
    let good_sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), t, body.as_bytes());
    let json = ("content-type", "application/json");

    struct Case {
        name: &'static str,
        method: &'static str,
        url: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        status: u16,
        error: &'static str,
        mentions: &'static str,
    }
    let signed = |b: &str| {
        (
            "tamio-signature",
            tamio_kafka_bridge::ingest::verify::header_value(
                SECRET.as_bytes(),
                now(),
                b.as_bytes(),
            ),
        )
    };
    let with = |field: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
        v[field] = value;
        v.to_string()
    };
    let bad_version = with("api_version", serde_json::json!(1));
    let no_ticket = {
        let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["data"]["ticket"].as_object_mut().unwrap().remove("id");
        v.to_string()
    };
    let other_type = with("event_type", serde_json::json!("invoice_paid"));
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
    let case =
        |name, headers: Vec<(&'static str, String)>, b: &str, status, error, mentions| Case {
            name,
            method: "POST",
            url: url.clone(),
            headers,
            body: b.as_bytes().to_vec(),
            status,
            error,
            mentions,
        };
    let j = || (json.0, json.1.to_owned());
    let cases = vec![
        case(
            "no signature",
            vec![j()],
            body,
            401,
            "invalid_signature",
            "Tamio-Signature",
        ),
        case(
            "malformed signature",
            vec![j(), ("tamio-signature", "v1=abc".into())],
            body,
            401,
            "invalid_signature",
            "malformed",
        ),
        case(
            "wrong secret",
            vec![
                j(),
                (
                    "tamio-signature",
                    tamio_kafka_bridge::ingest::verify::header_value(
                        b"not-the-secret",
                        t,
                        body.as_bytes(),
                    ),
                ),
            ],
            body,
            401,
            "invalid_signature",
            "does not match",
        ),
        case(
            "stale",
            vec![
                j(),
                (
                    "tamio-signature",
                    tamio_kafka_bridge::ingest::verify::header_value(
                        SECRET.as_bytes(),
                        t - 301,
                        body.as_bytes(),
                    ),
                ),
            ],
            body,
            401,
            "invalid_signature",
            "tolerance",
        ),
        case(
            "future",
            vec![
                j(),
                (
                    "tamio-signature",
                    tamio_kafka_bridge::ingest::verify::header_value(
                        SECRET.as_bytes(),
                        t + 301,
                        body.as_bytes(),
                    ),
                ),
            ],
            body,
            401,
            "invalid_signature",
            "tolerance",
        ),
        case(
            "tampered body",
            vec![j(), ("tamio-signature", good_sig.clone())],
            &body.replace("Help", "Hack"),
            401,
            "invalid_signature",
            "does not match",
        ),
        case(
            "not JSON",
            vec![j(), signed("not json")],
            "not json",
            400,
            "invalid_json",
            "not valid JSON",
        ),
        case(
            "bad api_version",
            vec![j(), signed(&bad_version)],
            &bad_version,
            400,
            "invalid_envelope",
            "api_version",
        ),
        case(
            "no ticket id",
            vec![j(), signed(&no_ticket)],
            &no_ticket,
            400,
            "invalid_envelope",
            "data.ticket.id",
        ),
        case(
            "other event type",
            vec![j(), signed(&other_type)],
            &other_type,
            400,
            "unroutable_event",
            "invoice_paid",
        ),
        case(
            "too large",
            vec![j(), signed(&big)],
            &big,
            413,
            "payload_too_large",
            "4096",
        ),
        case(
            "not JSON media type",
            vec![
                ("content-type", "text/plain".into()),
                ("tamio-signature", good_sig.clone()),
            ],
            body,
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        case(
            "compressed",
            vec![
                j(),
                ("content-encoding", "gzip".into()),
                ("tamio-signature", good_sig.clone()),
            ],
            body,
            415,
            "unsupported_media_type",
            "gzip",
        ),
        Case {
            name: "GET",
            method: "GET",
            url: url.clone(),
            headers: vec![],
            body: vec![],
            status: 405,
            error: "method_not_allowed",
            mentions: "POST",
        },
        Case {
            name: "PUT",
            method: "PUT",
            url: url.clone(),
            headers: vec![j(), ("tamio-signature", good_sig.clone())],
            body: body.as_bytes().to_vec(),
            status: 405,
            error: "method_not_allowed",
            mentions: "PUT",
        },
        Case {
            name: "other path",
            method: "POST",
            url: format!("http://{}/other", bridge.addr),
            headers: vec![j(), ("tamio-signature", good_sig.clone())],
            body: body.as_bytes().to_vec(),
            status: 404,
            error: "not_found",
            mentions: "/webhooks/tamio",
        },
    ];
    for c in &cases {
        let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = request(c.method, &c.url, &headers, c.body.clone())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(
            reply.status.as_u16(),
            c.status,
            "{}: {}",
            c.name,
            reply.text()
        );
        let json = reply.json();
        assert_eq!(json["error"], c.error, "{}: {json}", c.name);
        let message = json["message"].as_str().unwrap();
        assert!(
            message.contains(c.mentions),
            "{}: message `{message}` should mention `{}`",
            c.name,
            c.mentions
        );
        assert!(
            !reply.text().contains(SECRET),
            "{}: the secret leaked",
            c.name
        );
        if c.status == 405 {
            assert_eq!(reply.headers["allow"], "POST");
        }
    }

    // One genuine event after all of them: it must be the only record in the topic.
    let sentinel = ticket_event("whev_sentinel", "ticket-sentinel", 0);
    assert_eq!(bridge.send(&sentinel).await.status, StatusCode::OK);
    let records = read_topic(&topic, 1).await;
    assert_eq!(
        records.len(),
        1,
        "rejected requests wrote to Kafka: {records:?}"
    );
    assert_eq!(records[0].headers["event_id"], "whev_sentinel");

    let metrics = bridge.metrics().await;
    let count = |outcome: &str| {
        sample(
            &metrics,
            &format!("tamio_bridge_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("unauthorized"), 6.0);
    assert_eq!(count("invalid"), 4.0);
    assert_eq!(count("too_large"), 1.0);
    assert_eq!(count("unsupported_media_type"), 2.0);
    assert_eq!(count("method_not_allowed"), 2.0);
    assert_eq!(count("not_found"), 1.0);
    assert_eq!(count("accepted"), 1.0);
    let reason = |r: &str| {
        sample(
            &metrics,
            &format!("tamio_bridge_signature_failures_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("missing"), 1.0);
    assert_eq!(reason("malformed"), 1.0);
    assert_eq!(reason("stale"), 2.0);
    assert_eq!(reason("mismatch"), 2.0);
    // Histograms count every answer under its outcome.
    let observed = |outcome: &str| {
        sample(
            &metrics,
            &format!("tamio_bridge_request_duration_seconds_count{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(observed("unauthorized"), 6.0);
    assert_eq!(observed("invalid"), 4.0);
    assert_eq!(observed("accepted"), 1.0);
    assert_eq!(
        sample(
            &metrics,
            "tamio_bridge_kafka_delivery_duration_seconds_count"
        ),
        1.0
    );
    // Sender delay is observed for every delivery whose signature held: 4 invalid + 1 accepted.
    assert_eq!(
        sample(&metrics, "tamio_bridge_sender_delay_seconds_count"),
        5.0
    );
    assert_eq!(sample(&metrics, "tamio_bridge_in_flight_requests"), 0.0);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_without_content_length_is_refused() {
    // A chunked body declares no length; the limit still holds while reading.
    let topic = unique_topic("chunked");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__SERVER__MAX_BODY_BYTES", "1024")],
    ))
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        bridge.path
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..4 {
        let chunk = "y".repeat(512);
        let _ = stream
            .write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await;
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_accepts_either_secret_and_endpoint_secrets_their_endpoint() {
    let topic = unique_topic("rotation");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__SIGNATURE__SECRETS", "old-secret,new-secret")],
    ))
    .await;
    let t = now();
    for (i, secret) in ["old-secret", "new-secret"].iter().enumerate() {
        let body = ticket_event(&format!("whev_rot_{i}"), "t-rot", i);
        let reply = bridge.send_signed(&body, secret, t).await;
        assert_eq!(reply.status, StatusCode::OK, "{secret}: {}", reply.text());
    }
    let body = ticket_event("whev_rot_x", "t-rot", 9);
    let reply = bridge.send_signed(&body, "retired-secret", t).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let records = read_topic(&topic, 2).await;
    let ids = event_ids(&records);
    assert_eq!(ids, ["whev_rot_0", "whev_rot_1"]);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_ticket_keep_their_order_under_concurrency() {
    const TICKETS: usize = 24;
    const PER_TICKET: usize = 25;
    let topic = unique_topic("order");
    create_topic(&topic, 3).await;
    let bridge = std::sync::Arc::new(Bridge::start_ready(settings(&topic, &[])).await);

    let mut tasks = Vec::new();
    for ticket in 0..TICKETS {
        let bridge = bridge.clone();
        tasks.push(tokio::spawn(async move {
            let ticket_id = format!("ticket-{ticket:03}");
            for seq in 0..PER_TICKET {
                let body = ticket_event(&format!("whev_{ticket}_{seq}"), &ticket_id, seq);
                let reply = bridge.send(&body).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let records = read_topic(&topic, TICKETS * PER_TICKET).await;
    assert_eq!(records.len(), TICKETS * PER_TICKET);
    let mut by_ticket: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in &records {
        by_ticket.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    assert_eq!(by_ticket.len(), TICKETS);
    let mut partitions_used = std::collections::BTreeSet::new();
    for (ticket, mut recs) in by_ticket {
        let partition = recs[0].partition;
        assert!(
            recs.iter().all(|r| r.partition == partition),
            "{ticket} spans partitions"
        );
        partitions_used.insert(partition);
        recs.sort_by_key(|r| r.offset);
        let seqs: Vec<u64> = recs
            .iter()
            .map(|r| r.json()["data"]["ticket"]["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (0..PER_TICKET as u64).collect::<Vec<_>>(),
            "{ticket} out of order"
        );
    }
    assert!(
        partitions_used.len() > 1,
        "tickets should spread over partitions"
    );
    std::sync::Arc::try_unwrap(bridge)
        .ok()
        .unwrap()
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_means_503_with_retry_after_and_not_ready() {
    // A port nothing listens on: reserve one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = settings(
        "tamio.tickets",
        &[
            ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "3000"),
            ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "2000"),
        ],
    );
    s.kafka.brokers = format!("127.0.0.1:{port}");
    let bridge = Bridge::start(s).await;

    let health = get(bridge.admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = get(bridge.admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.json()["reason"].as_str().is_some());

    let started = std::time::Instant::now();
    let reply = bridge.send(FIXTURES[0]).await;
    let took = started.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.headers["retry-after"], "5");
    assert_eq!(reply.json()["error"], "kafka_unavailable");
    // Bounded by the request deadline (a correctness bound, not a performance figure).
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let metrics = bridge.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_requests_total{outcome="unavailable"}"#
        ),
        1.0
    );
    assert_eq!(sample(&metrics, "tamio_bridge_kafka_up"), 0.0);
    let failures: f64 = tamio_kafka_bridge::publish::DeliveryFailure::ALL
        .iter()
        .map(|r| {
            sample(
                &metrics,
                &format!(
                    "tamio_bridge_kafka_delivery_failures_total{{reason=\"{}\"}}",
                    r.as_str()
                ),
            )
        })
        .sum();
    assert_eq!(failures, 1.0);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_is_reported_by_readiness() {
    let topic = unique_topic("never-created");
    let bridge = Bridge::start(settings(&topic, &[])).await;
    let mut reason = String::new();
    for _ in 0..50 {
        let ready = get(bridge.admin, "/readyz").await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        reason = ready.json()["reason"].as_str().unwrap().to_owned();
        if reason.contains(&topic) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reason.contains(&topic), "{reason}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_is_served_too() {
    let topic = unique_topic("h2c");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(&topic, &[])).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let body = ticket_event("whev_h2", "t-h2", 0);
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    let req = http::Request::post(bridge.url())
        .header("content-type", "application/json")
        .header("tamio-signature", sig)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(read_topic(&topic, 1).await.len(), 1);
    bridge.stop().await;
}
