//! Hostile clients cannot take the relay down or hurt its other users: slow request heads,
//! garbage before and after the upgrade, oversized and malformed heads, invalid UTF-8,
//! fragments interleaved with pings, frames after a close, unmasked frames, resets in the
//! middle of a frame, floods of tiny frames and upgrade floods each get the spec's answer
//! (status or close code), a legitimate session keeps relaying meanwhile, and afterwards the
//! daemon is up, its memory is back near where it started, and `/metrics` counted exactly
//! what happened.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::client::{raw_http, AgentConn, ClientConn, Event, TokenPlace, Ws};

// ---- /metrics ----

type Metrics = HashMap<String, f64>;

fn scrape(d: &Daemon) -> Metrics {
    let mut s = TcpStream::connect(d.admin_addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let mut m = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        if let Some((k, v)) = line.rsplit_once(' ') {
            m.insert(k.to_string(), v.parse().unwrap_or(f64::NAN));
        }
    }
    m
}

/// Sum of every series of `name` whose labels contain all of `labels`.
fn sum(m: &Metrics, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| *v)
        .sum()
}

fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[&str]) -> f64 {
    sum(after, name, labels) - sum(before, name, labels)
}

/// Scrapes until `ready` holds (per-shard counters are published every 250 ms), bounded.
fn scrape_until(d: &Daemon, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let m = scrape(d);
        if ready(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "/metrics never showed {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Which series of `name` exist (their label sets), for failure messages.
fn series(m: &Metrics, name: &str) -> Vec<String> {
    let mut v: Vec<String> = m
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    v.sort();
    v
}

// ---- memory ----

/// Slack over the starting RSS that still counts as "back near where it started": the
/// allocator keeps some freed memory, and a debug build's heap is larger.
const RSS_SLACK_KIB: u64 = 12 * 1024;

/// The RSS comes back within the slack of `before` (bounded wait for the allocator and the
/// close deadlines).
fn assert_rss_settles(d: &Daemon, before: u64, what: &str) {
    let mut last = 0;
    let ok = eventually(Duration::from_secs(10), || {
        last = d.rss_kib();
        (last <= before + RSS_SLACK_KIB).then_some(())
    });
    assert!(
        ok.is_some(),
        "{what}: daemon RSS {before} KiB before, still {last} KiB 10 s after (slack {RSS_SLACK_KIB} KiB)"
    );
    eprintln!("{what}: daemon RSS {before} KiB before, {last} KiB after");
}

// ---- a legitimate session ----

/// An agent and a client of a user of their own, relaying both ways.
struct Session {
    ag: AgentConn,
    c: ClientConn,
    n: u64,
}

impl Session {
    fn open(d: &Daemon, user: &str) -> Session {
        let cred = d.hmac_agent(user, "steady");
        let mut ag = d.agent(&cred);
        let c = d.client(&d.token(user, &[], "1h"), Some(cred.agent_id()));
        expect_type(&mut ag, "session");
        Session { ag, c, n: 0 }
    }

    /// One message each way; returns the longest round trip.
    fn relay(&mut self) -> Duration {
        self.n += 1;
        let n = self.n;
        let t = Instant::now();
        self.c.send(None, &json!({"up": n}), None).unwrap();
        let f = next_skipping(&mut self.ag, &["session"], WAIT);
        assert_eq!((f.ty(), &f.value["data"]), ("message", &json!({"up": n})), "{}", f.text);
        let up = t.elapsed();
        let t = Instant::now();
        self.ag.send(None, &json!({"down": n}), None).unwrap();
        let f = next_frame(&mut self.c, WAIT);
        assert_eq!((f.ty(), &f.value["data"]), ("message", &json!({"down": n})), "{}", f.text);
        up.max(t.elapsed())
    }
}

/// Runs `relay` on a session every 20 ms on another thread until the returned guard is
/// finished; the guard reports how many round trips were made and the slowest one.
struct Relaying {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Session, u64, Duration)>,
}

impl Relaying {
    fn start(mut s: Session) -> Relaying {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rounds = 0;
            let mut worst = Duration::ZERO;
            while !stop2.load(Ordering::Relaxed) {
                worst = worst.max(s.relay());
                rounds += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (s, rounds, worst)
        });
        Relaying { stop, handle }
    }

    fn finish(self, what: &str) -> Session {
        self.stop.store(true, Ordering::Relaxed);
        let (s, rounds, worst) =
            self.handle.join().unwrap_or_else(|_| panic!("{what}: the steady session broke"));
        eprintln!("{what}: steady session relayed {rounds} round trips, slowest {worst:?}");
        assert!(rounds > 0, "{what}: the steady session relayed nothing");
        assert!(worst < Duration::from_secs(1), "{what}: a relay took {worst:?}");
        s
    }
}

// ---- raw WebSocket frames ----

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One WebSocket frame as a client would send it (masked unless `mask` is `None`).
fn ws_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n < 65536 => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    ws_frame(fin, opcode, payload, Some(MASK))
}

const TEXT: u8 = 0x1;
const CONT: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

#[derive(Debug)]
enum Raw {
    Frame(u8, Vec<u8>),
    Eof,
    Timeout,
}

