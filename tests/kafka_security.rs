//! TLS and SASL to Apache Kafka's own listeners (certificates from a test CA; SCRAM
//! credentials created at format time and through the Admin API, as operators do; PLAIN),
//! KRaft's `StandardAuthorizer` with exactly the ACLs docs/security.md lists, the refusals named
//! within seconds, client certificates rotated with SIGHUP, and start-up refusals of bad TLS
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
    let event = ticket_event("whev_kept_out", "ticket-out", 0);
    assert_refusing(bridge.admin, bridge.send(&event), why).await;
    bridge.stop().await;
}

/// Like [`assert_kept_out`], for the binary.
async fn assert_process_kept_out(bridge: &Process, why: &str) {
    let event = ticket_event("whev_kept_out", "ticket-out", 0);
    assert_refusing(bridge.admin, bridge.send(&event), why).await;
}

/// Never ready, for as long as a good bridge takes to get ready many times over (the probe
/// runs every 200 ms here, every 500 ms while failing); then `delivery` is answered 503.
async fn assert_refusing(
    admin: std::net::SocketAddr,
    delivery: impl std::future::Future<Output = Reply>,
    why: &str,
) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let ready = get(admin, "/readyz").await;
        assert_eq!(
            ready.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{why}: {}",
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = delivery.await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{why}: {}",
        reply.text()
    );
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
    let spawn = |env: Vec<(&'static str, String)>| {
        let mut env = env;
        env.push(("TAMIO_BRIDGE__KAFKA__TOPIC", topic.clone()));
        env.push(("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET.into()));
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Process::spawn(&pairs)
    };
    let passwords = ["wrong-password", "alice-password-61f0"];
    let kept_out = spawn(env("wrong-password"));
    assert_process_kept_out(&kept_out, "a wrong password").await;
    assert_no_secret(&kept_out.log_text(), &passwords, "the log");

    let bridge = spawn(env("alice-password-61f0"));
    wait_for_readyz(bridge.admin, StatusCode::OK, Duration::from_secs(20)).await;
    let body = FIXTURES[1];
    let reply = bridge.send(body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.signal("TERM");
    let mut bridge = bridge;
    assert_eq!(bridge.wait(Duration::from_secs(30)), 0);
    assert_no_secret(&bridge.log_text(), &passwords, "the log");

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
async fn authenticates_with_scram_sha_256_over_tls_created_through_the_admin_api() {
    let pki = Pki::new();
    pki.issue("broker");
    let cluster = secured(
        &pki,
        "SASL_SSL",
        &[
            "sasl.enabled.mechanisms=SCRAM-SHA-256",
            "listener.name.client.scram-sha-256.sasl.jaas.config=\
             org.apache.kafka.common.security.scram.ScramLoginModule required;",
        ],
        &[],
    )
    .await;
    // Created on the running cluster, as operators add users: kafka-configs, which uses the
    // Admin API's AlterUserScramCredentials.
    cluster
        .tool(
            "org.apache.kafka.tools.ConfigCommand",
            &[
                "--alter",
                "--add-config",
                "SCRAM-SHA-256=[iterations=8192,password=bob-password-9a3c]",
                "--entity-type",
                "users",
                "--entity-name",
                "bob",
            ],
        )
        .await;
    let topic = unique_topic("kafka-scram256");
    cluster.create_topic_with(&topic, 3, 1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, "bob-password-9a3c\n").unwrap();
    let bootstrap = cluster.bootstrap();
    let ca = pki.ca_file();
    let mut bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &bootstrap),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true"),
        ("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", ca.to_str().unwrap()),
        ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "SCRAM-SHA-256"),
        ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", "bob"),
        (
            "TAMIO_BRIDGE__KAFKA__SASL__PASSWORD_FILE",
            password_file.to_str().unwrap(),
        ),
    ]);
    wait_for_readyz(bridge.admin, StatusCode::OK, Duration::from_secs(20)).await;
    let body = FIXTURES[2];
    let reply = bridge.send(body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    bridge.signal("TERM");
    assert_eq!(bridge.wait(Duration::from_secs(30)), 0);
    assert_no_secret(&bridge.log_text(), &["bob-password-9a3c"], "the log");

    let mut reader = tls_reader(&ca);
    reader[0].1 = "sasl_ssl".into();
    reader.push(("sasl.mechanism", "SCRAM-SHA-256".into()));
    reader.push(("sasl.username", "bob".into()));
    reader.push(("sasl.password", "bob-password-9a3c".into()));
    let records = read_with(&bootstrap, &reader, &topic).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, body.as_bytes());
}

