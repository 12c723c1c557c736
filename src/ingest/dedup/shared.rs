//! Claims on event ids shared by every replica, in Redis (or Valkey).
//!
//! One key per `(endpoint_id, event_id)`, `<prefix><len(endpoint_id)>:<endpoint_id>:<event_id>`:
//! - the first delivery claims it with a script, one round trip: it reads the key and, when
//!   absent, sets `p:<process>:<attempt>` for `pending_ttl` (longer than any delivery may
//!   take: a replica that dies mid-request leaves a claim that expires). A claim whose answer
//!   was lost, or whose request was cut short, is given up again; one this process finds of
//!   its own (its memory lets one delivery of an id at a time through) is taken over;
//! - once Kafka acknowledges, the key becomes `d:<partition>:<offset>:<topic>` for the
//!   window; a failed delivery deletes its own claim. Both are written by a background task
//!   in pipelines, off the request's path;
//! - a delivery that finds `p:` waits for the verdict, reading the key again every
//!   [`POLL`], within its own deadline.
//!
//! Every command has a deadline (`dedup.redis_timeout_ms`). A failure marks the store down
//! (logged once, `tamio_bridge_dedup_store_up` 0, `tamio_bridge_dedup_store_errors_total`),
//! and requests stop asking it until a PING, every [`HEALTH_CHECK`], answers again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use super::memory::Original;
use crate::config::{Dedup, SettingsError};
use crate::metrics::Metrics;
use crate::publish::Delivered;

/// How often a delivery waiting for another replica's verdict reads the key again.
pub const POLL: Duration = Duration::from_millis(50);

/// How often a store marked down is tried again.
pub const HEALTH_CHECK: Duration = Duration::from_secs(1);

/// Writes waiting for the background writer beyond this are dropped (and counted): their
/// claims expire by themselves.
const WRITE_QUEUE: usize = 16_384;

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
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    pending_ttl: Duration,
    window: Duration,
}

impl Plan {
    /// The store of the `dedup` settings; a claim lasts `pending_ttl` without a verdict.
    pub fn build(d: &Dedup, pending_ttl: Duration) -> Result<Plan, SettingsError> {
        let bad = |reason: String| SettingsError::Invalid {
            key: "dedup.redis_url",
            reason,
        };
        let mut info = redis::IntoConnectionInfo::into_connection_info(d.redis_url.expose())
            // The parser's message may quote the URL, and with it a password.
            .map_err(|e| bad(format!("not a Redis URL ({:?})", e.kind())))?;
        if !d.redis_password.expose().is_empty() {
            let password = String::from_utf8_lossy(d.redis_password.expose()).into_owned();
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|e| bad(format!("unusable ({:?})", e.kind())))?;
        Ok(Plan {
            client,
            prefix: d.key_prefix.clone(),
            timeout: Duration::from_millis(d.redis_timeout_ms),
            pending_ttl,
            window: Duration::from_secs(d.window_secs),
        })
    }
}

/// What the shared store says about an id.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// This delivery claimed it.
    Claimed,
    /// A delivery elsewhere is publishing it.
    Pending,
    /// Already acknowledged, there.
    Done(Original),
}

/// A write the request does not wait for.
enum Write {
    Done { key: String, value: String },
    Release { key: String, token: String },
}

/// One claim in the store: its key and the token it holds.
pub struct Token {
    key: String,
    token: String,
}

