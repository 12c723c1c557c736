//! Security through the public interface: TLS on the ingress with a test CA, every signature
//! scheme with its tampered twin, unsigned deliveries only when allowed, secrets and
//! certificates rotated with SIGHUP while requests are in flight, start-up refusals, and
//! TLS (and SASL) to the broker.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use http::StatusCode;
use tamio_kafka_bridge::config::MacEncoding;
use tamio_kafka_bridge::ingest::verify;

fn tamio_header(secret: &str, body: &str) -> String {
    verify::header_value(secret.as_bytes(), now(), body.as_bytes())
}

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
        &format!("http://{}/webhooks/tamio", bridge.addr),
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

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PLAIN_SECRET: &str = "plain-secret-7d1e";

/// A ticket event from `endpoint`.
fn event_from(endpoint: &str, event_id: &str, seq: usize) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&ticket_event(event_id, "ticket-schemes", seq)).unwrap();
    v["endpoint_id"] = endpoint.into();
    v.to_string()
}

/// The same body with one byte changed.
fn tampered(body: &str) -> String {
    body.replacen("\"is_open\":true", "\"is_open\":false", 1)
}

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

#[test]
fn start_up_is_refused_with_a_bad_tls_file_naming_the_setting() {
    let pki = Pki::new();
    pki.issue("server");
    let not_pem = pki.path("not-pem.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let ca = pki.ca_file();
    let server_crt = pki.path("server.crt");
    let brokers = ("TAMIO_BRIDGE__KAFKA__BROKERS", "127.0.0.1:9");
    let secret = ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET);
    let tls_on = ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true");
    // Settings given, the setting the error must name, and what it must say.
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec![
                tls_on,
                ("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", "/nonexistent/ca.pem"),
            ],
            "kafka.tls.ca_file",
            "/nonexistent/ca.pem",
        ),
        (
            vec![
                tls_on,
                (
                    "TAMIO_BRIDGE__KAFKA__TLS__CA_FILE",
                    not_pem.to_str().unwrap(),
                ),
            ],
            "kafka.tls.ca_file",
            "no PEM",
        ),
        (
            vec![
                tls_on,
                ("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", ca.to_str().unwrap()),
                (
                    "TAMIO_BRIDGE__KAFKA__TLS__CERT_FILE",
                    "/nonexistent/client.crt",
                ),
                (
                    "TAMIO_BRIDGE__KAFKA__TLS__KEY_FILE",
                    "/nonexistent/client.key",
                ),
            ],
            "kafka.tls.cert_file",
            "/nonexistent/client.crt",
        ),
        (
            vec![("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", ca.to_str().unwrap())],
            "kafka.tls.enabled",
            "TLS is off",
        ),
        (
            vec![("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "SCRAM-SHA-512")],
            "kafka.sasl.username",
            "",
        ),
        (
            vec![(
                "TAMIO_BRIDGE__SERVER__TLS_CERT_FILE",
                server_crt.to_str().unwrap(),
            )],
            "server.tls_key_file",
            "together",
        ),
        (
            vec![
                ("TAMIO_BRIDGE__SERVER__TLS_CERT_FILE", ca.to_str().unwrap()),
                (
                    "TAMIO_BRIDGE__SERVER__TLS_KEY_FILE",
                    not_pem.to_str().unwrap(),
                ),
            ],
            "server.tls_key_file",
            "no PEM",
        ),
        (
            vec![(
                "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES",
                "/nonexistent/secret",
            )],
            "signature.secret_files",
            "/nonexistent/secret",
        ),
    ];
    for (env, setting, says) in cases {
        let mut all = vec![brokers, secret];
        all.extend(env.iter().copied());
        let (code, _, stderr) = run_to_exit(&all, &[]);
        assert_ne!(code, 0, "{env:?} started");
        assert!(
            stderr.contains(setting) && stderr.contains(says),
            "{env:?}: `{stderr}` should name `{setting}` and say `{says}`"
        );
    }
}

