//! The accept loop shared by the ingress and admin listeners: HTTP/1.1 and HTTP/2 through
//! hyper-util, in cleartext or over TLS, with every connection bounded:
//!
//! - its first request: the TLS handshake and the request head (for HTTP/2, the first
//!   stream's headers) must arrive within `header_read_timeout` of the connection's accept;
//! - idleness: a connection with no request in progress is closed `idle_timeout` after its
//!   last answer, HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 peers are pinged, and a peer
//!   that does not answer is dropped;
//! - answers: an answer the peer does not take within `write_timeout` (an HTTP/2 window
//!   kept at zero, a socket nobody reads) closes the connection;
//! - their number: at `max_connections`, a new connection takes the slot of one that holds
//!   resources without progress (see [`slot`]): idle ones first, then ones stuck receiving
//!   a body or leaving an answer untaken; a connection processing a request never gives
//!   way. Up to 1/16 of the bound may be such connections still closing;
//! - HTTP/2 abuse: streams per connection, resets, control-frame floods and oversized header
//!   blocks (see [`h2guard`]) close the connection;
//! - shutdown: stop accepting, close idle connections, let requests in flight finish within
//!   `drain_timeout`.

mod admission;
mod h2guard;
mod slot;
mod socket;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;
use slot::{Connections, InProgress, Phase, Slot};
use socket::{Peek, Socket};
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
    /// Time an answer may wait for the peer to take it before the connection is closed.
    pub write_timeout: Duration,
    /// Largest request head: HTTP/1's read buffer, HTTP/2's decoded header list.
    pub max_header_bytes: usize,
    /// Bytes HTTP/2 lets a peer send ahead on a stream and on a connection.
    pub http2_window_bytes: u32,
    /// HTTP/2 streams in progress at once across connections, beyond one per connection.
    pub http2_max_pending_streams: usize,
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
            write_timeout: ms(server.write_timeout_ms),
            max_header_bytes: server.max_header_bytes,
            http2_window_bytes: HTTP2_WINDOW_BYTES,
            http2_max_pending_streams: server.http2_max_pending_streams,
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

/// Whether an HTTP/2 connection ended because this side sent a GOAWAY for an error (the
/// peer broke one of the protocol's bounds), rather than the peer leaving.
fn sent_goaway(err: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && !h2.is_remote()
                && h2.reason().is_some_and(|r| r != h2::Reason::NO_ERROR);
        }
        source = e.source();
    }
    false
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
    /// An answer waited for the peer longer than `write_timeout`.
    WriteTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Idle,
        CloseReason::Reclaimed,
        CloseReason::SlowStart,
        CloseReason::Http2Abuse,
        CloseReason::WriteTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Reclaimed => "reclaimed",
            CloseReason::SlowStart => "slow_start",
            CloseReason::Http2Abuse => "http2_abuse",
            CloseReason::WriteTimeout => "write_timeout",
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

/// What an HTTP/2 peer may send ahead of the bridge's reads, on a stream and on the whole
/// connection: RFC 9113's initial 64 KiB, instead of hyper's 1 MiB, so that a connection
/// buffers little before its request's body reader takes the bytes.
const HTTP2_WINDOW_BYTES: u32 = 65_535;

/// A request's body, as its handler reads it: every frame counts as progress on its
/// connection, and the end of the body (or the body given up) moves the request from
/// receiving to processing.
pub struct RequestBody {
    inner: Incoming,
    /// Some while the body has not arrived in full.
    receiving: Option<Arc<Slot>>,
}

