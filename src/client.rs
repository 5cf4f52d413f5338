//! A small blocking client for the Switchboard wire protocol (spec v1), for the integration
//! tests, the examples and the load generator.
//!
//! The signing of §3.1 (upgrade) and §3.2 (messages) is implemented here on its own, with
//! `ring` and `base64`, from the spec's text and never by calling the relay's `auth` module:
//! the tests are only meaningful when the two sides are written independently.
//!
//! Invariants:
//! - Every connection reads the relay's `welcome` before `connect` returns, so `conn` and
//!   `session` ids are known.
//! - [`AgentConn`]'s counter only advances for frames it signed correctly with the next
//!   value; crafted frames ([`AgentConn::send_crafted`]) never touch it.
//! - [`Event::Close`] always carries the peer's close code: pings are answered inside `recv`
//!   and never reported, so they cannot hide a close that follows them.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::Ed25519KeyPair;
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// HTTP header pairs, in the order received.
pub type Headers = Vec<(String, String)>;

/// The subprotocol every client offers and the relay answers (§3.3).
pub const SUBPROTOCOL: &str = "switchboard.v1";

/// How long a connect waits for the upgrade answer and the `welcome` frame.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes that block longer than this fail instead of hanging a test.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// base64url without padding, the encoding of every value the relay expects (§2).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// base64url with padding; the relay must accept it too (§2).
pub fn b64url_padded(bytes: &[u8]) -> String {
    URL_SAFE.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh nonce: 32 characters of `[A-Za-z0-9_-]` (the spec allows 16 to 64).
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 24];
    SystemRandom::new().fill(&mut bytes).expect("system random");
    b64url(&bytes)
}

/// The §3.1 signed string: `switchboard-agent-v1\n<agent_id>\n<timestamp>\n<nonce>`.
pub fn upgrade_signed_string(agent_id: &str, timestamp: &str, nonce: &str) -> String {
    format!("switchboard-agent-v1\n{agent_id}\n{timestamp}\n{nonce}")
}

/// The §3.2 signed message: `switchboard-msg-v1\n<conn>\n<ctr>\n<to or empty>\n<data>`.
pub fn message_signed_string(conn: &str, ctr: u64, to: Option<&str>, data: &str) -> String {
    format!("switchboard-msg-v1\n{conn}\n{ctr}\n{}\n{data}", to.unwrap_or(""))
}

/// A JSON string literal for `s`.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// An agent's credential as the CLI created it.
#[derive(Clone)]
pub enum AgentCredential {
    /// `secret` is used exactly as the CLI printed it (`sbk_…`), as UTF-8 bytes.
    Hmac { agent_id: String, secret: String },
    /// The relay holds only the public key.
    Ed25519 { agent_id: String, keypair: Arc<Ed25519KeyPair> },
}

impl std::fmt::Debug for AgentCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        match self {
            AgentCredential::Hmac { agent_id, .. } => write!(f, "Hmac({agent_id})"),
            AgentCredential::Ed25519 { agent_id, .. } => write!(f, "Ed25519({agent_id})"),
        }
    }
}

impl AgentCredential {
    pub fn agent_id(&self) -> &str {
        match self {
            AgentCredential::Hmac { agent_id, .. } | AgentCredential::Ed25519 { agent_id, .. } => agent_id,
        }
    }

    /// Raw signature bytes over `msg` (HMAC-SHA256 or Ed25519).
    pub fn sign_bytes(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            AgentCredential::Hmac { secret, .. } => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
                ring::hmac::sign(&key, msg).as_ref().to_vec()
            }
            AgentCredential::Ed25519 { keypair, .. } => keypair.sign(msg).as_ref().to_vec(),
        }
    }

    /// base64url (no padding) signature over `msg`.
    pub fn sign(&self, msg: &str) -> String {
        b64url(&self.sign_bytes(msg.as_bytes()))
    }
}