/// Reads the relay's frames straight off the socket: pongs included, nothing answered.
/// Only for connections where nothing but the welcome was sent before it takes over.
struct RawConn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    fn of(ws: &Ws) -> RawConn {
        RawConn { s: ws.tcp().try_clone().unwrap(), buf: Vec::new() }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn next(&mut self, timeout: Duration) -> Raw {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((op, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Raw::Frame(op, payload);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Raw::Timeout;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => return Raw::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return Raw::Eof,
            }
        }
    }

    /// The next frame must be a close; returns its code.
    #[track_caller]
    fn expect_close(&mut self) -> u16 {
        match self.next(WAIT) {
            Raw::Frame(CLOSE, p) if p.len() >= 2 => u16::from_be_bytes([p[0], p[1]]),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// The relay drops the socket (after its close frame) within the close deadline.
    #[track_caller]
    fn expect_eof(&mut self) {
        match self.next(Duration::from_secs(5)) {
            Raw::Eof => {}
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }
}

/// One unmasked server frame: (opcode, payload, bytes used).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, pos) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(pos..pos + len)?.to_vec();
    Some((buf[0] & 0x0f, payload, pos + len))
}

/// Reads until every pong in `pongs` (in that order) and the ack `id` have arrived, and
/// nothing else.
#[track_caller]
fn expect_pongs_and_ack(raw: &mut RawConn, pongs: &[Vec<u8>], id: &str) {
    let mut got_pongs: Vec<Vec<u8>> = Vec::new();
    let mut acks = 0;
    while got_pongs.len() < pongs.len() || acks == 0 {
        match raw.next(WAIT) {
            Raw::Frame(PONG, p) => got_pongs.push(p),
            Raw::Frame(TEXT, p) => {
                let v: Value = serde_json::from_slice(&p).unwrap();
                assert_eq!(v, json!({"type": "ack", "id": id}));
                acks += 1;
            }
            other => panic!("expected pongs and the ack {id}, got {other:?} after {} pongs", got_pongs.len()),
        }
    }
    assert_eq!(got_pongs, pongs, "pongs answer every ping, in order, with its payload");
    assert_eq!(acks, 1);
}

/// A TCP connection from `src` (another loopback address) to `to`.
fn connect_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into()).unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
    sock.into()
}

/// Reads an HTTP response head; returns its status.
fn read_status(s: &mut TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1)?.parse().ok()
}

// ---- the tests ----

#[test]
fn a_thousand_slow_heads_do_not_delay_a_legitimate_handshake() {
    const SLOW: usize = 1000;
    const TIMEOUT_MS: u64 = 2000;
    let d = Daemon::with_config(&format!("[server]\nhandshake_timeout_ms = {TIMEOUT_MS}\n"));
    let mut steady = Session::open(&d, "steady");
    steady.relay();
    let token = d.token("legit", &[], "1h");
    let rss_before = d.rss_kib();
    let before = scrape(&d);

    // A thousand request heads that never finish, from four loopback addresses, each
    // dribbling a byte now and then (an idle timer would never fire).
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|i| {
            let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 1 + (i % 4) as u8), d.addr);
            s.write_all(b"GET /v1/client HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    let opened = started.elapsed();
    let relaying = Relaying::start(steady);
    let mut worst = Duration::ZERO;
    let mut legit = 0;
    while started.elapsed() < Duration::from_millis(TIMEOUT_MS - 400) {
        for s in slow.iter_mut() {
            let _ = s.write_all(b"a");
        }
        let t = Instant::now();
        let c = ClientConn::connect(d.addr, &token, TokenPlace::Header, None)
            .unwrap_or_else(|e| panic!("a legitimate client was refused among slow heads: {e}"));
        worst = worst.max(t.elapsed());
        legit += 1;
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
    }
    let steady = relaying.finish("slow heads");
    eprintln!("slow heads: {SLOW} opened in {opened:?}; {legit} legitimate handshakes, slowest {worst:?}");
    assert!(
        worst < Duration::from_millis(TIMEOUT_MS),
        "a legitimate handshake took {worst:?} among {SLOW} slow heads (handshake timeout {TIMEOUT_MS} ms)"
    );

    // Every slow head is dropped without an answer once its time is up.
    let deadline = started + Duration::from_millis(TIMEOUT_MS) + Duration::from_secs(5);
    for (i, s) in slow.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("slow head {i} got an answer: {:?}", String::from_utf8_lossy(&b[..n])),
            Err(e) => panic!("slow head {i} still open {:?} after its start: {e}", started.elapsed()),
        }
    }
    drop(slow);
    let after = scrape_until(&d, "the handshake timeouts", |m| {
        delta(&before, m, "switchboard_handshake_timeouts_total", &[]) >= SLOW as f64
    });
    assert_eq!(delta(&before, &after, "switchboard_handshake_timeouts_total", &[]), SLOW as f64);
    assert_eq!(delta(&before, &after, "switchboard_connections_accepted_total", &[]), (SLOW + legit) as f64);
    assert_eq!(
        delta(&before, &after, "switchboard_connections_opened_total", &["role=\"client\""]),
        legit as f64
    );
    assert_eq!(delta(&before, &after, "switchboard_handshakes_refused_total", &[]), 0.0);
    let fds_before = sum(&before, "process_open_fds", &[]);
    let fds_after = sum(
        &scrape_until(&d, "open fds back down", |m| sum(m, "process_open_fds", &[]) <= fds_before + 8.0),
        "process_open_fds",
        &[],
    );
    eprintln!("slow heads: daemon fds {fds_before} before, {fds_after} after");
    let mut d = d;
    d.assert_alive();
    let mut steady = steady;
    steady.relay();
    assert_rss_settles(&d, rss_before, "slow heads");
}

