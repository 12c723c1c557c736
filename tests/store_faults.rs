//! The shared duplicate store under faults: three bridge processes, each event delivered to
//! one of them and retried on another a little later, while Redis pauses longer than a
//! command's deadline, is killed and started again, fails over to its replica (Sentinel), or
//! loses a master (Cluster). A slow store costs latency, not duplicates; a store that loses
//! its keys or its master brings back only the duplicates docs/guarantees.md lists; nothing answered
//! 200 is ever missing from Kafka.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// A bridge process on `topic` using the store at `redis_url` for its claims.
fn replica(topic: &str, redis_url: &str) -> Process {
    let brokers = brokers();
    Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", brokers.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
        ("TAMIO_BRIDGE__DEDUP__STORE", "redis"),
        ("TAMIO_BRIDGE__DEDUP__REDIS_URL", redis_url),
    ])
}

async fn replicas(topic: &str, redis_url: &str) -> Arc<Vec<Process>> {
    let all: Vec<Process> = (0..3).map(|_| replica(topic, redis_url)).collect();
    for r in &all {
        r.wait_ready().await;
    }
    Arc::new(all)
}

async fn deliver(p: &Process, body: &str) -> Reply {
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    request(
        "POST",
        &p.url(),
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &sig),
        ],
        body.as_bytes().to_vec(),
    )
    .await
    .unwrap_or_else(|e| Reply {
        status: StatusCode::BAD_GATEWAY,
        headers: Default::default(),
        body: e.into_bytes().into(),
    })
}

/// One event's two deliveries.
#[derive(Debug, Clone)]
struct Pair {
    first: StatusCode,
    first_at: Instant,
    retry: StatusCode,
    retry_at: Instant,
    retry_duplicate: bool,
    slowest: Duration,
}

/// What a run of pairs did.
struct Pairs {
    started: Instant,
    pairs: BTreeMap<String, Pair>,
}

impl Pairs {
    fn answers(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for p in self.pairs.values() {
            *counts.entry(p.first.as_str().to_owned()).or_default() += 1;
            *counts.entry(p.retry.as_str().to_owned()).or_default() += 1;
        }
        counts
    }

    fn slowest(&self) -> Duration {
        self.pairs
            .values()
            .map(|p| p.slowest)
            .max()
            .unwrap_or_default()
    }
}

