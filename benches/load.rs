//! End-to-end load benchmark: `cargo bench --bench load`.
//!
//! Starts tansu (in-memory storage) and the release bridge binary, drives signed ticket
//! events at fixed concurrency levels over keep-alive HTTP/1.1 for a fixed time, and prints
//! per level: throughput, latency percentiles, answers by status, the bridge's peak resident
//! memory and CPU seconds per 1,000 events, and the records found in Kafka afterwards. In the
//! same run it measures two ceilings, so the result is a ratio that holds on a noisy machine:
//! - HTTP: the same load against a minimal hyper server (this binary, re-executed) that reads
//!   the body and answers 200;
//! - Kafka: an rdkafka producer with the bridge's producer settings sending the same records
//!   with the same number of outstanding sends, each awaited.
//!
//! Environment: `BENCH_SECONDS` (per run, default 5), `BENCH_LEVELS` (default 1,16,64,256),
//! `TANSU_BIN` (default: `tansu` on the PATH).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
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
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .unwrap_or_else(|_| "1,16,64,256".into())
        .split(',')
        .map(|l| l.trim().parse().expect("BENCH_LEVELS: numbers"))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(Duration::from_secs(seconds), levels));
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
fn body(n: u64) -> String {
    let ticket = format!("ticket-{:05}", n as usize % TICKETS);
    TEMPLATE
        .replacen("whev_o49pxqxd3bv642zyk", &format!("whev_bench_{n:012}"), 1)
        .replacen("fbaddbf8-e290-4fa4-a3ed-fbb4837dabe1", &ticket, 1)
}

