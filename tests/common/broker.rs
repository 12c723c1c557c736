//! Brokers for tests: the shared Apache Kafka node `.ci/test` starts (and topics on it), and
//! one-node clusters of a test's own that it may freeze, kill and restart (see [`kafka`]).

use super::brokers;
use super::kafka::{create_topic_at, Cluster, Spec};

/// Creates `topic` on the test broker (it does not create topics on its own), and waits until
/// every partition has a leader.
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&brokers(), topic, partitions).await
}

pub async fn create_topic_on(bootstrap: &str, topic: &str, partitions: i32) {
    create_topic_at(bootstrap, topic, partitions, 1, &[], &[]).await
}

/// A one-node Apache Kafka cluster of a test's own, which the test may freeze, kill and
/// start again; it keeps its data across restarts.
pub struct OwnBroker {
    pub port: u16,
    cluster: Cluster,
}

impl OwnBroker {
    pub async fn start() -> OwnBroker {
        Self::start_spec(Spec::default()).await
    }

    pub async fn start_spec(spec: Spec) -> OwnBroker {
        let cluster = Cluster::start(spec).await;
        OwnBroker {
            port: cluster.nodes[0].port,
            cluster,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cluster(&mut self) -> &mut Cluster {
        &mut self.cluster
    }

    /// SIGSTOP: the broker keeps its connections open but answers nothing.
    pub fn freeze(&self) {
        self.cluster.freeze(1);
    }

    pub fn thaw(&self) {
        self.cluster.thaw(1);
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        self.cluster.kill(1);
    }

    /// Starts the broker again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.cluster.restart(1).await;
        self.cluster.wait_brokers(1).await;
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        create_topic_on(&self.address(), topic, partitions).await
    }
}
