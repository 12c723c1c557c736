//! End-to-end load benchmark: `cargo bench --bench load`.
//!
//! Starts an Apache Kafka node (`.ci/kafka/node`, as the tests do) and the release bridge binary, drives signed ticket
//! events at fixed concurrency levels over keep-alive HTTP/1.1 for a fixed time, and prints
//! per run: acknowledged events a second, latency percentiles (hdrhistogram), answers by
//! status, the bridge's peak resident memory and CPU per acknowledged event (procfs), and
//! the records found in Kafka afterwards, which must hold every acknowledged event.
//!
//! With `BENCH_BASELINE_BIN` set to another build of the bridge (an earlier commit built in a
//! separate target directory, see `benches/baseline.sh`), each level runs that baseline and
//! this build in turn, `BENCH_ROUNDS` times, interleaved so that the machine's noise hits
//! both, and a last table gives the ratios and whether each performance goal holds.
//!
//! In the same run it measures two ceilings (`BENCH_CEILINGS=0` skips them): HTTP (a minimal
//! hyper server, this binary re-executed, that reads the body and answers 200) and Kafka (an
//! rdkafka producer with the bridge's producer settings, the same records, the same number
//! of outstanding sends).
//!
//! Environment: `BENCH_SECONDS` (per run, default 5), `BENCH_LEVELS` (default 1,64,256),
//! `BENCH_SHAPES` (default `spread,hot`: distinct event ids over 5,000 tickets, or over one
//! hot ticket, one key and so one partition; each level runs in each shape, and the bridge's
//! CPU per event is split by thread: runtime, librdkafka's broker threads, its others, the
//! delivery-report thread),
//! `BENCH_ROUNDS` (default 2), `BENCH_EXTRA` (extra rows, default `redis,start`: at 64
//! connections the shared duplicate store on, one Redis and a 3-master Cluster, beside a run
//! with it off, on `redis-server`s
//! the benchmark starts; and the first delivery after each of 10 starts per build, sent as
//! soon as `/readyz` answers; also `tls`, `scrape`, `tracing`: at 64 connections spans
//! exported to an OTLP receiver in this process at a ratio of 1 and of 0.01, beside none, and
//! `exactly_once`: `kafka.exactly_once` beside the default at each level), `BENCH_CONFIG` (a `--config` file for this build, not the baseline),
//! `KAFKA_HEAP` (the broker's heap, default 512m). Both builds run with the default settings,
//! logging at `info` included.

#[path = "../tests/common/tls.rs"]
#[allow(dead_code)]
mod tls;

#[path = "../tests/common/net.rs"]
#[allow(dead_code)]
mod net;

#[path = "../tests/common/otlp.rs"]
#[allow(dead_code)]
mod otlp;

#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::verify;
use tokio::net::TcpStream;

const SECRET: &str = "bench-secret";
const TEMPLATE: &str = include_str!("../tests/fixtures/whitelabel_ticket_updated.json");
const TICKETS: usize = 5000;

/// The load's shapes: distinct event ids over 5,000 tickets (every partition busy), or one
/// hot ticket (one key, so one partition) with distinct event ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Spread,
    Hot,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Spread => "spread",
            Shape::Hot => "hot",
        }
    }

    fn tickets(self) -> usize {
        match self {
            Shape::Spread => TICKETS,
            Shape::Hot => 1,
        }
    }
}
/// Starts per build for the first-delivery-after-start row.
const STARTS: usize = 10;

