//! The bridge started in this process on port 0, with test settings.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::verify;
use tokio::net::TcpListener;

use super::{brokers, get, now, post, post_signed, Reply, SECRET};

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
        post_signed(&self.url(), body, secret, t).await
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
