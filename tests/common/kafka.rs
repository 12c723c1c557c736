//! Apache Kafka clusters of a test's own (KRaft), started by `.ci/kafka/node` on free
//! 127.0.0.1 ports: one node that is broker and controller, or brokers beside controller-only
//! nodes, the layout managed services run. A test may kill, freeze, stop and restart any
//! node; every node is killed when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use super::net::free_port;

/// How a cluster is laid out and secured.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Nodes that serve clients.
    pub brokers: usize,
    /// Controller-only nodes; 0: every broker is a controller too.
    pub controllers: usize,
    /// The security protocol of the listener clients use: PLAINTEXT, SSL, SASL_SSL or
    /// SASL_PLAINTEXT. Brokers talk to each other in plaintext on a listener of their own.
    pub client_protocol: &'static str,
    /// More `key=value` lines for every node (after the kit's own).
    pub properties: Vec<String>,
    /// More arguments of `kafka-storage format` (e.g. `--add-scram`).
    pub format_args: Vec<String>,
    /// The JVM heap of each node.
    pub heap: &'static str,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            brokers: 1,
            controllers: 0,
            client_protocol: "PLAINTEXT",
            properties: Vec::new(),
            format_args: Vec::new(),
            heap: "384m",
        }
    }
}

/// One node of a cluster.
pub struct Node {
    pub id: u32,
    pub broker: bool,
    pub controller: bool,
    /// The client listener (brokers only).
    pub port: u16,
    pub internal_port: u16,
    pub controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    launches: u32,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("kafka-{}.log", self.launches))
    }

    fn launch(&mut self) {
        self.launches += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let script = node_script();
        let heap = std::fs::read_to_string(self.dir.join("heap")).unwrap_or_else(|_| "384m".into());
        let child = Command::new(&script)
            .arg("run")
            .arg(&self.dir)
            .env("KAFKA_HEAP", heap.trim())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting Kafka with {}: {e}", script.display()));
        self.child = Some(child);
    }

    /// Starts the node again (killing it first if it runs), without waiting for it.
    pub fn launch_only(&mut self) {
        self.kill();
        self.launch();
    }

    /// Waits until the node has started.
    pub async fn wait_started(&mut self) {
        self.started(Duration::from_secs(120)).await;
    }

    /// Waits for the node's "started" line in its current log.
    async fn started(&mut self, within: Duration) {
        let begun = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if log.contains("Kafka Server started") {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "Kafka node {} exited at start ({status}):\n{}",
                    self.id,
                    tail(&log, 40)
                );
            }
            assert!(
                begun.elapsed() < within,
                "Kafka node {} did not start within {within:?}:\n{}",
                self.id,
                tail(&log, 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().expect("the node is running");
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (Kafka's controlled shutdown), and waits for the process to end.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// The node's log since its last start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// A cluster of a test's own.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub spec: Spec,
    _dir: tempfile::TempDir,
}

/// The launcher `.ci/test` names; the tests need it.
fn node_script() -> PathBuf {
    std::env::var_os("TAMIO_TEST_KAFKA_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "TAMIO_TEST_KAFKA_NODE is not set: run the tests with `.ci/test`, which \
                 fetches Apache Kafka and names its launcher"
            )
        })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// One node, broker and controller.
    pub async fn single() -> Cluster {
        Cluster::start(Spec::default()).await
    }

    pub async fn start(spec: Spec) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("tamio-test-kafka-")
            .tempdir()
            .unwrap();
        let combined = spec.controllers == 0;
        let count = spec.brokers + spec.controllers;
        let mut nodes: Vec<Node> = (0..count)
            .map(|i| {
                let broker = i < spec.brokers;
                let node_dir = dir.path().join(format!("node-{}", i + 1));
                std::fs::create_dir_all(&node_dir).unwrap();
                Node {
                    id: i as u32 + 1,
                    broker,
                    controller: combined || !broker,
                    port: free_port(),
                    internal_port: free_port(),
                    controller_port: free_port(),
                    dir: node_dir,
                    child: None,
                    launches: 0,
                }
            })
            .collect();
        let voters = nodes
            .iter()
            .filter(|n| n.controller)
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let replication = spec.brokers.min(3);
        for node in &nodes {
            let mut roles = Vec::new();
            let mut listeners = Vec::new();
            let mut advertised = Vec::new();
            if node.broker {
                roles.push("broker");
                listeners.push(format!("CLIENT://127.0.0.1:{}", node.port));
                listeners.push(format!("INTERNAL://127.0.0.1:{}", node.internal_port));
                advertised.push(format!("CLIENT://127.0.0.1:{}", node.port));
                advertised.push(format!("INTERNAL://127.0.0.1:{}", node.internal_port));
            }
            if node.controller {
                roles.push("controller");
                listeners.push(format!("CONTROLLER://127.0.0.1:{}", node.controller_port));
            }
            let mut lines = vec![
                format!("process.roles={}", roles.join(",")),
                format!("node.id={}", node.id),
                format!("controller.quorum.voters={voters}"),
                format!("listeners={}", listeners.join(",")),
                format!(
                    "listener.security.protocol.map=CLIENT:{},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    spec.client_protocol
                ),
                "inter.broker.listener.name=INTERNAL".into(),
                format!("log.dirs={}", node.dir.join("data").display()),
                format!("offsets.topic.replication.factor={replication}"),
                format!("transaction.state.log.replication.factor={replication}"),
                format!("transaction.state.log.min.isr={}", replication.min(2)),
                format!("share.coordinator.state.topic.replication.factor={replication}"),
                format!("share.coordinator.state.topic.min.isr={}", replication.min(2)),
                format!("default.replication.factor={replication}"),
            ];
            if !advertised.is_empty() {
                lines.push(format!("advertised.listeners={}", advertised.join(",")));
            }
            lines.extend(spec.properties.iter().cloned());
            std::fs::write(node.dir.join("server.properties"), lines.join("\n") + "\n").unwrap();
            if !spec.format_args.is_empty() {
                std::fs::write(
                    node.dir.join("format.args"),
                    spec.format_args.join("\n") + "\n",
                )
                .unwrap();
            }
            std::fs::write(node.dir.join("heap"), spec.heap).unwrap();
        }
        for node in &mut nodes {
            node.launch();
        }
        for node in &mut nodes {
            node.started(Duration::from_secs(120)).await;
        }
        let cluster = Cluster {
            nodes,
            spec,
            _dir: dir,
        };
        cluster.wait_brokers(cluster.spec.brokers).await;
        cluster
    }

    /// The client listeners of the brokers, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.broker)
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The brokers' own plaintext listeners (no authentication): for a test's setup, such as
    /// creating topics on a secured cluster.
    pub fn internal_bootstrap(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.broker)
            .map(|n| format!("127.0.0.1:{}", n.internal_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&mut self, id: u32) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn kill(&mut self, id: u32) {
        self.node(id).kill();
    }

    pub fn stop(&mut self, id: u32) {
        self.node(id).stop();
    }

    pub fn freeze(&self, id: u32) {
        self.node_ref(id).signal("STOP");
    }

    pub fn thaw(&self, id: u32) {
        self.node_ref(id).signal("CONT");
    }

    pub fn node_ref(&self, id: u32) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Starts a node again on its ports with its data (killing it first if it runs).
    pub async fn restart(&mut self, id: u32) {
        let node = self.node(id);
        node.kill();
        node.launch();
        node.started(Duration::from_secs(120)).await;
    }

    /// Waits until the metadata lists `count` brokers.
    pub async fn wait_brokers(&self, count: usize) {
        let bootstrap = self.internal_bootstrap();
        let begun = Instant::now();
        loop {
            let listed = tokio::task::spawn_blocking({
                let bootstrap = bootstrap.clone();
                move || -> Option<usize> {
                    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
                        .set("bootstrap.servers", &bootstrap)
                        .create()
                        .ok()?;
                    use rdkafka::consumer::Consumer;
                    let metadata = consumer.fetch_metadata(None, Duration::from_secs(2)).ok()?;
                    Some(metadata.brokers().len())
                }
            })
            .await
            .unwrap();
            if listed == Some(count) {
                return;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(60),
                "the cluster lists {listed:?} brokers, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates `topic` with `partitions` and `replicas` replicas (and `configs`).
    pub async fn create_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        replicas: i32,
        configs: &[(&str, &str)],
    ) {
        create_topic_at(
            &self.internal_bootstrap(),
            topic,
            partitions,
            replicas,
            configs,
            &[],
        )
        .await
    }

    /// Creates `topic` with the replicas of each partition given (the first the preferred
    /// leader), and `configs`.
    pub async fn create_topic_assigned(
        &self,
        topic: &str,
        assignment: &[&[i32]],
        configs: &[(&str, &str)],
    ) {
        let bootstrap = self.internal_bootstrap();
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("admin client");
        let mut new = NewTopic::new(
            topic,
            assignment.len() as i32,
            TopicReplication::Variable(assignment),
        );
        for (k, v) in configs {
            new = new.set(k, v);
        }
        create(&admin, new).await;
        wait_for_leaders(&bootstrap, topic, assignment.len() as i32, &[]).await;
    }

    /// Adds the ACLs `args` describe, as an operator does: Kafka's own `kafka-acls` tool
    /// (`AclCommand`), through the brokers' internal listener, e.g. `["--allow-principal",
    /// "User:bridge", "--operation", "Write", "--topic", "tickets"]`.
    pub async fn acl(&self, args: &[&str]) {
        self.acl_command("--add", args).await
    }

    /// Removes the ACLs `args` describe (as [`Cluster::acl`] adds them).
    pub async fn acl_remove(&self, args: &[&str]) {
        let mut all = vec!["--force"];
        all.extend_from_slice(args);
        self.acl_command("--remove", &all).await
    }

    async fn acl_command(&self, action: &str, args: &[&str]) {
        let mut all = vec![action];
        all.extend_from_slice(args);
        self.tool("org.apache.kafka.tools.AclCommand", &all).await
    }

    /// Runs one of Kafka's command-line tools (`class`) against the brokers' internal
    /// listener, e.g. `org.apache.kafka.tools.ConfigCommand` (kafka-configs), and asserts
    /// that it succeeds.
    pub async fn tool(&self, class: &str, args: &[&str]) {
        let mut cmd = tokio::process::Command::new(node_script());
        cmd.args(["tool", class])
            .args(["--bootstrap-server", &self.internal_bootstrap()])
            .args(args);
        let out = cmd.output().await.expect("the Kafka tool runs");
        assert!(
            out.status.success(),
            "{class} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The id of the active controller, as Kafka names it: the metadata quorum's leader,
    /// from `kafka-metadata-quorum describe --status` asked of the controllers.
    pub async fn active_controller(&self) -> u32 {
        let controllers = self
            .nodes
            .iter()
            .filter(|n| n.controller)
            .map(|n| format!("127.0.0.1:{}", n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let out = tokio::process::Command::new(node_script())
            .args(["tool", "org.apache.kafka.tools.MetadataQuorumCommand"])
            .args([
                "--bootstrap-controller",
                &controllers,
                "describe",
                "--status",
            ])
            .output()
            .await
            .expect("the Kafka tool runs");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.trim().strip_prefix("LeaderId:"))
            .and_then(|id| id.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no LeaderId in the metadata quorum's status: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }

    /// The directory of node `id`, for certificates and the like.
    pub fn dir_of(&self, id: u32) -> &Path {
        &self.nodes.iter().find(|n| n.id == id).unwrap().dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = node.log();
                let errors: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains(" ERROR ") || l.contains(" FATAL "))
                    .take(10)
                    .collect();
                eprintln!(
                    "--- Kafka node {}: first errors\n{}\n--- last lines\n{}",
                    node.id,
                    errors.join("\n"),
                    tail(&log, 10)
                );
            }
        }
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// Creates `topic` at `bootstrap` (with `client` settings for a secured listener).
pub async fn create_topic_at(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    replicas: i32,
    configs: &[(&str, &str)],
    client: &[(&str, &str)],
) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in client {
        config.set(*k, *v);
    }
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    create(&admin, new).await;
    // Created is not yet led everywhere: wait until its partitions have leaders in the
    // metadata, as a producer would see it.
    wait_for_leaders(bootstrap, topic, partitions, client).await;
}

/// Waits until every partition of `topic` has a leader in the metadata.
pub async fn wait_for_leaders(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    client: &[(&str, &str)],
) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in client {
        config.set(*k, *v);
    }
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::BaseConsumer = config.create().unwrap();
        let begun = Instant::now();
        loop {
            if let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                let led = metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions())
                    .filter(|p| p.leader() >= 0 && p.error().is_none())
                    .count();
                if led == partitions as usize {
                    return;
                }
            }
            assert!(
                begun.elapsed() < Duration::from_secs(30),
                "topic {topic} has no leader for every partition"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
}

/// Creates `new` through `admin`, failing the test on any error.
async fn create(admin: &AdminClient<DefaultClientContext>, new: NewTopic<'_>) {
    let results = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("CreateTopics request");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}
