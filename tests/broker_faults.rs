//! The bridge through Apache Kafka's own faults: three brokers beside three KRaft
//! controllers (the layout managed clusters run), topics with three replicas and
//! `min.insync.replicas=2`, the release binary at its defaults, eight signed senders that
//! retry every answer but 200, and a checker that reads each topic back. The faults, in
//! turn, each on a topic of its own:
//! - a partition's leader killed (SIGKILL), then started again;
//! - a rolling restart of every broker (SIGTERM, Kafka's controlled shutdown);
//! - two brokers down (too few in-sync replicas), then one back;
//! - the active controller killed;
//! - a leader frozen (SIGSTOP) for longer than the request deadline;
//! - every broker down for longer than the delivery timeout, then back.
//!
//! For each: every event answered 200 is in Kafka, in its ticket's order; what was written
//! twice is counted (at least once, see README Guarantees), and is none with
//! `kafka.exactly_once` (a leader killed, a leader frozen, every broker down); deliveries are not refused in
//! under a second while the cluster can take their records; `/readyz` is not ready only
//! while no partition can take records, without flapping. Each fault's figures are printed
//! (the README's fault table).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kafka::{Cluster, Spec};
use common::*;
use http::StatusCode;

const SENDERS: usize = 8;

/// What `/readyz` said during a fault.
#[derive(Debug, Default)]
struct ReadyWatch {
    not_ready: Duration,
    /// Changes between ready and not ready.
    flips: usize,
    reasons: Vec<String>,
}

/// Polls `/readyz` every 100 ms until `stop`.
fn watch_readiness(
    admin: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<ReadyWatch> {
    tokio::spawn(async move {
        let mut watch = ReadyWatch::default();
        let mut last: Option<bool> = None;
        let mut at = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let reply = get(admin, "/readyz").await;
            let ready = reply.status == StatusCode::OK;
            let now = Instant::now();
            if last == Some(false) {
                watch.not_ready += now - at;
            }
            if last.is_some_and(|l| l != ready) {
                watch.flips += 1;
            }
            if !ready {
                let reason = reply.json()["reason"].as_str().unwrap_or("").to_owned();
                if !watch.reasons.contains(&reason) && watch.reasons.len() < 4 {
                    watch.reasons.push(reason);
                }
            }
            last = Some(ready);
            at = now;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watch
    })
}

/// One fault's figures.
#[derive(Debug)]
struct Row {
    fault: &'static str,
    acked: usize,
    lost: usize,
    twice: usize,
    non_200: usize,
    /// Of those, answered in under a second.
    non_200_fast: usize,
    non_200_median: Duration,
    slowest: Duration,
    ready: ReadyWatch,
    /// `tamio_bridge_kafka_producer_restarts_total` after the fault.
    restarts: f64,
}

impl Row {
    fn print(&self) {
        println!(
            "| {} | {} | {} | {} | {} ({} in < 1 s, median {:.1} s) | {:.1} s | {:.1} s, {} flips{} | {} |",
            self.fault,
            self.acked,
            self.lost,
            self.twice,
            self.non_200,
            self.non_200_fast,
            self.non_200_median.as_secs_f64(),
            self.slowest.as_secs_f64(),
            self.ready.not_ready.as_secs_f64(),
            self.ready.flips,
            if self.ready.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.ready.reasons.join("; "))
            },
            self.restarts
        );
    }
}

