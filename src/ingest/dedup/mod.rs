//! Duplicate suppression by `(endpoint_id, event_id)`.
//!
//! The sender retries with the same `event_id`. Once an event is acknowledged by Kafka its id
//! is remembered for `dedup.window_secs`; a later delivery of it is answered with the
//! original record's place and writes nothing. Concurrent deliveries of one id are
//! serialised: the first publishes, the others wait for its outcome, and publish themselves
//! only if it failed. A claim lasts until Kafka's verdict, not until the request's answer.
//!
//! Claims live in this process's memory ([`memory`]) and, with `dedup.store = "redis"`, in a
//! store every replica shares ([`shared`]): memory first (a retry that comes back to the same
//! replica costs no round trip), then the shared store. While that store cannot be used,
//! `dedup.on_store_error` decides: claims in memory only (their verdicts are written to the
//! store once it is back), or 503.

mod link;
pub mod memory;
pub mod shared;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{DedupStore, OnStoreError, Settings, SettingsError};
use crate::metrics::Metrics;
pub use memory::Original;
use shared::{Claimed, Found, Shared};

/// The duplicate suppression the settings ask for, checked.
#[derive(Clone)]
pub struct Plan {
    window: Duration,
    max_entries: usize,
    shared: Option<shared::Plan>,
    on_store_error: OnStoreError,
}

impl Plan {
    pub fn build(settings: &Settings) -> Result<Plan, SettingsError> {
        let d = &settings.dedup;
        let shared = match d.store {
            DedupStore::Memory => None,
            // A claim outlives its request by up to the delivery timeout (a record handed to
            // Kafka late in its request may be acknowledged after the request's deadline).
            DedupStore::Redis => Some(shared::Plan::build(
                d,
                Duration::from_millis(
                    settings.server.request_timeout_ms + settings.kafka.delivery_timeout_ms,
                ),
            )?),
        };
        Ok(Plan {
            window: Duration::from_secs(d.window_secs),
            max_entries: d.max_entries,
            shared,
            on_store_error: d.on_store_error,
        })
    }
}

/// Why no claim could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unclaimed {
    /// The deadline passed while another delivery of the id was being published.
    Timeout,
    /// The shared store cannot be used and `dedup.on_store_error` is `refuse`.
    StoreUnavailable,
    /// The caller gave up waiting for another delivery of the id (its `give_up` came first).
    GaveUp,
}

/// The outcome of [`Dedup::claim`].
pub enum Claim {
    /// This delivery publishes; report the outcome through the guard.
    First(ClaimGuard),
    /// Already acknowledged: answer with the original's place.
    Duplicate(Original),
}

/// Held while an event is being published, until Kafka's delivery report. Dropping it
/// without [`ClaimGuard::acknowledged`] releases the id, so a retry may publish it.
pub struct ClaimGuard {
    local: memory::ClaimGuard,
    /// With the shared store: the claim there (given up when dropped).
    shared: Option<shared::Held>,
}

impl ClaimGuard {
    /// Records that Kafka acknowledged the event, and tells any concurrent delivery.
    pub fn acknowledged(self, original: Original) {
        if let Some(held) = self.shared {
            held.acknowledged(&original);
        }
        self.local.acknowledged(original);
    }
}

/// Duplicate suppression in force.
pub struct Dedup {
    local: Arc<memory::Memory>,
    shared: Option<Arc<Shared>>,
    on_store_error: OnStoreError,
    metrics: Arc<Metrics>,
}