/// The shared store in use.
pub struct Shared {
    connection: ConnectionManager,
    claim: redis::Script,
    prefix: String,
    timeout: Duration,
    pending_ttl: Duration,
    /// The start of the value of every claim of this process: `p:<random>:`.
    owner: String,
    /// Tells this process's claims apart.
    attempts: AtomicU64,
    up: AtomicBool,
    writes: mpsc::Sender<Write>,
    /// Writes queued and not yet done, and claims held: what a shutdown waits for.
    pending: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// Starts using the store (it connects on first use, and again after any failure) and
    /// its background writer and health check.
    pub fn start(plan: Plan, metrics: Arc<Metrics>) -> Result<Arc<Shared>, String> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(plan.timeout))
            .set_connection_timeout(Some(plan.timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        // Lazy: a store that is down at start does not keep the bridge from starting.
        let connection = ConnectionManager::new_lazy_with_config(plan.client, config)
            .map_err(|e| format!("the shared duplicate store: {:?}", e.kind()))?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared {
            connection,
            claim: redis::Script::new(CLAIM),
            prefix: plan.prefix,
            timeout: plan.timeout,
            pending_ttl: plan.pending_ttl,
            owner: format!("p:{:016x}:", rand::random::<u64>()),
            attempts: AtomicU64::new(0),
            up: AtomicBool::new(true),
            writes,
            pending: AtomicU64::new(0),
            metrics,
        });
        shared.metrics.dedup_store_up.set(1);
        tokio::spawn(write_behind(Arc::downgrade(&shared), queue, plan.window));
        tokio::spawn(health_check(Arc::downgrade(&shared)));
        Ok(shared)
    }

    /// False while the store is marked down: requests do not ask it.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn key(&self, endpoint_id: &str, event_id: &str) -> String {
        format!(
            "{}{}:{endpoint_id}:{event_id}",
            self.prefix,
            endpoint_id.len()
        )
    }

    /// Claims the id, or says who has it: one round trip. A claim made is held by the
    /// returned [`Held`] (given up when it is dropped), also when the answer does not arrive.
    pub async fn claim(
        self: &Arc<Self>,
        endpoint_id: &str,
        event_id: &str,
    ) -> (Result<Found, ()>, Option<Held>) {
        let token = Token {
            key: self.key(endpoint_id, event_id),
            token: format!(
                "{}{}",
                self.owner,
                self.attempts.fetch_add(1, Ordering::Relaxed)
            ),
        };
        // Held from before the command is sent: if the answer is lost or the request is cut
        // short, the claim the script may have made is given up.
        self.pending.fetch_add(1, Ordering::Relaxed);
        let held = Held {
            shared: self.clone(),
            token: Some(token),
        };
        let (key, value) = held
            .token
            .as_ref()
            .map(|t| (t.key.clone(), t.token.clone()))
            .unwrap_or_default();
        let mut connection = self.connection.clone();
        let mut invocation = self.claim.key(&key);
        invocation
            .arg(&value)
            .arg(self.pending_ttl.as_millis() as u64)
            .arg(&self.owner);
        let found: Result<Option<String>, ()> = self
            .deadline(invocation.invoke_async(&mut connection))
            .await;
        match found {
            Ok(None) => (Ok(Found::Claimed), Some(held)),
            Ok(Some(value)) => {
                held.disarm();
                (Ok(parse(&value).unwrap_or(Found::Pending)), None)
            }
            Err(()) => (Err(()), Some(held)),
        }
    }

    /// Reads what the store holds for the id now (while waiting for another replica).
    pub async fn look(&self, endpoint_id: &str, event_id: &str) -> Result<Option<Found>, ()> {
        let key = self.key(endpoint_id, event_id);
        let mut connection = self.connection.clone();
        let found: Option<String> = self
            .deadline(redis::cmd("GET").arg(&key).query_async(&mut connection))
            .await?;
        Ok(found.map(|value| parse(&value).unwrap_or(Found::Pending)))
    }

    fn release(&self, token: Token) {
        self.queue(Write::Release {
            key: token.key,
            token: token.token,
        });
    }

    fn queue(&self, write: Write) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.writes.try_send(write).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.failed("the queue of writes to the store is full");
        }
    }

    /// Waits until the claims held are given up or acknowledged and the writes queued are
    /// done, up to `timeout` (on shutdown, after the producer's flush).
    pub async fn flush(&self, timeout: Duration) {
        let until = tokio::time::Instant::now() + timeout;
        while self.pending.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn deadline<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ()> {
        match tokio::time::timeout(self.timeout, command).await {
            Ok(Ok(value)) => Ok(value),
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

    /// Counts a store error and marks the store down, logging the change once.
    fn failed(&self, reason: &str) {
        self.metrics.dedup_store_errors.inc();
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.dedup_store_up.set(0);
            tracing::warn!(
                %reason,
                "the shared duplicate store is unavailable: claims go to this process's memory \
                 (or deliveries are refused, with dedup.on_store_error = \"refuse\") until it \
                 answers again"
            );
        }
    }

    fn recovered(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.dedup_store_up.set(1);
            tracing::info!("the shared duplicate store answers again: claims are shared");
        }
    }
}

/// A claim in the store, held until Kafka's verdict: [`Held::acknowledged`] records it;
/// dropped without, the claim is given up (deleted if it still holds this token).
pub struct Held {
    shared: Arc<Shared>,
    token: Option<Token>,
}

impl Held {
    /// Records Kafka's acknowledgement (the original's place, for the window), without
    /// waiting for it.
    pub fn acknowledged(mut self, original: &Original) {
        if let Some(token) = self.token.take() {
            let value = format!(
                "d:{}:{}:{}",
                original.delivered.partition, original.delivered.offset, original.topic
            );
            self.shared.queue(Write::Done {
                key: token.key,
                value,
            });
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Not a claim of this delivery after all: nothing to give up.
    fn disarm(mut self) {
        if self.token.take().is_some() {
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.shared.release(token);
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        }
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

/// Writes acknowledgements and releases in pipelines, as they come.
async fn write_behind(
    shared: std::sync::Weak<Shared>,
    mut queue: mpsc::Receiver<Write>,
    window: Duration,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, 512).await > 0 {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let n = batch.len() as u64;
        let mut pipe = redis::pipe();
        for write in batch.drain(..) {
            match write {
                Write::Done { key, value } => {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(window.as_millis() as u64)
                        .ignore();
                }
                Write::Release { key, token } => {
                    pipe.cmd("EVAL")
                        .arg(RELEASE)
                        .arg(1)
                        .arg(key)
                        .arg(token)
                        .ignore();
                }
            }
        }
        if shared.is_up() {
            let mut connection = shared.connection.clone();
            let _: Result<(), ()> = shared
                .deadline(pipe.query_async::<()>(&mut connection))
                .await;
        } else {
            // Down: the writes are lost; pending claims expire by themselves, and the
            // acknowledged ids stay remembered in this process.
            shared.metrics.dedup_store_errors.inc_by(n);
        }
        shared.pending.fetch_sub(n, Ordering::Relaxed);
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
        let mut connection = shared.connection.clone();
        let ping = tokio::time::timeout(
            shared.timeout.max(Duration::from_millis(500)),
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        if matches!(ping, Ok(Ok(_))) {
            shared.recovered();
        }
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
