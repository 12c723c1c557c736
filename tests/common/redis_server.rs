//! Redis servers of a test's own (Debian's `redis-server`, which `.ci/deps` installs): on
//! free 127.0.0.1 ports, keeping nothing on disk, stopped when dropped. One server
//! ([`OwnRedis`]), a Sentinel setup (a master, a replica and three sentinels:
//! [`OwnSentinel`]) and a Cluster (three masters, each with a replica: [`OwnCluster`]). A
//! test that needs them fails loudly when they cannot start.

use super::net::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// Its working directory: a replica's full sync writes a file there, which a server
    /// started in the same directory would load.
    dir: tempfile::TempDir,
}

/// One command to the server on `port`, through redis-cli's protocol (the redis crate).
pub fn redis_command(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut connection)
}

/// `CLIENT PAUSE <ms> ALL` on the server at `port`, with redis-cli.
pub fn pause(port: u16, ms: u64) {
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "CLIENT",
            "PAUSE",
            &ms.to_string(),
            "ALL",
        ])
        .output()
        .expect("redis-cli runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK",
        "CLIENT PAUSE"
    );
}

/// The text of an INFO-like answer.
fn text(value: redis::RedisResult<redis::Value>) -> String {
    match value {
        Ok(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(redis::Value::VerbatimString { text, .. }) => text,
        Ok(redis::Value::SimpleString(text)) => text,
        other => format!("{other:?}"),
    }
}

impl OwnRedis {
    /// The server binary: `REDIS_SERVER` or `redis-server` on the PATH.
    pub fn bin() -> String {
        std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
    }

    pub async fn start() -> OwnRedis {
        Self::start_with(&[]).await
    }

    /// A server with `extra` arguments (`--replicaof`, `--cluster-enabled`...).
    pub async fn start_with(extra: &[&str]) -> OwnRedis {
        let mut redis = OwnRedis {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        redis.launch().await;
        redis
    }

    /// `CLIENT PAUSE <ms> ALL`: every client's commands wait that long, as during a fork or
    /// a failover.
    pub fn pause(&self, ms: u64) {
        pause(self.port, ms)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) {
        // A configuration file (a sentinel's) must come first.
        let (file, extra) = match self.extra.first() {
            Some(first) if first.ends_with(".conf") => (Some(first), &self.extra[1..]),
            _ => (None, &self.extra[..]),
        };
        let child = Command::new(Self::bin())
            .args(file)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): these tests need a Redis server; run them with \
                     `.ci/test`, which installs one",
                    Self::bin()
                )
            });
        self.child = Some(child);
        super::net::wait_listening(self.port, "redis-server", Duration::from_secs(10)).await;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: gone at once, with everything it held.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the server on `port` answers ROLE as a master.
pub fn is_master(port: u16) -> bool {
    match redis_command(port, &["ROLE"]) {
        Ok(redis::Value::Array(role)) => {
            matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
        }
        _ => false,
    }
}

/// A master, its replica and three sentinels watching it as `mymaster` (quorum 2, the master
/// judged down after 1 s).
pub struct OwnSentinel {
    pub master: OwnRedis,
    pub replica: OwnRedis,
    pub sentinels: Vec<OwnRedis>,
    _dir: tempfile::TempDir,
}

impl OwnSentinel {
    pub async fn start() -> OwnSentinel {
        let master = OwnRedis::start().await;
        let replica =
            OwnRedis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]).await;
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let file = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &file,
                format!(
                    "sentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 4000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    master.port
                ),
            )
            .unwrap();
            let file = file.display().to_string();
            sentinels.push(OwnRedis::start_with(&[&file, "--sentinel"]).await);
        }
        let setup = OwnSentinel {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        // The sentinels have found each other and the replica.
        setup
            .wait(Duration::from_secs(20), |s| {
                let info = text(redis_command(
                    s.sentinels[0].port,
                    &["SENTINEL", "MASTER", "mymaster"],
                ));
                info.contains("num-other-sentinels")
                    && !info.contains("num-slaves\n0")
                    && s.sentinels.iter().all(|n| {
                        text(redis_command(n.port, &["INFO", "sentinel"])).contains("sentinels=3")
                    })
            })
            .await;
        setup
    }

    async fn wait(&self, within: Duration, ready: impl Fn(&OwnSentinel) -> bool) {
        let started = Instant::now();
        while !ready(self) {
            assert!(
                started.elapsed() < within,
                "the Sentinel setup did not settle"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis+sentinel://` for the bridge.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// The port of the master the sentinels name now.
    pub fn master_port(&self) -> Option<u16> {
        let value = redis_command(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .ok()?;
        match value {
            redis::Value::Array(parts) => match parts.get(1) {
                Some(redis::Value::BulkString(port)) => {
                    std::str::from_utf8(port).ok()?.parse().ok()
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// Three masters, each with a replica, in one cluster (a node judged down after 1 s).
pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    pub async fn start() -> OwnCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let file = dir
                .path()
                .join(format!("nodes-{i}.conf"))
                .display()
                .to_string();
            // The bus on a free port of its own: port + 10000, the default, may be another
            // node's port.
            let bus = free_port().to_string();
            nodes.push(
                OwnRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &file,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-port",
                    &bus,
                ])
                .await,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (Debian's redis-tools, which redis-server brings)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}; nodes: {:?}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr),
            nodes
                .iter()
                .map(|n| (n.port, text(redis_command(n.port, &["CLUSTER", "NODES"]))))
                .collect::<Vec<_>>()
        );
        let cluster = OwnCluster { nodes, _dir: dir };
        cluster.wait_ok(Duration::from_secs(30)).await;
        cluster
    }

    /// Waits until every live node says the cluster is ok.
    pub async fn wait_ok(&self, within: Duration) {
        let started = Instant::now();
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                text(redis_command(n.port, &["CLUSTER", "INFO"])).contains("cluster_state:ok")
            });
            if ok {
                return;
            }
            assert!(started.elapsed() < within, "the cluster is not ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis+cluster://` for the bridge, every node a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The index of a node that is a master now.
    pub fn a_master(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| n.is_running() && is_master(n.port))
            .expect("a master")
    }
}
