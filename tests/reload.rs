//! Reloads: secrets and certificates rotated with SIGHUP while requests are in flight, a
//! changed secret file picked up without a signal, unsigned deliveries never turned on by a
//! reload; and a reload that tells the truth: changing a setting that takes a restart, a
//! redacted one among them, is reported as such in the log and in
//! `tamio_bridge_reloads_total`, for every section, for as long as the file differs from
//! what runs.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::signing::*;
use common::tls::*;
use common::*;
use http::StatusCode;

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

async fn reloads_of(bridge: &Process, result: &str) -> f64 {
    let metrics = get(bridge.admin, "/metrics").await.text();
    sample(
        &metrics,
        &format!("tamio_bridge_reloads_total{{result=\"{result}\"}}"),
    )
}

/// Sends SIGHUP and waits until the reload was counted under `result`.
async fn reload(bridge: &Process, result: &str) {
    let before = reloads_of(bridge, result).await;
    bridge.signal("HUP");
    let started = Instant::now();
    while reloads_of(bridge, result).await < before + 1.0 {
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
    let mut cmd = command(&bridge_env(&brokers, &topic));
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

fn replace_file(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("next");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn reloads(admin: SocketAddr, result: &str) -> f64 {
    sample(
        &get(admin, "/metrics").await.text(),
        &format!(r#"tamio_bridge_reloads_total{{result="{result}"}}"#),
    )
}

async fn wait_for_reloads(admin: SocketAddr, result: &str, count: f64) {
    let started = Instant::now();
    while reloads(admin, result).await < count {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no {result} reload #{count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_secrets_and_certificate_with_requests_in_flight() {
    const OLD: &str = "rotation-old-secret-1b9f";
    const NEW: &str = "rotation-new-secret-c44a";
    let pki = Pki::new();
    let first_cert = pki.issue("first");
    let second_cert = pki.issue_until("second", 2032);
    let cert = pki.path("server.crt");
    let key = pki.path("server.key");
    std::fs::copy(pki.path("first.crt"), &cert).unwrap();
    std::fs::copy(pki.path("first.key"), &key).unwrap();
    let secrets = pki.path("secrets");
    std::fs::write(&secrets, format!("{OLD}\n")).unwrap();

    let topic = unique_topic("rotation");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let mut bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
        (
            "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES",
            secrets.to_str().unwrap(),
        ),
        (
            "TAMIO_BRIDGE__SERVER__TLS_CERT_FILE",
            cert.to_str().unwrap(),
        ),
        ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
        ("TAMIO_BRIDGE__LOG__LEVEL", "debug"),
        // SIGHUP only: the file watch is tested on its own.
        ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "0"),
    ]);
    bridge.wait_ready().await;

    // Senders run throughout, each request on a connection of its own, signing with the
    // secret the sender currently uses.
    let current = Arc::new(Mutex::new(OLD));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let certs_seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    // Requests each sender has had answered.
    let answered: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let mut workers = Vec::new();
    for w in 0..4 {
        let (current, stop, acked, failures, certs_seen, answered) = (
            current.clone(),
            stop.clone(),
            acked.clone(),
            failures.clone(),
            certs_seen.clone(),
            answered.clone(),
        );
        let (addr, ca) = (bridge.addr, pki.ca_pem());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("whev_rot_{w}_{i}");
                let body = ticket_event(&id, &format!("ticket-rot-{w}"), i);
                let secret = *current.lock().unwrap();
                let sig = tamio_header(secret, &body);
                match tls_post(
                    addr,
                    &ca,
                    false,
                    &[("tamio-signature", &sig)],
                    body.as_bytes(),
                )
                .await
                {
                    Ok(r) if r.status == StatusCode::OK => {
                        acked.lock().unwrap().push(id);
                        let mut seen = certs_seen.lock().unwrap();
                        if !seen.contains(&r.server_cert) {
                            seen.push(r.server_cert);
                        }
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{id}: {} {}", r.status, r.body)),
                    Err(e) => failures.lock().unwrap().push(format!("{id}: {e}")),
                }
                answered[w].fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    // Waits until every sender has had `n` more requests answered: with n of 2 or more,
    // each has sent at least one request that started after this call.
    let wait_each = |n: usize| {
        let answered = answered.clone();
        async move {
            let targets: Vec<usize> = answered
                .iter()
                .map(|a| a.load(Ordering::SeqCst) + n)
                .collect();
            while answered
                .iter()
                .zip(&targets)
                .any(|(a, t)| a.load(Ordering::SeqCst) < *t)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // 1. Both secrets accepted, and the second certificate, then the sender switches.
    wait_each(10).await;
    replace_file(&secrets, format!("{OLD}\n{NEW}\n").as_bytes());
    replace_file(&key, &std::fs::read(pki.path("second.key")).unwrap());
    replace_file(&cert, &std::fs::read(pki.path("second.crt")).unwrap());
    bridge.signal("HUP");
    wait_for_reloads(bridge.admin, "applied", 1.0).await;
    wait_each(10).await;
    *current.lock().unwrap() = NEW;
    wait_each(10).await;
    // 2. The old secret retired.
    replace_file(&secrets, format!("{NEW}\n").as_bytes());
    bridge.signal("HUP");
    wait_for_reloads(bridge.admin, "applied", 2.0).await;
    wait_each(10).await;
    // 3. A reload that cannot be applied changes nothing.
    std::fs::remove_file(&secrets).unwrap();
    bridge.signal("HUP");
    wait_for_reloads(bridge.admin, "failed", 1.0).await;
    wait_each(10).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "requests failed during rotation: {failures:?}"
    );
    let certs_seen = certs_seen.lock().unwrap().clone();
    assert_eq!(certs_seen, vec![first_cert, second_cert.clone()]);

    // The retired secret is refused; the new one still works after the failed reload.
    let body = ticket_event("whev_rot_after", "ticket-rot-after", 0);
    let old = tls_post(
        bridge.addr,
        &pki.ca_pem(),
        false,
        &[("tamio-signature", &tamio_header(OLD, &body))],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(old.status, StatusCode::UNAUTHORIZED, "{}", old.body);
    let new = tls_post(
        bridge.addr,
        &pki.ca_pem(),
        true,
        &[("tamio-signature", &tamio_header(NEW, &body))],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(new.status, StatusCode::OK, "{}", new.body);
    assert_eq!(new.server_cert, second_cert);
    let expiry = sample(
        &get(bridge.admin, "/metrics").await.text(),
        "tamio_bridge_tls_certificate_expiry_timestamp_seconds",
    );
    assert_eq!(expiry, 1_956_528_000.0, "the second certificate's notAfter");

    bridge.signal("TERM");
    assert_eq!(bridge.wait(Duration::from_secs(30)), 0);
    let mut expected = acked.lock().unwrap().clone();
    expected.push("whev_rot_after".into());
    assert_all_in_kafka(&topic, &expected).await;
    assert!(expected.len() > 200, "only {} deliveries", expected.len());

    let log = bridge.log_text();
    assert!(log.contains("SIGHUP received"), "{log}");
    assert!(log.contains("reload refused"), "{log}");
    for secret in [OLD, NEW] {
        assert!(!log.contains(secret), "a secret appeared in the log");
    }
}

/// Consumer options for a TLS broker checked against `ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_secret_file_is_picked_up_without_a_signal() {
    const OLD: &str = "watched-old-secret-0e7d";
    const NEW: &str = "watched-new-secret-f21b";
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, OLD).unwrap();
    let topic = unique_topic("watch");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let bridge = Process::spawn(&[
        ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
        (
            "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES",
            secrets.to_str().unwrap(),
        ),
        ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "100"),
    ]);
    bridge.wait_ready().await;
    let send = |secret: &'static str, id: &'static str| {
        let url = bridge.url();
        async move {
            let body = ticket_event(id, "ticket-watch", 0);
            post_signed(&url, &body, secret, now()).await.status
        }
    };
    assert_eq!(send(NEW, "whev_watch_1").await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(OLD, "whev_watch_2").await, StatusCode::OK);
    assert_eq!(reloads(bridge.admin, "applied").await, 0.0);

    // As a Kubernetes Secret volume does: the new content appears at once.
    replace_file(&secrets, NEW.as_bytes());
    wait_for_reloads(bridge.admin, "applied", 1.0).await;
    assert_eq!(send(NEW, "whev_watch_3").await, StatusCode::OK);
    assert_eq!(send(OLD, "whev_watch_4").await, StatusCode::UNAUTHORIZED);
    assert!(bridge.log_text().contains("file changed"));

    // A file that vanishes (or is caught half-written) fails the reload; the bridge keeps
    // its secrets and tries again at every interval until the file is back.
    std::fs::remove_file(&secrets).unwrap();
    wait_for_reloads(bridge.admin, "failed", 2.0).await;
    assert_eq!(send(NEW, "whev_watch_5").await, StatusCode::OK);
    std::fs::write(&secrets, OLD).unwrap();
    wait_for_reloads(bridge.admin, "applied", 2.0).await;
    assert_eq!(send(OLD, "whev_watch_6").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_turns_unsigned_deliveries_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    let with_secret = format!("[signature]\nsecrets = [\"{SECRET}\"]\nallow_unsigned = true\n");
    std::fs::write(&config, &with_secret).unwrap();
    let topic = unique_topic("unsigned-reload");
    create_topic(&topic, 3).await;
    let brokers = brokers();
    let bridge = Process::spawn_with_args(
        &[
            ("TAMIO_BRIDGE__KAFKA__BROKERS", &brokers),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", &topic),
            ("TAMIO_BRIDGE__RELOAD__WATCH_INTERVAL_MS", "100"),
        ],
        &["--config", config.to_str().unwrap()],
    );
    bridge.wait_ready().await;
    // The flag left in the file, the secret removed: refused, the secret stays in force.
    replace_file(&config, b"[signature]\nallow_unsigned = true\n");
    wait_for_reloads(bridge.admin, "failed", 1.0).await;
    let body = ticket_event("whev_unsigned_reload", "ticket-ur", 0);
    let url = bridge.url();
    let unsigned = post(
        &url,
        &[("content-type", "application/json")],
        body.clone().into_bytes(),
    )
    .await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    let signed = post(
        &url,
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &tamio_header(SECRET, &body)),
        ],
        body.into_bytes(),
    )
    .await;
    assert_eq!(signed.status, StatusCode::OK, "{}", signed.text());
    assert_eq!(
        sample(
            &get(bridge.admin, "/metrics").await.text(),
            "tamio_bridge_unsigned_allowed"
        ),
        0.0
    );
    assert!(
        bridge.log_text().contains("takes a restart"),
        "{}",
        bridge.log_text()
    );
}
