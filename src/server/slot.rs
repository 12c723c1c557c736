//! What the accept loop knows of each open connection, and which connection gives its slot up
//! at the connection bound.
//!
//! A connection is in one of three phases, read from its counters:
//! - **processing**: a request whose body has arrived is being verified, published or
//!   answered by its handler. Such a connection never gives way: its sender did its part.
//! - **idle**: no request in progress and nothing waiting to be written (between
//!   keep-alive requests, or before the first request head is complete).
//! - **stuck**: every request in progress is still receiving its body, or answers wait for
//!   a peer that does not take them (an HTTP/2 window kept at zero, a socket nobody reads).
//!
//! At the bound the victim is, in this order:
//! 1. a connection idle for longer than [`IDLE_GRACE`] since its last request (the longest
//!    idle first);
//! 2. one stuck for longer than [`STALL_GRACE`] (the longest stuck first);
//! 3. one whose answers wait for its peer, for less than that;
//! 4. one whose first request has not arrived yet (the oldest first): its sender may be
//!    slow to start on a loaded machine or far away, so it never gives way to a connection
//!    that holds answers its peer does not take;
//! 5. one idle for less than [`IDLE_GRACE`] since its last request;
//! 6. one receiving a body, for less than [`STALL_GRACE`].
//!
//! None goes before it is [`MIN_AGE`] old, nor while it processes a request, and a connection
//! asked to go that has request bytes waiting in its socket stays (see
//! `super::Connection::run`). Candidates are chosen by one scan for up to a batch of
//! accepts, not by a scan per accept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::admission::{self};
use super::h2guard::{Abuse, Watch};

/// An idle connection younger than this is taken only when no connection idle for longer,
/// or stuck, is left: a client may be sending a request on it right now, and a close would
/// lose that request (the keep-alive race).
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// A connection whose requests have made no progress (no body byte arrived, no answer byte
/// taken) for this long is stuck.
pub const STALL_GRACE: Duration = Duration::from_millis(200);

/// A connection younger than this never gives way: it has this long to send its request's
/// head. Under a flood of connections reopened as fast as they are closed, every slot would
/// otherwise be young, and a sender whose head has not been read yet could be the oldest.
pub const MIN_AGE: Duration = Duration::from_millis(250);

/// How long a batch of candidates may be used before the connections are looked at again.
const CANDIDATES_TTL: Duration = Duration::from_millis(500);

/// One open connection, as the accept loop and the connection's own task see it.
pub struct Slot {
    clock: Instant,
    opened: Instant,
    /// Requests (HTTP/2 streams) whose handler is running.
    pub handling: AtomicUsize,
    /// Of those, the ones whose body has not arrived in full.
    pub receiving: AtomicUsize,
    /// Answers the handler has made that the peer has not taken in full.
    pub answering: AtomicUsize,
    /// Requests from their head to their answer's last byte (see [`InProgress`]).
    in_progress: AtomicUsize,
    /// Open, asked to give its slot up, or closed (see [`admission::ask`]).
    state: AtomicUsize,
    /// Whether any request has started.
    pub started: AtomicBool,
    /// When anything last moved (µs on the listener's clock): a request started or ended, a
    /// body byte arrived, an answer byte left.
    progress_us: AtomicU64,
    /// When the connection last went from no request to one (µs).
    busy_since_us: AtomicU64,
    /// Since when a write to the socket has been waiting for the peer to read (µs); 0 when
    /// none is.
    write_blocked_us: AtomicU64,
    /// Told when the accept loop asks this connection to close for a new one.
    pub reclaim: Notify,
    /// Set by the HTTP/2 guard when it cuts the connection.
    pub abuse: Arc<OnceLock<Abuse>>,
}

/// What a connection is doing, for the accept loop's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Processing,
    /// Since when nothing has been in progress.
    Idle(Instant),
    /// Since when it has held resources without finishing anything.
    Stuck(Instant),
}

impl Slot {
    pub fn new(clock: Instant) -> Slot {
        let now = micros(clock);
        Slot {
            clock,
            opened: Instant::now(),
            handling: AtomicUsize::new(0),
            receiving: AtomicUsize::new(0),
            answering: AtomicUsize::new(0),
            in_progress: AtomicUsize::new(0),
            state: AtomicUsize::new(admission::OPEN),
            started: AtomicBool::new(false),
            progress_us: AtomicU64::new(now),
            busy_since_us: AtomicU64::new(now),
            write_blocked_us: AtomicU64::new(0),
            reclaim: Notify::new(),
            abuse: Default::default(),
        }
    }

    /// Whether the accept loop has asked this connection to give its slot up (and it has
    /// neither stayed nor closed since).
    #[cfg(test)]
    pub fn asked(&self) -> bool {
        self.state.load(Ordering::Acquire) == admission::ASKED
    }

