//! The real binary: started with an environment of its own, its JSON log collected, its
//! CPU and memory read from /proc.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{get, now, post_signed, sample, Reply, SECRET};

/// The binary under test: `TAMIO_TEST_BIN` when set (the test command sets the release
/// build, whose memory and CPU are what a deployment sees), else cargo's test build.
pub fn bin() -> String {
    std::env::var("TAMIO_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tamio-kafka-bridge").to_owned())
}

pub fn command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("TAMIO_BRIDGE") || k.starts_with("OTEL_") || k == "RUST_LOG" {
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

    /// The webhook endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/webhooks/tamio", self.addr)
    }

    /// Delivers `body` signed with the suite's secret, now.
    pub async fn send(&self, body: &str) -> Reply {
        post_signed(&self.url(), body, SECRET, now()).await
    }

    pub async fn metrics(&self) -> String {
        get(self.admin, "/metrics").await.text()
    }

    /// One sample of its metrics, e.g. `tamio_bridge_requests_total{outcome="accepted"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics().await, series)
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

/// The environment of a bridge on `brokers` writing `topic`, its deliveries signed with
/// [`SECRET`](super::SECRET); a test extends it with its own settings.
pub fn bridge_env<'a>(brokers: &'a str, topic: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("TAMIO_BRIDGE__KAFKA__BROKERS", brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", super::SECRET),
    ]
}
