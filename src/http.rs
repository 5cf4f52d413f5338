//! The public listener's HTTP/1.1 request head, and every response the relay writes before
//! (or instead of) a WebSocket upgrade. Pure: no I/O, no clock, no logging.
//!
//! Owns:
//! - [`parse_request`]: the head (through CRLFCRLF) into an owned [`Request`] of the facts the
//!   handshake needs; incomplete input is `Ok(None)`, never more than `max_head_bytes` of the
//!   buffer is looked at.
//! - [`check_upgrade`]: the method/path/upgrade-header rows of protocol §2, in the spec's order.
//! - [`Refusal`]: every refusal status with its static, allocation-free response bytes.
//! - [`healthz_response`] and [`switching_protocols`].
//!
//! What must stay true:
//! - Nothing here panics on any input: it faces the internet (indexing is bounds-checked by
//!   construction, no `unwrap` on input-derived values).
//! - Credentials (JWTs, agent signatures) are never printed: [`Request`]'s `Debug` redacts
//!   them, responses never echo them, `bearer.*` is never answered as a subprotocol.
//! - Every `Content-Length` matches its body (a test checks each static response).

use std::fmt;

use base64::Engine as _;

/// Most header lines accepted in one request head; more is answered 431.
pub const MAX_HEADERS: usize = 64;

/// The only WebSocket subprotocol the relay speaks (protocol §3.3).
pub const SUBPROTOCOL: &str = "switchboard.v1";

/// Which public endpoint a request's path (without its query) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/agent`
    Agent,
    /// `/v1/client`
    Client,
    /// `/healthz`
    Healthz,
    /// `/v1/echo`: a WebSocket echo for conformance testing, only when
    /// `server.echo_endpoint` is on (404 otherwise).
    Echo,
    /// anything else
    Other,
}

