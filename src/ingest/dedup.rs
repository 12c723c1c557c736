//! Duplicate suppression by `event_id`, per bridge process.
//!
//! The sender retries with the same `event_id`. Once an event is acknowledged by Kafka its id
//! is remembered for `dedup.window_secs`; a later delivery of it is answered with the
//! original record's place and writes nothing. Concurrent deliveries of one id are serialised:
//! the first publishes, the others wait for its outcome, and publish themselves only if it
//! failed. Memory is bounded: at most `dedup.max_entries` acknowledged ids are kept, the
//! oldest forgotten first.

use std::collections::{HashMap, VecDeque};
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

struct State {
    entries: HashMap<Arc<str>, Entry>,
    /// Acknowledged ids in the order they were acknowledged, for expiry and the size bound.
    order: VecDeque<(Arc<str>, Instant)>,
}

pub struct Dedup {
    window: Duration,
    max_entries: usize,
    state: Mutex<State>,
}

/// The outcome of [`Dedup::claim`].
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
    dedup: Arc<Dedup>,
    id: Arc<str>,
    tx: Option<watch::Sender<Option<Original>>>,
}

impl Dedup {
    /// `window` zero turns suppression off.
    pub fn new(window: Duration, max_entries: usize) -> Dedup {
        Dedup {
            window,
            max_entries,
            state: Mutex::new(State {
                entries: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero() && self.max_entries > 0
    }

    /// Acknowledged ids currently remembered.
    pub fn len(&self) -> usize {
        self.state.lock().expect("dedup lock").order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Claims `event_id` for publishing, or reports that it was already acknowledged. Waits
    /// while another delivery of the same id is being published.
    pub async fn claim(self: &Arc<Self>, event_id: &str) -> Claim {
        loop {
            let mut rx = {
                let mut state = self.state.lock().expect("dedup lock");
                self.expire(&mut state, Instant::now());
                match state.entries.get(event_id) {
                    Some(Entry::Done(original)) => return Claim::Duplicate(original.clone()),
                    Some(Entry::InFlight(rx)) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        let id: Arc<str> = Arc::from(event_id);
                        state.entries.insert(id.clone(), Entry::InFlight(rx));
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
            let (id, _) = state.order.pop_front().expect("front exists");
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
        let mut state = self.dedup.state.lock().expect("dedup lock");
        state
            .entries
            .insert(self.id.clone(), Entry::Done(original.clone()));
        state.order.push_back((self.id.clone(), now));
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
            let mut state = self.dedup.state.lock().expect("dedup lock");
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
        let dedup = Arc::new(Dedup::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("e1").await else {
            panic!("first claim")
        };
        guard.acknowledged(original(7));
        assert!(matches!(dedup.claim("e1").await, Claim::Duplicate(o) if o == original(7)));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(dedup.claim("e1").await, Claim::Duplicate(_)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(dedup.claim("e1").await, Claim::First(_)));
        assert_eq!(dedup.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_publish_releases_the_id() {
        let dedup = Arc::new(Dedup::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("e1").await else {
            panic!()
        };
        drop(guard);
        assert!(matches!(dedup.claim("e1").await, Claim::First(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_ids_go_first_beyond_the_bound() {
        let dedup = Arc::new(Dedup::new(Duration::from_secs(3600), 3));
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let Claim::First(g) = dedup.claim(id).await else {
                panic!()
            };
            g.acknowledged(original(i as i64));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(dedup.len(), 3);
        assert!(matches!(dedup.claim("a").await, Claim::First(_)));
        for id in ["b", "c", "d"] {
            assert!(matches!(dedup.claim(id).await, Claim::Duplicate(_)), "{id}");
        }
    }

    #[tokio::test]
    async fn concurrent_deliveries_wait_for_the_first() {
        let dedup = Arc::new(Dedup::new(Duration::from_secs(60), 100));
        let Claim::First(guard) = dedup.claim("e1").await else {
            panic!()
        };
        let waiter = {
            let dedup = dedup.clone();
            tokio::spawn(async move {
                match dedup.claim("e1").await {
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
        let Claim::First(guard) = dedup.claim("e2").await else {
            panic!()
        };
        let waiter = {
            let dedup = dedup.clone();
            tokio::spawn(async move { matches!(dedup.claim("e2").await, Claim::First(_)) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        assert!(waiter.await.unwrap());
    }
}
