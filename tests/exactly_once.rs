//! `kafka.exactly_once`: deliveries written in Kafka transactions committed together, each
//! answered once its transaction has committed. Through Kafka's own faults it is shown in
//! tests/broker_faults.rs; here, the group commit at work on the test broker, and the
//! settings it refuses.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_transactions_and_each_is_read_once() {
    let topic = unique_topic("exactly-once");
    create_topic(&topic, 6).await;
    let bridge = exactly_once_bridge(&topic, &[], &[]);
    bridge.wait_ready().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let load = Load {
        url: bridge.url(),
        tickets: 32,
        per_ticket: 25,
        max_attempts: 1,
        retry_pause: Duration::from_millis(100),
        until: None,
    };
    let report = load.run(acked).await;
    assert_eq!(report.acked.len(), 800, "answers: {:?}", report.answers);

    let findings = check_losses(&brokers(), &topic, &report).await;
    findings.assert_nothing_lost(&report);
    assert_eq!(findings.duplicates, 0);

    let metrics = get(bridge.admin, "/metrics").await.text();
    let committed = sample(
        &metrics,
        "tamio_bridge_kafka_transactions_total{result=\"committed\"}",
    );
    let records = sample(&metrics, "tamio_bridge_kafka_transaction_records_sum");
    // Every delivery in a committed transaction, and 32 senders at once sharing them.
    assert_eq!(records, 800.0, "{metrics}");
    assert!(
        (1.0..400.0).contains(&committed),
        "{committed} transactions for 800 deliveries: no group commit"
    );
    println!(
        "800 deliveries from 32 senders in {committed} transactions ({:.1} a transaction)",
        800.0 / committed
    );
}

#[test]
fn exactly_once_is_refused_without_kafka_brokers() {
    let (code, _, stderr) = run_to_exit(
        &[
            ("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true"),
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ],
        &["check-config"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("kafka.exactly_once"), "{stderr}");
}

/// Routes that take only `whitelabel_ticket_created`: every other ticket event is a dead
/// letter.
const ONLY_CREATED: &str =
    "[[routes]]\nevent_type = \"whitelabel_ticket_created\"\nkey = \"/data/ticket/id\"\n";

/// The binary with exactly once on, writing to `topic` (its transactional id too) on the
/// test broker, with `extra` settings and `args`.
fn exactly_once_bridge(topic: &str, extra: &[(&str, &str)], args: &[&str]) -> Process {
    let brokers = brokers();
    let mut env = bridge_env(&brokers, topic);
    env.extend([
        ("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true"),
        ("TAMIO_BRIDGE__KAFKA__TRANSACTIONAL_ID", topic),
    ]);
    env.extend_from_slice(extra);
    Process::spawn_with_args(&env, args)
}

fn created(event_id: &str, ticket: &str) -> String {
    ticket_event(event_id, ticket, 0)
        .replace("whitelabel_ticket_updated", "whitelabel_ticket_created")
}

/// A settings file of `toml`, kept for as long as the bridge runs.
fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    file
}

/// Sequential signed deliveries of `created` events; every answer and its time.
async fn deliver_in_turn(bridge: &Process, prefix: &str, n: usize) -> Vec<(u16, Duration)> {
    let mut answers = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        let reply = bridge
            .send(&created(
                &format!("{prefix}-{i}"),
                &format!("t-{prefix}-{i}"),
            ))
            .await;
        answers.push((reply.status.as_u16(), started.elapsed()));
        // One refusal is enough to fail: the rest would each wait as long.
        if reply.status != 200 {
            break;
        }
    }
    answers
}

fn median(answers: &[(u16, Duration)]) -> Duration {
    let mut times: Vec<Duration> = answers.iter().map(|a| a.1).collect();
    times.sort();
    times[times.len() / 2]
}

