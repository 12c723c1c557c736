//! Reading a request body within its bounds, before anything about the sender is known.
//!
//! - **Bytes in memory.** Every body is read into one buffer, reserved from its declared
//!   length (at most [`BodyLimits::first_reserve`] before bytes arrive) or grown by doubling,
//!   whatever the framing: a body of a million one-byte chunks costs its length, not a
//!   million chunk headers. A body may not arrive in more than [`MAX_SMALL_FRAMES`] frames
//!   of fewer than [`SMALL_FRAME`] bytes on average: a stranger's one-byte chunks cost the
//!   bridge a frame's work each. All bodies in memory together, from the first byte until the last copy of the
//!   body is dropped (the record's delivery included), are bounded by one budget in bytes.
//! - **The slowest give way.** When a body needs memory the budget no longer has, the
//!   bodies that started receiving before it give up theirs, the oldest first (their
//!   senders get 503): a prompt sender's body is never older than a dribbling stranger's.
//!   When no older body is left to cut (the budget is taken by bodies already received,
//!   which are being published), the body that needs memory is refused instead.
//! - **A minimum rate.** After a grace period, a body must keep arriving at a minimum rate
//!   on average, or it is refused (408); the request's deadline bounds it in any case.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A body may arrive in this many frames (HTTP/1 chunks, HTTP/2 DATA frames) whatever their
/// size; beyond, in no more than one frame per [`SMALL_FRAME`] bytes.
pub const MAX_SMALL_FRAMES: usize = 256;
pub const SMALL_FRAME: usize = 64;

/// How a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("the request body arrived slower than {0} bytes a second")]
    TooSlow(u64),
    #[error(
        "the bridge's memory for request bodies is taken, and this body was among the slowest \
         to arrive; retry later"
    )]
    Evicted,
    #[error("the bridge's memory for request bodies is taken; retry later")]
    NoMemory,
    #[error("the request body could not be read: {0}")]
    Read(String),
    #[error(
        "the request body arrives in chunks of a few bytes each ({frames} for {bytes} bytes); \
         send it in larger ones"
    )]
    Fragmented { frames: usize, bytes: usize },
}

/// The bounds of body reading.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Bytes of bodies in memory at once.
    pub memory_bytes: usize,
    /// The most a body's buffer reserves from its declared length before any byte of it has
    /// arrived; it grows as the bytes do.
    pub first_reserve: usize,
    /// Bytes a second a body must arrive at, on average, once `rate_grace` has passed.
    pub min_rate: u64,
    pub rate_grace: Duration,
}

/// The budget of body memory, shared by every request.
pub struct Bodies {
    limits: BodyLimits,
    used: AtomicUsize,
    /// Told whenever bytes are given back.
    released: Notify,
    /// Bodies being received, oldest first.
    receiving: Mutex<BTreeMap<u64, Arc<Receiver>>>,
    next: AtomicU64,
}

/// What woke a body's reader.
enum Next<F> {
    Frame(Option<F>),
    Evicted,
    Timer,
}

/// A body being received, as others see it.
struct Receiver {
    /// Bytes its buffer holds, charged to the budget.
    charged: AtomicUsize,
    evicted: AtomicBool,
    wake: Notify,
}

/// Bytes charged to the budget, given back when dropped.
struct Charge {
    bodies: Arc<Bodies>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.bodies.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.bodies.released.notify_waiters();
        }
    }
}

/// A received body's buffer, which keeps its bytes charged until the last copy of the body
/// is dropped.
struct Owned {
    buf: Vec<u8>,
    _charge: Charge,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// Takes a body out of the receiving list when its reading ends, however it ends.
struct Registered<'a> {
    bodies: &'a Bodies,
    seq: u64,
    receiver: Arc<Receiver>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.bodies
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.seq);
    }
}

impl BodyLimits {
    /// The first reservation that lets every one of `connections` hold one with half the
    /// budget, between 4 and 64 KiB: a flood of request heads that declare large bodies
    /// cannot take the budget without sending the bytes.
    pub fn first_reserve_for(memory_bytes: usize, connections: usize) -> usize {
        (memory_bytes / (2 * connections.max(1))).clamp(4 << 10, 64 << 10)
    }
}

impl Bodies {
    pub fn new(limits: BodyLimits) -> Arc<Bodies> {
        Arc::new(Bodies {
            limits,
            used: AtomicUsize::new(0),
            released: Notify::new(),
            receiving: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// Bytes of bodies in memory now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.limits.memory_bytes).then_some(used + bytes)
            })
            .is_ok()
    }

