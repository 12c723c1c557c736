//! Attacks that hold many connections at once: each attacker opens a connection, misbehaves
//! on it until the bridge closes it (or gives up after a while), and opens the next, while
//! genuine senders deliver signed events on fresh connections. What it measures: the
//! slowest signed delivery, the connections the bridge closed, its CPU and peak memory.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{cpu_seconds, peak_rss_mb, post, ticket_event, Process, SECRET};

/// The memory limit `deploy/kubernetes/base/deployment.yaml` gives the bridge's container,
/// in bytes.
pub fn pod_memory_limit() -> u64 {
    let root = env!("CARGO_MANIFEST_DIR");
    let text =
        std::fs::read_to_string(format!("{root}/deploy/kubernetes/base/deployment.yaml")).unwrap();
    let limits = text.split("limits:").nth(1).expect("a limits: block");
    let value = limits
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .expect("a memory limit")
        .trim()
        .trim_matches('"');
    let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap());
    let number: u64 = number.parse().unwrap();
    number
        * match unit {
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            other => panic!("unit {other}"),
        }
}

/// The signature headers of `body`, signed now.
pub fn signed_headers(body: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".to_owned()),
        (
            "tamio-signature",
            tamio_kafka_bridge::ingest::verify::header_value(
                SECRET.as_bytes(),
                super::now(),
                body.as_bytes(),
            ),
        ),
    ]
}

/// A signed delivery on a new connection; asserts 200 and returns how long it took.
pub async fn deliver(addr: SocketAddr, id: &str) -> Duration {
    let body = ticket_event(id, "ticket-genuine", 0);
    let headers = signed_headers(&body);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        post(
            &format!("http://{addr}/webhooks/tamio"),
            &headers,
            body.into_bytes(),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("{id}: no answer within 5 s"));
    assert_eq!(reply.status, StatusCode::OK, "{id}: {}", reply.text());
    started.elapsed()
}

/// What a siege did and cost.
#[derive(Debug)]
pub struct Siege {
    pub opened: u32,
    /// Attacker connections the bridge closed.
    pub closed: u32,
    pub slowest_answer: Duration,
    /// Event ids answered 200 meanwhile.
    pub acknowledged: Vec<String>,
    pub cpu_secs: f64,
    pub peak_rss_mb: f64,
    pub wall: Duration,
}

/// What an attack makes the bridge do, and so which bound its CPU is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing but holding connections: under a core.
    Holding,
    /// Requests answered, as fast as the attacker sends them (a request flood in another
    /// guise): the CPU follows the attacker's rate and is reported, not bounded.
    Requests,
}

/// How an attacker's connection ended.
pub enum Ended {
    /// The bridge closed it.
    Closed,
    /// The attacker gave up on it (the siege ended, or it held it long enough).
    Dropped,
}

/// Runs `attackers` attackers at once for `seconds`; each runs `attack(addr, stop)` again
/// whenever its last connection ended. Genuine deliveries go out every 250 ms meanwhile, each
/// on a new connection.
pub async fn siege<F, Fut>(
    bridge: &Process,
    name: &str,
    seconds: u64,
    attackers: usize,
    work: Work,
    attack: F,
) -> Siege
where
    F: Fn(SocketAddr, Arc<AtomicBool>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Ended> + Send,
{
    let (addr, pid) = (bridge.addr, bridge.child.id());
    let cpu_before = cpu_seconds(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let (opened, closed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..attackers {
        let (attack, stop, opened, closed) =
            (attack.clone(), stop.clone(), opened.clone(), closed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                opened.fetch_add(1, Ordering::Relaxed);
                if let Ended::Closed = attack(addr, stop.clone()).await {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // The attack in place before the first delivery.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let id = format!("whev_{}_{n}", name.replace(' ', "_"));
        slowest = slowest.max(deliver(addr, &id).await);
        acknowledged.lock().unwrap().push(id);
        n += 1;
    }
    let figures = Siege {
        opened: opened.load(Ordering::Relaxed),
        closed: closed.load(Ordering::Relaxed),
        slowest_answer: slowest,
        acknowledged: acknowledged.lock().unwrap().clone(),
        cpu_secs: cpu_seconds(pid) - cpu_before,
        peak_rss_mb: peak_rss_mb(pid),
        wall: started.elapsed() + Duration::from_millis(1500),
    };
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    println!(
        "{name}: {attackers} attackers opened {} connections, {} closed by the bridge; {n} \
         signed deliveries meanwhile, slowest answered in {} ms; bridge CPU {:.2} s over \
         {:.1} s, peak RSS {:.1} MB",
        figures.opened,
        figures.closed,
        figures.slowest_answer.as_millis(),
        figures.cpu_secs,
        figures.wall.as_secs_f64(),
        figures.peak_rss_mb,
    );
    let limit_mb = pod_memory_limit() as f64 / (1 << 20) as f64;
    assert!(
        figures.slowest_answer < Duration::from_secs(1),
        "{name}: a signed delivery waited {slowest:?}"
    );
    assert!(
        figures.peak_rss_mb < limit_mb,
        "{name}: peak RSS {:.1} MB, above the pod's limit of {limit_mb} MiB",
        figures.peak_rss_mb
    );
    if work == Work::Holding {
        assert!(
            figures.cpu_secs < figures.wall.as_secs_f64(),
            "{name}: the bridge used {:.2} CPU s in {:.1} s",
            figures.cpu_secs,
            figures.wall.as_secs_f64()
        );
    }
    figures
}

/// Writes `first`, then `each` every `every`, until the bridge closes the connection (what
/// it answers meanwhile is read and dropped), `stop` is set, or `hold` has passed.
pub async fn dribble(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    first: &[u8],
    each: &[u8],
    every: Duration,
    hold: Duration,
) -> Ended {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Ended::Dropped;
    };
    if s.write_all(first).await.is_err() {
        return Ended::Closed;
    }
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut next = tokio::time::Instant::now() + every;
    while started.elapsed() < hold && !stop.load(Ordering::Relaxed) {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            },
            () = tokio::time::sleep_until(next) => {
                next += every;
                if !each.is_empty() && s.write_all(each).await.is_err() {
                    return Ended::Closed;
                }
            }
        }
    }
    Ended::Dropped
}

/// Writes `bytes` and never reads: waits for the bridge to close the connection (seen
/// without reading what it sent), `stop`, or `hold`.
pub async fn unread(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    bytes: Vec<u8>,
    hold: Duration,
) -> Ended {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small receive buffer, so that the answers back up into the bridge's socket.
    let _ = socket.set_recv_buffer_size(4096);
    let Ok(s) = socket.connect(addr).await else {
        return Ended::Dropped;
    };
    let started = Instant::now();
    let (read_half, mut write_half) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = write_half.write_all(&bytes).await;
        // Kept open: a half-closed connection would end hyper's keep-alive.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(write_half);
    });
    let ended = loop {
        if started.elapsed() >= hold || stop.load(Ordering::Relaxed) {
            break Ended::Dropped;
        }
        // Readable (an answer waits) is not closed: look for the peer's FIN or reset only.
        match tokio::time::timeout(
            Duration::from_millis(100),
            read_half.as_ref().ready(tokio::io::Interest::READABLE),
        )
        .await
        {
            Ok(Ok(ready)) if ready.is_read_closed() => break Ended::Closed,
            Ok(Err(_)) => break Ended::Closed,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => {}
        }
    };
    writer.abort();
    ended
}
