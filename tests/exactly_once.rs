//! `kafka.exactly_once`: deliveries written in Kafka transactions committed together, each
//! answered once its transaction has committed. Through Kafka's own faults it is shown in
//! tests/broker_faults.rs; here, the group commit at work on the test broker, and the
//! settings it refuses.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_transactions_and_each_is_read_once() {
    let topic = unique_topic("exactly-once");
    create_topic(&topic, 6).await;
    let brokers = brokers();
    let bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", brokers.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true"),
        ("TAMIO_BRIDGE__KAFKA__TRANSACTIONAL_ID", topic.as_str()),
    ]);
    bridge.wait_ready().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let load = Load {
        url: format!("http://{}/webhooks/tamio", bridge.addr),
        tickets: 32,
        per_ticket: 25,
        max_attempts: 1,
        retry_pause: Duration::from_millis(100),
        until: None,
    };
    let report = load.run(acked).await;
    assert_eq!(report.acked.len(), 800, "answers: {:?}", report.answers);

    let findings = check_losses(&brokers, &topic, &report).await;
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