/// The facts of one request head the handshake needs. Owned (the handshake is not the hot path).
///
/// Single-valued headers take their first occurrence, except `Sec-WebSocket-Key` and
/// `Sec-WebSocket-Version`, which RFC 6455 allows once: repeated, they read as `None` (and so
/// are refused). Token-list headers (`Upgrade`, `Connection`, `Sec-WebSocket-Protocol`) are
/// merged across all their lines. Empty credentials count as absent.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head including the final CRLFCRLF; what follows belongs to the WebSocket.
    pub head_len: usize,
    pub method_is_get: bool,
    /// `HTTP/1.1` (RFC 6455 needs it for an upgrade); `false` for `HTTP/1.0`.
    pub version_1_1: bool,
    pub endpoint: Endpoint,
    /// Query parameters of interest, percent-decoded (`+` as space), first occurrence.
    pub access_token: Option<String>,
    pub agent: Option<String>,
    pub since: Option<String>,
    pub epoch: Option<String>,
    pub resume: Option<String>,
    /// `Upgrade` carries the token `websocket` (case-insensitive).
    pub upgrade_websocket: bool,
    /// `Connection` carries the token `upgrade` (case-insensitive).
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Protocol` offered at least one (non-empty) entry.
    pub protocols_offered: bool,
    pub offers_switchboard_v1: bool,
    /// `<jwt>` of the first `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`.
    pub bearer_from_protocol: Option<String>,
    /// `<jwt>` of `Authorization: Bearer <jwt>` (scheme case-insensitive).
    pub bearer_from_authorization: Option<String>,
    /// `X-Switchboard-Agent`, `-Timestamp`, `-Nonce`, `-Signature` (protocol §3.1).
    pub x_agent: Option<String>,
    pub x_timestamp: Option<String>,
    pub x_nonce: Option<String>,
    pub x_signature: Option<String>,
}

impl Request {
    /// The client's JWT, first match wins (protocol §3.3): `Authorization: Bearer`, then the
    /// `bearer.` subprotocol entry, then the `access_token` query parameter.
    pub fn client_token(&self) -> Option<&str> {
        self.bearer_from_authorization
            .as_deref()
            .or(self.bearer_from_protocol.as_deref())
            .or(self.access_token.as_deref())
    }
}

/// Prints presence, never the value, of anything that is a credential.
struct Redacted<'a>(&'a Option<String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("Some(<redacted>)"),
            None => f.write_str("None"),
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("head_len", &self.head_len)
            .field("method_is_get", &self.method_is_get)
            .field("version_1_1", &self.version_1_1)
            .field("endpoint", &self.endpoint)
            .field("access_token", &Redacted(&self.access_token))
            .field("agent", &self.agent)
            .field("since", &self.since)
            .field("epoch", &self.epoch)
            .field("resume", &self.resume)
            .field("upgrade_websocket", &self.upgrade_websocket)
            .field("connection_upgrade", &self.connection_upgrade)
            .field("ws_key", &self.ws_key)
            .field("ws_version", &self.ws_version)
            .field("protocols_offered", &self.protocols_offered)
            .field("offers_switchboard_v1", &self.offers_switchboard_v1)
            .field("bearer_from_protocol", &Redacted(&self.bearer_from_protocol))
            .field("bearer_from_authorization", &Redacted(&self.bearer_from_authorization))
            .field("x_agent", &self.x_agent)
            .field("x_timestamp", &self.x_timestamp)
            .field("x_nonce", &self.x_nonce)
            .field("x_signature", &Redacted(&self.x_signature))
            .finish()
    }
}

/// Parses the request head at the start of `buf`.
///
/// - `Ok(Some(req))`: a complete head of at most `max_head_bytes` bytes (`req.head_len`).
/// - `Ok(None)`: incomplete, and more bytes could still fit under the limit.
/// - `Err(HeadersTooLarge)`: the head is longer than `max_head_bytes` (complete or not), or it
///   has more than [`MAX_HEADERS`] header lines.
/// - `Err(BadRequest)`: not HTTP/1.x within the first `max_head_bytes` bytes.
///
/// Only `buf[..max_head_bytes]` is ever parsed, so work per call is bounded by the limit.
pub fn parse_request(buf: &[u8], max_head_bytes: usize) -> Result<Option<Request>, Refusal> {
    let window = &buf[..buf.len().min(max_head_bytes)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        // A partial head that already fills the window can only end past the limit.
        Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => return Err(Refusal::HeadersTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(_) => return Err(Refusal::BadRequest),
    };
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(Refusal::BadRequest);
    };

    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let endpoint = match path {
        "/v1/agent" => Endpoint::Agent,
        "/v1/client" => Endpoint::Client,
        "/healthz" => Endpoint::Healthz,
        "/v1/echo" => Endpoint::Echo,
        _ => Endpoint::Other,
    };

    let mut req = Request {
        head_len,
        method_is_get: method == "GET",
        version_1_1: version == 1,
        endpoint,
        access_token: None,
        agent: None,
        since: None,
        epoch: None,
        resume: None,
        upgrade_websocket: false,
        connection_upgrade: false,
        ws_key: None,
        ws_version: None,
        protocols_offered: false,
        offers_switchboard_v1: false,
        bearer_from_protocol: None,
        bearer_from_authorization: None,
        x_agent: None,
        x_timestamp: None,
        x_nonce: None,
        x_signature: None,
    };
    parse_query(query, &mut req);

    let mut key_count = 0u32;
    let mut version_count = 0u32;
    let mut authorization_seen = false;
    for h in parsed.headers.iter() {
        // Header values that are not UTF-8 (obs-text) are treated as absent.
        let Ok(value) = std::str::from_utf8(h.value) else { continue };
        let value = value.trim_matches(is_ows);
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            req.upgrade_websocket |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            req.connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key_count += 1;
            req.ws_key = (key_count == 1).then(|| value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version_count += 1;
            req.ws_version = (version_count == 1).then(|| value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for t in tokens(value) {
                req.protocols_offered = true;
                if t == SUBPROTOCOL {
                    req.offers_switchboard_v1 = true;
                } else if let Some(jwt) = t.strip_prefix("bearer.") {
                    if req.bearer_from_protocol.is_none() && !jwt.is_empty() {
                        req.bearer_from_protocol = Some(jwt.to_owned());
                    }
                }
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            if !authorization_seen {
                authorization_seen = true;
                req.bearer_from_authorization = bearer_credential(value).map(str::to_owned);
            }
        } else if name.eq_ignore_ascii_case("x-switchboard-agent") {
            first(&mut req.x_agent, value);
        } else if name.eq_ignore_ascii_case("x-switchboard-timestamp") {
            first(&mut req.x_timestamp, value);
        } else if name.eq_ignore_ascii_case("x-switchboard-nonce") {
            first(&mut req.x_nonce, value);
        } else if name.eq_ignore_ascii_case("x-switchboard-signature") {
            first(&mut req.x_signature, value);
        }
    }
    Ok(Some(req))
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// The non-empty, trimmed entries of a comma-separated header value.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|t| t.trim_matches(is_ows)).filter(|t| !t.is_empty())
}

fn first(slot: &mut Option<String>, value: &str) {
    if slot.is_none() {
        *slot = Some(value.to_owned());
    }
}

/// `Bearer <credential>` with the scheme compared case-insensitively; empty credential = none.
fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let cred = rest.trim_matches(is_ows);
    (!cred.is_empty()).then_some(cred)
}

fn parse_query(query: &str, req: &mut Request) {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // An empty access_token is no token at all; other parameters keep "" as given.
        let (slot, empty_is_none) = match percent_decode(key).as_str() {
            "access_token" => (&mut req.access_token, true),
            "agent" => (&mut req.agent, false),
            "since" => (&mut req.since, false),
            "epoch" => (&mut req.epoch, false),
            "resume" => (&mut req.resume, false),
            _ => continue,
        };
        if slot.is_none() {
            let decoded = percent_decode(value);
            if !(empty_is_none && decoded.is_empty()) {
                *slot = Some(decoded);
            }
        }
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a `%` not
/// followed by two hex digits stays literal (as WHATWG URL parsing does). Bytes that do not
/// form UTF-8 become U+FFFD, which never matches a relay id, token or number.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
        return s.to_owned();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_val);
                let lo = bytes.get(i + 2).copied().and_then(hex_val);
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `Sec-WebSocket-Key` must be the base64 of exactly 16 bytes (RFC 6455 §4.2.1).
fn valid_ws_key(key: &str) -> bool {
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|k| k.len() == 16)
}

/// The method, path and upgrade-header rows of protocol §2, in the spec's order:
/// not GET → 405; not `/v1/agent` or `/v1/client` → 404 (the caller answers `GET /healthz`
/// itself before calling this; should it not, `/healthz` is no WebSocket endpoint → 404);
/// no `Upgrade: websocket` → 426; `Sec-WebSocket-Version` missing or not `13` → 426;
/// not HTTP/1.1, no `upgrade` in `Connection`, `Sec-WebSocket-Key` missing or not the base64
/// of 16 bytes → 400; subprotocols offered without `switchboard.v1` → 400.
pub fn check_upgrade(req: &Request) -> Result<(), Refusal> {
    if !req.method_is_get {
        return Err(Refusal::MethodNotAllowed);
    }
    if !matches!(req.endpoint, Endpoint::Agent | Endpoint::Client | Endpoint::Echo) {
        return Err(Refusal::NotFound);
    }
    if !req.upgrade_websocket || req.ws_version.as_deref() != Some("13") {
        return Err(Refusal::UpgradeRequired);
    }
    if !req.version_1_1 || !req.connection_upgrade || !req.ws_key.as_deref().is_some_and(valid_ws_key) {
        return Err(Refusal::BadRequest);
    }
    if req.protocols_offered && !req.offers_switchboard_v1 {
        return Err(Refusal::BadRequest);
    }
    Ok(())
}

/// Why an upgrade (or any public HTTP request) is refused; each maps to one row of §2's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    UpgradeRequired,
    TooManyRequests,
    HeadersTooLarge,
    Unavailable,
}

/// A complete refusal: status line, JSON headers, `Connection: close`, `{"error":"<code>"}`.
/// `$len` is the body length, `12 + code.len()`; a test checks every one.
macro_rules! refusal_bytes {
    ($status:literal, $reason:literal, $code:literal, $len:literal, $extra:literal) => {
        concat!(
            "HTTP/1.1 ",
            $status,
            " ",
            $reason,
            "\r\nContent-Type: application/json\r\nContent-Length: ",
            $len,
            "\r\nConnection: close\r\n",
            $extra,
            "\r\n{\"error\":\"",
            $code,
            "\"}"
        )
        .as_bytes()
    };
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::BadRequest,
        Refusal::Unauthorized,
        Refusal::Forbidden,
        Refusal::NotFound,
        Refusal::MethodNotAllowed,
        Refusal::UpgradeRequired,
        Refusal::TooManyRequests,
        Refusal::HeadersTooLarge,
        Refusal::Unavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::Unauthorized => 401,
            Refusal::Forbidden => 403,
            Refusal::NotFound => 404,
            Refusal::MethodNotAllowed => 405,
            Refusal::UpgradeRequired => 426,
            Refusal::TooManyRequests => 429,
            Refusal::HeadersTooLarge => 431,
            Refusal::Unavailable => 503,
        }
    }

    /// The `error` string of the response body (protocol §2); also a fine metric label.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::UpgradeRequired => "upgrade_required",
            Refusal::TooManyRequests => "too_many_requests",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::Unavailable => "unavailable",
        }
    }

    /// The HTTP reason phrase, for the status line and for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadRequest => "Bad Request",
            Refusal::Unauthorized => "Unauthorized",
            Refusal::Forbidden => "Forbidden",
            Refusal::NotFound => "Not Found",
            Refusal::MethodNotAllowed => "Method Not Allowed",
            Refusal::UpgradeRequired => "Upgrade Required",
            Refusal::TooManyRequests => "Too Many Requests",
            Refusal::HeadersTooLarge => "Request Header Fields Too Large",
            Refusal::Unavailable => "Service Unavailable",
        }
    }

    /// The complete HTTP/1.1 response, static (no allocation). 405 carries `Allow: GET`
    /// (RFC 9110), 426 carries `Sec-WebSocket-Version: 13` (RFC 6455).
    pub fn response(self) -> &'static [u8] {
        match self {
            Refusal::BadRequest => refusal_bytes!("400", "Bad Request", "bad_request", "23", ""),
            Refusal::Unauthorized => {
                refusal_bytes!("401", "Unauthorized", "unauthorized", "24", "")
            }
            Refusal::Forbidden => refusal_bytes!("403", "Forbidden", "forbidden", "21", ""),
            Refusal::NotFound => refusal_bytes!("404", "Not Found", "not_found", "21", ""),
            Refusal::MethodNotAllowed => {
                refusal_bytes!("405", "Method Not Allowed", "method_not_allowed", "30", "Allow: GET\r\n")
            }
            Refusal::UpgradeRequired => refusal_bytes!(
                "426",
                "Upgrade Required",
                "upgrade_required",
                "28",
                "Sec-WebSocket-Version: 13\r\n"
            ),
            Refusal::TooManyRequests => {
                refusal_bytes!("429", "Too Many Requests", "too_many_requests", "29", "")
            }
            Refusal::HeadersTooLarge => {
                refusal_bytes!("431", "Request Header Fields Too Large", "headers_too_large", "29", "")
            }
            Refusal::Unavailable => {
                refusal_bytes!("503", "Service Unavailable", "unavailable", "23", "")
            }
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.code())
    }
}

impl std::error::Error for Refusal {}

const HEALTHZ_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
Content-Length: 15\r\nConnection: close\r\n\r\n{\"status\":\"ok\"}";
const HEALTHZ_DRAINING: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\nContent-Length: 21\r\nConnection: close\r\n\r\n\
{\"status\":\"draining\"}";

/// `GET /healthz` on the public listener: 200 `{"status":"ok"}`, or 503
/// `{"status":"draining"}` while shutting down. Static, no allocation.
pub fn healthz_response(draining: bool) -> &'static [u8] {
    if draining {
        HEALTHZ_DRAINING
    } else {
        HEALTHZ_OK
    }
}

/// The 101 answer to an accepted upgrade. `ws_key` is the request's `Sec-WebSocket-Key`
/// (as in [`Request::ws_key`]); `with_subprotocol` adds `Sec-WebSocket-Protocol:
/// switchboard.v1` (pass [`Request::offers_switchboard_v1`]). A `bearer.*` entry is never
/// echoed.
pub fn switching_protocols(ws_key: &str, with_subprotocol: bool) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if with_subprotocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: switchboard.v1\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn parse(s: &str) -> Request {
        match parse_request(s.as_bytes(), 8192) {
            Ok(Some(r)) => r,
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn check(s: &str) -> Result<(), Refusal> {
        check_upgrade(&parse(s))
    }

    #[test]
    fn valid_agent_upgrade() {
        let s = upgrade(
            "/v1/agent",
            "X-Switchboard-Agent: ag_1\r\nX-Switchboard-Timestamp: 1700000000\r\n\
X-Switchboard-Nonce: abcdefghijklmnop\r\nX-Switchboard-Signature: c2ln\r\n",
        );
        let r = parse(&s);
        assert_eq!(r.head_len, s.len());
        assert!(r.method_is_get && r.version_1_1);
        assert_eq!(r.endpoint, Endpoint::Agent);
        assert!(r.upgrade_websocket && r.connection_upgrade);
        assert_eq!(r.ws_key.as_deref(), Some(KEY));
        assert_eq!(r.ws_version.as_deref(), Some("13"));
        assert!(!r.protocols_offered && !r.offers_switchboard_v1);
        assert_eq!(r.x_agent.as_deref(), Some("ag_1"));
        assert_eq!(r.x_timestamp.as_deref(), Some("1700000000"));
        assert_eq!(r.x_nonce.as_deref(), Some("abcdefghijklmnop"));
        assert_eq!(r.x_signature.as_deref(), Some("c2ln"));
        assert_eq!(r.client_token(), None);
        assert_eq!(check_upgrade(&r), Ok(()));
    }

    #[test]
    fn endpoints_ignore_query() {
        assert_eq!(parse(&upgrade("/v1/client?agent=a", "")).endpoint, Endpoint::Client);
        assert_eq!(parse(&upgrade("/v1/agent?", "")).endpoint, Endpoint::Agent);
        assert_eq!(parse(&upgrade("/healthz?x=1", "")).endpoint, Endpoint::Healthz);
        for p in ["/", "/v1/agent/", "/v1/Agent", "/v1/clients", "*", "http://h/v1/agent"] {
            assert_eq!(parse(&upgrade(p, "")).endpoint, Endpoint::Other, "{p}");
        }
    }

    #[test]
    fn pipelined_bytes_after_head_are_not_head() {
        let s = upgrade("/v1/agent", "");
        let mut buf = s.clone().into_bytes();
        buf.extend_from_slice(b"\x81\x05hello");
        assert_eq!(parse_request(&buf, 8192).unwrap().unwrap().head_len, s.len());
    }

    #[test]
    fn partial_input_at_every_byte_boundary() {
        let s = upgrade("/v1/client?access_token=abc", "Sec-WebSocket-Protocol: switchboard.v1\r\n");
        let bytes = s.as_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(parse_request(&bytes[..cut], 8192), Ok(None), "cut at {cut}");
        }
        assert!(parse_request(bytes, 8192).unwrap().is_some());
    }

    #[test]
    fn head_size_limit() {
        let s = upgrade("/v1/agent", "");
        let n = s.len();
        // Complete and exactly at the limit: fine.
        assert!(parse_request(s.as_bytes(), n).unwrap().is_some());
        // Complete but one byte over: 431.
        assert_eq!(parse_request(s.as_bytes(), n - 1), Err(Refusal::HeadersTooLarge));
        // Incomplete and already filling the limit: 431.
        let partial = &s.as_bytes()[..n - 1];
        assert_eq!(parse_request(partial, n - 1), Err(Refusal::HeadersTooLarge));
        assert_eq!(parse_request(partial, 10), Err(Refusal::HeadersTooLarge));
        // Incomplete and under the limit: need more.
        assert_eq!(parse_request(partial, n), Ok(None));
        // A huge header line, never terminated.
        let mut big = b"GET /v1/agent HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(10_000, b'a');
        assert_eq!(parse_request(&big, 8192), Err(Refusal::HeadersTooLarge));
        assert_eq!(parse_request(&big[..8191], 8192), Ok(None));
        // Zero limit refuses everything, even empty input.
        assert_eq!(parse_request(b"", 0), Err(Refusal::HeadersTooLarge));
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut extra = String::new();
        for i in 0..MAX_HEADERS {
            extra.push_str(&format!("X-H{i}: v\r\n"));
        }
        let s = upgrade("/v1/agent", &extra);
        assert_eq!(parse_request(s.as_bytes(), 1 << 20), Err(Refusal::HeadersTooLarge));
        // Exactly MAX_HEADERS is fine.
        let mut s = String::from("GET /v1/agent HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS {
            s.push_str(&format!("X-H{i}: v\r\n"));
        }
        s.push_str("\r\n");
        assert!(parse_request(s.as_bytes(), 1 << 20).unwrap().is_some());
    }

    #[test]
    fn garbage_is_400_or_incomplete_never_a_panic() {
        for g in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / FOO\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"\x00\x00\x00\x00",
            b"G\xffT / HTTP/1.1\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_request(g, 8192), Err(Refusal::BadRequest), "{:?}", g);
        }
        // Pseudo-random bytes: anything but a panic.
        let mut x: u32 = 0x1234_5678;
        for len in 0..600 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = parse_request(&buf, 512);
            let mut framed = b"GET /v1/client?".to_vec();
            framed.extend(buf.iter().map(|b| if *b == b'\r' || *b == b'\n' { b'%' } else { *b }));
            framed.extend_from_slice(b" HTTP/1.1\r\nSec-WebSocket-Protocol: ");
            framed.extend(buf.iter().rev().filter(|b| b.is_ascii_graphic() || **b == b' '));
            framed.extend_from_slice(b"\r\n\r\n");
            if let Ok(Some(r)) = parse_request(&framed, 8192) {
                let _ = check_upgrade(&r);
                let _ = r.client_token();
                let _ = format!("{r:?}");
            }
        }
    }

    #[test]
    fn refusal_rows_in_spec_order() {
        // 405: not GET, on any path (including /healthz), before the path check.
        let post = upgrade("/v1/agent", "").replacen("GET", "POST", 1);
        assert_eq!(check(&post), Err(Refusal::MethodNotAllowed));
        let post_health = "POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check(post_health), Err(Refusal::MethodNotAllowed));
        let put_unknown = "PUT /nope HTTP/1.1\r\n\r\n";
        assert_eq!(check(put_unknown), Err(Refusal::MethodNotAllowed));
        // 404: unknown path, even without any upgrade headers.
        assert_eq!(check("GET /nope HTTP/1.1\r\n\r\n"), Err(Refusal::NotFound));
        assert_eq!(check(&upgrade("/v1/agents", "")), Err(Refusal::NotFound));
        assert_eq!(check("GET /healthz HTTP/1.1\r\n\r\n"), Err(Refusal::NotFound));
        // 426: a plain GET on a WebSocket endpoint.
        assert_eq!(check("GET /v1/client HTTP/1.1\r\n\r\n"), Err(Refusal::UpgradeRequired));
        let no_upgrade = upgrade("/v1/agent", "").replace("Upgrade: websocket\r\n", "");
        assert_eq!(check(&no_upgrade), Err(Refusal::UpgradeRequired));
        let other_upgrade = upgrade("/v1/agent", "").replace("websocket", "h2c");
        assert_eq!(check(&other_upgrade), Err(Refusal::UpgradeRequired));
        // 426: version missing or unsupported (checked before Connection/Key).
        let no_version = upgrade("/v1/agent", "").replace("Sec-WebSocket-Version: 13\r\n", "");
        assert_eq!(check(&no_version), Err(Refusal::UpgradeRequired));
        let v8 = upgrade("/v1/agent", "").replace("Version: 13", "Version: 8");
        assert_eq!(check(&v8), Err(Refusal::UpgradeRequired));
        let v_twice = upgrade("/v1/agent", "Sec-WebSocket-Version: 13\r\n");
        assert_eq!(check(&v_twice), Err(Refusal::UpgradeRequired));
        let v_bad_and_no_key = no_version
            .replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "")
            .replace("Connection: Upgrade\r\n", "");
        assert_eq!(check(&v_bad_and_no_key), Err(Refusal::UpgradeRequired));
        // 400: Connection without upgrade.
        let conn_ka = upgrade("/v1/agent", "").replace("Connection: Upgrade", "Connection: keep-alive");
        assert_eq!(check(&conn_ka), Err(Refusal::BadRequest));
        let no_conn = upgrade("/v1/agent", "").replace("Connection: Upgrade\r\n", "");
        assert_eq!(check(&no_conn), Err(Refusal::BadRequest));
        // 400: key missing, not base64, wrong length, repeated.
        let no_key = upgrade("/v1/agent", "").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
        assert_eq!(check(&no_key), Err(Refusal::BadRequest));
        for bad in ["not-base64-at-all!!!!!!!", "dGhlIHNhbXBsZSBub25jZQ", "AAAAAAAAAAAAAAAAAAAAAAAAAA==", ""]
        {
            let s = upgrade("/v1/agent", "").replace(KEY, bad);
            assert_eq!(check(&s), Err(Refusal::BadRequest), "key {bad:?}");
        }
        let key_twice = upgrade("/v1/agent", &format!("Sec-WebSocket-Key: {KEY}\r\n"));
        assert_eq!(check(&key_twice), Err(Refusal::BadRequest));
        // 400: HTTP/1.0 upgrade.
        let http10 = upgrade("/v1/agent", "").replace("HTTP/1.1", "HTTP/1.0");
        assert_eq!(check(&http10), Err(Refusal::BadRequest));
        // 400: subprotocols offered without switchboard.v1 (a bearer alone is not enough).
        let wrong_proto = upgrade("/v1/client", "Sec-WebSocket-Protocol: chat, superchat\r\n");
        assert_eq!(check(&wrong_proto), Err(Refusal::BadRequest));
        let bearer_only = upgrade("/v1/client", "Sec-WebSocket-Protocol: bearer.abc\r\n");
        assert_eq!(check(&bearer_only), Err(Refusal::BadRequest));
        let case = upgrade("/v1/client", "Sec-WebSocket-Protocol: Switchboard.V1\r\n");
        assert_eq!(check(&case), Err(Refusal::BadRequest));
        // Accepted variants.
        let ok_proto = upgrade("/v1/client", "Sec-WebSocket-Protocol: switchboard.v1\r\n");
        assert_eq!(check(&ok_proto), Ok(()));
        let lists = upgrade("/v1/agent", "")
            .replace("Upgrade: websocket", "Upgrade: h2c, WebSocket")
            .replace("Connection: Upgrade", "Connection: keep-alive, UPGRADE");
        assert_eq!(check(&lists), Ok(()));
        let split_conn = upgrade("/v1/agent", "Connection: upgrade\r\n")
            .replace("Connection: Upgrade", "Connection: keep-alive");
        assert_eq!(check(&split_conn), Ok(()));
    }

    #[test]
    fn token_places_and_precedence() {
        let all = upgrade(
            "/v1/client?access_token=from_query",
            "Authorization: Bearer from_auth\r\nSec-WebSocket-Protocol: switchboard.v1, bearer.from_proto\r\n",
        );
        let r = parse(&all);
        assert_eq!(r.bearer_from_authorization.as_deref(), Some("from_auth"));
        assert_eq!(r.bearer_from_protocol.as_deref(), Some("from_proto"));
        assert_eq!(r.access_token.as_deref(), Some("from_query"));
        assert_eq!(r.client_token(), Some("from_auth"));
        assert!(r.offers_switchboard_v1);

        let proto_and_query = upgrade(
            "/v1/client?access_token=from_query",
            "Sec-WebSocket-Protocol: switchboard.v1, bearer.from_proto\r\n",
        );
        assert_eq!(parse(&proto_and_query).client_token(), Some("from_proto"));

        let query_only = upgrade("/v1/client?x=1&access_token=from_query&access_token=second", "");
        assert_eq!(parse(&query_only).client_token(), Some("from_query"));

        // Scheme is case-insensitive; other schemes are not tokens; empty is none.
        let lower = upgrade("/v1/client?access_token=q", "authorization: bEaReR   tok  \r\n");
        assert_eq!(parse(&lower).client_token(), Some("tok"));
        let basic = upgrade("/v1/client?access_token=q", "Authorization: Basic dXNlcjpwYXNz\r\n");
        assert_eq!(parse(&basic).bearer_from_authorization, None);
        assert_eq!(parse(&basic).client_token(), Some("q"));
        let empty = upgrade("/v1/client?access_token=", "Authorization: Bearer\r\n");
        assert_eq!(parse(&empty).client_token(), None);
        let empty_proto = upgrade("/v1/client", "Sec-WebSocket-Protocol: switchboard.v1, bearer.\r\n");
        assert_eq!(parse(&empty_proto).client_token(), None);
    }

    #[test]
    fn subprotocol_across_lines_and_lists() {
        let s = upgrade(
            "/v1/client",
            "Sec-WebSocket-Protocol: bearer.eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln\r\n\
Sec-WebSocket-Protocol:   other ,, switchboard.v1 \r\nSec-WebSocket-Protocol: bearer.second\r\n",
        );
        let r = parse(&s);
        assert!(r.protocols_offered && r.offers_switchboard_v1);
        assert_eq!(r.bearer_from_protocol.as_deref(), Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln"));
        assert_eq!(check_upgrade(&r), Ok(()));
        // An empty header offers nothing.
        let empty = parse(&upgrade("/v1/client", "Sec-WebSocket-Protocol: \r\n"));
        assert!(!empty.protocols_offered);
        assert_eq!(check_upgrade(&empty), Ok(()));
    }

    #[test]
    fn query_percent_decoding() {
        let r = parse(&upgrade(
            "/v1/client?agent=ag%5F1&since=4%32&epoch=e%2d1&resume=s+1&access_token=a%2Eb%2ec&%61gent=dup",
            "",
        ));
        assert_eq!(r.agent.as_deref(), Some("ag_1"));
        assert_eq!(r.since.as_deref(), Some("42"));
        assert_eq!(r.epoch.as_deref(), Some("e-1"));
        assert_eq!(r.resume.as_deref(), Some("s 1"));
        assert_eq!(r.access_token.as_deref(), Some("a.b.c"));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%E2%9C%93"), "\u{2713}");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_decode("%"), "%");
        let r = parse(&upgrade("/v1/client?agent&since=&&=x&epoch", ""));
        assert_eq!(r.agent.as_deref(), Some(""));
        assert_eq!(r.since.as_deref(), Some(""));
        assert_eq!(r.epoch.as_deref(), Some(""));
        assert_eq!(r.resume, None);
    }

    #[test]
    fn debug_redacts_credentials() {
        let s = upgrade(
            "/v1/client?access_token=SECRET_Q",
            "Authorization: Bearer SECRET_A\r\nSec-WebSocket-Protocol: switchboard.v1, bearer.SECRET_P\r\n\
X-Switchboard-Signature: SECRET_S\r\n",
        );
        let dbg = format!("{:?}", parse(&s));
        assert!(!dbg.contains("SECRET"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    fn split_response(resp: &[u8]) -> (String, &[u8]) {
        let pos = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("head end");
        (String::from_utf8(resp[..pos + 2].to_vec()).unwrap(), &resp[pos + 4..])
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.split("\r\n")
            .filter_map(|l| l.split_once(": "))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    #[test]
    fn refusal_responses_are_complete_and_consistent() {
        for r in Refusal::ALL {
            let (head, body) = split_response(r.response());
            assert!(head.starts_with(&format!("HTTP/1.1 {} {}\r\n", r.status(), r.reason())), "{head}");
            assert_eq!(header(&head, "Content-Type"), Some("application/json"));
            assert_eq!(header(&head, "Connection"), Some("close"));
            assert_eq!(header(&head, "Content-Length"), Some(body.len().to_string().as_str()), "{r:?}");
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v, serde_json::json!({ "error": r.code() }));
            assert_eq!(
                header(&head, "Sec-WebSocket-Version"),
                (r == Refusal::UpgradeRequired).then_some("13")
            );
            assert_eq!(r.to_string(), format!("{} {}", r.status(), r.code()));
            // httparse agrees it is a well-formed response.
            let mut hs = [httparse::EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut hs);
            assert!(resp.parse(r.response()).unwrap().is_complete());
            assert_eq!(resp.code, Some(r.status()));
        }
        assert_eq!(
            Refusal::MethodNotAllowed.response().windows(12).filter(|w| w == b"Allow: GET\r\n").count(),
            1
        );
    }

    #[test]
    fn healthz_responses() {
        for (draining, status, body) in
            [(false, 200, r#"{"status":"ok"}"#), (true, 503, r#"{"status":"draining"}"#)]
        {
            let resp = healthz_response(draining);
            let (head, b) = split_response(resp);
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")));
            assert_eq!(b, body.as_bytes());
            assert_eq!(header(&head, "Content-Length"), Some(b.len().to_string().as_str()));
            assert_eq!(header(&head, "Content-Type"), Some("application/json"));
        }
    }

    #[test]
    fn switching_protocols_response() {
        // RFC 6455 §1.3 example.
        let resp = switching_protocols(KEY, false);
        let (head, body) = split_response(&resp);
        assert!(body.is_empty());
        assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert_eq!(header(&head, "Sec-WebSocket-Accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert_eq!(header(&head, "Upgrade"), Some("websocket"));
        assert_eq!(header(&head, "Connection"), Some("Upgrade"));
        assert_eq!(header(&head, "Sec-WebSocket-Protocol"), None);
        let resp = switching_protocols(KEY, true);
        let (head, _) = split_response(&resp);
        assert_eq!(header(&head, "Sec-WebSocket-Protocol"), Some("switchboard.v1"));
        assert!(!head.contains("bearer"));
    }
}
