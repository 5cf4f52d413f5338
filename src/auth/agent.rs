//! Agent credentials: the signed upgrade (spec §3.1), signed messages (spec §3.2) and the
//! per-agent nonce window.
//!
//! Owns: the two signed-string formats, their syntax rules, verification against an
//! [`AgentKey`] (HMAC-SHA256 secret or Ed25519 public key) and the signing counterparts used
//! by tests, examples and the load generator.
//!
//! What must stay true:
//! - [`check_upgrade_syntax`] is cheap (no crypto, no allocation) because it runs before the
//!   store lookup, for unauthenticated requests.
//! - [`verify_upgrade`] and [`verify_message`] allocate nothing: signatures decode into stack
//!   arrays, the upgrade string is built on the stack, HMAC messages are fed incrementally,
//!   and Ed25519 messages are built in the caller's reused scratch `Vec`.
//! - Comparisons are constant time: ring's `hmac::verify`/Ed25519 verify, and `ct_eq` for
//!   the incremental HMAC tag.
//! - The signed strings are byte-exact what the spec says; a known-answer test computed
//!   outside this code pins them.
//! - Call order in the handshake: syntax → store lookup (unknown/revoked/expired) →
//!   [`verify_upgrade`] → [`NonceWindow::check_and_insert`]. The nonce goes in only after the
//!   signature verified, or anyone could fill an agent's window and lock it out.

use std::collections::{HashSet, VecDeque};
use std::fmt;

use base64::Engine as _;
use ring::hmac;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

use super::{AuthError, B64URL};

/// First line of the upgrade's signed string.
pub const UPGRADE_CONTEXT: &str = "switchboard-agent-v1";
/// First line of a message's signed string.
pub const MESSAGE_CONTEXT: &str = "switchboard-msg-v1";
/// Longest agent id, conn id and session id (spec §1).
pub const MAX_ID_LEN: usize = 64;
/// Nonce length bounds (spec §3.1).
pub const MIN_NONCE_LEN: usize = 16;
pub const MAX_NONCE_LEN: usize = 64;
/// Longest accepted timestamp text (u64::MAX has 20 digits; leading zeros count).
pub const MAX_TIMESTAMP_LEN: usize = 20;
/// Longest accepted `ctr` text: ctr < 2^53, which has 16 decimal digits.
pub const MAX_CTR_LEN: usize = 16;
/// `ctr` must be below 2^53 (spec §3.2).
pub const MAX_CTR: u64 = 1 << 53;
/// Default cap on remembered nonces per agent (see [`NonceWindow`]).
pub const DEFAULT_NONCE_CAP: usize = 4096;

const HMAC_TAG_LEN: usize = 32;
const ED25519_SIG_LEN: usize = 64;
/// Room for a 64-byte signature decoded from 86/88 chars (`decode_slice` wants the estimate).
const SIG_BUF_LEN: usize = 66;
/// "switchboard-agent-v1\n" + id + "\n" + ts + "\n" + nonce, at their maxima: 171 bytes.
const UPGRADE_BUF_LEN: usize =
    UPGRADE_CONTEXT.len() + 1 + MAX_ID_LEN + 1 + MAX_TIMESTAMP_LEN + 1 + MAX_NONCE_LEN;

/// An agent's credential as the relay holds it.
#[derive(Clone)]
pub enum AgentKey {
    /// HMAC-SHA256 over the UTF-8 bytes of the `sbk_…` secret.
    Hmac(hmac::Key),
    /// An Ed25519 public key (32 bytes).
    Ed25519(UnparsedPublicKey<[u8; 32]>),
}

impl AgentKey {
    /// An HMAC agent's key from its secret, exactly as the CLI printed it.
    pub fn hmac(secret: &[u8]) -> Self {
        AgentKey::Hmac(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// An Ed25519 agent's key from its raw 32-byte public key.
    pub fn ed25519(public_key: [u8; 32]) -> Self {
        AgentKey::Ed25519(UnparsedPublicKey::new(&ED25519, public_key))
    }

    fn sig_len(&self) -> usize {
        match self {
            AgentKey::Hmac(_) => HMAC_TAG_LEN,
            AgentKey::Ed25519(_) => ED25519_SIG_LEN,
        }
    }

    /// Verify a signature over one contiguous message.
    fn verify_contiguous(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            AgentKey::Hmac(k) => sig.len() == HMAC_TAG_LEN && hmac::verify(k, msg, sig).is_ok(),
            AgentKey::Ed25519(pk) => sig.len() == ED25519_SIG_LEN && pk.verify(msg, sig).is_ok(),
        }
    }
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentKey::Hmac(_) => f.write_str("AgentKey::Hmac(<redacted>)"),
            AgentKey::Ed25519(_) => f.write_str("AgentKey::Ed25519(<redacted>)"),
        }
    }
}