/// The faults, in the order they run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    LeaderKill,
    RollingRestart,
    TwoBrokersDown,
    ControllerKill,
    LeaderFreeze,
    AllBrokersDown,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::LeaderKill => "leader SIGKILL + restart",
            Fault::RollingRestart => "rolling restart (SIGTERM), every broker",
            Fault::TwoBrokersDown => "two brokers down 20 s, then one back",
            Fault::ControllerKill => "active controller SIGKILL",
            Fault::LeaderFreeze => "leader SIGSTOP 15 s",
            Fault::AllBrokersDown => "every broker down 25 s, then back",
        }
    }

    fn exactly_once_name(self) -> &'static str {
        match self {
            Fault::LeaderKill => "exactly once: leader SIGKILL + restart",
            Fault::RollingRestart => "exactly once: rolling restart (SIGTERM), every broker",
            Fault::TwoBrokersDown => "exactly once: two brokers down 20 s, then one back",
            Fault::ControllerKill => "exactly once: active controller SIGKILL",
            Fault::LeaderFreeze => "exactly once: leader SIGSTOP 15 s",
            Fault::AllBrokersDown => "exactly once: every broker down 25 s, then back",
        }
    }

    /// Whether the cluster can take every partition's records all along (a leader moves).
    fn cluster_can_take(self) -> bool {
        !matches!(self, Fault::TwoBrokersDown | Fault::AllBrokersDown)
    }

    async fn inject(self, cluster: &mut Cluster, topic: &str, acked: &AtomicUsize) {
        match self {
            Fault::LeaderKill => {
                let leader = leader_of(cluster, topic).await;
                cluster.kill(leader);
                wait_acked(acked, 1500).await;
                cluster.restart(leader).await;
                cluster.wait_brokers(3).await;
            }
            Fault::RollingRestart => {
                for id in 1..=3 {
                    cluster.stop(id);
                    cluster.restart(id).await;
                    cluster.wait_brokers(3).await;
                    // The restarted broker catches up before the next goes.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
            Fault::TwoBrokersDown => {
                cluster.kill(2);
                cluster.kill(3);
                tokio::time::sleep(Duration::from_secs(20)).await;
                cluster.restart(2).await;
                tokio::time::sleep(Duration::from_secs(10)).await;
                cluster.restart(3).await;
                cluster.wait_brokers(3).await;
            }
            Fault::ControllerKill => {
                let controller = cluster.active_controller().expect("an active controller");
                cluster.kill(controller);
                wait_acked(acked, 1500).await;
                cluster.restart(controller).await;
            }
            Fault::LeaderFreeze => {
                let leader = leader_of(cluster, topic).await;
                cluster.freeze(leader);
                tokio::time::sleep(Duration::from_secs(15)).await;
                cluster.thaw(leader);
                cluster.wait_brokers(3).await;
            }
            Fault::AllBrokersDown => {
                for id in 1..=3 {
                    cluster.kill(id);
                }
                tokio::time::sleep(Duration::from_secs(25)).await;
                for id in 1..=3 {
                    cluster.node(id).launch_only();
                }
                for id in 1..=3 {
                    cluster.node(id).wait_started().await;
                }
                cluster.wait_brokers(3).await;
            }
        }
    }
}

/// Runs the senders against a bridge on a topic of its own while `fault` runs, then checks
/// the topic.
async fn under_load(cluster: &mut Cluster, fault: Fault, exactly_once: bool) -> Row {
    let name = if exactly_once {
        fault.exactly_once_name()
    } else {
        fault.name()
    };
    let topic = unique_topic("faults");
    cluster
        .create_topic_with(&topic, 6, 3, &[("min.insync.replicas", "2")])
        .await;
    let bootstrap = cluster.bootstrap();
    let mut env = vec![
        ("TAMIO_BRIDGE__KAFKA__BROKERS", bootstrap.as_str()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic.as_str()),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
    ];
    if exactly_once {
        env.push(("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true"));
        env.push(("TAMIO_BRIDGE__KAFKA__TRANSACTIONAL_ID", topic.as_str()));
    }
    let bridge = Process::spawn(&env);
    bridge.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let load = Load {
        url: format!("http://{}/webhooks/tamio", bridge.addr),
        tickets: SENDERS,
        per_ticket: 1_000_000,
        max_attempts: 10_000,
        retry_pause: Duration::from_millis(200),
        until: Some(stop.clone()),
    };
    let run = {
        let acked = acked.clone();
        tokio::spawn(async move { load.run(acked).await })
    };
    let ready_stop = Arc::new(AtomicBool::new(false));
    let readiness = watch_readiness(bridge.admin, ready_stop.clone());
    // Steady load before the fault.
    while acked.load(Ordering::SeqCst) < 300 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fault.inject(cluster, &topic, &acked).await;
    // Steady again after it: every sender has delivered since.
    let after = acked.load(Ordering::SeqCst);
    let settled = Instant::now();
    while acked.load(Ordering::SeqCst) < after + 300 {
        assert!(
            settled.elapsed() < Duration::from_secs(90),
            "{name}: no deliveries after the fault"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let report = run.await.unwrap();
    ready_stop.store(true, Ordering::SeqCst);
    let ready = readiness.await.unwrap();
    let restarts = sample(
        &get(bridge.admin, "/metrics").await.text(),
        "tamio_bridge_kafka_producer_restarts_total",
    );
    let findings = check_losses(&bootstrap, &topic, &report).await;
    findings.assert_nothing_lost(&report);
    let mut refused: Vec<Duration> = report
        .timings
        .iter()
        .filter(|(_, _, status)| *status != 200)
        .map(|(_, took, _)| *took)
        .collect();
    refused.sort();
    let row = Row {
        fault: name,
        acked: findings.acked,
        lost: findings.missing.len(),
        twice: findings.duplicates,
        non_200: refused.len(),
        non_200_fast: refused
            .iter()
            .filter(|d| **d < Duration::from_secs(1))
            .count(),
        non_200_median: refused.get(refused.len() / 2).copied().unwrap_or_default(),
        slowest: report
            .timings
            .iter()
            .map(|(_, took, _)| *took)
            .max()
            .unwrap_or_default(),
        ready,
        restarts,
    };
    row.print();
    drop(bridge);
    row
}

/// The broker that leads partition 0 of `topic`.
async fn leader_of(cluster: &Cluster, topic: &str) -> u32 {
    let bootstrap = cluster.internal_bootstrap();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        md.topics()[0].partitions()[0].leader() as u32
    })
    .await
    .unwrap()
}

async fn wait_acked(acked: &AtomicUsize, more: usize) {
    let from = acked.load(Ordering::SeqCst);
    let started = Instant::now();
    while acked.load(Ordering::SeqCst) < from + more && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_ride_through_kafkas_own_faults() {
    let mut cluster = Cluster::start(Spec {
        brokers: 3,
        controllers: 3,
        heap: "320m",
        ..Default::default()
    })
    .await;
    println!(
        "| fault | acked | lost | twice | non-200 | slowest | /readyz not ready | producer replaced |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for fault in [
        Fault::LeaderKill,
        Fault::RollingRestart,
        Fault::TwoBrokersDown,
        Fault::ControllerKill,
        Fault::LeaderFreeze,
        Fault::AllBrokersDown,
    ] {
        rows.push((fault, under_load(&mut cluster, fault, false).await));
    }
    // With kafka.exactly_once: what a read_committed consumer reads holds each acknowledged
    // event once, whatever the sender retried.
    let mut exactly_once = Vec::new();
    for fault in [
        Fault::LeaderKill,
        Fault::LeaderFreeze,
        Fault::AllBrokersDown,
    ] {
        exactly_once.push((fault, under_load(&mut cluster, fault, true).await));
    }
    println!();
    for (_, row) in rows.iter().chain(&exactly_once) {
        row.print();
    }
    for (_, row) in &exactly_once {
        assert_eq!(row.lost, 0, "{row:?}");
        assert_eq!(row.twice, 0, "written twice with exactly once: {row:?}");
    }
    for (fault, row) in &rows {
        assert_eq!(row.lost, 0, "{row:?}");
        // Not ready only while no partition could take records, and without flapping.
        assert!(row.ready.flips <= 2, "/readyz flapped: {row:?}");
        if let Fault::TwoBrokersDown = fault {
            // Too few in-sync replicas: refused at once, not held for the delivery timeout.
            assert!(
                row.non_200_median < Duration::from_secs(1),
                "too few in-sync replicas were not refused at once: {row:?}"
            );
        }
        if fault.cluster_can_take() {
            assert_eq!(
                row.non_200_fast, 0,
                "refused in under a second while the cluster could take the records: {row:?}"
            );
            assert_eq!(
                row.ready.flips, 0,
                "not ready while the cluster could take the records: {row:?}"
            );
        }
    }
}
