//! The accept loop shared by the ingress and admin listeners: HTTP/1.1 and HTTP/2 through
//! hyper-util, in cleartext or over TLS, a bound on open connections, a deadline for the TLS
//! handshake and the request headers, and a graceful drain with its own deadline.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::tls::Tls;

/// A connection's byte stream: TCP, or TLS over TCP, behind one type.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Serve HTTP/2 (cleartext) besides HTTP/1.1. hyper's header timeout covers HTTP/1 only,
    /// so an idle HTTP/2 connection holds its slot until the peer closes it.
    pub http2: bool,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished its requests and closed.
    Complete,
    /// The drain deadline passed with connections still open.
    TimedOut,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, up to `timeout`, until the first bytes tell HTTP/1 from HTTP/2 (what hyper-util
/// reads before hyper's own timeouts apply). False when they do not arrive in time.
async fn protocol_known(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    let wait = async {
        let mut buf = [0u8; 24];
        loop {
            match stream.peek(&mut buf).await {
                // Closed by the peer: let hyper see the end.
                Ok(0) => return,
                Ok(n) if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return,
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

/// Serves `handler` on `listener` (over TLS when `tls` is given) until `shutdown` completes,
/// then stops accepting and waits up to `limits.drain_timeout` for open connections to finish
/// their requests.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    handler: H,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Drain
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if !limits.http2 {
        builder = builder.http1_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
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
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let response = handler(req);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let mut builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            let stream: Box<dyn Stream> = match tls {
                None => {
                    // hyper's header timeout starts once the protocol is known; a client that
                    // sends nothing, or stalls inside the HTTP/2 preface, is bounded here.
                    if !protocol_known(&stream, limits.header_read_timeout).await {
                        drop(permit);
                        return;
                    }
                    Box::new(stream)
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                            .await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "TLS handshake failed");
                            drop(permit);
                            return;
                        }
                        Err(_) => {
                            drop(permit);
                            return;
                        }
                    };
                    // ALPN tells the protocol: no need to read the first bytes.
                    builder = if limits.http2 && stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        builder.http2_only()
                    } else {
                        builder.http1_only()
                    };
                    Box::new(stream)
                }
            };
            let connection = watcher.watch(
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned(),
            );
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => Drain::Complete,
        () = tokio::time::sleep(limits.drain_timeout) => Drain::TimedOut,
    }
}
