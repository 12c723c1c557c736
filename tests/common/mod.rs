//! Test harness: the real broker (started by `.ci/test`), the bridge started in process on
//! port 0 or as the real binary, a small HTTP client, signing, and a reader of whole topics.
#![allow(dead_code)]

pub mod h2raw;
pub mod tls;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::verify;
use tokio::net::TcpListener;

pub const SECRET: &str = "test-secret-5f1c0c2e";
pub const FIXTURES: [&str; 4] = [
    include_str!("../fixtures/whitelabel_ticket_created.json"),
    include_str!("../fixtures/whitelabel_ticket_updated.json"),
    include_str!("../fixtures/whitelabel_ticket_assigned.json"),
    include_str!("../fixtures/whitelabel_ticket_resolved.json"),
];

/// The broker the suite runs against. Missing means the suite was not started by its
/// command: fail loudly rather than skip.
pub fn brokers() -> String {
    std::env::var("TAMIO_TEST_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TAMIO_TEST_BROKERS is not set: these tests need a running Kafka-protocol broker. \
             Run them with `.ci/test`, which installs and starts one."
        )
    })
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Creates `topic` on the test broker (it does not create topics on its own).
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&brokers(), topic, partitions).await
}

pub async fn create_topic_on(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics request");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Settings for a test bridge: the test broker, `topic`, one secret, ports 0.
pub fn settings(topic: &str, extra: &[(&str, &str)]) -> Settings {
    settings_with_file(topic, "", extra)
}

/// Like [`settings`], with `toml` as the `--config` file under the environment.
pub fn settings_with_file(topic: &str, toml: &str, extra: &[(&str, &str)]) -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, toml).unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("TAMIO_BRIDGE__KAFKA__BROKERS".into(), brokers()),
        ("TAMIO_BRIDGE__KAFKA__TOPIC".into(), topic.into()),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS".into(), SECRET.into()),
        ("TAMIO_BRIDGE__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ("TAMIO_BRIDGE__ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "TAMIO_BRIDGE__KAFKA__READINESS_INTERVAL_MS".into(),
            "200".into(),
        ),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    Settings::load_from(Some(&file), env).expect("test settings are valid")
}