/// Delivers `events` events at a steady rate (one every 12 ms, so that deliveries are in
/// flight at every instant), each to replica `i % 3` and, `lag` later, again to the next one.
async fn pairs(all: &Arc<Vec<Process>>, name: &str, events: usize, lag: Duration) -> Pairs {
    let started = Instant::now();
    let results = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(12));
    for i in 0..events {
        pace.tick().await;
        let (all, results) = (all.clone(), results.clone());
        let id = format!("whev_{name}_{i}");
        tasks.push(tokio::spawn(async move {
            let body = ticket_event(&id, &format!("ticket-{}", i % 40), i);
            let sent = Instant::now();
            let first = deliver(&all[i % 3], &body).await;
            let first_at = Instant::now();
            let first_took = first_at - sent;
            tokio::time::sleep(lag).await;
            let sent = Instant::now();
            let retry = deliver(&all[(i + 1) % 3], &body).await;
            let retry_at = Instant::now();
            let duplicate = retry.status == StatusCode::OK && retry.json()["duplicate"] == true;
            results.lock().unwrap().insert(
                id,
                Pair {
                    first: first.status,
                    first_at,
                    retry: retry.status,
                    retry_at,
                    retry_duplicate: duplicate,
                    slowest: first_took.max(retry_at - sent),
                },
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pairs = results.lock().unwrap().clone();
    Pairs { started, pairs }
}

/// Records per event id in `topic`.
async fn records_per_event(topic: &str, at_least: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in read_topic(topic, at_least).await {
        *counts.entry(r.headers["event_id"].clone()).or_default() += 1;
    }
    counts
}

async fn store_errors(all: &[Process]) -> f64 {
    let mut sum = 0.0;
    for p in all {
        sum += p.metric("tamio_bridge_dedup_store_errors_total").await;
    }
    sum
}

/// Every event written at least once; returns the events written twice, and fails on more.
fn written_twice(counts: &BTreeMap<String, usize>, run: &Pairs) -> Vec<String> {
    let missing: Vec<&String> = run
        .pairs
        .keys()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "not in Kafka: {missing:?}");
    let thrice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 2).collect();
    assert!(thrice.is_empty(), "written more than twice: {thrice:?}");
    counts
        .iter()
        .filter(|(_, n)| **n == 2)
        .map(|(id, _)| id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_longer_than_a_command_deadline_costs_latency_not_duplicates() {
    let redis = OwnRedis::start().await;
    let topic = unique_topic("store-paused");
    create_topic(&topic, 3).await;
    let all = replicas(&topic, &redis.url()).await;
    let port = redis.port;
    // Three pauses of 600 ms, each more than twice dedup.redis_timeout_ms (250).
    // Off the test's runtime: the command waits out the pause itself.
    let pauses = tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1500));
            common::redis_server::pause(port, 600);
        }
    });
    let run = pairs(&all, "paused", 1_000, Duration::from_millis(700)).await;
    pauses.await.unwrap();
    let counts = records_per_event(&topic, 1_000).await;
    let twice = written_twice(&counts, &run);
    let duplicates = run.pairs.values().filter(|p| p.retry_duplicate).count();
    println!(
        "1,000 events, each retried on another replica, Redis paused 3 x 600 ms: {} records, \
         {} written twice, answers {:?}, {duplicates} retries answered as duplicates, slowest \
         answer {} ms, store errors {}, in {:.1} s",
        counts.values().sum::<usize>(),
        twice.len(),
        run.answers(),
        run.slowest().as_millis(),
        store_errors(&all).await,
        run.started.elapsed().as_secs_f64(),
    );
    assert_eq!(
        run.answers().keys().collect::<Vec<_>>(),
        ["200"],
        "{:?}",
        run.answers()
    );
    assert!(twice.is_empty(), "written twice: {twice:?}");
    assert_eq!(counts.values().sum::<usize>(), 1_000);
    assert_eq!(duplicates, 1_000, "every retry is answered as a duplicate");
    assert!(store_errors(&all).await > 0.0, "the pauses were not felt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_loses_nothing_and_brings_back_only_what_it_forgot() {
    let mut redis = OwnRedis::start().await;
    let topic = unique_topic("store-killed");
    create_topic(&topic, 3).await;
    let all = replicas(&topic, &redis.url()).await;
    let (killed_at, back_at) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
    let fault = {
        let (killed_at, back_at) = (killed_at.clone(), back_at.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            redis.kill();
            *killed_at.lock().unwrap() = Some(Instant::now());
            tokio::time::sleep(Duration::from_millis(1500)).await;
            redis.restart().await;
            *back_at.lock().unwrap() = Some(Instant::now());
            redis
        })
    };
    let run = pairs(&all, "killed", 1_000, Duration::from_millis(700)).await;
    let _redis = fault.await.unwrap();
    let (killed_at, back_at) = (
        killed_at.lock().unwrap().unwrap(),
        back_at.lock().unwrap().unwrap(),
    );
    let counts = records_per_event(&topic, 1_000).await;
    let twice = written_twice(&counts, &run);
    // Which events could be written twice: those whose first delivery's claim or
    // acknowledgement Redis could have lost (acknowledged before it came back) and whose
    // retry reached another replica while it was down or after it came back empty.
    let exposed: Vec<&String> = run
        .pairs
        .iter()
        .filter(|(_, p)| p.first_at < back_at && p.retry_at > killed_at)
        .map(|(id, _)| id)
        .collect();
    let unexpected: Vec<&String> = twice.iter().filter(|id| !exposed.contains(id)).collect();
    println!(
        "1,000 events, Redis killed for 1.5 s and started empty: {} records, {} written \
         twice (of {} exposed: acknowledged before it was back and retried after it was \
         killed), answers {:?}, slowest answer {} ms, store errors {}",
        counts.values().sum::<usize>(),
        twice.len(),
        exposed.len(),
        run.answers(),
        run.slowest().as_millis(),
        store_errors(&all).await,
    );
    assert_eq!(
        run.answers().keys().collect::<Vec<_>>(),
        ["200"],
        "{:?}",
        run.answers()
    );
    assert!(
        unexpected.is_empty(),
        "written twice without cause: {unexpected:?}"
    );
    // Back without a restart of the bridges: retries on other replicas are duplicates again.
    let late = pairs(&all, "after-restart", 30, Duration::from_millis(100)).await;
    assert!(
        late.pairs.values().all(|p| p.retry_duplicate),
        "suppression did not resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_loses_nothing_and_suppression_resumes() {
    let mut setup = OwnSentinel::start().await;
    let topic = unique_topic("store-sentinel");
    create_topic(&topic, 3).await;
    let all = replicas(&topic, &setup.url()).await;
    let old_master = setup.master.port;
    let killed_at = Instant::now() + Duration::from_secs(2);
    let run = {
        let load = pairs(&all, "sentinel", 1_000, Duration::from_millis(700));
        let kill = async {
            tokio::time::sleep_until(killed_at.into()).await;
            setup.master.kill();
        };
        let (run, ()) = tokio::join!(load, kill);
        run
    };
    // The sentinels name the replica now.
    let started = Instant::now();
    while setup.master_port() == Some(old_master) {
        assert!(started.elapsed() < Duration::from_secs(20), "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = records_per_event(&topic, 1_000).await;
    let twice = written_twice(&counts, &run);
    let late = pairs(&all, "after-failover", 30, Duration::from_millis(100)).await;
    println!(
        "1,000 events, the master killed 2 s in, failover to the replica: {} records, {} \
         written twice, answers {:?}, slowest answer {} ms, store errors {}; after the \
         failover {} of 30 retries were duplicates",
        counts.values().sum::<usize>(),
        twice.len(),
        run.answers(),
        run.slowest().as_millis(),
        store_errors(&all).await,
        late.pairs.values().filter(|p| p.retry_duplicate).count(),
    );
    assert_eq!(
        run.answers().keys().collect::<Vec<_>>(),
        ["200"],
        "{:?}",
        run.answers()
    );
    assert!(
        late.pairs.values().all(|p| p.retry_duplicate),
        "suppression did not resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_loses_a_master_under_load_loses_nothing_and_suppression_resumes() {
    let mut cluster = OwnCluster::start().await;
    let topic = unique_topic("store-cluster");
    create_topic(&topic, 3).await;
    let all = replicas(&topic, &cluster.url()).await;
    // Without a fault first: every retry suppressed, across the slots of all masters.
    let calm = pairs(&all, "cluster-calm", 300, Duration::from_millis(200)).await;
    let calm_duplicates = calm.pairs.values().filter(|p| p.retry_duplicate).count();
    assert_eq!(
        calm_duplicates, 300,
        "every retry suppressed on a healthy cluster"
    );

    let victim = cluster.a_master();
    let run = {
        let load = pairs(&all, "cluster", 1_000, Duration::from_millis(700));
        let kill = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster.nodes[victim].kill();
        };
        let (run, ()) = tokio::join!(load, kill);
        run
    };
    cluster.wait_ok(Duration::from_secs(30)).await;
    let counts = records_per_event(&topic, 1_000).await;
    let twice = written_twice(&counts, &run);
    let late = pairs(
        &all,
        "after-cluster-failover",
        30,
        Duration::from_millis(100),
    )
    .await;
    println!(
        "1,000 events on a 3-master cluster, a master killed 2 s in (its replica takes \
         over): {} records, {} written twice, answers {:?}, slowest answer {} ms, store \
         errors {}; after the failover {} of 30 retries were duplicates",
        counts.values().sum::<usize>(),
        twice.len(),
        run.answers(),
        run.slowest().as_millis(),
        store_errors(&all).await,
        late.pairs.values().filter(|p| p.retry_duplicate).count(),
    );
    assert_eq!(
        run.answers().keys().collect::<Vec<_>>(),
        ["200"],
        "{:?}",
        run.answers()
    );
    assert!(
        late.pairs.values().all(|p| p.retry_duplicate),
        "suppression did not resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_stores_writes_through_a_pause() {
    let redis = OwnRedis::start().await;
    let broker = OwnBroker::start().await;
    let topic = unique_topic("store-sigterm");
    broker.create_topic(&topic, 3).await;
    let bootstrap = broker.address();
    let url = redis.url();
    let spawn = || {
        Process::spawn(&[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
            ("TAMIO_BRIDGE__DEDUP__STORE", "redis"),
            ("TAMIO_BRIDGE__DEDUP__REDIS_URL", url.as_str()),
        ])
    };
    let first = spawn();
    first.wait_ready().await;
    // Deliveries claimed in the store and waiting for Kafka, which is frozen.
    broker.freeze();
    const N: usize = 30;
    let bodies: Vec<String> = (0..N)
        .map(|i| ticket_event(&format!("whev_sigterm_{i}"), &format!("tk-{i}"), i))
        .collect();
    let first = Arc::new(first);
    let mut sent = Vec::new();
    for body in bodies.clone() {
        let first = first.clone();
        sent.push(tokio::spawn(async move { deliver(&first, &body).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The store pauses (a fork, a failover) as the bridge is told to stop and Kafka comes
    // back: the acknowledgements of the deliveries it finishes wait behind the pause.
    redis.pause(3000);
    first.signal("TERM");
    broker.thaw();
    for answer in sent {
        assert_eq!(answer.await.unwrap().status, StatusCode::OK);
    }
    let mut first = Arc::into_inner(first).expect("no other handle");
    let code = tokio::task::spawn_blocking(move || first.wait(Duration::from_secs(40)))
        .await
        .unwrap();
    assert_eq!(code, 0);

    // Another replica takes the same events as duplicates: their acknowledgements reached
    // the store before the first one exited.
    let second = spawn();
    second.wait_ready().await;
    for body in &bodies {
        let reply = deliver(&second, body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["duplicate"], true, "{}", reply.text());
    }
    let records = read_topic_from(
        &bootstrap,
        &topic,
        N,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), N, "each event once");
}
