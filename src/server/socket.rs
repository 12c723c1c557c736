//! A connection's TCP socket, shared by hyper, which reads and writes it, and by the
//! connection's watcher, which may look whether bytes wait in it without taking any: a
//! connection asked to give its slot up keeps it when a request is already on its way in.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most one read takes (and zeroes first) of the buffer it is given.
const MAX_READ: usize = 64 * 1024;

/// The socket as hyper (or the TLS layer under it) reads and writes it.
pub struct Socket(Arc<TcpStream>);

/// The same socket, as the watcher looks at it.
pub struct Peek(Arc<TcpStream>);

/// A socket for hyper, and the watcher's view of it.
pub fn share(stream: TcpStream) -> (Socket, Peek) {
    let stream = Arc::new(stream);
    (Socket(stream.clone()), Peek(stream))
}

impl Peek {
    /// Whether bytes the peer sent wait unread in the socket (a request, a TLS handshake);
    /// asked of the kernel, not of the runtime's view of readiness, which may lag.
    pub fn bytes_waiting(&self) -> bool {
        let mut byte = [MaybeUninit::<u8>::uninit()];
        matches!(socket2::SockRef::from(&*self.0).peek(&mut byte), Ok(n) if n > 0)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let room = buf.initialize_unfilled_to(buf.remaining().min(MAX_READ));
            match self.0.try_read(room) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; it has been cleared: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match shut {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_waiting_are_seen_without_being_taken() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (mut socket, peek) = share(accepted);
        assert!(!peek.bytes_waiting());
        client.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        // The kernel has them as soon as loopback delivers them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !peek.bytes_waiting() {
            assert!(std::time::Instant::now() < deadline, "never seen");
            tokio::task::yield_now().await;
        }
        let mut got = [0u8; 17];
        socket.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"POST / HTTP/1.1\r\n");
        assert!(!peek.bytes_waiting(), "taken by the read");
        socket.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        socket.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\n");
    }
}
