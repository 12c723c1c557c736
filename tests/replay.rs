//! `tamio-kafka-bridge replay`, the real binary against the test broker: dead letters made by
//! live deliveries put through once the cause is fixed, once each and in ticket order;
//! forged ones refused; a dry run that writes nothing; filters; a stopped replay resumed.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

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
/// now and refused as unroutable; returns their event ids. One record a batch, as the bridge
/// writes dead letters (each waits for its acknowledgement): the test broker answers a fetch
/// that starts inside a batch of several with records librdkafka never hands over, so a
/// resumed position must be a batch's start.
async fn write_signed_letters(dlt: &str, prefix: &str, n: usize, tickets: usize) -> Vec<String> {
    let received = rfc3339(now());
    let producer = writer();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("whev_{prefix}_{i}");
        let ticket = format!("tk-{prefix}{}", i % tickets);
        let body = event(&id, "whitelabel_ticket_updated", "ep-1", &ticket, i);
        let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
        let headers = [
            ("error_kind", "unroutable_event"),
            ("signature", sig.as_str()),
            ("received_at", received.as_str()),
        ];
        write_with(&producer, dlt, &ticket, &body, &headers).await;
        ids.push(id);
    }
    ids
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
    // then SIGTERM as Kubernetes does.
    let mut published_before = 0;
    for signal in ["INT", "TERM"] {
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
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "stopped before the end: {summary:#}"
        );
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
/// once. Prints the rate, the CPU and the peak memory (the figures of the README).
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
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let (cpu, rss) = sampler.await.unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{summary:#}");
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
