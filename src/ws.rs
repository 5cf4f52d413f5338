//! The one seam where tungstenite meets the socket.
//!
//! Sockets are driven by readiness, not by owned-buffer reads: a connection's task waits for
//! `readable`, then the shard `recv`s into its one shared scratch buffer and hands the bytes
//! to this module. tungstenite runs over [`Feed`], an in-memory stream: `Read` hands out the
//! bytes the shard received and answers `WouldBlock` when they are used up; `Write` collects
//! what tungstenite itself wants to send (pongs, close replies, our pings and closes), which
//! the connection moves onto its outbound queue.
//!
//! Invariants:
//! - An idle connection pins no read buffer of its own beyond tungstenite's small
//!   `read_buffer_size` (configurable, default 512 B).
//! - Data frames the relay sends never pass through tungstenite: they are built once by
//!   [`crate::protocol`] and shared among recipients. Only control frames do.
//! - Nothing here performs a syscall except [`recv`] and [`send_vectored`], which never block.

use bytes::{Buf, Bytes, BytesMut};
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// The in-memory stream tungstenite runs over.
#[derive(Default)]
pub struct Feed {
    input: Bytes,
    out: Vec<u8>,
}

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }
}

impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one step of reading produced.
pub enum Event {
    /// A complete text message (reassembled from fragments, UTF-8 checked).
    Text(Utf8Bytes),
    /// A binary message: the protocol refuses it (1003); the echo endpoint returns it.
    Binary(Bytes),
    /// A ping or pong: proof of life, nothing to route.
    Control,
    /// The peer started the close handshake; our reply is queued in the output.
    PeerClose(Option<u16>),
    /// The close handshake is complete (or the peer is gone): drop the socket.
    Closed,
    /// Nothing more in the bytes fed so far.
    NeedMore,
    /// The peer broke the protocol; close with this code.
    Fatal(u16),
}

pub struct Ws {
    inner: WebSocket<Feed>,
}

impl Ws {
    pub fn new(read_buffer_bytes: usize, max_frame_bytes: usize) -> Ws {
        let config = WebSocketConfig::default()
            .read_buffer_size(read_buffer_bytes)
            .write_buffer_size(0)
            .max_message_size(Some(max_frame_bytes))
            .max_frame_size(Some(max_frame_bytes));
        Ws { inner: WebSocket::from_raw_socket(Feed::default(), Role::Server, Some(config)) }
    }

    /// Makes `data` the next bytes tungstenite reads.
    pub fn feed(&mut self, data: Bytes) {
        let feed = self.inner.get_mut();
        if feed.input.is_empty() {
            feed.input = data;
        } else {
            // Only when a previous batch was not fully consumed (rare): join them.
            let mut joined = BytesMut::with_capacity(feed.input.len() + data.len());
            joined.extend_from_slice(&feed.input);
            joined.extend_from_slice(&data);
            feed.input = joined.freeze();
        }
    }

    /// Reads the next event from the bytes fed so far.
    pub fn next_event(&mut self) -> Event {
        loop {
            return match self.inner.read() {
                Ok(Message::Text(t)) => Event::Text(t),
                Ok(Message::Binary(b)) => Event::Binary(b),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => Event::Control,
                Ok(Message::Close(frame)) => Event::PeerClose(frame.map(|f| u16::from(f.code))),
                Ok(Message::Frame(_)) => continue,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Release the (empty) view of the shard's scratch buffer so the shard
                    // can reuse that memory.
                    self.inner.get_mut().input = Bytes::new();
                    Event::NeedMore
                }
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Event::Closed,
                Err(WsError::Capacity(_)) => Event::Fatal(1009),
                Err(WsError::Utf8(_)) => Event::Fatal(1007),
                Err(WsError::Protocol(_)) => Event::Fatal(1002),
                Err(_) => Event::Fatal(1011),
            };
        }
    }

    /// Queues a WebSocket ping.
    pub fn ping(&mut self) {
        let _ = self.inner.write(Message::Ping(Bytes::new()));
    }

    /// Starts the close handshake with `code`; later events report the peer's answer.
    pub fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from_static(reason) };
        let _ = self.inner.close(Some(frame));
    }

    /// The bytes tungstenite wants sent (control frames), if any.
    pub fn take_output(&mut self) -> Option<Bytes> {
        let _ = self.inner.flush();
        let feed = self.inner.get_mut();
        if feed.out.is_empty() {
            None
        } else {
            Some(Bytes::from(std::mem::take(&mut feed.out)))
        }
    }

    /// True when the input fed so far has been fully consumed.
    pub fn input_drained(&self) -> bool {
        self.inner.get_ref().input.is_empty()
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Non-blocking `recv` into the spare capacity of `buf`. `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv writes at most spare.len() bytes into memory we own; set_len covers
    // exactly what it wrote.
    let n = cvt(unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) })?;
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Most buffers written by one `sendmsg`.
const MAX_IOV: usize = 64;

/// Non-blocking gathered send of `bufs` (the first starting at `offset`). Returns the bytes
/// written; `WouldBlock` when the socket buffer is full.
pub fn send_vectored<'a>(
    fd: RawFd,
    offset: usize,
    bufs: impl Iterator<Item = &'a Bytes>,
) -> io::Result<usize> {
    let mut iov: [libc::iovec; MAX_IOV] =
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
    let mut n = 0;
    for (i, b) in bufs.take(MAX_IOV).enumerate() {
        let s = if i == 0 { &b[offset..] } else { &b[..] };
        iov[i] = libc::iovec { iov_base: s.as_ptr() as *mut _, iov_len: s.len() };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: msghdr is plain data; iov points at live buffers for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    cvt(unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
}

/// Best-effort, non-blocking write of a short response (an HTTP refusal) on a fresh socket.
pub fn send_now(fd: RawFd, bytes: &[u8]) {
    // SAFETY: plain send of a borrowed buffer.
    unsafe {
        libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked_text(payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![0x81, 0x80 | payload.len() as u8];
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    #[test]
    fn text_frames_split_across_feeds_are_reassembled() {
        let mut ws = Ws::new(64, 1024);
        let frame = masked_text(br#"{"type":"ping"}"#);
        let (a, b) = frame.split_at(5);
        ws.feed(Bytes::copy_from_slice(a));
        assert!(matches!(ws.next_event(), Event::NeedMore));
        ws.feed(Bytes::copy_from_slice(b));
        match ws.next_event() {
            Event::Text(t) => assert_eq!(t.as_str(), r#"{"type":"ping"}"#),
            _ => panic!("expected text"),
        }
        assert!(matches!(ws.next_event(), Event::NeedMore));
    }

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        let mut ws = Ws::new(64, 1024);
        ws.feed(Bytes::from_static(b"\x81\x02hi"));
        assert!(matches!(ws.next_event(), Event::Fatal(1002)));
    }

    #[test]
    fn oversized_frame_is_1009() {
        let mut ws = Ws::new(64, 16);
        ws.feed(Bytes::from(masked_text(&[b'a'; 40])));
        assert!(matches!(ws.next_event(), Event::Fatal(1009)));
    }

    #[test]
    fn close_reply_is_queued() {
        let mut ws = Ws::new(64, 1024);
        let mut f = vec![0x88, 0x82, 0, 0, 0, 0];
        f.extend_from_slice(&1000u16.to_be_bytes());
        ws.feed(Bytes::from(f));
        assert!(matches!(ws.next_event(), Event::PeerClose(Some(1000))));
        let out = ws.take_output().expect("close reply");
        assert_eq!(out[0], 0x88);
        assert!(matches!(ws.next_event(), Event::Closed));
    }
}
