//! TLS and SASL to Apache Kafka's own listeners (certificates from a test CA, SCRAM
//! credentials created at format time, as operators do), and start-up refusals of bad TLS
//! and secret files naming their setting.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use http::StatusCode;

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

/// A one-node cluster whose client listener speaks `protocol`, with the broker's certificate
/// from `pki` (for SSL and SASL_SSL) and `more` settings.
async fn secured(
    pki: &Pki,
    protocol: &'static str,
    more: &[&str],
    format_args: &[&str],
) -> kafka::Cluster {
    let mut properties: Vec<String> = more.iter().map(|l| l.to_string()).collect();
    if protocol.ends_with("SSL") {
        // Kafka reads a PEM key store: the private key (PKCS #8), then the chain.
        let store = pki.path("broker-store.pem");
        let key = std::fs::read_to_string(pki.path("broker.key")).unwrap();
        let chain = std::fs::read_to_string(pki.path("broker.crt")).unwrap();
        std::fs::write(&store, key + &chain).unwrap();
        properties.extend([
            "ssl.keystore.type=PEM".to_owned(),
            format!("ssl.keystore.location={}", store.display()),
            "ssl.truststore.type=PEM".to_owned(),
            format!("ssl.truststore.location={}", pki.ca_file().display()),
        ]);
    }
    kafka::Cluster::start(kafka::Spec {
        client_protocol: protocol,
        properties,
        format_args: format_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produces_over_tls_checking_the_broker_and_presenting_a_client_certificate() {
    let pki = Pki::new();
    pki.issue("broker");
    pki.issue("client");
    let cluster = secured(&pki, "SSL", &["ssl.client.auth=required"], &[]).await;
    let topic = unique_topic("kafka-tls");
    cluster.create_topic_with(&topic, 3, 1, &[]).await;
    let bootstrap = cluster.bootstrap();
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
    let cluster = secured(
        &pki,
        "SASL_SSL",
        &[
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "listener.name.client.scram-sha-512.sasl.jaas.config=\
             org.apache.kafka.common.security.scram.ScramLoginModule required;",
        ],
        &[
            "--add-scram",
            "SCRAM-SHA-512=[name=alice,password=alice-password-61f0]",
        ],
    )
    .await;
    let topic = unique_topic("kafka-scram512");
    cluster.create_topic_with(&topic, 3, 1, &[]).await;
    let bootstrap = cluster.bootstrap();
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
    let pki = Pki::new();
    let cluster = secured(
        &pki,
        "SASL_PLAINTEXT",
        &[
            "sasl.enabled.mechanisms=SCRAM-SHA-256",
            "listener.name.client.scram-sha-256.sasl.jaas.config=\
             org.apache.kafka.common.security.scram.ScramLoginModule required;",
        ],
        &[
            "--add-scram",
            "SCRAM-SHA-256=[name=bob,password=bob-password-9a3c]",
        ],
    )
    .await;
    let topic = unique_topic("kafka-scram256");
    cluster.create_topic_with(&topic, 3, 1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, "bob-password-9a3c\n").unwrap();
    let bootstrap = cluster.bootstrap();
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
