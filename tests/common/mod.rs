//! The integration-test harness: starts a real `switchboard serve` on port 0 in a fresh
//! temporary directory, captures everything it prints, and drives the CLI (`agent create`,
//! `agent revoke`, `token`) against the same data dir.
//!
//! Invariants:
//! - Every daemon is killed when its [`Daemon`] drops; a daemon that exited on its own fails
//!   the test with its output.
//! - Every wait is bounded; helpers panic with what they saw instead of hanging.
//! - The default config lifts the per-IP handshake limit (tests connect a lot); a test that
//!   exercises that limit sets it in its own TOML, which is merged over the defaults.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::client::{
    b64url, generate_ed25519, unix_now, AgentConn, AgentCredential, ClientConn, ConnectError, Event, Frame,
    TokenPlace, Ws,
};

pub use ring::signature::{Ed25519KeyPair, KeyPair};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Generic bound for "this should arrive".
pub const WAIT: Duration = Duration::from_secs(5);
/// Bound for "nothing else should be pending" checks that use a marker frame instead.
pub const SHORT: Duration = Duration::from_millis(300);

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    pub shards: usize,
    /// TOML merged over the test defaults (tables are merged key by key).
    pub config_toml: String,
    /// When set, the HS256 key is this secret, given to `serve` and `token` with
    /// `--jwt-hs256-secret-file`; otherwise `serve` generates one in the data dir.
    pub hs256_secret: Option<String>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts { shards: 2, config_toml: String::new(), hs256_secret: None }
    }
}

impl DaemonOpts {
    pub fn with_config(toml: &str) -> Self {
        DaemonOpts { config_toml: toml.to_string(), ..DaemonOpts::default() }
    }
}

/// The TOML every test daemon starts from.
const DEFAULT_TOML: &str = r#"
[limits]
handshakes_per_sec_per_ip = 100000
handshakes_burst_per_ip = 100000
"#;

/// A running relay.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    hs256_file: Option<PathBuf>,
    logs: Arc<Mutex<String>>,
    /// Set by [`Daemon::terminate`]: the process is expected to exit.
    stopped: bool,
    _dir: tempfile::TempDir,
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    logs: Arc<Mutex<String>>,
    listening: Option<mpsc::Sender<(String, String)>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let mut sent = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            logs.lock().unwrap().push_str(&line);
            if let (Some(tx), false) = (&listening, sent) {
                if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line.trim()) {
                    if let Some(l) = m.get("listening").and_then(Value::as_str) {
                        let admin = m.get("admin").and_then(Value::as_str).unwrap_or("").to_string();
                        let _ = tx.send((l.to_string(), admin));
                        sent = true;
                    }
                }
            }
        }
    });
}

impl Daemon {
    /// Starts a daemon with default options.
    pub fn start_default() -> Daemon {
        Daemon::start(DaemonOpts::default())
    }

    /// Starts a daemon with `toml` merged over the defaults.
    pub fn with_config(toml: &str) -> Daemon {
        Daemon::start(DaemonOpts::with_config(toml))
    }

