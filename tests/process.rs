//! The real binary: signals, the embedded mode, start-up refusals and the `sign` command.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn send_to(addr: SocketAddr, body: &str) -> Result<Reply, String> {
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    request(
        "POST",
        &format!("http://{addr}/webhooks/tamio"),
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &sig),
        ],
        body.as_bytes().to_vec(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_loses_none_and_exits_0() {
    let topic = unique_topic("sigterm");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let mut env = bridge_env(&brokers, &topic);
    env.push(("TAMIO_BRIDGE__LOG__LEVEL", "debug"));
    let mut bridge = Process::spawn(&env);
    bridge.wait_ready().await;

    // A request that is certainly in flight when the signal comes: half its body is sent.
    let slow_body = ticket_event("whev_slow", "ticket-slow", 0);
    let sig = tamio_kafka_bridge::ingest::verify::header_value(
        SECRET.as_bytes(),
        now(),
        slow_body.as_bytes(),
    );
    let mut slow = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let head = format!(
        "POST /webhooks/tamio HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Tamio-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
        slow_body.len()
    );
    let (first, rest) = slow_body.split_at(slow_body.len() / 2);
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(first.as_bytes()).await.unwrap();

    // Load from several clients at once while the signal arrives.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let addr = bridge.addr;
    let mut workers = Vec::new();
    for w in 0..8 {
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let id = format!("whev_load_{w}_{i}");
                let body = ticket_event(&id, &format!("ticket-{w}-{}", i % 7), i);
                match send_to(addr, &body).await {
                    Ok(r) if r.status == StatusCode::OK => acked.lock().unwrap().push(id),
                    Ok(r) => panic!(
                        "unexpected answer during shutdown: {} {}",
                        r.status,
                        r.text()
                    ),
                    Err(_) => return, // the listener closed: expected after the signal
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bridge.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut answer))
        .await
        .expect("the in-flight request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        bridge.wait(Duration::from_secs(30)),
        0,
        "{}",
        bridge.log_text()
    );

    let mut expected = acked.lock().unwrap().clone();
    expected.push("whev_slow".into());
    assert_all_in_kafka(&topic, &expected).await;
    let log = bridge.log_text();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("producer flushed"), "{log}");
    assert!(!log.contains(SECRET), "the secret appeared in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_configured_it_runs_on_the_embedded_broker() {
    let mut bridge = Process::spawn(&[]);
    bridge.wait_ready().await;
    let log = bridge.log_text();
    assert!(log.contains("EMBEDDED KAFKA"), "{log}");
    let bootstrap = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["fields"]["bootstrap"].as_str().map(str::to_owned))
        .expect("the bootstrap address is logged");

    // Paste what it printed: the signed example request.
    let printed = bridge.stdout.lock().unwrap().clone();
    let header = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("-H 'Tamio-Signature: "))
        .and_then(|l| l.strip_suffix("' \\"))
        .unwrap_or_else(|| panic!("no signature header printed: {printed}"))
        .to_owned();
    let body = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("--data-binary '"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no body printed: {printed}"))
        .to_owned();
    let reply = request(
        "POST",
        &bridge.url(),
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &header),
        ],
        body.clone().into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Any Kafka client reads the topic at the printed address.
    let records = read_topic_from(
        &bootstrap,
        "tamio.tickets",
        1,
        Duration::from_millis(500),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, body.as_bytes());
    bridge.signal("INT");
    assert_eq!(bridge.wait(Duration::from_secs(30)), 0);
}

#[test]
fn refuses_to_start_without_a_secret_when_kafka_is_configured() {
    let (code, _, stderr) = run_to_exit(&[("TAMIO_BRIDGE__KAFKA__BROKERS", "127.0.0.1:9")], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("signature.secrets"), "{stderr}");
}