/// The four `X-Switchboard-*` header values of an agent's upgrade, borrowed from the request.
#[derive(Clone, Copy)]
pub struct UpgradeHeaders<'a> {
    pub agent_id: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub signature: &'a str,
}

impl fmt::Debug for UpgradeHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signature is a credential (spec §2: never logged).
        f.debug_struct("UpgradeHeaders")
            .field("agent_id", &self.agent_id)
            .field("timestamp", &self.timestamp)
            .field("nonce", &self.nonce)
            .field("signature", &"<redacted>")
            .finish()
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn is_token(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(is_id_byte)
}

/// A plain decimal: 1..=`max_len` ASCII digits, nothing else (no sign, space, fraction).
/// Leading zeros are accepted (the signature covers the exact text anyway).
fn parse_decimal(s: &str, max_len: usize) -> Option<u64> {
    if s.is_empty() || s.len() > max_len {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Decode a base64url signature (padded or not) of 32 or 64 bytes into `out`; the length.
fn decode_sig(sig: &str, out: &mut [u8; SIG_BUF_LEN]) -> Option<usize> {
    // 32 bytes: 43 chars (+1 '='); 64 bytes: 86 chars (+2 '=').
    if !matches!(sig.len(), 43 | 44 | 86 | 88) {
        return None;
    }
    let n = B64URL.decode_slice(sig, out).ok()?;
    matches!(n, HMAC_TAG_LEN | ED25519_SIG_LEN).then_some(n)
}

/// The cheap checks of an agent upgrade, run before the store lookup: agent id, timestamp
/// (plain decimal within `max_skew_secs` of `now`), nonce, and that the signature is
/// base64url of a plausible length. Returns the timestamp.
pub fn check_upgrade_syntax(h: &UpgradeHeaders<'_>, now: u64, max_skew_secs: u64) -> Result<i64, AuthError> {
    if !is_token(h.agent_id, 1, MAX_ID_LEN) {
        return Err(AuthError::MalformedAgentId);
    }
    let ts = parse_decimal(h.timestamp, MAX_TIMESTAMP_LEN)
        .and_then(|t| i64::try_from(t).ok())
        .ok_or(AuthError::MalformedTimestamp)?;
    if (ts as u64).abs_diff(now) > max_skew_secs {
        return Err(AuthError::StaleTimestamp);
    }
    if !is_token(h.nonce, MIN_NONCE_LEN, MAX_NONCE_LEN) {
        return Err(AuthError::MalformedNonce);
    }
    let mut sig = [0u8; SIG_BUF_LEN];
    decode_sig(h.signature, &mut sig).ok_or(AuthError::MalformedSignature)?;
    Ok(ts)
}

/// A tiny stack writer; `None` when the parts do not fit.
fn write_parts<'b>(buf: &'b mut [u8], parts: &[&[u8]]) -> Option<&'b [u8]> {
    let mut at = 0;
    for p in parts {
        buf.get_mut(at..at + p.len())?.copy_from_slice(p);
        at += p.len();
    }
    Some(&buf[..at])
}

/// Verify an upgrade's signature over `switchboard-agent-v1\n<agent_id>\n<timestamp>\n<nonce>`
/// (the header texts exactly as received). Run [`check_upgrade_syntax`] first; values longer
/// than it allows simply fail here. Allocates nothing.
pub fn verify_upgrade(key: &AgentKey, h: &UpgradeHeaders<'_>) -> bool {
    let mut sig = [0u8; SIG_BUF_LEN];
    let Some(n) = decode_sig(h.signature, &mut sig) else {
        return false;
    };
    if n != key.sig_len() {
        return false;
    }
    let mut buf = [0u8; UPGRADE_BUF_LEN];
    let Some(msg) = write_parts(&mut buf, &upgrade_parts(h.agent_id, h.timestamp, h.nonce)) else {
        return false;
    };
    key.verify_contiguous(msg, &sig[..n])
}

