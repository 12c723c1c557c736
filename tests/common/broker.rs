//! Brokers for tests: the shared one `.ci/test` starts (and topics on it), tansu brokers of a
//! test's own that it may freeze, kill and restart, and a TLS terminator in front of one.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio::net::TcpListener;

use super::brokers;

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
        super::net::wait_listening(self.port, "tansu", Duration::from_secs(20)).await;
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