#[test]
fn garbage_before_the_upgrade_is_400() {
    let mut d = Daemon::start_default();
    let mut steady = Session::open(&d, "steady");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let mut garbage: Vec<Vec<u8>> = vec![
        // A TLS ClientHello on the plain listener.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xd3\x1e\x00\x00\r\n\r\n".to_vec(),
        b"\x00\x00\x00\x00\r\n\r\n".to_vec(),
        b"HELLO\r\n\r\n".to_vec(),
        b"GET /v1/client HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v1/client FTP/1.1\r\n\r\n".to_vec(),
        b"G\x00T /v1/client HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /v1/cli\x01nt HTTP/1.1\r\n\r\n".to_vec(),
        b"\xff\xfe\xfd\xfc\r\n\r\n".to_vec(),
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(),
    ];
    // Random bytes behind a byte that can start no request line.
    let mut rng = Rng::new(0x9a4b_a9e0);
    for _ in 0..40 {
        let mut g = vec![[0x01u8, 0x7f, 0x80, 0xff, b'{', b'\t'][rng.below(6)]];
        g.extend((0..1 + rng.below(300)).map(|_| rng.next_u64() as u8));
        g.extend_from_slice(b"\r\n\r\n");
        garbage.push(g);
    }
    for g in &garbage {
        let r = raw_http(d.addr, g)
            .unwrap_or_else(|e| panic!("no answer to {:?}: {e}", String::from_utf8_lossy(g)));
        assert_eq!(
            (r.status, r.json()),
            (400, json!({"error": "bad_request"})),
            "{:?}",
            String::from_utf8_lossy(g)
        );
    }
    steady.relay();
    d.assert_alive();
    let after = scrape(&d);
    assert_eq!(
        delta(&before, &after, "switchboard_handshakes_refused_total", &["status=\"400\""]),
        garbage.len() as f64,
        "{:?}",
        series(&after, "switchboard_handshakes_refused_total")
    );
    assert_eq!(delta(&before, &after, "switchboard_handshakes_refused_total", &[]), garbage.len() as f64);
    assert_eq!(delta(&before, &after, "switchboard_connections_opened_total", &[]), 0.0);
    assert_rss_settles(&d, rss_before, "garbage before the upgrade");
}