fn main() {
    if std::env::var("TAMIO_BENCH_ROLE").as_deref() == Ok("http-ceiling") {
        return http_ceiling_server();
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and minutes of load
    // are no test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load benchmark: run it with `cargo bench --bench load`");
        return;
    }
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .unwrap_or_else(|_| "1,64,256".into())
        .split(',')
        .map(|l| l.trim().parse().expect("BENCH_LEVELS: numbers"))
        .collect();
    let options = Options {
        duration: Duration::from_secs(env_or("BENCH_SECONDS", 5)),
        rounds: env_or("BENCH_ROUNDS", 2),
        ceilings: env_or("BENCH_CEILINGS", 1) != 0,
        extra: std::env::var("BENCH_EXTRA").unwrap_or_else(|_| "redis,start".into()),
        baseline: std::env::var("BENCH_BASELINE_BIN").ok(),
        shapes: std::env::var("BENCH_SHAPES")
            .unwrap_or_else(|_| "spread,hot".into())
            .split(',')
            .map(|s| match s.trim() {
                "spread" => Shape::Spread,
                "hot" => Shape::Hot,
                other => panic!("BENCH_SHAPES: spread or hot, not {other}"),
            })
            .collect(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(options, levels));
}

struct Options {
    duration: Duration,
    rounds: usize,
    ceilings: bool,
    extra: String,
    baseline: Option<String>,
    shapes: Vec<Shape>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Kills the child when dropped.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(addr: &str) {
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{addr} never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of event `n`: the updated fixture with a distinct event id and one of many
/// ticket ids.
fn body(n: u64, tickets: usize) -> String {
    let ticket = format!("ticket-{:05}", n as usize % tickets);
    TEMPLATE
        .replacen("whev_o49pxqxd3bv642zyk", &format!("whev_bench_{n:012}"), 1)
        .replacen("fbaddbf8-e290-4fa4-a3ed-fbb4837dabe1", &ticket, 1)
}

/// Event `n`, signed, as the load generator posts it.
fn signed_request(n: u64, tickets: usize) -> http::Request<Full<Bytes>> {
    let body = body(n, tickets);
    let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
    http::Request::post("/webhooks/tamio")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("tamio-signature", sig)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn histogram() -> Histogram<u64> {
    // Microseconds, from 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// What one run of the load saw.
struct RunResult {
    acked: u64,
    latencies_us: Histogram<u64>,
    answers: BTreeMap<String, u64>,
    elapsed: Duration,
    driver_cpu: f64,
}

impl RunResult {
    fn throughput(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.value_at_quantile(p) as f64 / 1000.0
    }

    fn absorb(&mut self, other: RunResult) {
        self.acked += other.acked;
        self.latencies_us.add(&other.latencies_us).unwrap();
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        self.elapsed += other.elapsed;
        self.driver_cpu += other.driver_cpu;
    }
}

/// CPU seconds (user and system) a process has used.
/// CPU seconds of a process's threads, by what they do: the async runtime's workers (and
/// its blocking threads), librdkafka's broker threads, its other threads, and rdkafka's
/// delivery-report thread. Threads that ended are in none of them.
fn thread_cpu(pid: u32) -> BTreeMap<&'static str, f64> {
    let ticks = procfs::ticks_per_second() as f64;
    let mut by = BTreeMap::new();
    let Ok(tasks) = procfs::process::Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return by;
    };
    for task in tasks.flatten() {
        let Ok(stat) = task.stat() else { continue };
        let group = match stat.comm.as_str() {
            c if c.starts_with("tokio-") => "runtime",
            c if c.starts_with("rdk:broker") => "rdk broker",
            c if c.starts_with("rdk:") => "rdk other",
            c if c.starts_with("producer poll") => "reports",
            _ => "other",
        };
        *by.entry(group).or_default() += (stat.utime + stat.stime) as f64 / ticks;
    }
    by
}

fn process_cpu_seconds(pid: u32) -> f64 {
    let ticks = procfs::ticks_per_second() as f64;
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| (s.utime + s.stime) as f64 / ticks)
        .unwrap_or(f64::NAN)
}

/// A process's peak resident memory, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmhwm)
        .map(|kb| kb as f64 / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The workers of one run and what they share.
struct Run {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    result: Arc<Mutex<RunResult>>,
    started: Instant,
    cpu_before: f64,
    duration: Duration,
}

fn new_result() -> Arc<Mutex<RunResult>> {
    Arc::new(Mutex::new(RunResult {
        acked: 0,
        latencies_us: histogram(),
        answers: BTreeMap::new(),
        elapsed: Duration::ZERO,
        driver_cpu: 0.0,
    }))
}

/// Lets the workers run for the run's duration, stops them and gathers their results.
async fn finish_run(run: Run) -> RunResult {
    tokio::time::sleep(run.duration).await;
    run.stop.store(true, Ordering::Relaxed);
    for t in run.tasks {
        let _ = t.await;
    }
    let mut r = Arc::try_unwrap(run.result)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    r.elapsed = run.started.elapsed();
    r.driver_cpu = process_cpu_seconds(std::process::id()) - run.cpu_before;
    r
}

/// With `pace`, a sender starts one request per period (an open-loop rate) instead of the
/// next one as soon as the last is answered.
fn pacer(pace: Option<Duration>) -> Option<tokio::time::Interval> {
    pace.map(|p| {
        let mut t = tokio::time::interval(p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    })
}

/// `concurrency` keep-alive HTTP/1.1 connections, each sending signed events one after
/// another for `duration`.
async fn drive_http(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    pace: Option<Duration>,
    tls: Option<tokio_rustls::TlsConnector>,
    tickets: usize,
) -> RunResult {
    let counter = Arc::new(AtomicU64::new(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
            * 1000,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let result = new_result();
    let cpu_before = process_cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (counter, stop, result, tls) =
            (counter.clone(), stop.clone(), result.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram();
            let mut answers: BTreeMap<String, u64> = BTreeMap::new();
            let mut acked = 0;
            let mut ticker = pacer(pace);
            'connection: while !stop.load(Ordering::Relaxed) {
                let Ok(stream) = TcpStream::connect(addr).await else {
                    *answers.entry("connect".into()).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let stream: Box<dyn tamio_kafka_bridge::server::Stream> = match &tls {
                    None => Box::new(stream),
                    Some(connector) => {
                        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                        let Ok(stream) = connector.connect(name, stream).await else {
                            *answers.entry("tls".into()).or_default() += 1;
                            continue;
                        };
                        Box::new(stream)
                    }
                };
                let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
                    hyper_util::rt::TokioIo::new(stream),
                )
                .await
                .unwrap();
                tokio::spawn(conn);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(t) = ticker.as_mut() {
                        t.tick().await;
                    }
                    let req = signed_request(counter.fetch_add(1, Ordering::Relaxed), tickets);
                    let sent = Instant::now();
                    match sender.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let _ = resp.into_body().collect().await;
                            let _ = latencies.record(sent.elapsed().as_micros().max(1) as u64);
                            *answers.entry(status.as_u16().to_string()).or_default() += 1;
                            if status.is_success() {
                                acked += 1;
                            }
                        }
                        Err(_) => {
                            *answers.entry("error".into()).or_default() += 1;
                            continue 'connection;
                        }
                    }
                }
            }
            let mut r = result.lock().unwrap();
            r.latencies_us.add(&latencies).unwrap();
            r.acked += acked;
            for (k, v) in answers {
                *r.answers.entry(k).or_default() += v;
            }
        }));
    }
    finish_run(Run {
        tasks,
        stop,
        result,
        started,
        cpu_before,
        duration,
    })
    .await
}