/// Constant-time equality of two equal-length byte strings (length is not secret).
/// `black_box` keeps the optimiser from turning the fold into an early exit.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// Verify a `send` frame's signature over
/// `switchboard-msg-v1\n<conn>\n<ctr>\n<to or empty>\n<data>` — the per-message hot path.
///
/// `ctr_decimal` is the `ctr` text exactly as in the frame (plain digits, 1 <= ctr < 2^53,
/// else `false`); `to` is `""` for a broadcast; `data` is the exact bytes of the frame's `data`
/// value. The caller still owns the counter check (`ctr` above the last accepted).
///
/// HMAC keys are fed incrementally and compared in constant time; Ed25519 needs the message
/// contiguous, so it is built in `scratch` (cleared first, reused: no allocation once it has
/// grown to the largest frame).
pub fn verify_message(
    key: &AgentKey,
    conn: &str,
    ctr_decimal: &str,
    to: &str,
    data: &[u8],
    sig_b64: &str,
    scratch: &mut Vec<u8>,
) -> bool {
    if !parse_decimal(ctr_decimal, MAX_CTR_LEN).is_some_and(|c| (1..MAX_CTR).contains(&c)) {
        return false;
    }
    let mut sig = [0u8; SIG_BUF_LEN];
    let Some(n) = decode_sig(sig_b64, &mut sig) else {
        return false;
    };
    if n != key.sig_len() {
        return false;
    }
    let parts = message_parts(conn, ctr_decimal, to, data);
    match key {
        AgentKey::Hmac(k) => {
            let mut ctx = hmac::Context::with_key(k);
            let (head, body) = parts.split_at(8);
            let mut buf = [0u8; MESSAGE_HEAD_BUF_LEN];
            match write_parts(&mut buf, head) {
                // Ids within the spec's bounds: one update for the whole head.
                Some(h) => ctx.update(h),
                None => head.iter().for_each(|p| ctx.update(p)),
            }
            ctx.update(body[0]);
            ct_eq(ctx.sign().as_ref(), &sig[..n])
        }
        AgentKey::Ed25519(_) => {
            scratch.clear();
            parts.iter().for_each(|p| scratch.extend_from_slice(p));
            key.verify_contiguous(scratch, &sig[..n])
        }
    }
}

/// "switchboard-msg-v1\n" + conn + "\n" + ctr + "\n" + to + "\n" at their maxima.
const MESSAGE_HEAD_BUF_LEN: usize =
    MESSAGE_CONTEXT.len() + 1 + MAX_ID_LEN + 1 + MAX_CTR_LEN + 1 + MAX_ID_LEN + 1;

/// The message's signed string in pieces; the last piece is `data`.
fn message_parts<'a>(conn: &'a str, ctr: &'a str, to: &'a str, data: &'a [u8]) -> [&'a [u8]; 9] {
    [
        MESSAGE_CONTEXT.as_bytes(),
        b"\n",
        conn.as_bytes(),
        b"\n",
        ctr.as_bytes(),
        b"\n",
        to.as_bytes(),
        b"\n",
        data,
    ]
}

fn upgrade_parts<'a>(agent_id: &'a str, ts: &'a str, nonce: &'a str) -> [&'a [u8]; 7] {
    [UPGRADE_CONTEXT.as_bytes(), b"\n", agent_id.as_bytes(), b"\n", ts.as_bytes(), b"\n", nonce.as_bytes()]
}

// ---------------------------------------------------------------------------------------------
// Signing (agents, tests, the load generator). Allocation is fine here.

fn upgrade_string(agent_id: &str, ts: u64, nonce: &str) -> Vec<u8> {
    upgrade_parts(agent_id, &ts.to_string(), nonce).concat()
}

fn message_string(conn: &str, ctr: u64, to: &str, data: &[u8]) -> Vec<u8> {
    message_parts(conn, &ctr.to_string(), to, data).concat()
}

