//! The memory the bridge may use at its bounds, as a formula of its settings
//! (docs/operations.md, Memory). `check-config` prints it, start-up warns when the
//! container's limit is below it, and a test checks that what `deploy/` ships fits the pod.

use std::fmt;

use crate::config::Settings;

/// The process with no connection and nothing queued: the binary's pages, the runtime,
/// librdkafka's threads and buffers, the metrics (measured about 12 MB, with room).
pub const BASE_BYTES: u64 = 16 << 20;

/// One connection: hyper's read and write buffers (8 KiB each at first), TLS's buffers, the
/// task, the socket's registration (measured 18 to 29 KB for idle, mid-head and TLS
/// connections).
pub const CONNECTION_BYTES: u64 = 32 << 10;

/// One request in progress besides its body: its head, the handler's state, its answer
/// (measured about 8 KB a request still receiving its body).
pub const REQUEST_BYTES: u64 = 8 << 10;

/// What an HTTP/2 connection keeps for each stream its peer has open (measured about 0.9 KB
/// a stream at 16 and 32 streams a connection).
pub const STREAM_BYTES: u64 = 1 << 10;

/// A record in the producer's queue besides its payload: librdkafka's message and headers,
/// the delivery future and the request's state that waits for it.
pub const QUEUED_RECORD_BYTES: u64 = 2 << 10;

/// An event id remembered by the in-memory duplicate filter: its table slot and its place
/// in the expiry queue, at the table's load factor.
pub const DEDUP_ENTRY_BYTES: u64 = 128;

/// The bound of each part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub base: u64,
    /// `(max_connections + max_connections / 16) × (CONNECTION_BYTES + REQUEST_BYTES +
    /// max(max_header_bytes - 8 KiB, http2_max_concurrent_streams × STREAM_BYTES))`: the bound
    /// and the connections still closing beside it, each with a request in progress and at
    /// its worst, a head grown to the bound or HTTP/2 streams all open.
    pub connections: u64,
    /// `http2_max_pending_streams × (REQUEST_BYTES + max_header_bytes)`: the HTTP/2 requests
    /// beyond one per connection, each with a decoded header list up to the bound.
    pub streams: u64,
    /// `server.body_memory_bytes`.
    pub bodies: u64,
    /// `kafka.queue_max_kbytes × 1024 + kafka.queue_max_messages × QUEUED_RECORD_BYTES`.
    pub producer_queue: u64,
    /// `dedup.max_entries × DEDUP_ENTRY_BYTES` (0 with `dedup.window_secs = 0`).
    pub dedup: u64,
    /// With spans exported: `2 × tracing.max_queue_bytes` (the queue, and an export's
    /// encoded copy) `+ (connections + http2_max_pending_streams) × MAX_SPAN_BYTES` (the
    /// spans of the requests in progress); 0 without an endpoint.
    pub tracing: u64,
}

impl Budget {
    pub fn of(settings: &Settings) -> Budget {
        let s = &settings.server;
        let connections = s.max_connections as u64 + (s.max_connections as u64 / 16).max(1);
        let head = (s.max_header_bytes as u64).saturating_sub(8 << 10);
        let streams = u64::from(s.http2_max_concurrent_streams) * STREAM_BYTES;
        let k = &settings.kafka;
        // Both stores keep the in-memory filter in front (the shared one as a cache).
        let dedup = if settings.dedup.window_secs == 0 {
            0
        } else {
            settings.dedup.max_entries as u64 * DEDUP_ENTRY_BYTES
        };
        Budget {
            base: BASE_BYTES,
            connections: connections * (CONNECTION_BYTES + REQUEST_BYTES + head.max(streams)),
            streams: s.http2_max_pending_streams as u64
                * (REQUEST_BYTES + s.max_header_bytes as u64),
            bodies: s.body_memory_bytes as u64,
            producer_queue: u64::from(k.queue_max_kbytes) * 1024
                + u64::from(k.queue_max_messages) * QUEUED_RECORD_BYTES,
            dedup,
            tracing: if settings.tracing.endpoint.is_empty() {
                0
            } else {
                2 * settings.tracing.max_queue_bytes as u64
                    + (connections + s.http2_max_pending_streams as u64)
                        * crate::trace::MAX_SPAN_BYTES as u64
            },
        }
    }

    pub fn total(&self) -> u64 {
        self.base
            + self.connections
            + self.streams
            + self.bodies
            + self.producer_queue
            + self.dedup
            + self.tracing
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "{:.1} MiB = base {:.1} + connections {:.1} + HTTP/2 streams {:.1} + bodies {:.1} + \
             producer queue {:.1} + duplicate filter {:.1} + tracing {:.1}",
            mib(self.total()),
            mib(self.base),
            mib(self.connections),
            mib(self.streams),
            mib(self.bodies),
            mib(self.producer_queue),
            mib(self.dedup),
            mib(self.tracing),
        )
    }
}

/// The memory limit of the container the process runs in (cgroup v2 `memory.max`, or v1's
/// `memory.limit_in_bytes`), if it has one.
pub fn container_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let text = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
    let limit: u64 = text.trim().parse().ok()?;
    // v1 reports "no limit" as a huge number.
    (limit < 1 << 60).then_some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_fit_in_128_mib_with_room() {
        let settings = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let budget = Budget::of(&settings);
        assert!(budget.total() < 128 << 20, "{budget}");
        // Each part follows its setting.
        assert_eq!(budget.bodies, settings.server.body_memory_bytes as u64);
        assert_eq!(
            budget.dedup,
            settings.dedup.max_entries as u64 * DEDUP_ENTRY_BYTES
        );
    }
}