impl RequestBody {
    fn done(&mut self) {
        if let Some(slot) = self.receiving.take() {
            slot.body_done();
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.done();
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) if !self.inner.is_end_stream() => {
                if let Some(slot) = &self.receiving {
                    slot.progressed();
                }
            }
            Poll::Ready(_) => self.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a request's handler on its connection while it runs.
struct Handling(Arc<Slot>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that keeps its answer counted on the connection until hyper is done
/// with it: a connection is not closed as idle between the handler's end and the answer's
/// last byte, and an answer the peer never takes shows as such.
pub struct Tracked {
    inner: Full<Bytes>,
    slot: Arc<Slot>,
    _request: InProgress,
}

impl Tracked {
    fn new(inner: Full<Bytes>, slot: Arc<Slot>, request: InProgress) -> Tracked {
        slot.answer_started();
        Tracked {
            inner,
            slot,
            _request: request,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.slot.answer_ended();
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.slot.progressed();
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
    H: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let builder = builder(&limits);
    // The bound, and room beside it for reclaimed connections that are still closing.
    let slack = (limits.max_connections / RECLAIM_SLACK_DIVISOR).max(1);
    let connections = Arc::new(Connections::new(slack, limits.http2_max_pending_streams));
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
        let slot = free_slot(&connections, &permits, limits.max_connections);
        let permit = tokio::select! {
            permit = slot => permit,
            () = &mut shutdown => None,
        };
        let Some(permit) = permit else { break };
        let _ = stream.set_nodelay(true);
        let (socket, peek) = socket::share(stream);
        let (open, slot) = connections.open();
        let connection = Connection {
            slot,
            peek,
            connections: connections.clone(),
            accepted: Instant::now(),
            limits,
            metrics: metrics.clone(),
        };
        let (handler, builder, stop) = (handler.clone(), builder.clone(), stop_rx.clone());
        let tls = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            connection.run(socket, tls, builder, handler, stop).await;
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

/// The connection builder: hyper's own header timer would also end idle keep-alive
/// connections, so the deadlines of this module replace it; the read buffer, which holds
/// the request head, is bounded; HTTP/2's streams, resets, header lists and windows too.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(MIN_HTTP1_BUFFER));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_local_error_reset_streams(H2_MAX_ERROR_RESETS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(limits.http2_window_bytes)
        .initial_connection_window_size(limits.http2_window_bytes)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    builder
}

/// A slot for a newly accepted connection; None if the semaphore closed. At the bound, a
/// connection that holds its slot without progress gives it up and the new one is served
/// meanwhile; when every connection is processing a request, the new one waits until one
/// is not.
async fn free_slot(
    connections: &Connections,
    permits: &Arc<Semaphore>,
    max_connections: usize,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if connections.staying() >= max_connections && !connections.reclaim_one() {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = connections.refused.notified() => {}
            }
            if connections.staying() < max_connections || connections.reclaim_one() {
                break;
            }
        }
    }
    // The slot of a connection asked to go is free once it has closed; one that turns out
    // to be processing a request stays, and the next is asked.
    loop {
        tokio::select! {
            biased;
            permit = permits.clone().acquire_owned() => return permit.ok(),
            () = connections.refused.notified() => {
                // Told of a connection that stayed (possibly before this loop waited):
                // another is asked only if no slot is free and none asked is closing.
                if permits.available_permits() == 0 && connections.closing() == 0 {
                    connections.reclaim_one();
                }
            }
        }
    }
}

/// Connections the kernel may hold accepted but not yet taken by the accept loop (capped by
/// `net.core.somaxconn`): room for senders behind a flood of reconnects, instead of tokio's
/// 1,024.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr`.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit it: answers a peer does not read back up into 64 KiB (the
    // kernel doubles it) instead of the megabytes send-buffer autotuning grows to, so such a
    // peer is seen, and costs little, sooner. Answers are a few hundred bytes.
    socket.set_send_buffer_size(SEND_BUFFER_BYTES)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The send buffer of every accepted connection (see [`bind`]).
const SEND_BUFFER_BYTES: u32 = 16 * 1024;

/// hyper's smallest HTTP/1 read buffer.
const MIN_HTTP1_BUFFER: usize = 8192;

/// One accepted connection and its bounds.
struct Connection {
    slot: Arc<Slot>,
    /// Whether request bytes wait in the socket.
    peek: Peek,
    connections: Arc<Connections>,
    accepted: Instant,
    limits: Limits,
    metrics: Arc<Metrics>,
}

/// What the connection's watcher does next.
enum Next {
    /// Look again at this time.
    At(Instant),
    /// Close gracefully (a GOAWAY, or no more keep-alive) for this reason.
    Close(CloseReason),
    /// Drop the connection now: what it holds was never taken.
    Cut(CloseReason),
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
        stream: Socket,
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

    /// When the connection must next be looked at, or what to do with it now.
    fn next(&self, now: Instant, first_deadline: Instant) -> Next {
        let limits = &self.limits;
        match self.slot.phase() {
            // A request in progress ends within its own deadline; bodies are bounded by the
            // handler's body reader.
            Phase::Processing => Next::At(now + limits.write_timeout),
            Phase::Stuck(_) if self.slot.receiving.load(Ordering::Acquire) > 0 => {
                Next::At(now + limits.write_timeout)
            }
            Phase::Stuck(since) => {
                let due = since + limits.write_timeout;
                if due > now {
                    Next::At(due)
                } else {
                    Next::Cut(CloseReason::WriteTimeout)
                }
            }
            Phase::Idle(since) => {
                let started = self.slot.started.load(Ordering::Relaxed);
                let due = if started {
                    since + limits.idle_timeout
                } else {
                    first_deadline.min(since + limits.idle_timeout)
                };
                if due > now {
                    Next::At(due)
                } else if !started {
                    // No request yet, and none can be in progress: nothing to lose.
                    Next::Cut(CloseReason::SlowStart)
                } else {
                    Next::Close(CloseReason::Idle)
                }
            }
        }
    }

    /// Whether a connection told to close still has something to finish.
    fn finishing(&self, now: Instant) -> bool {
        match self.slot.phase() {
            Phase::Processing => true,
            Phase::Idle(_) => false,
            // A body on its way is bounded by the handler's reader; an answer the peer does
            // not take is not worth waiting for.
            Phase::Stuck(since) => {
                self.slot.receiving.load(Ordering::Acquire) > 0
                    || now.saturating_duration_since(since) < slot::STALL_GRACE
            }
        }
    }

    /// `establish` within the first-request deadline, while answering the accept loop's
    /// requests to give the slot up and its stop; None when the connection ended.
    async fn established(
        &self,
        stream: Socket,
        tls: Option<tokio_rustls::TlsAcceptor>,
        first_deadline: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<(Protocol, Box<dyn Stream>)> {
        let establish = tokio::time::timeout_at(first_deadline, self.establish(stream, tls));
        tokio::pin!(establish);
        loop {
            tokio::select! {
                biased;
                established = establish.as_mut() => match established {
                    Ok(established) => return established,
                    Err(_) => {
                        self.closed(CloseReason::SlowStart);
                        return None;
                    }
                },
                () = self.slot.reclaim.notified() => {
                    if !self.keeps_slot() {
                        self.closed(CloseReason::Reclaimed);
                        return None;
                    }
                    self.connections.stays(&self.slot);
                }
                _ = stop.wait_for(|stop| *stop) => return None,
            }
        }
    }

    /// Counts how a served connection ended.
    fn ended(&self, ended: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
        if let Some(abuse) = self.slot.abuse.get() {
            tracing::info!(%abuse, "closed an HTTP/2 connection that broke a bound");
            self.closed(CloseReason::Http2Abuse);
        } else if let Err(err) = ended {
            // HTTP/2's own bounds (streams refused, resets, flow control) end a connection
            // with a GOAWAY of ours: counted with the bridge's.
            if sent_goaway(err.as_ref()) {
                tracing::info!(error = %err, "closed an HTTP/2 connection that broke a bound");
                self.closed(CloseReason::Http2Abuse);
            } else {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        }
    }

    /// What the watcher does at its check: `next`, or, once told to close (`closing`: when
    /// to look again, and the time by which it must be gone), None when it is time to go.
    fn at_check(
        &self,
        now: Instant,
        closing: Option<(Instant, Instant)>,
        first_deadline: Instant,
    ) -> Option<Next> {
        let Some((by, hard)) = closing else {
            return Some(self.next(now, first_deadline));
        };
        if now >= hard || (now >= by && !self.finishing(now)) {
            return None;
        }
        // A request still in progress finishes, up to its own deadline.
        let next = if now >= by {
            now + IDLE_CLOSE_GRACE
        } else {
            by
        };
        Some(Next::At(next.min(hard)))
    }

    /// What a served connection asked to give its slot up does: None when it keeps the slot
    /// (the accept loop asks another), or how it closes.
    fn reclaimed(&self) -> Option<Next> {
        // A request started since it was picked, or its bytes are here: it keeps its slot.
        if self.keeps_slot() {
            self.connections.stays(&self.slot);
            return None;
        }
        match self.slot.phase() {
            Phase::Processing => {
                self.connections.stays(&self.slot);
                None
            }
            // Nothing it holds was taken: a body not yet received, an answer its peer does
            // not read.
            Phase::Stuck(_) => Some(Next::Cut(CloseReason::Reclaimed)),
            // No request yet (nothing, or a head still arriving): nothing to lose, and the
            // slot is free at once.
            Phase::Idle(_) if !self.slot.started.load(Ordering::Relaxed) => {
                Some(Next::Cut(CloseReason::Reclaimed))
            }
            Phase::Idle(_) => Some(Next::Close(CloseReason::Reclaimed)),
        }
    }

    /// Whether a connection asked to give its slot up keeps it: a request is being processed,
    /// or, on a connection with nothing in progress, the peer's bytes (a request, a TLS
    /// handshake) wait in the socket, however long this process took to read them. Bytes
    /// behind answers the peer does not take (pipelined requests) keep nothing.
    fn keeps_slot(&self) -> bool {
        match self.slot.phase() {
            Phase::Processing => true,
            Phase::Idle(_) => self.peek.bytes_waiting(),
            Phase::Stuck(_) => false,
        }
    }

    async fn run<H, Fut>(
        self,
        stream: Socket,
        tls: Option<tokio_rustls::TlsAcceptor>,
        builder: auto::Builder<TokioExecutor>,
        handler: H,
        mut stop: watch::Receiver<bool>,
    ) where
        H: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let first_deadline = self.accepted + self.limits.header_read_timeout;
        let Some((protocol, stream)) = self
            .established(stream, tls, first_deadline, &mut stop)
            .await
        else {
            return;
        };
        let guarded = |stream, frames| -> Box<dyn Stream> {
            Box::new(h2guard::Guarded::new(stream, self.slot.clone(), frames))
        };
        let (builder, io): (_, Box<dyn Stream>) = match protocol {
            Protocol::Http1 => (builder.http1_only(), guarded(stream, false)),
            Protocol::Http2 => (builder.http2_only(), guarded(stream, true)),
            // The guard follows the frames only if the bytes are HTTP/2's preface.
            Protocol::Either => (builder, guarded(stream, true)),
        };

        let (slot, connections, metrics) = (
            self.slot.clone(),
            self.connections.clone(),
            self.metrics.clone(),
        );
        let service = service_fn(move |req: Request<Incoming>| {
            // A stream beyond the connection's first, at the bound of those: reset with
            // REFUSED_STREAM, which tells the client it was not processed and may be retried.
            let admitted = connections.admit(&slot);
            if admitted.is_none() {
                metrics.http2_streams_refused.inc();
            }
            let receiving = !hyper::body::Body::is_end_stream(req.body());
            slot.request_started(receiving);
            let handling = Handling(slot.clone());
            let req = req.map(|inner| RequestBody {
                inner,
                receiving: receiving.then(|| slot.clone()),
            });
            // Boxed: an HTTP/2 stream's task holds its service future inline for as long as the
            // stream lives, its answer's sending included, so a stream stalled at a zero window
            // costs the size of the handler's future unless the future is behind a pointer
            // (freed once the answer is made).
            let response = admitted.map(|admitted| (Box::pin(handler(req)), admitted));
            let slot = slot.clone();
            async move {
                let Some((response, admitted)) = response else {
                    return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
                };
                let response = response.await;
                let tracked = response.map(|inner| Tracked::new(inner, slot, admitted));
                drop(handling);
                Ok(tracked)
            }
        });
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);

        let limits = self.limits;
        let check =
            tokio::time::sleep_until(first_deadline.min(self.accepted + limits.idle_timeout));
        tokio::pin!(check);
        // Once told to close: when to look again, and the time by which it must be gone even
        // with a request still in progress.
        let mut closing: Option<(Instant, Instant)> = None;
        loop {
            // Each arm either goes on, ends the connection, or gives the time a connection
            // told to close has to finish what it is doing.
            let finish_within = tokio::select! {
                // The connection first: what its peer sent is read before a decision is made.
                biased;
                ended = connection.as_mut() => return self.ended(ended),
                () = &mut check => match self.at_check(Instant::now(), closing, first_deadline) {
                    None => return,
                    Some(Next::At(at)) => {
                        check.as_mut().reset(at);
                        continue;
                    }
                    Some(Next::Cut(reason)) => return self.closed(reason),
                    Some(Next::Close(reason)) => {
                        self.closed(reason);
                        limits.request_timeout
                    }
                },
                () = self.slot.reclaim.notified(), if closing.is_none() => match self.reclaimed() {
                    None | Some(Next::At(_)) => continue,
                    Some(Next::Cut(reason)) => return self.closed(reason),
                    Some(Next::Close(reason)) => {
                        self.closed(reason);
                        limits.request_timeout
                    }
                },
                // Shutting down: requests in flight finish within the drain deadline, which
                // the accept loop keeps.
                _ = stop.wait_for(|stop| *stop), if closing.is_none() => limits.drain_timeout,
            };
            // A GOAWAY first (HTTP/1: no more keep-alive): a peer that answers it goes at
            // once; one that does not is dropped after a moment.
            connection.as_mut().graceful_shutdown();
            let now = Instant::now();
            closing = Some((now + IDLE_CLOSE_GRACE, now + finish_within));
            check.as_mut().reset(now + IDLE_CLOSE_GRACE);
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