#[derive(Default)]
struct RunResult {
    acked: u64,
    latencies_us: Vec<u64>,
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
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
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
    r.latencies_us.sort_unstable();
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
    path: &str,
    concurrency: usize,
    duration: Duration,
    pace: Option<Duration>,
    tls: Option<tokio_rustls::TlsConnector>,
) -> RunResult {
    let counter = Arc::new(AtomicU64::new(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
            * 1000,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let result = Arc::new(Mutex::new(RunResult::default()));
    let cpu_before = process_cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (counter, stop, result, path, tls) = (
            counter.clone(),
            stop.clone(),
            result.clone(),
            path.to_owned(),
            tls.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
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
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let body = body(n);
                    let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
                    let req = http::Request::post(path.as_str())
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .header("tamio-signature", sig)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    let sent = Instant::now();
                    match sender.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let _ = resp.into_body().collect().await;
                            latencies.push(sent.elapsed().as_micros() as u64);
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
            r.latencies_us.extend(latencies);
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
    let result = Arc::new(Mutex::new(RunResult::default()));
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
            let mut latencies = Vec::new();
            let mut acked = 0;
            let mut failed = 0;
            let mut ticker = pacer(pace);
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let body = body(n);
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
                        latencies.push(sent.elapsed().as_micros() as u64);
                    }
                    Err(_) => failed += 1,
                }
            }
            let mut r = result.lock().unwrap();
            r.latencies_us.extend(latencies);
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

/// Counts the records of `topic` by consuming it (tansu's offset answers are unreliable).
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

struct Bridge {
    child: Guard,
    addr: SocketAddr,
    started_in: Duration,
}

async fn start_bridge(brokers: &str, topic: &str) -> Bridge {
    start_bridge_with(brokers, topic, &[]).await
}

async fn start_bridge_with(brokers: &str, topic: &str, env: &[(&str, String)]) -> Bridge {
    let (port, admin) = (free_port(), free_port());
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_tamio-kafka-bridge"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TAMIO_BRIDGE__KAFKA__BROKERS", brokers)
        .env("TAMIO_BRIDGE__KAFKA__TOPIC", topic)
        .env("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET)
        .env("TAMIO_BRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("TAMIO_BRIDGE__ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("TAMIO_BRIDGE__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = Guard(child);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)).await {
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
        started_in: started.elapsed(),
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

async fn bench(duration: Duration, levels: Vec<usize>) {
    let tansu = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
    let kafka_port = free_port();
    let url = format!("tcp://127.0.0.1:{kafka_port}");
    let _tansu = Guard(
        Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {tansu} (install it, or run .ci/test once): {e}")
            }),
    );
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

    println!("tamio-kafka-bridge load benchmark: {} s per run, 2 cores, tansu 0.6 (memory storage), 3 partitions", duration.as_secs());
    println!("load generator: this binary, Rust/tokio (2 threads), one keep-alive HTTP/1.1 connection per concurrent sender; its own CPU is reported as `gen cpu`\n");
    println!(
        "{:<12} {:>5} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9}  answers",
        "run",
        "conc",
        "events/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "peak MB",
        "cpu s/1k",
        "gen cpu",
        "in kafka"
    );
    let mut summary = Vec::new();
    for &c in &levels {
        let http = drive_http(http_addr, "/webhooks/tamio", c, duration, None, None).await;
        row("http-ceiling", c, &http, None, None, None);

        let topic = format!("bench-kafka-{c}-{}", now());
        create_topic(&brokers, &topic).await;
        let kafka = drive_kafka(&brokers, &topic, c, duration, None).await;
        row("kafka-ceiling", c, &kafka, None, None, None);

        let topic = format!("bench-bridge-{c}-{}", now());
        create_topic(&brokers, &topic).await;
        let bridge = start_bridge(&brokers, &topic).await;
        let pid = bridge.child.0.id();
        let cpu0 = process_cpu_seconds(pid);
        let run = drive_http(bridge.addr, "/webhooks/tamio", c, duration, None, None).await;
        let cpu = process_cpu_seconds(pid) - cpu0;
        let rss = peak_rss_mb(pid);
        let found = count_records(&brokers, &topic, run.acked).await;
        row(
            "bridge",
            c,
            &run,
            Some(rss),
            Some(cpu * 1000.0 / run.acked.max(1) as f64),
            Some(found),
        );
        assert!(
            found >= run.acked,
            "Kafka holds {found} records but {} were acknowledged",
            run.acked
        );
        summary.push((
            c,
            http.throughput(),
            kafka.throughput(),
            run.throughput(),
            kafka.pct(0.99),
            run.pct(0.99),
            bridge.started_in,
        ));
        drop(bridge);
        println!();
    }

    if levels.contains(&64) {
        let topic = format!("bench-scrape-{}", now());
        create_topic(&brokers, &topic).await;
        let bridge = start_bridge(&brokers, &topic).await;
        let admin_port = free_port_of_admin(&bridge);
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = tokio::spawn(scrape_every_second(admin_port, stop.clone()));
        let run = drive_http(bridge.addr, "/webhooks/tamio", 64, duration, None, None).await;
        stop.store(true, Ordering::Relaxed);
        let _ = scraper.await;
        row(
            "bridge+scrape",
            64,
            &run,
            Some(peak_rss_mb(bridge.child.0.id())),
            None,
            None,
        );
        println!();
    }

    // The same load over TLS (rustls on the ingress; a new certificate from a test CA).
    if levels.contains(&64) {
        let (dir, connector) = test_tls();
        let topic = format!("bench-tls-{}", now());
        create_topic(&brokers, &topic).await;
        let cert = dir.path().join("server.crt").display().to_string();
        let key = dir.path().join("server.key").display().to_string();
        let bridge = start_bridge_with(
            &brokers,
            &topic,
            &[
                ("TAMIO_BRIDGE__SERVER__TLS_CERT_FILE", cert),
                ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key),
            ],
        )
        .await;
        let pid = bridge.child.0.id();
        let cpu0 = process_cpu_seconds(pid);
        let run = drive_http(
            bridge.addr,
            "/webhooks/tamio",
            64,
            duration,
            None,
            Some(connector),
        )
        .await;
        let cpu = process_cpu_seconds(pid) - cpu0;
        row(
            "bridge-tls",
            64,
            &run,
            Some(peak_rss_mb(pid)),
            Some(cpu * 1000.0 / run.acked.max(1) as f64),
            Some(count_records(&brokers, &topic, run.acked).await),
        );
        println!();
    }

    // Latency at half the highest throughput the bridge reached, paced (open loop) over 64
    // connections, against the Kafka ceiling paced the same way.
    let max = summary.iter().map(|s| s.3).fold(0.0, f64::max);
    let half = max / 2.0;
    let pace = Duration::from_secs_f64(64.0 / half);
    let topic = format!("bench-half-kafka-{}", now());
    create_topic(&brokers, &topic).await;
    let kafka = drive_kafka(&brokers, &topic, 64, duration, Some(pace)).await;
    row("kafka@half", 64, &kafka, None, None, None);
    let topic = format!("bench-half-bridge-{}", now());
    create_topic(&brokers, &topic).await;
    let bridge = start_bridge(&brokers, &topic).await;
    let run = drive_http(
        bridge.addr,
        "/webhooks/tamio",
        64,
        duration,
        Some(pace),
        None,
    )
    .await;
    row(
        "bridge@half",
        64,
        &run,
        Some(peak_rss_mb(bridge.child.0.id())),
        None,
        None,
    );
    drop(bridge);
    println!(
        "\nat half the bridge's peak ({half:.0} events/s offered): p99 bridge {:.1} ms, Kafka ceiling {:.1} ms, ratio {:.2}\n",
        run.pct(0.99),
        kafka.pct(0.99),
        run.pct(0.99) / kafka.pct(0.99)
    );

    println!(
        "{:<6} {:>12} {:>12} {:>10} {:>15} {:>14} {:>13} {:>10}",
        "conc",
        "http ceil/s",
        "kafka ceil/s",
        "bridge/s",
        "bridge/min ceil",
        "kafka p99 ms",
        "bridge p99 ms",
        "start ms"
    );
    for (c, h, k, b, kp99, bp99, start) in summary {
        println!(
            "{:<6} {:>12.0} {:>12.0} {:>10.0} {:>14.0}% {:>14.1} {:>13.1} {:>10}",
            c,
            h,
            k,
            b,
            100.0 * b / h.min(k),
            kp99,
            bp99,
            start.as_millis()
        );
    }
}

fn free_port_of_admin(bridge: &Bridge) -> u16 {
    // The admin port was given through the environment at start.
    let environ =
        std::fs::read(format!("/proc/{}/environ", bridge.child.0.id())).unwrap_or_default();
    String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|kv| kv.strip_prefix("TAMIO_BRIDGE__ADMIN__LISTEN=127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .expect("admin port")
}

fn row(
    name: &str,
    c: usize,
    r: &RunResult,
    rss: Option<f64>,
    cpu_per_1k: Option<f64>,
    found: Option<u64>,
) {
    let opt = |v: Option<f64>, prec: usize| {
        v.map(|v| format!("{v:.prec$}"))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<12} {:>5} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>8} {:>9} {:>8.2} {:>9}  {:?}",
        name,
        c,
        r.throughput(),
        r.pct(0.5),
        r.pct(0.9),
        r.pct(0.99),
        r.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
        opt(rss, 1),
        opt(cpu_per_1k, 3),
        r.driver_cpu,
        found.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
        r.answers
    );
}

/// A test CA, a server certificate for 127.0.0.1 in `server.crt`/`server.key`, and a client
/// connector that trusts only that CA.
fn test_tls() -> (tempfile::TempDir, tokio_rustls::TlsConnector) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (dir, tokio_rustls::TlsConnector::from(Arc::new(config)))
}