    /// Charges `bytes` more to `charge`, cutting older bodies when the budget is taken and
    /// they can free enough.
    async fn grow(
        self: &Arc<Self>,
        me: &Registered<'_>,
        charge: &mut Charge,
        bytes: usize,
        deadline: Instant,
    ) -> Result<(), BodyError> {
        loop {
            // Both registered before anything is looked at: a release or a cut between the
            // look and the wait is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let evicted = me.receiver.wake.notified();
            tokio::pin!(evicted);
            evicted.as_mut().enable();
            // Cut while it waited here: it takes nothing more.
            if me.receiver.evicted.load(Ordering::Acquire) {
                return Err(BodyError::Evicted);
            }
            if self.try_charge(bytes) {
                charge.bytes += bytes;
                me.receiver.charged.store(charge.bytes, Ordering::Relaxed);
                return Ok(());
            }
            if bytes > self.limits.memory_bytes || !self.cut_older(me.seq, bytes) {
                return Err(BodyError::NoMemory);
            }
            // The cut bodies give their bytes back as soon as their readers run.
            tokio::select! {
                () = released => {}
                () = evicted => return Err(BodyError::Evicted),
                () = tokio::time::sleep_until(deadline) => return Err(BodyError::NoMemory),
            }
        }
    }

    /// Cuts the oldest bodies received before `seq` that, with the budget left, make room for
    /// `bytes`; cuts none and returns false when all of them together could not.
    fn cut_older(&self, seq: u64, bytes: usize) -> bool {
        let receiving = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
        let free = self.limits.memory_bytes.saturating_sub(self.used());
        let need = bytes.saturating_sub(free);
        if need == 0 {
            // Given back meanwhile: charge again.
            return true;
        }
        let mut victims = Vec::new();
        let mut freed = 0;
        for (_, receiver) in receiving.range(..seq) {
            if freed >= need {
                break;
            }
            let held = receiver.charged.load(Ordering::Relaxed);
            if held == 0 {
                continue;
            }
            // One cut already counts: its bytes come back when its reader runs.
            victims.push(receiver);
            freed += held;
        }
        if freed < need {
            return false;
        }
        for receiver in victims {
            if !receiver.evicted.swap(true, Ordering::AcqRel) {
                // Every waiter of the body: its read loop, or its own wait for memory.
                receiver.wake.notify_waiters();
            }
        }
        true
    }