#[test]
fn bad_settings_stop_start_up_naming_the_setting() {
    for (key, value, named) in [
        ("TAMIO_BRIDGE__SERVER__LISTEN", "nowhere", "server.listen"),
        (
            "TAMIO_BRIDGE__SIGNATURE__TOLERANCE_SECS",
            "0",
            "signature.tolerance_secs",
        ),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", "", "kafka.topic"),
    ] {
        let (code, _, stderr) = run_to_exit(&[(key, value)], &[]);
        assert_ne!(code, 0, "{key}={value}");
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, "[kafka]\nbrokers = 'x:1'\nnot_a_setting = 1\n").unwrap();
    let (code, _, stderr) = run_to_exit(&[], &["--config", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stderr.contains("not_a_setting"), "{stderr}");
}

#[test]
fn sign_prints_the_header_an_independent_hmac_agrees_with() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, r#"{"a":1}"#).unwrap();
    let (code, stdout, stderr) = run_to_exit(
        &[],
        &[
            "sign",
            "--secret",
            "whsec-demo",
            "--timestamp",
            "1671472527",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    // Python: hmac.new(b"whsec-demo", b'1671472527.{"a":1}', hashlib.sha256).hexdigest()
    assert_eq!(
        stdout.trim(),
        "t=1671472527,s=a170e2feed4ec30de9032811384d9fabd63d48250a7c9722b45dfe204cbb87f6"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_killed_mid_load_and_started_again_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let topic = unique_topic("loss-sigkill");
    create_topic(&topic, 3).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let brokers = brokers();
    let env = [
        ("TAMIO_BRIDGE__KAFKA__BROKERS", brokers.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__SERVER__LISTEN", listen.as_str()),
    ];
    let mut bridge = Process::spawn(&env);
    bridge.wait_ready().await;

    let acked = Arc::new(AtomicUsize::new(0));
    let load = Load {
        url: format!("http://{listen}/webhooks/tamio"),
        tickets: 64,
        per_ticket: 40,
        max_attempts: 400,
        retry_pause: Duration::from_millis(100),
        until: None,
    };
    let run = tokio::spawn({
        let acked = acked.clone();
        async move { load.run(acked).await }
    });
    while acked.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bridge.signal("KILL");
    bridge.wait(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Process::spawn(&env);
    let report = run.await.unwrap();
    assert!(
        report.answers.get("error").copied().unwrap_or(0) > 0,
        "the senders never noticed the bridge die: {:?}",
        report.answers
    );
    assert_eq!(report.abandoned, 0);
    check_losses(&brokers, &topic, &report)
        .await
        .assert_nothing_lost(&report);
    drop(restarted);
}

#[test]
fn a_partitioner_that_could_split_a_ticket_is_refused_at_start() {
    let brokers = ("TAMIO_BRIDGE__KAFKA__BROKERS", "127.0.0.1:9");
    let secret = ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET);
    let (code, _, stderr) = run_to_exit(
        &[
            brokers,
            secret,
            ("TAMIO_BRIDGE__KAFKA__LIBRDKAFKA__PARTITIONER", "random"),
        ],
        &["check-config"],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("kafka.librdkafka") && stderr.contains("partitioner"),
        "{stderr}"
    );
    // A key-consistent one is taken.
    let (code, stdout, stderr) = run_to_exit(
        &[
            brokers,
            secret,
            (
                "TAMIO_BRIDGE__KAFKA__LIBRDKAFKA__PARTITIONER",
                "consistent_random",
            ),
        ],
        &["check-config"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("consistent_random"), "{stdout}");
}

#[test]
fn check_config_prints_toml_that_loads_back_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.toml");
    std::fs::write(
        &file,
        "[kafka]\nbrokers = 'b:9092'\n[kafka.librdkafka]\n\"sasl.password\" = 'hunter2-kafka'\n\
         \"linger.ms\" = '3'\n[dedup]\nstore = 'redis'\nredis_url = 'redis://u:hunter2-redis@r:6379'\n\
         [signature]\nsecrets = ['hunter2-signing']\n",
    )
    .unwrap();
    let (code, printed, stderr) =
        run_to_exit(&[], &["--config", file.to_str().unwrap(), "check-config"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("\"linger.ms\" = \"3\""), "{printed}");
    assert!(printed.contains("redis://u@r:6379"), "{printed}");
    assert!(
        printed.contains("signature.secrets: 1 secret(s)"),
        "{printed}"
    );
    // Pasted into a --config file (with a secret, which it left out), it loads as it was.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &printed).unwrap();
    let (code, reprinted, stderr) = run_to_exit(
        &[("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET)],
        &["--config", again.to_str().unwrap(), "check-config"],
    );
    assert_eq!(code, 0, "{stderr}");
    let body = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&reprinted), body(&printed));
}

#[test]
fn a_settings_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nmax_in_flight = 'many'\n").unwrap();
    let (code, _, stderr) = run_to_exit(&[], &["--config", file.to_str().unwrap(), "check-config"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("server.max_in_flight"), "{stderr}");
    assert_eq!(stderr.matches("max_in_flight").count(), 1, "{stderr}");
    assert!(!stderr.contains("Caused by"), "{stderr}");
}
