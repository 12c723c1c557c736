//! The accept loop shared by the ingress and admin listeners: HTTP/1.1 and HTTP/2 through
//! hyper-util, in cleartext or over TLS, with every connection bounded:
//!
//! - its first request: the TLS handshake and the request head (for HTTP/2, the first
//!   stream's headers) must arrive within `header_read_timeout` of the connection's accept;
//! - idleness: a connection with no request in progress is closed `idle_timeout` after its
//!   last answer, HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 peers are pinged, and a peer
//!   that does not answer is dropped;
//! - their number: at `max_connections`, a new connection reclaims the longest-idle one
//!   (closed gracefully; up to 1/16 of the bound may be such connections still closing)
//!   instead of waiting behind it;
//! - HTTP/2 abuse: streams per connection, resets, control-frame floods and oversized header
//!   blocks (see [`h2guard`]) close the connection;
//! - shutdown: stop accepting, close idle connections, let requests in flight finish within
//!   `drain_timeout`.

mod h2guard;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;
use tls::Tls;

/// A connection's byte stream: TCP, or TLS over TCP, behind one type.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Serve HTTP/2 besides HTTP/1.1.
    pub http2: bool,
    /// Time from accept to the first request's head, TLS handshake included.
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
    /// Deadline of a whole request: a connection told to close may take this long to finish
    /// the one in progress.
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Period of the PINGs sent to HTTP/2 peers; None sends none.
    pub http2_keepalive_interval: Option<Duration>,
    /// Time a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
}

impl Limits {
    /// The ingress's bounds, from its settings.
    pub fn of(server: &crate::config::Server) -> Limits {
        let ms = Duration::from_millis;
        Limits {
            http2: true,
            header_read_timeout: ms(server.header_read_timeout_ms),
            idle_timeout: ms(server.idle_timeout_ms),
            request_timeout: ms(server.request_timeout_ms),
            max_connections: server.max_connections,
            drain_timeout: ms(server.drain_timeout_ms),
            http2_max_concurrent_streams: server.http2_max_concurrent_streams,
            http2_keepalive_interval: Some(ms(server.http2_keepalive_interval_ms))
                .filter(|d| !d.is_zero()),
            http2_keepalive_timeout: ms(server.http2_keepalive_timeout_ms),
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished its requests and closed.
    Complete,
    /// The drain deadline passed with connections still open.
    TimedOut,
}

/// Why the bridge closed a connection it could have kept: the `reason` label of
/// `tamio_bridge_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No request in progress for `idle_timeout`.
    Idle,
    /// The connection bound was reached and a new connection needed the slot.
    Reclaimed,
    /// The TLS handshake and first request head did not arrive within the header timeout.
    SlowStart,
    /// An HTTP/2 peer broke a bound on frames (see [`h2guard`]).
    Http2Abuse,
}

impl CloseReason {
    pub const ALL: [CloseReason; 4] = [
        CloseReason::Idle,
        CloseReason::Reclaimed,
        CloseReason::SlowStart,
        CloseReason::Http2Abuse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Reclaimed => "reclaimed",
            CloseReason::SlowStart => "slow_start",
            CloseReason::Http2Abuse => "http2_abuse",
        }
    }
}

/// How long a connection told to close while idle may take to go (a peer that answers the
/// goodbye goes at once; the rest of this is for the last bytes to be written).
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(100);

/// Beyond the connection bound, at most this share of it (1/16) may be connections that
/// were asked to give their slot up and are still closing.
const RECLAIM_SLACK_DIVISOR: usize = 16;

/// HTTP/2 streams the bridge may reset for the peer's errors (refused beyond the stream
/// bound, headers too large) before it closes the connection.
const H2_MAX_ERROR_RESETS: usize = 128;

/// Largest decoded header list an HTTP/2 request may carry; larger ones are answered 431.
const H2_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// One open connection, as the accept loop and the connection's own task see it.
struct Slot {
    /// Requests (HTTP/2 streams) in progress.
    active: AtomicUsize,
    /// Whether any request has started.
    started: AtomicBool,
    /// Microseconds since the listener started at which the connection last became idle.
    idle_since_us: AtomicU64,
    /// Set once the accept loop asked this connection to close for a new one.
    reclaimed: AtomicBool,
    reclaim: Notify,
    /// Set by [`h2guard`] when it cuts the connection.
    abuse: Arc<std::sync::OnceLock<h2guard::Abuse>>,
}