/// Generates a fresh Ed25519 key pair (for agents created with `--ed25519-pubkey`).
pub fn generate_ed25519() -> Arc<Ed25519KeyPair> {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed25519 keygen");
    Arc::new(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed25519 from pkcs8"))
}

/// Why a connect did not produce a live, welcomed connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The relay answered the upgrade with an ordinary HTTP response (§2 refusal table).
    #[error("upgrade refused with HTTP {status}: {body}")]
    Refused { status: u16, headers: Vec<(String, String)>, body: String },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("websocket error: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// Upgraded, but the first frame was not a `welcome`.
    #[error("no welcome: {0}")]
    NoWelcome(String),
}

impl ConnectError {
    /// The HTTP status of a refused upgrade.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The JSON body of a refused upgrade, when it parses.
    pub fn body_json(&self) -> Option<Value> {
        match self {
            ConnectError::Refused { body, .. } => serde_json::from_str(body).ok(),
            _ => None,
        }
    }

    /// A header of a refused upgrade (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            ConnectError::Refused { headers, .. } => {
                headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
            }
            _ => None,
        }
    }
}

/// One text frame from the relay: its exact text and its parsed JSON.
#[derive(Debug, Clone)]
pub struct Frame {
    pub text: String,
    pub value: Value,
}

impl Frame {
    /// The frame's `type`, or "" when it has none.
    pub fn ty(&self) -> &str {
        self.value.get("type").and_then(Value::as_str).unwrap_or("")
    }

    /// A string field, or "" when missing.
    pub fn str(&self, key: &str) -> &str {
        self.value.get(key).and_then(Value::as_str).unwrap_or("")
    }

    /// The exact bytes of the `data` value as they stand in the frame (§4: the relay forwards
    /// them without re-serializing).
    pub fn raw_data(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct WithData<'a> {
            #[serde(borrow)]
            data: &'a serde_json::value::RawValue,
        }
        serde_json::from_str::<WithData<'_>>(&self.text).ok().map(|w| w.data.get().to_string())
    }
}

/// What one `recv` observed.
#[derive(Debug, Clone)]
pub enum Event {
    /// A text frame holding JSON. A text frame that is not JSON is reported with `Value::Null`.
    Frame(Frame),
    /// A binary frame (the relay should never send one).
    Binary(Vec<u8>),
    /// The relay's close frame; 1005 when it carried no code.
    Close { code: u16, reason: String },
    /// Nothing arrived before the deadline.
    Timeout,
    /// The TCP stream ended or was reset without a close frame.
    Eof(String),
}

impl Event {
    /// The frame, or `None` for any other event.
    pub fn frame(self) -> Option<Frame> {
        match self {
            Event::Frame(f) => Some(f),
            _ => None,
        }
    }