    fn at(&self, us: u64) -> Instant {
        self.clock + Duration::from_micros(us)
    }

    /// Something moved.
    pub fn progressed(&self) {
        self.progress_us
            .store(micros(self.clock), Ordering::Relaxed);
    }

    pub fn last_progress(&self) -> Instant {
        self.at(self.progress_us.load(Ordering::Relaxed))
    }

    /// A request's handler starts.
    pub fn request_started(&self, receiving: bool) {
        self.started.store(true, Ordering::Relaxed);
        if receiving {
            self.receiving.fetch_add(1, Ordering::AcqRel);
        }
        if self.handling.fetch_add(1, Ordering::AcqRel) == 0 {
            self.busy_since_us
                .store(micros(self.clock), Ordering::Relaxed);
        }
        self.progressed();
    }

    /// A request's body has arrived in full (or will not be read any further).
    pub fn body_done(&self) {
        self.progressed();
        self.receiving.fetch_sub(1, Ordering::AcqRel);
    }

    /// A request's handler has made its answer.
    pub fn request_ended(&self) {
        // The time first: the accept loop reads the counters, then the time.
        self.progressed();
        self.handling.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn answer_started(&self) {
        self.answering.fetch_add(1, Ordering::AcqRel);
    }

    pub fn answer_ended(&self) {
        self.progressed();
        self.answering.fetch_sub(1, Ordering::AcqRel);
    }

    fn note_write(&self, blocked: bool) {
        let was = self.write_blocked_us.load(Ordering::Relaxed);
        if blocked && was == 0 {
            self.write_blocked_us
                .store(micros(self.clock).max(1), Ordering::Relaxed);
        } else if !blocked && was != 0 {
            self.write_blocked_us.store(0, Ordering::Relaxed);
            self.progressed();
        }
    }

    /// Since when writes have been waiting for the peer, if they are.
    pub fn blocked_since(&self) -> Option<Instant> {
        match self.write_blocked_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.at(us)),
        }
    }

    pub fn phase(&self) -> Phase {
        let handling = self.handling.load(Ordering::Acquire);
        let receiving = self.receiving.load(Ordering::Acquire);
        if handling > receiving {
            return Phase::Processing;
        }
        let answering = self.answering.load(Ordering::Acquire);
        let blocked = self.blocked_since();
        if handling == 0 && answering == 0 && blocked.is_none() {
            return Phase::Idle(self.last_progress());
        }
        // Requests still receiving their bodies are judged by when the connection became
        // busy (a slow body is old, a prompt sender's is new); answers left untaken by the
        // last thing that moved.
        let since = if receiving > 0 {
            self.at(self.busy_since_us.load(Ordering::Relaxed))
        } else {
            blocked.unwrap_or_else(|| self.last_progress())
        };
        Phase::Stuck(since)
    }
}

impl Watch for Slot {
    fn cut(&self, abuse: Abuse) {
        let _ = self.abuse.set(abuse);
    }

    fn write_blocked(&self, blocked: bool) {
        self.note_write(blocked);
    }
}

fn micros(clock: Instant) -> u64 {
    clock.elapsed().as_micros() as u64
}

/// The rank of a connection as a victim at the bound: lower goes first; None never goes.
fn rank(slot: &Slot, now: Instant) -> Option<(u8, Instant)> {
    if slot.state.load(Ordering::Acquire) != admission::OPEN
        || now.saturating_duration_since(slot.opened) < MIN_AGE
    {
        return None;
    }
    let phase = slot.phase();
    let started = slot.started.load(Ordering::Relaxed);
    let over = |since: Instant, grace: Duration| now.saturating_duration_since(since) >= grace;
    match phase {
        Phase::Processing => None,
        // Before its first request: after every connection holding answers, whatever the
        // time its sender takes to start.
        Phase::Idle(since) if !started => Some((3, since)),
        Phase::Idle(since) if over(since, IDLE_GRACE) => Some((0, since)),
        Phase::Stuck(since) if over(since, STALL_GRACE) => Some((1, since)),
        Phase::Stuck(since) if slot.receiving.load(Ordering::Acquire) == 0 => Some((2, since)),
        Phase::Idle(since) => Some((4, since)),
        Phase::Stuck(since) => Some((5, since)),
    }
}

/// A victim's place in line: its class, since when it has been so, and its id (the older
/// connection first among equals).
type Rank = (u8, Instant, u64);

/// The open connections.
pub struct Connections {
    pub clock: Instant,
    next_id: AtomicU64,
    open: AtomicUsize,
    /// Connections asked to give their slot up that have not closed (nor refused) yet.
    closing: AtomicUsize,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    /// The next victims, best first, from the last look at every connection.
    candidates: Mutex<Candidates>,
    /// Told when a connection asked to close turned out to be processing a request: the
    /// accept loop then asks the next one.
    pub refused: Notify,
    batch: usize,
    /// Requests in progress (from their head to their answer's last byte) beyond the first of
    /// each connection, and their bound.
    extra: AtomicUsize,
    max_extra: usize,
}