/// Counts a request on its connection while it runs.
struct Busy {
    slot: Arc<Slot>,
    clock: Instant,
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Store the time first: the accept loop reads `active`, then the time.
        self.slot
            .idle_since_us
            .store(micros_since(self.clock), Ordering::Relaxed);
        self.slot.active.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its request counted until hyper is done with it, so that a
/// connection is not closed as idle between the handler's end and the answer's last byte.
pub struct Tracked {
    inner: Full<Bytes>,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn micros_since(clock: Instant) -> u64 {
    clock.elapsed().as_micros() as u64
}

/// The open connections, for reclaiming the longest-idle one.
struct Connections {
    clock: Instant,
    next_id: AtomicU64,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
}

/// A connection's place in [`Connections`], given up when dropped (a panicking connection
/// task included).
struct Open {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.connections.close(self.id);
    }
}

impl Connections {
    fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn open(self: &Arc<Self>) -> (Open, Arc<Slot>) {
        let slot = Arc::new(Slot {
            active: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            idle_since_us: AtomicU64::new(micros_since(self.clock)),
            reclaimed: AtomicBool::new(false),
            reclaim: Notify::new(),
            abuse: Default::default(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, slot.clone());
        let open = Open {
            connections: self.clone(),
            id,
        };
        (open, slot)
    }

    fn close(&self, id: u64) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Asks the connection idle the longest to close; false when every connection has a
    /// request in progress (or has already been asked).
    fn reclaim_longest_idle(&self) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let longest = slots
            .iter()
            .filter(|(_, s)| {
                s.active.load(Ordering::Acquire) == 0 && !s.reclaimed.load(Ordering::Relaxed)
            })
            // The older connection first among those idle since the same instant.
            .min_by_key(|(id, s)| (s.idle_since_us.load(Ordering::Relaxed), **id))
            .map(|(_, s)| s);
        match longest {
            Some(slot) => {
                slot.reclaimed.store(true, Ordering::Relaxed);
                slot.reclaim.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `handler` on `listener` (over TLS when `tls` is given) until `shutdown` completes,
/// then stops accepting and waits up to `limits.drain_timeout` for open connections to finish
/// their requests.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    handler: H,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Drain
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer would also end idle keep-alive connections; the deadlines of
    // this module replace it.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_local_error_reset_streams(H2_MAX_ERROR_RESETS)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    let connections = Arc::new(Connections {
        clock: Instant::now(),
        next_id: AtomicU64::new(0),
        slots: Mutex::new(HashMap::new()),
    });
    // The bound, and room beside it for reclaimed connections that are still closing.
    let slack = (limits.max_connections / RECLAIM_SLACK_DIVISOR).max(1);
    let total = limits.max_connections + slack;
    let permits = Arc::new(Semaphore::new(total));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);

    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // At the bound, the connection idle the longest gives its slot up and the new one is
        // served meanwhile; when every connection has a request in progress, the new one
        // waits until one ends.
        if connections.len() >= limits.max_connections && !connections.reclaim_longest_idle() {
            let room = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if connections.len() < limits.max_connections
                        || connections.reclaim_longest_idle()
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                () = room => {}
                () = &mut shutdown => break,
            }
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (open, slot) = connections.open();
        let connection = Connection {
            slot,
            clock: connections.clock,
            accepted: Instant::now(),
            limits,
            metrics: metrics.clone(),
        };
        let (handler, builder, stop) = (handler.clone(), builder.clone(), stop_rx.clone());
        let tls = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            connection.run(stream, tls, builder, handler, stop).await;
            drop(open);
            drop(permit);
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(total).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(limits.drain_timeout, permits.acquire_many(all)).await;
    match drained {
        Ok(_) => Drain::Complete,
        Err(_) => Drain::TimedOut,
    }
}

/// One accepted connection and its bounds.
struct Connection {
    slot: Arc<Slot>,
    clock: Instant,
    accepted: Instant,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl Connection {
    fn closed(&self, reason: CloseReason) {
        self.metrics
            .connections_closed
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// The stream to serve, and its protocol when it is already known, established within
    /// the first-request deadline; None when the connection ends before that.
    async fn establish(
        &self,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Option<(Protocol, Box<dyn Stream>)> {
        match tls {
            // In cleartext hyper-util tells HTTP/1 from HTTP/2 by the first bytes.
            None if self.limits.http2 => Some((Protocol::Either, Box::new(stream))),
            None => Some((Protocol::Http1, Box::new(stream))),
            Some(acceptor) => match acceptor.accept(stream).await {
                Ok(stream) => {
                    // ALPN tells the protocol.
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let protocol = if self.limits.http2 && h2 {
                        Protocol::Http2
                    } else {
                        Protocol::Http1
                    };
                    Some((protocol, Box::new(stream)))
                }
                Err(err) => {
                    tracing::debug!(error = %err, "TLS handshake failed");
                    None
                }
            },
        }
    }

    async fn run<H, Fut>(
        self,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        builder: auto::Builder<TokioExecutor>,
        handler: H,
        mut stop: watch::Receiver<bool>,
    ) where
        H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let first_deadline = self.accepted + self.limits.header_read_timeout;
        let established = tokio::select! {
            established = tokio::time::timeout_at(first_deadline, self.establish(stream, tls)) => {
                match established {
                    Ok(Some(established)) => established,
                    Ok(None) => return,
                    Err(_) => return self.closed(CloseReason::SlowStart),
                }
            }
            () = self.slot.reclaim.notified() => return self.closed(CloseReason::Reclaimed),
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let (protocol, stream) = established;
        let guarded = |stream| -> Box<dyn Stream> {
            Box::new(h2guard::Guarded::new(stream, self.slot.abuse.clone()))
        };
        let (builder, io): (_, Box<dyn Stream>) = match protocol {
            Protocol::Http1 => (builder.http1_only(), stream),
            Protocol::Http2 => (builder.http2_only(), guarded(stream)),
            // The guard follows the frames only if the bytes are HTTP/2's preface.
            Protocol::Either => (builder, guarded(stream)),
        };

        let (slot, clock) = (self.slot.clone(), self.clock);
        let service = service_fn(move |req| {
            slot.started.store(true, Ordering::Relaxed);
            slot.active.fetch_add(1, Ordering::Acquire);
            let busy = Busy {
                slot: slot.clone(),
                clock,
            };
            let response = handler(req);
            async move {
                let response = response.await;
                Ok::<_, Infallible>(response.map(|inner| Tracked { inner, _busy: busy }))
            }
        });
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);

        let limits = self.limits;
        // When the connection must next be looked at: the first-request deadline until a
        // request starts, then the idle deadline. None: it is due to close now.
        let next_check = |slot: &Slot, now: Instant| -> Option<Instant> {
            if slot.active.load(Ordering::Acquire) > 0 {
                return Some(now + limits.idle_timeout);
            }
            let idle_since =
                self.clock + Duration::from_micros(slot.idle_since_us.load(Ordering::Relaxed));
            let due = if slot.started.load(Ordering::Relaxed) {
                idle_since + limits.idle_timeout
            } else {
                first_deadline.min(idle_since + limits.idle_timeout)
            };
            (due > now).then_some(due)
        };
        let check =
            tokio::time::sleep_until(first_deadline.min(self.accepted + limits.idle_timeout));
        tokio::pin!(check);
        // Once told to close: when to look again, and the time by which it must be gone even
        // with a request still in progress.
        let mut closing: Option<(Instant, Instant)> = None;
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Some(abuse) = self.slot.abuse.get() {
                        tracing::info!(%abuse, "closed an HTTP/2 connection that broke a bound");
                        self.closed(CloseReason::Http2Abuse);
                    } else if let Err(err) = ended {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                    return;
                }
                () = &mut check => {
                    let now = Instant::now();
                    if let Some((by, hard)) = closing {
                        let busy = self.slot.active.load(Ordering::Acquire) > 0;
                        if now >= hard || (now >= by && !busy) {
                            return;
                        }
                        // A request still in progress finishes, up to its own deadline.
                        let next = if now >= by { now + IDLE_CLOSE_GRACE } else { by };
                        check.as_mut().reset(next.min(hard));
                        continue;
                    }
                    if let Some(next) = next_check(&self.slot, now) {
                        check.as_mut().reset(next);
                        continue;
                    }
                    if !self.slot.started.load(Ordering::Relaxed) {
                        // No request yet, and none can be in progress: nothing to lose.
                        return self.closed(CloseReason::SlowStart);
                    }
                    self.closed(CloseReason::Idle);
                    // A GOAWAY first: a peer that answers it goes at once; one that does not
                    // is dropped after a moment.
                    connection.as_mut().graceful_shutdown();
                    closing = Some((now + IDLE_CLOSE_GRACE, now + limits.request_timeout));
                    check.as_mut().reset(now + IDLE_CLOSE_GRACE);
                }
                () = self.slot.reclaim.notified(), if closing.is_none() => {
                    if self.slot.active.load(Ordering::Acquire) > 0 {
                        // A request started since it was picked: it keeps its slot, and the
                        // accept loop picks another next time.
                        self.slot.reclaimed.store(false, Ordering::Relaxed);
                        continue;
                    }
                    self.closed(CloseReason::Reclaimed);
                    connection.as_mut().graceful_shutdown();
                    let now = Instant::now();
                    closing = Some((now + IDLE_CLOSE_GRACE, now + limits.request_timeout));
                    check.as_mut().reset(now + IDLE_CLOSE_GRACE);
                }
                _ = stop.wait_for(|stop| *stop), if closing.is_none() => {
                    // Shutting down: requests in flight finish within the drain deadline,
                    // which the accept loop keeps.
                    connection.as_mut().graceful_shutdown();
                    let now = Instant::now();
                    closing = Some((now + IDLE_CLOSE_GRACE, now + limits.drain_timeout));
                    check.as_mut().reset(now + IDLE_CLOSE_GRACE);
                }
            }
        }
    }
}

/// How a connection's protocol is chosen.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
    /// Cleartext: hyper-util reads the first bytes.
    Either,
}
