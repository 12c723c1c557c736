//! The loss checker: many senders at once, each retrying as the real sender does, then the
//! whole topic read back and compared with what was acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use tamio_kafka_bridge::ingest::verify;

use super::{now, read_topic_from, request, ticket_event, Record, SECRET};

/// The loss checker's load: `tickets` senders run at once; each sends its `per_ticket` events
/// one after another, retrying an event (same `event_id`) after any answer but 200 or a
/// connection error, as the real sender does.
pub struct Load {
    pub url: String,
    pub tickets: usize,
    pub per_ticket: usize,
    /// Tries per event before its sender gives up.
    pub max_attempts: usize,
    pub retry_pause: Duration,
    /// Once set, senders start no new event (the one in hand is still delivered).
    pub until: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// What the senders saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Event ids answered 200, with their ticket and position.
    pub acked: Vec<(String, String, usize)>,
    /// Answers by status ("error" for no answer).
    pub answers: BTreeMap<String, usize>,
    /// Events never acknowledged (their sender gave up).
    pub abandoned: usize,
    /// Every answer: when its request was sent (since the load started), how long it took,
    /// and its status (0 for no answer).
    pub timings: Vec<(Duration, Duration, u16)>,
    /// When the load started.
    pub started: Option<Instant>,
    /// Event ids that got an answer but 200 (or none) at least once.
    pub refused_ids: std::collections::BTreeSet<String>,
}

pub fn event_id(ticket: usize, seq: usize) -> String {
    format!("whev_t{ticket}_s{seq}")
}

impl Load {
    /// Runs the load; `acked` counts acknowledgements as they come, for injecting a fault
    /// mid-run.
    pub async fn run(&self, acked: Arc<std::sync::atomic::AtomicUsize>) -> LoadReport {
        let load_started = Instant::now();
        let report = Arc::new(std::sync::Mutex::new(LoadReport {
            started: Some(load_started),
            ..LoadReport::default()
        }));
        let mut senders = Vec::new();
        for ticket in 0..self.tickets {
            let url = self.url.clone();
            let report = report.clone();
            let acked = acked.clone();
            let (per_ticket, max_attempts, pause) =
                (self.per_ticket, self.max_attempts, self.retry_pause);
            let until = self.until.clone();
            senders.push(tokio::spawn(async move {
                let ticket_id = format!("ticket-{ticket:04}");
                for seq in 0..per_ticket {
                    if until.as_ref().is_some_and(|u| u.load(Ordering::SeqCst)) {
                        return;
                    }
                    let id = event_id(ticket, seq);
                    let body = ticket_event(&id, &ticket_id, seq);
                    let mut delivered = false;
                    for _ in 0..max_attempts {
                        let sig = verify::header_value(SECRET.as_bytes(), now(), body.as_bytes());
                        let sent = Instant::now();
                        let answer = request(
                            "POST",
                            &url,
                            &[
                                ("content-type", "application/json"),
                                ("tamio-signature", &sig),
                            ],
                            body.clone().into_bytes(),
                        )
                        .await;
                        let status = answer.as_ref().map_or(0, |r| r.status.as_u16());
                        let key = match &answer {
                            Ok(r) => r.status.as_u16().to_string(),
                            Err(_) => "error".to_owned(),
                        };
                        {
                            let mut report = report.lock().unwrap();
                            *report.answers.entry(key).or_default() += 1;
                            report.timings.push((
                                sent.duration_since(load_started),
                                sent.elapsed(),
                                status,
                            ));
                            if status != 200 {
                                report.refused_ids.insert(id.clone());
                            }
                        }
                        match answer {
                            Ok(r) if r.status == StatusCode::OK => {
                                report.lock().unwrap().acked.push((
                                    id.clone(),
                                    ticket_id.clone(),
                                    seq,
                                ));
                                acked.fetch_add(1, Ordering::SeqCst);
                                delivered = true;
                                break;
                            }
                            Ok(r) if r.status.is_client_error() => {
                                panic!("{id}: refused with {}: {}", r.status, r.text())
                            }
                            _ => tokio::time::sleep(pause).await,
                        }
                    }
                    if !delivered {
                        report.lock().unwrap().abandoned += per_ticket - seq;
                        return;
                    }
                }
            }));
        }
        for s in senders {
            s.await.expect("sender task");
        }
        Arc::try_unwrap(report).unwrap().into_inner().unwrap()
    }
}

