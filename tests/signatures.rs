//! Every signature scheme with its tampered twin, and unsigned deliveries only when
//! allowed.

mod common;

use common::signing::*;
use common::*;
use http::StatusCode;
use tamio_kafka_bridge::config::MacEncoding;
use tamio_kafka_bridge::ingest::verify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scheme_accepts_its_signature_and_refuses_its_tampered_twin() {
    let topic = unique_topic("schemes");
    create_topic(&topic, 3).await;
    let config = format!(
        r#"
[signature.endpoints."ep-standard"]
scheme = "standard-webhooks"
secrets = ["{SW_SECRET}"]

[signature.endpoints."ep-plain"]
scheme = "hmac-sha256"
header = "X-Signature"
encoding = "base64"
secrets = ["{PLAIN_SECRET}"]
"#
    );
    let bridge = Bridge::start_ready(settings_with_file(&topic, &config, &[])).await;
    let post_with = |headers: Vec<(String, String)>, body: String| {
        let url = bridge.url();
        async move {
            let mut all = vec![("content-type".to_owned(), "application/json".to_owned())];
            all.extend(headers);
            let refs: Vec<(&str, &str)> =
                all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            post(&url, &refs, body.into_bytes()).await
        }
    };

    // The sender's own scheme, with the secret for every endpoint.
    let tamio = event_from("ep-tamio", "whev_scheme_tamio", 0);
    let sig = tamio_header(SECRET, &tamio);
    let h = || vec![("tamio-signature".to_owned(), sig.clone())];
    assert_eq!(post_with(h(), tamio.clone()).await.status, StatusCode::OK);
    let refused = post_with(h(), tampered(&tamio)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.json()["error"], "invalid_signature");

    // Standard Webhooks for one endpoint.
    let standard = event_from("ep-standard", "whev_scheme_standard", 1);
    let ts = now();
    let sw_sig = verify::standard_webhooks_signature(
        SW_SECRET.as_bytes(),
        "msg_2kq",
        ts,
        standard.as_bytes(),
    )
    .unwrap();
    let h = || {
        vec![
            ("webhook-id".to_owned(), "msg_2kq".to_owned()),
            ("webhook-timestamp".to_owned(), ts.to_string()),
            ("webhook-signature".to_owned(), sw_sig.clone()),
        ]
    };
    let ok = post_with(h(), standard.clone()).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let refused = post_with(h(), tampered(&standard)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // The endpoint's secret signing in another scheme is not accepted either.
    let cross = tamio_header(SW_SECRET, &standard);
    let refused = post_with(vec![("tamio-signature".into(), cross)], standard.clone()).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    // A bare HMAC of the body, base64, in a header of the endpoint's choosing.
    let plain = event_from("ep-plain", "whev_scheme_plain", 2);
    let mac = verify::plain_mac(
        PLAIN_SECRET.as_bytes(),
        plain.as_bytes(),
        MacEncoding::Base64,
    );
    let h = || vec![("x-signature".to_owned(), mac.clone())];
    let ok = post_with(h(), plain.clone()).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let refused = post_with(h(), tampered(&plain)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.json()["error"], "invalid_signature");

    let metrics = bridge.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"tamio_bridge_signature_failures_total{reason="mismatch"}"#
        ),
        4.0
    );

    // Each record carries the signature headers of its scheme, for consumers to verify again.
    let records = read_topic(&topic, 3).await;
    assert_eq!(records.len(), 3, "only the three genuine deliveries");
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r.headers["event_id"] == id)
            .unwrap_or_else(|| panic!("{id} not in Kafka"))
    };
    assert_eq!(by_id("whev_scheme_tamio").headers["signature"], sig);
    let r = by_id("whev_scheme_standard");
    assert_eq!(r.value, standard.as_bytes());
    assert_eq!(r.headers["webhook-id"], "msg_2kq");
    assert_eq!(r.headers["webhook-timestamp"], ts.to_string());
    assert_eq!(r.headers["webhook-signature"], sw_sig);
    assert!(!r.headers.contains_key("signature"));
    let r = by_id("whev_scheme_plain");
    assert_eq!(r.headers["signature"], mac);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_deliveries_only_with_allow_unsigned_and_no_secret() {
    let topic = unique_topic("unsigned");
    create_topic(&topic, 3).await;
    let unsigned = settings(
        &topic,
        &[
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", ""),
            ("TAMIO_BRIDGE__SIGNATURE__ALLOW_UNSIGNED", "true"),
        ],
    );
    let bridge = Bridge::start_ready(unsigned).await;
    let body = ticket_event("whev_unsigned", "ticket-unsigned", 0);
    let reply = post(
        &bridge.url(),
        &[("content-type", "application/json")],
        body.clone().into_bytes(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        sample(&bridge.metrics().await, "tamio_bridge_unsigned_allowed"),
        1.0
    );
    bridge.stop().await;
    let records = read_topic(&topic, 1).await;
    assert_eq!(records.len(), 1);
    assert!(!records[0].headers.contains_key("signature"));

    // With a secret configured, the flag changes nothing: unsigned is refused.
    let signed = settings(
        &topic,
        &[("TAMIO_BRIDGE__SIGNATURE__ALLOW_UNSIGNED", "true")],
    );
    let bridge = Bridge::start_ready(signed).await;
    let reply = post(
        &bridge.url(),
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        sample(&bridge.metrics().await, "tamio_bridge_unsigned_allowed"),
        0.0
    );
    bridge.stop().await;

    // Neither a secret nor the flag: run() refuses, naming the setting.
    let neither = settings(&topic, &[("TAMIO_BRIDGE__SIGNATURE__SECRETS", "")]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tamio_kafka_bridge::run(neither, listener, admin, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature.secrets"), "{err}");
    assert!(err.contains("allow_unsigned"), "{err}");
}