#[test]
fn garbage_after_the_upgrade_closes_with_1002() {
    let mut d = Daemon::start_default();
    let mut steady = Session::open(&d, "steady");
    let cred = d.hmac_agent("victim", "a");
    let token = d.token("victim", &[], "1h");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("reserved bits", {
            let mut f = masked(true, TEXT, br#"{"type":"ping"}"#);
            f[0] |= 0x70;
            f
        }),
        ("reserved data opcode", masked(true, 0x3, b"xyz")),
        ("reserved control opcode", masked(true, 0xB, b"")),
        ("control frame over 125 bytes", {
            let mut f = vec![0x89, 0x80 | 126, 0, 200];
            f.extend_from_slice(&MASK);
            f.extend(std::iter::repeat_n(0u8, 200));
            f
        }),
        ("fragmented control frame", masked(false, PING, b"p")),
        ("continuation without a start", masked(true, CONT, b"abc")),
        ("a new message inside a fragmented one", {
            let mut f = masked(false, TEXT, b"{\"type\":");
            f.extend(masked(true, TEXT, br#"{"type":"ping"}"#));
            f
        }),
        ("random bytes", {
            let mut rng = Rng::new(7);
            let mut f = vec![0xF3, 0x85];
            f.extend((0..64).map(|_| rng.next_u64() as u8));
            f
        }),
    ];
    for (i, (what, bytes)) in garbage.iter().enumerate() {
        // Clients and agents alike.
        let ws: Ws = if i % 2 == 0 {
            ClientConn::connect(d.addr, &token, TokenPlace::Header, None).unwrap().ws
        } else {
            AgentConn::connect(d.addr, &cred).unwrap().ws
        };
        let mut raw = RawConn::of(&ws);
        raw.write(bytes);
        loop {
            // An agent may see the previous client's session frames first.
            match raw.next(WAIT) {
                Raw::Frame(TEXT, _) => continue,
                Raw::Frame(CLOSE, p) if p.len() >= 2 => {
                    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1002, "{what}");
                    break;
                }
                other => panic!("{what}: expected close 1002, got {other:?}"),
            }
        }
        raw.expect_eof();
        steady.relay();
    }
    d.assert_alive();
    let n = garbage.len() as f64;
    let after = scrape_until(&d, "the 1002 closes", |m| {
        delta(&before, m, "switchboard_connections_closed_total", &["code=\"1002\""]) >= n
    });
    assert_eq!(delta(&before, &after, "switchboard_connections_closed_total", &["code=\"1002\""]), n);
    assert_eq!(delta(&before, &after, "switchboard_connections_closed_total", &[]), n);
    assert_rss_settles(&d, rss_before, "garbage after the upgrade");
}

#[test]
fn oversized_heads_are_431_and_malformed_ones_400() {
    let mut d = Daemon::start_default();
    let mut steady = Session::open(&d, "steady");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let big_value = upgrade_head("/v1/client", &[&format!("X-Big: {}", "b".repeat(10 * 1024))]);
    let many: Vec<String> = (0..300).map(|i| format!("X-H{i}: {}", "v".repeat(30))).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let many_headers = upgrade_head("/v1/client", &many_refs);
    let count: Vec<String> = (0..100).map(|i| format!("X-{i}: v")).collect();
    let count_refs: Vec<&str> = count.iter().map(String::as_str).collect();
    let too_many_headers = upgrade_head("/v1/client", &count_refs);
    assert!(too_many_headers.len() < 4096, "too many headers, yet a small head");
    let long_target = format!("GET /v1/client?{} HTTP/1.1\r\nHost: x\r\n\r\n", "q".repeat(9000));
    let oversized = [big_value, many_headers, too_many_headers, long_target];
    for h in &oversized {
        let r = raw_http(d.addr, h.as_bytes())
            .unwrap_or_else(|e| panic!("no answer to a {} byte head: {e}", h.len()));
        assert_eq!((r.status, r.json()), (431, json!({"error": "headers_too_large"})), "{} bytes", h.len());
    }
    // A head that keeps growing is refused as soon as it passes the limit, not at the timeout.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"GET /v1/client HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    for _ in 0..40 {
        if s.write_all(format!("X-Grow: {}\r\n", "g".repeat(500)).as_bytes()).is_err() {
            break;
        }
    }
    assert_eq!(read_status(&mut s), Some(431), "a growing head");
    assert!(t.elapsed() < Duration::from_secs(5), "431 took {:?}", t.elapsed());

    let malformed = [
        upgrade_head("/v1/client", &["Host x"]),
        upgrade_head("/v1/client", &["X-Space : v"]),
        upgrade_head("/v1/client", &["X-Fold: a", " folded continuation"]),
        upgrade_head("/v1/client", &["X\u{1}Ctl: v"]),
        upgrade_head("/v1/client", &["(bad): v"]),
        upgrade_head("/v1/client", &[": no name"]),
        "GET /v1/client HTTP/1.1\r\nHost: x\rX-Bare-CR: v\r\n\r\n".to_string(),
        "GET  /v1/client HTTP/1.1\r\n\r\n".to_string(),
        "GET /v1/client HTTP/1.1 extra\r\n\r\n".to_string(),
    ];
    for h in &malformed {
        let r = raw_http(d.addr, h.as_bytes()).unwrap_or_else(|e| panic!("no answer to {h:?}: {e}"));
        assert_eq!((r.status, r.json()), (400, json!({"error": "bad_request"})), "{h:?}");
    }
    steady.relay();
    d.assert_alive();
    let after = scrape(&d);
    let refused = "switchboard_handshakes_refused_total";
    assert_eq!(delta(&before, &after, refused, &["status=\"431\""]), (oversized.len() + 1) as f64);
    assert_eq!(delta(&before, &after, refused, &["status=\"400\""]), malformed.len() as f64);
    assert_rss_settles(&d, rss_before, "oversized and malformed heads");
    // docs/metrics.md names the reason of a 431: `headers_too_large`.
    assert_eq!(
        delta(&before, &after, refused, &["status=\"431\"", "reason=\"headers_too_large\""]),
        (oversized.len() + 1) as f64,
        "431 refusals should be counted with reason=\"headers_too_large\" (docs/metrics.md); series: {:?}",
        series(&after, refused)
    );
}

#[test]
fn invalid_utf8_in_text_frames_closes_with_1007() {
    let mut d = Daemon::start_default();
    let mut steady = Session::open(&d, "steady");
    let cred = d.hmac_agent("victim", "a");
    let token = d.token("victim", &[], "1h");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a lone continuation byte", masked(true, TEXT, b"{\"type\":\"ping\",\"x\":\"\x80\"}")),
        ("a truncated sequence", masked(true, TEXT, b"{\"data\":\"\xc3(\"}")),
        ("an overlong encoding", masked(true, TEXT, b"\xc0\xaf")),
        ("a surrogate", masked(true, TEXT, b"\"\xed\xa0\x80\"")),
        ("above U+10FFFF", masked(true, TEXT, b"\xf4\x90\x80\x80")),
        ("split across fragments and still invalid", {
            let mut f = masked(false, TEXT, b"{\"a\":\"\xe2\x82");
            f.extend(masked(true, CONT, b"(\"}"));
            f
        }),
        ("a message that ends inside a sequence", {
            let mut f = masked(false, TEXT, b"\"abc");
            f.extend(masked(true, CONT, b"\xe2\x82"));
            f
        }),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let ws: Ws = if i % 2 == 0 {
            ClientConn::connect(d.addr, &token, TokenPlace::Header, None).unwrap().ws
        } else {
            AgentConn::connect(d.addr, &cred).unwrap().ws
        };
        let mut raw = RawConn::of(&ws);
        raw.write(bytes);
        loop {
            match raw.next(WAIT) {
                Raw::Frame(TEXT, _) => continue,
                Raw::Frame(CLOSE, p) if p.len() >= 2 => {
                    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1007, "{what}");
                    break;
                }
                other => panic!("{what}: expected close 1007, got {other:?}"),
            }
        }
        raw.expect_eof();
    }
    steady.relay();
    d.assert_alive();
    let n = cases.len() as f64;
    let after = scrape_until(&d, "the 1007 closes", |m| {
        delta(&before, m, "switchboard_connections_closed_total", &["code=\"1007\""]) >= n
    });
    assert_eq!(delta(&before, &after, "switchboard_connections_closed_total", &["code=\"1007\""]), n);
    assert_rss_settles(&d, rss_before, "invalid UTF-8");
}

