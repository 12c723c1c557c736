//! The test kit, by concern: the test broker (`broker`) and clusters of a test's own
//! (`kafka`), the bridge in process (`bridge`) or as the real binary (`process`, with `url`,
//! `send` and `metric`), an HTTP client with a timeout (`client`), a reader of whole topics
//! (`topic`), the loss checker's load (`load`), librdkafka's mock cluster for faults on cue (`mock`), free ports and silent peers (`net`), an OTLP
//! receiver (`otlp`), a Redis server (`redis_server`), attacks on the ingress (`siege`),
//! signatures (`signing`), TLS (`tls`) and a raw HTTP/2 peer (`h2raw`). Each test file takes
//! what it needs with `use common::*`.
#![allow(dead_code, unused_imports)]

pub mod bridge;
pub mod broker;
pub mod client;
pub mod h2raw;
pub mod kafka;
pub mod load;
pub mod mock;
pub mod net;
pub mod otlp;
pub mod process;
pub mod redis_server;
pub mod siege;
pub mod signing;
pub mod tls;
pub mod topic;

pub use self::bridge::*;
pub use self::broker::*;
pub use self::client::*;
pub use self::load::*;
pub use self::mock::*;
pub use self::net::*;
pub use self::process::*;
pub use self::redis_server::*;
pub use self::topic::*;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const SECRET: &str = "test-secret-5f1c0c2e";
pub const FIXTURES: [&str; 4] = [
    include_str!("../fixtures/whitelabel_ticket_created.json"),
    include_str!("../fixtures/whitelabel_ticket_updated.json"),
    include_str!("../fixtures/whitelabel_ticket_assigned.json"),
    include_str!("../fixtures/whitelabel_ticket_resolved.json"),
];

/// The broker the suite runs against. Missing means the suite was not started by its
/// command: fail loudly rather than skip.
pub fn brokers() -> String {
    std::env::var("TAMIO_TEST_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TAMIO_TEST_BROKERS is not set: these tests need a running Kafka-protocol broker. \
             Run them with `.ci/test`, which installs and starts one."
        )
    })
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A ticket event for `ticket` with a fresh event id and a sequence number.
pub fn ticket_event(event_id: &str, ticket: &str, seq: usize) -> String {
    serde_json::json!({
        "event_id": event_id,
        "event_type": "whitelabel_ticket_updated",
        "api_version": 2,
        "object": "event",
        "endpoint_id": "9ab698f5-99de-4ff6-8bfc-a7dcb973d177",
        "data": {"ticket": {"id": ticket, "seq": seq, "is_open": true}}
    })
    .to_string()
}
