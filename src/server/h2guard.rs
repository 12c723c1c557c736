//! Bounds on the HTTP/2 frames a peer may send that cost the bridge work without being
//! requests. hyper's HTTP/2 (the `h2` crate) bounds streams, resets of streams it has not
//! yet accepted, CONTINUATION frames per header block and the decoded header list, but it
//! answers every SETTINGS, PING and WINDOW_UPDATE for as long as the peer sends them. This
//! wrapper reads the frame headers as the bytes pass by (the payloads are not looked at) and
//! fails the connection's reads, which closes it, when a peer sends:
//!
//! - control frames (SETTINGS, PING, PRIORITY, WINDOW_UPDATE, unknown types, GOAWAY after
//!   the first, padded DATA frames and DATA frames of fewer than [`MIN_DATA_FRAME`] bytes
//!   that do not end their stream, HEADERS that open no new stream) beyond a budget of
//!   [`CONTROL_BURST`] that refills at [`CONTROL_PER_SEC`] a second and by one for each new
//!   stream;
//! - RST_STREAM frames beyond [`RESET_BURST`], refilling at [`RESETS_PER_SEC`] a second (the
//!   "rapid reset" attack opens and cancels streams as fast as it can);
//! - a header block larger than [`MAX_HEADER_BLOCK`] bytes or split over more than
//!   [`MAX_CONTINUATIONS`] CONTINUATION frames.
//!
//! Bytes that do not start with HTTP/2's preface (HTTP/1 on a cleartext port) pass untouched.
//!
//! A browser or an HTTP client library stays far inside these budgets: a handful of control
//! frames when the connection opens, a WINDOW_UPDATE now and then, a PING answer per
//! keep-alive period.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where a guarded stream reports what it sees: the connection's slot.
pub trait Watch {
    /// The connection is cut for `abuse` (h2 keeps only the text of an I/O error).
    fn cut(&self, abuse: Abuse);
    /// A write could not proceed (`blocked`), or did.
    fn write_blocked(&self, blocked: bool);
}

pub const CONTROL_BURST: u32 = 200;
pub const CONTROL_PER_SEC: u32 = 20;
pub const RESET_BURST: u32 = 100;
pub const RESETS_PER_SEC: u32 = 10;
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
pub const MAX_CONTINUATIONS: u32 = 32;
/// A DATA frame that carries less than this without ending its stream costs a control
/// frame's token: a body dribbled a byte a frame is a flood of frames.
pub const MIN_DATA_FRAME: usize = 128;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const PREFACE_LEN: usize = PREFACE.len();
const FRAME_HEAD_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

/// Why a connection was cut: carried inside the `io::Error` its reads fail with.
#[derive(Debug, Clone, Copy)]
pub struct Abuse(&'static str);

impl fmt::Display for Abuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP/2 peer {}", self.0)
    }
}

impl std::error::Error for Abuse {}

/// A token bucket that looks at the clock only when it runs dry.
struct Budget {
    tokens: u32,
    burst: u32,
    per_sec: u32,
    since: Instant,
}

