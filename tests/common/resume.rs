//! Helpers for the offline delivery and resume tests (spec §8, docs/protocol.md §10):
//! resume queries, readers for stream and mailbox frames, and stopping and restarting a
//! daemon on the same data dir (SIGTERM or SIGKILL).
//!
//! Invariants:
//! - Readers skip only frames that can arrive at any moment for reasons outside the test's
//!   control (`presence` on clients, `session` on agents); everything else is asserted.
//! - A restarted daemon uses the same data dir, config file and JWT key, so tokens minted
//!   before the restart stay valid; it listens on new ephemeral ports (`addr` changes).

use super::{expect_close, next_frame, spawn_reader, Conn, Daemon, WAIT};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use switchboard::client::{AgentConn, ClientConn, ClientOpts, ConnectError, Event, Frame, TokenPlace};

/// Frames that may arrive on a client at any time and are not part of a stream.
pub const CLIENT_NOISE: &[&str] = &["presence"];
/// Frames that may arrive on an agent at any time and are not part of its mailbox.
pub const AGENT_NOISE: &[&str] = &["session"];

/// The query of a client resume: `since`/`epoch` and/or `resume`, as text for
/// [`ClientOpts::extra_query`].
pub fn resume_query(since: Option<u64>, epoch: Option<&str>, resume: Option<&str>) -> String {
    let mut q = Vec::new();
    if let Some(s) = since {
        q.push(format!("since={s}"));
    }
    if let Some(e) = epoch {
        q.push(format!("epoch={e}"));
    }
    if let Some(r) = resume {
        q.push(format!("resume={r}"));
    }
    q.join("&")
}

/// Connects a client with `token` in the `Authorization` header, optionally bound to `agent`,
/// with `query` (raw, may be empty) appended to the query string.
pub fn try_client_q(
    d: &Daemon,
    token: &str,
    agent: Option<&str>,
    query: &str,
) -> Result<ClientConn, ConnectError> {
    let opts = ClientOpts {
        agent: agent.map(str::to_string),
        extra_query: if query.is_empty() { None } else { Some(query.to_string()) },
        ..ClientOpts::default()
    };
    ClientConn::connect_with(d.addr, Some((TokenPlace::Header, token)), &opts)
}

/// Like [`try_client_q`]; panics when refused.
#[track_caller]
pub fn client_q(d: &Daemon, token: &str, agent: Option<&str>, query: &str) -> ClientConn {
    try_client_q(d, token, agent, query).unwrap_or_else(|e| panic!("client connect with ?{query}: {e}"))
}

/// The next frame that is not noise.
#[track_caller]
pub fn next_real(c: &mut impl Conn, noise: &[&str], timeout: Duration) -> Frame {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = next_frame(c, left);
        if !noise.contains(&f.ty()) {
            return f;
        }
    }
}

/// The next non-`presence` frame on a client.
#[track_caller]
pub fn client_next(c: &mut ClientConn) -> Frame {
    next_real(c, CLIENT_NOISE, WAIT)
}

/// The next non-`session` frame on an agent.
#[track_caller]
pub fn agent_next(a: &mut AgentConn) -> Frame {
    next_real(a, AGENT_NOISE, WAIT)
}

/// One stream message as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamMsg {
    pub from: String,
    pub seq: u64,
    pub epoch: String,
    pub data: Value,
}

/// Parses a client `message` frame of a stream: `from`, `seq` (a u64) and `epoch` (a relay id).
#[track_caller]
pub fn stream_msg(f: &Frame) -> StreamMsg {
    assert_eq!(f.ty(), "message", "expected a stream message, got {}", f.text);
    let seq =
        f.value.get("seq").and_then(Value::as_u64).unwrap_or_else(|| panic!("no u64 seq in {}", f.text));
    let epoch =
        f.value.get("epoch").and_then(Value::as_str).unwrap_or_else(|| panic!("no epoch in {}", f.text));
    super::assert_relay_id(epoch);
    StreamMsg {
        from: f.str("from").to_string(),
        seq,
        epoch: epoch.to_string(),
        data: f.value["data"].clone(),
    }
}

/// The next client frame must be a stream message from `from` with `seq` and `data`; returns
/// its epoch.
#[track_caller]
pub fn expect_stream(c: &mut ClientConn, from: &str, seq: u64, data: &Value) -> String {
    let f = client_next(c);
    let m = stream_msg(&f);
    assert_eq!((m.from.as_str(), m.seq, &m.data), (from, seq, data), "unexpected stream message {}", f.text);
    m.epoch
}

