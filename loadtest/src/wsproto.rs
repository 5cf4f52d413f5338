//! A minimal RFC 6455 client codec: the upgrade request and answer, masked client frames and
//! unmasked server frames. Enough for the relay (text frames, ping/pong, close); a load
//! generator cannot afford a blocking client per connection, so this works on plain buffers.

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One server frame found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Where the payload starts, relative to the frame start.
    pub payload_at: usize,
    pub payload_len: usize,
}

impl FrameHead {
    pub fn total(&self) -> usize {
        self.payload_at + self.payload_len
    }
}

/// Parses the head of the frame at the start of `buf`: `Ok(None)` when more bytes are needed
/// (the head, or the payload, is incomplete); an error for what a server must never send.
pub fn parse_head(buf: &[u8], max_payload: usize) -> Result<Option<FrameHead>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err("reserved bits set");
    }
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 != 0 {
        return Err("masked server frame");
    }
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            (usize::try_from(n).map_err(|_| "frame too long")?, 10)
        }
        n => (n as usize, 2),
    };
    if len > max_payload {
        return Err("frame over the generator's limit");
    }
    if buf.len() < at + len {
        return Ok(None);
    }
    Ok(Some(FrameHead { fin, opcode, payload_at: at, payload_len: len }))
}

/// A cheap masking-key source (xorshift64*): keys are unpredictable enough for a load
/// generator, and generating them costs nothing next to the relay's work.
pub struct Masker(u64);

impl Masker {
    pub fn new(seed: u64) -> Masker {
        Masker(seed | 1)
    }

    pub fn next(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32).to_ne_bytes()
    }
}

/// Appends one final client frame (masked with `mask`) holding `payload`.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    let body = &mut out[start..];
    let m = u32::from_ne_bytes(mask);
    let mut chunks = body.chunks_exact_mut(4);
    for c in &mut chunks {
        let w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&w.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends a close frame with `code`.
pub fn push_close(out: &mut Vec<u8>, code: u16, mask: [u8; 4]) {
    push_frame(out, OP_CLOSE, &code.to_be_bytes(), mask);
}

/// The upgrade answer's head: status and headers, and how many bytes of the buffer it used.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub len: usize,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses an HTTP/1.1 response head once `\r\n\r\n` is in `buf`.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x answer: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(ResponseHead { status, headers, len: end + 4 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let opcode = frame[0] & 0x0f;
        let (len, at) = match frame[1] & 0x7f {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        let mask = &frame[at..at + 4];
        let p = frame[at + 4..at + 4 + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        (opcode, p)
    }

    #[test]
    fn masked_frames_round_trip_at_every_length_class() {
        let mut m = Masker::new(42);
        for n in [0usize, 1, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            push_frame(&mut out, OP_TEXT, &payload, m.next());
            let (op, p) = unmask(&out);
            assert_eq!(op, OP_TEXT);
            assert_eq!(p, payload, "length {n}");
        }
    }

    #[test]
    fn server_frames_parse_and_wait_for_more() {
        let mut f = vec![0x81, 126, 0x01, 0x00];
        f.extend(std::iter::repeat_n(b'a', 256));
        assert_eq!(parse_head(&f[..3], 1 << 20), Ok(None));
        assert_eq!(parse_head(&f[..100], 1 << 20), Ok(None));
        let h = parse_head(&f, 1 << 20).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_at, h.payload_len, h.total()), (true, 1, 4, 256, 260));
        assert!(parse_head(&[0x81, 0x85, 0, 0, 0, 0, 0], 100).is_err());
    }

    #[test]
    fn response_head() {
        let r = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}";
        let h = parse_response_head(r).unwrap().unwrap();
        assert_eq!(h.status, 429);
        assert_eq!(h.header("Content-Length"), Some("2"));
        assert_eq!(&r[h.len..], b"{}");
        assert!(parse_response_head(b"HTTP/1.1 101 X\r\n").unwrap().is_none());
    }
}
