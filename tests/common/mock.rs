//! librdkafka's mock cluster, for the faults a test injects on cue (request errors, leader
//! moves, a broker down at a given record). Everything else runs on Apache Kafka.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A mock cluster, kept alive for as long as the test holds it.
pub type Mock = MockCluster<'static, DefaultProducerContext>;

/// A mock cluster of `brokers` with `topic` of `partitions`, each with `replicas`.
pub fn mock_cluster(brokers: i32, topic: &str, partitions: i32, replicas: i32) -> Mock {
    let cluster = MockCluster::new(brokers).expect("librdkafka's mock cluster starts");
    cluster
        .create_topic(topic, partitions, replicas)
        .expect("the mock cluster creates the topic");
    cluster
}
