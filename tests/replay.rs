//! `tamio-kafka-bridge replay`, the real binary against the test broker: dead letters made by
//! live deliveries put through once the cause is fixed, once each and in ticket order;
//! forged ones refused; a dry run that writes nothing; filters; a stopped replay resumed.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tamio_kafka_bridge::ingest::verify;

/// The live bridge's routes: only `whitelabel_ticket_created`; the other ticket events are
/// unroutable, so they go to the dead-letter topic.
const ONLY_CREATED: &str =
    "[[routes]]\nevent_type = \"whitelabel_ticket_created\"\nkey = \"/data/ticket/id\"\n";

/// The replay's environment: the bridge's settings with the default routes (every ticket
/// event routed), i.e. the cause fixed.
fn replay_env<'a>(topic: &'a str, dlt: &'a str, brokers: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("TAMIO_BRIDGE__KAFKA__BROKERS", brokers),
        ("TAMIO_BRIDGE__KAFKA__TOPIC", topic),
        ("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt),
        ("TAMIO_BRIDGE__SIGNATURE__SECRETS", SECRET),
    ]
}

/// Runs `replay --output json` with `args`; its exit status and summary.
fn replay(env: &[(&str, &str)], args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["replay", "--output", "json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_to_exit(env, &all);
    let summary = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("replay printed no JSON summary ({e}): {stdout}\n{stderr}"));
    (code, summary)
}

fn event(event_id: &str, event_type: &str, endpoint: &str, ticket: &str, seq: usize) -> String {
    serde_json::json!({
        "event_id": event_id,
        "event_type": event_type,
        "api_version": 2,
        "object": "event",
        "endpoint_id": endpoint,
        "data": {"ticket": {"id": ticket, "seq": seq, "is_open": true}}
    })
    .to_string()
}

fn writer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

/// Writes a record to the dead-letter topic as the bridge would, or as a forger might.
async fn write_letter(dlt: &str, key: &str, body: &str, headers: &[(&str, &str)]) {
    write_with(&writer(), dlt, key, body, headers).await
}

async fn write_with(
    producer: &FutureProducer,
    dlt: &str,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::to(dlt).key(key).payload(body).headers(h),
            Duration::from_secs(10),
        )
        .await
        .expect("writing a dead letter");
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap()),
    )
    .to_string()
}

/// Writes `n` correctly signed dead letters of `whitelabel_ticket_updated` events
/// `whev_<prefix>_<i>` over `tickets` tickets (`tk-<prefix><i % tickets>`, the key), received
/// now and refused as unroutable; returns their event ids. Written by an idempotent producer
/// many at a time: a ticket's letters keep their order in its partition.
async fn write_signed_letters(dlt: &str, prefix: &str, n: usize, tickets: usize) -> Vec<String> {
    write_signed_letters_at(&brokers(), dlt, prefix, n, tickets).await
}

/// [`write_signed_letters`] on the brokers at `bootstrap`.
async fn write_signed_letters_at(
    bootstrap: &str,
    dlt: &str,
    prefix: &str,
    n: usize,
    tickets: usize,
) -> Vec<String> {
    let received = rfc3339(now());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut ids = Vec::new();
    let mut sends = Vec::new();
    for i in 0..n {
        let id = format!("whev_{prefix}_{i}");
        let ticket = format!("tk-{prefix}{}", i % tickets);
        let body = event(&id, "whitelabel_ticket_updated", "ep-1", &ticket, i);
        let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "error_kind",
                value: Some("unroutable_event"),
            })
            .insert(Header {
                key: "signature",
                value: Some(sig.as_str()),
            })
            .insert(Header {
                key: "received_at",
                value: Some(received.as_str()),
            });
        let record = FutureRecord::to(dlt)
            .key(&ticket)
            .payload(&body)
            .headers(headers);
        sends.push(
            producer
                .send_result(record)
                .unwrap_or_else(|(e, _)| panic!("queueing a dead letter: {e}")),
        );
        ids.push(id);
        if sends.len() == 1000 || i + 1 == n {
            for delivery in std::mem::take(&mut sends) {
                delivery
                    .await
                    .unwrap()
                    .unwrap_or_else(|(e, _)| panic!("writing a dead letter: {e}"));
            }
        }
    }
    ids
}

/// The exit code and the JSON summary of a replay run once it ends (its standard error, if
/// its output is no summary).
async fn finished(child: std::process::Child) -> (Option<i32>, serde_json::Value) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), summary)
}

