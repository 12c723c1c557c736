//! The in-memory claims of this process (the only ones with `dedup.store = "memory"`, and
//! the first level in front of the shared store).
//!
//! The sender retries with the same `event_id`. Once an event is acknowledged by Kafka its id
//! is remembered for `dedup.window_secs`; a later delivery of it is answered with the
//! original record's place and writes nothing. Concurrent deliveries of one id are serialised:
//! the first publishes, the others wait for its outcome, and publish themselves only if it
//! failed. Memory is bounded: at most `dedup.max_entries` acknowledged ids are kept, the
//! oldest forgotten first. An id is kept as a 128-bit keyed hash of it (SipHash-1-3 under two
//! random keys of this process), about 100 bytes an entry with its place: two distinct ids
//! share one with a probability of about 10^-29 over a full table.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::publish::Delivered;

/// Where an already-acknowledged event was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    pub topic: Arc<str>,
    pub delivered: Delivered,
}

enum Entry {
    /// Being published; waiters watch for the outcome.
    InFlight(watch::Receiver<Option<Original>>),
    Done(Original),
}

/// A 128-bit keyed hash of an id.
type Key = u128;

/// Keys are already uniform: their low 64 bits are the table's hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

struct State {
    entries: HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>,
    /// Acknowledged ids in the order they were acknowledged, for expiry and the size bound.
    order: VecDeque<(Key, Instant)>,
}

pub struct Memory {
    window: Duration,
    max_entries: usize,
    /// The two keys of the id hash.
    hash: (RandomState, RandomState),
    state: Mutex<State>,
}

/// The outcome of [`Memory::claim`].
pub enum Claim {
    /// This delivery publishes; report the outcome through the guard.
    First(ClaimGuard),
    /// Already acknowledged: answer with the original's place.
    Duplicate(Original),
}

/// Held while an event is being published, until Kafka's delivery report, even when the
/// request that started it has already been answered. Dropping it without
/// [`ClaimGuard::acknowledged`] releases the id, so a retry may publish it.
pub struct ClaimGuard {
    dedup: Arc<Memory>,
    id: Key,
    tx: Option<watch::Sender<Option<Original>>>,
}

