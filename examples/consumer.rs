//! An example consumer of the bridge's topic: reads `tamio.tickets`, drops duplicates by the
//! `event_id` header (delivery is at least once), keeps each ticket's latest state by
//! `data.ticket.updated_at`, and prints one JSON line per state it keeps.
//!
//! ```sh
//! cargo run --example consumer -- --brokers 127.0.0.1:9092 --topic tamio.tickets
//! ```
//! `--from-beginning` reads the topic from its start; `--exit-when-idle-ms N` stops after N ms
//! without records and prints a summary (for scripts and tests).
//!
//! Traces: each record's `traceparent` header names the bridge's producer span. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, this consumer exports a `process <topic>` span per
//! record as its child, so a trace reads request → publish → process; each printed line
//! carries the `trace_id` either way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use opentelemetry::trace::{Span as _, TraceContextExt};
use opentelemetry::KeyValue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tamio_kafka_bridge::trace;

struct Args {
    brokers: String,
    topic: String,
    group: String,
    from_beginning: bool,
    exit_when_idle: Option<Duration>,
}

fn args() -> Args {
    let mut a = Args {
        brokers: "127.0.0.1:9092".into(),
        topic: "tamio.tickets".into(),
        group: "tamio-tickets-example".into(),
        from_beginning: false,
        exit_when_idle: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--brokers" => a.brokers = value(),
            "--topic" => a.topic = value(),
            "--group" => a.group = value(),
            "--from-beginning" => a.from_beginning = true,
            "--exit-when-idle-ms" => {
                a.exit_when_idle = Some(Duration::from_millis(value().parse().expect("a number")))
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// What this consumer keeps of a ticket.
struct TicketState {
    updated_at: i64,
    event_type: String,
}

fn main() {
    let args = args();
    // Spans, when a collector is named: the bridge's own tracing, on a runtime of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let settings =
        tamio_kafka_bridge::config::Settings::load_from(None, Vec::<(String, String)>::new())
            .expect("default settings");
    let mut plan = trace::Plan::build(&settings.tracing, |name| std::env::var(name).ok())
        .expect("the OTEL_* variables");
    plan.service_name =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "tamio-tickets-consumer".into());
    let tracing = trace::Tracing::start(
        &plan,
        prometheus::IntCounter::new("dropped", "dropped").unwrap(),
    )
    .expect("tracing");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        // Records of aborted transactions (a replay that failed midway) are never seen, and
        // records of open ones only once committed: each dead letter replayed appears once.
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    if args.from_beginning {
        let md = consumer
            .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md.topics()[0].partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&args.topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
    } else {
        consumer.subscribe(&[&args.topic]).expect("subscribe");
    }

    let mut seen: HashSet<String> = HashSet::new();
    let mut tickets: HashMap<String, TicketState> = HashMap::new();
    let mut duplicates = 0;
    let mut last = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let header = |name: &str| {
                    m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                let Some(event_id) = header("event_id") else {
                    continue;
                };
                // The trace the bridge put in the record, continued by a consumer span.
                let carried: BTreeMap<String, String> = ["traceparent", "tracestate"]
                    .into_iter()
                    .filter_map(|k| header(k).map(|v| (k.to_owned(), v)))
                    .collect();
                let parent = tracing.extract_from(&trace::MapExtractor(&carried));
                let trace_id = parent.span().span_context().trace_id().to_string();
                if let Some(tracer) = tracing.tracer() {
                    let mut span = trace::start_span(
                        tracer,
                        format!("process {}", args.topic),
                        trace::SpanKind::Consumer,
                        &parent,
                        || {
                            vec![
                                KeyValue::new("messaging.system", "kafka"),
                                KeyValue::new("messaging.operation.type", "process"),
                                KeyValue::new("messaging.destination.name", args.topic.clone()),
                                KeyValue::new(
                                    "messaging.destination.partition.id",
                                    m.partition().to_string(),
                                ),
                                KeyValue::new("messaging.kafka.offset", m.offset()),
                                KeyValue::new("tamio.event.id", event_id.clone()),
                            ]
                        },
                    );
                    span.end();
                }
                if !seen.insert(event_id.clone()) {
                    duplicates += 1;
                    continue;
                }
                let Some(payload) = m.payload() else { continue };
                let Ok(event) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    continue;
                };
                let ticket = &event["data"]["ticket"];
                let (Some(id), Some(updated_at)) =
                    (ticket["id"].as_str(), ticket["updated_at"].as_i64())
                else {
                    continue;
                };
                let newer = tickets.get(id).is_none_or(|t| updated_at >= t.updated_at);
                if newer {
                    let event_type = header("event_type").unwrap_or_default();
                    println!(
                        "{}",
                        serde_json::json!({
                            "ticket": id,
                            "updated_at": updated_at,
                            "is_open": ticket["is_open"],
                            "event_type": event_type,
                            "event_id": event_id,
                            "trace_id": trace_id,
                        })
                    );
                    tickets.insert(
                        id.to_owned(),
                        TicketState {
                            updated_at,
                            event_type,
                        },
                    );
                }
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {
                if args
                    .exit_when_idle
                    .is_some_and(|idle| last.elapsed() >= idle)
                {
                    break;
                }
            }
        }
    }
    // The last spans leave before the summary.
    tracing.shutdown(Duration::from_secs(2));
    let mut latest: Vec<_> = tickets.iter().collect();
    latest.sort_by(|a, b| a.0.cmp(b.0));
    println!(
        "{}",
        serde_json::json!({
            "summary": {
                "tickets": latest.iter().map(|(id, t)| serde_json::json!({"ticket": id, "updated_at": t.updated_at, "event_type": t.event_type})).collect::<Vec<_>>(),
                "events": seen.len(),
                "duplicates_dropped": duplicates,
            }
        })
    );
}
