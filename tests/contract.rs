//! The consumers' contract: routes, CloudEvents headers, the published JSON Schema (checked
//! here and enforced by a broker), the example consumer, and the `send` command.

mod common;

use common::*;
use http::StatusCode;
use tamio_kafka_bridge::config::RouteSetting;

fn schema() -> serde_json::Value {
    let text = include_str!("../deploy/schema/tamio-event.schema.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn every_fixture_satisfies_the_published_schema_and_broken_ones_do_not() {
    let validator = jsonschema::draft202012::new(&schema()).expect("the schema compiles");
    for body in FIXTURES {
        let event: serde_json::Value = serde_json::from_str(body).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", event["event_type"]);
    }
    let mut no_ticket_id: serde_json::Value = serde_json::from_str(FIXTURES[0]).unwrap();
    no_ticket_id["data"]["ticket"]
        .as_object_mut()
        .unwrap()
        .remove("id");
    let mut open_resolved: serde_json::Value = serde_json::from_str(FIXTURES[3]).unwrap();
    open_resolved["data"]["ticket"]["is_open"] = true.into();
    let mut updated_without_reply: serde_json::Value = serde_json::from_str(FIXTURES[1]).unwrap();
    updated_without_reply["data"]
        .as_object_mut()
        .unwrap()
        .remove("reply");
    let mut version_1: serde_json::Value = serde_json::from_str(FIXTURES[2]).unwrap();
    version_1["api_version"] = 1.into();
    for broken in [
        no_ticket_id,
        open_resolved,
        updated_without_reply,
        version_1,
    ] {
        assert!(!validator.is_valid(&broken), "{broken}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_cloudevents_binary_mode_headers_and_match_the_schema() {
    let topic = unique_topic("ce");
    create_topic(&topic, 3).await;
    let bridge = Bridge::start_ready(settings(&topic, &[])).await;
    let t = now() - 7;
    for body in FIXTURES {
        assert_eq!(
            bridge.send_signed(body, SECRET, t).await.status,
            StatusCode::OK
        );
    }
    let records = read_topic(&topic, 4).await;
    assert_eq!(records.len(), 4);
    let validator = jsonschema::draft202012::new(&schema()).unwrap();
    for r in &records {
        let h = &r.headers;
        let event = r.json();
        // CloudEvents Kafka protocol binding, binary content mode: every attribute in a
        // `ce_`-prefixed header, the data's media type in `content-type`.
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_id"], event["event_id"].as_str().unwrap());
        assert_eq!(h["ce_type"], event["event_type"].as_str().unwrap());
        assert_eq!(
            h["ce_source"],
            format!(
                "/tamio/endpoints/{}",
                event["endpoint_id"].as_str().unwrap()
            )
        );
        assert_eq!(
            h["ce_subject"],
            event["data"]["ticket"]["id"].as_str().unwrap()
        );
        assert_eq!(h["content-type"], "application/json");
        let time = humantime::parse_rfc3339(&h["ce_time"]).expect("ce_time is RFC 3339");
        assert_eq!(
            time.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
            t,
            "ce_time is when the sender signed the event"
        );
        assert!(
            !h.contains_key("ce_datacontenttype"),
            "binary mode maps it to content-type"
        );
        for (name, value) in h.iter().filter(|(k, _)| k.starts_with("ce_")) {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert!(!value.is_empty(), "{name} is empty");
        }
        assert!(
            validator.is_valid(&event),
            "written record breaks the schema: {event}"
        );
    }
    bridge.stop().await;

    // A setting turns them off.
    let topic = unique_topic("noce");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__KAFKA__CLOUDEVENTS", "false")],
    ))
    .await;
    assert_eq!(bridge.send(FIXTURES[0]).await.status, StatusCode::OK);
    let records = read_topic(&topic, 1).await;
    assert!(
        records[0].headers.keys().all(|k| !k.starts_with("ce_")),
        "{:?}",
        records[0].headers
    );
    assert!(records[0].headers.contains_key("event_id"));
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_all_route_publishes_other_event_types_to_their_own_topic() {
    let tickets = unique_topic("tickets");
    let events = unique_topic("events");
    create_topic(&tickets, 3).await;
    create_topic(&events, 3).await;
    let mut s = settings(&tickets, &[]);
    s.routes.push(RouteSetting {
        event_type: "*".into(),
        topic: Some(events.clone()),
        key: "/event_id".into(),
        key_required: true,
    });
    let bridge = Bridge::start_ready(s).await;
    let invoice = serde_json::json!({
        "event_id": "whev_invoice_1", "event_type": "invoice_paid", "api_version": 2,
        "object": "event", "endpoint_id": "ep", "data": {"invoice": {"id": "inv-1"}}
    })
    .to_string();
    let reply = bridge.send(&invoice).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["topic"], events.as_str());
    assert_eq!(
        bridge.send(FIXTURES[0]).await.json()["topic"],
        tickets.as_str()
    );

    let other = read_topic(&events, 1).await;
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].key.as_deref(), Some("whev_invoice_1"));
    assert_eq!(other[0].value, invoice.as_bytes());
    assert!(
        !other[0].headers.contains_key("ce_subject"),
        "no ticket, no subject"
    );
    assert_eq!(read_topic(&tickets, 1).await.len(), 1);
    let metrics = bridge.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_events_delivered_total{event_type="other"}"#
        ),
        1.0
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_consumer_keeps_each_tickets_latest_state_once() {
    let topic = unique_topic("example");
    create_topic(&topic, 3).await;
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[("TAMIO_BRIDGE__DEDUP__WINDOW_SECS", "0")],
    ))
    .await;
    // The updated event arrives before the created one, and twice.
    for body in [
        FIXTURES[1],
        FIXTURES[0],
        FIXTURES[2],
        FIXTURES[3],
        FIXTURES[1],
    ] {
        assert_eq!(bridge.send(body).await.status, StatusCode::OK);
    }
    bridge.stop().await;

    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/consumer");
    assert!(
        example.exists(),
        "{} is missing: .ci/test builds it (`cargo build --examples`)",
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
        .args([
            "--group",
            &unique_topic("example-group"),
            "--exit-when-idle-ms",
            "3000",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let summary = &summary["summary"];
    assert_eq!(summary["events"], 4, "{stdout}");
    assert_eq!(summary["duplicates_dropped"], 1, "{stdout}");
    let tickets = summary["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 3);
    let shared = tickets
        .iter()
        .find(|t| t["ticket"] == "fbaddbf8-e290-4fa4-a3ed-fbb4837dabe1")
        .unwrap();
    assert_eq!(
        shared["updated_at"], 1671474890,
        "the later state wins whatever the order"
    );
    assert_eq!(shared["event_type"], "whitelabel_ticket_updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_signs_a_file_and_posts_it() {
    let topic = unique_topic("send");
    create_topic(&topic, 1).await;
    let bridge = Bridge::start_ready(settings(&topic, &[])).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("event.json");
    std::fs::write(&file, FIXTURES[2]).unwrap();
    let run = |secret: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tamio-kafka-bridge"))
            .args(["send", "--url", &bridge.url(), "--secret", secret])
            .arg(&file)
            .output()
            .unwrap()
    };
    let ok = run(SECRET);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.starts_with("200 OK"), "{stdout}");
    assert!(stdout.contains("whev_d8egm7pgoure9gz7g"), "{stdout}");
    let refused = run("wrong-secret");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).starts_with("401"));
    assert_eq!(read_topic(&topic, 1).await.len(), 1);
    bridge.stop().await;
}