/// Starts the bridge on a new topic and, as soon as `/readyz` answers 200, sends it one
/// signed event on a fresh connection: how long, in microseconds, until it is answered 200.
async fn first_after_start(bin: &str, brokers: &str) -> u64 {
    let topic = format!("bench-start-{}", now_nanos());
    create_topic(brokers, &topic).await;
    let bridge = start_bridge(bin, brokers, &topic, &[]).await;
    let sent = Instant::now();
    let stream = TcpStream::connect(bridge.addr).await.unwrap();
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(signed_request(now_nanos() as u64, TICKETS))
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    let took = sent.elapsed().as_micros().max(1) as u64;
    assert!(
        status.is_success(),
        "first delivery after a start: {status}"
    );
    drop(bridge);
    assert!(
        count_records(brokers, &topic, 1).await >= 1,
        "the first delivery is not in Kafka"
    );
    took
}

/// The Kafka ceiling: the bridge's producer settings, the same records, `concurrency`
/// outstanding sends each awaited.
async fn drive_kafka(
    brokers: &str,
    topic: &str,
    concurrency: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> RunResult {
    let settings = Settings::load_from(None, Vec::new()).unwrap();
    let producer: FutureProducer = tamio_kafka_bridge::publish::producer::producer_config(
        &settings.kafka,
        brokers,
        settings.server.max_body_bytes,
    )
    .create()
    .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let result = new_result();
    let cpu_before = process_cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (counter, stop, result, producer, topic) = (
            counter.clone(),
            stop.clone(),
            result.clone(),
            producer.clone(),
            topic.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram();
            let mut acked = 0;
            let mut failed = 0;
            let mut ticker = pacer(pace);
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let body = body(n, TICKETS);
                let key = format!("ticket-{:05}", n as usize % TICKETS);
                let event_id = format!("whev_bench_{n:012}");
                let headers = OwnedHeaders::new_with_capacity(6)
                    .insert(Header {
                        key: "event_id",
                        value: Some(event_id.as_str()),
                    })
                    .insert(Header {
                        key: "event_type",
                        value: Some("whitelabel_ticket_updated"),
                    })
                    .insert(Header {
                        key: "endpoint_id",
                        value: Some("9ab698f5-99de-4ff6-8bfc-a7dcb973d177"),
                    })
                    .insert(Header {
                        key: "api_version",
                        value: Some("2"),
                    })
                    .insert(Header {
                        key: "received_at",
                        value: Some("2026-11-26T00:00:00.000Z"),
                    });
                let record = FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&body)
                    .headers(headers);
                let sent = Instant::now();
                match producer.send(record, Timeout::After(Duration::ZERO)).await {
                    Ok(_) => {
                        acked += 1;
                        let _ = latencies.record(sent.elapsed().as_micros().max(1) as u64);
                    }
                    Err(_) => failed += 1,
                }
            }
            let mut r = result.lock().unwrap();
            r.latencies_us.add(&latencies).unwrap();
            r.acked += acked;
            *r.answers.entry("ok".into()).or_default() += acked;
            if failed > 0 {
                *r.answers.entry("failed".into()).or_default() += failed;
            }
        }));
    }
    finish_run(Run {
        tasks,
        stop,
        result,
        started,
        cpu_before,
        duration,
    })
    .await
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// Counts the records of `topic` by consuming it.
async fn count_records(brokers: &str, topic: &str, at_least: u64) -> u64 {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("bench-count-{}", topic))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut count = 0;
        let mut idle = Instant::now();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => {
                    count += 1;
                    idle = Instant::now();
                }
                Some(Err(e)) => panic!("consuming {topic}: {e}"),
                None if count >= at_least && idle.elapsed() > Duration::from_secs(2) => break,
                None => {}
            }
        }
        count
    })
    .await
    .unwrap()
}