impl Budget {
    fn new(burst: u32, per_sec: u32) -> Budget {
        Budget {
            tokens: burst,
            burst,
            per_sec,
            since: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.tokens == 0 {
            let now = Instant::now();
            let earned = (now.duration_since(self.since).as_millis() as u64
                * u64::from(self.per_sec)
                / 1000)
                .min(u64::from(self.burst)) as u32;
            if earned == 0 {
                return false;
            }
            self.tokens = earned;
            self.since = now;
        }
        self.tokens -= 1;
        true
    }

    fn give(&mut self) {
        self.tokens = (self.tokens + 1).min(self.burst);
    }
}

/// Follows the frame boundaries of the bytes a peer sends.
struct Frames {
    /// Bytes of the preface still to come; the frames are followed only after it.
    preface_left: usize,
    /// The bytes are not HTTP/2 (an HTTP/1 connection on a cleartext port): let them pass.
    passthrough: bool,
    head: [u8; FRAME_HEAD_LEN],
    head_len: usize,
    /// Payload bytes of the current frame not yet passed.
    skip: usize,
    /// The header block in progress: its bytes so far and its CONTINUATION frames.
    block: Option<(usize, u32)>,
    control: Budget,
    resets: Budget,
    goaway_seen: bool,
    /// The highest stream id the peer has opened: HEADERS on a stream at or below it open
    /// nothing (trailers, or frames h2 ignores on a stream already closed).
    last_stream: u32,
    broken: Option<Abuse>,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            preface_left: PREFACE_LEN,
            passthrough: false,
            head: [0; FRAME_HEAD_LEN],
            head_len: 0,
            skip: 0,
            block: None,
            control: Budget::new(CONTROL_BURST, CONTROL_PER_SEC),
            resets: Budget::new(RESET_BURST, RESETS_PER_SEC),
            goaway_seen: false,
            last_stream: 0,
            broken: None,
        }
    }

    /// Follows `bytes`, the next ones the peer sent.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Abuse> {
        if let Some(abuse) = self.broken {
            return Err(abuse);
        }
        while !bytes.is_empty() && !self.passthrough {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                let at = PREFACE_LEN - self.preface_left;
                if bytes[..n] != PREFACE[at..at + n] {
                    self.passthrough = true;
                    return Ok(());
                }
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEAD_LEN - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == FRAME_HEAD_LEN {
                    self.head_len = 0;
                    if let Err(abuse) = self.frame() {
                        self.broken = Some(abuse);
                        return Err(abuse);
                    }
                }
            }
        }
        Ok(())
    }

    /// Accounts for the frame whose head was just read.
    fn frame(&mut self) -> Result<(), Abuse> {
        let h = self.head;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        self.skip = len;
        let within = match kind {
            // Padded (the padding may be all of it), or too small to be worth a frame: a
            // control frame's cost.
            DATA if flags & PADDED != 0 => self.control.take(),
            DATA => len >= MIN_DATA_FRAME || flags & END_STREAM != 0 || self.control.take(),
            HEADERS => {
                // Only a request earns a token: a new stream of the client's (odd ids).
                let opens = stream % 2 == 1 && stream > self.last_stream;
                let within = if opens {
                    self.last_stream = stream;
                    self.control.give();
                    true
                } else {
                    self.control.take()
                };
                self.start_block(len, flags)?;
                within
            }
            CONTINUATION => {
                self.continue_block(len, flags)?;
                true
            }
            RST_STREAM => self.resets.take(),
            // A client never pushes: h2 refuses it. A goodbye is free once.
            PUSH_PROMISE => true,
            GOAWAY => !std::mem::replace(&mut self.goaway_seen, true) || self.control.take(),
            _ => self.control.take(),
        };
        if within {
            Ok(())
        } else if kind == RST_STREAM {
            Err(Abuse("reset streams faster than the bound allows"))
        } else {
            Err(Abuse("sent control frames faster than the bound allows"))
        }
    }

    fn start_block(&mut self, len: usize, flags: u8) -> Result<(), Abuse> {
        self.block = None;
        if len > MAX_HEADER_BLOCK {
            return Err(Abuse("sent a header block above the bound"));
        }
        if flags & END_HEADERS == 0 {
            self.block = Some((len, 0));
        }
        Ok(())
    }

    fn continue_block(&mut self, len: usize, flags: u8) -> Result<(), Abuse> {
        // Outside a block, h2 refuses the frame itself.
        let Some((bytes, frames)) = self.block else {
            return Ok(());
        };
        let (bytes, frames) = (bytes + len, frames + 1);
        if bytes > MAX_HEADER_BLOCK {
            return Err(Abuse("sent a header block above the bound"));
        }
        if frames > MAX_CONTINUATIONS {
            return Err(Abuse(
                "split a header block over too many CONTINUATION frames",
            ));
        }
        self.block = (flags & END_HEADERS == 0).then_some((bytes, frames));
        Ok(())
    }
}

/// A connection's stream, with its peer's HTTP/2 frames held to the bounds above, and its
/// writes watched: a write that waits for the peer to read is noted on the connection's
/// slot, so that an answer nobody takes shows as such.
pub struct Guarded<S, W> {
    inner: S,
    frames: Frames,
    watch: Arc<W>,
}

impl<S, W: Watch> Guarded<S, W> {
    /// `frames`: follow HTTP/2 frames (when the bytes start with its preface); otherwise the
    /// bytes pass untouched.
    pub fn new(inner: S, watch: Arc<W>, frames: bool) -> Guarded<S, W> {
        let mut followed = Frames::new();
        followed.passthrough = !frames;
        Guarded {
            inner,
            frames: followed,
            watch,
        }
    }

    fn written<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.watch.write_blocked(polled.is_pending());
        polled
    }
}