/// The next client frame must be `{"type":"resumed","agent":agent,"recovered":recovered}`.
#[track_caller]
pub fn expect_resumed(c: &mut ClientConn, agent: &str, recovered: bool) {
    let f = client_next(c);
    assert_eq!(
        f.value,
        serde_json::json!({"type": "resumed", "agent": agent, "recovered": recovered}),
        "expected resumed recovered:{recovered} for {agent}, got {}",
        f.text
    );
}

/// The next frame (noise skipped) must be an `ack` for `id` with `"queued":true`.
#[track_caller]
pub fn expect_ack_queued(c: &mut impl Conn, noise: &[&str], id: &str) {
    let f = next_real(c, noise, WAIT);
    assert_eq!(
        f.value,
        serde_json::json!({"type": "ack", "id": id, "queued": true}),
        "expected a queued ack for {id}, got {}",
        f.text
    );
}

/// The next frame (noise skipped) must be a plain `ack` for `id` (not queued).
#[track_caller]
pub fn expect_ack_live(c: &mut impl Conn, noise: &[&str], id: &str) {
    let f = next_real(c, noise, WAIT);
    assert_eq!(f.ty(), "ack", "expected an ack for {id}, got {}", f.text);
    assert_eq!(f.str("id"), id, "{}", f.text);
    assert_ne!(
        f.value.get("queued"),
        Some(&Value::Bool(true)),
        "a delivered message is not queued: {}",
        f.text
    );
}

/// The next frame (noise skipped) must be an `error` with `code` and `id`.
#[track_caller]
pub fn expect_error(c: &mut impl Conn, noise: &[&str], code: &str, id: &str) {
    let f = next_real(c, noise, WAIT);
    assert_eq!(f.ty(), "error", "expected error {code} for {id}, got {}", f.text);
    assert_eq!((f.str("code"), f.str("id")), (code, id), "{}", f.text);
    assert!(!f.str("message").is_empty(), "every error has a message: {}", f.text);
}

/// Sends a protocol ping and reads up to its pong, skipping `noise`; any other frame before
/// the pong fails the test. Proves everything sent before was processed and nothing else
/// was pending.
#[track_caller]
pub fn assert_quiet(c: &mut impl Conn, noise: &[&str]) {
    c.ws().ping().expect("send ping");
    let f = next_real(c, noise, WAIT);
    assert_eq!(f.ty(), "pong", "expected nothing but the pong, got {}", f.text);
}

/// Waits on an agent for `{"type":"session","session":s,"open":open}`, skipping other
/// `session` frames only.
#[track_caller]
pub fn await_session_event(a: &mut AgentConn, s: &str, open: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let f = next_frame(a, deadline.saturating_duration_since(Instant::now()));
        assert_eq!(f.ty(), "session", "waiting for session {s} open:{open}, got {}", f.text);
        if f.str("session") == s && f.value["open"] == Value::Bool(open) {
            return;
        }
    }
}

/// One mailbox message as an agent sees it: (from, seq, data).
#[track_caller]
pub fn mailbox_msg(f: &Frame) -> (String, u64, Value) {
    assert_eq!(f.ty(), "message", "expected a mailbox message, got {}", f.text);
    let seq =
        f.value.get("seq").and_then(Value::as_u64).unwrap_or_else(|| panic!("no u64 seq in {}", f.text));
    assert!(f.value.get("epoch").is_none(), "mailbox messages carry no epoch: {}", f.text);
    (f.str("from").to_string(), seq, f.value["data"].clone())
}

