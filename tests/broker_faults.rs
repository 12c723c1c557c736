//! The bridge through Apache Kafka's own faults: three brokers beside three KRaft
//! controllers (the layout managed clusters run), topics with three replicas and
//! `min.insync.replicas=2`, the release binary at its defaults, and under each fault two
//! bridges at once, one at least once and one with `kafka.exactly_once`, each with eight
//! signed senders that retry every answer but 200 and a topic of its own read back after.
//! The faults, in turn:
//! - a partition's leader killed (SIGKILL), then started again;
//! - a rolling restart of every broker (SIGTERM, Kafka's controlled shutdown), each broker
//!   stopped once the one before it is back in every in-sync replica set;
//! - two brokers down (too few in-sync replicas), then one back, then the other;
//! - the active controller (the metadata quorum's leader, as Kafka names it) killed;
//! - a leader frozen (SIGSTOP) for longer than the request deadline;
//! - every broker down for longer than the request deadline, then back.
//!
//! Every answer of every sender is held to the bounds the fault table of docs/guarantees.md
//! states: within a sender's patience (10 s) always; a graceful restart or a controller's death
//! costs nothing (every answer 200, the slowest under 3 s and 2 s); a dead or frozen leader costs at
//! most Kafka's own detection; while Kafka cannot take records, refusals within a second of
//! the probe knowing, `/readyz` not ready and back; nothing acknowledged lost, each ticket in
//! order, and a record written twice only after its sender was refused (none with exactly
//! once). Each row's figures are printed: docs/guarantees.md's table is this output.
//! `TAMIO_FAULTS=RollingRestart,LeaderFreeze` runs some faults only, and
//! `TAMIO_FAULTS_LOG=DIR` keeps each bridge's log there, with librdkafka's debug contexts of
//! `TAMIO_FAULTS_DEBUG` (e.g. `broker,topic,msg`) in it (for work on one).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kafka::{Cluster, Spec};
use common::*;
use http::StatusCode;

/// The probe's round while Kafka cannot take records (`kafka.readiness_interval_ms` at its
/// default, 500 ms at most while failing).
const PROBE_ROUND: Duration = Duration::from_millis(500);

const SENDERS: usize = 8;

/// How long a webhook sender waits for its answer (many give up after 10 s).
const PATIENCE: Duration = Duration::from_secs(10);

/// What `/readyz` said during a fault, with the times it changed.
#[derive(Debug, Default)]
struct ReadyWatch {
    not_ready: Duration,
    /// Changes between ready and not ready.
    flips: usize,
    /// The first time it was not ready, or named partitions that cannot take records.
    first_refusing: Option<Instant>,
    ready_at_end: bool,
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
            let degraded = reply.json()["degraded"]
                .as_array()
                .is_some_and(|d| !d.is_empty());
            if !ready || degraded {
                watch.first_refusing.get_or_insert(now);
            }
            if !ready {
                let reason = reply.json()["reason"].as_str().unwrap_or("").to_owned();
                let reason: String = reason.chars().take(140).collect();
                if !watch.reasons.contains(&reason) && watch.reasons.len() < 3 {
                    watch.reasons.push(reason);
                }
            }
            watch.ready_at_end = ready;
            last = Some(ready);
            at = now;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watch
    })
}

/// The faults, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    LeaderKill,
    RollingRestart,
    TwoBrokersDown,
    ControllerKill,
    LeaderFreeze,
    AllBrokersDown,
}

const FAULTS: [Fault; 6] = [
    Fault::LeaderKill,
    Fault::RollingRestart,
    Fault::TwoBrokersDown,
    Fault::ControllerKill,
    Fault::LeaderFreeze,
    Fault::AllBrokersDown,
];

