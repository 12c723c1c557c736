//! A reload tells the truth: changing a setting that takes a restart, a redacted one among
//! them, is reported as such in the log and in `tamio_bridge_reloads_total`, for every
//! section, and keeps being reported while the file differs from what runs.

mod common;

use std::time::{Duration, Instant};

use common::*;

const BASE: &str = r#"
[server]
max_in_flight = 1024
[admin]
listen = "127.0.0.1:0"
[kafka.librdkafka]
"sasl.password" = "first-password"
[dedup]
window_secs = 86400
[reload]
watch_interval_ms = 0
[log]
format = "json"
level = "info"
"#;

async fn reloads(bridge: &Process, result: &str) -> f64 {
    let metrics = get(bridge.admin, "/metrics").await.text();
    sample(
        &metrics,
        &format!("tamio_bridge_reloads_total{{result=\"{result}\"}}"),
    )
}

/// Sends SIGHUP and waits until the reload was counted under `result`.
async fn reload(bridge: &Process, result: &str) {
    let before = reloads(bridge, result).await;
    bridge.signal("HUP");
    let started = Instant::now();
    while reloads(bridge, result).await < before + 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no `{result}` reload counted: {}",
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sections named by the last warning about settings that take a restart.
fn last_restart_warning(bridge: &Process) -> String {
    let log = bridge.log.lock().unwrap();
    log.iter()
        .rev()
        .find(|l| l.contains("take a restart"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["fields"]["sections"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_restart_only_section_changed_by_a_reload_is_reported() {
    let topic = unique_topic("reload-truth");
    create_topic(&topic, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, BASE).unwrap();
    let brokers = brokers();
    let mut cmd = command(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
    ]);
    // The admin address comes from the file, so that the file can change it.
    cmd.env_remove("TAMIO_BRIDGE__ADMIN__LISTEN")
        .args(["--config", file.to_str().unwrap()]);
    let bridge = Process::spawn_command(cmd);
    bridge.wait_ready().await;

    // Nothing changed: applied.
    reload(&bridge, "applied").await;

    let changes = [
        ("server", ("max_in_flight = 1024", "max_in_flight = 1000")),
        (
            "admin",
            ("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
        ),
        // A redacted value: it never shows in the log, and its change must still count.
        (
            "kafka",
            (
                "\"sasl.password\" = \"first-password\"",
                "\"sasl.password\" = \"second-password\"",
            ),
        ),
        (
            "routes",
            (
                "[dedup]",
                "[[routes]]\nevent_type = \"whitelabel_ticket_*\"\nkey = \"/event_id\"\n[dedup]",
            ),
        ),
        ("dedup", ("window_secs = 86400", "window_secs = 3600")),
        ("reload", ("watch_interval_ms = 0", "watch_interval_ms = 1")),
        ("log", ("level = \"info\"", "level = \"info,rdkafka=warn\"")),
    ];
    for (section, (from, to)) in changes {
        assert!(BASE.contains(from), "{from}");
        std::fs::write(&file, BASE.replacen(from, to, 1)).unwrap();
        reload(&bridge, "restart_needed").await;
        let named = last_restart_warning(&bridge);
        assert_eq!(named, format!("[\"{section}\"]"), "changing {section}");
        // Still different from what runs: reported again, not taken as applied.
        reload(&bridge, "restart_needed").await;
        std::fs::write(&file, BASE).unwrap();
        reload(&bridge, "applied").await;
    }
    let log = bridge.log_text();
    assert!(!log.contains("first-password") && !log.contains("second-password"));
}