/// The passwords of the PLAIN cluster's two principals.
const BRIDGE_PASSWORD: &str = "bridge-pw-7d21c0";
const REPLAYER_PASSWORD: &str = "replayer-pw-4b9e11";

/// A one-node cluster whose client listener speaks SASL_SSL with PLAIN (as Confluent Cloud
/// does), for the principals `bridge` and `replayer`, and authorizes with KRaft's
/// `StandardAuthorizer`: a principal may do only what an ACL grants it. The brokers' and
/// controllers' own listeners are plaintext, whose principal (ANONYMOUS) is a super user.
async fn plain_with_acls(pki: &Pki) -> kafka::Cluster {
    let jaas = format!(
        "listener.name.client.plain.sasl.jaas.config=\
         org.apache.kafka.common.security.plain.PlainLoginModule required \
         user_bridge=\"{BRIDGE_PASSWORD}\" user_replayer=\"{REPLAYER_PASSWORD}\";"
    );
    secured(
        pki,
        "SASL_SSL",
        &[
            "sasl.enabled.mechanisms=PLAIN",
            &jaas,
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:ANONYMOUS",
            "allow.everyone.if.no.acl.found=false",
        ],
        &[],
    )
    .await
}

/// The bridge's ACLs, as docs/security.md lists them: write and describe its topics, and read
/// their `min.insync.replicas`.
async fn grant_bridge(cluster: &kafka::Cluster, principal: &str, topics: &[&str]) {
    for topic in topics {
        cluster
            .acl(&[
                "--allow-principal",
                principal,
                "--operation",
                "Write",
                "--operation",
                "Describe",
                "--operation",
                "DescribeConfigs",
                "--topic",
                topic,
            ])
            .await;
    }
}

/// The replay's ACLs, as docs/security.md lists them: read the dead-letter topic, write the
/// topics, and its group and transactional id (both named `tamio-kafka-bridge-replay-…`).
async fn grant_replayer(cluster: &kafka::Cluster, principal: &str, dlt: &str, topic: &str) {
    let p = principal;
    let prefix = "tamio-kafka-bridge-replay-";
    for args in [
        vec![
            "--operation",
            "Read",
            "--operation",
            "Describe",
            "--topic",
            dlt,
        ],
        vec![
            "--operation",
            "Write",
            "--operation",
            "Describe",
            "--topic",
            topic,
        ],
        vec![
            "--operation",
            "Read",
            "--group",
            prefix,
            "--resource-pattern-type",
            "prefixed",
        ],
        vec![
            "--operation",
            "Write",
            "--operation",
            "Describe",
            "--transactional-id",
            prefix,
            "--resource-pattern-type",
            "prefixed",
        ],
    ] {
        let mut all = vec!["--allow-principal", p];
        all.extend(args);
        cluster.acl(&all).await;
    }
}