/// When a fault began, and when the brokers it took were all back.
struct FaultTimes {
    began: Instant,
    back: Instant,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::LeaderKill => "a partition's leader SIGKILLed, then restarted",
            Fault::RollingRestart => "rolling restart of every broker (SIGTERM)",
            Fault::TwoBrokersDown => {
                "two brokers down 20 s (ISR 1 < 2), then one back, then the other"
            }
            Fault::ControllerKill => "the active controller SIGKILLed",
            Fault::LeaderFreeze => "a leader frozen (SIGSTOP) 15 s",
            Fault::AllBrokersDown => "every broker down 25 s, then back",
        }
    }

    /// Whether the cluster can take every partition's records all along (a leader moves).
    fn cluster_can_take(self) -> bool {
        !matches!(self, Fault::TwoBrokersDown | Fault::AllBrokersDown)
    }

    async fn inject(self, cluster: &mut Cluster, topic: &str, acked: &AtomicUsize) -> FaultTimes {
        let began = Instant::now();
        match self {
            Fault::LeaderKill => {
                let leader = leader_of(cluster, topic).await;
                cluster.kill(leader);
                wait_acked(acked, 1500, "the leader's death").await;
                cluster.restart(leader).await;
                cluster.wait_brokers(3).await;
            }
            Fault::RollingRestart => {
                for id in 1..=3 {
                    cluster.stop(id);
                    cluster.restart(id).await;
                    cluster.wait_brokers(3).await;
                    // As an operator does: the next broker goes once this one is back in
                    // every in-sync replica set.
                    wait_fully_replicated(cluster).await;
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
                let controller = cluster.active_controller().await;
                cluster.kill(controller);
                wait_acked(acked, 1500, "the controller's death").await;
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
                let back = Instant::now();
                cluster.wait_brokers(3).await;
                return FaultTimes { began, back };
            }
        }
        FaultTimes {
            began,
            back: Instant::now(),
        }
    }
}

/// One bridge under load: its topic, senders and readiness watch.
struct Loaded {
    exactly_once: bool,
    topic: String,
    bridge: Process,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    run: tokio::task::JoinHandle<LoadReport>,
    ready_stop: Arc<AtomicBool>,
    readiness: tokio::task::JoinHandle<ReadyWatch>,
}

