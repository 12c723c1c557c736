//! What deploy/ relies on is what a running bridge exports: every metric name used by the
//! Grafana dashboard and the alert rules appears on /metrics.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// Metric names (`tamio_bridge_*`, `process_*`) mentioned in a file.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["tamio_bridge_", "process_"] {
        for (start, _) in text.match_indices(prefix) {
            let before = text[..start].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut used = BTreeSet::new();
    for file in [
        "deploy/grafana/tamio-bridge.json",
        "deploy/prometheus/alerts.yml",
        "deploy/kubernetes/base/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let names = names_in(&text);
        assert!(!names.is_empty(), "{file} uses no metric");
        used.extend(names);
    }

    let topic = unique_topic("deploy");
    create_topic(&topic, 1).await;
    let mut s = settings(&topic, &[]);
    s.kafka
        .librdkafka
        .insert("statistics.interval.ms".into(), "200".into());
    let bridge = Bridge::start_ready(s).await;
    // Per-broker series exist once the first statistics arrived.
    let mut exported = String::new();
    for _ in 0..50 {
        exported = bridge.metrics().await;
        if exported.contains("tamio_bridge_kafka_broker_up{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exported: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "deploy/ uses metrics the bridge does not export: {missing:?}"
    );
    bridge.stop().await;
}

#[test]
fn the_settings_deploy_ships_fit_the_pod_memory_limit() {
    let root = env!("CARGO_MANIFEST_DIR");
    let limit = common::siege::pod_memory_limit();
    for file in [
        "deploy/kubernetes/base/bridge.toml",
        "deploy/kubernetes/overlays/example/bridge.toml",
    ] {
        // The files the settings name are mounted in the pod, not here: the budget depends
        // on none of them.
        let env = [
            ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
            ("TAMIO_BRIDGE__SIGNATURE__SECRET_FILES", ""),
            ("TAMIO_BRIDGE__KAFKA__SASL__PASSWORD_FILE", ""),
            ("TAMIO_BRIDGE__DEDUP__REDIS_PASSWORD_FILE", ""),
            ("TAMIO_BRIDGE__DEDUP__REDIS_SENTINEL_PASSWORD_FILE", ""),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let path = std::path::PathBuf::from(format!("{root}/{file}"));
        let settings = tamio_kafka_bridge::config::Settings::load_from(Some(&path), env)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let budget = tamio_kafka_bridge::memory::Budget::of(&settings);
        println!("{file}: {budget}; pod limit {} MiB", limit >> 20);
        // With a tenth of the limit left for the allocator's slack.
        assert!(
            budget.total() <= limit / 10 * 9,
            "{file}: {budget} does not fit the pod's {} MiB",
            limit >> 20
        );
    }
}