/// A bridge process under load.
struct Bridge {
    child: Guard,
    addr: SocketAddr,
    admin_port: u16,
}

impl Bridge {
    fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

async fn start_bridge(bin: &str, brokers: &str, topic: &str, env: &[(&str, String)]) -> Bridge {
    let (port, admin_port) = (free_port(), free_port());
    let started = Instant::now();
    let mut command = Command::new(bin);
    // A --config file for this build alone, to compare settings (e.g. `linger.ms`).
    if let Ok(file) = std::env::var("BENCH_CONFIG") {
        if bin == env!("CARGO_BIN_EXE_tamio-kafka-bridge") {
            command.args(["--config", &file]);
        }
    }
    let child = command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TAMIO_BRIDGE__KAFKA__BROKERS", brokers)
        .env("TAMIO_BRIDGE__KAFKA__TOPIC", topic)
        .env("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET)
        .env("TAMIO_BRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "TAMIO_BRIDGE__ADMIN__LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let child = Guard(child);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin_port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer).await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "bridge not ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Bridge {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        admin_port,
    }
}

async fn scrape_every_second(admin_port: u16, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin_port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn http_ceiling_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let port: u16 = std::env::var("TAMIO_BENCH_PORT").unwrap().parse().unwrap();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"{}"),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// What a bridge build did at one level, over its rounds.
struct Measured {
    run: RunResult,
    cpu_secs: f64,
    /// CPU seconds by thread group (see [`thread_cpu`]).
    threads: BTreeMap<&'static str, f64>,
    peak_rss_mb: f64,
    in_kafka: u64,
}

impl Measured {
    fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.run.acked.max(1) as f64
    }

