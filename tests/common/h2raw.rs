//! A raw HTTP/2 peer for abuse tests: writes frames as given (no flow control, no limits)
//! and notices when the bridge closes the connection.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
/// SETTINGS_INITIAL_WINDOW_SIZE.
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// One frame: its 9-byte head and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `prefix`-bit prefix, the first byte's other bits set to `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing (no Huffman coding).
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The header block of a POST to `path`, plus `extra` fields.
pub fn request_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "bridge"),
        ("content-type", "application/json"),
    ];
    fields.extend_from_slice(extra);
    header_block(&fields)
}

/// The header block of a GET of `path`.
pub fn get_block(path: &str) -> Vec<u8> {
    header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "bridge"),
    ])
}

/// A SETTINGS payload.
pub fn settings_payload(settings: &[(u16, u32)]) -> Vec<u8> {
    settings
        .iter()
        .flat_map(|(id, value)| [id.to_be_bytes().to_vec(), value.to_be_bytes().to_vec()].concat())
        .collect()
}

/// What the reader saw of the bridge's side.
#[derive(Debug, Default)]
pub struct Seen {
    pub closed: AtomicBool,
    pub goaway: AtomicBool,
    pub frames: AtomicU32,
}

/// A raw HTTP/2 connection: the write half, and a task reading the bridge's frames until it
/// closes.
type Writer = Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Unpin + Send + Sync>>>;

pub struct RawH2 {
    writer: Writer,
    pub seen: Arc<Seen>,
    reader: tokio::task::JoinHandle<()>,
    opened: Instant,
}

impl RawH2 {
    /// Connects over TCP and sends the preface and an empty SETTINGS frame.
    pub async fn connect(addr: std::net::SocketAddr) -> RawH2 {
        Self::try_connect(addr, &[]).await.unwrap()
    }

    /// Connects over TCP and sends the preface and a SETTINGS frame of `settings`.
    pub async fn try_connect(
        addr: std::net::SocketAddr,
        settings: &[(u16, u32)],
    ) -> std::io::Result<RawH2> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self::with_settings(stream, settings).await)
    }

    /// Like [`RawH2::connect`], over a stream already set up (TLS with ALPN h2).
    pub async fn over<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>(
        stream: S,
    ) -> RawH2 {
        Self::with_settings(stream, &[]).await
    }

    async fn with_settings<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>(
        stream: S,
        settings: &[(u16, u32)],
    ) -> RawH2 {
        let (mut read, writer) = tokio::io::split(stream);
        let writer: Writer = Arc::new(tokio::sync::Mutex::new(Box::new(writer)));
        let seen = Arc::new(Seen::default());
        let reader = {
            let (seen, writer) = (seen.clone(), writer.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 9];
                loop {
                    if read.read_exact(&mut head).await.is_err() {
                        break;
                    }
                    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
                    let mut payload = vec![0u8; len];
                    if read.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    seen.frames.fetch_add(1, Ordering::Relaxed);
                    if head[3] == GOAWAY {
                        seen.goaway.store(true, Ordering::Relaxed);
                    }
                    // Answered as any client does (a graceful close waits for it).
                    if head[3] == PING && head[4] & ACK == 0 {
                        let mut w = writer.lock().await;
                        let _ = w.write_all(&frame(PING, ACK, 0, &payload)).await;
                        let _ = w.flush().await;
                    }
                }
                seen.closed.store(true, Ordering::Relaxed);
            })
        };
        let mut raw = RawH2 {
            writer,
            seen,
            reader,
            opened: Instant::now(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &settings_payload(settings)));
        let _ = raw.send(&hello).await;
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await?;
        w.flush().await
    }

    pub fn is_closed(&self) -> bool {
        self.seen.closed.load(Ordering::Relaxed)
    }

    /// Waits up to `within` for the bridge to close the connection; how long after it was
    /// opened that happened, or None.
    pub async fn closed_within(&self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.is_closed() {
                return Some(self.opened.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Sends `make(i)` for i = 0, 1, ... until a write fails, the bridge closes the
    /// connection, or `within` passes; returns how many were sent.
    pub async fn flood(&mut self, within: Duration, make: impl Fn(u32) -> Vec<u8>) -> u32 {
        let started = Instant::now();
        let mut i = 0;
        while started.elapsed() < within && !self.is_closed() {
            // A batch per write: the flood is limited by the bridge, not by syscalls.
            let batch: Vec<u8> = (i..i + 64).flat_map(&make).collect();
            let left = within.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.send(&batch)).await {
                Ok(Ok(())) => {}
                // A failed write, or one the bridge stopped reading.
                _ => break,
            }
            i += 64;
            tokio::task::yield_now().await;
        }
        i
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
