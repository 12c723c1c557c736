//! Reading whole topics back, by consuming (the test broker's offset answers are not to be
//! trusted).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{brokers, unique_topic};

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap()
    }
}

/// The `event_id` header of each record, in the order read.
pub fn event_ids(records: &[Record]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r.headers["event_id"].as_str())
        .collect()
}

/// Reads `topic` from the beginning on every partition, until at least `expected` records
/// arrived and then no more for `settle`, or `within` passed. Counting by consuming, since
/// the test broker's offset answers are not to be trusted.
pub async fn read_topic_from(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    within: Duration,
) -> Vec<Record> {
    read_topic_with(bootstrap, &[], topic, expected, settle, within).await
}

/// Like [`read_topic_from`], with more consumer options (TLS, SASL).
pub async fn read_topic_with(
    bootstrap: &str,
    options: &[(&str, &str)],
    topic: &str,
    expected: usize,
    settle: Duration,
    within: Duration,
) -> Vec<Record> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    let options: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique_topic("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // As consumers should: aborted transactions' records are not seen (an option
            // may ask for read_uncommitted).
            .set("isolation.level", "read_committed");
        for (k, v) in &options {
            config.set(k, v);
        }
        let consumer: BaseConsumer = config.create().expect("consumer");
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let started = Instant::now();
        let mut last = Instant::now();
        let mut out = Vec::new();
        while started.elapsed() < within {
            if out.len() >= expected && last.elapsed() >= settle {
                break;
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let mut headers = BTreeMap::new();
                    if let Some(h) = m.headers() {
                        for header in h.iter() {
                            headers.insert(
                                header.key.to_owned(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            );
                        }
                    }
                    out.push(Record {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        value: m.payload().unwrap_or_default().to_vec(),
                        headers,
                    });
                    last = Instant::now();
                }
                Some(Err(e)) => panic!("consuming {topic}: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap()
}

pub async fn read_topic(topic: &str, expected: usize) -> Vec<Record> {
    read_topic_from(
        &brokers(),
        topic,
        expected,
        Duration::from_millis(1500),
        Duration::from_secs(60),
    )
    .await
}

/// Reads `topic` back and fails naming every acknowledged event id it does not hold.
pub async fn assert_all_in_kafka(topic: &str, expected: &[String]) {
    let records = read_topic(topic, expected.len()).await;
    let found: std::collections::HashSet<&str> = event_ids(&records).into_iter().collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !found.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
}