    pub fn start(opts: DaemonOpts) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut table: toml::Table = DEFAULT_TOML.parse().unwrap();
        let extra: toml::Table = opts.config_toml.parse().expect("test TOML parses");
        merge(&mut table, extra);
        let config_path = dir.path().join("switchboard.toml");
        std::fs::write(&config_path, toml::to_string(&table).unwrap()).unwrap();
        let hs256_file = opts.hs256_secret.as_ref().map(|s| {
            let p = dir.path().join("jwt.secret");
            std::fs::write(&p, format!("{s}\n")).unwrap();
            p
        });
        let driver = std::env::var("SWITCHBOARD_TEST_DRIVER").unwrap_or_else(|_| "auto".into());
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--shards")
            .arg(opts.shards.to_string())
            .arg("--driver")
            .arg(&driver)
            .arg("--config")
            .arg(&config_path);
        if let Some(f) = &hs256_file {
            cmd.arg(format!("--jwt-hs256-secret-file={}", f.display()));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn switchboard serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        spawn_reader(child.stdout.take().unwrap(), logs.clone(), Some(tx));
        spawn_reader(child.stderr.take().unwrap(), logs.clone(), None);
        let deadline = Instant::now() + Duration::from_secs(15);
        let (listen, admin) = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => break v,
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        std::thread::sleep(Duration::from_millis(100));
                        panic!("daemon exited early ({status}); output:\n{}", logs.lock().unwrap());
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "daemon did not print its listening line in 15 s; output:\n{}",
                            logs.lock().unwrap()
                        );
                    }
                }
            }
        };
        let addr = listen.parse().unwrap_or_else(|_| panic!("bad listening address {listen:?}"));
        let admin_addr = admin.parse().unwrap_or_else(|_| panic!("bad admin address {admin:?}"));
        Daemon { child, addr, admin_addr, data_dir, config_path, hs256_file, logs, stopped: false, _dir: dir }
    }

    /// Everything the daemon printed so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Runs the binary with `args`; panics with its output when it fails.
    pub fn cli(&self, args: &[String]) -> String {
        let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run switchboard CLI");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "switchboard {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
        stdout
    }

    fn data_dir_arg(&self) -> String {
        format!("--data-dir={}", self.data_dir.display())
    }

    /// `agent create … --json` for an HMAC agent: (agent_id, secret).
    pub fn create_agent(&self, user: &str, name: &str) -> (String, String) {
        let out = self.cli(&[
            "agent".into(),
            "create".into(),
            self.data_dir_arg(),
            format!("--user={user}"),
            format!("--name={name}"),
            "--json".into(),
        ]);
        let v = json_line_with(&out, "agent_id");
        assert_eq!(v["user"], json!(user), "agent create output: {out}");
        assert_eq!(v["name"], json!(name), "agent create output: {out}");
        let secret = v["secret"].as_str().unwrap_or_else(|| panic!("no secret in {out}")).to_string();
        assert!(secret.starts_with("sbk_"), "secret should start with sbk_");
        (v["agent_id"].as_str().unwrap().to_string(), secret)
    }

    /// An HMAC agent as a credential.
    pub fn hmac_agent(&self, user: &str, name: &str) -> AgentCredential {
        let (agent_id, secret) = self.create_agent(user, name);
        AgentCredential::Hmac { agent_id, secret }
    }

    /// `agent create --ed25519-pubkey=… --json`: (agent_id, key pair).
    pub fn create_ed25519_agent(&self, user: &str, name: &str) -> (String, Arc<Ed25519KeyPair>) {
        let kp = generate_ed25519();
        let out = self.cli(&[
            "agent".into(),
            "create".into(),
            self.data_dir_arg(),
            format!("--user={user}"),
            format!("--name={name}"),
            format!("--ed25519-pubkey={}", b64url(kp.public_key().as_ref())),
            "--json".into(),
        ]);
        let v = json_line_with(&out, "agent_id");
        assert!(v.get("secret").is_none(), "an Ed25519 agent has no secret: {out}");
        (v["agent_id"].as_str().unwrap().to_string(), kp)
    }

    pub fn ed25519_agent(&self, user: &str, name: &str) -> AgentCredential {
        let (agent_id, keypair) = self.create_ed25519_agent(user, name);
        AgentCredential::Ed25519 { agent_id, keypair }
    }

    /// `agent revoke`; returns when the CLI has returned.
    pub fn revoke(&self, agent_id: &str) {
        self.cli(&["agent".into(), "revoke".into(), self.data_dir_arg(), "--".into(), agent_id.into()]);
    }

    /// `token … --json`: a JWT for `user`, limited to `agents` when not empty.
    pub fn token(&self, user: &str, agents: &[&str], ttl: &str) -> String {
        let mut args =
            vec!["token".to_string(), self.data_dir_arg(), format!("--user={user}"), format!("--ttl={ttl}")];
        for a in agents {
            args.push(format!("--agent={a}"));
        }
        if let Some(f) = &self.hs256_file {
            args.push(format!("--jwt-hs256-secret-file={}", f.display()));
        }
        args.push("--json".into());
        let out = self.cli(&args);
        let v = json_line_with(&out, "token");
        assert!(v["expires_at"].is_u64(), "token output has expires_at: {out}");
        v["token"].as_str().unwrap().to_string()
    }

    /// The HS256 key the daemon verifies with: the configured secret, or the one `serve`
    /// generated in the data dir (trimmed, as bytes).
    pub fn jwt_secret(&self) -> Vec<u8> {
        let path = self.hs256_file.clone().unwrap_or_else(|| self.data_dir.join("jwt-hs256.key"));
        let text = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        String::from_utf8_lossy(&text).trim().as_bytes().to_vec()
    }

    /// A hand-made HS256 JWT signed with the daemon's key.
    pub fn mint(&self, claims: &Value) -> String {
        mint(&self.jwt_secret(), claims)
    }

    /// A valid hand-made token for `user` that lives `ttl_secs`.
    pub fn mint_user(&self, user: &str, ttl_secs: i64) -> String {
        self.mint(&json!({"sub": user, "exp": unix_now() as i64 + ttl_secs}))
    }

    pub fn agent(&self, cred: &AgentCredential) -> AgentConn {
        AgentConn::connect(self.addr, cred).unwrap_or_else(|e| panic!("agent {cred:?} connect: {e}"))
    }

    pub fn client(&self, token: &str, agent: Option<&str>) -> ClientConn {
        ClientConn::connect(self.addr, token, TokenPlace::Header, agent)
            .unwrap_or_else(|e| panic!("client connect: {e}"))
    }

    /// Sends SIGTERM; returns the exit status if the process ends within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.stopped = true;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Panics when the daemon has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("daemon exited ({status}); output:\n{}", self.logs());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let crashed = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The test failed: show what the daemon said (the test harness captures it).
            eprintln!("---- daemon output ----\n{}---- end of daemon output ----", self.logs());
        }
        if let (Some(status), false) = (crashed, self.stopped) {
            if !std::thread::panicking() {
                panic!("daemon exited during the test ({status}); output:\n{}", self.logs());
            }
        }
    }
}