struct Candidates {
    slots: Vec<Weak<Slot>>,
    taken_at: Option<Instant>,
}

/// A request in progress on its connection, counted against the bound of requests beyond
/// the first of each connection; given back when dropped.
pub struct InProgress {
    connections: Arc<Connections>,
    slot: Arc<Slot>,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        admission::release(&self.slot.in_progress, &self.connections.extra);
    }
}

/// A connection's place in [`Connections`], given up when dropped (a panicking connection
/// task included).
pub struct Open {
    connections: Arc<Connections>,
    id: u64,
    slot: Arc<Slot>,
}

impl Drop for Open {
    fn drop(&mut self) {
        // Closed for good: its stream tasks may keep the slot alive a little longer, but it
        // can no longer be asked to go.
        admission::close(&self.slot.state, &self.connections.closing);
        self.connections
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connections {
    /// `batch`: how many victims one look at the connections may pick; `max_extra`: how many
    /// requests may be in progress beyond the first of each connection.
    pub fn new(batch: usize, max_extra: usize) -> Connections {
        Connections {
            clock: Instant::now(),
            next_id: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            slots: Mutex::new(HashMap::new()),
            candidates: Mutex::new(Candidates {
                slots: Vec::new(),
                taken_at: None,
            }),
            refused: Notify::new(),
            batch: batch.max(1),
            extra: AtomicUsize::new(0),
            max_extra,
        }
    }

    /// Counts a request on `slot` from its head until its answer is gone; None when it is
    /// not the connection's only one and the bridge is at its bound of such requests.
    pub fn admit(self: &Arc<Self>, slot: &Arc<Slot>) -> Option<InProgress> {
        if !admission::admit(&slot.in_progress, &self.extra, self.max_extra) {
            return None;
        }
        Some(InProgress {
            connections: self.clone(),
            slot: slot.clone(),
        })
    }

    /// Connections asked to give their slot up that have neither closed nor stayed yet.
    pub fn closing(&self) -> usize {
        self.closing.load(Ordering::Acquire)
    }

    /// Open connections that have not been asked to close.
    pub fn staying(&self) -> usize {
        self.open
            .load(Ordering::Acquire)
            .saturating_sub(self.closing.load(Ordering::Acquire))
    }

    pub fn open(self: &Arc<Self>) -> (Open, Arc<Slot>) {
        let slot = Arc::new(Slot::new(self.clock));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, slot.clone());
        self.open.fetch_add(1, Ordering::AcqRel);
        let open = Open {
            connections: self.clone(),
            id,
            slot: slot.clone(),
        };
        (open, slot)
    }

    /// A connection asked to close keeps its slot after all (it is processing a request, or
    /// a request's bytes wait in its socket). The accept loop, told, asks another unless a
    /// slot has come free meanwhile.
    pub fn stays(&self, slot: &Slot) {
        if admission::stay(&slot.state, &self.closing) {
            self.refused.notify_one();
        }
    }

    /// Asks the best victim to close; false when every connection is processing a request
    /// (or has been asked already).
    pub fn reclaim_one(&self) -> bool {
        let now = Instant::now();
        let mut candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = candidates
            .taken_at
            .is_some_and(|at| now.saturating_duration_since(at) < CANDIDATES_TTL);
        if !fresh || candidates.slots.is_empty() {
            candidates.slots = self.pick(now);
            candidates.taken_at = Some(now);
        }
        // Best first: the list is kept in reverse.
        while let Some(weak) = candidates.slots.pop() {
            let Some(slot) = weak.upgrade() else { continue };
            // Closed meanwhile (its streams' tasks may still hold the slot), turned busy, or
            // asked already: the next.
            if rank(&slot, now).is_none() || !admission::ask(&slot.state, &self.closing) {
                continue;
            }
            slot.reclaim.notify_one();
            return true;
        }
        false
    }

    /// Up to a batch of victims, worst-placed last (so that `pop` takes the best).
    fn pick(&self, now: Instant) -> Vec<Weak<Slot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut ranked: Vec<(Rank, &Arc<Slot>)> = slots
            .iter()
            .filter_map(|(id, slot)| rank(slot, now).map(|(c, t)| ((c, t, *id), slot)))
            .collect();
        if ranked.len() > self.batch {
            ranked.select_nth_unstable_by_key(self.batch - 1, |(key, _)| *key);
            ranked.truncate(self.batch);
        }
        ranked.sort_unstable_by_key(|(key, _)| std::cmp::Reverse(*key));
        ranked.iter().map(|(_, s)| Arc::downgrade(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_has_one_request_beyond_the_bound_of_the_rest() {
        let connections = Arc::new(Connections::new(16, 2));
        let (_a, a) = connections.open();
        let (_b, b) = connections.open();
        let first_a = connections.admit(&a).expect("a connection's first");
        let extra: Vec<InProgress> = (0..2).map(|_| connections.admit(&a).unwrap()).collect();
        assert!(connections.admit(&a).is_none(), "a third beyond the first");
        // Another connection still has its first.
        let first_b = connections.admit(&b).expect("b's first");
        assert!(connections.admit(&b).is_none());
        // Whichever ends, a slot for one more opens.
        drop(first_a);
        let again = connections.admit(&b).expect("room again");
        drop((extra, again, first_b));
        assert_eq!(connections.extra.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn victims_come_in_order_and_processing_connections_never_go() {
        let connections = Arc::new(Connections::new(16, 16));
        let (_a, processing) = connections.open();
        processing.request_started(false);
        let (_b, never_started) = connections.open();
        tokio::time::advance(Duration::from_secs(2)).await;
        let (_c, receiving) = connections.open();
        receiving.request_started(true);
        let (_d, kept_alive) = connections.open();
        kept_alive.request_started(false);
        kept_alive.request_ended();
        let (_e, answering) = connections.open();
        answering.request_started(false);
        answering.answer_started();
        answering.request_ended();
        tokio::time::advance(Duration::from_millis(300)).await;
        // Its answer's last byte went 100 ms ago: waiting for its peer for less than the grace.
        answering.progressed();
        tokio::time::advance(Duration::from_millis(100)).await;
        let (_f, newborn) = connections.open();

        let named = [
            ("never started, 2.4 s", &never_started),
            ("receiving for 0.4 s", &receiving),
            ("idle 0.4 s after a request", &kept_alive),
            ("answer untaken for 0.1 s", &answering),
        ];
        let mut order = Vec::new();
        for _ in 0..named.len() {
            assert!(connections.reclaim_one());
            let next = named
                .iter()
                .find(|(name, s)| s.asked() && !order.contains(name))
                .map(|(name, _)| *name)
                .expect("one more was asked to close");
            order.push(next);
        }
        assert_eq!(
            order,
            [
                "receiving for 0.4 s",
                "answer untaken for 0.1 s",
                "never started, 2.4 s",
                "idle 0.4 s after a request",
            ]
        );
        assert!(!processing.asked());
        assert!(
            !connections.reclaim_one(),
            "only a processing one and one too young are left"
        );
        assert!(!newborn.asked());
        assert_eq!(connections.staying(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_before_its_first_request_goes_after_every_one_holding_answers() {
        let connections = Arc::new(Connections::new(16, 16));
        let (_a, waiting) = connections.open();
        tokio::time::advance(Duration::from_secs(5)).await;
        // Answers its peer has taken nothing of for 1 ms, on a young connection.
        let (_b, answering) = connections.open();
        answering.request_started(false);
        answering.answer_started();
        answering.request_ended();
        tokio::time::advance(MIN_AGE).await;
        answering.progressed();
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(connections.reclaim_one());
        assert!(answering.asked() && !waiting.asked());
        assert!(connections.reclaim_one());
        assert!(waiting.asked());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closed_while_its_streams_hold_the_slot_is_not_asked() {
        let connections = Arc::new(Connections::new(16, 16));
        let (_a, first) = connections.open();
        let (b, second) = connections.open();
        tokio::time::advance(Duration::from_secs(2)).await;
        // One look at both; the first is asked.
        assert!(connections.reclaim_one());
        assert!(first.asked());
        // The second closes while a stream's task still holds its slot.
        drop(b);
        assert!(!connections.reclaim_one(), "a closed connection was asked");
        assert!(!second.asked());
        assert_eq!(connections.closing(), 1);
        drop(_a);
        assert_eq!(connections.closing(), 0);
        assert_eq!(connections.staying(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_idle_goes_before_a_stuck_one_and_a_refusal_frees_the_next() {
        let connections = Arc::new(Connections::new(16, 16));
        let (_a, stuck) = connections.open();
        stuck.request_started(true);
        tokio::time::advance(Duration::from_secs(3)).await;
        let (_b, idle) = connections.open();
        idle.request_started(false);
        idle.request_ended();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(connections.reclaim_one());
        assert!(idle.asked(), "idle past the grace first");
        // It started a request meanwhile: it stays, and the stuck one is asked next.
        idle.request_started(false);
        connections.stays(&idle);
        assert!(connections.reclaim_one());
        assert!(stuck.asked());
        assert_eq!(connections.staying(), 1);
    }
}