    /// The close code, or `None` for any other event.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Event::Close { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The WebSocket part shared by agents and clients.
pub struct Ws {
    ws: WebSocket<TcpStream>,
    /// Headers of the 101 answer.
    pub response_headers: Vec<(String, String)>,
    closed: bool,
}

impl Ws {
    /// Reads the next frame within `timeout`, answering pings on the way.
    pub fn recv(&mut self, timeout: Duration) -> Event {
        if self.closed {
            return Event::Eof("connection already closed".into());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Event::Timeout;
            }
            let _ = self.ws.get_ref().set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let text = t.as_str().to_string();
                    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Event::Frame(Frame { text, value });
                }
                Ok(Message::Binary(b)) => return Event::Binary(b.to_vec()),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => continue,
                Ok(Message::Close(cf)) => {
                    self.closed = true;
                    // Drive the close reply; errors here do not change what we saw.
                    let _ = self.ws.flush();
                    return match cf {
                        Some(cf) => Event::Close { code: u16::from(cf.code), reason: cf.reason.to_string() },
                        None => Event::Close { code: 1005, reason: String::new() },
                    };
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => {
                    self.closed = true;
                    return Event::Eof(e.to_string());
                }
            }
        }
    }

    /// Sends one text frame as is.
    pub fn send_raw_text(&mut self, text: &str) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::text(text.to_string()))
    }

    /// Sends `text` as one text message split into `pieces` frames (a text frame, then
    /// continuation frames), each flushed on its own.
    pub fn send_fragmented_text(&mut self, text: &str, pieces: usize) -> Result<(), tungstenite::Error> {
        use tungstenite::protocol::frame::coding::{Data, OpCode};
        use tungstenite::protocol::frame::Frame as WsFrame;
        let bytes = text.as_bytes();
        let pieces = pieces.clamp(1, bytes.len().max(1));
        let step = bytes.len().div_ceil(pieces).max(1);
        let chunks: Vec<&[u8]> = bytes.chunks(step).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
            let frame = WsFrame::message(chunk.to_vec(), opcode, i + 1 == chunks.len());
            self.ws.send(Message::Frame(frame))?;
        }
        Ok(())
    }

    /// Sends one binary frame.
    pub fn send_binary(&mut self, bytes: &[u8]) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::binary(bytes.to_vec()))
    }

    /// Sends the protocol-level `{"type":"ping"}` (answered with `{"type":"pong"}`).
    pub fn ping(&mut self) -> Result<(), tungstenite::Error> {
        self.send_raw_text(r#"{"type":"ping"}"#)
    }

    /// Starts a normal close (1000).
    pub fn close(&mut self) {
        let _ = self.ws.close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        }));
        let _ = self.ws.flush();
    }

    /// The negotiated subprotocol of the 101 answer.
    pub fn subprotocol(&self) -> Option<&str> {
        self.response_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
            .map(|(_, v)| v.as_str())
    }

    /// The underlying socket (e.g. to shrink its receive buffer).
    pub fn tcp(&self) -> &TcpStream {
        self.ws.get_ref()
    }

    /// Reads raw frames from the socket without ever answering a ping, until a close frame,
    /// EOF or the deadline. Used to stand for a peer that never pongs. Bytes tungstenite has
    /// already buffered are not seen, so call it only when nothing but pings is pending.
    pub fn wait_close_without_answering(&mut self, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        let mut buf: Vec<u8> = Vec::new();
        let stream = self.ws.get_mut();
        loop {
            // Parse every complete frame in `buf`.
            while let Some((opcode, payload, used)) = parse_server_frame(&buf) {
                buf.drain(..used);
                if opcode == 0x8 {
                    self.closed = true;
                    return if payload.len() >= 2 {
                        Event::Close {
                            code: u16::from_be_bytes([payload[0], payload[1]]),
                            reason: String::from_utf8_lossy(&payload[2..]).into_owned(),
                        }
                    } else {
                        Event::Close { code: 1005, reason: String::new() }
                    };
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Event::Timeout;
            }
            let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    return Event::Eof("eof".into());
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed = true;
                    return Event::Eof(e.to_string());
                }
            }
        }
    }
}

/// Parses one unmasked server frame: (opcode, payload, bytes used).
fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut pos) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(m)
    } else {
        None
    };
    let mut payload = buf.get(pos..pos + len)?.to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((opcode, payload, pos + len))
}

/// Opens the TCP stream and runs the client handshake for `request`. A non-101 answer is
/// returned as [`ConnectError::Refused`] with its full body.
fn upgrade(
    addr: SocketAddr,
    request: tungstenite::handshake::client::Request,
) -> Result<(WebSocket<TcpStream>, Headers), ConnectError> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // The handshake owns a clone; the original is kept to read the rest of a refusal's body.
    let mut original = stream.try_clone()?;
    match tungstenite::client::client_with_config(request, stream, None) {
        Ok((ws, response)) => {
            let headers = header_pairs(response.headers());
            Ok((ws, headers))
        }
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let headers = header_pairs(response.headers());
            let mut body = response.body().clone().unwrap_or_default();
            let want = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if let Some(want) = want {
                let deadline = Instant::now() + Duration::from_secs(5);
                while body.len() < want && Instant::now() < deadline {
                    let mut chunk = [0u8; 4096];
                    match original.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                }
                body.truncate(want);
            }
            Err(ConnectError::Refused { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
        }
        Err(HandshakeError::Failure(e)) => Err(e.into()),
        Err(HandshakeError::Interrupted(_)) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out").into())
        }
    }
}

