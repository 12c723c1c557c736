//! Claims on event ids shared by every replica, in Redis (or Valkey): one server, a
//! Sentinel setup or a Cluster (see [`link`](super::link)).
//!
//! One key per `(endpoint_id, event_id)`, `<prefix>{<len(endpoint_id)>:<endpoint_id>:<event_id>}`
//! (the braces are a Cluster hash tag: the key's slot follows the id, whatever the prefix):
//! - the first delivery claims it with a script, one round trip: it reads the key and, when
//!   absent, sets `p:<process>:<attempt>` for `pending_ttl` (longer than any delivery may
//!   take: a replica that dies mid-request leaves a claim that expires). A claim this process
//!   finds of its own (its memory lets one delivery of an id at a time through, so such a
//!   claim was left by an attempt whose answer was lost) is taken over;
//! - once Kafka acknowledges, the key becomes `d:<partition>:<offset>:<topic>` for the
//!   window; a failed delivery deletes its own claim. Both are written by a background task
//!   in pipelines, off the request's path, and kept until they are written;
//! - a delivery that finds `p:` waits for the verdict, reading the key again every
//!   [`POLL`], within its own deadline.
//!
//! A slow or failing command is retried within the request's deadline: a store that pauses
//! (a fork, a failover) costs latency. Only when no command has succeeded for
//! `dedup.redis_down_after_ms` is the store marked down (logged once,
//! `tamio_bridge_dedup_store_up` 0; every failed command counts in
//! `tamio_bridge_dedup_store_errors_total`): requests then stop asking it, claims go to this
//! process's memory (or are refused), and their verdicts are queued for the store; a PING
//! every [`HEALTH_CHECK`] puts it back in use, and the queued writes follow.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::link::{self, Link, Topology};
use super::memory::Original;
use crate::config::{Dedup, SettingsError};
use crate::metrics::Metrics;
use crate::publish::Delivered;

/// How often a delivery waiting for another replica's verdict reads the key again, and how
/// long a failed command waits before it is sent again.
pub const POLL: Duration = Duration::from_millis(50);

/// How often a store marked down is tried again.
pub const HEALTH_CHECK: Duration = Duration::from_millis(200);

/// Writes waiting for the background writer beyond this are dropped (and counted): their
/// claims expire by themselves.
const WRITE_QUEUE: usize = 16_384;

/// Commands one pipeline carries.
const BATCH: usize = 512;

/// Reads the key; when it is absent, or holds a claim of this process that no delivery of
/// it still has (ARGV[3], the process's prefix: its own memory serialises its deliveries of
/// one id, so such a claim was left by an attempt cut short), claims it. Returns the value
/// found, or nothing for a claim.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[3])) ~= ARGV[3] then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Deletes the key if it still holds this claim.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// The shared store's settings, checked.
#[derive(Clone)]
pub struct Plan {
    topology: Topology,
    prefix: String,
    timeout: Duration,
    down_after: Duration,
    pending_ttl: Duration,
    window: Duration,
}

impl Plan {
    /// The store of the `dedup` settings; a claim lasts `pending_ttl` without a verdict.
    pub fn build(d: &Dedup, pending_ttl: Duration) -> Result<Plan, SettingsError> {
        let given = |secret: &crate::config::Secret| {
            (!secret.expose().is_empty())
                .then(|| String::from_utf8_lossy(secret.expose()).into_owned())
        };
        let timeout = Duration::from_millis(d.redis_timeout_ms);
        let topology = link::topology(
            d.redis_url.expose(),
            given(&d.redis_password),
            given(&d.redis_sentinel_password),
            timeout,
        )
        .map_err(|reason| SettingsError::Invalid {
            key: "dedup.redis_url",
            reason,
        })?;
        Ok(Plan {
            topology,
            prefix: d.key_prefix.clone(),
            timeout,
            down_after: Duration::from_millis(d.redis_down_after_ms),
            pending_ttl,
            window: Duration::from_secs(d.window_secs),
        })
    }
}