    /// CPU µs per event by thread group.
    fn split(&self) -> String {
        let per = |secs: f64| secs * 1e6 / self.run.acked.max(1) as f64;
        self.threads
            .iter()
            .map(|(group, secs)| format!("{group} {:.1}", per(*secs)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One run of `bin` at `concurrency`, on a topic of its own, read back afterwards.
async fn measure_once(
    bin: &str,
    brokers: &str,
    concurrency: usize,
    duration: Duration,
    env: &[(&str, String)],
    tls: Option<tokio_rustls::TlsConnector>,
) -> Measured {
    measure_shape(bin, brokers, concurrency, duration, env, tls, Shape::Spread).await
}

/// Like [`measure_once`], in a load shape of its own.
async fn measure_shape(
    bin: &str,
    brokers: &str,
    concurrency: usize,
    duration: Duration,
    env: &[(&str, String)],
    tls: Option<tokio_rustls::TlsConnector>,
    shape: Shape,
) -> Measured {
    let topic = format!("bench-{concurrency}-{}", now_nanos());
    create_topic(brokers, &topic).await;
    let bridge = start_bridge(bin, brokers, &topic, env).await;
    let cpu0 = process_cpu_seconds(bridge.pid());
    let threads0 = thread_cpu(bridge.pid());
    let run = drive_http(
        bridge.addr,
        concurrency,
        duration,
        None,
        tls,
        shape.tickets(),
    )
    .await;
    let cpu = process_cpu_seconds(bridge.pid()) - cpu0;
    let mut threads = thread_cpu(bridge.pid());
    for (group, before) in threads0 {
        *threads.entry(group).or_default() -= before;
    }
    let attributed: f64 = threads.values().sum();
    *threads.entry("other").or_default() += (cpu - attributed).max(0.0);
    let rss = peak_rss_mb(bridge.pid());
    drop(bridge);
    let in_kafka = count_records(brokers, &topic, run.acked).await;
    assert!(
        in_kafka >= run.acked,
        "Kafka holds {in_kafka} records but {} were acknowledged",
        run.acked
    );
    Measured {
        run,
        cpu_secs: cpu,
        threads,
        peak_rss_mb: rss,
        in_kafka,
    }
}

fn absorb(into: &mut Option<Measured>, m: Measured) {
    match into {
        None => *into = Some(m),
        Some(total) => {
            total.run.absorb(m.run);
            total.cpu_secs += m.cpu_secs;
            for (group, secs) in m.threads {
                *total.threads.entry(group).or_default() += secs;
            }
            total.peak_rss_mb = total.peak_rss_mb.max(m.peak_rss_mb);
            total.in_kafka += m.in_kafka;
        }
    }
}

fn header() {
    println!(
        "{:<14} {:>5} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9}  answers",
        "run",
        "conc",
        "events/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "peak MB",
        "cpu µs/ev",
        "gen cpu",
        "in kafka"
    );
}

fn row(
    name: &str,
    c: usize,
    r: &RunResult,
    rss: Option<f64>,
    cpu_us: Option<f64>,
    found: Option<u64>,
) {
    let opt = |v: Option<f64>, prec: usize| {
        v.map(|v| format!("{v:.prec$}"))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<14} {:>5} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>8} {:>9} {:>8.2} {:>9}  {:?}",
        name,
        c,
        r.throughput(),
        r.pct(0.5),
        r.pct(0.9),
        r.pct(0.99),
        r.latencies_us.max() as f64 / 1000.0,
        opt(rss, 1),
        opt(cpu_us, 1),
        r.driver_cpu,
        found.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
        r.answers
    );
}

fn measured_row(name: &str, c: usize, m: &Measured) {
    row(
        name,
        c,
        &m.run,
        Some(m.peak_rss_mb),
        Some(m.cpu_us_per_event()),
        Some(m.in_kafka),
    );
}

async fn bench(options: Options, levels: Vec<usize>) {
    let kafka_port = free_port();
    let kafka_dir = tempfile::Builder::new()
        .prefix("tamio-test-kafka-bench-")
        .tempdir()
        .unwrap();
    let kafka_log = kafka_dir.path().join("kafka.log");
    let node = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/kafka/node");
    let _kafka = Guard(
        Command::new(node)
            .arg("single")
            .arg(kafka_dir.path().join("node"))
            .arg(kafka_port.to_string())
            .stdout(std::fs::File::create(&kafka_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {node}: {e}")),
    );
    let started = Instant::now();
    while !std::fs::read_to_string(&kafka_log)
        .unwrap_or_default()
        .contains("Kafka Server started")
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "Kafka did not start: {}",
            std::fs::read_to_string(&kafka_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let brokers = format!("127.0.0.1:{kafka_port}");
    wait_port(&brokers).await;

    let http_port = free_port();
    let _http = Guard(
        Command::new(std::env::current_exe().unwrap())
            .env("TAMIO_BENCH_ROLE", "http-ceiling")
            .env("TAMIO_BENCH_PORT", http_port.to_string())
            .spawn()
            .unwrap(),
    );
    wait_port(&format!("127.0.0.1:{http_port}")).await;
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();

    let new_bin = env!("CARGO_BIN_EXE_tamio-kafka-bridge");
    let duration = options.duration;
    println!(
        "tamio-kafka-bridge load benchmark: {} s per run, {} round(s) per build and level, \
         2 cores, Apache Kafka 4.4.0 (one KRaft node), 3 partitions",
        duration.as_secs(),
        options.rounds
    );
    println!(
        "load generator: this binary, Rust/tokio (2 threads), one keep-alive HTTP/1.1 \
         connection per concurrent sender; its own CPU is `gen cpu`"
    );
    match &options.baseline {
        Some(b) => println!("baseline: {b}\nnew:      {new_bin}\n"),
        None => println!("(BENCH_BASELINE_BIN unset: this build only)\n"),
    }
    header();
    let mut summary = Vec::new();
    for &shape in &options.shapes {
        println!(
            "shape {}: distinct event ids over {} ticket(s)",
            shape.name(),
            shape.tickets()
        );
        for &c in &levels {
            if options.ceilings && shape == Shape::Spread {
                let http = drive_http(http_addr, c, duration, None, None, TICKETS).await;
                row("http-ceiling", c, &http, None, None, None);
                let topic = format!("bench-kafka-{c}-{}", now());
                create_topic(&brokers, &topic).await;
                let kafka = drive_kafka(&brokers, &topic, c, duration, None).await;
                row("kafka-ceiling", c, &kafka, None, None, None);
            }
            let (mut base, mut new) = (None, None);
            for _ in 0..options.rounds {
                if let Some(bin) = &options.baseline {
                    absorb(
                        &mut base,
                        measure_shape(bin, &brokers, c, duration, &[], None, shape).await,
                    );
                }
                absorb(
                    &mut new,
                    measure_shape(new_bin, &brokers, c, duration, &[], None, shape).await,
                );
            }
            if let Some(base) = &base {
                measured_row("baseline", c, base);
            }
            let new = new.unwrap();
            measured_row("bridge", c, &new);
            println!("  bridge CPU µs per event by thread: {}", new.split());
            summary.push((shape, c, base, new));
        }
        println!();
    }

    if levels.contains(&64) && options.extra.contains("scrape") {
        let topic = format!("bench-scrape-{}", now());
        create_topic(&brokers, &topic).await;
        let bridge = start_bridge(new_bin, &brokers, &topic, &[]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = tokio::spawn(scrape_every_second(bridge.admin_port, stop.clone()));
        let run = drive_http(bridge.addr, 64, duration, None, None, TICKETS).await;
        stop.store(true, Ordering::Relaxed);
        let _ = scraper.await;
        row(
            "bridge+scrape",
            64,
            &run,
            Some(peak_rss_mb(bridge.pid())),
            None,
            None,
        );
        println!();
    }

    // The shared duplicate store: one Redis and a 3-master Cluster (each master with a
    // replica), beside a run with it off, interleaved.
    if levels.contains(&64) && options.extra.contains("redis") {
        let redis = redis_server::OwnRedis::start().await;
        let cluster = redis_server::OwnCluster::start().await;
        let single = [
            ("TAMIO_BRIDGE__DEDUP__STORE", "redis".to_owned()),
            ("TAMIO_BRIDGE__DEDUP__REDIS_URL", redis.url()),
        ];
        let clustered = [
            ("TAMIO_BRIDGE__DEDUP__STORE", "redis".to_owned()),
            ("TAMIO_BRIDGE__DEDUP__REDIS_URL", cluster.url()),
        ];
        let (mut off_total, mut on_total, mut cluster_total) = (None, None, None);
        for _ in 0..options.rounds {
            absorb(
                &mut off_total,
                measure_once(new_bin, &brokers, 64, duration, &[], None).await,
            );
            absorb(
                &mut on_total,
                measure_once(new_bin, &brokers, 64, duration, &single, None).await,
            );
            absorb(
                &mut cluster_total,
                measure_once(new_bin, &brokers, 64, duration, &clustered, None).await,
            );
        }
        let (off, on, clustered) = (
            off_total.unwrap(),
            on_total.unwrap(),
            cluster_total.unwrap(),
        );
        measured_row("dedup memory", 64, &off);
        measured_row("dedup redis", 64, &on);
        measured_row("dedup redis cluster", 64, &clustered);
        for (name, run) in [("one Redis", &on), ("a Cluster", &clustered)] {
            println!(
                "shared store, {name}: {:+.1} µs of bridge CPU per event, p99 {:.2} -> {:.2} ms, \
                 events/s {:.2}x",
                run.cpu_us_per_event() - off.cpu_us_per_event(),
                off.run.pct(0.99),
                run.run.pct(0.99),
                run.run.throughput() / off.run.throughput()
            );
        }
        println!();
    }

    // Traces exported (to an OTLP receiver in this process) at a ratio of 1 and of 0.01,
    // beside a run without, interleaved.
    if levels.contains(&64) && options.extra.contains("tracing") {
        let receiver = otlp::OtlpReceiver::start().await;
        let all = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
            ("OTEL_TRACES_SAMPLER_ARG", "1".to_owned()),
        ];
        let some = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01".to_owned()),
        ];
        let (mut off_total, mut all_total, mut some_total) = (None, None, None);
        // Each round starts with another of the three, so that none always runs on the
        // broker the others have filled.
        for round in 0..options.rounds {
            for turn in 0..3 {
                match (round + turn) % 3 {
                    0 => absorb(
                        &mut off_total,
                        measure_once(new_bin, &brokers, 64, duration, &[], None).await,
                    ),
                    1 => absorb(
                        &mut all_total,
                        measure_once(new_bin, &brokers, 64, duration, &all, None).await,
                    ),
                    _ => absorb(
                        &mut some_total,
                        measure_once(new_bin, &brokers, 64, duration, &some, None).await,
                    ),
                }
            }
        }
        let (off, all, some) = (off_total.unwrap(), all_total.unwrap(), some_total.unwrap());
        measured_row("tracing off", 64, &off);
        measured_row("tracing 1.0", 64, &all);
        measured_row("tracing 0.01", 64, &some);
        for (name, run) in [("ratio 1.0", &all), ("ratio 0.01", &some)] {
            println!(
                "tracing, {name}: CPU per event {:.2}x ({:+.1} µs), p99 {:.2} -> {:.2} ms, events/s {:.2}x",
                run.cpu_us_per_event() / off.cpu_us_per_event(),
                run.cpu_us_per_event() - off.cpu_us_per_event(),
                off.run.pct(0.99),
                run.run.pct(0.99),
                run.run.throughput() / off.run.throughput()
            );
        }
        println!("spans received: {}\n", receiver.spans().len());
    }

    // kafka.exactly_once beside the default, interleaved, at each level.
    if options.extra.contains("exactly_once") {
        let eos = [
            ("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true".to_owned()),
            (
                "TAMIO_BRIDGE__KAFKA__TRANSACTIONAL_ID",
                format!("bench-{}", now_nanos()),
            ),
        ];
        for &level in &levels {
            let (mut off_total, mut on_total) = (None, None);
            for round in 0..options.rounds {
                for turn in 0..2 {
                    if (round + turn) % 2 == 0 {
                        absorb(
                            &mut off_total,
                            measure_once(new_bin, &brokers, level, duration, &[], None).await,
                        );
                    } else {
                        absorb(
                            &mut on_total,
                            measure_once(new_bin, &brokers, level, duration, &eos, None).await,
                        );
                    }
                }
            }
            let (off, on) = (off_total.unwrap(), on_total.unwrap());
            measured_row("at least once", level, &off);
            measured_row("exactly once", level, &on);
            println!(
                "exactly once at {level}: events/s {:.0} -> {:.0} ({:.2}x), p50 {:.2} -> {:.2} ms, p99 {:.2} -> {:.2} ms, CPU per event {:.1} -> {:.1} µs\n",
                off.run.throughput(),
                on.run.throughput(),
                on.run.throughput() / off.run.throughput(),
                off.run.pct(0.50),
                on.run.pct(0.50),
                off.run.pct(0.99),
                on.run.pct(0.99),
                off.cpu_us_per_event(),
                on.cpu_us_per_event(),
            );
        }
    }

    // The first delivery after a start, sent as soon as `/readyz` answers 200: what a sender
    // sees of a new replica (or a restarted one) that has just been put behind the Service.
    if options.extra.contains("start") {
        let (mut base, mut new) = (histogram(), histogram());
        for _ in 0..STARTS {
            if let Some(bin) = &options.baseline {
                base.record(first_after_start(bin, &brokers).await).unwrap();
            }
            new.record(first_after_start(new_bin, &brokers).await)
                .unwrap();
        }
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        for (name, h) in [("baseline", &base), ("bridge", &new)] {
            if !h.is_empty() {
                println!(
                    "first delivery after ready, {name}: {STARTS} starts, p50 {:.2} ms, max {:.2} ms",
                    ms(h, 0.5),
                    ms(h, 1.0)
                );
            }
        }
        println!();
    }

    // The same load over TLS (rustls on the ingress; a certificate from a test CA).
    if levels.contains(&64) && options.extra.contains("tls") {
        let pki = tls::Pki::new();
        pki.issue("server");
        let cert = pki.path("server.crt").display().to_string();
        let key = pki.path("server.key").display().to_string();
        let env = [
            ("TAMIO_BRIDGE__SERVER__TLS_CERT_FILE", cert),
            ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key),
        ];
        let connector = tls::tls_connector(&pki.ca_pem(), false);
        let m = measure_once(new_bin, &brokers, 64, duration, &env, Some(connector)).await;
        measured_row("bridge-tls", 64, &m);
        println!();
    }

    if options.baseline.is_some() {
        println!("new against baseline, each level over the same rounds (ratio = new / baseline):");
        println!(
            "{:<7}{:<5} {:>11} {:>11} {:>7} {:>11} {:>11} {:>7} {:>9} {:>9} {:>7} {:>10} {:>10}  goals",
            "shape",
            "conc",
            "base ev/s",
            "new ev/s",
            "ratio",
            "base µs/ev",
            "new µs/ev",
            "ratio",
            "base p99",
            "new p99",
            "ratio",
            "base MB",
            "new MB",
        );
        for (shape, c, base, new) in &summary {
            let Some(base) = base else { continue };
            let thr = new.run.throughput() / base.run.throughput();
            let cpu = new.cpu_us_per_event() / base.cpu_us_per_event();
            let p99 = new.run.pct(0.99) / base.run.pct(0.99);
            let mut goals = Vec::new();
            let mut goal = |name: &str, holds: bool| {
                goals.push(format!("{name} {}", if holds { "holds" } else { "MISSED" }))
            };
            match c {
                1 => goal("p50 <= 0.5 ms", new.run.pct(0.5) <= 0.5),
                64 => {
                    goal("events/s >= 2.2x", thr >= 2.2);
                    goal("cpu <= 0.6x", cpu <= 0.6);
                }
                256 => {
                    goal("events/s >= 1.6x", thr >= 1.6);
                    goal("p99 <= 0.75x", p99 <= 0.75);
                    goal("cpu <= 0.6x", cpu <= 0.6);
                }
                _ => {}
            }
            println!(
                "{:<7}{:<5} {:>11.0} {:>11.0} {:>6.2}x {:>11.1} {:>11.1} {:>6.2}x {:>9.2} {:>9.2} {:>6.2}x {:>10.1} {:>10.1}  {}",
                shape.name(),
                c,
                base.run.throughput(),
                new.run.throughput(),
                thr,
                base.cpu_us_per_event(),
                new.cpu_us_per_event(),
                cpu,
                base.run.pct(0.99),
                new.run.pct(0.99),
                p99,
                base.peak_rss_mb,
                new.peak_rss_mb,
                goals.join(", ")
            );
        }
        for (shape, c, base, new) in &summary {
            if *c == 1 {
                println!(
                    "1 connection, {}: p50 {:.2} ms (new), {:.2} ms (baseline)",
                    shape.name(),
                    new.run.pct(0.5),
                    base.as_ref().map_or(f64::NAN, |b| b.run.pct(0.5)),
                );
            }
        }
    }
}