#[test]
fn fragmented_messages_interleaved_with_pings_are_reassembled_and_pongs_answered() {
    let mut d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&cred);
    let c = d.client(&d.token("u1", &[], "1h"), Some(cred.agent_id()));
    expect_type(&mut ag, "session");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let mut raw = RawConn::of(&c.ws);
    // Multi-byte characters, split mid-character across fragments (UTF-8 is checked on the
    // whole message), and exact bytes the relay must forward untouched.
    let data = r#"{ "text" : "héllo wörld ✓ 𝄞 — ünïcødé" , "n" : [1, 2.50, -0e0] }"#;
    let message = format!(r#"{{"type":"send","data":{data},"id":"frag"}}"#);
    let bytes = message.as_bytes();
    let cuts = [0, 20, 23, 24, 50, bytes.len() - 1, bytes.len()];
    let mut wire = Vec::new();
    let mut pings = Vec::new();
    for (k, w) in cuts.windows(2).enumerate() {
        let op = if k == 0 { TEXT } else { CONT };
        wire.extend(masked(w[1] == bytes.len(), op, &bytes[w[0]..w[1]]));
        if w[1] != bytes.len() {
            let p = format!("p{k}");
            wire.extend(masked(true, PING, p.as_bytes()));
            // An unsolicited pong is allowed between fragments too, and needs no answer.
            wire.extend(masked(true, PONG, b"unsolicited"));
            pings.push(p);
        }
    }
    // Written in small pieces so frames straddle reads.
    for piece in wire.chunks(7) {
        raw.write(piece);
    }
    // Every ping is answered with its payload, in order. RFC 6455 only asks for a pong "as
    // soon as is practical", so the ack may come before the pongs of pings that were read in
    // the same batch as the last fragment.
    expect_pongs_and_ack(&mut raw, &pings.iter().map(|p| p.as_bytes().to_vec()).collect::<Vec<_>>(), "frag");
    let f = expect_type(&mut ag, "message");
    assert_eq!(f.raw_data().as_deref(), Some(data), "reassembled bytes forwarded exactly: {}", f.text);

    // One byte per fragment, a ping between every two: still one message.
    let message = r#"{"type":"send","data":"tiny ✓","id":"bytes"}"#.as_bytes();
    let mut wire = Vec::new();
    for (k, b) in message.iter().enumerate() {
        wire.extend(masked(k + 1 == message.len(), if k == 0 { TEXT } else { CONT }, &[*b]));
        if k + 1 < message.len() {
            wire.extend(masked(true, PING, &[k as u8]));
        }
    }
    raw.write(&wire);
    expect_pongs_and_ack(
        &mut raw,
        &(0..message.len() - 1).map(|k| vec![k as u8]).collect::<Vec<_>>(),
        "bytes",
    );
    assert_eq!(expect_type(&mut ag, "message").value["data"], json!("tiny ✓"));
    assert_pong(&mut ag);
    d.assert_alive();
    let after = scrape_until(&d, "the fragmented messages", |m| {
        delta(&before, m, "switchboard_messages_relayed_total", &[]) >= 2.0
    });
    assert_eq!(delta(&before, &after, "switchboard_messages_relayed_total", &[]), 2.0);
    assert_eq!(delta(&before, &after, "switchboard_messages_dropped_total", &[]), 0.0);
    assert_rss_settles(&d, rss_before, "fragments and pings");
}

