//! TLS on the ingress with a test CA: HTTP/1.1 and h2 by ALPN, the certificate's expiry
//! as a metric, untrusted clients and plain HTTP refused.

mod common;

use common::signing::*;
use common::tls::*;
use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ingress_with_a_test_ca_serves_http1_and_h2() {
    let pki = Pki::new();
    let der = pki.issue("server");
    let topic = unique_topic("tls-ingress");
    create_topic(&topic, 3).await;
    let cert = pki.path("server.crt");
    let key = pki.path("server.key");
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[
            (
                "TAMIO_BRIDGE__SERVER__TLS_CERT_FILE",
                cert.to_str().unwrap(),
            ),
            ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    ))
    .await;

    let mut sent = Vec::new();
    for (i, h2) in [false, true].into_iter().enumerate() {
        let body = ticket_event(&format!("whev_tls_{i}"), "ticket-tls", i);
        let sig = tamio_header(SECRET, &body);
        let reply = tls_post(
            bridge.addr,
            &pki.ca_pem(),
            h2,
            &[("tamio-signature", &sig)],
            body.as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.server_cert, der);
        let expected: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        assert_eq!(reply.alpn.as_deref(), Some(expected));
        sent.push(body);
    }

    // Operators see when the certificate expires: 2031-01-01.
    assert_eq!(
        sample(
            &bridge.metrics().await,
            "tamio_bridge_tls_certificate_expiry_timestamp_seconds"
        ),
        1_924_992_000.0
    );

    // A client that does not trust the test CA does not get through.
    let stranger = Pki::new();
    let body = ticket_event("whev_tls_x", "ticket-tls", 9);
    let err = tls_post(bridge.addr, &stranger.ca_pem(), false, &[], body.as_bytes())
        .await
        .err()
        .expect("an untrusted certificate is refused by the client");
    assert!(err.contains("TLS handshake"), "{err}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = request(
        "POST",
        &bridge.url(),
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    let records = read_topic(&topic, 2).await;
    let values: Vec<&[u8]> = records.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(values.len(), 2);
    for body in &sent {
        assert!(values.contains(&body.as_bytes()));
    }
    bridge.stop().await;
}