/// What the shared store says about an id.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A delivery elsewhere is publishing it.
    Pending,
    /// Already acknowledged, there.
    Done(Original),
}

/// The outcome of [`Shared::claim`].
pub enum Claimed {
    /// This delivery publishes: its claim (or, when an answer was lost, the claim it may have
    /// made) is held until Kafka's verdict.
    Mine(Held),
    /// Someone else's.
    Found(Found),
    /// The store cannot be used now; the verdict is written to it later.
    Unavailable(Held),
}

/// A write the request does not wait for.
enum Write {
    Done { key: String, value: String },
    Release { key: String, token: String },
}

impl Write {
    fn command(&self) -> redis::Cmd {
        match self {
            Write::Done { key, value } => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(value);
                cmd
            }
            Write::Release { key, token } => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(RELEASE).arg(1).arg(key).arg(token);
                cmd
            }
        }
    }
}

/// The shared store in use.
pub struct Shared {
    link: Link,
    claim: redis::Script,
    prefix: String,
    timeout: Duration,
    down_after: Duration,
    pending_ttl: Duration,
    window: Duration,
    /// The start of the value of every claim of this process: `p:<random>:`.
    owner: String,
    /// Tells this process's claims apart.
    attempts: AtomicU64,
    up: AtomicBool,
    clock: Instant,
    /// Since when every command has failed (ms on `clock`, from 1); 0 after a success.
    failing_since_ms: AtomicU64,
    writes: mpsc::Sender<Write>,
    /// Writes queued and not yet done, and claims held: what a shutdown waits for.
    pending: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// Starts using the store (it connects on first use, and again after any failure) and
    /// its background writer and health check.
    pub fn start(plan: Plan, metrics: Arc<Metrics>) -> Result<Arc<Shared>, String> {
        let topology = plan.topology.name();
        let link = Link::start(plan.topology, plan.timeout)
            .map_err(|e| format!("the shared duplicate store: {:?}", e.kind()))?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared {
            link,
            claim: redis::Script::new(CLAIM),
            prefix: plan.prefix,
            timeout: plan.timeout,
            down_after: plan.down_after,
            pending_ttl: plan.pending_ttl,
            window: plan.window,
            owner: format!("p:{:016x}:", rand::random::<u64>()),
            attempts: AtomicU64::new(0),
            up: AtomicBool::new(true),
            clock: Instant::now(),
            failing_since_ms: AtomicU64::new(0),
            writes,
            pending: AtomicU64::new(0),
            metrics,
        });
        tracing::debug!(topology, "shared duplicate store");
        shared.metrics.dedup_store_up.set(1);
        tokio::spawn(write_behind(Arc::downgrade(&shared), queue));
        tokio::spawn(health_check(Arc::downgrade(&shared)));
        Ok(shared)
    }

    /// False while the store is marked down: requests do not ask it.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn key(&self, endpoint_id: &str, event_id: &str) -> String {
        format!(
            "{}{{{}:{endpoint_id}:{event_id}}}",
            self.prefix,
            endpoint_id.len()
        )
    }

    fn held(self: &Arc<Self>, key: String, token: Option<String>) -> Held {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Held {
            shared: self.clone(),
            key,
            token,
            armed: true,
        }
    }

    /// Claims the id, or says who has it, retrying a command that fails within `deadline`
    /// while the store is not marked down.
    pub async fn claim(
        self: &Arc<Self>,
        endpoint_id: &str,
        event_id: &str,
        deadline: Instant,
    ) -> Claimed {
        let key = self.key(endpoint_id, event_id);
        if !self.is_up() {
            return Claimed::Unavailable(self.held(key, None));
        }
        let token = format!(
            "{}{}",
            self.owner,
            self.attempts.fetch_add(1, Ordering::Relaxed)
        );
        // Held from before the command is sent: if its answer is lost, or the request is cut
        // short, the claim the script may have made is given up (or acknowledged) later.
        let held = self.held(key, Some(token));
        loop {
            let mut invocation = self.claim.key(&held.key);
            invocation
                .arg(held.token.as_deref().unwrap_or_default())
                .arg(self.pending_ttl.as_millis() as u64)
                .arg(&self.owner);
            let found: Result<Option<String>, ()> = self
                .command(|mut c| async move { invocation.invoke_async(&mut c).await })
                .await;
            match found {
                Ok(None) => return Claimed::Mine(held),
                Ok(Some(value)) => {
                    held.disarm();
                    return Claimed::Found(parse(&value).unwrap_or(Found::Pending));
                }
                Err(()) if !self.is_up() || Instant::now() + POLL >= deadline => {
                    return Claimed::Unavailable(held)
                }
                Err(()) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Reads what the store holds for the id now (while waiting for another replica).
    pub async fn look(&self, endpoint_id: &str, event_id: &str) -> Result<Option<Found>, ()> {
        let key = self.key(endpoint_id, event_id);
        let found: Option<String> = self
            .command(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(found.map(|value| parse(&value).unwrap_or(Found::Pending)))
    }

    /// An id to remember, with no claim of this process on it: written once the store can
    /// be used.
    pub fn unclaimed(self: &Arc<Self>, endpoint_id: &str, event_id: &str) -> Held {
        self.held(self.key(endpoint_id, event_id), None)
    }

    fn queue(&self, write: Write) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.writes.try_send(write).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.metrics.dedup_store_errors.inc();
            tracing::debug!("the queue of writes to the shared duplicate store is full");
        }
    }

    /// Waits until the claims held are given up or acknowledged and the writes queued are
    /// done, up to `timeout` (on shutdown, after the producer's flush).
    pub async fn flush(&self, timeout: Duration) -> u64 {
        let until = Instant::now() + timeout;
        while self.pending.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.pending.load(Ordering::Relaxed)
    }

    /// Runs one command (or pipeline) on the link within the command deadline.
    async fn command<T, F, Fut>(&self, run: F) -> Result<T, ()>
    where
        F: FnOnce(link::Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.link.conn().await?;
            run(conn).await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(value)) => {
                self.succeeded();
                Ok(value)
            }
            Ok(Err(e)) => {
                self.failed(&format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")));
                Err(())
            }
            Err(_) => {
                self.failed(&format!("no answer within {:?}", self.timeout));
                Err(())
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64 + 1
    }

    fn succeeded(&self) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.dedup_store_up.set(1);
            tracing::info!("the shared duplicate store answers again: claims are shared");
        }
    }

    /// Counts a failed command; marks the store down, logging the change once, when every
    /// command has failed for `down_after`.
    fn failed(&self, reason: &str) {
        self.metrics.dedup_store_errors.inc();
        self.link.failed();
        let now = self.now_ms();
        let first = match self.failing_since_ms.compare_exchange(
            0,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => now,
            Err(since) => since,
        };
        let since = now.saturating_sub(first);
        if since < self.down_after.as_millis() as u64 {
            return;
        }
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.dedup_store_up.set(0);
            tracing::warn!(
                %reason,
                down_for_ms = since,
                "the shared duplicate store is unavailable: claims go to this process's memory \
                 (or deliveries are refused, with dedup.on_store_error = \"refuse\") until it \
                 answers again; their verdicts are written to it then"
            );
        }
    }

    /// Sends `writes`; false when they must be sent again.
    async fn send(&self, writes: &[Write]) -> bool {
        let window = self.window.as_millis() as u64;
        if self.link.pipelines() {
            let mut pipe = redis::pipe();
            for write in writes {
                let mut cmd = write.command();
                if let Write::Done { .. } = write {
                    cmd.arg("PX").arg(window);
                }
                pipe.add_command(cmd).ignore();
            }
            return self
                .command(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await
                .is_ok();
        }
        // A Cluster pipeline must stay on one slot: a command each, all at once.
        let Ok(conn) = self.link.conn().await else {
            self.failed("no connection to the cluster");
            return false;
        };
        let mut sent = tokio::task::JoinSet::new();
        for write in writes {
            let mut cmd = write.command();
            if let Write::Done { .. } = write {
                cmd.arg("PX").arg(window);
            }
            let mut conn = conn.clone();
            let timeout = self.timeout;
            sent.spawn(async move {
                tokio::time::timeout(timeout, cmd.query_async::<redis::Value>(&mut conn)).await
            });
        }
        let mut ok = true;
        while let Some(done) = sent.join_next().await {
            match done {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => {
                    ok = false;
                    self.failed(&format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")));
                }
                _ => {
                    ok = false;
                    self.failed(&format!("no answer within {:?}", self.timeout));
                }
            }
        }
        if ok {
            self.succeeded();
        }
        ok
    }
}

/// A delivery's place in the store until Kafka's verdict: [`Held::acknowledged`] writes the
/// original's place for the window; dropped without, the claim it made (if any) is given up.
pub struct Held {
    shared: Arc<Shared>,
    key: String,
    /// The claim this delivery made, or may have made; None when it made none.
    token: Option<String>,
    armed: bool,
}

impl Held {
    /// Records Kafka's acknowledgement (the original's place, for the window), without
    /// waiting for it.
    pub fn acknowledged(mut self, original: &Original) {
        self.armed = false;
        let value = format!(
            "d:{}:{}:{}",
            original.delivered.partition, original.delivered.offset, original.topic
        );
        self.shared.queue(Write::Done {
            key: std::mem::take(&mut self.key),
            value,
        });
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Not a claim of this delivery after all: nothing to give up.
    fn disarm(mut self) {
        self.armed = false;
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(token) = self.token.take() {
            self.shared.queue(Write::Release {
                key: std::mem::take(&mut self.key),
                token,
            });
        }
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a stored value: `p:...` pending, `d:<partition>:<offset>:<topic>` done.
fn parse(value: &str) -> Option<Found> {
    if value.starts_with("p:") {
        return Some(Found::Pending);
    }
    let rest = value.strip_prefix("d:")?;
    let mut parts = rest.splitn(3, ':');
    let partition = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    let topic = parts.next()?;
    Some(Found::Done(Original {
        topic: Arc::from(topic),
        delivered: Delivered { partition, offset },
    }))
}

/// Writes acknowledgements and releases in pipelines, as they come. A batch that fails is
/// sent again (after a pause growing to a second, and once the store is back in use), not
/// dropped: writes wait in the queue meanwhile, up to its bound.
async fn write_behind(shared: std::sync::Weak<Shared>, mut queue: mpsc::Receiver<Write>) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let mut pause = Duration::from_millis(100);
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.is_up() && shared.send(&batch).await {
                shared
                    .pending
                    .fetch_sub(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                break;
            }
            drop(shared);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// While the store is marked down, PINGs it until it answers.
async fn health_check(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(HEALTH_CHECK).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.is_up() {
            continue;
        }
        let _ = shared
            .command(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_read_back() {
        assert_eq!(parse("p:00ff"), Some(Found::Pending));
        assert_eq!(
            parse("d:2:41:tamio.tickets"),
            Some(Found::Done(Original {
                topic: Arc::from("tamio.tickets"),
                delivered: Delivered {
                    partition: 2,
                    offset: 41
                },
            }))
        );
        // A topic name cannot hold `:`, but the parse would not mind.
        assert!(matches!(parse("d:0:1:a:b"), Some(Found::Done(_))));
        assert_eq!(parse("d:x:1:t"), None);
        assert_eq!(parse("other"), None);
    }
}
