//! On a cluster of three brokers beside a controller: quick refusals that find a key's
//! partition with the partitioner the producer uses, and readiness that knows when Kafka's
//! transaction coordinator cannot commit.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// Where librdkafka itself, with `partitioner`, places each key among 6 partitions: written
/// to a topic whose partitions all take records, and read off the delivery reports.
async fn placed_by_librdkafka(
    bootstrap: &str,
    topic: &str,
    partitioner: &str,
    keys: &[String],
) -> BTreeMap<String, i32> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", partitioner)
        .create()
        .unwrap();
    let mut placed = BTreeMap::new();
    for key in keys {
        let delivered = producer
            .send(
                FutureRecord::to(topic).key(key).payload("x"),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("placing {key}: {e}"));
        placed.insert(key.clone(), delivered.partition);
    }
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_refusals_follow_the_partitioner_and_readiness_follows_the_committer() {
    let mut cluster = kafka::Cluster::start(kafka::Spec {
        brokers: 3,
        controllers: 1,
        ..Default::default()
    })
    .await;
    let bootstrap = cluster.bootstrap();

    // Even partitions on brokers 1 and 2, odd ones on 1 and 3; min.insync.replicas=2. Once
    // broker 3 is down, the odd ones take no records (Kafka holds a partition to the lesser
    // of min.insync.replicas and its replica count: two here).
    let split = unique_topic("split");
    let assignment: Vec<&[i32]> = (0..6)
        .map(|p| if p % 2 == 0 { &[1, 2][..] } else { &[1, 3][..] })
        .collect();
    cluster
        .create_topic_assigned(&split, &assignment, &[("min.insync.replicas", "2")])
        .await;
    cluster.stop(3);
    let oracle = unique_topic("oracle");
    cluster
        .create_topic_assigned(&oracle, &[&[1][..]; 6], &[])
        .await;
    let tickets: Vec<String> = (0..24).map(|i| format!("ticket-{i}")).collect();

    for partitioner in ["consistent", "fnv1a", "murmur2_random"] {
        let placed = placed_by_librdkafka(&bootstrap, &oracle, partitioner, &tickets).await;
        let bridge = Process::spawn(&[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", split.as_str()),
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
            ("TAMIO_BRIDGE__KAFKA__LIBRDKAFKA__PARTITIONER", partitioner),
        ]);
        // Ready, the odd partitions named as unable to take records.
        let started = Instant::now();
        loop {
            let reply = get(bridge.admin, "/readyz").await;
            if reply.status == StatusCode::OK && reply.text().contains(&format!("{split}[5]")) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{}",
                reply.text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (i, ticket) in tickets.iter().enumerate() {
            let started = Instant::now();
            let reply = bridge
                .send(&ticket_event(&format!("{partitioner}-{i}"), ticket, 0))
                .await;
            let took = started.elapsed();
            let partition = placed[ticket];
            if partition % 2 == 0 {
                assert_eq!(
                    reply.status,
                    StatusCode::OK,
                    "{partitioner}, {ticket} -> {partition}: {}",
                    reply.text()
                );
                assert_eq!(
                    reply.json()["partition"],
                    partition,
                    "{partitioner}, {ticket}"
                );
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{partitioner}, {ticket} -> {partition}: {}",
                    reply.text()
                );
                assert!(reply.text().contains("in-sync"), "{}", reply.text());
                assert!(
                    took < Duration::from_secs(1),
                    "{partitioner}, {ticket} -> {partition}: refused after {took:?}, not at once"
                );
            }
        }
    }

    // Exactly once on a topic of broker 1 alone, while the transaction log (three replicas,
    // min.insync.replicas 2) loses broker 2 too: the brokers answer, the topic takes
    // records, and no transaction can end.
    let solo = unique_topic("solo");
    cluster
        .create_topic_assigned(&solo, &[&[1], &[1], &[1]], &[])
        .await;
    let bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", solo.as_str()),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true"),
        ("TAMIO_BRIDGE__KAFKA__TRANSACTIONAL_ID", solo.as_str()),
        ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "4000"),
        ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "5000"),
    ]);
    bridge.wait_ready().await;
    let reply = bridge.send(&ticket_event("solo-0", "ticket-solo", 0)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    cluster.stop(2);
    let stopped = Instant::now();
    let stuck = {
        let url = bridge.url();
        tokio::spawn(async move {
            let body = ticket_event("solo-1", "ticket-solo", 1);
            post_signed(&url, &body, SECRET, now()).await
        })
    };
    let not_ready = loop {
        let reply = get(bridge.admin, "/readyz").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply.text();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "/readyz still ready {:?} after the transaction log lost its in-sync replicas: {}",
            stopped.elapsed(),
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(not_ready.contains("transaction"), "{not_ready}");
    println!(
        "not ready {:?} after the coordinator stalled: {not_ready}",
        stopped.elapsed()
    );
    let answer = stuck.await.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );

    cluster.restart(2).await;
    cluster.restart(3).await;
    let back = Instant::now();
    wait_for_readyz(bridge.admin, StatusCode::OK, Duration::from_secs(60)).await;
    println!(
        "ready again {:?} after brokers 2 and 3 came back",
        back.elapsed()
    );
    let reply = bridge.send(&ticket_event("solo-2", "ticket-solo", 2)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