/// A destination topic and a dead-letter topic of `partitions` each, on `broker` (the
/// test broker when None).
async fn replay_topics(broker: Option<&OwnBroker>, partitions: i32) -> (String, String) {
    let (topic, dlt) = (unique_topic("replay-main"), unique_topic("replay-dlt"));
    for t in [&topic, &dlt] {
        match broker {
            Some(broker) => broker.create_topic(t, partitions).await,
            None => create_topic(t, partitions).await,
        }
    }
    (topic, dlt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_routes_put_every_dead_letter_through_once_in_ticket_order() {
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 3).await;
    create_topic(&dlt, 3).await;
    let bridge = Bridge::start_ready(settings_with_file(
        &topic,
        ONLY_CREATED,
        &[("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str())],
    ))
    .await;
    // 5 tickets, 6 unroutable updates each, interleaved; and one routable event.
    let mut sent = Vec::new();
    for seq in 0..6 {
        for t in 0..5 {
            let id = format!("whev_r_{t}_{seq}");
            let body = event(
                &id,
                "whitelabel_ticket_updated",
                "ep-1",
                &format!("tk-{t}"),
                seq,
            );
            let reply = bridge.send(&body).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
            assert_eq!(reply.json()["error"], "unroutable_event");
            sent.push(id);
        }
    }
    let created = event(
        "whev_r_created",
        "whitelabel_ticket_created",
        "ep-1",
        "tk-0",
        0,
    );
    assert_eq!(bridge.send(&created).await.status, StatusCode::OK);
    bridge.stop().await;
    let letters = read_topic(&dlt, 30).await;
    assert_eq!(letters.len(), 30);
    // A ticket's dead letters share a partition (keyed by ticket), so a replay keeps their order.
    for letter in &letters {
        let ticket = letter.json()["data"]["ticket"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(letter.key.as_deref(), Some(ticket.as_str()));
    }

    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    let (code, summary) = replay(&env, &[]);
    assert_eq!(code, 0, "{summary:#}");
    assert_eq!(summary["read"], 30);
    assert_eq!(summary["published"], 30);
    assert_eq!(summary["complete"], true);

    let records = read_topic(&topic, 31).await;
    assert_eq!(records.len(), 31, "{:?}", event_ids(&records));
    let replayed: Vec<_> = records
        .iter()
        .filter(|r| r.headers.contains_key("replayed_from"))
        .collect();
    assert_eq!(replayed.len(), 30);
    let ids: HashSet<&str> = replayed
        .iter()
        .map(|r| r.headers["event_id"].as_str())
        .collect();
    assert_eq!(ids, sent.iter().map(String::as_str).collect::<HashSet<_>>());
    // In each ticket's order, with the record format of a live delivery.
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let positions: HashSet<String> = letters
        .iter()
        .map(|l| format!("{dlt}:{}:{}", l.partition, l.offset))
        .collect();
    for r in &replayed {
        let json = r.json();
        let ticket = json["data"]["ticket"]["id"].as_str().unwrap().to_owned();
        assert_eq!(r.key.as_deref(), Some(ticket.as_str()));
        seqs.entry(ticket)
            .or_default()
            .push(json["data"]["ticket"]["seq"].as_u64().unwrap());
        assert!(
            positions.contains(&r.headers["replayed_from"]),
            "{:?}",
            r.headers
        );
        assert!(humantime::parse_rfc3339(&r.headers["replayed_at"]).is_ok());
        assert!(r.headers["signature"].starts_with("t="));
        assert_eq!(r.headers["ce_type"], "whitelabel_ticket_updated");
        assert_eq!(r.headers["event_type"], "whitelabel_ticket_updated");
        assert!(r.headers.contains_key("traceparent"));
    }
    assert_eq!(seqs.len(), 5);
    for (ticket, seq) in &seqs {
        assert_eq!(seq, &(0..6).collect::<Vec<u64>>(), "ticket {ticket}");
    }

    // The same command again: the group's committed offsets say it is done.
    let (code, summary) = replay(&env, &[]);
    assert_eq!(code, 0, "{summary:#}");
    assert_eq!(summary["read"], 0);
    assert_eq!(summary["published"], 0);
    assert_eq!(read_topic(&topic, 31).await.len(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_or_stale_dead_letters_stay_and_are_counted() {
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 1).await;
    create_topic(&dlt, 1).await;
    let t = now() - 3600;
    let received = rfc3339(t + 2);
    let genuine = event("whev_f_ok", "whitelabel_ticket_updated", "ep-1", "tk-f", 0);
    let sig = verify::header_value(SECRET.as_bytes(), t, genuine.as_bytes());
    let altered = genuine.replace("\"seq\":0", "\"seq\":9");
    let forged = event(
        "whev_f_forged",
        "whitelabel_ticket_updated",
        "ep-1",
        "tk-f",
        1,
    );
    let forged_sig = verify::header_value(b"not-the-secret", t, forged.as_bytes());
    let stale = event(
        "whev_f_stale",
        "whitelabel_ticket_updated",
        "ep-1",
        "tk-f",
        2,
    );
    let stale_sig = verify::header_value(SECRET.as_bytes(), t - 3600, stale.as_bytes());
    let kind = ("error_kind", "unroutable_event");
    // Signed an hour ago, received two seconds later: the window is judged at receipt.
    write_letter(
        &dlt,
        "tk-f",
        &genuine,
        &[kind, ("signature", &sig), ("received_at", &received)],
    )
    .await;
    // The genuine signature over a body that was changed since.
    write_letter(
        &dlt,
        "tk-f",
        &altered,
        &[kind, ("signature", &sig), ("received_at", &received)],
    )
    .await;
    // Signed with another secret.
    write_letter(
        &dlt,
        "tk-f",
        &forged,
        &[kind, ("signature", &forged_sig), ("received_at", &received)],
    )
    .await;
    // Signed an hour before its receipt: outside the 300 s window then.
    write_letter(
        &dlt,
        "tk-f",
        &stale,
        &[kind, ("signature", &stale_sig), ("received_at", &received)],
    )
    .await;
    // No signature at all.
    let bare = event(
        "whev_f_bare",
        "whitelabel_ticket_updated",
        "ep-1",
        "tk-f",
        3,
    );
    write_letter(&dlt, "tk-f", &bare, &[kind, ("received_at", &received)]).await;

    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    let (code, summary) = replay(&env, &[]);
    assert_eq!(code, 2, "some stay refused: {summary:#}");
    assert_eq!(summary["read"], 5);
    assert_eq!(summary["published"], 1);
    assert_eq!(summary["refused"]["invalid_signature"], 4, "{summary:#}");
    let stayed: Vec<&str> = summary["stayed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        stayed,
        ["whev_f_ok", "whev_f_forged", "whev_f_stale", "whev_f_bare"]
    );
    assert_eq!(
        summary["stayed"][0]["offset"], 1,
        "the altered body is the one at offset 1"
    );
    let records = read_topic(&topic, 1).await;
    assert_eq!(event_ids(&records), ["whev_f_ok"]);
    assert_eq!(records[0].json()["data"]["ticket"]["seq"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_writes_nothing_and_the_filters_select_exactly() {
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 1).await;
    create_topic(&dlt, 1).await;
    let bridge = Bridge::start_ready(settings_with_file(
        &topic,
        ONLY_CREATED,
        &[("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str())],
    ))
    .await;
    // Offsets 0..8: endpoints a/b alternate; types updated, assigned, resolved in turn;
    // offset 8 an invalid envelope (api_version 3).
    let types = [
        "whitelabel_ticket_updated",
        "whitelabel_ticket_assigned",
        "whitelabel_ticket_resolved",
    ];
    let mut letters = Vec::new();
    for i in 0..8 {
        let endpoint = if i % 2 == 0 { "ep-a" } else { "ep-b" };
        let id = format!("whev_s_{i}");
        let body = event(&id, types[i % 3], endpoint, &format!("tk-s{i}"), i);
        assert_eq!(bridge.send(&body).await.status, StatusCode::BAD_REQUEST);
        letters.push((id, endpoint, types[i % 3]));
    }
    let invalid = event(
        "whev_s_bad",
        "whitelabel_ticket_updated",
        "ep-a",
        "tk-bad",
        8,
    )
    .replace("\"api_version\":2", "\"api_version\":3");
    assert_eq!(bridge.send(&invalid).await.status, StatusCode::BAD_REQUEST);
    bridge.stop().await;
    assert_eq!(read_topic(&dlt, 9).await.len(), 9);

    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    // A dry run: what would be published, what would stay and why; nothing written.
    let (code, summary) = replay(&env, &["--dry-run"]);
    assert_eq!(code, 2, "{summary:#}");
    assert_eq!(summary["read"], 9);
    assert_eq!(summary["would_publish"], 8);
    assert_eq!(summary["would_publish_to"][topic.as_str()], 8);
    assert_eq!(summary["refused"]["invalid_envelope"], 1);
    assert_eq!(summary["published"], 0);
    assert!(read_topic(&topic, 0).await.is_empty());
    // Nor is its position kept: a dry run again sees the same.
    let (_, again) = replay(&env, &["--dry-run"]);
    assert_eq!(again["read"], 9);
    assert!(read_topic(&topic, 0).await.is_empty());

    let (code, s) = replay(&env, &["--dry-run", "--endpoint-id", "ep-b"]);
    assert_eq!(
        (code, s["selected"].as_u64(), s["would_publish"].as_u64()),
        (0, Some(4), Some(4))
    );
    let (_, s) = replay(
        &env,
        &["--dry-run", "--event-type", "whitelabel_ticket_as*"],
    );
    assert_eq!(s["selected"], 3, "{s:#}");
    let (_, s) = replay(&env, &["--dry-run", "--error-kind", "invalid_envelope"]);
    assert_eq!(
        (s["selected"].as_u64(), s["would_publish"].as_u64()),
        (Some(1), Some(0))
    );
    let (_, s) = replay(&env, &["--dry-run", "--since", "0:2", "--until", "0:5"]);
    assert_eq!(s["selected"], 3, "{s:#}");

    // For real, one selection: endpoint ep-a's resolved and updated events, offsets 2 on.
    let (code, s) = replay(
        &env,
        &[
            "--endpoint-id",
            "ep-a",
            "--event-type",
            "whitelabel_ticket_*",
            "--error-kind",
            "unroutable_event",
            "--since",
            "0:2",
        ],
    );
    assert_eq!(code, 0, "{s:#}");
    let expected: Vec<&str> = letters
        .iter()
        .enumerate()
        .filter(|(i, (_, endpoint, _))| *i >= 2 && *endpoint == "ep-a")
        .map(|(_, (id, _, _))| id.as_str())
        .collect();
    assert_eq!(s["published"].as_u64(), Some(expected.len() as u64));
    let records = read_topic(&topic, expected.len()).await;
    assert_eq!(event_ids(&records), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_stopped_midway_resumes_with_nothing_lost_or_written_twice() {
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 3).await;
    create_topic(&dlt, 3).await;
    const N: usize = 4000;
    let ids = write_signed_letters(&dlt, "k", N, 50).await;
    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    // One record at a time, so that the signal lands midway; SIGINT as Ctrl-C sends it,
    // then SIGTERM as Kubernetes does, then SIGHUP as a dropped terminal does.
    let mut published_before = 0;
    // SIGHUP too: an SSH session or `kubectl exec` that drops ends the run like Ctrl-C.
    for signal in ["INT", "TERM", "HUP"] {
        let mut cmd = command(&env);
        cmd.args(["replay", "--output", "json", "--concurrency", "1"]);
        // Each record's outcome is logged at debug: the signal goes once 200 more are out.
        cmd.env("RUST_LOG", "info,tamio_kafka_bridge::replay=debug");
        cmd.stdout(std::process::Stdio::piped());
        cmd.stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = lines_tx.send(line);
            }
        });
        let (mut seen, mut log) = (0, Vec::new());
        while seen < 200 {
            match lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    seen += usize::from(line.contains("\"message\":\"published\""));
                    log.push(line);
                }
                Err(_) => panic!(
                    "the replay published {seen} records and then nothing for 20 s:\n{}",
                    log[log.len().saturating_sub(40)..].join("\n")
                ),
            }
        }
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let (code, summary) = finished(child).await;
        assert_eq!(code, Some(3), "stopped before the end: {summary:#}");
        assert_eq!(summary["complete"], false);
        assert_eq!(summary["stopped"], "interrupted");
        let published = summary["published"].as_u64().unwrap();
        assert!(
            published > 0 && published + published_before < N as u64,
            "{summary:#}"
        );
        published_before += published;
    }
    let (code, summary) = replay(&env, &[]);
    assert_eq!(code, 0, "{summary:#}");
    assert_eq!(
        summary["published"].as_u64().unwrap() + published_before,
        N as u64,
        "{summary:#}"
    );
    assert_all_in_kafka(&topic, &ids).await;
    let records = read_topic(&topic, N).await;
    assert_eq!(records.len(), N, "nothing written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shared_store_another_group_writes_nothing_again() {
    let redis = OwnRedis::start().await;
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 1).await;
    create_topic(&dlt, 1).await;
    write_signed_letters(&dlt, "g", 20, 1).await;
    let brokers = brokers();
    let url = redis.url();
    let mut env = replay_env(&topic, &dlt, &brokers);
    env.push(("TAMIO_BRIDGE__DEDUP__STORE", "redis"));
    env.push(("TAMIO_BRIDGE__DEDUP__REDIS_URL", &url));
    let (code, s) = replay(&env, &["--group", "first"]);
    assert_eq!((code, s["published"].as_u64()), (0, Some(20)), "{s:#}");
    // Another group reads them all again; the shared store knows every event id.
    let (code, s) = replay(&env, &["--group", "second"]);
    assert_eq!((code, s["read"].as_u64()), (0, Some(20)), "{s:#}");
    assert_eq!(
        (s["published"].as_u64(), s["duplicate"].as_u64()),
        (Some(0), Some(20))
    );
    assert_eq!(read_topic(&topic, 20).await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_is_a_clear_error() {
    let brokers = brokers();
    let topic = unique_topic("replay-main");
    create_topic(&topic, 1).await;
    let env = replay_env(&topic, "no-such-dead-letters", &brokers);
    let (code, stdout, stderr) = run_to_exit(&env, &["replay"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("no-such-dead-letters"), "{stderr}");
    let (code, _, stderr) = run_to_exit(
        &[("TAMIO_BRIDGE__KAFKA__BROKERS", brokers.as_str())],
        &["replay"],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("kafka.dead_letter_topic"), "{stderr}");
}

/// 10,000 dead letters over 200 tickets, replayed with the defaults: every one published
/// once. Prints the rate, the CPU and the peak memory (the figures of docs/operations.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_dead_letters_are_replayed_once_each() {
    const N: usize = 10_000;
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 3).await;
    create_topic(&dlt, 3).await;
    let ids = write_signed_letters(&dlt, "m", N, 200).await;
    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    let mut cmd = command(&env);
    cmd.args(["replay", "--output", "json"]);
    cmd.stdout(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let sampler = tokio::spawn(async move {
        let (mut cpu, mut rss) = (0.0_f64, 0.0_f64);
        loop {
            let (c, r) = (cpu_seconds(pid), peak_rss_mb(pid));
            if r.is_nan() {
                return (cpu, rss);
            }
            (cpu, rss) = (c.max(cpu), r.max(rss));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (code, summary) = finished(child).await;
    let (cpu, rss) = sampler.await.unwrap();
    assert_eq!(code, Some(0), "{summary:#}");
    assert_eq!(summary["published"].as_u64(), Some(N as u64));
    let secs = summary["elapsed_secs"].as_f64().unwrap();
    println!(
        "replay of {N} dead letters: {:.0} records/s ({secs:.2} s), CPU {cpu:.2} s \
         ({:.0} µs a record), peak RSS {rss:.1} MB",
        summary["records_per_sec"].as_f64().unwrap(),
        cpu * 1e6 / N as f64
    );
    assert_all_in_kafka(&topic, &ids).await;
    assert_eq!(
        read_topic(&topic, N).await.len(),
        N,
        "nothing written twice"
    );
}

/// Runs `[--config FILE] replay --output json` with `args`; its exit status and summary.
fn replay_with(
    env: &[(&str, &str)],
    config: Option<&std::path::Path>,
    args: &[&str],
) -> (i32, serde_json::Value) {
    let mut all = Vec::new();
    if let Some(config) = config {
        all.extend(["--config", config.to_str().unwrap()]);
    }
    all.extend(["replay", "--output", "json"]);
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_to_exit(env, &all);
    let summary = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("replay printed no JSON summary ({e}): {stdout}\n{stderr}"));
    (code, summary)
}

/// A notes event: not a ticket event, but it names its ticket.
fn note(event_id: &str, ticket: &str, seq: usize) -> String {
    event(event_id, "helpdesk_note_added", "ep-1", ticket, seq)
}

/// The routes once the cause is fixed: ticket events as by default, and notes keyed by their
/// ticket.
const NOTES_ROUTED: &str = "[[routes]]\nevent_type = \"whitelabel_ticket_*\"\nkey = \"/data/ticket/id\"\n\n[[routes]]\nevent_type = \"helpdesk_note_*\"\nkey = \"/data/ticket/id\"\n";

/// The sequence numbers of each ticket's records in `records`, in the order a consumer of
/// each partition reads them.
fn seqs_by_ticket(records: &[Record]) -> BTreeMap<String, Vec<u64>> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in sorted {
        let json = r.json();
        seqs.entry(json["data"]["ticket"]["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(json["data"]["ticket"]["seq"].as_u64().unwrap());
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_run_before_the_fix_leaves_every_letter_for_the_same_command_after_it() {
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 3).await;
    create_topic(&dlt, 3).await;
    // The live bridge routes ticket events only: notes are unroutable and dead-lettered.
    let bridge = Bridge::start_ready(settings_with_file(
        &topic,
        "[[routes]]\nevent_type = \"whitelabel_ticket_*\"\nkey = \"/data/ticket/id\"\n",
        &[("TAMIO_BRIDGE__KAFKA__DEAD_LETTER_TOPIC", dlt.as_str())],
    ))
    .await;
    const TICKETS: usize = 20;
    const N: usize = 200;
    for seq in 0..N / TICKETS {
        for t in 0..TICKETS {
            let body = note(&format!("whev_n_{t}_{seq}"), &format!("tk-n{t}"), seq);
            let reply = bridge.send(&body).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
        }
    }
    bridge.stop().await;
    // Every dead letter is keyed by its ticket, though notes are not ticket events.
    let letters = read_topic(&dlt, N).await;
    assert_eq!(letters.len(), N);
    for letter in &letters {
        let ticket = letter.json()["data"]["ticket"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            letter.key.as_deref(),
            Some(ticket.as_str()),
            "a dead letter's key"
        );
    }

    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed.toml");
    std::fs::write(&fixed, NOTES_ROUTED).unwrap();
    let fixed = Some(fixed.as_path());

    // Run before the fix, as an operator does to see what is there: every letter stays.
    let (code, s) = replay_with(&env, None, &[]);
    assert_eq!(code, 2, "{s:#}");
    assert_eq!(
        (s["read"].as_u64(), s["published"].as_u64()),
        (Some(N as u64), Some(0))
    );
    assert_eq!(
        s["refused"]["unroutable_event"].as_u64(),
        Some(N as u64),
        "{s:#}"
    );
    // The same again, still before the fix: the same letters, still there.
    let (code, s) = replay_with(&env, None, &[]);
    assert_eq!((code, s["read"].as_u64()), (2, Some(N as u64)), "{s:#}");

    // The fix, then a dry run: exactly what will be published.
    let (code, s) = replay_with(&env, fixed, &["--dry-run"]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["would_publish"].as_u64(), Some(N as u64), "{s:#}");
    assert_eq!(
        s["would_publish_to"][topic.as_str()].as_u64(),
        Some(N as u64)
    );

    // The same command as before the fix, now with the fixed routes: every letter once.
    let (code, s) = replay_with(&env, fixed, &[]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(
        (s["read"].as_u64(), s["published"].as_u64()),
        (Some(N as u64), Some(N as u64))
    );
    let records = read_topic(&topic, N).await;
    assert_eq!(records.len(), N, "{:?}", event_ids(&records));
    let ids: HashSet<String> = records
        .iter()
        .map(|r| r.headers["event_id"].clone())
        .collect();
    assert_eq!(ids.len(), N, "each letter once");
    // In each ticket's order.
    for (ticket, seqs) in seqs_by_ticket(&records) {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "ticket {ticket} out of order");
        assert_eq!(seqs.len(), N / TICKETS);
    }

    // A rerun writes nothing, and a dry run after it shows nothing to publish.
    let (code, s) = replay_with(&env, fixed, &[]);
    assert_eq!(
        (code, s["read"].as_u64(), s["published"].as_u64()),
        (0, Some(0), Some(0)),
        "{s:#}"
    );
    let (code, s) = replay_with(&env, fixed, &["--dry-run"]);
    assert_eq!((code, s["would_publish"].as_u64()), (0, Some(0)), "{s:#}");
    assert_eq!(read_topic(&topic, N).await.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_whose_letter_stays_keeps_its_later_letters_with_it() {
    let topic = unique_topic("replay-main");
    let dlt = unique_topic("replay-dlt");
    create_topic(&topic, 1).await;
    create_topic(&dlt, 1).await;
    let received = rfc3339(now());
    let producer = writer();
    // Ticket A: a note (unroutable until the fix), then two updates. Ticket B: updates only.
    let letters = [
        ("whev_o_a0", "helpdesk_note_added", "tk-a", 0),
        ("whev_o_b0", "whitelabel_ticket_updated", "tk-b", 0),
        ("whev_o_a1", "whitelabel_ticket_updated", "tk-a", 1),
        ("whev_o_b1", "whitelabel_ticket_updated", "tk-b", 1),
        ("whev_o_a2", "whitelabel_ticket_updated", "tk-a", 2),
    ];
    for (id, kind, ticket, seq) in letters {
        let body = event(id, kind, "ep-1", ticket, seq);
        let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
        let headers = [
            ("error_kind", "unroutable_event"),
            ("signature", sig.as_str()),
            ("received_at", received.as_str()),
        ];
        write_with(&producer, &dlt, ticket, &body, &headers).await;
    }
    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    // Before the fix: ticket B goes through; ticket A's updates stay behind its note.
    let (code, s) = replay(&env, &[]);
    assert_eq!(code, 2, "{s:#}");
    assert_eq!(s["published"].as_u64(), Some(2), "{s:#}");
    assert_eq!(s["refused"]["unroutable_event"].as_u64(), Some(1), "{s:#}");
    assert_eq!(
        s["refused"]["held_for_ticket_order"].as_u64(),
        Some(2),
        "{s:#}"
    );
    assert_eq!(
        event_ids(&read_topic(&topic, 2).await),
        ["whev_o_b0", "whev_o_b1"]
    );

    // After it: ticket A's three, in order, and nothing of B again.
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("fixed.toml");
    std::fs::write(&routes, NOTES_ROUTED).unwrap();
    let (code, s) = replay_with(&env, Some(&routes), &[]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(
        (s["read"].as_u64(), s["published"].as_u64()),
        (Some(3), Some(3)),
        "{s:#}"
    );
    let records = read_topic(&topic, 5).await;
    assert_eq!(
        event_ids(&records),
        [
            "whev_o_b0",
            "whev_o_b1",
            "whev_o_a0",
            "whev_o_a1",
            "whev_o_a2"
        ]
    );
}

/// Starts `replay --output json` with debug logs of each record; returns the child and a
/// channel of its log lines.
fn spawn_replay(
    env: &[(&str, &str)],
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut cmd = command(env);
    cmd.args(["replay", "--output", "json"]).args(args);
    cmd.env("RUST_LOG", "info,tamio_kafka_bridge::replay=debug");
    cmd.stdout(std::process::Stdio::piped());
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    (child, lines)
}

/// Waits until the replay has logged `n` published records.
fn wait_published(lines: &std::sync::mpsc::Receiver<String>, n: usize) {
    let (mut seen, mut log) = (0, Vec::new());
    while seen < n {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                seen += usize::from(line.contains("\"message\":\"published\""));
                log.push(line);
            }
            Err(_) => panic!(
                "the replay published {seen} records and then nothing for 30 s:\n{}",
                log[log.len().saturating_sub(40)..].join("\n")
            ),
        }
    }
}

/// Each id of `records` once, and each ticket's in order.
fn assert_once_in_order(records: &[Record], ids: &[String]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        *counts.entry(r.headers["event_id"].as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "written twice: {twice:?}");
    let missing: Vec<_> = ids
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "missing: {} of {}",
        missing.len(),
        ids.len()
    );
    assert_eq!(records.len(), ids.len());
    for (ticket, seqs) in seqs_by_ticket(records) {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "ticket {ticket} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_halted_by_kafka_writes_nothing_twice_for_read_committed_readers() {
    let broker = OwnBroker::start().await;
    let (topic, dlt) = replay_topics(Some(&broker), 3).await;
    const N: usize = 3000;
    let bootstrap = broker.address();
    let ids = write_signed_letters_at(&bootstrap, &dlt, "h", N, 60).await;
    let mut env = replay_env(&topic, &dlt, &bootstrap);
    env.extend([
        ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "2000"),
        ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "3000"),
    ]);
    let (child, lines) = spawn_replay(&env, &[]);
    wait_published(&lines, 300);
    // Frozen with records in flight: their deliveries time out, though the broker may still
    // write them once it runs again; the replay halts.
    broker.freeze();
    tokio::time::sleep(Duration::from_secs(6)).await;
    broker.thaw();
    let (code, summary) = finished(child).await;
    assert_eq!(code, Some(3), "halted: {summary:#}");
    assert!(
        summary["stopped"].as_str().unwrap().contains("Kafka"),
        "{summary:#}"
    );

    let (code, s) = replay(&env, &[]);
    assert_eq!(code, 0, "{s:#}");
    let committed = read_topic_from(
        &bootstrap,
        &topic,
        N,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_once_in_order(&committed, &ids);
    let uncommitted = read_topic_with(
        &bootstrap,
        &[("isolation.level", "read_uncommitted")],
        &topic,
        N,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    println!(
        "halted by a frozen broker: {} records in the topic, {} of them in aborted transactions",
        uncommitted.len(),
        uncommitted.len() - committed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_at_random_points_leaves_every_letter_once() {
    let (topic, dlt) = replay_topics(None, 3).await;
    const N: usize = 6000;
    const KILLS: usize = 25;
    let ids = write_signed_letters(&dlt, "x", N, 60).await;
    let brokers = brokers();
    let env = replay_env(&topic, &dlt, &brokers);
    // The kill points: printed, so that a failure can be run again the same way.
    let mut seed = std::env::var("TAMIO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() as u64);
    println!("kill points from seed {seed} (TAMIO_TEST_SEED)");
    let (mut killed, mut mid_transaction, mut published_before) = (0, 0, 0);
    for _ in 0..KILLS {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Killed right after its n-th record is acknowledged: each run has published
        // something, and its open transaction holds at least that record.
        let n = 1 + (seed >> 33) as usize % 150;
        // One record at a time: each run gets a few hundred through before its kill.
        let (mut child, lines) = spawn_replay(&env, &["--concurrency", "1"]);
        let kill_after = tokio::task::spawn_blocking(move || {
            wait_published(&lines, n);
            lines
        })
        .await
        .unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its kill"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        killed += 1;
        published_before += n;
        // Mid-transaction: no commit after the last record it logged.
        let mut last = "published";
        while let Ok(line) = kill_after.try_recv() {
            if line.contains("\"message\":\"committed\"") {
                last = "committed";
            } else if line.contains("\"message\":\"published\"") {
                last = "published";
            }
        }
        mid_transaction += usize::from(last == "published");
    }
    assert_eq!(killed, KILLS, "every run was killed before the end");
    assert!(
        mid_transaction * 5 >= KILLS * 4,
        "only {mid_transaction} of {KILLS} kills landed with a transaction open"
    );
    let (code, s) = replay(&env, &[]);
    assert_eq!(code, 0, "{s:#}");
    let records = read_topic_from(
        &brokers,
        &topic,
        N,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_once_in_order(&records, &ids);
    println!(
        "{killed} runs killed with SIGKILL, each after publishing (1 to 150 records, \
         {published_before} in all), {mid_transaction} of them with a transaction open; then \
         one to the end: {N} letters, each once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_that_repeat_an_event_id_in_one_transaction_are_duplicates_not_a_stall() {
    let (topic, dlt) = replay_topics(None, 1).await;
    // The same three letters twice (a sender's retry dead-lettered again): one ticket, so
    // all six in one partition, read into one transaction.
    let ids = write_signed_letters(&dlt, "rep", 3, 1).await;
    write_signed_letters(&dlt, "rep", 3, 1).await;
    let brokers = brokers();
    let mut env = replay_env(&topic, &dlt, &brokers);
    // A claim waited on gives up after this: a stall shows within seconds.
    env.extend([
        ("TAMIO_BRIDGE__SERVER__REQUEST_TIMEOUT_MS", "3000"),
        ("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "2000"),
    ]);
    let started = Instant::now();
    let (code, s) = replay(&env, &[]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(
        (s["published"].as_u64(), s["duplicate"].as_u64()),
        (Some(3), Some(3)),
        "{s:#}"
    );
    let records = read_topic(&topic, 3).await;
    assert_once_in_order(&records, &ids);
    println!(
        "6 letters, 3 event ids repeated: published 3, 3 duplicates, in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_after_one_killed_between_its_offsets_and_its_commit_starts_at_once() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::Producer;
    use rdkafka::{Offset, TopicPartitionList};

    let (topic, dlt) = replay_topics(None, 1).await;
    let ids = write_signed_letters(&dlt, "kl", 20, 4).await;
    let brokers = brokers();
    let group = unique_topic("replay-group");
    // What a run killed right after sending its position leaves: its transactional id (the
    // group's name) with a transaction open at the coordinator, holding offsets for the
    // group that are pending until the transaction ends (Kafka's timeout: 60 s).
    {
        let (brokers, group, dlt) = (brokers.clone(), group.clone(), dlt.clone());
        tokio::task::spawn_blocking(move || {
            let killed: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("transactional.id", &group)
                .set("transaction.timeout.ms", "60000")
                .create()
                .unwrap();
            killed.init_transactions(Duration::from_secs(30)).unwrap();
            killed.begin_transaction().unwrap();
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .create()
                .unwrap();
            let mut offsets = TopicPartitionList::new();
            offsets
                .add_partition_offset(&dlt, 0, Offset::Offset(10))
                .unwrap();
            killed
                .send_offsets_to_transaction(
                    &offsets,
                    &consumer.group_metadata().unwrap(),
                    Duration::from_secs(30),
                )
                .unwrap();
            // Gone without a commit or an abort, as a SIGKILL leaves it.
            std::mem::forget(killed);
        })
        .await
        .unwrap();
    }
    let env = replay_env(&topic, &dlt, &brokers);
    let started = Instant::now();
    let (code, s) = replay(&env, &["--group", &group]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{s:#}");
    // The killed run's transaction was aborted by the new run's producer: its offsets never
    // counted, and every letter is published.
    assert_eq!(s["published"].as_u64(), Some(20), "{s:#}");
    assert!(
        took < Duration::from_secs(20),
        "the rerun waited {took:?} for the killed run's transaction"
    );
    assert_once_in_order(&read_topic(&topic, 20).await, &ids);
    println!("rerun after a run killed mid-commit: done in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_stops_at_once_when_interrupted_before_kafka_answers() {
    // Brokers that accept connections and never answer.
    let silent = Blackhole::start().await;
    let address = format!("127.0.0.1:{}", silent.port);
    let env = replay_env("replay-main", "replay-dlt", &address);
    let (mut child, _lines) = spawn_replay(&env, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting for Kafka"
    );
    let interrupted = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let took = interrupted.elapsed();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(3), "{summary:#}");
    assert!(
        summary["stopped"].as_str().unwrap().contains("interrupted"),
        "{summary:#}"
    );
    assert!(
        took < Duration::from_secs(2),
        "the replay took {took:?} to stop: a blocking Kafka call held it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_times_out_is_resumed_and_nothing_is_written_twice() {
    let broker = OwnBroker::start().await;
    let (topic, dlt) = replay_topics(Some(&broker), 1).await;
    const N: usize = 40;
    let bootstrap = broker.address();
    let ids = write_signed_letters_at(&bootstrap, &dlt, "cr", N, 8).await;
    let env = replay_env(&topic, &dlt, &bootstrap);
    let (child, lines) = spawn_replay(&env, &[]);
    wait_published(&lines, N);
    // Every record is written; the commit of the last transaction is under way. The broker
    // freezes for longer than one commit step may take (30 s at most): the commit times
    // out, and librdkafka keeps it in progress.
    broker.freeze();
    tokio::time::sleep(Duration::from_secs(32)).await;
    broker.thaw();
    let (code, summary) = finished(child).await;
    assert_eq!(code, Some(0), "{summary:#}");
    assert_eq!(summary["published"].as_u64(), Some(N as u64), "{summary:#}");
    let records = read_topic_from(
        &bootstrap,
        &topic,
        N,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_once_in_order(&records, &ids);
    // Nothing left to do: the same command finds every letter done.
    let (code, s) = replay(&env, &[]);
    assert_eq!((code, s["published"].as_u64()), (0, Some(0)), "{s:#}");
}