    /// Reads `body` whole: at most `max` bytes (`declared` is its Content-Length, if any),
    /// by `deadline`.
    pub async fn read<B>(
        self: &Arc<Self>,
        body: B,
        declared: Option<u64>,
        max: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Bytes, BodyError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        if declared.is_some_and(|d| d > max as u64) {
            return Err(BodyError::TooLarge(max));
        }
        let started = Instant::now();
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let me = Registered {
            bodies: self,
            seq,
            receiver: Arc::new(Receiver {
                charged: AtomicUsize::new(0),
                evicted: AtomicBool::new(false),
                wake: Notify::new(),
            }),
        };
        self.receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq, me.receiver.clone());
        let mut charge = Charge {
            bodies: self.clone(),
            bytes: 0,
        };
        // What the declared length lets the buffer reach at once.
        let expected = declared.map(|d| d.min(max as u64) as usize);
        let mut buf: Vec<u8> = Vec::new();
        if let Some(expected) = expected.filter(|e| *e > 0) {
            let first = expected.min(self.limits.first_reserve);
            self.grow(&me, &mut charge, first, deadline).await?;
            buf.reserve_exact(first);
        }
        let rate = self.limits.min_rate;
        let grace = started + self.limits.rate_grace;
        let due = |received: usize| -> Instant {
            if rate == 0 {
                return deadline;
            }
            (grace + Duration::from_secs_f64(received as f64 / rate as f64)).min(deadline)
        };
        // One timer for the request, looked at again only when it fires: frames that are
        // ready cost no timer work.
        let timer = tokio::time::sleep_until(due(0));
        tokio::pin!(timer);
        let receiver = me.receiver.clone();
        let evicted = receiver.wake.notified();
        tokio::pin!(evicted);
        evicted.as_mut().enable();
        tokio::pin!(body);
        let mut frames = 0usize;
        loop {
            let next = std::future::poll_fn(|cx| {
                if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                    return Poll::Ready(Next::Frame(frame));
                }
                if evicted.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Next::Evicted);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Next::Timer);
                }
                Poll::Pending
            })
            .await;
            let frame = match next {
                Next::Frame(Some(frame)) => frame,
                Next::Frame(None) => break,
                Next::Evicted => return Err(BodyError::Evicted),
                Next::Timer => {
                    // The minimum has moved with the bytes received since the timer was set.
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(BodyError::Timeout(timeout));
                    }
                    let due = due(buf.len());
                    if now >= due {
                        return Err(BodyError::TooSlow(rate));
                    }
                    timer.as_mut().reset(due);
                    continue;
                }
            };
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                // Trailers: nothing to keep.
                continue;
            };
            if me.receiver.evicted.load(Ordering::Relaxed) {
                return Err(BodyError::Evicted);
            }
            let needed = buf.len() + data.len();
            frames += 1;
            if frames > MAX_SMALL_FRAMES && frames * SMALL_FRAME > needed {
                return Err(BodyError::Fragmented {
                    frames,
                    bytes: needed,
                });
            }
            if needed > max {
                return Err(BodyError::TooLarge(max));
            }
            if needed > buf.capacity() {
                let target = expected
                    .filter(|e| *e >= needed)
                    .map(|e| e.min(needed.max(2 * buf.capacity())))
                    .unwrap_or_else(|| needed.max(2 * buf.capacity()).min(max));
                let more = target - charge.bytes;
                self.grow(&me, &mut charge, more, deadline).await?;
                buf.reserve_exact(target - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        drop(me);
        if buf.is_empty() {
            return Ok(Bytes::new());
        }
        Ok(Bytes::from_owner(Owned {
            buf,
            _charge: charge,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::body::Frame;

    fn limits(memory_bytes: usize) -> BodyLimits {
        BodyLimits {
            memory_bytes,
            first_reserve: 64 << 10,
            min_rate: 0,
            rate_grace: Duration::from_secs(1),
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn a_body_of_small_chunks_costs_its_length_and_one_of_tiny_chunks_is_refused() {
        let bodies = Bodies::new(limits(1 << 20));
        let (tx, body) = chunks(10_000);
        for _ in 0..10_000 {
            tx.try_send(Bytes::from_static(&[b'x'; SMALL_FRAME]))
                .unwrap();
        }
        drop(tx);
        let bytes = bodies
            .read(body, None, 900_000, far(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(bytes.len(), 10_000 * SMALL_FRAME);
        let (tx, body) = chunks(100_000);
        for _ in 0..100_000 {
            tx.try_send(Bytes::from_static(b"x")).unwrap();
        }
        drop(tx);
        let e = bodies
            .read(body, None, 900_000, far(), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(
            matches!(e, BodyError::Fragmented { frames: 257, .. }),
            "{e:?}"
        );
        // Grown by doubling: at most twice its length is charged, and all of it is given back
        // with the last copy.
        let len = bytes.len();
        assert!(
            bodies.used() >= len && bodies.used() <= 2 * len,
            "{}",
            bodies.used()
        );
        let copy = bytes.clone();
        drop(bytes);
        assert!(bodies.used() > 0);
        drop(copy);
        assert_eq!(bodies.used(), 0);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_and_over_the_budget_are_refused() {
        let bodies = Bodies::new(limits(1000));
        let full = |n: usize| Full::new(Bytes::from(vec![b'a'; n]));
        let e = bodies
            .read(full(2000), Some(2000), 1500, far(), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::TooLarge(1500));
        let held = bodies
            .read(full(800), Some(800), 1500, far(), Duration::from_secs(60))
            .await
            .unwrap();
        // Received bodies are not cut: the next one is refused.
        let e = bodies
            .read(full(800), Some(800), 1500, far(), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::NoMemory);
        drop(held);
        assert_eq!(bodies.used(), 0);
    }

    #[tokio::test]
    async fn an_older_body_still_arriving_gives_way_to_a_newer_one() {
        let bodies = Bodies::new(limits(100_000));
        // A stranger's body: 90 kB declared, 60 kB sent, the rest never.
        let (tx, body) = chunks(4);
        tx.send(Bytes::from(vec![b'a'; 60_000])).await.unwrap();
        let slow = {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                bodies
                    .read(body, Some(90_000), 900_000, far(), Duration::from_secs(60))
                    .await
            })
        };
        while bodies.used() < 60_000 {
            tokio::task::yield_now().await;
        }
        let prompt = bodies
            .read(
                Full::new(Bytes::from(vec![b'b'; 50_000])),
                Some(50_000),
                900_000,
                far(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(prompt.len(), 50_000);
        assert_eq!(slow.await.unwrap().unwrap_err(), BodyError::Evicted);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dribbling_body_is_refused_after_the_grace() {
        let bodies = Bodies::new(BodyLimits {
            memory_bytes: 1 << 20,
            first_reserve: 64 << 10,
            min_rate: 1000,
            rate_grace: Duration::from_secs(2),
        });
        let (tx, body) = chunks(4);
        let reader = {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = bodies
                    .read(body, Some(100_000), 900_000, far(), Duration::from_secs(60))
                    .await;
                (result, started.elapsed())
            })
        };
        // 100 bytes a second, far under the minimum of 1000.
        for _ in 0..10 {
            let _ = tx.send(Bytes::from(vec![b'a'; 100])).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (result, took) = reader.await.unwrap();
        assert_eq!(result.unwrap_err(), BodyError::TooSlow(1000));
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_body_cut_while_it_waits_for_memory_gives_up_at_once() {
        let bodies = Bodies::new(limits(100_000));
        let timeout = Duration::from_secs(60);
        // The oldest: 40 kB arrived, the rest never; its reader is never run again, so its
        // bytes stay taken.
        let (old_tx, old_body) = chunks(4);
        old_tx.send(Bytes::from(vec![b'o'; 40_000])).await.unwrap();
        let mut oldest = Box::pin(bodies.read(old_body, None, 900_000, far(), timeout));
        assert!(futures_util::FutureExt::now_or_never(oldest.as_mut()).is_none());
        // Then a body of 30 kB that needs 40 kB more: it cuts the oldest and waits for its bytes.
        let (tx, body) = chunks(4);
        tx.send(Bytes::from(vec![b'a'; 30_000])).await.unwrap();
        let waiting = {
            let bodies = bodies.clone();
            tokio::spawn(async move { bodies.read(body, None, 900_000, far(), timeout).await })
        };
        while bodies.used() < 70_000 {
            tokio::task::yield_now().await;
        }
        tx.send(Bytes::from(vec![b'a'; 40_000])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A newcomer needs more than the oldest frees: the waiting body is cut too, and gives
        // up at once rather than when memory comes back.
        let newcomer = {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                bodies
                    .read(
                        Full::new(Bytes::from(vec![b'n'; 75_000])),
                        None,
                        900_000,
                        far(),
                        timeout,
                    )
                    .await
            })
        };
        let cut = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the cut body still waits for memory")
            .unwrap();
        assert_eq!(cut.unwrap_err(), BodyError::Evicted);
        drop(oldest);
        let got = newcomer.await.unwrap().unwrap();
        assert_eq!(got.len(), 75_000);
        drop((old_tx, tx));
    }

    #[tokio::test]
    async fn older_bodies_are_cut_only_when_they_free_enough() {
        let bodies = Bodies::new(limits(100_000));
        let timeout = Duration::from_secs(60);
        // 20 kB still arriving, then 60 kB received whole (being published).
        let (tx, body) = chunks(4);
        tx.send(Bytes::from(vec![b'a'; 20_000])).await.unwrap();
        let arriving = {
            let bodies = bodies.clone();
            tokio::spawn(async move { bodies.read(body, None, 900_000, far(), timeout).await })
        };
        while bodies.used() < 20_000 {
            tokio::task::yield_now().await;
        }
        let received = bodies
            .read(
                Full::new(Bytes::from(vec![b'r'; 60_000])),
                None,
                900_000,
                far(),
                timeout,
            )
            .await
            .unwrap();
        // 50 kB more cannot be had even by cutting the one arriving: it is refused, and the
        // one arriving is left alone.
        let e = bodies
            .read(
                Full::new(Bytes::from(vec![b'n'; 50_000])),
                None,
                900_000,
                far(),
                timeout,
            )
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::NoMemory);
        tx.send(Bytes::from(vec![b'a'; 20_000])).await.unwrap();
        drop(tx);
        assert_eq!(arriving.await.unwrap().unwrap().len(), 40_000);
        drop(received);
    }

    /// A body whose frames come from a channel (or were queued before), as a peer sends them.
    struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
        }
    }

    fn chunks(capacity: usize) -> (tokio::sync::mpsc::Sender<Bytes>, Chunks) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (tx, Chunks(rx))
    }
}