async fn start_load(cluster: &Cluster, exactly_once: bool) -> Loaded {
    let topic = unique_topic(if exactly_once { "faults-eo" } else { "faults" });
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
    // For work on a fault: librdkafka's debug contexts (`broker,topic,msg`) in its log.
    let debug = std::env::var("TAMIO_FAULTS_DEBUG").unwrap_or_default();
    if !debug.is_empty() {
        env.push(("TAMIO_BRIDGE__KAFKA__LIBRDKAFKA__DEBUG", debug.as_str()));
        env.push(("RUST_LOG", "info,librdkafka=debug,rdkafka=debug"));
    }
    let bridge = Process::spawn(&env);
    bridge.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let load = Load {
        url: bridge.url(),
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
    Loaded {
        exactly_once,
        topic,
        bridge,
        acked,
        stop,
        run,
        ready_stop,
        readiness,
    }
}

/// One bridge's figures under one fault.
#[derive(Debug)]
struct Row {
    fault: Fault,
    exactly_once: bool,
    acked: usize,
    lost: usize,
    twice: usize,
    non_200: usize,
    slowest: Duration,
    slowest_200: Duration,
    ready: ReadyWatch,
    restarts: f64,
    /// The bounds it broke.
    broken: Vec<String>,
}

impl Row {
    fn print(&self) {
        let ready = if self.ready.flips == 0 {
            "0".to_owned()
        } else {
            format!(
                "{:.1} s, {} flips",
                self.ready.not_ready.as_secs_f64(),
                self.ready.flips
            )
        };
        println!(
            "| {}{} | {} | {} | {} | {} | {:.1} s | {:.1} s | {} | {} |",
            if self.exactly_once {
                "exactly once: "
            } else {
                ""
            },
            self.fault.name(),
            self.acked,
            self.lost,
            self.twice,
            self.non_200,
            self.slowest_200.as_secs_f64(),
            self.slowest.as_secs_f64(),
            ready,
            self.restarts,
        );
    }
}

/// Stops the senders, reads the topic back, and holds every answer to the fault's bounds.
async fn finish(loaded: Loaded, cluster: &Cluster, fault: Fault, times: &FaultTimes) -> Row {
    let Loaded {
        exactly_once,
        topic,
        bridge,
        stop,
        run,
        ready_stop,
        readiness,
        ..
    } = loaded;
    stop.store(true, Ordering::SeqCst);
    let report = run.await.unwrap();
    ready_stop.store(true, Ordering::SeqCst);
    let ready = readiness.await.unwrap();
    let restarts = bridge
        .metric("tamio_bridge_kafka_producer_restarts_total")
        .await;
    let findings = check_losses(&cluster.bootstrap(), &topic, &report).await;
    let started = report.started.unwrap();
    let answered_at = |sent: Duration, took: Duration| started + sent + took;
    let mut broken = Vec::new();
    let mut refusals = 0;
    let (mut slowest, mut slowest_200) = (Duration::ZERO, Duration::ZERO);
    let mut first_200_after_back: Option<Instant> = None;
    for &(sent, took, status) in &report.timings {
        slowest = slowest.max(took);
        if status == 200 {
            slowest_200 = slowest_200.max(took);
            let at = answered_at(sent, took);
            if at > times.back && first_200_after_back.is_none_or(|f| at < f) {
                first_200_after_back = Some(at);
            }
            continue;
        }
        refusals += 1;
        if took > PATIENCE {
            broken.push(format!(
                "a {status} after {took:?}, past a sender's patience"
            ));
        }
        if !fault.cluster_can_take() {
            // Refused within a second of the probe knowing. /readyz shows when it first
            // knew; a delivery sent later, while the probe's last look still let its
            // partition take records, is known at the probe's next look, at most one round
            // (500 ms while Kafka fails) later.
            let knew = ready.first_refusing.unwrap_or(times.back);
            let by = (started + sent).max(knew) + PROBE_ROUND + Duration::from_secs(1);
            if answered_at(sent, took) > by {
                broken.push(format!(
                    "a {status} sent {:.1} s after the fault began, answered after {took:?}: \
                     more than 1 s after the probe's next look",
                    (started + sent)
                        .saturating_duration_since(times.began)
                        .as_secs_f64()
                ));
            }
        }
    }
    if slowest > PATIENCE {
        broken.push(format!("an answer after {slowest:?}"));
    }
    match fault {
        Fault::RollingRestart | Fault::ControllerKill => {
            if refusals > 0 {
                broken.push(format!("{refusals} answers but 200 while a leader moved"));
            }
            // A broker stopping gracefully stops fetching as a follower a moment before the
            // controller takes it out of the in-sync replicas: acks=all waits for it (the
            // broker answers REQUEST_TIMED_OUT after request.timeout.ms, 1 s, and the record
            // is sent again), up to 2.5 s measured here. A controller's death costs nothing.
            let bound = match fault {
                Fault::RollingRestart => Duration::from_secs(3),
                _ => Duration::from_secs(2),
            };
            if slowest > bound {
                broken.push(format!(
                    "the slowest answer took {slowest:?}, not under {bound:?}"
                ));
            }
        }
        Fault::LeaderKill | Fault::LeaderFreeze => {
            // Only what was in flight while Kafka had not yet replaced the leader.
            if refusals > 2 * SENDERS {
                broken.push(format!(
                    "{refusals} answers but 200 for one leader's failure"
                ));
            }
        }
        Fault::TwoBrokersDown | Fault::AllBrokersDown => {
            if ready.first_refusing.is_none() {
                broken.push("/readyz never showed that Kafka could not take records".into());
            }
        }
    }
    if fault.cluster_can_take() {
        if ready.flips != 0 {
            broken.push(format!("/readyz flipped {} times", ready.flips));
        }
    } else if !ready.ready_at_end || ready.flips > 2 + 2 * restarts as usize {
        // Not ready once and back; a producer replaced after Kafka's return holds no
        // producer id until its first InitProducerId, and readiness says so: one more
        // episode per replacement.
        broken.push(format!(
            "/readyz flipped {} times and was {} at the end",
            ready.flips,
            if ready.ready_at_end {
                "ready"
            } else {
                "not ready"
            }
        ));
    }
    if fault == Fault::AllBrokersDown {
        match first_200_after_back {
            Some(at) if at <= times.back + Duration::from_secs(5) => {}
            Some(at) => broken.push(format!(
                "the first 200 came {:?} after the brokers were back",
                at - times.back
            )),
            None => broken.push("no 200 after the brokers were back".into()),
        }
    }
    // Written twice only where its sender was refused and sent it again.
    let unexplained: Vec<&String> = findings
        .twice_ids
        .iter()
        .filter(|id| !report.refused_ids.contains(*id))
        .collect();
    if !unexplained.is_empty() {
        broken.push(format!("written twice without a refusal: {unexplained:?}"));
    }
    if exactly_once && findings.duplicates > 0 {
        broken.push(format!(
            "{} written twice with exactly once: {:?}",
            findings.duplicates, findings.twice_ids
        ));
    }
    if let Ok(dir) = std::env::var("TAMIO_FAULTS_LOG") {
        let name = format!(
            "{dir}/{fault:?}-{}.log",
            if exactly_once { "eo" } else { "alo" }
        );
        std::fs::write(name, bridge.log_text()).unwrap();
    }
    findings.assert_nothing_lost(&report);
    let row = Row {
        fault,
        exactly_once,
        acked: findings.acked,
        lost: findings.missing.len(),
        twice: findings.duplicates,
        non_200: refusals,
        slowest,
        slowest_200,
        ready,
        restarts,
        broken,
    };
    row.print();
    for why in &row.broken {
        println!("    BOUND BROKEN: {why}");
    }
    if !row.ready.reasons.is_empty() {
        println!("    not ready: {}", row.ready.reasons.join(" / "));
    }
    row
}

/// Both bridges under load while `fault` runs, then their checks.
async fn under_load(cluster: &mut Cluster, fault: Fault) -> Vec<Row> {
    let loads = vec![
        start_load(cluster, false).await,
        start_load(cluster, true).await,
    ];
    // Steady load before the fault.
    for l in &loads {
        wait_acked(&l.acked, 300, "the start").await;
    }
    let times = fault
        .inject(cluster, &loads[0].topic, &loads[0].acked)
        .await;
    // Steady again after it: both bridges deliver again.
    for l in &loads {
        wait_acked(&l.acked, 300, "the fault's end").await;
    }
    let mut rows = Vec::new();
    for l in loads {
        rows.push(finish(l, cluster, fault, &times).await);
    }
    rows
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

/// Waits until every partition of every topic has all its replicas in sync.
async fn wait_fully_replicated(cluster: &Cluster) {
    let bootstrap = cluster.internal_bootstrap();
    let started = Instant::now();
    loop {
        let lagging = tokio::task::spawn_blocking({
            let bootstrap = bootstrap.clone();
            move || -> Option<usize> {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .create()
                    .ok()?;
                let md = consumer.fetch_metadata(None, Duration::from_secs(5)).ok()?;
                Some(
                    md.topics()
                        .iter()
                        .flat_map(|t| t.partitions())
                        .filter(|p| p.isr().len() < p.replicas().len())
                        .count(),
                )
            }
        })
        .await
        .unwrap();
        if lagging == Some(0) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{lagging:?} partitions still under-replicated after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for `more` acknowledgements, failing the test if they do not come within 60 s.
async fn wait_acked(acked: &AtomicUsize, more: usize, after: &str) {
    let from = acked.load(Ordering::SeqCst);
    let started = Instant::now();
    while acked.load(Ordering::SeqCst) < from + more {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {more} deliveries acknowledged within 60 s after {after}",
            acked.load(Ordering::SeqCst) - from
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sender_is_answered_within_its_patience_through_kafkas_own_faults() {
    let mut cluster = Cluster::start(Spec {
        brokers: 3,
        controllers: 3,
        heap: "320m",
        ..Default::default()
    })
    .await;
    let only = std::env::var("TAMIO_FAULTS").unwrap_or_default();
    let mut rows = Vec::new();
    println!(
        "| fault | acked | lost | written twice | non-200 | slowest 200 | slowest answer | /readyz not ready | producer replaced |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for fault in FAULTS {
        if !only.is_empty() && !only.split(',').any(|f| format!("{fault:?}") == f) {
            continue;
        }
        rows.extend(under_load(&mut cluster, fault).await);
    }
    println!();
    for row in &rows {
        row.print();
    }
    let broken: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.broken.iter().map(move |b| {
                format!(
                    "{}{}: {b}",
                    if r.exactly_once { "exactly once, " } else { "" },
                    r.fault.name()
                )
            })
        })
        .collect();
    assert!(broken.is_empty(), "bounds broken:\n{}", broken.join("\n"));
}