/// What the loss checker found in the topic.
#[derive(Debug)]
pub struct LossFindings {
    pub acked: usize,
    pub records: usize,
    pub missing: Vec<String>,
    pub duplicates: usize,
    /// The event ids found more than once.
    pub twice_ids: Vec<String>,
    pub order_violations: Vec<String>,
}

/// Reads the whole topic and compares it with what was acknowledged: every acknowledged id
/// must be there; duplicates are counted (delivery is at least once); each ticket's events,
/// sent one after another, must first appear in the order they were sent, in one partition.
pub async fn check_losses(bootstrap: &str, topic: &str, report: &LoadReport) -> LossFindings {
    let mut records = read_topic_from(
        bootstrap,
        topic,
        report.acked.len(),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    // A record missing from one read is looked for again with a fresh consumer before it
    // counts as lost: a reader that skipped part of a partition must not pass for a loss,
    // while a lost record stays missing however often the topic is read.
    let ids: std::collections::HashSet<&str> =
        super::topic::event_ids(&records).into_iter().collect();
    let first_missing = report
        .acked
        .iter()
        .filter(|(id, _, _)| !ids.contains(id.as_str()))
        .count();
    if first_missing > 0 {
        println!("loss checker: {first_missing} acknowledged ids not seen on the first read; reading again");
        let again = read_topic_from(
            bootstrap,
            topic,
            report.acked.len(),
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await;
        if again.len() > records.len() {
            records = again;
        }
    }
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for r in &records {
        *seen.entry(r.headers["event_id"].as_str()).or_default() += 1;
    }
    let missing: Vec<String> = report
        .acked
        .iter()
        .filter(|(id, _, _)| !seen.contains_key(id.as_str()))
        .map(|(id, _, _)| id.clone())
        .collect();
    let duplicates = seen.values().map(|n| n - 1).sum();
    let twice_ids = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.to_string())
        .collect();

    let mut by_ticket: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in &records {
        by_ticket.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    let mut order_violations = Vec::new();
    for (ticket, mut recs) in by_ticket {
        if recs.iter().any(|r| r.partition != recs[0].partition) {
            order_violations.push(format!("{ticket}: spread over partitions"));
            continue;
        }
        recs.sort_by_key(|r| r.offset);
        let mut next = 0u64;
        for r in recs {
            let seq = r.json()["data"]["ticket"]["seq"].as_u64().unwrap();
            if seq == next {
                next += 1;
            } else if seq > next {
                order_violations.push(format!("{ticket}: seq {seq} before seq {next}"));
                break;
            }
            // seq < next: a duplicate of an earlier event, allowed.
        }
    }
    LossFindings {
        acked: report.acked.len(),
        records: records.len(),
        missing,
        duplicates,
        twice_ids,
        order_violations,
    }
}

impl LossFindings {
    /// Prints the findings and fails on a loss or an order violation.
    pub fn assert_nothing_lost(&self, report: &LoadReport) {
        println!(
            "loss checker: {} acknowledged, {} records, {} missing, {} duplicates, {} order violations; answers {:?}; {} abandoned",
            self.acked,
            self.records,
            self.missing.len(),
            self.duplicates,
            self.order_violations.len(),
            report.answers,
            report.abandoned,
        );
        assert!(
            self.missing.is_empty(),
            "acknowledged but not in Kafka: {:?}",
            self.missing
        );
        assert!(
            self.order_violations.is_empty(),
            "per-ticket order broken: {:?}",
            self.order_violations
        );
    }
}