/// The `X-Switchboard-Signature` of an HMAC agent (base64url, no padding) for the timestamp
/// sent as `ts` in plain decimal.
pub fn sign_upgrade_hmac(secret: &[u8], agent_id: &str, ts: u64, nonce: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    B64URL.encode(hmac::sign(&key, &upgrade_string(agent_id, ts, nonce)))
}

/// The `X-Switchboard-Signature` of an Ed25519 agent (base64url, no padding).
pub fn sign_upgrade_ed25519(key_pair: &Ed25519KeyPair, agent_id: &str, ts: u64, nonce: &str) -> String {
    B64URL.encode(key_pair.sign(&upgrade_string(agent_id, ts, nonce)))
}

/// The `sig` of an HMAC agent's `send` frame; `to` is `""` for a broadcast and `data` the
/// exact bytes of the frame's `data` value.
pub fn sign_message_hmac(secret: &[u8], conn: &str, ctr: u64, to: &str, data: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    B64URL.encode(hmac::sign(&key, &message_string(conn, ctr, to, data)))
}

/// The `sig` of an Ed25519 agent's `send` frame.
pub fn sign_message_ed25519(
    key_pair: &Ed25519KeyPair,
    conn: &str,
    ctr: u64,
    to: &str,
    data: &[u8],
) -> String {
    B64URL.encode(key_pair.sign(&message_string(conn, ctr, to, data)))
}

// ---------------------------------------------------------------------------------------------
// Nonce window

/// A nonce stored inline (no heap per entry): ids are at most 64 bytes of `[A-Za-z0-9_-]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct NonceKey {
    len: u8,
    bytes: [u8; MAX_NONCE_LEN],
}

impl NonceKey {
    fn new(nonce: &str) -> Option<Self> {
        let mut bytes = [0u8; MAX_NONCE_LEN];
        bytes.get_mut(..nonce.len())?.copy_from_slice(nonce.as_bytes());
        Some(NonceKey { len: nonce.len() as u8, bytes })
    }
}

/// The nonces one agent used recently (spec §3.1: a nonce is remembered for
/// 2 × `max_skew_secs` after it was accepted).
///
/// Why 2 × skew, inclusive: a nonce accepted at `a` carried a timestamp `t >= a - skew`, and a
/// replay of it passes the timestamp check until `t + skew <= a + 2·skew` — including that
/// second itself. An entry is forgotten only once `now > a + 2·skew`.
///
/// Memory is bounded two ways: expired entries are dropped (oldest first, on every call), and
/// at most `cap` live entries are kept (default [`DEFAULT_NONCE_CAP`], about 150 bytes each).
/// When the window is full a *new* nonce is refused ([`AuthError::NonceWindowFull`]) rather
/// than a live one forgotten: a refusal only delays an agent that reconnects absurdly often
/// (thousands of signed upgrades within 2 × skew), while forgetting would reopen a replay
/// hole. Insert only after the signature verified, so only the agent itself can fill it.
///
/// If the clock steps backwards, entries simply live longer (expiry order is by insertion).
pub struct NonceWindow {
    ttl_secs: u64,
    cap: usize,
    /// (expires_at = accepted + ttl, nonce), oldest first.
    by_time: VecDeque<(u64, NonceKey)>,
    live: HashSet<NonceKey>,
}

impl NonceWindow {
    /// A window remembering nonces for `2 * max_skew_secs`, capped at [`DEFAULT_NONCE_CAP`].
    pub fn new(max_skew_secs: u64) -> Self {
        Self::with_cap(max_skew_secs, DEFAULT_NONCE_CAP)
    }

    /// Same with an explicit cap on live entries.
    pub fn with_cap(max_skew_secs: u64, cap: usize) -> Self {
        NonceWindow {
            ttl_secs: max_skew_secs.saturating_mul(2),
            cap,
            by_time: VecDeque::new(),
            live: HashSet::new(),
        }
    }

    /// `true`: the nonce is fresh and is now remembered. `false`: a replay, a full window, or a
    /// nonce longer than 64 bytes — refuse the upgrade.
    pub fn check_and_insert(&mut self, nonce: &str, now: u64) -> bool {
        self.try_insert(nonce, now).is_ok()
    }