impl<S: AsyncRead + Unpin, W: Watch> AsyncRead for Guarded<S, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                Poll::Ready(this.frames.feed(&buf.filled()[before..]).map_err(|abuse| {
                    this.watch.cut(abuse);
                    io::Error::new(io::ErrorKind::InvalidData, abuse)
                }))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin, W: Watch> AsyncWrite for Guarded<S, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.written(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        frame_on(kind, flags, 1, len)
    }

    fn frame_on(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.resize(FRAME_HEAD_LEN + len, 0);
        f
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    #[test]
    fn a_ping_flood_is_cut_off_and_ordinary_traffic_is_not() {
        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        frames.feed(&frame(0x4, 0, 0)).unwrap();
        // Requests with bodies, a byte at a time: boundaries are found across reads.
        for i in 0..1000 {
            let stream = 2 * i + 1;
            let mut request = frame_on(HEADERS, END_HEADERS, stream, 40);
            request.extend(frame_on(DATA, END_STREAM, stream, 3000));
            for byte in request.chunks(1) {
                frames.feed(byte).unwrap();
            }
        }
        let pings: Vec<u8> = (0..2 * CONTROL_BURST)
            .flat_map(|_| frame(0x6, 0, 8))
            .collect();
        assert!(frames.feed(&pings).is_err());
        assert!(
            frames.feed(&frame(DATA, END_STREAM, 1)).is_err(),
            "stays cut"
        );
    }

    #[test]
    fn only_headers_that_open_a_stream_refill_the_budget() {
        // HEADERS + PING, over and over on one stream (trailers h2 ignores): cut off.
        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        frames.feed(&frame_on(HEADERS, END_HEADERS, 1, 40)).unwrap();
        let refill: Vec<u8> = (0..2 * CONTROL_BURST)
            .flat_map(|_| {
                [
                    frame_on(HEADERS, END_HEADERS | END_STREAM, 1, 10),
                    frame(0x6, 0, 8),
                ]
                .concat()
            })
            .collect();
        assert!(frames.feed(&refill).is_err());

        // A body dribbled a byte a frame is cut off; one in frames of its size is not.
        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        frames.feed(&frame_on(HEADERS, END_HEADERS, 1, 40)).unwrap();
        for _ in 0..1000 {
            frames.feed(&frame_on(DATA, 0, 1, MIN_DATA_FRAME)).unwrap();
        }
        let dribble: Vec<u8> = (0..2 * CONTROL_BURST)
            .flat_map(|_| frame_on(DATA, 0, 1, 1))
            .collect();
        assert!(frames.feed(&dribble).is_err());
    }

    #[test]
    fn http1_bytes_pass_untouched() {
        let mut frames = Frames::new();
        let request = b"POST /webhooks/tamio HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
        for chunk in request.chunks(7) {
            frames.feed(chunk).unwrap();
        }
        // What would be a flood of frame heads in HTTP/2 is only bytes here.
        frames.feed(&[0u8; 100_000]).unwrap();
    }

    #[test]
    fn repeated_goaways_and_padded_data_cost_like_control_frames() {
        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        frames.feed(&frame(GOAWAY, 0, 8)).unwrap();
        let goaways: Vec<u8> = (0..2 * CONTROL_BURST)
            .flat_map(|_| frame(GOAWAY, 0, 8))
            .collect();
        assert!(frames.feed(&goaways).is_err());

        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        let padded: Vec<u8> = (0..2 * CONTROL_BURST)
            .flat_map(|_| frame(DATA, PADDED, 9))
            .collect();
        assert!(frames.feed(&padded).is_err());
    }

    #[test]
    fn resets_and_header_blocks_have_bounds() {
        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        let flood: Vec<u8> = (0..RESET_BURST + 1)
            .flat_map(|_| [frame(HEADERS, END_HEADERS, 10), frame(RST_STREAM, 0, 4)].concat())
            .collect();
        assert!(frames.feed(&flood).is_err());

        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        frames.feed(&frame(HEADERS, 0, 16_000)).unwrap();
        for _ in 0..3 {
            frames.feed(&frame(CONTINUATION, 0, 16_000)).unwrap();
        }
        assert!(frames.feed(&frame(CONTINUATION, 0, 16_000)).is_err());

        let mut frames = Frames::new();
        frames.feed(&preface()).unwrap();
        frames.feed(&frame(HEADERS, 0, 0)).unwrap();
        for _ in 0..MAX_CONTINUATIONS {
            frames.feed(&frame(CONTINUATION, 0, 0)).unwrap();
        }
        assert!(frames.feed(&frame(CONTINUATION, 0, 0)).is_err());
    }
}