impl Memory {
    /// `window` zero turns suppression off.
    pub fn new(window: Duration, max_entries: usize) -> Memory {
        Memory {
            window,
            max_entries,
            hash: (RandomState::new(), RandomState::new()),
            state: Mutex::new(State {
                entries: HashMap::default(),
                order: VecDeque::new(),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero() && self.max_entries > 0
    }

    /// Acknowledged ids currently remembered.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key of an endpoint's event id; the endpoint id's length goes first, so that ids
    /// holding each other's bytes stay apart (`a:b`+`c` against `a`+`b:c`).
    fn key(&self, endpoint_id: &str, event_id: &str) -> Key {
        let half = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write_usize(endpoint_id.len());
            h.write(endpoint_id.as_bytes());
            h.write(event_id.as_bytes());
            h.finish()
        };
        u128::from(half(&self.hash.0)) << 64 | u128::from(half(&self.hash.1))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Claims `event_id` for publishing, or reports that it was already acknowledged. Waits
    /// while another delivery of the same id is being published.
    pub async fn claim(self: &Arc<Self>, endpoint_id: &str, event_id: &str) -> Claim {
        let id = self.key(endpoint_id, event_id);
        loop {
            let mut rx = {
                let mut state = self.lock();
                self.expire(&mut state, Instant::now());
                match state.entries.get(&id) {
                    Some(Entry::Done(original)) => return Claim::Duplicate(original.clone()),
                    Some(Entry::InFlight(rx)) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        state.entries.insert(id, Entry::InFlight(rx));
                        return Claim::First(ClaimGuard {
                            dedup: self.clone(),
                            id,
                            tx: Some(tx),
                        });
                    }
                }
            };
            // Wait for the other delivery: acknowledged means duplicate; a closed channel
            // means it failed and released the id, so try to claim it again.
            let outcome = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|o| o.clone());
            if let Some(original) = outcome {
                return Claim::Duplicate(original);
            }
        }
    }

    /// Forgets acknowledged ids older than the window, and the oldest beyond the bound. An
    /// id is queued once per acknowledgement, and acknowledged again only after it was
    /// forgotten, so the queue's front always matches a `Done` entry.
    fn expire(&self, state: &mut State, now: Instant) {
        while let Some((_, at)) = state.order.front() {
            let expired = now.saturating_duration_since(*at) >= self.window;
            if !expired && state.order.len() <= self.max_entries {
                break;
            }
            let Some((id, _)) = state.order.pop_front() else {
                break;
            };
            if matches!(state.entries.get(&id), Some(Entry::Done { .. })) {
                state.entries.remove(&id);
            }
        }
    }
}

impl ClaimGuard {
    /// Records that Kafka acknowledged the event, and tells any concurrent delivery.
    pub fn acknowledged(mut self, original: Original) {
        let now = Instant::now();
        let mut state = self.dedup.lock();
        state.entries.insert(self.id, Entry::Done(original.clone()));
        state.order.push_back((self.id, now));
        self.dedup.expire(&mut state, now);
        drop(state);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(original));
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let mut state = self.dedup.lock();
            if matches!(state.entries.get(&self.id), Some(Entry::InFlight(_))) {
                state.entries.remove(&self.id);
            }
            // Dropping the sender wakes the waiters, who then claim the id themselves.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original(offset: i64) -> Original {
        Original {
            topic: Arc::from("t"),
            delivered: Delivered {
                partition: 0,
                offset,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_ids_are_duplicates_until_the_window_passes() {
        let dedup = Arc::new(Memory::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("ep", "e1").await else {
            panic!("first claim")
        };
        guard.acknowledged(original(7));
        assert!(matches!(dedup.claim("ep", "e1").await, Claim::Duplicate(o) if o == original(7)));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(dedup.claim("ep", "e1").await, Claim::Duplicate(_)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(dedup.claim("ep", "e1").await, Claim::First(_)));
        assert_eq!(dedup.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ids_that_hold_each_others_bytes_stay_apart() {
        let dedup = Arc::new(Memory::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("a:b", "c").await else {
            panic!("first claim")
        };
        guard.acknowledged(original(1));
        assert!(matches!(dedup.claim("a", "b:c").await, Claim::First(_)));
        assert!(matches!(dedup.claim("a:b", "c").await, Claim::Duplicate(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_publish_releases_the_id() {
        let dedup = Arc::new(Memory::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("ep", "e1").await else {
            panic!()
        };
        drop(guard);
        assert!(matches!(dedup.claim("ep", "e1").await, Claim::First(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_ids_go_first_beyond_the_bound() {
        let dedup = Arc::new(Memory::new(Duration::from_secs(3600), 3));
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let Claim::First(g) = dedup.claim("ep", id).await else {
                panic!()
            };
            g.acknowledged(original(i as i64));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(dedup.len(), 3);
        assert!(matches!(dedup.claim("ep", "a").await, Claim::First(_)));
        for id in ["b", "c", "d"] {
            assert!(
                matches!(dedup.claim("ep", id).await, Claim::Duplicate(_)),
                "{id}"
            );
        }
    }

    #[tokio::test]
    async fn concurrent_deliveries_wait_for_the_first() {
        let dedup = Arc::new(Memory::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("ep", "e1").await else {
            panic!()
        };
        let waiter = {
            let dedup = dedup.clone();
            tokio::spawn(async move {
                match dedup.claim("ep", "e1").await {
                    Claim::Duplicate(o) => Some(o),
                    Claim::First(_) => None,
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the second delivery waits");
        guard.acknowledged(original(3));
        assert_eq!(waiter.await.unwrap(), Some(original(3)));

        // And when the first fails, the waiter gets to publish.
        let Claim::First(guard) = dedup.claim("ep", "e2").await else {
            panic!()
        };
        let waiter = {
            let dedup = dedup.clone();
            tokio::spawn(async move { matches!(dedup.claim("ep", "e2").await, Claim::First(_)) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        assert!(waiter.await.unwrap());
    }
}