/// Replaces `path`'s content at once, as a Kubernetes Secret volume update does.
fn replace_file(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("next");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn reloads(admin: SocketAddr, result: &str) -> f64 {
    sample(
        &get(admin, "/metrics").await.text(),
        &format!(r#"tamio_bridge_reloads_total{{result="{result}"}}"#),
    )
}

async fn wait_for_reloads(admin: SocketAddr, result: &str, count: f64) {
    let started = Instant::now();
    while reloads(admin, result).await < count {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no {result} reload #{count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_secrets_and_certificate_with_requests_in_flight() {
    const OLD: &str = "rotation-old-secret-1b9f";
    const NEW: &str = "rotation-new-secret-c44a";
    let pki = Pki::new();
    let first_cert = pki.issue("first");
    let second_cert = pki.issue_until("second", 2032);
    let cert = pki.path("server.crt");
    let key = pki.path("server.key");
    std::fs::copy(pki.path("first.crt"), &cert).unwrap();
    std::fs::copy(pki.path("first.key"), &key).unwrap();
    let secrets = pki.path("secrets");
    std::fs::write(&secrets, format!("{OLD}\n")).unwrap();

    let topic = unique_topic("rotation");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let mut bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
        (
            "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES",
            secrets.to_str().unwrap(),
        ),
        (
            "TAMIO_BRIDGE__SERVER__TLS_CERT_FILE",
            cert.to_str().unwrap(),
        ),
        ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
        ("TAMIO_BRIDGE__LOG__LEVEL", "debug"),
        // SIGHUP only: the file watch is tested on its own.
        ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "0"),
    ]);
    bridge.wait_ready().await;

    // Senders run throughout, each request on a connection of its own, signing with the
    // secret the sender currently uses.
    let current = Arc::new(Mutex::new(OLD));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let certs_seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    // Requests each sender has had answered.
    let answered: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let mut workers = Vec::new();
    for w in 0..4 {
        let (current, stop, acked, failures, certs_seen, answered) = (
            current.clone(),
            stop.clone(),
            acked.clone(),
            failures.clone(),
            certs_seen.clone(),
            answered.clone(),
        );
        let (addr, ca) = (bridge.addr, pki.ca_pem());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("whev_rot_{w}_{i}");
                let body = ticket_event(&id, &format!("ticket-rot-{w}"), i);
                let secret = *current.lock().unwrap();
                let sig = tamio_header(secret, &body);
                match tls_post(
                    addr,
                    &ca,
                    false,
                    &[("tamio-signature", &sig)],
                    body.as_bytes(),
                )
                .await
                {
                    Ok(r) if r.status == StatusCode::OK => {
                        acked.lock().unwrap().push(id);
                        let mut seen = certs_seen.lock().unwrap();
                        if !seen.contains(&r.server_cert) {
                            seen.push(r.server_cert);
                        }
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{id}: {} {}", r.status, r.body)),
                    Err(e) => failures.lock().unwrap().push(format!("{id}: {e}")),
                }
                answered[w].fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    // Waits until every sender has had `n` more requests answered: with n of 2 or more,
    // each has sent at least one request that started after this call.
    let wait_each = |n: usize| {
        let answered = answered.clone();
        async move {
            let targets: Vec<usize> = answered
                .iter()
                .map(|a| a.load(Ordering::SeqCst) + n)
                .collect();
            while answered
                .iter()
                .zip(&targets)
                .any(|(a, t)| a.load(Ordering::SeqCst) < *t)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // 1. Both secrets accepted, and the second certificate, then the sender switches.
    wait_each(10).await;
    replace_file(&secrets, format!("{OLD}\n{NEW}\n").as_bytes());
    replace_file(&key, &std::fs::read(pki.path("second.key")).unwrap());
    replace_file(&cert, &std::fs::read(pki.path("second.crt")).unwrap());
    bridge.signal("HUP");
    wait_for_reloads(bridge.admin, "applied", 1.0).await;
    wait_each(10).await;
    *current.lock().unwrap() = NEW;
    wait_each(10).await;
    // 2. The old secret retired.
    replace_file(&secrets, format!("{NEW}\n").as_bytes());
    bridge.signal("HUP");
    wait_for_reloads(bridge.admin, "applied", 2.0).await;
    wait_each(10).await;
    // 3. A reload that cannot be applied changes nothing.
    std::fs::remove_file(&secrets).unwrap();
    bridge.signal("HUP");
    wait_for_reloads(bridge.admin, "failed", 1.0).await;
    wait_each(10).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "requests failed during rotation: {failures:?}"
    );
    let certs_seen = certs_seen.lock().unwrap().clone();
    assert_eq!(certs_seen, vec![first_cert, second_cert.clone()]);

    // The retired secret is refused; the new one still works after the failed reload.
    let body = ticket_event("whev_rot_after", "ticket-rot-after", 0);
    let old = tls_post(
        bridge.addr,
        &pki.ca_pem(),
        false,
        &[("tamio-signature", &tamio_header(OLD, &body))],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(old.status, StatusCode::UNAUTHORIZED, "{}", old.body);
    let new = tls_post(
        bridge.addr,
        &pki.ca_pem(),
        true,
        &[("tamio-signature", &tamio_header(NEW, &body))],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(new.status, StatusCode::OK, "{}", new.body);
    assert_eq!(new.server_cert, second_cert);
    let expiry = sample(
        &get(bridge.admin, "/metrics").await.text(),
        "tamio_bridge_tls_certificate_expiry_timestamp_seconds",
    );
    assert_eq!(expiry, 1_956_528_000.0, "the second certificate's notAfter");

    bridge.signal("TERM");
    assert_eq!(bridge.wait(Duration::from_secs(30)), 0);
    let mut expected = acked.lock().unwrap().clone();
    expected.push("whev_rot_after".into());
    assert_all_in_kafka(&topic, &expected).await;
    assert!(expected.len() > 200, "only {} deliveries", expected.len());

    let log = bridge.log_text();
    assert!(log.contains("SIGHUP received"), "{log}");
    assert!(log.contains("reload refused"), "{log}");
    for secret in [OLD, NEW] {
        assert!(!log.contains(secret), "a secret appeared in the log");
    }
}

/// Consumer options for a TLS broker checked against `ca`.
fn tls_reader(ca: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "ssl".to_owned()),
        ("ssl.ca.location", ca.to_str().unwrap().to_owned()),
    ]
}

async fn read_with(bootstrap: &str, options: &[(&str, String)], topic: &str) -> Vec<Record> {
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    read_topic_with(
        bootstrap,
        &options,
        topic,
        1,
        Duration::from_millis(1000),
        Duration::from_secs(30),
    )
    .await
}

/// A bridge that cannot get through to the broker: not ready, and deliveries get 503.
async fn assert_kept_out(settings: tamio_kafka_bridge::config::Settings, why: &str) {
    let bridge = Bridge::start(settings).await;
    // Never ready, for as long as a good bridge takes to get ready many times over (the
    // probe runs every 200 ms here, every 500 ms while failing).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let ready = get(bridge.admin, "/readyz").await;
        assert_eq!(
            ready.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{why}: {}",
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = bridge
        .send(&ticket_event("whev_kept_out", "ticket-out", 0))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{why}: {}",
        reply.text()
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produces_over_tls_checking_the_broker_and_presenting_a_client_certificate() {
    let pki = Pki::new();
    pki.issue("broker");
    pki.issue("client");
    let front_listener = TlsFront::reserve();
    let front_port = front_listener.local_addr().unwrap().port();
    let topic = unique_topic("kafka-tls");
    let broker = OwnBroker::start_secured(Some(front_port), &[], &topic).await;
    let front = TlsFront::start(
        front_listener,
        broker.address(),
        &pki.path("broker.crt"),
        &pki.path("broker.key"),
        Some(&pki.ca_file()),
    );
    let bootstrap = front.address();
    let (ca, client_crt, client_key) = (
        pki.ca_file(),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let base = [
        ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true"),
        ("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", ca.to_str().unwrap()),
    ];
    let client = [
        (
            "TAMIO_BRIDGE__KAFKA__TLS__CERT_FILE",
            client_crt.to_str().unwrap(),
        ),
        (
            "TAMIO_BRIDGE__KAFKA__TLS__KEY_FILE",
            client_key.to_str().unwrap(),
        ),
    ];

    // The broker requires a client certificate.
    assert_kept_out(settings(&topic, &base), "no client certificate").await;
    // The broker's certificate is checked: another CA does not vouch for it.
    let stranger = Pki::new();
    let stranger_ca = stranger.ca_file();
    let mut wrong_ca = base.to_vec();
    wrong_ca[2].1 = stranger_ca.to_str().unwrap();
    wrong_ca.extend(client);
    assert_kept_out(
        settings(&topic, &wrong_ca),
        "a CA that did not sign the broker",
    )
    .await;

    let mut good = base.to_vec();
    good.extend(client);
    let bridge = Bridge::start_ready(settings(&topic, &good)).await;
    let body = FIXTURES[0];
    let reply = bridge.send(body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.stop().await;

    let mut reader = tls_reader(&ca);
    reader.push((
        "ssl.certificate.location",
        client_crt.to_str().unwrap().into(),
    ));
    reader.push(("ssl.key.location", client_key.to_str().unwrap().into()));
    let records = read_with(&bootstrap, &reader, &topic).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_scram_sha_512_over_tls() {
    let pki = Pki::new();
    pki.issue("broker");
    let front_listener = TlsFront::reserve();
    let front_port = front_listener.local_addr().unwrap().port();
    let topic = unique_topic("kafka-scram512");
    let broker = OwnBroker::start_secured(
        Some(front_port),
        &[("alice", "alice-password-61f0", "scram512")],
        &topic,
    )
    .await;
    let front = TlsFront::start(
        front_listener,
        broker.address(),
        &pki.path("broker.crt"),
        &pki.path("broker.key"),
        None,
    );
    let bootstrap = front.address();
    let ca = pki.ca_file();
    let env = |password: &'static str| {
        vec![
            ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.clone()),
            ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true".into()),
            (
                "TAMIO_BRIDGE__KAFKA__TLS__CA_FILE",
                ca.to_str().unwrap().into(),
            ),
            (
                "TAMIO_BRIDGE__KAFKA__SASL__MECHANISM",
                "SCRAM-SHA-512".into(),
            ),
            ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "alice".into()),
            ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD", password.into()),
        ]
    };
    let with = |env: &[(&str, String)]| {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        settings(&topic, &pairs)
    };
    assert_kept_out(with(&env("wrong-password")), "a wrong password").await;

    let bridge = Bridge::start_ready(with(&env("alice-password-61f0"))).await;
    let body = FIXTURES[1];
    let reply = bridge.send(body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.stop().await;

    let mut reader = tls_reader(&ca);
    reader[0].1 = "sasl_ssl".into();
    reader.push(("sasl.mechanism", "SCRAM-SHA-512".into()));
    reader.push(("sasl.username", "alice".into()));
    reader.push(("sasl.password", "alice-password-61f0".into()));
    let records = read_with(&bootstrap, &reader, &topic).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_scram_sha_256_and_a_password_file() {
    let topic = unique_topic("kafka-scram256");
    let broker =
        OwnBroker::start_secured(None, &[("bob", "bob-password-9a3c", "scram256")], &topic).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, "bob-password-9a3c\n").unwrap();
    let bootstrap = broker.address();
    let bridge = Bridge::start_ready(settings(
        &topic,
        &[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", &bootstrap),
            ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "SCRAM-SHA-256"),
            ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "bob"),
            (
                "TAMIO_BRIDGE__KAFKA__SASL__PASSWORD_FILE",
                password_file.to_str().unwrap(),
            ),
        ],
    ))
    .await;
    let body = FIXTURES[2];
    let reply = bridge.send(body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.stop().await;

    let reader = vec![
        ("security.protocol", "sasl_plaintext".to_owned()),
        ("sasl.mechanism", "SCRAM-SHA-256".to_owned()),
        ("sasl.username", "bob".to_owned()),
        ("sasl.password", "bob-password-9a3c".to_owned()),
    ];
    let records = read_with(&bootstrap, &reader, &topic).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_secret_file_is_picked_up_without_a_signal() {
    const OLD: &str = "watched-old-secret-0e7d";
    const NEW: &str = "watched-new-secret-f21b";
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, OLD).unwrap();
    let topic = unique_topic("watch");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
        (
            "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES",
            secrets.to_str().unwrap(),
        ),
        ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "100"),
    ]);
    bridge.wait_ready().await;
    let send = |secret: &'static str, id: &'static str| {
        let url = format!("http://{}/webhooks/tamio", bridge.addr);
        async move {
            let body = ticket_event(id, "ticket-watch", 0);
            let sig = tamio_header(secret, &body);
            post(
                &url,
                &[
                    ("content-type", "application/json"),
                    ("tamio-signature", &sig),
                ],
                body.into_bytes(),
            )
            .await
            .status
        }
    };
    assert_eq!(send(NEW, "whev_watch_1").await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(OLD, "whev_watch_2").await, StatusCode::OK);
    assert_eq!(reloads(bridge.admin, "applied").await, 0.0);

    // As a Kubernetes Secret volume does: the new content appears at once.
    replace_file(&secrets, NEW.as_bytes());
    wait_for_reloads(bridge.admin, "applied", 1.0).await;
    assert_eq!(send(NEW, "whev_watch_3").await, StatusCode::OK);
    assert_eq!(send(OLD, "whev_watch_4").await, StatusCode::UNAUTHORIZED);
    assert!(bridge.log_text().contains("file changed"));

    // A file that vanishes (or is caught half-written) fails the reload; the bridge keeps
    // its secrets and tries again at every interval until the file is back.
    std::fs::remove_file(&secrets).unwrap();
    wait_for_reloads(bridge.admin, "failed", 2.0).await;
    assert_eq!(send(NEW, "whev_watch_5").await, StatusCode::OK);
    std::fs::write(&secrets, OLD).unwrap();
    wait_for_reloads(bridge.admin, "applied", 2.0).await;
    assert_eq!(send(OLD, "whev_watch_6").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_turns_unsigned_deliveries_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    let with_secret = format!("[signature]\nsecrets = [\"{SECRET}\"]\nallow_unsigned = true\n");
    std::fs::write(&config, &with_secret).unwrap();
    let topic = unique_topic("unsigned-reload");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let bridge = Process::spawn_with_args(
        &[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
            ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "100"),
        ],
        &["--config", config.to_str().unwrap()],
    );
    bridge.wait_ready().await;
    // The flag left in the file, the secret removed: refused, the secret stays in force.
    replace_file(&config, b"[signature]\nallow_unsigned = true\n");
    wait_for_reloads(bridge.admin, "failed", 1.0).await;
    let body = ticket_event("whev_unsigned_reload", "ticket-ur", 0);
    let url = format!("http://{}/webhooks/tamio", bridge.addr);
    let unsigned = post(
        &url,
        &[("content-type", "application/json")],
        body.clone().into_bytes(),
    )
    .await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    let signed = post(
        &url,
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &tamio_header(SECRET, &body)),
        ],
        body.into_bytes(),
    )
    .await;
    assert_eq!(signed.status, StatusCode::OK, "{}", signed.text());
    assert_eq!(
        sample(
            &get(bridge.admin, "/metrics").await.text(),
            "tamio_bridge_unsigned_allowed"
        ),
        0.0
    );
    assert!(
        bridge.log_text().contains("takes a restart"),
        "{}",
        bridge.log_text()
    );
}

