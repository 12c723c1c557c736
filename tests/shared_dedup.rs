//! Duplicate suppression shared by replicas: three bridge processes on one Redis and one
//! broker. A retry that reaches another replica, the same id sent to all three at once, a
//! replica restarted, and Redis killed under load and started again.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// A bridge process on `topic` using the Redis at `redis_url` for its claims.
fn replica(topic: &str, redis_url: &str, extra: &[(&str, &str)]) -> Process {
    let brokers = brokers();
    let mut env = vec![
        ("TAMIO_BRIDGE__KAFKA__BROKERS", brokers.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__DEDUP__STORE", "redis"),
        ("TAMIO_BRIDGE__DEDUP__REDIS_URL", redis_url),
    ];
    env.extend_from_slice(extra);
    Process::spawn(&env)
}

async fn replicas(topic: &str, redis_url: &str) -> Vec<Process> {
    let all: Vec<Process> = (0..3).map(|_| replica(topic, redis_url, &[])).collect();
    for r in &all {
        r.wait_ready().await;
    }
    all
}

fn ids(records: &[Record]) -> Vec<String> {
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.headers["event_id"].clone())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_reaches_another_replica_writes_nothing() {
    let redis = OwnRedis::start().await;
    let topic = unique_topic("shared-retry");
    create_topic(&topic, 3).await;
    let all = replicas(&topic, &redis.url()).await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let id = format!("whev_shared_{i}");
        let body = ticket_event(&id, &format!("ticket-{}", i % 5), i);
        let first = all[i % 3].send(&body).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        let first = first.json();
        assert_eq!(first["duplicate"], false);
        // The sender's retry lands on the next replica, and on the one after.
        for step in 1..3 {
            let retry = all[(i + step) % 3].send(&body).await;
            assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
            let retry = retry.json();
            assert_eq!(
                retry["duplicate"],
                true,
                "{id} on replica {}",
                (i + step) % 3
            );
            assert_eq!(retry["partition"], first["partition"]);
            assert_eq!(retry["offset"], first["offset"]);
        }
        expected.push(id);
    }
    let records = read_topic(&topic, expected.len()).await;
    expected.sort();
    assert_eq!(ids(&records), expected, "one record per event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_sent_to_all_three_replicas_at_once_is_written_once() {
    let redis = OwnRedis::start().await;
    let topic = unique_topic("shared-race");
    create_topic(&topic, 3).await;
    let all = Arc::new(replicas(&topic, &redis.url()).await);
    let mut expected = Vec::new();
    for i in 0..20 {
        let id = format!("whev_race_{i}");
        let body = Arc::new(ticket_event(&id, "ticket-race", i));
        let sends: Vec<_> = (0..3)
            .map(|r| {
                let (all, body) = (all.clone(), body.clone());
                tokio::spawn(async move { all[r].send(&body).await })
            })
            .collect();
        let mut fresh = 0;
        for send in sends {
            let reply = send.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{id}: {}", reply.text());
            if reply.json()["duplicate"] == false {
                fresh += 1;
            }
        }
        assert_eq!(
            fresh, 1,
            "{id}: one delivery writes, the others are duplicates"
        );
        expected.push(id);
    }
    let records = read_topic(&topic, expected.len()).await;
    expected.sort();
    assert_eq!(ids(&records), expected, "one record per event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_still_suppresses_a_retry_it_acknowledged_before() {
    let redis = OwnRedis::start().await;
    let topic = unique_topic("shared-restart");
    create_topic(&topic, 3).await;
    let mut bridge = replica(&topic, &redis.url(), &[]);
    bridge.wait_ready().await;
    let body = ticket_event("whev_restart", "ticket-restart", 0);
    let first = bridge.send(&body).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    bridge.signal("TERM");
    assert_eq!(bridge.wait(Duration::from_secs(30)), 0);

    let again = replica(&topic, &redis.url(), &[]);
    again.wait_ready().await;
    let retry = again.send(&body).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
    assert_eq!(retry.json()["duplicate"], true, "{}", retry.text());
    assert_eq!(retry.json()["offset"], first.json()["offset"]);
    let records = read_topic(&topic, 1).await;
    assert_eq!(ids(&records), ["whev_restart"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_loses_nothing_and_suppression_resumes() {
    let mut redis = OwnRedis::start().await;
    let topic = unique_topic("shared-redis-down");
    create_topic(&topic, 3).await;
    let all = replicas(&topic, &redis.url()).await;

    let load = Load {
        url: all[0].url(),
        tickets: 24,
        per_ticket: 40,
        max_attempts: 100,
        retry_pause: Duration::from_millis(50),
        until: None,
    };
    let acked = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let acked = acked.clone();
        async move { load.run(acked).await }
    });
    while acked.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.kill();
    let down_at = acked.load(Ordering::SeqCst);
    while acked.load(Ordering::SeqCst) < down_at + 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.restart().await;
    let report = run.await.unwrap();

    // Redis is an optimisation, Kafka the contract: every delivery was taken, and every
    // acknowledged event is in Kafka.
    assert_eq!(
        report.answers.keys().collect::<Vec<_>>(),
        ["200"],
        "{:?}",
        report.answers
    );
    check_losses(&brokers(), &topic, &report)
        .await
        .assert_nothing_lost(&report);
    let errors = all[0].metric("tamio_bridge_dedup_store_errors_total").await;
    assert!(errors > 0.0, "no store error was counted");
    println!("store errors counted while Redis was down: {errors}");

    // Back without a restart of the bridges: a retry on another replica is a duplicate again.
    let started = Instant::now();
    while all[0].metric("tamio_bridge_dedup_store_up").await < 1.0
        || all[1].metric("tamio_bridge_dedup_store_up").await < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store was not used again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = ticket_event("whev_after_redis", "ticket-after", 0);
    assert_eq!(all[0].send(&body).await.status, StatusCode::OK);
    let retry = all[1].send(&body).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
    assert_eq!(retry.json()["duplicate"], true, "{}", retry.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_falls_back_to_memory_or_refuses_as_set() {
    let topic = unique_topic("shared-none");
    create_topic(&topic, 1).await;
    // Nothing listens there.
    let port = free_port();
    let nowhere = format!("redis://127.0.0.1:{port}");
    let local = replica(&topic, &nowhere, &[]);
    let refusing = replica(
        &topic,
        &nowhere,
        &[("TAMIO_BRIDGE__DEDUP__ON_STORE_ERROR", "refuse")],
    );
    local.wait_ready().await;
    refusing.wait_ready().await;

    let body = ticket_event("whev_no_store", "ticket-none", 0);
    let taken = local.send(&body).await;
    assert_eq!(taken.status, StatusCode::OK, "{}", taken.text());
    // Still suppressed within the process.
    let again = local.send(&body).await;
    assert_eq!(again.json()["duplicate"], true, "{}", again.text());
    assert!(local.metric("tamio_bridge_dedup_store_errors_total").await > 0.0);
    assert_eq!(local.metric("tamio_bridge_dedup_store_up").await, 0.0);
    // Readiness is Kafka's alone.
    assert_eq!(get(local.admin, "/readyz").await.status, StatusCode::OK);

    let mut refused = refusing
        .send(&ticket_event("whev_refused", "ticket-none", 1))
        .await;
    // The first delivery finds the store down; any later one is refused at once.
    if refused.status == StatusCode::OK {
        refused = refusing
            .send(&ticket_event("whev_refused_2", "ticket-none", 2))
            .await;
    }
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["error"], "dedup_store_unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    let log = local.log_text();
    assert_eq!(
        log.matches("the shared duplicate store is unavailable")
            .count(),
        1,
        "the transition is logged once"
    );
}