/// The raw bytes of a signed HTTP/1.1 delivery of `body`.
fn http1_delivery(body: &str) -> Vec<u8> {
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    format!(
        "POST /webhooks/tamio HTTP/1.1\r\nhost: bridge\r\ncontent-type: application/json\r\n\
         tamio-signature: {sig}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_who_hang_up_on_a_dead_letter_leave_every_later_delivery_served() {
    use common::h2raw::*;
    use tokio::io::AsyncWriteExt;

    let (topic, dlt) = (unique_topic("eo-hangup"), unique_topic("eo-hangup-dlt"));
    create_topic(&topic, 3).await;
    create_topic(&dlt, 3).await;
    let routes = config_file(ONLY_CREATED);
    let bridge = exactly_once_bridge(
        &topic,
        &[("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str())],
        &["--config", routes.path().to_str().unwrap()],
    );
    bridge.wait_ready().await;
    let before = deliver_in_turn(&bridge, "before", 20).await;
    assert!(before.iter().all(|a| a.0 == 200), "{before:?}");

    // Dead letters whose senders hang up a moment after the request is sent: 30 over HTTP/1
    // (the connection closed), 20 over HTTP/2 (the stream reset, CANCEL).
    let mut hung_up = Vec::new();
    for i in 0..30 {
        let addr = bridge.addr;
        hung_up.push(tokio::spawn(async move {
            let body = ticket_event(&format!("h1-{i}"), &format!("t-h1-{i}"), 0);
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            socket.write_all(&http1_delivery(&body)).await.unwrap();
            // Closed once the bridge has begun on it, before Kafka's report can come.
            tokio::time::sleep(Duration::from_millis(2)).await;
            drop(socket);
        }));
    }
    for i in 0..20 {
        let addr = bridge.addr;
        hung_up.push(tokio::spawn(async move {
            let body = ticket_event(&format!("h2-{i}"), &format!("t-h2-{i}"), 0);
            let sig = tamio_kafka_bridge::ingest::verify::header_value(
                SECRET.as_bytes(),
                now(),
                body.as_bytes(),
            );
            let length = body.len().to_string();
            let mut h2 = RawH2::connect(addr).await;
            let mut request = frame(
                HEADERS,
                END_HEADERS,
                1,
                &request_block(
                    "/webhooks/tamio",
                    &[("tamio-signature", &sig), ("content-length", &length)],
                ),
            );
            request.extend(frame(DATA, END_STREAM, 1, body.as_bytes()));
            h2.send(&request).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _ = h2.send(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes())).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }));
    }
    for task in hung_up {
        task.await.unwrap();
    }

    let after = deliver_in_turn(&bridge, "after", 50).await;
    let refused: Vec<_> = after.iter().filter(|a| a.0 != 200).collect();
    assert!(
        refused.is_empty() && after.len() == 50,
        "after senders hung up, a delivery was refused: {refused:?}"
    );
    let (was, is) = (median(&before), median(&after));
    assert!(
        is <= was * 2 + Duration::from_millis(10),
        "median answer {is:?} after senders hung up, {was:?} before"
    );

    // Each dead letter handed to Kafka ran to its end: counted, and in the dead-letter
    // topic, for read_committed readers.
    let letters = bridge.metric("tamio_bridge_dead_letters_total").await;
    let written = read_topic(&dlt, letters as usize).await;
    assert_eq!(
        written.len() as f64,
        letters,
        "dead letters counted and written"
    );
    assert!(
        letters >= 25.0,
        "only {letters} of 50 dead letters were handed to Kafka before their sender hung up: \
         the test did not reach the case it is for"
    );
    println!(
        "{letters} dead letters written after their senders hung up; median answer {was:?} \
         before, {is:?} after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_waits_on_reports_already_given() {
    let topic = unique_topic("eo-flush");
    create_topic(&topic, 3).await;
    let bridge = exactly_once_bridge(&topic, &[], &[]);
    bridge.wait_ready().await;
    // One sender: every delivery is a transaction of its own, committed once its record's
    // report has come.
    let answers = deliver_in_turn(&bridge, "lone", 300).await;
    assert!(
        answers.len() == 300 && answers.iter().all(|a| a.0 == 200),
        "{answers:?}"
    );
    let metrics = bridge.metrics().await;
    let flushes = sample(
        &metrics,
        "tamio_bridge_kafka_transaction_commit_seconds_count{step=\"flush\"}",
    );
    let quick = sample(
        &metrics,
        "tamio_bridge_kafka_transaction_commit_seconds_bucket{step=\"flush\",le=\"0.02\"}",
    );
    assert!(
        flushes >= 100.0,
        "{flushes} commits for 300 deliveries in turn"
    );
    assert_eq!(
        quick, flushes,
        "a commit waited 20 ms or more for librdkafka to let go of reports already given \
         (rdkafka's flush polls in 100 ms steps)"
    );
    let mut times: Vec<Duration> = answers.iter().map(|a| a.1).collect();
    times.sort();
    println!(
        "300 deliveries in turn: p50 {:?}, p99 {:?}, slowest {:?}; {flushes} commits, each \
         flushed within 20 ms",
        times[150], times[297], times[299]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_refused_alone_and_every_other_topic_is_probed() {
    let (topic, dlt) = (unique_topic("eo-present"), unique_topic("eo-present-dlt"));
    let missing = unique_topic("eo-missing");
    create_topic(&topic, 3).await;
    create_topic(&dlt, 3).await;
    // The missing topic's route comes first: the probe reads the topics in this order, and
    // the dead-letter topic last.
    let routes = config_file(&format!(
        "[[routes]]\nevent_type = \"whitelabel_ticket_updated\"\ntopic = \"{missing}\"\n\
         key = \"/data/ticket/id\"\n\n\
         [[routes]]\nevent_type = \"whitelabel_ticket_created\"\nkey = \"/data/ticket/id\"\n"
    ));
    let bridge = exactly_once_bridge(
        &topic,
        &[
            ("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str()),
            // Long enough that the deliveries below share one transaction.
            ("TAMIO_BRIDGE__KAFKA__TRANSACTION_LINGER_MS", "300"),
        ],
        &["--config", routes.path().to_str().unwrap()],
    );
    // Not ready, naming the missing topic.
    let started = Instant::now();
    loop {
        let reply = get(bridge.admin, "/readyz").await;
        if reply.status == 503 && reply.text().contains(&missing) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "/readyz never named the missing topic: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the producer's transactions get ready.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Deliveries to the present topic, a delivery to the missing one among them, and a dead
    // letter (an event no route takes), all at once.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let body = created(&format!("present-{i}"), &format!("t-present-{i}"));
        let bridge_url = bridge.url();
        tasks.push(tokio::spawn(async move {
            (
                format!("present-{i}"),
                signed_post(&bridge_url, &body).await,
            )
        }));
    }
    let to_missing = ticket_event("to-missing", "t-missing", 0);
    let to_dlt = ticket_event("to-dlt", "t-dlt", 0).replace("ticket_updated", "ticket_resolved");
    for (name, body) in [("to-missing", to_missing), ("to-dlt", to_dlt)] {
        let bridge_url = bridge.url();
        tasks.push(tokio::spawn(async move {
            (name.to_owned(), signed_post(&bridge_url, &body).await)
        }));
    }
    let mut answers = std::collections::BTreeMap::new();
    for task in tasks {
        let (name, answer) = task.await.unwrap();
        answers.insert(name, answer);
    }
    let (status, took, body) = &answers["to-missing"];
    assert_eq!(*status, 503, "{body}");
    assert!(
        body.contains(&missing),
        "the refusal names the topic: {body}"
    );
    assert!(
        *took < Duration::from_secs(1),
        "refused at once, not after {took:?}"
    );
    let (status, _, body) = &answers["to-dlt"];
    assert!(
        (400..500).contains(status),
        "the dead-letter topic was probed too: the letter was written and the sender told \
         why ({status} {body})"
    );
    for i in 0..10 {
        let (status, _, body) = &answers[&format!("present-{i}")];
        assert_eq!(
            *status, 200,
            "present-{i}, in the transaction beside it: {body}"
        );
    }
    assert_eq!(read_topic(&dlt, 1).await.len(), 1);
}

/// A signed POST of `body`: its status, how long it took and its body.
async fn signed_post(url: &str, body: &str) -> (u16, Duration, String) {
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    let started = Instant::now();
    let reply = post(
        url,
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &sig),
        ],
        body.as_bytes().to_vec(),
    )
    .await;
    (reply.status.as_u16(), started.elapsed(), reply.text())
}

#[test]
fn exactly_once_without_duplicate_suppression_is_refused() {
    let (code, _, stderr) = run_to_exit(
        &[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", "127.0.0.1:9"),
            ("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true"),
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
            ("TAMIO_BRIDGE__DEDUP__WINDOW_SECS", "0"),
        ],
        &["check-config"],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("kafka.exactly_once") && stderr.contains("dedup.window_secs"),
        "{stderr}"
    );
}