    /// [`check_and_insert`](Self::check_and_insert) with the reason, for metrics.
    pub fn try_insert(&mut self, nonce: &str, now: u64) -> Result<(), AuthError> {
        let key = NonceKey::new(nonce).ok_or(AuthError::MalformedNonce)?;
        self.prune(now);
        if self.live.contains(&key) {
            return Err(AuthError::ReplayedNonce);
        }
        if self.live.len() >= self.cap {
            return Err(AuthError::NonceWindowFull);
        }
        self.live.insert(key);
        self.by_time.push_back((now.saturating_add(self.ttl_secs), key));
        Ok(())
    }

    /// Forget every nonce whose window has passed; callers may also run it from a sweep of
    /// idle agents. Gives memory back once the window has drained after a burst.
    pub fn prune(&mut self, now: u64) {
        while let Some(&(expires_at, key)) = self.by_time.front() {
            if expires_at >= now {
                break;
            }
            self.by_time.pop_front();
            self.live.remove(&key);
        }
        if self.live.is_empty() && self.live.capacity() > 64 {
            self.live = HashSet::new();
            self.by_time = VecDeque::new();
        }
    }

    /// Live (remembered) nonces.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

impl fmt::Debug for NonceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceWindow")
            .field("ttl_secs", &self.ttl_secs)
            .field("cap", &self.cap)
            .field("len", &self.live.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    const SECRET: &[u8] = b"sbk_test_secret";
    const NOW: u64 = 1_700_000_000;
    const NONCE: &str = "abcdefghijklmnop";

    fn ed_pair() -> (Ed25519KeyPair, AgentKey) {
        use ring::signature::KeyPair as _;
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let pk: [u8; 32] = kp.public_key().as_ref().try_into().unwrap();
        (kp, AgentKey::ed25519(pk))
    }

    fn headers<'a>(id: &'a str, ts: &'a str, nonce: &'a str, sig: &'a str) -> UpgradeHeaders<'a> {
        UpgradeHeaders { agent_id: id, timestamp: ts, nonce, signature: sig }
    }

    fn pad(s: &str) -> String {
        let mut s = s.to_string();
        while s.len() % 4 != 0 {
            s.push('=');
        }
        s
    }

    // Known answers computed outside this code (Python's hmac/hashlib/base64) from the spec's
    // text, so a change to the signed strings cannot go unnoticed.
    #[test]
    fn hmac_known_answers() {
        let sig = "JC0xVF6ydBNw29ToMMbLraXM1DW-_UNw2FNbudnQnVY";
        assert_eq!(sign_upgrade_hmac(SECRET, "ag_1", NOW, NONCE), sig);
        let key = AgentKey::hmac(SECRET);
        assert!(verify_upgrade(&key, &headers("ag_1", "1700000000", NONCE, sig)));

        let to = "jv_Cgp-oowwC9kwR8MBpWloOjDgEpodUtTVM2WKAqcs";
        let broadcast = "ERw0_l6NxvBCvuvOfLwQ-mZbiCs7-_et5s0uNel8LSc";
        assert_eq!(sign_message_hmac(SECRET, "c_1", 7, "s_9", br#"{"x":1}"#), to);
        assert_eq!(sign_message_hmac(SECRET, "c_1", 7, "", br#"{"x":1}"#), broadcast);
        let mut scratch = Vec::new();
        assert!(verify_message(&key, "c_1", "7", "s_9", br#"{"x":1}"#, to, &mut scratch));
        assert!(verify_message(&key, "c_1", "7", "", br#"{"x":1}"#, broadcast, &mut scratch));
        assert!(!verify_message(&key, "c_1", "7", "", br#"{"x":1}"#, to, &mut scratch));
    }

    #[test]
    fn upgrade_good_and_bad() {
        let (kp, ed) = ed_pair();
        let (_, other_ed) = ed_pair();
        let hm = AgentKey::hmac(SECRET);
        let other_hm = AgentKey::hmac(b"sbk_other");
        let ts = NOW.to_string();
        for (key, other, sig) in [
            (&hm, &other_hm, sign_upgrade_hmac(SECRET, "ag_1", NOW, NONCE)),
            (&ed, &other_ed, sign_upgrade_ed25519(&kp, "ag_1", NOW, NONCE)),
        ] {
            let h = headers("ag_1", &ts, NONCE, &sig);
            assert_eq!(check_upgrade_syntax(&h, NOW, 300), Ok(NOW as i64));
            assert!(verify_upgrade(key, &h));
            // Padded signatures are accepted too.
            let padded = pad(&sig);
            assert_ne!(padded, sig);
            let hp = headers("ag_1", &ts, NONCE, &padded);
            assert_eq!(check_upgrade_syntax(&hp, NOW, 300), Ok(NOW as i64));
            assert!(verify_upgrade(key, &hp));
            // Any other key, id, timestamp or nonce fails.
            assert!(!verify_upgrade(other, &h));
            assert!(!verify_upgrade(key, &headers("ag_2", &ts, NONCE, &sig)));
            assert!(!verify_upgrade(key, &headers("ag_1", "1700000001", NONCE, &sig)));
            assert!(!verify_upgrade(key, &headers("ag_1", "01700000000", NONCE, &sig)));
            assert!(!verify_upgrade(key, &headers("ag_1", &ts, "abcdefghijklmnoq", &sig)));
            // A signature of the other kind's length never verifies.
            assert!(!verify_upgrade(if std::ptr::eq(key, &hm) { &ed } else { &hm }, &h));
        }
        // A flipped bit.
        let mut sig = B64URL.decode(sign_upgrade_hmac(SECRET, "ag_1", NOW, NONCE)).unwrap();
        sig[5] ^= 1;
        assert!(!verify_upgrade(&hm, &headers("ag_1", &ts, NONCE, &B64URL.encode(&sig))));
    }

    #[test]
    fn upgrade_syntax_edges() {
        let sig32 = B64URL.encode([7u8; 32]);
        let sig64 = B64URL.encode([7u8; 64]);
        let ts = NOW.to_string();
        let ok = |id: &str, t: &str, n: &str, s: &str| check_upgrade_syntax(&headers(id, t, n, s), NOW, 300);
        assert!(ok("a", &ts, NONCE, &sig32).is_ok());
        assert!(ok(&"A-_z9".repeat(13)[..64], &ts, &"n".repeat(64), &sig64).is_ok());
        assert!(ok("a", &ts, NONCE, &pad(&sig64)).is_ok());

        use AuthError::*;
        // agent id
        assert_eq!(ok("", &ts, NONCE, &sig32), Err(MalformedAgentId));
        assert_eq!(ok(&"a".repeat(65), &ts, NONCE, &sig32), Err(MalformedAgentId));
        for bad in ["a b", "a.b", "a/b", "a+b", "é", "a\n"] {
            assert_eq!(ok(bad, &ts, NONCE, &sig32), Err(MalformedAgentId), "{bad:?}");
        }
        // timestamp: plain decimal only
        for bad in ["", "+1700000000", "-1700000000", " 1700000000", "1700000000 ", "1.7e9", "17000000x0"] {
            assert_eq!(ok("a", bad, NONCE, &sig32), Err(MalformedTimestamp), "{bad:?}");
        }
        assert_eq!(ok("a", "99999999999999999999", NONCE, &sig32), Err(MalformedTimestamp)); // > u64
        assert_eq!(ok("a", "18446744073709551615", NONCE, &sig32), Err(MalformedTimestamp)); // > i64
        assert_eq!(ok("a", &format!("0{ts}"), NONCE, &sig32), Ok(NOW as i64));
        assert_eq!(ok("a", &(NOW - 300).to_string(), NONCE, &sig32), Ok((NOW - 300) as i64));
        assert_eq!(ok("a", &(NOW + 300).to_string(), NONCE, &sig32), Ok((NOW + 300) as i64));
        assert_eq!(ok("a", &(NOW - 301).to_string(), NONCE, &sig32), Err(StaleTimestamp));
        assert_eq!(ok("a", &(NOW + 301).to_string(), NONCE, &sig32), Err(StaleTimestamp));
        assert_eq!(ok("a", "0", NONCE, &sig32), Err(StaleTimestamp));
        // nonce
        assert_eq!(ok("a", &ts, &"n".repeat(15), &sig32), Err(MalformedNonce));
        assert_eq!(ok("a", &ts, &"n".repeat(65), &sig32), Err(MalformedNonce));
        assert_eq!(ok("a", &ts, "abcdefghijklmno=", &sig32), Err(MalformedNonce));
        // signature
        let std_b64 = base64::engine::general_purpose::STANDARD.encode([0xfbu8; 32]);
        assert!(std_b64.contains('+') || std_b64.contains('/'));
        for bad in [
            String::new(),
            std_b64,
            sig32[..42].to_string(),
            format!("{sig32}A"),
            format!("{sig32}=="),
            B64URL.encode([1u8; 48]),
            // non-zero trailing bits: not canonical
            format!("{}B", &sig32[..42]),
        ] {
            assert_eq!(ok("a", &ts, NONCE, &bad), Err(MalformedSignature), "{bad:?}");
        }
    }

    #[test]
    fn message_good_and_bad() {
        let (kp, ed) = ed_pair();
        let (_, other_ed) = ed_pair();
        let hm = AgentKey::hmac(SECRET);
        let other_hm = AgentKey::hmac(b"sbk_other");
        let data = br#"{"text":"hello","n":[1,2,3]}"#;
        let mut scratch = Vec::new();
        for (key, other, sign) in [
            (
                &hm,
                &other_hm,
                Box::new(|c: &str, n, t: &str, d: &[u8]| sign_message_hmac(SECRET, c, n, t, d))
                    as Box<dyn Fn(&str, u64, &str, &[u8]) -> String>,
            ),
            (&ed, &other_ed, Box::new(|c: &str, n, t: &str, d: &[u8]| sign_message_ed25519(&kp, c, n, t, d))),
        ] {
            for to in ["s_1", ""] {
                let sig = sign("c_1", 42, to, data);
                let v = |k: &AgentKey, c: &str, n: &str, t: &str, d: &[u8], s: &str, sc: &mut Vec<u8>| {
                    verify_message(k, c, n, t, d, s, sc)
                };
                assert!(v(key, "c_1", "42", to, data, &sig, &mut scratch));
                assert!(v(key, "c_1", "42", to, data, &pad(&sig), &mut scratch));
                assert!(!v(other, "c_1", "42", to, data, &sig, &mut scratch));
                assert!(!v(key, "c_2", "42", to, data, &sig, &mut scratch));
                assert!(!v(key, "c_1", "43", to, data, &sig, &mut scratch));
                assert!(!v(key, "c_1", "042", to, data, &sig, &mut scratch));
                assert!(!v(key, "c_1", "42", "s_2", data, &sig, &mut scratch));
                assert!(!v(key, "c_1", "42", to, br#"{"text":"hellO","n":[1,2,3]}"#, &sig, &mut scratch));
                assert!(!v(key, "c_1", "42", to, &data[..data.len() - 1], &sig, &mut scratch));
                assert!(!v(key, "c_1", "42", to, data, "", &mut scratch));
                assert!(!v(key, "c_1", "42", to, data, &sig[1..], &mut scratch));
            }
            // Moving bytes between fields changes the message.
            let sig = sign("c_1", 4, "2", data);
            assert!(!verify_message(key, "c_1", "42", "", data, &sig, &mut scratch));
        }
        // ctr must be a plain decimal of at most 16 digits.
        let sig = sign_message_hmac(SECRET, "c_1", 1, "", b"1");
        assert!(verify_message(&hm, "c_1", "1", "", b"1", &sig, &mut scratch));
        let top = (MAX_CTR - 1).to_string();
        let sig_top = sign_message_hmac(SECRET, "c_1", MAX_CTR - 1, "", b"1");
        assert!(verify_message(&hm, "c_1", &top, "", b"1", &sig_top, &mut scratch));
        let sig_over = sign_message_hmac(SECRET, "c_1", MAX_CTR, "", b"1");
        assert!(!verify_message(&hm, "c_1", &MAX_CTR.to_string(), "", b"1", &sig_over, &mut scratch));
        let sig_zero = sign_message_hmac(SECRET, "c_1", 0, "", b"1");
        assert!(!verify_message(&hm, "c_1", "0", "", b"1", &sig_zero, &mut scratch));
        for bad in ["", "+1", "-1", "1.0", "1e0", " 1", "12345678901234567"] {
            assert!(!verify_message(&hm, "c_1", bad, "", b"1", &sig, &mut scratch), "{bad:?}");
        }
        // Ids beyond the spec's bounds still verify consistently (slow path of the head).
        let long = "x".repeat(200);
        let sig = sign_message_hmac(SECRET, &long, 9, &long, data);
        assert!(verify_message(&hm, &long, "9", &long, data, &sig, &mut scratch));
        assert!(!verify_message(&hm, &long, "9", "x", data, &sig, &mut scratch));
    }

    #[test]
    fn scratch_is_reused() {
        let (kp, ed) = ed_pair();
        let data = vec![b'a'; 260];
        let sig = sign_message_ed25519(&kp, "c_1", 1, "s", &data);
        let mut scratch = Vec::with_capacity(1024);
        let ptr = scratch.as_ptr();
        for _ in 0..3 {
            assert!(verify_message(&ed, "c_1", "1", "s", &data, &sig, &mut scratch));
        }
        assert_eq!(scratch.as_ptr(), ptr);
    }

    #[test]
    fn debug_redacts() {
        let (_, ed) = ed_pair();
        assert_eq!(format!("{:?}", AgentKey::hmac(SECRET)), "AgentKey::Hmac(<redacted>)");
        assert_eq!(format!("{ed:?}"), "AgentKey::Ed25519(<redacted>)");
        let sig = sign_upgrade_hmac(SECRET, "ag_1", NOW, NONCE);
        let dbg = format!("{:?}", headers("ag_1", "1", NONCE, &sig));
        assert!(!dbg.contains(&sig) && dbg.contains("ag_1"), "{dbg}");
    }

    #[test]
    fn nonce_replay_and_expiry() {
        let mut w = NonceWindow::new(300);
        assert!(w.check_and_insert(NONCE, NOW));
        assert_eq!(w.try_insert(NONCE, NOW), Err(AuthError::ReplayedNonce));
        assert!(w.check_and_insert("abcdefghijklmnoq", NOW + 1));
        // Still remembered through accepted + 2·skew inclusive …
        assert!(!w.check_and_insert(NONCE, NOW + 600));
        // … and forgotten after.
        assert!(w.check_and_insert(NONCE, NOW + 601));
        assert!(!w.check_and_insert("abcdefghijklmnoq", NOW + 601));
        assert_eq!(w.len(), 2);
        w.prune(NOW + 10_000);
        assert!(w.is_empty());
        // Nonces are case-sensitive and compared whole.
        assert!(w.check_and_insert("ABCDEFGHIJKLMNOP", NOW));
        assert!(w.check_and_insert("abcdefghijklmnopq", NOW));
        assert_eq!(w.try_insert(&"n".repeat(65), NOW), Err(AuthError::MalformedNonce));
    }

    #[test]
    fn nonce_window_is_bounded() {
        let mut w = NonceWindow::with_cap(300, 100);
        for i in 0..100 {
            assert!(w.check_and_insert(&format!("nonce-{i:010}"), NOW + i / 10));
        }
        // Full: a new nonce is refused, live ones are not forgotten.
        assert_eq!(w.try_insert("nonce-new-000000", NOW + 10), Err(AuthError::NonceWindowFull));
        assert_eq!(w.try_insert("nonce-0000000000", NOW + 10), Err(AuthError::ReplayedNonce));
        assert_eq!(w.len(), 100);
        // The first ten (accepted at NOW) expire after NOW + 600: room again, for ten.
        for i in 0..10 {
            assert!(w.check_and_insert(&format!("later-{i:010}"), NOW + 601));
        }
        assert!(!w.check_and_insert("later-extra00000", NOW + 601));
        // Clock stepping backwards never forgets anything early.
        assert_eq!(w.try_insert("nonce-0000000099", NOW), Err(AuthError::ReplayedNonce));
        // Fully drained windows give their memory back.
        let mut big = NonceWindow::new(1);
        for i in 0..1000 {
            big.check_and_insert(&format!("nonce-{i:010}"), NOW);
        }
        big.prune(NOW + 3);
        assert!(big.is_empty() && big.live.capacity() == 0);
    }
}