/// A bridge running in this process.
pub struct Bridge {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub path: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Logs of in-process bridges, shown with `--nocapture` when RUST_LOG is set.
fn init_test_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl Bridge {
    pub async fn start(settings: Settings) -> Bridge {
        init_test_logging();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let path = settings.server.path.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tamio_kafka_bridge::run(settings, listener, admin_listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("bridge runs");
        });
        Bridge {
            addr,
            admin,
            path,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a bridge and waits until /readyz says it is ready.
    pub async fn start_ready(settings: Settings) -> Bridge {
        let bridge = Bridge::start(settings).await;
        bridge.wait_ready(Duration::from_secs(20)).await;
        bridge
    }

    pub async fn wait_ready(&self, within: Duration) {
        let started = Instant::now();
        loop {
            let r = get(self.admin, "/readyz").await;
            if r.status == StatusCode::OK {
                return;
            }
            assert!(
                started.elapsed() < within,
                "bridge not ready within {within:?}: {}",
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }

    /// Sends `body` signed now with `SECRET`.
    pub async fn send(&self, body: &str) -> Reply {
        self.send_signed(body, SECRET, now()).await
    }

    pub async fn send_signed(&self, body: &str, secret: &str, t: i64) -> Reply {
        let sig = verify::header_value(secret.as_bytes(), t, body.as_bytes());
        post(
            &self.url(),
            &[
                ("content-type", "application/json"),
                ("tamio-signature", &sig),
            ],
            body.as_bytes().to_vec(),
        )
        .await
    }

    pub async fn metrics(&self) -> String {
        get(self.admin, "/metrics").await.text()
    }

    /// Starts the shutdown as SIGTERM would, without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the bridge as SIGTERM would and waits for run() to return.
    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("bridge stops within 30 s")
                .expect("bridge task did not panic");
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let resp = client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub async fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    request("POST", url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request("GET", &format!("http://{addr}{path}"), &[], Vec::new())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls /readyz until it answers `status`; returns how long that took, or panics after
/// `within`.
pub async fn wait_for_readyz(admin: SocketAddr, status: StatusCode, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let reply = get(admin, "/readyz").await;
        if reply.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/readyz still {} after {within:?}: {}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one sample in a Prometheus text exposition, e.g.
/// `tamio_bridge_requests_total{outcome="accepted"}`.
pub fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("series {series} not in the exposition"))
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap()
    }
}

/// Reads `topic` from the beginning on every partition, until at least `expected` records
/// arrived and then no more for `settle`, or `within` passed. Counting by consuming, since
/// the test broker's offset answers are not to be trusted.
pub async fn read_topic_from(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    within: Duration,
) -> Vec<Record> {
    read_topic_with(bootstrap, &[], topic, expected, settle, within).await
}

/// Like [`read_topic_from`], with more consumer options (TLS, SASL).
pub async fn read_topic_with(
    bootstrap: &str,
    options: &[(&str, &str)],
    topic: &str,
    expected: usize,
    settle: Duration,
    within: Duration,
) -> Vec<Record> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    let options: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique_topic("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        for (k, v) in &options {
            config.set(k, v);
        }
        let consumer: BaseConsumer = config.create().expect("consumer");
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let started = Instant::now();
        let mut last = Instant::now();
        let mut out = Vec::new();
        while started.elapsed() < within {
            if out.len() >= expected && last.elapsed() >= settle {
                break;
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let mut headers = BTreeMap::new();
                    if let Some(h) = m.headers() {
                        for header in h.iter() {
                            headers.insert(
                                header.key.to_owned(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            );
                        }
                    }
                    out.push(Record {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        value: m.payload().unwrap_or_default().to_vec(),
                        headers,
                    });
                    last = Instant::now();
                }
                Some(Err(e)) => panic!("consuming {topic}: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap()
}

pub async fn read_topic(topic: &str, expected: usize) -> Vec<Record> {
    read_topic_from(
        &brokers(),
        topic,
        expected,
        Duration::from_millis(1500),
        Duration::from_secs(60),
    )
    .await
}

/// Reads `topic` back and fails naming every acknowledged event id it does not hold.
pub async fn assert_all_in_kafka(topic: &str, expected: &[String]) {
    let records = read_topic(topic, expected.len()).await;
    let found: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r.headers["event_id"].as_str())
        .collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !found.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
}

/// A ticket event for `ticket` with a fresh event id and a sequence number.
pub fn ticket_event(event_id: &str, ticket: &str, seq: usize) -> String {
    serde_json::json!({
        "event_id": event_id,
        "event_type": "whitelabel_ticket_updated",
        "api_version": 2,
        "object": "event",
        "endpoint_id": "9ab698f5-99de-4ff6-8bfc-a7dcb973d177",
        "data": {"ticket": {"id": ticket, "seq": seq, "is_open": true}}
    })
    .to_string()
}

/// A tansu broker of a test's own, which the test may freeze, kill and start again. Its
/// storage is an SQLite file, so topics and records survive a restart.
pub struct OwnBroker {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    durable: bool,
    schema_registry: Option<std::path::PathBuf>,
    /// The port clients are told to use, when it is not `port` (a TLS front).
    advertised: Option<u16>,
    /// Require SASL (SCRAM) from clients.
    authentication: bool,
}

impl OwnBroker {
    pub fn bin() -> String {
        std::env::var("TANSU_BIN").unwrap_or_else(|_| {
            panic!("TANSU_BIN is not set: run the tests with `.ci/test`, which installs tansu")
        })
    }

    /// A broker that keeps its data across restarts (SQLite storage).
    pub async fn start() -> OwnBroker {
        Self::start_with(true).await
    }

    /// A broker with in-memory storage (faster; loses everything on restart).
    pub async fn start_in_memory() -> OwnBroker {
        Self::start_with(false).await
    }

    /// An in-memory broker that validates records against the `<topic>.json` schemas in `dir`.
    pub async fn start_with_schema_registry(dir: &std::path::Path) -> OwnBroker {
        Self::start_with_options(false, Some(dir.to_owned())).await
    }

    async fn start_with(durable: bool) -> OwnBroker {
        Self::start_with_options(durable, None).await
    }

    async fn start_with_options(
        durable: bool,
        schema_registry: Option<std::path::PathBuf>,
    ) -> OwnBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = OwnBroker {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            durable,
            schema_registry,
            advertised: None,
            authentication: false,
        };
        broker.launch().await;
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        // tansu resolves the SQLite path against its working directory.
        let storage = if self.durable {
            "sqlite://tansu.db"
        } else {
            "memory://tansu/"
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap();
        let mut command = std::process::Command::new(Self::bin());
        command
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", storage])
            .current_dir(self.dir.path());
        if self.authentication {
            command.arg("--authentication");
        }
        if let Some(registry) = &self.schema_registry {
            // tansu resolves a file:// path against its working directory.
            command
                .arg("--schema-registry")
                .arg(format!("file://{}", registry.display()))
                .current_dir("/");
        }
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(self.address())
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "tansu did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// SIGSTOP: the broker keeps its connections open but answers nothing.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        create_topic_on(&self.address(), topic, partitions).await
    }

    /// A broker that clients reach at `advertised` (a [`TlsFront`] bound to that port), with
    /// `topic` created and, when `users` are given (name, password, `scram256` or
    /// `scram512`), SCRAM authentication required. tansu keeps SCRAM credentials only in
    /// durable storage and accepts no unauthenticated request once authentication is on, so
    /// users and the topic are created first, then the broker restarts with it on.
    pub async fn start_secured(
        advertised: Option<u16>,
        users: &[(&str, &str, &str)],
        topic: &str,
    ) -> OwnBroker {
        let mut broker = Self::start_with(true).await;
        for (name, password, mechanism) in users {
            broker.tansu(&["user", "create", name, password, "--mechanism", mechanism]);
        }
        broker.tansu(&["topic", "create", topic, "--partitions", "3"]);
        broker.advertised = advertised;
        broker.authentication = !users.is_empty();
        broker.restart().await;
        broker
    }

    /// Runs a tansu client command against this broker's own port.
    fn tansu(&self, args: &[&str]) {
        let out = std::process::Command::new(Self::bin())
            .args(args)
            .args(["--broker", &format!("tcp://{}", self.address())])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A TLS terminator in front of a broker (tansu 0.6 serves plaintext only): clients speak
/// TLS to `port`, checked against a test CA, and each connection is forwarded to `target`.
/// With a client CA, clients must present a certificate it signed.
pub struct TlsFront {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    /// Binds a port for a front started later with [`TlsFront::start`].
    pub fn reserve() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    pub fn start(
        listener: std::net::TcpListener,
        target: String,
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let config = builder
            .with_single_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, target) = (acceptor.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        TlsFront { port, task }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let first_errors: Vec<&str> = lines
                .iter()
                .filter(|l| l.contains("ERROR") || l.contains("panicked"))
                .take(10)
                .copied()
                .collect();
            let tail = &lines[lines.len().saturating_sub(10)..];
            eprintln!(
                "--- tansu log: first errors\n{}\n--- tansu log: last lines\n{}",
                first_errors.join("\n"),
                tail.join("\n")
            );
        }
        if let Some(child) = self.child.as_ref() {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// The loss checker's load: `tickets` senders run at once; each sends its `per_ticket` events
/// one after another, retrying an event (same `event_id`) after any answer but 200 or a
/// connection error, as the real sender does.
pub struct Load {
    pub url: String,
    pub tickets: usize,
    pub per_ticket: usize,
    /// Tries per event before its sender gives up.
    pub max_attempts: usize,
    pub retry_pause: Duration,
}

/// What the senders saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Event ids answered 200, with their ticket and position.
    pub acked: Vec<(String, String, usize)>,
    /// Answers by status ("error" for no answer).
    pub answers: BTreeMap<String, usize>,
    /// Events never acknowledged (their sender gave up).
    pub abandoned: usize,
    /// Every answer: when its request was sent (since the load started), how long it took,
    /// and its status (0 for no answer).
    pub timings: Vec<(Duration, Duration, u16)>,
}

pub fn event_id(ticket: usize, seq: usize) -> String {
    format!("whev_t{ticket}_s{seq}")
}

impl Load {
    /// Runs the load; `acked` counts acknowledgements as they come, for injecting a fault
    /// mid-run.
    pub async fn run(&self, acked: Arc<std::sync::atomic::AtomicUsize>) -> LoadReport {
        let report = Arc::new(std::sync::Mutex::new(LoadReport::default()));
        let load_started = Instant::now();
        let mut senders = Vec::new();
        for ticket in 0..self.tickets {
            let url = self.url.clone();
            let report = report.clone();
            let acked = acked.clone();
            let (per_ticket, max_attempts, pause) =
                (self.per_ticket, self.max_attempts, self.retry_pause);
            senders.push(tokio::spawn(async move {
                let ticket_id = format!("ticket-{ticket:04}");
                for seq in 0..per_ticket {
                    let id = event_id(ticket, seq);
                    let body = ticket_event(&id, &ticket_id, seq);
                    let mut delivered = false;
                    for _ in 0..max_attempts {
                        let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
                        let sent = Instant::now();
                        let answer = request(
                            "POST",
                            &url,
                            &[
                                ("content-type", "application/json"),
                                ("tamio-signature", &sig),
                            ],
                            body.clone().into_bytes(),
                        )
                        .await;
                        let status = answer.as_ref().map_or(0, |r| r.status.as_u16());
                        let key = match &answer {
                            Ok(r) => r.status.as_u16().to_string(),
                            Err(_) => "error".to_owned(),
                        };
                        {
                            let mut report = report.lock().unwrap();
                            *report.answers.entry(key).or_default() += 1;
                            report.timings.push((
                                sent.duration_since(load_started),
                                sent.elapsed(),
                                status,
                            ));
                        }
                        match answer {
                            Ok(r) if r.status == StatusCode::OK => {
                                report.lock().unwrap().acked.push((
                                    id.clone(),
                                    ticket_id.clone(),
                                    seq,
                                ));
                                acked.fetch_add(1, Ordering::SeqCst);
                                delivered = true;
                                break;
                            }
                            Ok(r) if r.status.is_client_error() => {
                                panic!("{id}: refused with {}: {}", r.status, r.text())
                            }
                            _ => tokio::time::sleep(pause).await,
                        }
                    }
                    if !delivered {
                        report.lock().unwrap().abandoned += per_ticket - seq;
                        return;
                    }
                }
            }));
        }
        for s in senders {
            s.await.expect("sender task");
        }
        Arc::try_unwrap(report).unwrap().into_inner().unwrap()
    }
}

/// What the loss checker found in the topic.
#[derive(Debug)]
pub struct LossFindings {
    pub acked: usize,
    pub records: usize,
    pub missing: Vec<String>,
    pub duplicates: usize,
    pub order_violations: Vec<String>,
}

/// Reads the whole topic and compares it with what was acknowledged: every acknowledged id
/// must be there; duplicates are counted (delivery is at least once); each ticket's events,
/// sent one after another, must first appear in the order they were sent, in one partition.
pub async fn check_losses(bootstrap: &str, topic: &str, report: &LoadReport) -> LossFindings {
    let mut records = read_topic_from(
        bootstrap,
        topic,
        report.acked.len(),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    // A record missing from one read is looked for again with a fresh consumer before it
    // counts as lost: a reader that skipped part of a partition must not pass for a loss,
    // while a lost record stays missing however often the topic is read.
    let ids: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r.headers["event_id"].as_str())
        .collect();
    let first_missing = report
        .acked
        .iter()
        .filter(|(id, _, _)| !ids.contains(id.as_str()))
        .count();
    if first_missing > 0 {
        println!("loss checker: {first_missing} acknowledged ids not seen on the first read; reading again");
        let again = read_topic_from(
            bootstrap,
            topic,
            report.acked.len(),
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await;
        if again.len() > records.len() {
            records = again;
        }
    }
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for r in &records {
        *seen.entry(r.headers["event_id"].as_str()).or_default() += 1;
    }
    let missing: Vec<String> = report
        .acked
        .iter()
        .filter(|(id, _, _)| !seen.contains_key(id.as_str()))
        .map(|(id, _, _)| id.clone())
        .collect();
    let duplicates = seen.values().map(|n| n - 1).sum();

    let mut by_ticket: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in &records {
        by_ticket.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    let mut order_violations = Vec::new();
    for (ticket, mut recs) in by_ticket {
        if recs.iter().any(|r| r.partition != recs[0].partition) {
            order_violations.push(format!("{ticket}: spread over partitions"));
            continue;
        }
        recs.sort_by_key(|r| r.offset);
        let mut next = 0u64;
        for r in recs {
            let seq = r.json()["data"]["ticket"]["seq"].as_u64().unwrap();
            if seq == next {
                next += 1;
            } else if seq > next {
                order_violations.push(format!("{ticket}: seq {seq} before seq {next}"));
                break;
            }
            // seq < next: a duplicate of an earlier event, allowed.
        }
    }
    LossFindings {
        acked: report.acked.len(),
        records: records.len(),
        missing,
        duplicates,
        order_violations,
    }
}

impl LossFindings {
    /// Prints the findings and fails on a loss or an order violation.
    pub fn assert_nothing_lost(&self, report: &LoadReport) {
        println!(
            "loss checker: {} acknowledged, {} records, {} missing, {} duplicates, {} order violations; answers {:?}; {} abandoned",
            self.acked,
            self.records,
            self.missing.len(),
            self.duplicates,
            self.order_violations.len(),
            report.answers,
            report.abandoned,
        );
        assert!(
            self.missing.is_empty(),
            "acknowledged but not in Kafka: {:?}",
            self.missing
        );
        assert!(
            self.order_violations.is_empty(),
            "per-ticket order broken: {:?}",
            self.order_violations
        );
    }
}

// --- The real binary ---

pub const BIN: &str = env!("CARGO_BIN_EXE_tamio-kafka-bridge");

pub fn command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TAMIO_BRIDGE") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("TAMIO_BRIDGE__SERVER__LISTEN", "127.0.0.1:0")
        .env("TAMIO_BRIDGE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TAMIO_BRIDGE__LOG__FORMAT", "json");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A running bridge process with its log collected.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub stdout: Arc<Mutex<String>>,
}

impl Process {
    pub fn spawn(env: &[(&str, &str)]) -> Process {
        Self::spawn_with_args(env, &[])
    }

    /// Like [`Process::spawn`], with command-line arguments (e.g. `--config FILE`).
    pub fn spawn_with_args(env: &[(&str, &str)], args: &[&str]) -> Process {
        let mut cmd = command(env);
        cmd.args(args);
        Self::spawn_command(cmd)
    }

    /// Starts `cmd` (made by [`command`]) and waits until it accepts deliveries.
    pub fn spawn_command(mut cmd: Command) -> Process {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the bridge binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("accepting webhook deliveries") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let stdout = Arc::new(Mutex::new(String::new()));
        {
            let stdout = stdout.clone();
            let mut out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stdout
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("the bridge did not start: {:#?}", log.lock().unwrap())
            });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let field = |name: &str| -> SocketAddr {
            v["fields"][name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {line}"))
                .parse()
                .unwrap()
        };
        Process {
            addr: field("listen"),
            admin: field("admin"),
            child,
            log,
            stdout,
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self, within: Duration) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if started.elapsed() > within {
                let _ = self.child.kill();
                panic!("the bridge did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn wait_ready(&self) {
        let started = Instant::now();
        while get(self.admin, "/readyz").await.status != StatusCode::OK {
            assert!(started.elapsed() < Duration::from_secs(20), "not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = command(env).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// CPU seconds (user and system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
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

/// A process's peak resident memory in MB (VmHWM), from /proc.
pub fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}