/// Sends `body` signed with `SECRET` to the bridge process.
/// Polls `/readyz` until its answer contains each of `words` (any case); returns it.
async fn readyz_naming(bridge: &Process, words: &[&str], within: Duration) -> Reply {
    let started = Instant::now();
    loop {
        let ready = get(bridge.admin, "/readyz").await;
        let text = ready.text().to_lowercase();
        if words.iter().all(|w| text.contains(&w.to_lowercase())) {
            return ready;
        }
        assert!(
            started.elapsed() < within,
            "/readyz did not name {words:?} within {within:?}: {}",
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A help-desk note about `ticket`: no default route takes it.
fn note(event_id: &str, ticket: &str) -> String {
    serde_json::json!({
        "event_id": event_id,
        "event_type": "helpdesk_note_created",
        "api_version": 2,
        "object": "event",
        "endpoint_id": "9ab698f5-99de-4ff6-8bfc-a7dcb973d177",
        "data": {"ticket": {"id": ticket, "seq": 0, "is_open": true}}
    })
    .to_string()
}

/// Asserts that no line of `text` holds one of `secrets`.
fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(!text.contains(secret), "{what} holds a password: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_over_tls_with_only_the_readme_acls() {
    let pki = Pki::new();
    pki.issue("broker");
    let cluster = plain_with_acls(&pki).await;
    let (topic, dlt, forbidden) = (
        unique_topic("acl-tickets"),
        unique_topic("acl-dead"),
        unique_topic("acl-forbidden"),
    );
    for t in [&topic, &dlt, &forbidden] {
        cluster.create_topic_with(t, 3, 1, &[]).await;
    }
    grant_bridge(&cluster, "User:bridge", &[&topic, &dlt]).await;
    grant_replayer(&cluster, "User:replayer", &dlt, &topic).await;
    let bootstrap = cluster.bootstrap();
    let ca = pki.ca_file();
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, toml: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, toml).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let env = |user: &'static str, password: &'static str| {
        vec![
            ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.clone()),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.clone()),
            ("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.clone()),
            ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true".into()),
            (
                "TAMIO_BRIDGE__KAFKA__TLS__CA_FILE",
                ca.to_str().unwrap().into(),
            ),
            ("TAMIO_BRIDGE__KAFKA__SASL__MECHANISM", "PLAIN".into()),
            ("TAMIO_BRIDGE__KAFKA__SASL__USERNAME", user.into()),
            ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD", password.into()),
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET.into()),
        ]
    };
    let pairs = |env: &[(&'static str, String)]| -> Vec<(&'static str, String)> { env.to_vec() };
    let spawn = |env: Vec<(&'static str, String)>, args: Vec<String>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Process::spawn_with_args(&env, &args)
    };
    let passwords = [BRIDGE_PASSWORD, REPLAYER_PASSWORD, "not-the-password-5e"];

    // A wrong password: never ready, /readyz and the log name authentication, within
    // seconds, and no password shows.
    let bridge = spawn(pairs(&env("bridge", "not-the-password-5e")), vec![]);
    let ready = readyz_naming(&bridge, &["authentication"], Duration::from_secs(15)).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let reply = bridge.send(&ticket_event("whev_pw", "ticket-pw", 0)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(
        bridge.log_text().to_lowercase().contains("authentication"),
        "the log does not name authentication: {}",
        bridge.log_text()
    );
    assert_no_secret(&bridge.log_text(), &passwords, "the log");
    assert_no_secret(&ready.text(), &passwords, "/readyz");
    drop(bridge);

    // A route to a topic the principal may not even describe: /readyz names the topic and
    // the authorization; its deliveries get a 503 naming authorization at once, counted;
    // the other topics' deliveries go on.
    let routes = config(
        "forbidden.toml",
        format!(
            "[[routes]]\nevent_type = \"whitelabel_ticket_*\"\nkey = \"/data/ticket/id\"\n\n\
             [[routes]]\nevent_type = \"helpdesk_note_*\"\ntopic = \"{forbidden}\"\n\
             key = \"/data/ticket/id\"\n"
        ),
    );
    let bridge = spawn(
        pairs(&env("bridge", BRIDGE_PASSWORD)),
        vec!["--config".into(), routes],
    );
    let ready = readyz_naming(
        &bridge,
        &[forbidden.as_str(), "authorization"],
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    for i in 0..5 {
        let reply = bridge
            .send(&ticket_event(&format!("whev_ok_{i}"), "ticket-ok", i))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let started = Instant::now();
    let reply = bridge.send(&note("whev_note_forbidden", "ticket-ok")).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("authorization"),
        "the refusal does not name authorization: {}",
        reply.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the refusal took {:?}",
        started.elapsed()
    );
    let metrics = get(bridge.admin, "/metrics").await.text();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("tamio_bridge_kafka_delivery_failures_total{reason=\"authorization\"}")
            && !l.ends_with(" 0")),
        "no authorization failure counted:\n{metrics}"
    );
    assert_no_secret(&bridge.log_text(), &passwords, "the log");
    drop(bridge);

    // With only docs/security.md's ACLs and the default routes: ready, deliveries land, and a note
    // (which no route takes) becomes a dead letter.
    let bridge = spawn(pairs(&env("bridge", BRIDGE_PASSWORD)), vec![]);
    bridge.wait_ready().await;
    for i in 5..25 {
        let reply = bridge
            .send(&ticket_event(&format!("whev_ok_{i}"), "ticket-ok", i))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = bridge.send(&note("whev_note_late", "ticket-ok")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_no_secret(&bridge.log_text(), &passwords, "the log");
    drop(bridge);

    // The replay, as its own principal with only docs/security.md's ACLs, publishes it once the
    // notes are routed.
    let routed = config(
        "routed.toml",
        "[[routes]]\nevent_type = \"whitelabel_ticket_*\"\nkey = \"/data/ticket/id\"\n\n\
         [[routes]]\nevent_type = \"helpdesk_note_*\"\nkey = \"/data/ticket/id\"\n"
            .to_owned(),
    );
    let replayer = env("replayer", REPLAYER_PASSWORD);
    let replayer: Vec<(&str, &str)> = replayer.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, stdout, stderr) = run_to_exit(
        &replayer,
        &["--config", &routed, "replay", "--output", "json"],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["published"], 1, "{summary}");
    assert_no_secret(&(stdout + &stderr), &passwords, "the replay's output");

    // Read as the brokers' own principal: each event once, the note last.
    let records = read_topic_with(
        &cluster.internal_bootstrap(),
        &[("isolation.level", "read_committed")],
        &topic,
        26,
        Duration::from_millis(1000),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), 26);
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            v["event_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 26, "an event landed twice");
    assert!(ids.contains(&"whev_note_late".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_certificates_expired_or_from_an_unknown_ca_are_named_within_seconds() {
    let pki = Pki::new();
    // Expired at the start of 2020.
    pki.issue_until("broker", 2020);
    let cluster = secured(&pki, "SSL", &[], &[]).await;
    let topic = unique_topic("kafka-expired");
    cluster.create_topic_with(&topic, 1, 1, &[]).await;
    let bootstrap = cluster.bootstrap();
    let stranger = Pki::new();
    for (ca, named) in [
        (pki.ca_file(), "expired"),
        (stranger.ca_file(), "certificate verify failed"),
    ] {
        let bridge = Process::spawn(&[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
            ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true"),
            ("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", ca.to_str().unwrap()),
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ]);
        let ready = readyz_naming(&bridge, &[named], Duration::from_secs(15)).await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            bridge.log_text().contains(named),
            "the log does not say `{named}`: {}",
            bridge.log_text()
        );
        let reply = bridge
            .send(&ticket_event("whev_cert", "ticket-cert", 0))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
    }

    // An operator who chose not to verify the brokers' certificate: the producer, the
    // readiness probe and the replay's consumer all connect, as the producer does.
    let unverified = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        unverified.path(),
        "[kafka.librdkafka]\n\"enable.ssl.certificate.verification\" = \"false\"\n",
    )
    .unwrap();
    let dlt = unique_topic("kafka-expired-dlt");
    cluster.create_topic_with(&dlt, 1, 1, &[]).await;
    let env = [
        ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
        ("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true"),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
    ];
    let config = ["--config", unverified.path().to_str().unwrap()];
    let bridge = Process::spawn_with_args(&env, &config);
    wait_for_readyz(bridge.admin, StatusCode::OK, Duration::from_secs(20)).await;
    let reply = bridge
        .send(&ticket_event("whev_unverified", "ticket-cert", 0))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    drop(bridge);
    let mut args = config.to_vec();
    args.extend(["replay", "--dry-run", "--output", "json"]);
    let (code, stdout, stderr) = run_to_exit(&env, &args);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_rotated_with_sighup_keeps_deliveries_flowing() {
    let pki = Pki::new();
    pki.issue("broker");
    pki.issue("client-2026");
    pki.issue("client-2027");
    // The brokers know the bridge by its certificate's name: each certificate has its own
    // ACLs, so the old one's can be taken away once the new one is in force.
    let cluster = secured(
        &pki,
        "SSL",
        &[
            "ssl.client.auth=required",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:ANONYMOUS",
            "ssl.principal.mapping.rules=RULE:^CN=([^,]+)$/$1/,DEFAULT",
        ],
        &[],
    )
    .await;
    let topic = unique_topic("kafka-rotate");
    cluster.create_topic_with(&topic, 3, 1, &[]).await;
    grant_bridge(&cluster, "User:client-2026", &[&topic]).await;
    grant_bridge(&cluster, "User:client-2027", &[&topic]).await;
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let install = |name: &str| {
        // As a Secret volume update does: the files change at once.
        for (from, to) in [(format!("{name}.crt"), &crt), (format!("{name}.key"), &key)] {
            let tmp = to.with_extension("new");
            std::fs::copy(pki.path(&from), &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    };
    install("client-2026");
    let bootstrap = cluster.bootstrap();
    let ca = pki.ca_file();
    let bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TLS__ENABLED", "true"),
        ("TAMIO_BRIDGE__KAFKA__TLS__CA_FILE", ca.to_str().unwrap()),
        ("TAMIO_BRIDGE__KAFKA__TLS__CERT_FILE", crt.to_str().unwrap()),
        ("TAMIO_BRIDGE__KAFKA__TLS__KEY_FILE", key.to_str().unwrap()),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        // SIGHUP only: the rotation is the signal's doing.
        ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "0"),
    ]);
    bridge.wait_ready().await;

    let mut sent = 0;
    let mut deliver = |bridge: &Process, n: usize| {
        let start = sent;
        sent += n;
        let bodies: Vec<String> = (start..start + n)
            .map(|i| ticket_event(&format!("whev_rot_{i}"), "ticket-rot", i))
            .collect();
        let url = bridge.url();
        async move {
            for body in bodies {
                let sig = tamio_kafka_bridge::ingest::verify::header_value(
                    SECRET.as_bytes(),
                    now(),
                    body.as_bytes(),
                );
                let reply = post(
                    &url,
                    &[
                        ("content-type", "application/json"),
                        ("tamio-signature", &sig),
                    ],
                    body.into_bytes(),
                )
                .await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            }
        }
    };
    deliver(&bridge, 20).await;

    // Rotate while deliveries go on.
    let during = tokio::spawn(deliver(&bridge, 200));
    tokio::time::sleep(Duration::from_millis(100)).await;
    install("client-2027");
    bridge.signal("HUP");
    let started = Instant::now();
    while !bridge.log_text().contains("renewed the Kafka clients") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the clients were not renewed: {}",
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    during.await.unwrap();

    // The old certificate's rights taken away: the bridge goes on with the new one.
    cluster
        .acl_remove(&[
            "--allow-principal",
            "User:client-2026",
            "--operation",
            "Write",
            "--topic",
            &topic,
        ])
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    deliver(&bridge, 20).await;
    let ready = get(bridge.admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());

    let records = read_topic_with(
        &cluster.internal_bootstrap(),
        &[],
        &topic,
        240,
        Duration::from_millis(1000),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), 240);
}