fn header_pairs(map: &tungstenite::http::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

fn add_header(
    req: &mut tungstenite::handshake::client::Request,
    name: &str,
    value: &str,
) -> Result<(), ConnectError> {
    let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let value = HeaderValue::from_bytes(value.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    req.headers_mut().append(name, value);
    Ok(())
}

/// Reads the first frame and checks it is a `welcome`.
fn read_welcome(ws: &mut Ws) -> Result<Frame, ConnectError> {
    match ws.recv(CONNECT_TIMEOUT) {
        Event::Frame(f) if f.ty() == "welcome" => Ok(f),
        other => Err(ConnectError::NoWelcome(format!("{other:?}"))),
    }
}

/// Knobs to craft a bad agent upgrade. Every `None` is filled in correctly.
#[derive(Debug, Default, Clone)]
pub struct UpgradeOverrides {
    /// Value of `X-Switchboard-Agent` (and in the signed string).
    pub agent_id: Option<String>,
    /// Value of `X-Switchboard-Timestamp` (and in the signed string).
    pub timestamp: Option<String>,
    /// Value of `X-Switchboard-Nonce` (and in the signed string).
    pub nonce: Option<String>,
    /// Value of `X-Switchboard-Signature`, instead of the correct one.
    pub signature: Option<String>,
    /// Headers to leave out, by name (e.g. "X-Switchboard-Nonce").
    pub omit_headers: Vec<String>,
    /// Headers to add.
    pub extra_headers: Vec<(String, String)>,
    /// Request path; default `/v1/agent`.
    pub path: Option<String>,
}

/// A live agent connection.
pub struct AgentConn {
    pub ws: Ws,
    pub cred: AgentCredential,
    /// The `welcome` frame.
    pub welcome: Frame,
    /// `conn` from the welcome, bound into every message signature.
    pub conn: String,
    /// The nonce this upgrade used.
    pub nonce: String,
    /// The `X-Switchboard-Signature` this upgrade sent (tests search logs for it).
    pub upgrade_signature: String,
    /// The last `ctr` this client signed and sent with [`AgentConn::send`].
    last_ctr: u64,
}

/// How a crafted `send` frame carries its `sig`.
#[derive(Debug, Clone)]
pub enum Sig {
    /// The correct signature for the frame's `ctr`, `to` and `data`.
    Correct,
    /// No `sig` field.
    Omit,
    /// A well-formed signature by the wrong key.
    Wrong,
    /// This exact string.
    Literal(String),
}

/// A hand-made agent `send`; nothing is filled in.
#[derive(Debug, Clone)]
pub struct CraftedSend<'a> {
    pub to: Option<&'a str>,
    /// Exact JSON text of `data`.
    pub data: &'a str,
    pub id: Option<&'a str>,
    /// `None` leaves `ctr` out.
    pub ctr: Option<u64>,
    pub sig: Sig,
}

impl AgentConn {
    /// Connects with a fresh nonce and the current timestamp.
    pub fn connect(addr: SocketAddr, cred: &AgentCredential) -> Result<AgentConn, ConnectError> {
        Self::connect_with(addr, cred, &UpgradeOverrides::default())
    }

    /// Connects with parts of the signed upgrade replaced.
    pub fn connect_with(
        addr: SocketAddr,
        cred: &AgentCredential,
        o: &UpgradeOverrides,
    ) -> Result<AgentConn, ConnectError> {
        let agent_id = o.agent_id.clone().unwrap_or_else(|| cred.agent_id().to_string());
        let timestamp = o.timestamp.clone().unwrap_or_else(|| unix_now().to_string());
        let nonce = o.nonce.clone().unwrap_or_else(new_nonce);
        let signature = o
            .signature
            .clone()
            .unwrap_or_else(|| cred.sign(&upgrade_signed_string(&agent_id, &timestamp, &nonce)));
        let path = o.path.as_deref().unwrap_or("/v1/agent");
        let mut req = format!("ws://{addr}{path}").into_client_request()?;
        for (name, value) in [
            ("X-Switchboard-Agent", &agent_id),
            ("X-Switchboard-Timestamp", &timestamp),
            ("X-Switchboard-Nonce", &nonce),
            ("X-Switchboard-Signature", &signature),
        ] {
            if !o.omit_headers.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                add_header(&mut req, name, value)?;
            }
        }
        for (k, v) in &o.extra_headers {
            add_header(&mut req, k, v)?;
        }
        let (ws, response_headers) = upgrade(addr, req)?;
        let mut ws = Ws { ws, response_headers, closed: false };
        let welcome = read_welcome(&mut ws)?;
        let conn = welcome.str("conn").to_string();
        Ok(AgentConn {
            ws,
            cred: cred.clone(),
            welcome,
            conn,
            nonce,
            upgrade_signature: signature,
            last_ctr: 0,
        })
    }

    /// The last counter value signed by [`AgentConn::send`].
    pub fn last_ctr(&self) -> u64 {
        self.last_ctr
    }

    /// Sets the counter that the next [`AgentConn::send`] continues from.
    pub fn set_last_ctr(&mut self, ctr: u64) {
        self.last_ctr = ctr;
    }

    /// The correct `sig` for a frame with these values on this connection.
    pub fn signature(&self, ctr: u64, to: Option<&str>, data: &str) -> String {
        self.cred.sign(&message_signed_string(&self.conn, ctr, to, data))
    }

    /// Signs `data` (serialized once, compactly) with the next counter and sends it.
    pub fn send(
        &mut self,
        to: Option<&str>,
        data: &Value,
        id: Option<&str>,
    ) -> Result<(), tungstenite::Error> {
        let text = serde_json::to_string(data).expect("json serializes");
        self.send_raw_data(to, &text, id)
    }

    /// Signs `data`, whose exact JSON text is given, with the next counter and sends it.
    pub fn send_raw_data(
        &mut self,
        to: Option<&str>,
        data: &str,
        id: Option<&str>,
    ) -> Result<(), tungstenite::Error> {
        let ctr = self.last_ctr + 1;
        self.last_ctr = ctr;
        self.send_crafted(&CraftedSend { to, data, id, ctr: Some(ctr), sig: Sig::Correct })
    }

    /// Builds the text of a crafted `send` frame.
    pub fn crafted_text(&self, c: &CraftedSend<'_>) -> String {
        let mut f = String::from(r#"{"type":"send""#);
        if let Some(to) = c.to {
            f.push_str(&format!(r#","to":{}"#, json_str(to)));
        }
        f.push_str(r#","data":"#);
        f.push_str(c.data);
        if let Some(id) = c.id {
            f.push_str(&format!(r#","id":{}"#, json_str(id)));
        }
        if let Some(ctr) = c.ctr {
            f.push_str(&format!(r#","ctr":{ctr}"#));
        }
        let sig = match &c.sig {
            Sig::Correct => Some(self.signature(c.ctr.unwrap_or(0), c.to, c.data)),
            Sig::Omit => None,
            Sig::Wrong => {
                let other = AgentCredential::Hmac {
                    agent_id: self.cred.agent_id().to_string(),
                    secret: "sbk_not_the_right_secret".into(),
                };
                Some(other.sign(&message_signed_string(&self.conn, c.ctr.unwrap_or(0), c.to, c.data)))
            }
            Sig::Literal(s) => Some(s.clone()),
        };
        if let Some(sig) = sig {
            f.push_str(&format!(r#","sig":{}"#, json_str(&sig)));
        }
        f.push('}');
        f
    }

    /// Sends a crafted `send` frame; the counter of [`AgentConn::send`] is not touched.
    pub fn send_crafted(&mut self, c: &CraftedSend<'_>) -> Result<(), tungstenite::Error> {
        let text = self.crafted_text(c);
        self.ws.send_raw_text(&text)
    }

    /// Sends a text frame as is.
    pub fn send_raw_text(&mut self, text: &str) -> Result<(), tungstenite::Error> {
        self.ws.send_raw_text(text)
    }

    /// See [`Ws::recv`].
    pub fn recv(&mut self, timeout: Duration) -> Event {
        self.ws.recv(timeout)
    }
}

/// Where a client puts its JWT (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPlace {
    /// `Authorization: Bearer <jwt>`
    Header,
    /// `Sec-WebSocket-Protocol: switchboard.v1, bearer.<jwt>`
    Subprotocol,
    /// `?access_token=<jwt>`
    Query,
}

/// Everything a client upgrade can carry besides its token.
#[derive(Debug, Default, Clone)]
pub struct ClientOpts {
    /// `agent=<id>` binds the session to one agent.
    pub agent: Option<String>,
    /// Appended to the query string as is (without a leading `&`).
    pub extra_query: Option<String>,
    pub extra_headers: Vec<(String, String)>,
    /// Offer `switchboard.v1` even when the token is not in the subprotocol header.
    pub offer_subprotocol: bool,
    /// Tokens to put in the other places too (to test precedence).
    pub also: Vec<(TokenPlace, String)>,
}

/// A live client connection (a session).
pub struct ClientConn {
    pub ws: Ws,
    /// The `welcome` frame.
    pub welcome: Frame,
    /// `session` from the welcome.
    pub session: String,
}

/// Percent-encodes a query value (JWTs and ids are already safe; this guards the rest).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl ClientConn {
    /// Connects with `token` in `place`, optionally bound to `agent`.
    pub fn connect(
        addr: SocketAddr,
        token: &str,
        place: TokenPlace,
        agent: Option<&str>,
    ) -> Result<ClientConn, ConnectError> {
        let opts = ClientOpts { agent: agent.map(str::to_string), ..ClientOpts::default() };
        Self::connect_with(addr, Some((place, token)), &opts)
    }

    /// Connects with every option; `token` may be left out entirely.
    pub fn connect_with(
        addr: SocketAddr,
        token: Option<(TokenPlace, &str)>,
        opts: &ClientOpts,
    ) -> Result<ClientConn, ConnectError> {
        let mut places: Vec<(TokenPlace, String)> =
            token.map(|(p, t)| vec![(p, t.to_string())]).unwrap_or_default();
        places.extend(opts.also.iter().cloned());
        let mut query: Vec<String> = Vec::new();
        if let Some(agent) = &opts.agent {
            query.push(format!("agent={}", query_escape(agent)));
        }
        let mut protocols: Vec<String> = Vec::new();
        if opts.offer_subprotocol {
            protocols.push(SUBPROTOCOL.to_string());
        }
        let mut auth_header = None;
        for (place, tok) in &places {
            match place {
                TokenPlace::Header => auth_header = Some(format!("Bearer {tok}")),
                TokenPlace::Subprotocol => {
                    if !protocols.iter().any(|p| p == SUBPROTOCOL) {
                        protocols.push(SUBPROTOCOL.to_string());
                    }
                    protocols.push(format!("bearer.{tok}"));
                }
                TokenPlace::Query => query.push(format!("access_token={}", query_escape(tok))),
            }
        }
        if let Some(extra) = &opts.extra_query {
            query.push(extra.clone());
        }
        let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        let mut req = format!("ws://{addr}/v1/client{q}").into_client_request()?;
        if let Some(h) = auth_header {
            add_header(&mut req, "Authorization", &h)?;
        }
        if !protocols.is_empty() {
            add_header(&mut req, "Sec-WebSocket-Protocol", &protocols.join(", "))?;
        }
        for (k, v) in &opts.extra_headers {
            add_header(&mut req, k, v)?;
        }
        let (ws, response_headers) = upgrade(addr, req)?;
        let mut ws = Ws { ws, response_headers, closed: false };
        let welcome = read_welcome(&mut ws)?;
        let session = welcome.str("session").to_string();
        Ok(ClientConn { ws, welcome, session })
    }

    /// Sends `{"type":"send","to":..,"data":..,"id":..}`.
    pub fn send(
        &mut self,
        to: Option<&str>,
        data: &Value,
        id: Option<&str>,
    ) -> Result<(), tungstenite::Error> {
        let text = serde_json::to_string(data).expect("json serializes");
        self.send_raw_data(to, &text, id)
    }

    /// Like [`ClientConn::send`] with the exact JSON text of `data`.
    pub fn send_raw_data(
        &mut self,
        to: Option<&str>,
        data: &str,
        id: Option<&str>,
    ) -> Result<(), tungstenite::Error> {
        let mut f = String::from(r#"{"type":"send""#);
        if let Some(to) = to {
            f.push_str(&format!(r#","to":{}"#, json_str(to)));
        }
        f.push_str(r#","data":"#);
        f.push_str(data);
        if let Some(id) = id {
            f.push_str(&format!(r#","id":{}"#, json_str(id)));
        }
        f.push('}');
        self.ws.send_raw_text(&f)
    }

    /// Sends `{"type":"refresh","token":..}`.
    pub fn refresh(&mut self, token: &str) -> Result<(), tungstenite::Error> {
        self.ws.send_raw_text(&format!(r#"{{"type":"refresh","token":{}}}"#, json_str(token)))
    }

    /// Sends a text frame as is.
    pub fn send_raw_text(&mut self, text: &str) -> Result<(), tungstenite::Error> {
        self.ws.send_raw_text(text)
    }

    /// See [`Ws::recv`].
    pub fn recv(&mut self, timeout: Duration) -> Event {
        self.ws.recv(timeout)
    }
}

/// A plain HTTP answer read by [`raw_http`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    /// A header value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Why [`raw_http`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RawHttpError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The connection ended (or was reset) before a complete response head arrived.
    #[error("closed without an answer ({received} bytes received)")]
    NoAnswer { received: usize },
    #[error("no answer within the timeout ({received} bytes received)")]
    Timeout { received: usize },
    #[error("unparsable response: {0}")]
    Parse(String),
}

/// Sends `request` as is on a new connection and reads one response (head, then a body of
/// `Content-Length` bytes or up to EOF) within 10 s.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, RawHttpError> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // A refusal may close the socket before all of a large request is written; the answer
    // can still be read.
    let _ = s.write_all(request);
    read_http_response(&mut s, Duration::from_secs(10))
}

/// Reads one HTTP response from `s` within `timeout`.
pub fn read_http_response(s: &mut TcpStream, timeout: Duration) -> Result<RawResponse, RawHttpError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut head: Option<(u16, Headers, usize)> = None;
    loop {
        if head.is_none() {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    head = Some((r.code.unwrap_or(0), headers, n));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    return Err(RawHttpError::Parse(format!("{e}: {:?}", String::from_utf8_lossy(&buf))))
                }
            }
        }
        if let Some((status, headers, n)) = &head {
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if let Some(len) = len {
                if buf.len() >= n + len {
                    let body = String::from_utf8_lossy(&buf[*n..n + len]).into_owned();
                    return Ok(RawResponse { status: *status, headers: headers.clone(), body });
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RawHttpError::Timeout { received: buf.len() });
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 8192];
        let got = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if got == 0 {
            return match head {
                Some((status, headers, n)) => {
                    let body = String::from_utf8_lossy(&buf[n..]).into_owned();
                    Ok(RawResponse { status, headers, body })
                }
                None => Err(RawHttpError::NoAnswer { received: buf.len() }),
            };
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_strings_match_the_spec_layout() {
        assert_eq!(upgrade_signed_string("a1", "1700000000", "n"), "switchboard-agent-v1\na1\n1700000000\nn");
        assert_eq!(message_signed_string("c", 7, None, "{}"), "switchboard-msg-v1\nc\n7\n\n{}");
        assert_eq!(message_signed_string("c", 7, Some("s"), "1"), "switchboard-msg-v1\nc\n7\ns\n1");
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let cred = AgentCredential::Hmac { agent_id: "x".into(), secret: "Jefe".into() };
        let sig = cred.sign_bytes(b"what do ya want for nothing?");
        let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn ed25519_matches_rfc8032_test_1() {
        let seed: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"[2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        let kp = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let cred = AgentCredential::Ed25519 { agent_id: "x".into(), keypair: Arc::new(kp) };
        let hex: String = cred.sign_bytes(b"").iter().map(|b| format!("{b:02x}")).collect();
        assert!(hex.starts_with("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"), "{hex}");
    }

    #[test]
    fn nonces_fit_the_spec_alphabet() {
        let n = new_nonce();
        assert!((16..=64).contains(&n.len()));
        assert!(n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn raw_data_keeps_exact_bytes() {
        let text = r#"{"type":"message","from":"a","data":{ "x" : [1, 2.50] }}"#;
        let f = Frame { text: text.into(), value: serde_json::from_str(text).unwrap() };
        assert_eq!(f.raw_data().unwrap(), r#"{ "x" : [1, 2.50] }"#);
    }

    fn listener() -> (std::net::TcpListener, SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[test]
    fn a_refusal_carries_status_headers_and_the_whole_body() {
        let (l, addr) = listener();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 28\r\n\r\n{\"error\":")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b"\"upgrade_required\"}").unwrap();
        });
        let cred = AgentCredential::Hmac { agent_id: "a".into(), secret: "sbk_x".into() };
        let e = AgentConn::connect(addr, &cred).err().unwrap();
        assert_eq!(e.status(), Some(426));
        assert_eq!(e.header("sec-websocket-version"), Some("13"));
        assert_eq!(e.body_json(), Some(serde_json::json!({"error": "upgrade_required"})));
    }

    #[test]
    fn pings_are_answered_and_the_close_code_is_reported() {
        let (l, addr) = listener();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut ws = tungstenite::accept(s).unwrap();
            ws.send(Message::text(r#"{"type":"welcome","session":"s1","user":"u","agents":[]}"#)).unwrap();
            ws.send(Message::Ping(vec![1].into())).unwrap();
            let got = ws.read().unwrap();
            ws.send(Message::Close(Some(tungstenite::protocol::CloseFrame {
                code: 4009u16.into(),
                reason: "replaced".into(),
            })))
            .unwrap();
            got
        });
        let mut c = ClientConn::connect(addr, "tok", TokenPlace::Query, Some("a1")).unwrap();
        assert_eq!(c.session, "s1");
        match c.recv(Duration::from_secs(5)) {
            Event::Close { code, reason } => assert_eq!((code, reason.as_str()), (4009, "replaced")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(server.join().unwrap(), Message::Pong(_)));
    }

    #[test]
    fn server_frames_parse() {
        assert_eq!(parse_server_frame(&[0x88, 2, 0x03, 0xF3]), Some((8, vec![0x03, 0xF3], 4)));
        assert_eq!(parse_server_frame(&[0x89, 0]), Some((9, vec![], 2)));
        assert_eq!(parse_server_frame(&[0x81, 5, b'a']), None);
    }
}