#[test]
fn sign_speaks_every_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, r#"{"test": 2432232314}"#).unwrap();
    let file = file.to_str().unwrap();
    // The example of the Standard Webhooks reference libraries.
    let (code, stdout, stderr) = run_to_exit(
        &[],
        &[
            "sign",
            "--scheme",
            "standard-webhooks",
            "--secret",
            SW_SECRET,
            "--id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "--timestamp",
            "1614265330",
            file,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\nwebhook-timestamp: 1614265330\n\
         webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\n"
    );
    // Python: hmac.new(b"key", b'{"test": 2432232314}', "sha256"), hex and base64.
    for (encoding, expected) in [
        (
            "hex",
            "ad1a616fa5d45e0552fd84752e21f775525a9caa345c9b14fa23d8435584f7e9",
        ),
        ("base64", "rRphb6XUXgVS/YR1LiH3dVJanKo0XJsU+iPYQ1WE9+k="),
    ] {
        let (code, stdout, stderr) = run_to_exit(
            &[],
            &[
                "sign",
                "--scheme",
                "hmac-sha256",
                "--encoding",
                encoding,
                "--secret",
                "key",
                file,
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.trim(), expected);
    }
    let (code, _, stderr) = run_to_exit(
        &[],
        &[
            "sign",
            "--scheme",
            "standard-webhooks",
            "--secret",
            "plain",
            file,
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("whsec_"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_a_tls_bridge_in_each_scheme() {
    let pki = Pki::new();
    pki.issue("server");
    let topic = unique_topic("send-tls");
    create_topic(&topic, 3).await;
    let config = format!(
        r#"
[signature.endpoints."ep-standard"]
scheme = "standard-webhooks"
secrets = ["{SW_SECRET}"]
"#
    );
    let (cert, key) = (pki.path("server.crt"), pki.path("server.key"));
    let bridge = Bridge::start_ready(settings_with_file(
        &topic,
        &config,
        &[
            (
                "TAMIO_BRIDGE__SERVER__TLS_CERT_FILE",
                cert.to_str().unwrap(),
            ),
            ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{}/webhooks/tamio", bridge.addr.port());
    let ca = pki.ca_file();
    let cases = [
        ("ep-tamio", "whev_send_1", "tamio", SECRET, 0),
        (
            "ep-standard",
            "whev_send_2",
            "standard-webhooks",
            SW_SECRET,
            0,
        ),
        (
            "ep-standard",
            "whev_send_3",
            "standard-webhooks",
            "whsec_AAEC",
            1,
        ),
    ];
    for (endpoint, id, scheme, secret, expected) in cases {
        let file = dir.path().join(format!("{id}.json"));
        std::fs::write(&file, event_from(endpoint, id, 0)).unwrap();
        let args: Vec<String> = [
            "send",
            "--url",
            &url,
            "--ca-file",
            ca.to_str().unwrap(),
            "--scheme",
            scheme,
            "--secret",
            secret,
            file.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec();
        let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_to_exit(&[], &args)
        })
        .await
        .unwrap();
        assert_eq!(code, expected, "{id}: {stdout} {stderr}");
        let status = if expected == 0 { "200" } else { "401" };
        assert!(stdout.starts_with(status), "{id}: {stdout}");
    }
    bridge.stop().await;
    let records = read_topic(&topic, 2).await;
    assert_eq!(records.len(), 2);
}