/// The first stdout line that is a JSON object with `key`.
fn json_line_with(out: &str, key: &str) -> Value {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get(key).is_some())
        .or_else(|| serde_json::from_str::<Value>(out.trim()).ok().filter(|v| v.get(key).is_some()))
        .unwrap_or_else(|| panic!("no JSON with {key:?} in CLI output:\n{out}"))
}

/// An HS256 JWT over `claims` with `secret`, made with ring.
pub fn mint(secret: &[u8], claims: &Value) -> String {
    mint_with_header(secret, &json!({"alg": "HS256", "typ": "JWT"}), claims)
}

pub fn mint_with_header(secret: &[u8], header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(serde_json::to_string(header).unwrap().as_bytes()),
        b64url(serde_json::to_string(claims).unwrap().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(sig.as_ref()))
}

/// Asserts a refused upgrade with `status` and exactly `{"error":code}`.
#[track_caller]
pub fn assert_refused<T>(r: Result<T, ConnectError>, status: u16, code: &str) -> ConnectError {
    match r {
        Ok(_) => panic!("expected HTTP {status} {code}, but the upgrade succeeded"),
        Err(e) => {
            assert_eq!(e.status(), Some(status), "expected HTTP {status} {code}, got {e}");
            assert_eq!(e.body_json(), Some(json!({"error": code})), "body of the {status}: {e}");
            e
        }
    }
}

/// Connections that yield events.
pub trait Conn {
    fn ws(&mut self) -> &mut Ws;
}
impl Conn for AgentConn {
    fn ws(&mut self) -> &mut Ws {
        &mut self.ws
    }
}
impl Conn for ClientConn {
    fn ws(&mut self) -> &mut Ws {
        &mut self.ws
    }
}

/// The next event must be a text frame.
#[track_caller]
pub fn next_frame(c: &mut impl Conn, timeout: Duration) -> Frame {
    match c.ws().recv(timeout) {
        Event::Frame(f) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The next event must be a frame of type `ty`.
#[track_caller]
pub fn expect_type(c: &mut impl Conn, ty: &str) -> Frame {
    let f = next_frame(c, WAIT);
    assert_eq!(f.ty(), ty, "expected a {ty} frame, got {}", f.text);
    f
}

/// Skips frames whose type is in `skip` until one of another type; that one is returned.
#[track_caller]
pub fn next_skipping(c: &mut impl Conn, skip: &[&str], timeout: Duration) -> Frame {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = next_frame(c, left);
        if !skip.contains(&f.ty()) {
            return f;
        }
    }
}

/// Reads until a close; frames before it are returned too.
#[track_caller]
pub fn expect_close(c: &mut impl Conn, timeout: Duration) -> (u16, Vec<Frame>) {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.ws().recv(left) {
            Event::Frame(f) => frames.push(f),
            Event::Close { code, .. } => return (code, frames),
            other => panic!("expected a close frame, got {other:?} after {} frames", frames.len()),
        }
    }
}

/// Nothing at all arrives within `d` (use only where no marker frame can be used).
#[track_caller]
pub fn expect_silence(c: &mut impl Conn, d: Duration) {
    match c.ws().recv(d) {
        Event::Timeout => {}
        other => panic!("expected nothing, got {other:?}"),
    }
}

/// Sends a protocol ping and expects the next frame to be its pong (proves the connection
/// is alive and that nothing else was queued before it).
#[track_caller]
pub fn assert_pong(c: &mut impl Conn) {
    c.ws().ping().expect("send ping");
    let f = next_frame(c, WAIT);
    assert_eq!(f.ty(), "pong", "expected pong, got {}", f.text);
}

/// A valid upgrade request head for `path` with extra header lines (each without CRLF).
pub fn upgrade_head(path: &str, extra: &[&str]) -> String {
    let mut s = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// A plain request head without upgrade headers.
pub fn plain_head(method: &str, path: &str, extra: &[&str]) -> String {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// Small deterministic PRNG (splitmix64) for random traffic.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Retries `f` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that an id chosen by the relay matches §1 (≤ 64 chars of `[A-Za-z0-9_-]`).
#[track_caller]
pub fn assert_relay_id(id: &str) {
    assert!(
        !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "relay id {id:?} breaks §1"
    );
}

/// Offline delivery and resume helpers (§10): resume queries, stream/mailbox readers, restarts.
pub mod resume;