impl Dedup {
    /// Starts the plan's suppression (on the async runtime: the shared store's background
    /// tasks run there).
    pub fn start(plan: Plan, metrics: Arc<Metrics>) -> Result<Dedup, String> {
        let shared = match plan.shared {
            Some(p) => Some(Shared::start(p, metrics.clone())?),
            None => None,
        };
        if shared.is_none() {
            metrics.dedup_store_up.set(1);
        }
        Ok(Dedup {
            local: Arc::new(memory::Memory::new(plan.window, plan.max_entries)),
            shared,
            on_store_error: plan.on_store_error,
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.local.enabled()
    }

    /// Acknowledged ids remembered in this process.
    pub fn len(&self) -> usize {
        self.local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }

    /// Claims an endpoint's event id, or says where it was written; waits while another delivery of it is being published, until
    /// `deadline`.
    pub async fn claim(
        &self,
        endpoint_id: &str,
        event_id: &str,
        deadline: tokio::time::Instant,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Claim, Unclaimed> {
        // Waiting for this process's other delivery of the id can stop at any point; a wait
        // on the shared store (below) is not cut short.
        let local = tokio::select! {
            local = tokio::time::timeout_at(deadline, self.local.claim(endpoint_id, event_id)) => {
                local.map_err(|_| Unclaimed::Timeout)?
            }
            () = give_up => return Err(Unclaimed::GaveUp),
        };
        let guard = match local {
            memory::Claim::Duplicate(original) => return Ok(Claim::Duplicate(original)),
            memory::Claim::First(guard) => guard,
        };
        let Some(shared) = &self.shared else {
            return Ok(Claim::First(ClaimGuard {
                local: guard,
                shared: None,
            }));
        };
        // The store cannot be used: this process's claim alone, whose verdict is written to
        // the store when it is back (or 503, as set).
        let local_only = |guard, held: shared::Held| match self.on_store_error {
            OnStoreError::Local => Ok(Claim::First(ClaimGuard {
                local: guard,
                shared: Some(held),
            })),
            OnStoreError::Refuse => Err(Unclaimed::StoreUnavailable),
        };
        let mut claimed = shared.claim(endpoint_id, event_id, deadline).await;
        loop {
            let found = match claimed {
                Claimed::Mine(held) => {
                    return Ok(Claim::First(ClaimGuard {
                        local: guard,
                        shared: Some(held),
                    }))
                }
                Claimed::Unavailable(held) => return local_only(guard, held),
                Claimed::Found(found) => found,
            };
            match found {
                Found::Done(original) => {
                    // Written by another replica: remembered here too.
                    guard.acknowledged(original.clone());
                    self.metrics.dedup_entries.set(self.local.len() as i64);
                    return Ok(Claim::Duplicate(original));
                }
                Found::Pending => {
                    claimed = verdict(shared, endpoint_id, event_id, deadline).await?;
                }
            }
        }
    }

    /// Waits up to `timeout` for the writes to the shared store to be done (on shutdown).
    /// Waits up to `timeout` for the shared store's writes; returns how many are left.
    pub async fn flush(&self, timeout: Duration) -> u64 {
        match &self.shared {
            Some(shared) => shared.flush(timeout).await,
            None => 0,
        }
    }
}

/// Another delivery is publishing the id: its verdict is awaited, reading the key again; a
/// command that fails is tried again, within the deadline, while the store is not marked
/// down. A released id is claimed again.
async fn verdict(
    shared: &Arc<Shared>,
    endpoint_id: &str,
    event_id: &str,
    deadline: tokio::time::Instant,
) -> Result<Claimed, Unclaimed> {
    loop {
        if tokio::time::Instant::now() + shared::POLL > deadline {
            return Err(Unclaimed::Timeout);
        }
        tokio::time::sleep(shared::POLL).await;
        match shared.look(endpoint_id, event_id).await {
            Ok(Some(found)) => return Ok(Claimed::Found(found)),
            // Released by a failed delivery: claim it again.
            Ok(None) => return Ok(shared.claim(endpoint_id, event_id, deadline).await),
            Err(()) if shared.is_up() => {}
            Err(()) => {
                return Ok(Claimed::Unavailable(
                    shared.unclaimed(endpoint_id, event_id),
                ))
            }
        }
    }
}