/// Sends the agent's cumulative confirmation `{"type":"ack","seq":n}`.
pub fn agent_ack(a: &mut AgentConn, seq: u64) {
    a.send_raw_text(&format!(r#"{{"type":"ack","seq":{seq}}}"#)).expect("send ack");
}

/// Closes a connection the polite way and reads until the relay's close, returning the frames
/// that arrived before it (a peer-initiated close is echoed after everything already queued).
pub fn close_and_drain(c: &mut impl Conn) -> Vec<Frame> {
    c.ws().close();
    let deadline = Instant::now() + WAIT;
    let mut frames = Vec::new();
    loop {
        match c.ws().recv(deadline.saturating_duration_since(Instant::now())) {
            Event::Frame(f) => frames.push(f),
            Event::Close { .. } | Event::Eof(_) => return frames,
            Event::Timeout => panic!("no close echo within {WAIT:?}; frames before: {frames:?}"),
            Event::Binary(b) => panic!("binary frame {b:?}"),
        }
    }
}

/// Expects the relay's 1001 close on `c`; frames before it are returned.
#[track_caller]
pub fn expect_1001(c: &mut impl Conn) -> Vec<Frame> {
    let (code, frames) = expect_close(c, Duration::from_secs(15));
    assert_eq!(code, 1001, "shutdown closes with 1001");
    frames
}

impl Daemon {
    /// Sends `sig` to the daemon without waiting.
    pub fn signal(&mut self, sig: libc::c_int) {
        self.stopped = true;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still running {timeout:?} after the signal:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(Duration::from_secs(10));
        assert!(!status.success(), "SIGKILL is not a clean exit: {status}");
    }

    /// Starts the daemon again on the same data dir and config (after it exited), with
    /// `shards` shards; `addr` and `admin_addr` are the new ones.
    pub fn restart(&mut self, shards: usize) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "restart: the previous daemon is still running"
        );
        self.logs.lock().unwrap().push_str("---- restart on the same data dir ----\n");
        let driver = std::env::var("SWITCHBOARD_TEST_DRIVER").unwrap_or_else(|_| "auto".into());
        let mut cmd = Command::new(super::BIN);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--shards")
            .arg(shards.to_string())
            .arg("--driver")
            .arg(&driver)
            .arg("--config")
            .arg(&self.config_path);
        if let Some(f) = &self.hs256_file {
            cmd.arg(format!("--jwt-hs256-secret-file={}", f.display()));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn switchboard serve");
        let (tx, rx) = mpsc::channel();
        spawn_reader(child.stdout.take().unwrap(), self.logs.clone(), Some(tx));
        spawn_reader(child.stderr.take().unwrap(), self.logs.clone(), None);
        self.child = child;
        let deadline = Instant::now() + Duration::from_secs(20);
        let (listen, admin) = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => break v,
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        std::thread::sleep(Duration::from_millis(100));
                        panic!("restarted daemon exited early ({status}); output:\n{}", self.logs());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "restarted daemon printed no listening line:\n{}",
                        self.logs()
                    );
                }
            }
        };
        self.addr = listen.parse().unwrap_or_else(|_| panic!("bad listening address {listen:?}"));
        self.admin_addr = admin.parse().unwrap_or_else(|_| panic!("bad admin address {admin:?}"));
        self.stopped = false;
    }
}

/// The answer an agent `send` with an id must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// A plain `ack`: handed to a live connection.
    Live,
    /// `ack` with `"queued":true`: committed for a closed session.
    Queued,
    /// Either (a broadcast that reaches no session: the documents promise only an `ack`).
    Any,
}

/// Agent `send` with an id, then its answer (skipping `session` frames).
#[track_caller]
pub fn agent_send(ag: &mut AgentConn, to: Option<&str>, data: &Value, id: &str, ack: Ack) {
    ag.send(to, data, Some(id)).expect("agent send");
    match ack {
        Ack::Live => expect_ack_live(ag, AGENT_NOISE, id),
        Ack::Queued => expect_ack_queued(ag, AGENT_NOISE, id),
        Ack::Any => {
            let f = agent_next(ag);
            assert_eq!((f.ty(), f.str("id")), ("ack", id), "expected an ack for {id}, got {}", f.text);
        }
    }
}

/// Waits on a client for `{"type":"presence","agent":agent,"online":online}`; nothing but
/// `presence` frames may come first.
#[track_caller]
pub fn await_presence(c: &mut ClientConn, agent: &str, online: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = next_frame(c, deadline.saturating_duration_since(Instant::now()));
        assert_eq!(f.ty(), "presence", "waiting for presence {agent} online:{online}, got {}", f.text);
        if f.str("agent") == agent && f.value["online"] == Value::Bool(online) {
            return;
        }
    }
}

/// Client `send` with an id; it must be acked `queued:true`.
#[track_caller]
pub fn queue(c: &mut ClientConn, to: Option<&str>, data: &Value, id: &str) {
    c.send(to, data, Some(id)).unwrap();
    expect_ack_queued(c, CLIENT_NOISE, id);
}

/// The next agent frame must be the mailbox message (`from`, `seq`, `data`).
#[track_caller]
pub fn expect_mail(ag: &mut AgentConn, from: &str, seq: u64, data: &Value) {
    let f = agent_next(ag);
    assert_eq!(
        mailbox_msg(&f),
        (from.to_string(), seq, data.clone()),
        "unexpected mailbox message {}",
        f.text
    );
}