#[test]
fn frames_after_a_close_are_ignored_and_the_connection_ends() {
    let mut d = Daemon::start_default();
    let cred = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&cred);
    let token = d.token("u1", &[], "1h");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    for round in 0..10 {
        let c = d.client(&token, Some(cred.agent_id()));
        let session = c.session.clone();
        assert_eq!(expect_type(&mut ag, "session").value["open"], json!(true));
        let mut raw = RawConn::of(&c.ws);
        let mut wire = masked(true, CLOSE, &1000u16.to_be_bytes());
        wire.extend(masked(true, TEXT, br#"{"type":"send","data":"after close","id":"late"}"#));
        wire.extend(masked(true, PING, b"late"));
        wire.extend(masked(true, TEXT, br#"{"type":"ping"}"#));
        wire.extend(masked(true, CLOSE, &1001u16.to_be_bytes()));
        if round % 2 == 1 {
            // The same, but the late frames arrive separately after the close.
            let split = masked(true, CLOSE, &1000u16.to_be_bytes()).len();
            raw.write(&wire[..split]);
            std::thread::sleep(Duration::from_millis(20));
            let _ = raw.s.write_all(&wire[split..]);
        } else {
            raw.write(&wire);
        }
        assert_eq!(raw.expect_close(), 1000, "the close is answered with the peer's code");
        raw.expect_eof();
        let f = expect_type(&mut ag, "session");
        assert_eq!((f.str("session"), &f.value["open"]), (session.as_str(), &json!(false)), "{}", f.text);
    }
    // Nothing sent after a close reached the agent.
    assert_pong(&mut ag);
    d.assert_alive();
    let after = scrape_until(&d, "the closes", |m| {
        delta(&before, m, "switchboard_connections_closed_total", &["role=\"client\""]) >= 10.0
    });
    assert_eq!(
        delta(&before, &after, "switchboard_connections_closed_total", &["role=\"client\"", "code=\"1000\""]),
        10.0
    );
    assert_eq!(delta(&before, &after, "switchboard_messages_relayed_total", &[]), 0.0);
    assert_rss_settles(&d, rss_before, "frames after close");
}

#[test]
fn unmasked_client_frames_close_with_1002() {
    let mut d = Daemon::start_default();
    let mut steady = Session::open(&d, "steady");
    let cred = d.hmac_agent("victim", "a");
    let token = d.token("victim", &[], "1h");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let frames: Vec<Vec<u8>> = vec![
        ws_frame(true, TEXT, br#"{"type":"ping"}"#, None),
        ws_frame(true, PING, b"", None),
        ws_frame(true, CLOSE, &1000u16.to_be_bytes(), None),
        ws_frame(true, 0x2, b"\x00\x01", None),
    ];
    for (i, f) in frames.iter().enumerate() {
        for agent in [false, true] {
            let ws: Ws = if agent {
                AgentConn::connect(d.addr, &cred).unwrap().ws
            } else {
                ClientConn::connect(d.addr, &token, TokenPlace::Header, None).unwrap().ws
            };
            let mut raw = RawConn::of(&ws);
            raw.write(f);
            loop {
                match raw.next(WAIT) {
                    Raw::Frame(TEXT, _) => continue,
                    Raw::Frame(CLOSE, p) if p.len() >= 2 => {
                        assert_eq!(
                            u16::from_be_bytes([p[0], p[1]]),
                            1002,
                            "unmasked frame {i} (agent: {agent})"
                        );
                        break;
                    }
                    other => {
                        panic!("unmasked frame {i} (agent: {agent}): expected close 1002, got {other:?}")
                    }
                }
            }
            raw.expect_eof();
        }
    }
    steady.relay();
    d.assert_alive();
    let n = 2.0 * frames.len() as f64;
    let after = scrape_until(&d, "the 1002 closes", |m| {
        delta(&before, m, "switchboard_connections_closed_total", &["code=\"1002\""]) >= n
    });
    assert_eq!(delta(&before, &after, "switchboard_connections_closed_total", &["code=\"1002\""]), n);
    assert_rss_settles(&d, rss_before, "unmasked frames");
}

#[test]
fn a_reset_in_the_middle_of_a_frame_harms_no_one() {
    let mut d = Daemon::start_default();
    let steady = Session::open(&d, "steady");
    let cred = d.hmac_agent("u1", "a");
    let mut ag = d.agent(&cred);
    let token = d.token("u1", &[], "1h");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let relaying = Relaying::start(steady);
    const RESETS: usize = 30;
    for i in 0..RESETS {
        let c = d.client(&token, None);
        let session = c.session.clone();
        assert_eq!(expect_type(&mut ag, "session").str("session"), session);
        let raw = RawConn::of(&c.ws);
        let payload =
            format!(r#"{{"type":"send","to":"{}","data":"{}"}}"#, cred.agent_id(), "z".repeat(4000));
        let frame = masked(true, TEXT, payload.as_bytes());
        // Cut inside the header, inside the mask, or inside the payload.
        let cut = [1, 3, 6, 100, frame.len() - 1][i % 5];
        let mut s = raw.s;
        s.write_all(&frame[..cut]).unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
        drop(c);
        let f = expect_type(&mut ag, "session");
        assert_eq!((f.str("session"), &f.value["open"]), (session.as_str(), &json!(false)), "{}", f.text);
    }
    // A reset agent, too.
    let other = d.hmac_agent("u1", "b");
    let a2 = d.agent(&other);
    let mut s = a2.ws.tcp().try_clone().unwrap();
    s.write_all(&masked(true, TEXT, b"{\"type\":\"send\",\"data\":")[..9]).unwrap();
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
    drop(a2);
    let mut steady = relaying.finish("resets");
    steady.relay();
    assert_pong(&mut ag);
    d.assert_alive();
    let after = scrape_until(&d, "the resets", |m| {
        delta(&before, m, "switchboard_connections_closed_total", &["code=\"1006\""]) >= (RESETS + 1) as f64
    });
    assert_eq!(
        delta(&before, &after, "switchboard_connections_closed_total", &["role=\"client\"", "code=\"1006\""]),
        RESETS as f64
    );
    assert_eq!(
        delta(&before, &after, "switchboard_connections_closed_total", &["role=\"agent\"", "code=\"1006\""]),
        1.0
    );
    assert_eq!(sum(&after, "switchboard_connections", &["role=\"client\""]), 1.0);
    assert_eq!(sum(&after, "switchboard_connections", &["role=\"agent\""]), 2.0);
    assert_rss_settles(&d, rss_before, "resets mid-frame");
}

#[test]
fn a_flood_of_tiny_frames_is_rate_limited_then_closed_with_4029() {
    let mut d = Daemon::with_config(
        "[limits]\nmessages_per_sec_per_user = 50\nmessages_burst_per_user = 100\nrate_abuse_close_secs = 2\n",
    );
    let steady = Session::open(&d, "steady");
    let cred = d.hmac_agent("abuser", "a");
    let mut ag = d.agent(&cred);
    let abuser = d.client(&d.token("abuser", &[], "1h"), Some(cred.agent_id()));
    expect_type(&mut ag, "session");
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let relaying = Relaying::start(steady);
    let mut raw = RawConn::of(&abuser.ws);
    let tiny = masked(true, TEXT, br#"{"type":"send","data":0}"#);
    let batch: Vec<u8> = tiny.iter().copied().cycle().take(tiny.len() * 100).collect();
    let start = Instant::now();
    let (mut sent, mut limited, mut other) = (0u64, 0u64, 0u64);
    let code = 'flood: loop {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no 4029 after 15 s ({sent} sent, {limited} limited)"
        );
        if raw.s.write_all(&batch).is_ok() {
            sent += 100;
        }
        loop {
            match raw.next(Duration::from_millis(5)) {
                Raw::Frame(TEXT, p) => {
                    let v: Value = serde_json::from_slice(&p).unwrap();
                    if v["type"] == "error" && v["code"] == "rate_limited" {
                        limited += 1;
                    } else {
                        other += 1;
                    }
                }
                Raw::Frame(CLOSE, p) if p.len() >= 2 => break 'flood u16::from_be_bytes([p[0], p[1]]),
                Raw::Timeout => break,
                other => panic!("during the flood: {other:?}"),
            }
        }
    };
    let took = start.elapsed();
    let steady = relaying.finish("tiny-frame flood");
    eprintln!("tiny-frame flood: {sent} frames sent, {limited} rate_limited, {other} other, closed {code} after {took:?}");
    assert_eq!(code, 4029);
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}, before rate_abuse_close_secs");
    assert!(limited > 0);
    assert_eq!(other, 0, "no ack was asked for; only rate_limited errors may come back");
    // The frames the relay did let through reached the agent.
    let mut delivered = 0;
    while let Event::Frame(f) = ag.recv(Duration::from_millis(300)) {
        match f.ty() {
            "message" => delivered += 1,
            "session" => {}
            t => panic!("unexpected {t}: {}", f.text),
        }
    }
    let mut steady = steady;
    steady.relay();
    d.assert_alive();
    let after = scrape_until(&d, "the 4029", |m| {
        delta(&before, m, "switchboard_connections_closed_total", &["code=\"4029\""]) >= 1.0
            && delta(&before, m, "switchboard_messages_relayed_total", &[]) >= delivered as f64
    });
    assert_eq!(
        delta(&before, &after, "switchboard_connections_closed_total", &["role=\"client\"", "code=\"4029\""]),
        1.0
    );
    // Each limited frame, plus the one that crossed into abuse and closed the connection.
    assert_eq!(
        delta(&before, &after, "switchboard_messages_dropped_total", &["reason=\"rate\""]),
        (limited + 1) as f64
    );
    assert!(delta(&before, &after, "switchboard_messages_relayed_total", &[]) >= delivered as f64);
    assert_rss_settles(&d, rss_before, "tiny-frame flood");
}

#[test]
fn a_ping_flood_from_a_peer_that_never_reads_stays_within_its_outbound_budget() {
    // §6: a peer that lets its outbound budget overflow is closed with 4008. Pongs are
    // outbound frames like any other: a peer that sends pings and never reads must not make
    // the relay queue pongs without bound.
    let mut d = Daemon::with_config("[limits]\nmax_frame_bytes = 65536\nsend_buffer_bytes = 65536\n");
    let mut steady = Session::open(&d, "steady");
    let c = d.client(&d.token("pinger", &[], "1h"), None);
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let raw = RawConn::of(&c.ws);
    let mut s = raw.s;
    // Small receive window: our side takes little, so the relay's queue must hold the rest.
    socket2::SockRef::from(&s).set_recv_buffer_size(4096).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let ping = masked(true, PING, &[b'p'; 125]);
    let batch: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1000).collect();
    let mut sent_bytes = 0usize;
    let mut peak = rss_before;
    let start = Instant::now();
    // Up to 48 MiB of pings (as many bytes of pongs), never reading.
    while sent_bytes < 48 << 20 && start.elapsed() < Duration::from_secs(20) {
        match s.write_all(&batch) {
            Ok(()) => sent_bytes += batch.len(),
            Err(_) => break,
        }
        peak = peak.max(d.rss_kib());
    }
    std::thread::sleep(Duration::from_millis(300));
    peak = peak.max(d.rss_kib());
    let grown_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "ping flood: {} MiB of pings in {:?}; daemon RSS {rss_before} KiB -> peak {peak} KiB",
        sent_bytes >> 20,
        start.elapsed()
    );
    steady.relay();
    d.assert_alive();
    // The close is counted when the connection is gone: after the close handshake, or its
    // 2 s deadline when (as here) the peer never reads our close frame.
    let (queued, closed_4008) = eventually(Duration::from_secs(6), || {
        let m = scrape(&d);
        let queued = sum(&m, "switchboard_outbound_queue_bytes", &[]);
        let closed = delta(&before, &m, "switchboard_connections_closed_total", &["code=\"4008\""]);
        (closed >= 1.0).then_some((queued, closed))
    })
    .unwrap_or_else(|| {
        let m = scrape(&d);
        (
            sum(&m, "switchboard_outbound_queue_bytes", &[]),
            delta(&before, &m, "switchboard_connections_closed_total", &["code=\"4008\""]),
        )
    });
    eprintln!("ping flood: outbound queue {queued} bytes, 4008 closes {closed_4008}");
    drop(s);
    drop(c);
    assert!(
        grown_mib < 16,
        "a peer that sends {} MiB of pings and never reads grew the daemon by {grown_mib} MiB \
         (send_buffer_bytes = 64 KiB; outbound queue {queued} bytes)",
        sent_bytes >> 20
    );
    assert_eq!(closed_4008, 1.0, "the non-reading pinger should be closed with 4008 (slow consumer)");
    assert_rss_settles(&d, rss_before, "ping flood");
}

#[test]
fn upgrade_floods_over_the_per_ip_rate_get_429_while_a_session_keeps_relaying() {
    let mut d =
        Daemon::with_config("[limits]\nhandshakes_per_sec_per_ip = 20\nhandshakes_burst_per_ip = 50\n");
    let steady = Session::open(&d, "steady");
    let bad = "Bearer not.a.jwt";
    let rss_before = d.rss_kib();
    // Let the bucket refill after the session's own handshakes.
    std::thread::sleep(Duration::from_millis(200));
    let before = scrape(&d);
    let relaying = Relaying::start(steady);
    let start = Instant::now();
    let addr = d.addr;
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut statuses: HashMap<u16, u64> = HashMap::new();
                let head = upgrade_head("/v1/client", &[&format!("Authorization: {bad}")]);
                for _ in 0..150 {
                    let r = raw_http(addr, head.as_bytes()).expect("an answer to every flood request");
                    *statuses.entry(r.status).or_default() += 1;
                    if r.status == 429 {
                        assert_eq!(r.json(), json!({"error": "too_many_requests"}));
                    }
                }
                statuses
            })
        })
        .collect();
    // Meanwhile another address is not limited by this one's flood.
    std::thread::sleep(Duration::from_millis(100));
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 9), d.addr);
    let token = d.token("other", &[], "1h");
    s.write_all(upgrade_head("/v1/client", &[&format!("Authorization: Bearer {token}")]).as_bytes()).unwrap();
    assert_eq!(read_status(&mut s), Some(101), "another address was limited by this one's flood");
    let mut statuses: HashMap<u16, u64> = HashMap::new();
    for f in flooders {
        for (k, v) in f.join().unwrap() {
            *statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed();
    let mut steady = relaying.finish("per-IP flood");
    eprintln!("per-IP flood: {statuses:?} in {elapsed:?}");
    let r429 = statuses.get(&429).copied().unwrap_or(0);
    let r401 = statuses.get(&401).copied().unwrap_or(0);
    assert_eq!(r429 + r401, 600, "only 429 and 401 expected: {statuses:?}");
    // The bucket: burst 50 plus 20/s (and a little for timing).
    let allowed = 50.0 + 20.0 * elapsed.as_secs_f64() + 2.0;
    assert!((r401 as f64) <= allowed, "{r401} requests passed the per-IP limit in {elapsed:?}");
    assert!(r429 > 0);
    steady.relay();
    d.assert_alive();
    let after = scrape(&d);
    let refused = "switchboard_handshakes_refused_total";
    assert_eq!(
        delta(&before, &after, refused, &["status=\"429\"", "reason=\"ip_handshake_rate\""]),
        r429 as f64
    );
    assert_eq!(delta(&before, &after, refused, &["status=\"401\""]), r401 as f64);
    assert_rss_settles(&d, rss_before, "per-IP flood");
}

#[test]
fn upgrade_floods_over_the_global_cap_get_503_while_a_session_keeps_relaying() {
    const CAP: usize = 8;
    let mut d = Daemon::with_config(&format!("[server]\nmax_connections = {CAP}\n"));
    let steady = Session::open(&d, "steady");
    let token = d.token("filler", &[], "1h");
    // Fill the cap: the steady session holds two places.
    let fillers: Vec<ClientConn> = (0..CAP - 2).map(|_| d.client(&token, None)).collect();
    let rss_before = d.rss_kib();
    let before = scrape(&d);
    let relaying = Relaying::start(steady);
    let addr = d.addr;
    let cred = d.hmac_agent("flood", "a");
    let flooders: Vec<_> = (0..4)
        .map(|k| {
            let (token, cred) = (token.clone(), cred.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                for i in 0..50 {
                    let r = if (i + k) % 2 == 0 {
                        ClientConn::connect(addr, &token, TokenPlace::Header, None).map(|_| ())
                    } else {
                        AgentConn::connect(addr, &cred).map(|_| ())
                    };
                    assert_refused(r, 503, "unavailable");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let refused: u64 = flooders.into_iter().map(|f| f.join().expect("every flood upgrade is a 503")).sum();
    let steady = relaying.finish("global-cap flood");
    let after = scrape(&d);
    let name = "switchboard_handshakes_refused_total";
    assert_eq!(
        delta(&before, &after, name, &["status=\"503\"", "reason=\"global_connection_cap\""]),
        refused as f64,
        "{:?}",
        series(&after, name)
    );
    assert_eq!(delta(&before, &after, name, &[]), refused as f64);
    // Places free up: the fillers leave, a newcomer gets in.
    drop(fillers);
    let again = eventually(Duration::from_secs(5), || {
        ClientConn::connect(d.addr, &token, TokenPlace::Header, None).ok()
    });
    assert!(again.is_some(), "places did not free up after the flood");
    let mut steady = steady;
    steady.relay();
    d.assert_alive();
    assert_rss_settles(&d, rss_before, "global-cap flood");
}
